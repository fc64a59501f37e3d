"""ProDA (Lu et al., CVPR 2022): a collection of K prompts whose class text features are modelled as a Gaussian per
class; training minimises an upper bound of the expected cross-entropy under that Gaussian.

There is no official code (``bbbdylan/proda`` holds a README only). What follows which source:

- **the paper**: K prompts with class-token positions mixed (front / middle / end), a prompt mini-batch per step,
  the Gaussian over the prompts' text features with its covariance term in the logits, the inference classifier as
  the mean text feature of the K prompts;
- **FLiP** (``flcore/models/clip/ProDA.py``, ``text/prompt.py:233-367``), for every formula the paper leaves open:
  the position split (the first K/4 prompts put the class name in front, the next K/4 in the middle, the rest at
  the end; FLiP's own builder only assembles 'end' prompts and crashes otherwise, fedprompt builds all three), the
  prompt mini-batch drawn in order from a random permutation of the K prompts redrawn every K/|S| steps (per client
  here, from its own per-step seeds, restarted every round as FLiP's per-round model copy does), the covariance
  divided by |S| + 1, the refined logits, the orthogonality loss L_so over the class-agnostic prompts with weight
  1.0, and the not re-normalised means.

The per-step computation, for the |S| prompts of the step with L2-normalised class features w_{c,k}:

    mu_c = (1/|S|) sum_k w_{c,k},   sigma_{b,j} = (1/(|S|+1)) sum_d x_{b,d}^2 sum_k ((w_{j,k,d} - mu_{j,d}) -
    (w_{y,k,d} - mu_{y,d}))^2   (the variance of x_b . (w_j - w_y) under the diagonal covariance; sigma_{b,y} = 0)
    z_{b,j} = s x_b . mu_j + s^2 sigma_{b,j} / 2,   L = CE(z, y) + weight_so * L_so,
    L_so = mean_{k != l} |u_k . u_l|,  u_k = norm(g([SOS, P_k, ".", EOS])) over all K prompts (when |S| > 1),

with s the logit scale; this is FLiP's ``R(y,y) + R(j,j) - 2 R(y,j)`` without materialising the [D, C, C]
covariance (memory O(n x |S| x C x D): each image's own client's prompt features). Inference: logits
s x . mean_k w_{c,k} over all K prompts, computed once per evaluation (the classifier cache). ``compat: flip``
reproduces FLiP's runnable configuration when ``n_prompts`` / ``prompt_batch`` are null: K = 1, |S| = 1 and 'end'
positions (then sigma = 0 and L_so = 0: CoOp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from fedprompt.backbone.model import PromptTokens
from fedprompt.errors import FedPromptError
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors

#: the prompts K and the prompt mini-batch |S| by ``compat`` when null: the paper's K = 32 (|S| = 4 here), FLiP's 1
PRODA_DEFAULTS = {"paper": (32, 4), "flip": (1, 1)}
#: class-token positions
FRONT, MIDDLE, END = 0, 1, 2
#: the most sentences per text-encoder call when the K x C prompts are encoded for evaluation
EVAL_SENTENCES = 16384


def prompt_positions(k: int, mixed: bool = True) -> torch.Tensor:
    """The class-token position of each of the K prompts ``[K]``: FLiP's split (the first K // 4 front, the next
    K // 4 middle, the rest end), or all end (``mixed=False``, and always for K = 1)."""
    if not mixed or k == 1:
        return torch.full((k,), END, dtype=torch.long)
    quarter = k // 4
    return torch.tensor([FRONT] * quarter + [MIDDLE] * quarter + [END] * (k - 2 * quarter), dtype=torch.long)


def position_orders(name_lens: torch.Tensor, n_ctx: int, length: int) -> torch.Tensor:
    """Index maps ``[3, C, L]`` from the end sentence ``[SOS, ctx(n_ctx), name(l_c), ..., EOS, pad]`` to the front
    ``[SOS, name, ctx, ...]`` and middle ``[SOS, ctx[:n_ctx // 2], name, ctx[n_ctx // 2:], ...]`` sentences (a
    permutation of the first ``1 + n_ctx + l_c`` positions; the rest, the period, the end token and the padding, stay
    where they are, so every sentence keeps its length and its end position)."""
    half = n_ctx // 2
    orders = torch.arange(length).repeat(3, len(name_lens), 1)
    for c, l in enumerate(name_lens.tolist()):
        ctx = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + l))
        orders[FRONT, c, :1 + n_ctx + l] = torch.tensor([0, *name, *ctx])
        orders[MIDDLE, c, :1 + n_ctx + l] = torch.tensor([0, *ctx[:half], *name, *ctx[half:]])
    return orders


