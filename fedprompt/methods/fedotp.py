"""FedOTP (Li et al., CVPR 2024): a shared global prompt and a personal local prompt, matched to image patches by
optimal transport.

Each client holds two unified CoOp contexts, ``global_prompt.ctx`` and ``local_prompt.ctx`` ([n_ctx, D] each,
N(0, 0.02^2)). Only the global prompt is sent to the server (sample-weighted FedAvg); the local prompt never leaves
the client and is kept across the rounds in which the client is not sampled.

Forward pass for a batch of B images and C classes (N = 2 prompts, M patch tokens):

- text features of both prompts in one encoder call: ``[2, C, E]``, L2-normalised;
- projected patch tokens ``[B, M, E]``, L2-normalised (precomputed ``batch["tokens"]`` are used when present);
- similarity ``S[b, c, m, n] = cos(patch m of image b, prompt n of class c)`` and cost ``1 - S``;
- a transport plan per (image, class), computed in fp32 without gradient: patch capacities ``a_m = 1/M``
  (``T 1 <= a``), prompt masses ``b_n = gamma/N`` (``T^T 1 = b``) for the unbalanced problem, ``b_n = 1/N`` with
  ``T 1 = a`` for the balanced ablation, or the constant plan ``gamma/(M N)`` for ``ot: uniform``;
- logits ``logit_scale * sum_{m,n} T * S``: gradients reach the prompts only through S.

Memory is O(B x C x M x N) (broadcasting only, never diagonal matrices); the solver has no per-iteration host sync
(see :mod:`fedprompt.ot`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from fedprompt.errors import FedPromptError
from fedprompt.methods.base import GlobalLocalClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.ot import PLAN_KINDS, check_solver_settings, transport_plan


def ot_logits(patches: torch.Tensor, text: torch.Tensor, logit_scale: float, kind: str = "unbalanced",
              gamma: float = 0.8, eps: float = 0.1, max_iter: int = 100, tol: float = 1e-3,
              early_exit: bool | None = True) -> torch.Tensor:
    """FedOTP's OT logits from normalised patch tokens and prompt text features.

    Args:
        patches: [B, M, E] L2-normalised patch tokens.
        text: [N, C, E] L2-normalised text features (N prompts per class), shared by the batch, or [B, N, C, E]:
            each image's own (images of several clients in one call).
        logit_scale: multiplier of the transported similarity (100 for OpenAI CLIP).
        kind: ``unbalanced`` (``T 1 <= 1/M``, ``T^T 1 = gamma/N``), ``balanced`` (``T 1 = 1/M``, ``T^T 1 = 1/N``)
            or ``uniform`` (the constant plan ``gamma/(M N)``: logits = logit_scale * gamma * mean_{m,n} S).
        gamma: transported mass of the unbalanced and uniform plans (FedOTP's ``TOP_PERCENT``).
        eps: entropic regularisation.
        max_iter: solver iteration limit.
        tol: solver stopping tolerance (L1 marginal error of the plan, see :mod:`fedprompt.ot`).
        early_exit: leave the solver loop once every problem converged (one host sync per check, every 10
            iterations; the default), or run ``max_iter`` iterations with converged problems frozen and no host sync
            in the loop: identical plans. Measured on an H100 (FedOTP step, ViT-B/16, batch 32): 27 ms with the early
            exit against 45 ms without (the problems converge in 10-20 iterations at eps 0.1, so the checks cost
            less than the iterations they save). ``None`` exits early on CPU only.

    Returns:
        [B, C] fp32 logits; differentiable in ``patches`` and ``text`` through S only (the plan is a constant).
    """
    n_prompts, n_cls, _ = text.shape[-3:]
    n_patches = patches.shape[1]
    # The similarity, plan and reduction run in fp32 whatever the surrounding autocast (the tensors are small;
    # at eps = 0.01 bf16 similarities would move the plan a lot).
    with torch.autocast(device_type=patches.device.type, enabled=False):
        pattern = "bme,bnce->bcmn" if text.dim() == 4 else "bme,nce->bcmn"
        sim = torch.einsum(pattern, patches.float(), text.float())  # [B, C, M, N]
        a = torch.full((n_patches,), 1.0 / n_patches, device=sim.device)
        mass = 1.0 if kind == "balanced" else gamma
        b = torch.full((n_prompts,), mass / n_prompts, device=sim.device)
        with torch.no_grad():
            plan = transport_plan(1.0 - sim.detach(), a, b, kind=kind, eps=eps, max_iter=max_iter, tol=tol,
                                  early_exit=sim.device.type == "cpu" if early_exit is None else early_exit)
        return logit_scale * (plan * sim).sum(dim=(-2, -1))


class FedOTPClient(GlobalLocalClient):
    """FedOTP clients: global prompt ``global_prompt.ctx`` (shared) and local prompt ``local_prompt.ctx`` (kept),
    from the :class:`FedOTP` settings.

    ``early_exit`` (an attribute, default ``True``) is the solver's loop exit (see :func:`ot_logits`): identical
    plans either way.
    """

    early_exit: bool | None = True

    def text_features(self) -> torch.Tensor:
        """L2-normalised text features [A, 2, C, E] of both prompts of the active clients (one encoder call)."""
        return self.encode_context(self.prompts())

    def image_features(self, batch: dict) -> torch.Tensor:
        return self.image_tokens(batch)

    def logits(self, text: torch.Tensor, image: torch.Tensor, batch: dict) -> torch.Tensor:
        s = self.settings
        return ot_logits(image, self.per_sample(text), self._logit_scale, s.ot, s.gamma, s.eps, s.max_iter, s.tol,
                         self.early_exit)


@dataclass(kw_only=True, eq=False)
class FedOTP(TrainedMethod):
    """FedOTP: global + local prompts per client, unbalanced OT between image patches and prompts.

    The global prompt is averaged over the participating clients, weighted by their train-sample counts; the local
    prompt stays on its client (and keeps its value in rounds where the client is not sampled). Clients are
    personalised, so no ``global_acc`` is reported. Every client is evaluated with its own global + local prompts
    through the same OT forward as in training.

    Base-to-novel (the spec leaves open which prompts score novel classes): the prompts are unified (shared by all
    classes), so a client's state works for any list of class names, and fedprompt scores novel classes with the
    client's global + local prompts through the same OT forward, exactly as on its own test data. The evaluated
    model is then the one that was trained, and Base and Novel measure the same classifier as Local. A global-only
    evaluation would be a different classifier that was never trained alone (pFedMMA's third-party runs of FedOTP
    report Local 97.3, Base 18.0, Novel 36.7).

    Differences from the official code (see specs section 2): class lists are ordered (sorted), the local optimiser
    is fresh per client and round (no momentum carried across clients), the solver runs in the log domain (stable
    at eps = 0.01) with a per-problem stopping rule instead of one test for the whole batch, and each client is
    evaluated once per evaluated round.
    """

    n_ctx: int = 16
    """Context tokens per prompt (16 in the few-shot script, 4 in the CIFAR-100 script)."""
    ot: Literal["unbalanced", "balanced", "uniform"] = "unbalanced"
    """Transport plan: unbalanced (FedOTP's default COT: T 1 <= 1/M, T^T 1 = gamma/N), balanced (the OT=Sinkhorn
    ablation: T 1 = 1/M, T^T 1 = 1/N) or uniform (no OT: the constant plan gamma/(M N), i.e. logits = logit_scale *
    gamma * mean patch-prompt similarity)."""
    gamma: float = 0.8
    """Transported mass of the unbalanced plan, the fraction of patch mass matched to the prompts (TOP_PERCENT; 0.8
    in both official scripts; ignored by balanced)."""
    eps: float = 0.1
    """Entropic regularisation (0.1 in the CIFAR-100 script and the argparse default; 0.01 in few-shot)."""
    max_iter: int = 100
    """Solver iteration limit (100)."""
    tol: float = 1e-3
    """Solver tolerance, the L1 marginal error of a plan at which its iterations stop (the official test is mean
    |v - v_prev| < 1e-3 over the whole batch; see fedprompt.ot)."""
    ctx_init: Optional[str] = None
    """Initialise both prompts from these words (null: random N(0, 0.02^2), as the official code; n_ctx must match
    their token count)."""
    lr: float = 0.001
    """Local SGD learning rate (1e-3 in every official script)."""

    client_class = FedOTPClient
    shared_prefixes = ("global_prompt.",)
    global_model = False
    image_inputs = ("tokens",)

    def check(self):
        if self.ot not in PLAN_KINDS:
            raise FedPromptError(f"method.ot: unknown transport plan {self.ot!r}; choose one of "
                                 f"{', '.join(PLAN_KINDS)}.")
        if self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1, got {self.n_ctx}")
        if not 0 < self.gamma <= 1:
            raise FedPromptError(f"method.gamma must be in (0, 1] (the transported fraction of the patch mass), "
                                 f"got {self.gamma}")
        check_solver_settings(self.eps, self.max_iter, self.tol)
