"""DP-FPL (Tran, Sun, Patterson, Milanova, ICLR 2025): differentially private federated prompt learning with a
global prompt and a low-rank-factorised local prompt.

Each client holds a global prompt ``global_prompt.ctx`` (shared, FedAvg) and a local prompt ``local_prompt.ctx``
(kept), both [n_ctx, D] with N(0, 0.02^2). The text side uses the CoOp sentence with the context
``p = p_G + p_L``; logits are ``logit_scale * cos``, the loss the cross-entropy.

**The local factorisation** (specs section 4.2) is a gradient transform: in every step the client draws
``v0 ~ N(0, 1)^{D x r}`` (from its own step seed), sets ``u = orth(p_L v0)`` and ``v = orth(p_L^T u)^T`` (Gram-Schmidt
on the columns: both factors orthonormal), and writes ``p = p_G + u v + (p_L - u v)``, numerically ``p_G + p_L``.
With ``G = dL/dp`` the factor gradients are ``g_u = G v^T`` and ``g_v = u^T G``; after clipping and noise, the local
prompt's gradient is ``g_L = (g_u v + u g_v + u u^T g_u v) * local_grad_scale`` (the released rule, 1/10), and the
global prompt's is ``g_G``.

**Record-level DP (the default, ``noise_multiplier`` z > 0)** is DP-SGD in every local step: for each image i of a
client's batch the per-example gradients ``(G_i, G_i v^T, u^T G_i)`` are clipped together to the flat L2 norm
``clip_norm`` C, summed, each entry gets ``N(0, (z C)^2)`` noise from the client's own step seed, and the sums are
divided by the batch size. The per-example gradients come from the per-example cotangents of the class text features
(``[B, C, E]``, in closed form for the cross-entropy of CLIP logits) backpropagated through the text encoder in one
batched vector-Jacobian product (``torch.autograd.grad(..., is_grads_batched=True)``; Opacus' per-sample hooks do not
fit a text branch shared by the whole batch); the sums of the factor gradients are the clipped sum of the ``G_i``
times v (linear). Everything a client releases (its global prompt, every round) and keeps (its local prompt) is
post-processing of these noised gradients; the accountant counts every local step of every client as one
``PoissonSampledDpEvent(b / n_k, GaussianDpEvent(z))`` and reports the largest epsilon over the clients as
``record_epsilon`` (the usual DP-SGD accounting: it assumes Poisson-sampled batches, while fedprompt's batches are
shuffled passes over the client's data, as most DP-SGD code does). Client-level DP on the aggregated global prompt is
the federation's ``dp`` option on top. The server averages the global prompts **unweighted** (data sizes are private
under DP).

``compat: official`` is the released protocol in the nearest form fedprompt's round structure can express:

- the released code is FedSGD-like, one synchronous step per batch: every client computes its global-prompt
  gradient, the server averages them and adds noise, every client applies the average. In fedprompt a round is
  local training followed by aggregation, and clients train independently (a client's step never depends on another
  client's batch), so the nearest form is one batch per round (``train.local_steps: 1``, the round count times the
  batches per epoch): the averaged one-step update of the global prompt minus ``lr xi``, the server's gradient
  noise ``xi ~ N(0, (s / K)^2)`` per entry (K: the clients of the round), equals the released averaged-gradient
  step. The released optimizer is built once and never rebuilt, so its SGD momentum builds over the steps: here
  each client keeps its momentum of both prompts across rounds in its state (``momentum.global_prompt``,
  ``momentum.local_prompt``: checkpointed and resumed with it), and every client adds the round's ``xi`` (sent
  with the global prompt) to its global prompt's momentum, so that the mean of the clients' momenta is the
  momentum of the released noisy averaged gradient. With more local steps the same rule is a FedAvg with the
  released noise and momentum;
- batch-level clipping: the batch-mean gradients ``g_G``, ``g_u``, ``g_v`` are each clipped to C (not per example);
  ``g_u`` and ``g_v`` get ``N(0, s^2)`` at the client, ``g_G`` none (the server's noise above);
- the released noise scale: ``s = sigma C / B`` with ``sigma = sqrt(T ln(1/delta)) / official_noise`` and T =
  ``official_rounds`` (the released ``OPTIM.ROUND``: rounds, not steps); B is the step's batch size at the client
  and ``official_batch`` at the server (the released code uses the largest client batch size for both);
- no record-level epsilon is reported (batch-level clipping bounds no record's influence).

The released code's other bugs are not reproduced in either mode: every client's local prompt is updated with its
own gradient (the release applies the last client's to every client), each client has its own optimizer state (the
release's one momentum buffer is stepped by every client in turn), and the rounds' local prompts persist (the
release restarts round 0 from the initial weights on every batch). ``compat: fixed`` gives each client a fresh
optimizer every round, as every other method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import WeightedMean
from fedprompt.federation.sampling import derive_seed
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors

#: the server's noise stream of compat: official
SERVER_NOISE = 0x44504650
#: compat official: the server's gradient noise in the download, and each client's momentum buffers
NOISE_PREFIX, MOMENTUM_PREFIX = "noise.", "momentum."
#: the released rank of the local prompt's factors (``federated_main.py:242``)
RELEASED_RANK = 8


def orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``[..., m, r]`` matrices, in the released order (normalise column i, remove
    its component from the later columns); returns a new tensor."""
    cols = list(matrix.unbind(-1))
    for i in range(len(cols)):
        cols[i] = cols[i] / cols[i].norm(dim=-1, keepdim=True).clamp_min(1e-30)
        for j in range(i + 1, len(cols)):
            cols[j] = cols[j] - (cols[i] * cols[j]).sum(-1, keepdim=True) * cols[i]
    return torch.stack(cols, dim=-1)


