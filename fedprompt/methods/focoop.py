"""FOCoOp (Liao et al., ICML 2025): global, local and OOD prompts, a bi-level distributionally robust loss, and a
server that calibrates the global and OOD prompts with unbalanced optimal transport.

Each client holds three CoOp contexts (class token at the end, N(0, 0.02^2); class-specific by default):
``local_prompt.ctx`` (kept), ``global_prompt.ctx`` (sent; it starts as a copy of the local one) and
``ood_prompt.ctx`` (sent), and ``gamma``, its two robustness multipliers (kept). Its class prompts use the context
``(1 - frac) local + frac global``; its M OOD prompts put ``ood_prompt.ctx`` before M negative words mined from
WordNet lists against the class names (:func:`fedprompt.ood.mine_negative_labels`). The logits span C + M columns,
``tau f . [t_1 .. t_C, o_1 .. o_M]``; evaluation reads the first C as the classes and the other M as the model's
own negative labels (:mod:`fedprompt.ood`).

**Loss** (``dro``; otherwise the cross-entropy over the C + M columns), per client, from its text features t, o
(L2-normalised) and its images' features f:

1. ID perturbation: delta ~ U(0, 1e-4) on t (detached); ``dro_steps`` times delta += s * clip(g / |g|_row, -1, 1)
   with g the gradient of ``CE(tau f . [t + delta, o]) - gamma_1 mean_c |delta_c|``;
2. OOD perturbation: eps ~ U(0, 1e-4) on o, the same ascent on ``CE + D - gamma_2 mean_j |eps_j|`` with
   ``D = mean_b (logsumexp_j z^o_bj - mean_j z^o_bj)`` (``compat: official``: the release's ``mean_c |delta_c|``
   there, a constant, so eps is not held back); each loop stops early for a client once its objective changes by
   less than 1e-8;
3. the multipliers move: ``gamma_i = clamp(gamma_i - beta (rho - r_i), 0, gamma_max)``, r_1 = mean |delta|,
   r_2 = mean |eps|;
4. per image ``l_b = CE_b + D_b / 2 - gamma_1 r_1 - gamma_2 r_2`` on the perturbed features, and the client's loss
   ``tau_d gamma_2 logsumexp_b(l_b / (tau_d gamma_2))`` over its images (its limit ``max_b l_b`` once gamma_2 is 0;
   ``compat: official`` divides by zero there, as released: NaN).

**Server** (:class:`FOCoOpServer`): the sample-weighted mean of the global and OOD prompts; with ``uot``, every
client's OOD prompts (rows, flattened) are transported to the mean global prompts (rows) by unbalanced OT (POT's
``mm_unbalanced``, KL, ``uot_reg_m``, squared Euclidean cost over its maximum, uniform marginals); the OOD prompts'
transported masses are split in two by 2-means; the high-mass ("seemingly OOD") prompts are carried into the global
prompts ``G = ema G + (1 - ema) Pi_sel^T O_sel``, and the M lowest-mass prompts become the new OOD prompts (the
low-mass group repeated to M rows when it is smaller). Every client receives both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, WeightedMean
from fedprompt.federation.sampling import derive_seed
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors

#: the release's constants of the perturbation ascent: gradient-norm floor, early-stop tolerance
GRAD_FLOOR, STOP_TOL = 1e-8, 1e-8
#: the stream of the server's 2-means draw (with the run seed and the round)
KMEANS_STREAM = 0x464F4B4D


# ------------------------------------------------------------------------------------------- the DRO loss
def ascend(noise: torch.Tensor, objective, steps: int, step_size: float) -> torch.Tensor:
    """The release's perturbation ascent for A clients at once: ``noise`` ``[A, R, E]`` moves ``steps`` times along
    the row-normalised gradient of ``objective(noise)`` ``[A]`` (non-finite entries 0, clipped to [-1, 1]); a
    client stops once its objective changed by less than 1e-8 since the previous step (after that step's move)."""
    done = torch.zeros(noise.shape[0], dtype=torch.bool, device=noise.device)
    previous = None
    for _ in range(steps):
        noise = noise.detach().requires_grad_(True)
        value = objective(noise)
        (grad,) = torch.autograd.grad(value.sum(), noise)
        grad = grad / (grad.norm(dim=-1, keepdim=True) + GRAD_FLOOR)
        grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad)).clamp(-1.0, 1.0)
        noise = torch.where(done.view(-1, 1, 1), noise.detach(), noise.detach() + step_size * grad)
        value = value.detach()
        if previous is not None:
            done = done | ((value - previous).abs() < STOP_TOL)
        previous = value
    return noise.detach()


