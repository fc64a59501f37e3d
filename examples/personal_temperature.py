"""An example method: a shared CoOp context plus a personal temperature per client (docs/writing_a_method.md).

Each client trains a context ``prompt.ctx`` [n_ctx, D], averaged by the server (FedAvg), and a scalar
``log_scale`` that never leaves it: logits = exp(log_scale) * cos(image, text). Run it with
``fedprompt fit --config configs/smoke.yaml --method examples.personal_temperature.PersonalTemperature``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fedprompt.errors import FedPromptError
from fedprompt.methods import TrainedMethod
from fedprompt.methods.base import PromptClient
from fedprompt.prompts import ContextVectors


class PersonalTemperatureClient(PromptClient):
    """The prompt tensors of one client (stacked over ``slots``) and its math."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        words = self.init_words(settings.ctx_init)
        self.n_ctx = settings.n_ctx
        self.prompt = ContextVectors(settings.n_ctx, backbone.ctx_dim, words=words, slots=slots)
        self.log_scale = nn.Parameter(torch.full((slots,), float(settings.initial_log_scale)))

    def text_features(self) -> torch.Tensor:
        """[A, C, E]: the active clients' class text features."""
        return self.encode_context(self.active(self.prompt.ctx))

    def logits(self, text, image, batch) -> torch.Tensor:
        scale = self.per_sample(self.active(self.log_scale).exp())  # [n]: each sample's own client's scale
        return scale.unsqueeze(1) * self.cosine(image, text)


@dataclass(kw_only=True, eq=False)
class PersonalTemperature(TrainedMethod):
    """Shared CoOp context (FedAvg) and a personal temperature per client (kept local)."""

    n_ctx: int = 4
    """Context tokens."""
    ctx_init: Optional[str] = None
    """Initialisation words (null: random N(0, 0.02^2))."""
    initial_log_scale: float = 4.6052
    """log of the initial logit scale (log 100, CLIP's)."""

    client_class = PersonalTemperatureClient
    shared_prefixes = ("prompt.",)
    global_model = False

    def check(self):
        if self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1, got {self.n_ctx}")