def refined_logits(image: torch.Tensor, feats: torch.Tensor, label: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """ProDA's training logits ``[n, C]`` for images ``[n, E]`` (L2-normalised), each image's own prompt features
    ``[n, S, C, E]`` (L2-normalised per prompt) and labels ``[n]``: ``s x . mu_j + s^2 sigma_j / 2`` (module
    docstring)."""
    prompts = feats.shape[1]
    mean = feats.mean(1)  # [n, C, E], not re-normalised
    delta = feats - mean.unsqueeze(1)  # [n, S, C, E]
    own = delta[torch.arange(delta.shape[0], device=delta.device), :, label]  # [n, S, E]: the true class's
    sigma = torch.einsum("nsce,ne->nc", (delta - own.unsqueeze(2)).pow(2), image.pow(2)) / (prompts + 1)
    return logit_scale * torch.einsum("ne,nce->nc", image, mean) + 0.5 * logit_scale ** 2 * sigma


def orthogonality_loss(agnostic: torch.Tensor) -> torch.Tensor:
    """L_so per client ``[A]``: the mean |cosine| between different class-agnostic prompt features ``[A, K, E]``."""
    k = agnostic.shape[1]
    dots = torch.einsum("ake,ale->akl", agnostic, agnostic).abs()
    off = ~torch.eye(k, dtype=torch.bool, device=agnostic.device)
    return dots[:, off].mean(-1)


@dataclass
class ProDAText:
    """ProDA's text side: training, ``prompts`` ``[A, S, C, E]`` (the step's prompt mini-batch) and ``agnostic``
    ``[A, K, E]`` (``None`` when |S| = 1); evaluation, ``mean`` ``[A, C, E]`` (the mean over all K prompts)."""

    prompts: torch.Tensor | None = None
    agnostic: torch.Tensor | None = None
    mean: torch.Tensor | None = None


class ProDAClient(PromptClient):
    """ProDA clients: K prompts ``prompt.ctx`` [K, n_ctx, D] each, from the :class:`ProDA` settings."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        words = self.init_words(settings.ctx_init)
        self.n_ctx = settings.n_ctx
        k = settings.prompts
        self.prompt = ContextVectors(settings.n_ctx, backbone.ctx_dim, shape=(k,), words=words, slots=slots)
        self.register_buffer("positions", prompt_positions(k, settings.compat != "flip"), persistent=False)
        # the prompt mini-batch sampler of each slot: steps drawn this round, and the current permutation of the K
        self.register_buffer("drawn", torch.zeros(slots, dtype=torch.long), persistent=False)
        self.register_buffer("order", torch.arange(k).repeat(slots, 1), persistent=False)

    @property
    def mixed(self) -> bool:
        return bool(self.settings.compat != "flip" and self.settings.prompts > 1)

    def class_data(self, classnames: list[str]) -> dict:
        """The end-position prompt tokens, the front / middle index maps ``orders`` [3, C, L], the whole-sentence
        token data ``sentences`` (for placing every position at once), and the class-agnostic ``[SOS] X..X. [EOS]``
        tokens ``agnostic``."""
        data = super().class_data(classnames)
        tokens = data["tokens"]
        length = tokens.embeddings.shape[1]
        name_lens = tokens.attention_mask.sum(1).cpu() - self.n_ctx - 3  # SOS, the context, ".", EOS
        data["orders"] = position_orders(name_lens, self.n_ctx, length)
        data["sentences"] = PromptTokens(tokens.embeddings, tokens.token_ids, tokens.attention_mask,
                                         tokens.pool_index, length - 1)
        data["agnostic"] = self.backbone.prompt_tokens([""], self.n_ctx, template="{ctx}{name}.")
        return data

    def on_round_start(self, global_state) -> None:
        """Every client's prompt mini-batch cycle restarts with the round."""
        self.drawn.zero_()

    # ------------------------------------------------------------------------------------------ the prompts
    def draw_batch(self, ctx: torch.Tensor) -> torch.Tensor:
        """The indices ``[A, S]`` of the step's prompt mini-batch of each active client: the next |S| of its current
        permutation of the K prompts, a new permutation (from the client's step seed) every K/|S| steps."""
        k, size = self.settings.prompts, self.settings.batch_of_prompts
        if size >= k:
            return torch.arange(k, device=ctx.device).expand(ctx.shape[0], k)
        seeds = self.step.seeds or [None] * self.clients
        fresh = torch.stack([torch.randperm(k, generator=None if s is None else torch.Generator().manual_seed(s))
                             for s in seeds]).to(ctx.device, non_blocking=True)
        drawn = self.active(self.drawn)
        phase = drawn % (k // size)
        order = torch.where((phase == 0).unsqueeze(1), fresh, self.active(self.order))
        chosen = order.gather(1, phase.unsqueeze(1) * size + torch.arange(size, device=ctx.device))
        self.set_active(self.order, order)  # each client's own sampler state
        self.set_active(self.drawn, drawn + 1)
        return chosen

    def encode(self, ctx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """L2-normalised class text features ``[A, P, C, E]`` of contexts ``[A, P, n_ctx, D]`` placed at their
        class-token ``positions`` ``[A, P]`` (one encoder call)."""
        if not self.mixed:
            return self.encode_context(ctx)
        tokens = self.frozen("tokens", ctx.device)
        emb = tokens.embeddings.to(ctx.dtype)  # [C, L, D]
        lead, (n_cls, length, dim) = ctx.shape[:-2], emb.shape
        end = torch.cat([emb[:, :1].expand(*lead, n_cls, 1, dim),
                         ctx.unsqueeze(-3).expand(*lead, n_cls, self.n_ctx, dim),
                         emb[:, 1 + self.n_ctx:].expand(*lead, n_cls, length - 1 - self.n_ctx, dim)], dim=-2)
        index = self.frozen("orders", ctx.device)[positions]  # [A, P, C, L]
        placed = end.gather(-2, index.unsqueeze(-1).expand(*index.shape, dim))
        feats = self.backbone.encode_prompts(self.frozen("sentences", ctx.device), placed[..., 1:, :],
                                             class_specific=True)
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def mean_classifier(self, ctx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The mean class feature over all K prompts ``[A, C, E]`` (each L2-normalised, the mean not), the K x C
        sentences of each client encoded in chunks of at most ``EVAL_SENTENCES`` sentences."""
        per_call = max(1, EVAL_SENTENCES // (ctx.shape[0] * max(1, len(self.classnames))))
        total = sum(self.encode(c, p).sum(1) for c, p in zip(ctx.split(per_call, 1), positions.split(per_call, 1)))
        return total / ctx.shape[1]

    def text_features(self) -> ProDAText:
        """Training: the step's prompt mini-batch's class features and (|S| > 1) all K class-agnostic features;
        evaluation: the mean class feature over all K prompts (see :class:`ProDAText`)."""
        ctx = self.active(self.prompt.ctx)  # [A, K, n_ctx, D]
        positions = self.positions.expand(ctx.shape[0], -1)
        if not self.training:
            return ProDAText(mean=self.mean_classifier(ctx, positions))
        chosen = self.draw_batch(ctx)
        picked = ctx.gather(1, chosen[..., None, None].expand(*chosen.shape, *ctx.shape[2:]))
        feats = self.encode(picked, positions.gather(1, chosen))
        agnostic = None
        if chosen.shape[1] > 1:
            agnostic = self.backbone.encode_prompts(self.frozen("agnostic", ctx.device), ctx)[..., 0, :]
            agnostic = F.normalize(agnostic.float(), dim=-1)
        return ProDAText(prompts=feats, agnostic=agnostic)

    def logits(self, text: ProDAText, image: torch.Tensor, batch: dict) -> torch.Tensor:
        """Training: the refined logits (:func:`refined_logits`) with each image's own client's prompt features;
        evaluation: CLIP logits against the mean classifier."""
        if text.mean is not None:
            return self.clip_logits(image, text.mean)
        return refined_logits(image, self.per_sample(text.prompts), batch["label"], self._logit_scale)

    def extra_loss(self, batch: dict, logits: torch.Tensor, text: ProDAText) -> torch.Tensor | None:
        """``weight_so * L_so`` per active client ``[A]`` (only with more than one prompt in the step)."""
        if text.agnostic is None or self.settings.so_weight == 0:
            return None
        return self.settings.so_weight * orthogonality_loss(text.agnostic)


@dataclass(kw_only=True, eq=False)
class ProDA(TrainedMethod):
    """ProDA: K shared prompts with mixed class-token positions, trained through the Gaussian upper bound of the
    cross-entropy on a prompt mini-batch per step, plus an orthogonality loss between the prompts; classification
    by the mean text feature of the K prompts.

    Sent and averaged (sample-weighted FedAvg): the K prompts ``prompt.ctx`` [K, n_ctx, D], as FLiP; nothing stays
    local. Defaults (the paper's, unverified: the official repository has no code): K = 32 prompts of 16 random
    context vectors, |S| = 4 prompts per step (the paper's mini-batch size is not stated where it could be checked;
    a third-party port uses the image batch size), weight_so 1.0 (FLiP's), SGD lr 0.002. ``compat: flip``: K = 1,
    |S| = 1 when null (FLiP forces ``prompt_batch_size`` 1, and its prompt builder only runs with K = 1) and 'end'
    positions; FLiP's configs also use 4 context vectors (``configs/proda_*_flip.yaml``). See
    :mod:`fedprompt.methods.proda` for which parts follow the paper and which FLiP.
    """

    n_prompts: Optional[int] = None
    """Prompts K (null: 32, the paper's; 1 under compat: flip)."""
    prompt_batch: Optional[int] = None
    """Prompts per step |S|, a divisor of K (null: 4; 1 under compat: flip). |S| = 1 makes the covariance zero."""
    n_ctx: int = 16
    """Context tokens per prompt (16; FLiP 4)."""
    ctx_init: Optional[str] = None
    """Initialise every prompt from these words (null: random N(0, 0.02^2), as FLiP)."""
    so_weight: float = 1.0
    """Weight of the orthogonality loss L_so between the class-agnostic prompts (1.0, FLiP's)."""
    compat: Literal["paper", "flip"] = "paper"
    """paper: mixed positions, K = 32, |S| = 4; flip: FLiP's runnable ProDA (K = |S| = 1 unless set, end positions)."""
    lr: float = 0.002
    """Local SGD learning rate (0.002)."""

    client_class = ProDAClient
    shared_prefixes = ("prompt.",)

    @property
    def prompts(self) -> int:
        """K in use: ``n_prompts``, or the default of ``compat``."""
        return PRODA_DEFAULTS[self.compat][0] if self.n_prompts is None else int(self.n_prompts)

    @property
    def batch_of_prompts(self) -> int:
        """|S| in use: ``prompt_batch``, or the default of ``compat`` (at most K)."""
        size = PRODA_DEFAULTS[self.compat][1] if self.prompt_batch is None else int(self.prompt_batch)
        return min(size, self.prompts) if self.prompt_batch is None else size

    def check(self):
        if self.compat not in PRODA_DEFAULTS:
            raise FedPromptError(f"method.compat must be 'paper' or 'flip', got {self.compat!r}")
        if self.n_prompts is not None and self.n_prompts < 1:
            raise FedPromptError(f"method.n_prompts must be >= 1 (prompts K), got {self.n_prompts}")
        if self.prompt_batch is not None and self.prompt_batch < 1:
            raise FedPromptError(f"method.prompt_batch must be >= 1 (prompts per step), got {self.prompt_batch}")
        if self.prompts % self.batch_of_prompts != 0:
            raise FedPromptError(f"method.prompt_batch must divide the number of prompts K = {self.prompts}, got "
                                 f"{self.batch_of_prompts}")
        if self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1, got {self.n_ctx}")
        if not self.so_weight >= 0:
            raise FedPromptError(f"method.so_weight must be >= 0 (the orthogonality loss weight), got "
                                 f"{self.so_weight}")