def factorize(local: torch.Tensor, v0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released factorisation of local prompts ``[A, n_ctx, D]`` from random ``v0`` ``[A, D, r]``: ``u``
    ``[A, n_ctx, r]`` and ``v`` ``[A, r, D]``, both orthonormal (so ``u v`` has r unit singular values)."""
    u = orthonormal_columns(local @ v0)
    v = orthonormal_columns(local.transpose(-1, -2) @ u)
    return u, v.transpose(-1, -2)


def local_gradient(g_u: torch.Tensor, g_v: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """The released local-prompt gradient from the (clipped, noised) factor gradients:
    ``(g_u v + u g_v + u u^T g_u v) * scale``."""
    g_u_v = g_u @ v
    return (g_u_v + u @ g_v + u @ (u.transpose(-1, -2) @ g_u_v)) * scale


def clip_to(grad: torch.Tensor, bound: float) -> torch.Tensor:
    """``grad`` [A, ...] scaled per client to at most L2 norm ``bound`` (the released batch-level clipping)."""
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-30)
    return grad * (bound / norms).clamp(max=1.0).view(-1, *[1] * (grad.dim() - 1))


def released_noise_scale(noise: float, rounds: int, delta: float, clip_norm: float, batch: float) -> float:
    """The released per-entry noise std ``s = sigma C / B`` with ``sigma = sqrt(T ln(1/delta)) / noise``
    (``DP_FPL.py:252-262``); 0 without noise."""
    if noise <= 0:
        return 0.0
    return math.sqrt(rounds * math.log(1 / delta)) / noise * clip_norm / batch


class DPFPLClient(PromptClient):
    """DP-FPL clients: ``global_prompt.ctx`` (shared) and ``local_prompt.ctx`` (kept), from the :class:`DPFPL`
    settings; :meth:`backward` computes the private gradients."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        self.n_ctx = settings.n_ctx
        self.global_prompt = ContextVectors(settings.n_ctx, backbone.ctx_dim, slots=slots)
        self.local_prompt = ContextVectors(settings.n_ctx, backbone.ctx_dim, slots=slots)
        self._saved: dict | None = None
        if settings.compat == "official":  # the released optimizer's momentum outlives the round
            self.momentum = nn.Module()
            self.momentum.register_buffer("global_prompt", torch.zeros_like(self.global_prompt.ctx))
            self.momentum.register_buffer("local_prompt", torch.zeros_like(self.local_prompt.ctx))

    def configure_optimizers(self):
        """SGD over both prompts; under ``compat: official`` each client's momentum is kept across rounds in its
        state (``momentum.*``), as the released optimizer is never rebuilt."""
        optimizer = super().configure_optimizers()
        if self.settings.compat == "official":
            optimizer.keep_momentum(self.global_prompt.ctx, self.momentum.global_prompt)
            optimizer.keep_momentum(self.local_prompt.ctx, self.momentum.local_prompt)
        return optimizer

    def text_features(self) -> torch.Tensor:
        """L2-normalised text features ``[A, C, E]`` of the context ``p_G + p_L`` (in training the context and
        the features are kept for :meth:`backward`)."""
        ctx = self.active(self.global_prompt.ctx) + self.active(self.local_prompt.ctx)
        text = self.encode_context(ctx)
        if self.training and torch.is_grad_enabled():
            self._saved = {"ctx": ctx, "text": text}
        return text

    def loss(self, text, image, batch):
        logits = self.logits(text, image, batch)
        if self._saved is not None:
            self._saved.update(image=image, logits=logits.detach(), label=batch["label"])
        return self.client_mean(F.cross_entropy(logits.float(), batch["label"], reduction="none"))

    # ------------------------------------------------------------------------------------------ gradients
    def _generators(self) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(seed)) for seed in self.step.seeds]

    def _draw(self, generators, shape) -> torch.Tensor:
        """One ``N(0, 1)`` tensor ``[A, *shape]``, each client's from its own generator (on the CPU, then moved)."""
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

    def per_example_grads(self, saved: dict) -> torch.Tensor:
        """``G_i = d loss_i / d p`` for every sample: ``[n, n_ctx, D]``, from one batched vector-Jacobian product of
        the per-example cotangents of the text features (the j-th samples of every client in one product: each
        client's prompts meet only their own samples)."""
        image, text = saved["image"], saved["text"]
        p = saved["logits"].float().softmax(dim=1)
        p[torch.arange(p.shape[0], device=p.device), saved["label"]] -= 1.0
        cot = self._logit_scale * p.unsqueeze(2) * image.float().unsqueeze(1)  # [n, C, E]: d loss_i / d text
        batched = self.client_rows(cot.to(text.dtype))  # [R, A, C, E]: row j, every client's j-th sample
        grads, = torch.autograd.grad(text, saved["ctx"], grad_outputs=batched, is_grads_batched=True)
        return self.from_client_rows(grads)  # [n, n_ctx, D]

    def backward(self, losses, backward) -> None:
        """The private gradients of the active clients (see the module docstring), set through Fabric's backward of
        ``sum(param * grad)`` so that its precision handling applies."""
        saved, self._saved = self._saved, None
        g_global, g_local = self._gradients(losses, saved)
        backward((self.active(self.global_prompt.ctx) * g_global.detach()).sum()
                 + (self.active(self.local_prompt.ctx) * g_local.detach()).sum())

    def _gradients(self, losses, saved) -> tuple[torch.Tensor, torch.Tensor]:
        """The active clients' gradients of the global and the local prompt ``[A, n_ctx, D]`` each."""
        s = self.settings
        generators = self._generators()
        local = self.active(self.local_prompt.ctx).detach()
        u, v = factorize(local, self._draw(generators, (local.shape[-1], s.rank)))
        counts = self.client_counts().to(local.dtype).view(-1, 1, 1)
        if s.compat == "official":
            g_global, g_local = self._official(losses, saved, generators, u, v, counts)
        elif s.noise_multiplier > 0:
            g_global, g_local = self._private(saved, generators, u, v, counts)
        else:  # no DP: the released noise-0 path (no clipping)
            grad, = torch.autograd.grad(losses.sum(), saved["ctx"])
            g_global = grad
            g_local = local_gradient(grad @ v.transpose(-1, -2), u.transpose(-1, -2) @ grad, u, v,
                                     s.local_grad_scale)
        return g_global, g_local

    def _private(self, saved, generators, u, v, counts):
        """DP-SGD per step: per-example flat clipping of (G_i, G_i v^T, u^T G_i) to C, sums, N(0, (z C)^2)."""
        s = self.settings
        grads = self.per_example_grads(saved)  # [n, n_ctx, D]
        u_s, v_s = self.per_sample(u), self.per_sample(v)
        norms = (grads.pow(2).sum((1, 2)) + (grads @ v_s.transpose(-1, -2)).pow(2).sum((1, 2))
                 + (u_s.transpose(-1, -2) @ grads).pow(2).sum((1, 2))).sqrt()
        factors = (s.clip_norm / norms.clamp_min(1e-30)).clamp(max=1.0)
        clipped = grads * factors.view(-1, 1, 1)
        summed = self.client_sum(clipped)  # [A, n_ctx, D]
        std = s.noise_multiplier * s.clip_norm
        noise_global = self._draw(generators, summed.shape[1:]) * std
        noise_u = self._draw(generators, u.shape[1:]) * std
        noise_v = self._draw(generators, v.shape[1:]) * std
        g_global = (summed + noise_global) / counts
        g_u = (summed @ v.transpose(-1, -2) + noise_u) / counts
        g_v = (u.transpose(-1, -2) @ summed + noise_v) / counts
        return g_global, local_gradient(g_u, g_v, u, v, s.local_grad_scale)

    def _official(self, losses, saved, generators, u, v, counts):
        """The released batch-level clipping and client noise (compat: official)."""
        s = self.settings
        grad, = torch.autograd.grad(losses.sum(), saved["ctx"])
        if s.official_noise <= 0:  # the released noise-0 path clips nothing
            return grad, local_gradient(grad @ v.transpose(-1, -2), u.transpose(-1, -2) @ grad, u, v,
                                        s.local_grad_scale)
        g_u = clip_to(grad @ v.transpose(-1, -2), s.clip_norm)
        g_v = clip_to(u.transpose(-1, -2) @ grad, s.clip_norm)
        std = torch.tensor([released_noise_scale(s.official_noise, s.official_rounds, s.delta, s.clip_norm, 1.0)],
                           device=grad.device) / counts.view(-1)
        g_u = g_u + self._draw(generators, g_u.shape[1:]) * std.view(-1, 1, 1)
        g_v = g_v + self._draw(generators, g_v.shape[1:]) * std.view(-1, 1, 1)
        return clip_to(grad, s.clip_norm), local_gradient(g_u, g_v, u, v, s.local_grad_scale)


