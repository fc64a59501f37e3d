"""PLOT (Chen et al., ICLR 2023): N CoOp prompts per class matched to an image's local features by balanced optimal
transport.

Each client holds ``prompt.ctx`` ([N, n_ctx, D]: N prompts, each a context shared by all classes, N(0, 0.02^2)). For
image b with L2-normalised local features f_{b,m} (m = 1..M: ViT patch tokens after ``ln_post`` and the projection,
as FLiP; the 7 x 7 attention-pool outputs of RN50, as PLOT-CoOp; timm towers' spatial positions) and class c with
prompt features w_{n,c} (n = 1..N):

    S_{mn} = cos(f_{b,m}, w_{n,c}),   T* = Sinkhorn(cost 1 - S, eps, u = 1/M, v = 1/N),
    logit_{b,c} = logit_scale * sum_{m,n} T*_{mn} S_{mn}

(``PLOT:plot-coop/trainers/plot.py:214-282``). T* is computed in fp32 without gradient by :mod:`fedprompt.ot`
(batched over every image, class and client of a step, with a per-problem stopping rule: a problem's plan never
depends on the others in the batch), so the gradient reaches the prompts through S only, as in the official code.
The loss is the cross-entropy of these logits; evaluation uses the same OT forward. ``global_logit: true`` adds the
CoOp logit of the pooled image feature against the normalised mean prompt feature, which the official code does
for ImageNet only.

**Federation.** The N prompts are sent and averaged (sample-weighted FedAvg), as in FLiP; nothing stays local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from fedprompt.errors import FedPromptError
from fedprompt.methods.base import PromptClient
from fedprompt.methods.fedotp import ot_logits
from fedprompt.methods.method import TrainedMethod
from fedprompt.ot import check_solver_settings
from fedprompt.prompts import ContextVectors

#: PLOT's number of prompts by ``compat`` when ``n_prompts`` is null: the paper's 4, FLiP's run_batch 1
PLOT_PROMPTS = {"paper": 4, "flip": 1}


class PLOTClient(PromptClient):
    """PLOT clients: N prompts ``prompt.ctx`` [N, n_ctx, D] each, from the :class:`PLOT` settings.

    ``early_exit`` (an attribute, default ``True``, as FedOTP) is the OT solver's loop exit (see
    :func:`fedprompt.methods.fedotp.ot_logits`): identical plans either way.
    """

    early_exit: bool | None = True

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        words = self.init_words(settings.ctx_init)
        self.n_ctx = settings.n_ctx
        self.prompt = ContextVectors(settings.n_ctx, backbone.ctx_dim, shape=(settings.prompts,), words=words,
                                     slots=slots)

    def text_features(self) -> torch.Tensor:
        """L2-normalised text features [A, N, C, E] of the active clients' N prompts (one encoder call)."""
        return self.encode_context(self.active(self.prompt.ctx))

    def image_features(self, batch: dict):
        """The local features ``[n, M, E]`` and, with ``global_logit``, the pooled features ``[n, E]`` (else
        ``None``), L2-normalised."""
        tokens = self.image_tokens(batch)
        return tokens, (super().image_features(batch) if self.settings.global_logit else None)

    def logits(self, text: torch.Tensor, image, batch: dict) -> torch.Tensor:
        """The OT logits ``[n, C]`` of each image against its own client's N prompts (plus the global CoOp logit)."""
        tokens, pooled = image
        s = self.settings
        logits = ot_logits(tokens, self.per_sample(text), self._logit_scale, "balanced", eps=s.eps,
                           max_iter=s.max_iter, tol=s.tol, early_exit=self.early_exit)
        if pooled is not None:
            logits = logits + self.clip_logits(pooled, F.normalize(text.mean(1), dim=-1))
        return logits


@dataclass(kw_only=True, eq=False)
class PLOT(TrainedMethod):
    """PLOT (PLOT-CoOp's optimal transport between N prompts and the image's local features), federated by FedAvg of
    the N prompts.

    Defaults: the official PLOT-CoOp settings (N = 4 prompts of 16 random context vectors; Sinkhorn eps 0.1, at most
    100 iterations; SGD lr 0.002). ``compat: flip`` takes FLiP's N = 1 when ``n_prompts`` is null (its run_batch
    setting; with one prompt the plan is uniform and the logit is the mean patch cosine: degenerate PLOT); FLiP's
    configs also use 4 context vectors (``configs/plot_*_flip.yaml``).

    Differences from the official code: the stopping test is per problem (``tol``, the L1 error of the plan's patch
    marginal, checked every 10 iterations) instead of one test for the whole batch (mean |r - r_prev| < 0.01 over
    every image and class, a host sync every iteration); a NaN plan is not skipped (the official forward returns
    ``None``), the log-domain solver does not produce one. PLOT-CoOp runs the RN50 attention-pool tokens only (its
    ViT path returns the class token alone); like FLiP, fedprompt uses the ViT's projected patch tokens. PLOT++
    (learned visual prompt tokens as the local set) is not implemented.
    """

    n_prompts: Optional[int] = None
    """Prompts per class N (null: 4, the paper's; 1 under compat: flip)."""
    n_ctx: int = 16
    """Context tokens per prompt (16 in PLOT-CoOp; FLiP 4)."""
    ctx_init: Optional[str] = None
    """Initialise every prompt from these words (null: random N(0, 0.02^2), as the official code)."""
    eps: float = 0.1
    """Entropic regularisation of the Sinkhorn plan (0.1)."""
    max_iter: int = 100
    """Sinkhorn iteration limit (100)."""
    tol: float = 1e-3
    """Stopping tolerance per problem: the L1 error of the plan's patch marginal (see fedprompt.ot)."""
    global_logit: bool = False
    """Add the CoOp logit of the pooled image feature and the mean prompt (the official code's ImageNet rule)."""
    compat: Literal["paper", "flip"] = "paper"
    """paper: the official defaults; flip: FLiP's (N = 1 unless set)."""
    lr: float = 0.002
    """Local SGD learning rate (0.002)."""

    client_class = PLOTClient
    shared_prefixes = ("prompt.",)

    @property
    def prompts(self) -> int:
        """N in use: ``n_prompts``, or the default of ``compat``."""
        return PLOT_PROMPTS[self.compat] if self.n_prompts is None else int(self.n_prompts)

    @property
    def image_inputs(self) -> tuple[str, ...]:
        """The local features, and the pooled ones with ``global_logit``."""
        return ("features", "tokens") if self.global_logit else ("tokens",)

    def check(self):
        if self.compat not in PLOT_PROMPTS:
            raise FedPromptError(f"method.compat must be 'paper' or 'flip', got {self.compat!r}")
        if self.n_prompts is not None and self.n_prompts < 1:
            raise FedPromptError(f"method.n_prompts must be >= 1 (prompts per class), got {self.n_prompts}")
        if self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1, got {self.n_ctx}")
        check_solver_settings(self.eps, self.max_iter, self.tol)