def ood_gap(ood_logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp_j z_j - mean_j z_j`` per image ``[n]`` of its OOD-prompt logits ``[n, M]``."""
    return torch.logsumexp(ood_logits, dim=-1) - ood_logits.mean(dim=-1)


def row_norm_mean(noise: torch.Tensor) -> torch.Tensor:
    """``mean_r |noise_r|_2`` per client ``[A]`` of ``[A, R, E]``."""
    return noise.norm(dim=-1).mean(dim=-1)


def abs_mean(noise: torch.Tensor) -> torch.Tensor:
    """``mean |noise|`` per client ``[A]`` (the release's ``abs().mean(-1).mean()``)."""
    return noise.abs().mean(dim=-1).mean(dim=-1)


def robust_total(values: torch.Tensor, temperature: torch.Tensor, sizes: list[int], official: bool) -> torch.Tensor:
    """Each client's ``T logsumexp_b(l_b / T)`` ``[A]`` over its own images (``values`` ``[n]`` grouped by client,
    ``sizes`` per client; ``temperature`` ``[A]``); where T is 0 its limit ``max_b l_b`` (``official``: the
    release's division, NaN)."""
    out = []
    for a, part in enumerate(values.split(sizes)):
        t = temperature[a]
        if official or bool(t > 0):
            out.append(t * torch.logsumexp(part / t, dim=0))
        else:
            out.append(part.max())
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------- the client
class FOCoOpClient(PromptClient):
    """FOCoOp clients: ``local_prompt.ctx`` (kept), ``global_prompt.ctx`` and ``ood_prompt.ctx`` (sent), ``gamma``
    ``[2]`` (kept), from the :class:`FOCoOp` settings; the OOD words are mined per class list."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        csc = settings.class_specific
        self.switchable_classes = not csc
        self.n_ctx = settings.n_ctx
        dim = backbone.ctx_dim
        # drawn in the release's order: the local context, the OOD context; the global one copies the local one
        self.local_prompt = ContextVectors(self.n_ctx, dim, n_cls=len(classnames) if csc else None, slots=slots)
        ood = ContextVectors(self.n_ctx, dim, n_cls=settings.num_negatives if csc else None, slots=slots)
        self.global_prompt = ContextVectors(self.n_ctx, dim, slots=slots,
                                            initial=self.local_prompt.ctx[0].detach().clone(),
                                            n_cls=len(classnames) if csc else None)
        self.ood_prompt = ood
        self.register_buffer("gamma", torch.full((slots, 2), float(settings.gamma)))

    def class_data(self, classnames: list[str]) -> dict:
        """The class prompts' tokens and the OOD prompts' tokens around the words mined for ``classnames``."""
        words = self.settings.negative_labels(self.backbone, classnames)
        return {**super().class_data(classnames),
                "ood_tokens": self.backbone.prompt_tokens(words, self.n_ctx, template=self.prompt_template)}

    def text_features(self) -> torch.Tensor:
        """L2-normalised features ``[A, C + M, E]``: the class prompts, then the OOD prompts."""
        frac = self.settings.frac
        ctx = (1 - frac) * self.active(self.local_prompt.ctx) + frac * self.active(self.global_prompt.ctx)
        csc = self.settings.class_specific
        classes = self.encode_context(ctx, class_specific=csc)
        ood = self.active(self.ood_prompt.ctx)
        negatives = self.backbone.encode_prompts(self.frozen("ood_tokens", ood.device), ood, class_specific=csc)
        return torch.cat([classes, F.normalize(negatives.float(), dim=-1)], dim=1)

    def loss(self, text, image, batch):
        if not self.settings.dro:
            return super().loss(text, image, batch)
        return self.robust_loss(text, image, batch["label"])

    def start_noise(self, id_shape, ood_shape, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each active client's starting perturbations U(0, 1e-4), ``[A, C, E]`` and ``[A, M, E]``, from its own step
        seed (the ID one drawn first, as the release draws them from one stream)."""
        deltas, epsilons = [], []
        for seed in self.step.seeds:
            generator = torch.Generator().manual_seed(int(seed))
            deltas.append(torch.rand(id_shape, generator=generator) * self.settings.noise_init)
            epsilons.append(torch.rand(ood_shape, generator=generator) * self.settings.noise_init)
        return torch.stack(deltas).to(device), torch.stack(epsilons).to(device)

    def perturbations(self, classes, ood, image, label) -> tuple[torch.Tensor, torch.Tensor]:
        """The inner maximisation: the ID and OOD perturbations ``[A, C, E]``, ``[A, M, E]`` (detached)."""
        s = self.settings
        classes, ood = classes.detach(), ood.detach()
        gamma = self.active(self.gamma)
        delta, eps = self.start_noise(classes.shape[1:], ood.shape[1:], classes.device)

        def id_objective(noise):
            logits = self.clip_logits(image, torch.cat([classes + noise, ood], dim=1))
            ce = self.client_mean(F.cross_entropy(logits, label, reduction="none"))
            return ce - gamma[:, 0] * row_norm_mean(noise)

        delta = ascend(delta, id_objective, s.dro_steps, s.step_size)
        shifted = classes + delta

        def ood_objective(noise):
            logits = self.clip_logits(image, torch.cat([shifted, ood + noise], dim=1))
            ce = self.client_mean(F.cross_entropy(logits, label, reduction="none"))
            gap = self.client_mean(ood_gap(logits[:, classes.shape[1]:]))
            held = row_norm_mean(delta if s.compat == "official" else noise)
            return ce + gap - gamma[:, 1] * held

        return delta, ascend(eps, ood_objective, s.dro_steps, s.step_size)

    def robust_loss(self, text, image, label) -> torch.Tensor:
        """The bi-level DRO loss of each active client ``[A]`` (module docstring); moves its multipliers."""
        s = self.settings
        count = len(self.classnames)
        classes, ood = text[:, :count], text[:, count:]
        delta, eps = self.perturbations(classes, ood, image, label)
        logits = self.clip_logits(image, torch.cat([classes + delta, ood + eps], dim=1))
        ce = F.cross_entropy(logits, label, reduction="none")
        gap = ood_gap(logits[:, count:])
        radius = torch.stack([abs_mean(delta), abs_mean(eps)], dim=1)  # [A, 2]
        with torch.no_grad():
            gamma = (self.active(self.gamma) - s.beta * (s.rho - radius)).clamp(0.0, s.gamma_max)
            self.set_active(self.gamma, gamma)
        shift = gamma[:, 0] * radius[:, 0]
        values = ce + 0.5 * gap - self.per_sample(shift) - self.per_sample(gamma[:, 1] * radius[:, 1])
        temperature = s.tau * gamma[:, 1]
        return robust_total(values, temperature, self.sample_sizes(), s.compat == "official")


# ----------------------------------------------------------------------------------------------- the server
def two_means(values: torch.Tensor, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """The release's 2-means of 1-D values ``[R]`` (centres: two values drawn by a random permutation; Lloyd steps
    until the centres stop moving): 1 for the group of the larger centre, 0 for the other."""
    data = values.reshape(-1, 1)
    centres = data[torch.randperm(data.shape[0], generator=generator)[:2]]
    assignment = torch.zeros(data.shape[0], dtype=torch.long)
    for _ in range(iterations):
        assignment = torch.cdist(data, centres).argmin(dim=1)
        moved = torch.stack([data[assignment == k].mean(dim=0) if (assignment == k).any() else centres[k]
                             for k in range(2)])
        if torch.allclose(centres, moved):
            break
        centres = moved
    rank = torch.argsort(centres.squeeze(1)).argsort()  # centre k's place in increasing order
    return rank[assignment]


def uot_plan(rows: torch.Tensor, targets: torch.Tensor, reg_m: float) -> torch.Tensor:
    """The unbalanced transport plan ``[R, N]`` of ``rows`` ``[R, F]`` to ``targets`` ``[N, F]`` (POT's
    majorisation-minimisation solver, KL marginal penalties ``reg_m``, squared Euclidean cost over its maximum,
    uniform marginals)."""
    import ot

    cost = ot.dist(rows, targets)
    cost = cost / cost.max()
    a = torch.full((rows.shape[0],), 1.0 / rows.shape[0], dtype=rows.dtype)
    b = torch.full((targets.shape[0],), 1.0 / targets.shape[0], dtype=rows.dtype)
    return ot.unbalanced.mm_unbalanced(a, b, cost, reg_m=reg_m, div="kl")


def calibrate(global_ctx: torch.Tensor, ood: torch.Tensor, count: int, ema: float, reg_m: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The server's OT calibration: the new global prompts ``[N, n_ctx, D]`` and OOD prompts ``[count, n_ctx, D]``
    (``None``: keep the mean) from the mean global prompts and every client's OOD prompts ``[R, n_ctx, D]``."""
    rows = ood.reshape(ood.shape[0], -1).float()
    plan = uot_plan(rows, global_ctx.reshape(global_ctx.shape[0], -1).float(), reg_m)
    mass = plan.sum(dim=1)
    group = two_means(mass, generator)
    seen = group == 1
    new_global = global_ctx
    if seen.any():
        carried = (plan[seen].t() @ rows[seen]).reshape(global_ctx.shape)
        new_global = ema * global_ctx + (1 - ema) * carried.to(global_ctx.dtype)
    rest = ood[group == 0]
    if rest.shape[0] >= count:
        return new_global, ood[torch.topk(mass, count, largest=False).indices]
    if rest.shape[0] == 0:
        return new_global, None
    repeats, extra = divmod(count, rest.shape[0])
    return new_global, torch.cat([rest.repeat(repeats, *[1] * (rest.dim() - 1)), rest[:extra]])


class FOCoOpServer(WeightedMean):
    """The sample-weighted mean of the global and OOD prompts, then (``uot``) the OT calibration of
    :func:`calibrate` with a 2-means draw seeded by the run seed and the round."""

    def __init__(self, settings: "FOCoOp"):
        super().__init__(settings.shared_prefixes)
        self.settings = settings

    def kmeans_seed(self, round_idx: int) -> int:
        """The seed of round ``round_idx``'s 2-means draw (a function of the run seed and the round)."""
        return derive_seed(self.seed, round_idx, KMEANS_STREAM)

    def aggregate(self, uploads, weights, round_idx):
        merged = super().aggregate(uploads, weights, round_idx)
        s = self.settings
        if not s.uot or not uploads:
            return merged
        ood = torch.cat([uploads[cid]["ood_prompt.ctx"] for cid in sorted(uploads)])
        generator = torch.Generator().manual_seed(self.kmeans_seed(round_idx))
        new_global, new_ood = calibrate(merged["global_prompt.ctx"], ood, s.num_negatives, s.ema, s.uot_reg_m,
                                        generator)
        merged["global_prompt.ctx"] = new_global
        if new_ood is not None:
            merged["ood_prompt.ctx"] = new_ood.clone()
        return merged


@dataclass(kw_only=True, eq=False)
class FOCoOp(TrainedMethod):
    """FOCoOp: local (kept), global and OOD (sent) prompts, the bi-level DRO loss, and the server's unbalanced-OT
    calibration of the global and OOD prompts (module :mod:`fedprompt.methods.focoop`).

    Defaults are the release's constants (``config.py``, ``loss.py``, ``client_focoop.py``, ``server_focoop.py``):
    16 context tokens, frac 0.2, 100 OOD words, gamma 10, tau 0.1, 4 ascent steps of size 1, rho 10, beta 0.005, ema
    0.5, reg_m 0.1, plain SGD lr 0.001 (the release defines momentum and weight decay but does not pass them). The
    release's command-line defaults switch the method's parts off (one shared prompt, ``--dro False``, ``--uot
    False``); here they are on, with class-specific prompts, the only layout its server's OT runs with. Differences:
    see docs/methods-fedapt-focoop.md.
    """

    negative_words: str = ""
    """WordNet word lists the OOD prompts' words are mined from: a folder of adj*.txt / noun*.txt files (FOCoOp's
    src/txtfiles) or one text file of nouns (required)."""
    n_ctx: int = 16
    """Context tokens of every prompt (--num_ctx 16)."""
    num_negatives: int = 100
    """OOD prompts, one per mined word (--num_ex_prompt 100)."""
    frac: float = 0.2
    """Share of the global prompt in the class prompts' context (--frac 0.2)."""
    class_specific: bool = True
    """One context per class and per OOD word (--csc; the server's OT needs it); false: one shared context each."""
    dro: bool = True
    """The bi-level DRO loss (--dro); false: the cross-entropy over the C + M columns."""
    uot: bool = True
    """The server's OT calibration (--uot); false: the weighted mean only."""
    gamma: float = 10.0
    """Starting multipliers gamma_1 = gamma_2 (--gamma_1, --gamma_2 10)."""
    gamma_max: float = 10.0
    """Upper clamp of the multipliers (10, hard-coded)."""
    tau: float = 0.1
    """Temperature of the outer log-sum-exp, times gamma_2 (--tau 0.1)."""
    dro_steps: int = 4
    """Ascent steps of each perturbation (4, hard-coded)."""
    step_size: float = 1.0
    """Ascent step size (1, hard-coded)."""
    noise_init: float = 1e-4
    """Scale of the U(0, noise_init) starting perturbations (1e-4)."""
    rho: float = 10.0
    """The multipliers' target radius (10)."""
    beta: float = 0.005
    """The multipliers' step (0.005)."""
    ema: float = 0.5
    """Share of the mean global prompts kept by the OT calibration (--ema 0.5)."""
    uot_reg_m: float = 0.1
    """KL marginal penalty of the unbalanced OT, both marginals (0.1)."""
    compat: Literal["fixed", "official"] = "fixed"
    """fixed: the OOD ascent holds back its own perturbation, and gamma_2 = 0 takes the limit; official: the
    release (the ID perturbation's norm there; a division by zero: NaN)."""
    lr: float = 0.001
    """Local SGD learning rate (--learning_rate 0.001)."""
    momentum: float = 0.0
    """SGD momentum (0: the release builds SGD with the learning rate only)."""
    weight_decay: float = 0.0
    """SGD weight decay (0: as momentum)."""

    client_class = FOCoOpClient
    shared_prefixes = ("global_prompt.", "ood_prompt.")
    global_model = False
    own_negative_labels = True

    def build_aggregator(self) -> Aggregator:
        return FOCoOpServer(self)

    def negative_labels(self, backbone, classnames: list[str]) -> list[str]:
        """The ``num_negatives`` words mined for ``classnames`` with ``backbone``'s text tower (once per list)."""
        from fedprompt.ood import mine_negative_labels, read_word_lists

        cache = self.__dict__.setdefault("_negatives", {})
        key = (id(backbone), tuple(classnames))
        if key not in cache:
            adjectives, nouns = read_word_lists(self.negative_words)

            def encode(sentences):
                return F.normalize(backbone.encode_text(sentences).float(), dim=-1)

            cache[key] = mine_negative_labels(encode, list(classnames), adjectives, nouns, self.num_negatives)
        return cache[key]

    def prepare_data(self, splits, eval_sets: list) -> None:
        """Check that the word lists can be read (one line naming the path)."""
        from fedprompt.ood import read_word_lists

        adjectives, nouns = read_word_lists(self.negative_words)
        if len(adjectives) + len(nouns) < self.num_negatives + len(splits.classnames):
            raise FedPromptError(f"method.negative_words: {self.negative_words} holds {len(adjectives) + len(nouns)} "
                                 f"words, too few for method.num_negatives {self.num_negatives}.")

    def check(self):
        if not self.negative_words:
            raise FedPromptError("method.negative_words is not set: give FOCoOp's word lists, a folder of adj*.txt / "
                                 "noun*.txt WordNet files (the release's src/txtfiles) or one text file of words.")
        if min(self.n_ctx, self.num_negatives, self.dro_steps) < 1:
            raise FedPromptError(f"method.n_ctx, method.num_negatives and method.dro_steps must be >= 1, got "
                                 f"{self.n_ctx}, {self.num_negatives}, {self.dro_steps}")
        if not 0 <= self.frac <= 1 or not 0 <= self.ema <= 1:
            raise FedPromptError(f"method.frac and method.ema must be in [0, 1], got {self.frac} and {self.ema}")
        if min(self.gamma, self.gamma_max, self.tau, self.step_size, self.noise_init, self.beta) < 0 \
                or not self.uot_reg_m > 0:
            raise FedPromptError("method.gamma, gamma_max, tau, step_size, noise_init and beta must be >= 0 and "
                                 f"method.uot_reg_m > 0, got {self.gamma}, {self.gamma_max}, {self.tau}, "
                                 f"{self.step_size}, {self.noise_init}, {self.beta}, {self.uot_reg_m}")
        if self.uot and not self.class_specific:
            raise FedPromptError("method.uot needs method.class_specific: true (the OT calibration transports one "
                                 "OOD prompt per word onto one global prompt per class; the release's server fails "
                                 "with shared contexts); set method.uot false for shared contexts.")
        if self.compat not in ("fixed", "official"):
            raise FedPromptError(f"method.compat: use fixed or official, got {self.compat!r}")