class ReleasedNoiseServer(WeightedMean):
    """compat: official's server: the unweighted mean of the global prompts minus ``lr xi``, with the released
    gradient noise ``xi ~ N(0, (s / K)^2)`` per entry (K uploads; s the released noise scale at ``official_batch``),
    seeded with the run seed and the round. Each client receives ``xi`` with the global prompt (``noise.*``) and adds
    it to its global prompt's momentum (:meth:`apply`), so that the noise enters the momentum as in the release,
    where it is part of the averaged gradient the optimizer steps with."""

    averages_uploads = False  # it adds its own noise

    def __init__(self, shared_prefixes, std_times_clients: float, lr: float = 1.0):
        super().__init__(shared_prefixes, weighted=False)
        self.std_times_clients = std_times_clients  # s: the released per-entry std times the clients K
        self.lr = lr

    def aggregate(self, uploads, weights, round_idx):
        merged = super().aggregate(uploads, weights, round_idx)
        if not merged or self.std_times_clients <= 0:
            return merged
        generator = torch.Generator().manual_seed(derive_seed(self.seed, round_idx, SERVER_NOISE))
        std = self.std_times_clients / len(uploads)
        out = {}
        for key, value in sorted(merged.items()):
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * std
            out[key] = (value.to(torch.float64) - self.lr * noise).to(value.dtype)
            out[NOISE_PREFIX + key] = noise.to(value.dtype)
        return out

    def apply(self, client_state, received, client_id):
        """The new global prompt, and the round's gradient noise added to the client's momentum of it."""
        state = super().apply(client_state, {k: v for k, v in received.items() if not k.startswith(NOISE_PREFIX)},
                              client_id)
        for key, noise in received.items():
            if key.startswith(NOISE_PREFIX):
                momentum = MOMENTUM_PREFIX + key[len(NOISE_PREFIX):].split(".")[0]
                state[momentum] = client_state[momentum] + noise
        return state


