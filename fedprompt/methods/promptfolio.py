"""PromptFolio (Pan et al., NeurIPS 2024): a global and a local prompt whose text features are mixed like a portfolio.

Each client holds two unified CoOp contexts, ``global_prompt.ctx`` and ``local_prompt.ctx`` ([n_ctx, D] each,
N(0, 0.02^2)). Both go through the text encoder in one call; the class text feature is the mixture

    t_c = (1 - theta) * f_global[c] + theta * f_local[c]

of the two L2-normalised features, NOT normalised again (as the official code), and the logits are
``logit_scale * image @ t^T`` with the L2-normalised image feature. Only the global prompt is sent to the server
(sample-weighted FedAvg); the local prompt stays on the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from fedprompt.errors import FedPromptError
from fedprompt.methods.base import GlobalLocalClient
from fedprompt.methods.method import TrainedMethod


def mix_features(global_features: torch.Tensor, local_features: torch.Tensor, theta: float) -> torch.Tensor:
    """PromptFolio's text feature ``(1 - theta) * global + theta * local`` (no re-normalisation)."""
    return (1.0 - theta) * global_features + theta * local_features


class PromptFolioClient(GlobalLocalClient):
    """PromptFolio clients: ``global_prompt.ctx`` (shared) and ``local_prompt.ctx`` (kept), from the
    :class:`PromptFolio` settings."""

    def prompt_features(self) -> torch.Tensor:
        """L2-normalised features ``[A, 2, C, E]`` of the global (index 0) and local (index 1) prompts of the active
        clients, from one encoder call."""
        return self.encode_context(self.prompts())

    def text_features(self) -> torch.Tensor:
        """The mixed class text features ``[A, C, E]`` (see :func:`mix_features`)."""
        feats = self.prompt_features()
        return mix_features(feats[:, 0], feats[:, 1], self.settings.theta)


@dataclass(kw_only=True, eq=False)
class PromptFolio(TrainedMethod):
    """PromptFolio: global (shared) + local (kept) prompt, text features mixed with weight theta on the local one.

    ``theta`` = 0 classifies with the global prompt alone, 1 with the local prompt alone. The mixture is not
    re-normalised, as in the official code, so its norm (below 1 when the two features differ) scales the logits.

    The defaults are the official ``configs/trainers/PromptFolio/vit_b16.yaml`` (which overrides the command line):
    lr 0.002, Dassl's cosine schedule with one warm-up epoch at 1e-5, and 5 local epochs (``train.local_epochs``).
    Differences from the released code: each client's local round runs its own schedule (``lr_scope: local``;
    ``lr_scope: official`` reproduces the released single scheduler shared by all clients, see
    :class:`fedprompt.methods.OptimizerArgs`), each client gets a fresh optimizer every round (the released trainer
    shares SGD momentum across clients and rounds), every client is evaluated each evaluated round (the released
    code tests only the round's sampled clients), class lists are ordered, the extra image-encoder pass per step
    whose output is never used is not made, and each client's global prompt is weighted by its own data size (the
    released ``fed_aggregate_model`` indexes the round's list of prompts by client id, so in ``np.random.choice``'s
    order each prompt gets another client's weight, and with ``frac < 1`` an id past the list's end raises
    ``IndexError``). ``benchmarks/parity_official_pfl.py`` checks the client and the server against the release.
    """

    n_ctx: int = 8
    """Context tokens per prompt (8, the official default)."""
    theta: float = 0.4
    """Weight of the local prompt's text features (the official frac_p, 0.4)."""
    ctx_init: Optional[str] = None
    """Initialise both prompts from these words (null: random N(0, 0.02^2), as the official code)."""
    lr: float = 0.002
    """Local SGD learning rate (0.002 in vit_b16.yaml)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """cosine (vit_b16.yaml) or constant."""
    warmup_epochs: int = 1
    """Epochs at warmup_lr before the cosine (1)."""

    client_class = PromptFolioClient
    shared_prefixes = ("global_prompt.",)
    global_model = False

    def check(self):
        if self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1, got {self.n_ctx}")
        if not 0.0 <= self.theta <= 1.0:
            raise FedPromptError(f"method.theta must be in [0, 1] (the local prompt's weight), got {self.theta}")
