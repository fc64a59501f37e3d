"""pFedMoAP (Luo, Chen, Wu, ICLR 2025): other clients' prompts as a mixture of experts, mixed per class and image by
a local attention gate.

Each client holds a CoOp context ``prompt.ctx`` ([n_ctx, D], uploaded; the server averages it, weighted by data
size), a gating network ``gating.*`` (a multi-head attention over experts, never communicated) and the experts it
received ``experts.ctx`` ([K_e - 1, n_ctx, D]) with ``experts.valid`` (which of them are set). The server keeps
every client's latest uploaded prompt and, after each round's aggregation, sends each client the global prompt plus
K_e - 1 other clients' latest prompts (:class:`MixtureOfPromptsServer`, a per-client download). At the start of local
training a client's prompt becomes the global prompt; the experts stay fixed. Every client of a round therefore
receives experts from the same pool, the prompts uploaded up to the end of the previous round: the round's clients
train independently of each other, so lock-step groups of any size K give the K = 1 results. This is not the
release's order (see :class:`PFedMoAP`).

Forward pass for a batch (C classes, B images; specs section 3.2), with ``pool(x) = x[..., ::r]``, the strided
sub-sample from the joint width E to the gating width g = E / r (no projection, not re-normalised):

- local logits ``l_loc = logit_scale * cos(f_b, t_c)`` with the local prompt's text features t (with gradients);
- the experts' text features, computed once per download without gradient: L2-normalised, pooled ([K_e - 1, C, g]);
- keys = values = ``[pool(t_c); pool(t^(1)_c); ...]`` per class (the local expert first), query ``pool(f_b)``;
- ``g_bc = W_o concat_h softmax_e(scaling * (W_q q)_h . (W_k k_ce)_h) (W_v v_ce)_h`` (the softmax over experts, per
  class, image and head; ``scaling`` = 10, not 1/sqrt(d_k), as the official code);
- ``l = lambda * l_loc + logit_scale * <pool(f_b), g_bc>``, one cross-entropy on ``l``; a client without experts
  yet (the first round it trains) uses ``l_loc`` alone, and its gating takes no step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import WeightedMean
from fedprompt.federation.sampling import derive_seed
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.optim import StackedSGD
from fedprompt.prompts import ContextVectors

SELECTIONS = ("knn", "fixed_order", "random")
#: the released gating width (``federated_main.py:46-49``: CLIP's 512 sub-sampled every 4th coordinate)
RELEASED_GATING_DIM = 128


def gating_stride(width: int, gating_dim: int) -> int | None:
    """The stride r that sub-samples the joint width to ``gating_dim`` coordinates (``x[..., ::r]`` has
    ``ceil(width / r)`` of them), or ``None`` when no whole stride does."""
    stride = width // gating_dim if 1 <= gating_dim <= width else 0
    return stride if stride >= 1 and math.ceil(width / stride) == gating_dim else None


def nearest_gating_dim(width: int, wanted: int, heads: int) -> int | None:
    """The gating width nearest ``wanted`` (the larger one on a tie) that a whole stride of ``width`` gives and
    ``heads`` divides, or ``None``."""
    valid = [g for g in range(heads, width + 1, heads) if gating_stride(width, g)]
    return min(valid, key=lambda g: (abs(g - wanted), -g)) if valid else None
#: the random streams of the two random expert orders
ORDER_STREAM = 0x4D4F4150


class MixtureOfPromptsServer(WeightedMean):
    """pFedMoAP's server: FedAvg of ``prompt.ctx`` (weighted by data size unless ``weighted`` is false), and the
    latest uploaded prompt of every client, from which each client receives ``num_experts - 1`` other clients'
    prompts (``experts.ctx``) with the global prompt.

    A client receives experts once it has uploaded a prompt itself (it trains with its local prompt alone the first
    time, as the official code); candidates are the other clients that have uploaded. ``selection``:

    - ``knn`` (default, the paper's): the nearest by the Frobenius distance between the client's latest prompt and
      theirs (ties by client id). The released code never calls it (and its version would fail: ``torch.topk`` of a
      Python list);
    - ``fixed_order``: the first candidates in one fixed random order of the client ids, drawn once from the run
      seed (the released code's only selection, ``random``);
    - ``random``: a fresh random order for each aggregation round.

    ``in_turn`` (``compat: official``): the release's order. The round's clients train one at a time and each
    upload joins the pool at once (:meth:`share`), so a client later in the round receives experts that earlier
    clients already retrained in that round.

    The download is a function of the server state, so the bytes the loop counts at the start of a round are what
    the clients received at the end of the previous one (under ``in_turn`` a client that the round's earlier uploads
    give more experts receives more than that count); the state (every client's latest prompt, the round) is
    checkpointed.
    """

    per_client_download = True
    averages_uploads = False  # it keeps every client's own upload to send to others

    def __init__(self, num_experts: int, selection: str = "knn", weighted: bool = True, key: str = "prompt.ctx",
                 in_turn: bool = False):
        super().__init__((key,), weighted=weighted)
        self.in_turn = in_turn
        self.key = key
        self.num_experts = num_experts
        self.selection = selection
        self.latest: dict[int, torch.Tensor] = {}
        self.last_round = 0

    def aggregate(self, uploads, weights, round_idx):
        for cid in sorted(uploads):
            self.latest[cid] = uploads[cid][self.key].detach().clone()
        self.last_round = round_idx
        return super().aggregate(uploads, weights, round_idx)

    def share(self, client_id, upload):
        self.latest[client_id] = upload[self.key].detach().clone()

    def _rank(self, cid: int, other: int) -> tuple:
        if self.selection == "knn":
            diff = self.latest[cid].to(torch.float64) - self.latest[other].to(torch.float64)
            return float(torch.linalg.vector_norm(diff)), other
        if self.selection == "fixed_order":
            return derive_seed(self.seed, ORDER_STREAM, other), other
        return derive_seed(self.seed, ORDER_STREAM, self.last_round, cid, other), other

    def experts_for(self, cid: int) -> list[int]:
        """The ids of the clients whose prompts client ``cid`` receives as experts (in expert order)."""
        if cid not in self.latest or self.num_experts <= 1:
            return []
        candidates = [j for j in sorted(self.latest) if j != cid]
        return sorted(candidates, key=lambda j: self._rank(cid, j))[: self.num_experts - 1]

    def download(self, global_state, client_id):
        if not global_state:
            return {}
        chosen = self.experts_for(client_id)
        if not chosen:
            return dict(global_state)
        return {**global_state, "experts.ctx": torch.stack([self.latest[j] for j in chosen])}

    def apply(self, client_state, received, client_id):
        """Keep the client's own latest prompt (it is evaluated with it; local training starts from the global
        prompt, :meth:`PFedMoAPClient.on_round_start`), except for a client that never trained, which takes the
        global one; set the received experts (zeros past the last one)."""
        state = dict(client_state)
        if client_id not in self.latest and self.key in received:
            state[self.key] = received[self.key].clone()
        experts = torch.zeros_like(state["experts.ctx"])
        valid = torch.zeros_like(state["experts.valid"])
        sent = received.get("experts.ctx")
        if sent is not None:
            experts[: len(sent)] = sent
            valid[: len(sent)] = True
        state["experts.ctx"], state["experts.valid"] = experts, valid
        return state

    def state_dict(self):
        return {"latest": {int(c): v for c, v in self.latest.items()}, "last_round": self.last_round}

    def load_state_dict(self, state):
        self.latest = {int(c): v.clone() for c, v in state.get("latest", {}).items()}
        self.last_round = int(state.get("last_round", 0))


class Experts(nn.Module):
    """The experts a client received: ``ctx`` [slots, E, n_ctx, D] and ``valid`` [slots, E] (persistent buffers:
    part of the client state, never trained)."""

    def __init__(self, count: int, n_ctx: int, dim: int, slots: int):
        super().__init__()
        self.register_buffer("ctx", torch.zeros(slots, count, n_ctx, dim))
        self.register_buffer("valid", torch.zeros(slots, count, dtype=torch.bool))


class Gating(nn.Module):
    """The gating attention of every slot: ``weight`` [slots, 4, g, g] and ``bias`` [slots, 4, g] for W_q, W_k,
    W_v, W_o (``y = x W^T + b``), initialised as four ``nn.Linear(g, g)`` in that order (the same in every slot)."""

    def __init__(self, dim: int, slots: int):
        super().__init__()
        layers = [nn.Linear(dim, dim) for _ in range(4)]
        weight = torch.stack([layer.weight.detach() for layer in layers])
        bias = torch.stack([layer.bias.detach() for layer in layers])
        self.weight = nn.Parameter(weight.unsqueeze(0).repeat(slots, 1, 1, 1))
        self.bias = nn.Parameter(bias.unsqueeze(0).repeat(slots, 1, 1))


def mixture_logits(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, heads: int, scaling: float, logit_scale: float) -> torch.Tensor:
    """pFedMoAP's mixture-of-experts logits ``[n, C]`` for each sample's own client.

    Args:
        query: pooled image features ``[n, g]``.
        keys: pooled expert text features of each sample's client ``[n, C, X, g]`` (keys = values; expert 0 the
            local prompt's).
        valid: which experts are set ``[n, X]``.
        weight, bias: each sample's client's gating ``[n, 4, g, g]``, ``[n, 4, g]`` (W_q, W_k, W_v, W_o).
        heads: attention heads; scaling: the score scale; logit_scale: CLIP's.
    """
    n, classes, experts, dim = keys.shape
    head = dim // heads
    q = torch.einsum("ni,noi->no", query, weight[:, 0]) + bias[:, 0]
    k = torch.einsum("ncei,noi->nceo", keys, weight[:, 1]) + bias[:, 1, None, None]
    v = torch.einsum("ncei,noi->nceo", keys, weight[:, 2]) + bias[:, 2, None, None]
    scores = torch.einsum("nhd,ncehd->nceh", q.view(n, heads, head), k.view(n, classes, experts, heads, head))
    scores = (scores * scaling).masked_fill(~valid[:, None, :, None], float("-inf"))
    attention = scores.softmax(dim=2)
    mixed = torch.einsum("nceh,ncehd->nchd", attention, v.view(n, classes, experts, heads, head)).reshape(
        n, classes, dim)
    gated = torch.einsum("nci,noi->nco", mixed, weight[:, 3]) + bias[:, 3, None]
    return logit_scale * torch.einsum("ni,nci->nc", query, gated)


class PFedMoAPClient(PromptClient):
    """pFedMoAP clients: the local prompt ``prompt.ctx`` (shared), the gating ``gating.*`` (kept) and the received
    ``experts.*``, from the :class:`PFedMoAP` settings."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        official = settings.compat == "official"
        words = self.init_words("false" if official else settings.ctx_init)
        self.n_ctx = words.shape[0] if words is not None and (official or settings.n_ctx is None) else settings.n_ctx
        self.prompt = ContextVectors(self.n_ctx, backbone.ctx_dim, words=words, slots=slots)
        width = backbone.embed_dim
        self.stride = gating_stride(width, settings.gating_dim)
        if self.stride is None:
            raise FedPromptError(f"method.gating_dim: {settings.gating_dim} is not the backbone's embedding width "
                                 f"{width} sub-sampled with a whole stride (width / stride); use a divisor of "
                                 f"{width} (128 for CLIP's 512), or null (the nearest such width).")
        self.gating = Gating(settings.gating_dim, slots)
        self.experts = Experts(max(settings.num_experts - 1, 0), self.n_ctx, backbone.ctx_dim, slots)
        self._cache: torch.Tensor | None = None  # the experts' pooled text features of every slot, per download
        self._has_experts: list[bool] = [False] * slots

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The strided sub-sample ``x[..., ::r]`` of the joint width to the gating width."""
        return x[..., :: self.stride]

    # --------------------------------------------------------------------------------------- the experts
    @torch.no_grad()
    def expert_features(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The pooled, L2-normalised text features ``[A, X, C, g]`` of the active clients' received experts (every
        slot outside a step), only up to the last set expert of any of them (``None`` if none), and ``valid``
        ``[A, X]``."""
        valid = self.active(self.experts.valid)
        used = int(valid.sum(1).max()) if valid.numel() else 0  # one host read per download
        if used == 0:
            return None, valid[:, :0]
        feats = self.encode_context(self.active(self.experts.ctx)[:, :used])  # [A, X, C, E]
        return self.pool(feats), valid[:, :used]

    def on_round_start(self, global_state):
        """Local training starts from the global prompt; the experts' text features are computed once here (for
        the whole local round, not per step), and the clients without experts are known on the host."""
        if global_state and "prompt.ctx" in global_state:
            with torch.no_grad():
                self.prompt.ctx.copy_(global_state["prompt.ctx"].to(self.prompt.ctx.device).expand_as(
                    self.prompt.ctx))
        self._cache = self.expert_features()  # outside a step: every slot
        self._has_experts = self.experts.valid.any(1).tolist()

    def configure_optimizers(self):
        """SGD of the prompt at the method's schedule and of the gating at its own constant ``gating_lr`` (as the
        official second optimizer); a client without experts holds its gating (no step, no weight decay)."""
        optim = self.optim
        gating = list(self.gating.parameters())
        held = [not has for has in self._has_experts]  # known since on_round_start (the engine calls it first)
        return StackedSGD([{"params": [self.prompt.ctx]},
                           {"params": gating, "lr": self.settings.gating_lr, "own_lr": True, "held": held}],
                          lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)

    # ------------------------------------------------------------------------------------------- parts
    def text_features(self):
        """The active clients' local text features ``[A, C, E]`` (with gradients), their experts' pooled features
        ``[A, X, C, g]`` (the download's, fixed) or ``None``, and which experts are set ``[A, X]``."""
        local = self.encode_context(self.active(self.prompt.ctx))
        if self.training and self._cache is not None:
            experts, valid = self._cache
            if experts is not None:
                experts = self.active(experts)
            valid = self.active(valid)
        else:  # evaluation: once per evaluated group (text_for)
            experts, valid = self.expert_features()
        return local, experts, valid

    def logits(self, text, image, batch):
        local, experts, valid = text
        local_logits = self.clip_logits(image, local)
        if experts is None:
            return local_logits
        s = self.settings
        keys = torch.cat([self.pool(local).unsqueeze(1), experts], dim=1)  # [A, 1 + X, C, g]
        valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        keys = self.per_sample(keys.transpose(1, 2))  # [n, C, 1 + X, g]
        weight, bias = self.per_sample(self.active(self.gating.weight)), self.per_sample(self.active(self.gating.bias))
        mixed = mixture_logits(self.pool(image), keys, self.per_sample(valid), weight, bias, s.gating_heads,
                               s.scaling, self._logit_scale)
        has = self.per_sample(valid[:, 1:].any(1)).unsqueeze(1)
        return torch.where(has, s.lmbda * local_logits + mixed, local_logits)


@dataclass(kw_only=True, eq=False)
class PFedMoAP(TrainedMethod):
    """pFedMoAP: a CoOp prompt per client (FedAvg), other clients' prompts as experts, a local gating attention.

    The defaults are the paper's intent on the released code's settings (``train.sh``, ``configs/trainers/PFEDMOAP``):
    16 random-init tokens, K_e = 10 experts (the local prompt and 9 others), gating width 128 (on CLIP's 512-wide
    joint space; the nearest width E / stride on other backbones when left null) with 8 heads, score
    scale 10, lambda 0.5; the prompt trains with SGD lr 0.002 and Dassl's cosine schedule (one warm-up epoch at
    1e-5), the gating with SGD lr 0.01, constant (both momentum 0.9, weight decay 5e-4); 5 local epochs
    (``train.local_epochs``).

    Differences from the released code (specs section 3.5): experts are chosen by KNN over the prompts (the released
    selection is never called; ``selection: fixed_order`` is what runs there); every client keeps its own gating
    from its first round (the release's empty-dict checks let a client inherit the previous client's gating); each
    client gets a fresh optimizer every round and its own cosine schedule (``lr_scope: official`` for the single
    one); every client is evaluated after the round's aggregation with its own latest prompt, its gating and the
    experts the server holds for it then (the release tests each of a round's trained clients right after its local
    training, with the experts it trained with).

    **Expert order.** Under ``compat: fixed`` a client's experts are the other clients' prompts as the server holds
    them at the start of the round, so the round's clients are independent (lock-step groups of K, several
    processes, the same result for every K). The release trains a round's clients one after another and stores each
    one's prompt in its pool right after its training (``federated_main.py:357-387``), so a client later in the
    round receives experts that earlier clients already retrained in that round (and, in its first rounds, more of
    them). ``compat: official`` runs that order: the round's clients train one at a time, in increasing id order (the
    release's is ``np.random.choice``'s), each receiving its experts from the pool as it is just before its local
    round; that needs K = 1 on one process (``parallel_clients: auto`` becomes 1; any other setting, several
    devices or ``--runtime flower`` are refused in one line before the run).

    ``compat: official`` also reproduces what changes numbers in ``train.sh``: ``--ctx_init False`` is the *string*
    "False", so the prompt is one token initialised from the word "false", and the fixed random expert order.
    """

    n_ctx: Optional[int] = 16
    """Context tokens (16; null: the token count of ctx_init)."""
    ctx_init: Optional[str] = None
    """Initialisation words (null: random N(0, 0.02^2), the paper's intent)."""
    num_experts: int = 10
    """K_e: experts per client, the local prompt included (the released min(10, clients))."""
    selection: Literal["knn", "fixed_order", "random"] = "knn"
    """Which K_e - 1 other clients' prompts a client receives: knn (nearest prompts, the paper's), fixed_order (one
    fixed random order, the released code's) or random (a new random order each round)."""
    gating_dim: Optional[int] = None
    """Gating width g: the joint width E sub-sampled every E / g coordinates (null: the released 128, or on a
    backbone whose width has no whole stride to 128, the nearest width that one gives and gating_heads divides)."""
    gating_heads: int = 8
    """Attention heads of the gating."""
    scaling: float = 10.0
    """Attention score scale (the official 10, not 1/sqrt(d_k))."""
    lmbda: float = 0.5
    """lambda: the weight of the local logits in the combined logits."""
    gating_lr: float = 0.01
    """The gating's SGD learning rate (constant; 0.01 in the official configs)."""
    weighted: bool = True
    """Data-size weighted FedAvg of the prompts (the official average_weights); false: the plain mean."""
    compat: Literal["fixed", "official"] = "fixed"
    """official: train.sh's one-token prompt from the string "False" and the fixed random expert order (experts
    still from the pool at the start of the round: the release's in-round order is not reproduced)."""
    lr: float = 0.002
    """The prompt's SGD learning rate (the official YAML's 0.002, which overrides --lr)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """cosine (the official YAML) or constant."""
    warmup_epochs: int = 1
    """Cosine: one constant warm-up epoch (the official YAML)."""

    client_class = PFedMoAPClient
    shared_prefixes = ("prompt.",)
    global_model = False

    def check(self):
        if (self.n_ctx is not None and self.n_ctx < 1) or (self.n_ctx is None and not self.ctx_init):
            raise FedPromptError(f"method.n_ctx must be >= 1 (or null with ctx_init), got {self.n_ctx}")
        if self.num_experts < 1:
            raise FedPromptError(f"method.num_experts must be >= 1 (the local prompt counts), got {self.num_experts}")
        if self.selection not in SELECTIONS:
            raise FedPromptError(f"method.selection: unknown selection {self.selection!r}; choose one of "
                                 f"{', '.join(SELECTIONS)}.")
        dim = RELEASED_GATING_DIM if self.gating_dim is None else self.gating_dim
        if dim < 1 or self.gating_heads < 1 or dim % self.gating_heads:
            raise FedPromptError(f"method.gating_heads must divide method.gating_dim, got {self.gating_heads} heads "
                                 f"for width {dim}")
        if not self.gating_lr > 0:
            raise FedPromptError(f"method.gating_lr must be > 0, got {self.gating_lr}")
        if self.compat not in ("fixed", "official"):
            raise FedPromptError(f"method.compat must be fixed or official, got {self.compat!r}")

    @property
    def trains_in_turn(self) -> bool:
        """``compat: official`` trains a round's clients one at a time in the release's order (see the class
        docstring)."""
        return self.compat == "official"

    def derived_settings(self, backbone):
        if self.gating_dim is not None:
            return {}
        width = backbone.embed_dim
        dim = nearest_gating_dim(width, RELEASED_GATING_DIM, self.gating_heads) or RELEASED_GATING_DIM
        return {"gating_dim": (dim, RELEASED_GATING_DIM, f"the joint width of '{backbone.name}' is {width}")}

    def build_aggregator(self):
        selection = "fixed_order" if self.compat == "official" else self.selection
        return MixtureOfPromptsServer(self.num_experts, selection, self.weighted, in_turn=self.trains_in_turn)