@dataclass(kw_only=True, eq=False)
class DPFPL(TrainedMethod):
    """DP-FPL: a global prompt (FedAvg, unweighted) and a local prompt trained through its low-rank factorisation,
    with record-level DP-SGD in every local step (see the module docstring).

    Defaults follow the released code (``federated_main.py``, ``configs/trainers/DP-FPL/vit_b16.yaml``): 16 tokens,
    rank 8 (at most n_ctx when left null), clipping norm 10, SGD lr 0.001 (constant, momentum 0.9, weight decay
    5e-4). ``noise_multiplier`` 0 is the released ``--noise 0`` (no clipping, no noise); the released noise is a
    different parameter (its ``--noise`` is an "epsilon" fed into a formula, ``official_noise`` under ``compat:
    official``). The sound mechanism takes the noise multiplier z of DP-SGD directly and reports the epsilon the
    accountant computes for it.
    """

    n_ctx: int = 16
    """Context tokens of each prompt (16)."""
    rank: Optional[int] = None
    """r: the rank of the local prompt's factors (null: the released 8, or n_ctx when the prompt has fewer tokens;
    the paper's runs use 1, 2, 4, 8)."""
    clip_norm: float = 10.0
    """C: the per-example L2 clipping norm of the prompt gradients (the released NORM_THRESH 10)."""
    noise_multiplier: float = 0.0
    """z: per step, each entry of the clipped per-example gradient sum gets N(0, (z C)^2) (0: no DP, no clipping)."""
    delta: float = 1e-5
    """The delta at which record_epsilon is reported (the released 1e-5)."""
    local_grad_scale: float = 0.1
    """The factor of the released local-prompt gradient rule (1/10, unexplained in the release)."""
    weighted: bool = False
    """Data-size weighted FedAvg of the global prompts (false: the plain mean; sizes are private under DP)."""
    compat: Literal["fixed", "official"] = "fixed"
    """official: the released batch-level clipping and noise formula, server noise on the averaged global prompt."""
    official_noise: float = 0.4
    """compat official: the released --noise (0.1, 0.2, 0.4 in its runs; 0: no noise, no clipping)."""
    official_rounds: int = 100
    """compat official: T in the released noise formula (its OPTIM.ROUND, 100)."""
    official_batch: int = 32
    """compat official: the batch size in the server's noise scale (the released largest client batch, 32)."""
    lr: float = 0.001
    """Local SGD learning rate (0.001)."""

    client_class = DPFPLClient
    shared_prefixes = ("global_prompt.",)
    global_model = False

    def check(self):
        if self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1, got {self.n_ctx}")
        if self.rank is not None and not 1 <= self.rank <= self.n_ctx:
            raise FedPromptError(f"method.rank must be in [1, n_ctx = {self.n_ctx}], got {self.rank} (or null: the "
                                 f"released {RELEASED_RANK}, at most n_ctx)")
        if not self.clip_norm > 0:
            raise FedPromptError(f"method.clip_norm must be > 0, got {self.clip_norm}")
        if not self.noise_multiplier >= 0:
            raise FedPromptError(f"method.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise FedPromptError(f"method.delta must be in (0, 1), got {self.delta}")
        if self.compat not in ("fixed", "official"):
            raise FedPromptError(f"method.compat must be fixed or official, got {self.compat!r}")
        if self.noise_multiplier > 0 and self.compat == "fixed":
            from fedprompt.args import require_dp_accounting

            require_dp_accounting("method.noise_multiplier")
        if self.official_noise < 0 or self.official_rounds < 1 or self.official_batch < 1:
            raise FedPromptError(f"method.official_noise must be >= 0 and official_rounds, official_batch >= 1, got "
                                 f"{self.official_noise}, {self.official_rounds}, {self.official_batch}")

    def derived_settings(self, backbone):
        if self.rank is not None:
            return {}
        return {"rank": (min(RELEASED_RANK, self.n_ctx), RELEASED_RANK, f"the local prompt has {self.n_ctx} tokens")}

    @property
    def record_privacy(self):
        if self.compat == "official" or self.noise_multiplier <= 0:
            return None
        return self.noise_multiplier, self.delta

    def build_aggregator(self):
        if self.compat == "official":
            std = released_noise_scale(self.official_noise, self.official_rounds, self.delta, self.clip_norm,
                                       self.official_batch)
            return ReleasedNoiseServer(self.shared_prefixes, std, self.lr)
        return WeightedMean(self.shared_prefixes, weighted=self.weighted)
