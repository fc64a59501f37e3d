"""What the methods whose clients train modules inside or around the frozen towers share (FedLoRA, pFedMMA,
FedCLIP): a fixed sentence per class instead of learnable context, the routing of rows to their clients' weights,
per-client dropout, and the choice of local optimiser (SGD, Adam, AdamW; each stacked per client).

The modules themselves are :mod:`fedprompt.backbone.adapters` (stacked weights) and where they act is a
:class:`fedprompt.backbone.tuning.TowerTuning` the backbone applies; a client builds one per pass from its active
clients' weights with :meth:`TunedClient.text_rows` / :meth:`TunedClient.image_rows` (the slot of each row) bound in.
A method declares what it uses through its settings and ``frozen_image_tower`` (False as soon as anything it trains
sits inside the image tower: the image feature cache is then off; text-side and feature-side modules keep it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fedprompt.backbone.adapters import SlotDropout
from fedprompt.errors import FedPromptError
from fedprompt.federation.sampling import derive_seed
from fedprompt.methods.base import PromptClient
from fedprompt.methods.deep import sentence_features
from fedprompt.methods.method import TrainedMethod
from fedprompt.optim import StackedAdam, StackedSGD

#: the random streams of a step's dropout masks, per tower (derived from each client's step seed)
DROPOUT_STREAMS = {"text": 0x54585444, "visual": 0x56495344}


@dataclass(kw_only=True, eq=False)
class TunedMethod(TrainedMethod):
    """Settings shared by the methods that train modules in the towers: the fixed class sentence and the local
    optimiser (``optimizer``: SGD with ``momentum``, or Adam / AdamW with ``beta1``, ``beta2``, ``eps``;
    ``weight_decay`` is Adam's L2 term or AdamW's decoupled decay). Every client gets a fresh optimiser each round."""

    text_template: str = "a photo of a {name}."
    """The fixed sentence of each class ({name}: the class name)."""
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    """Local optimiser: sgd (lr, momentum, weight_decay), adam (L2 weight decay) or adamw (decoupled decay)."""
    beta1: float = 0.9
    """Adam / AdamW: first-moment decay."""
    beta2: float = 0.999
    """Adam / AdamW: second-moment decay."""
    eps: float = 1e-8
    """Adam / AdamW: added to the denominator."""

    def check_tuned(self) -> None:
        """One error line for a bad sentence or optimiser setting."""
        if "{name}" not in self.text_template:
            raise FedPromptError(f"method.text_template={self.text_template!r} must contain {{name}}.")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise FedPromptError(f"method.optimizer={self.optimizer!r}: use sgd, adam or adamw.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise FedPromptError(f"method.beta1={self.beta1}, method.beta2={self.beta2}, method.eps={self.eps}: the "
                                 "betas must be in [0, 1) and eps > 0.")


class TunedClient(PromptClient):
    """Base client of the tuned methods: the sentence of ``settings.text_template`` per class (no learnable
    context), its frozen features (:meth:`fixed_text`), the same sentences through a tuned text tower
    (:meth:`tuned_text`), and the helpers that bind rows to clients."""

    n_ctx = 0

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        self.prompt_template = settings.text_template

    def class_data(self, classnames):
        return {**super().class_data(classnames),
                "text": F.normalize(sentence_features(self.backbone, classnames, self.prompt_template), dim=-1)}

    # ----------------------------------------------------------------------------------------- the text side
    def fixed_text(self) -> torch.Tensor:
        """The frozen, L2-normalised features of the class sentences, the same ``[C, E]`` for every active client:
        ``[A, C, E]``."""
        return self.for_each_client(self.frozen("text", self.device))

    def tuned_text(self, tuning) -> torch.Tensor:
        """L2-normalised fp32 features ``[A, C, E]`` of the class sentences through the text tower with ``tuning``
        (its closures see the ``A * C`` sentences client-major: :meth:`text_rows`), in one encoder call."""
        tokens = self.frozen("tokens", self.device)
        empty = torch.zeros(self.clients, 0, self.backbone.ctx_dim, device=self.device,
                            dtype=tokens.embeddings.dtype)
        return F.normalize(self.backbone.encode_prompts(tokens, empty, tuning=tuning).float(), dim=-1)

    # -------------------------------------------------------------------------------------- rows and clients
    def text_rows(self) -> torch.Tensor:
        """The slot of each sentence of :meth:`tuned_text`'s call: ``[A * C]`` (each active client's C classes)."""
        return self.active(self.all_slots()).repeat_interleave(len(self.classnames))

    def image_rows(self) -> torch.Tensor:
        """The slot of each image of the step's batch: ``[n]``."""
        return self.per_sample(self.active(self.all_slots()))

    def dropout(self, p: float, tower: str, counts: list[int]) -> SlotDropout | None:
        """Dropout with rate ``p`` for the rows of ``tower`` (``counts``: rows per active client, grouped in order),
        each client's masks from its own step seed; ``None`` outside training or when ``p`` is 0."""
        seeds = self.step.seeds
        if not self.training or p <= 0:
            return None
        if seeds is None:  # a plain call outside the engine (a test or a script): fresh masks from the torch seed
            seeds = torch.randint(0, 2**62, (len(counts),)).tolist()
        return SlotDropout(p, [derive_seed(s, DROPOUT_STREAMS[tower]) for s in seeds], counts, self.device)

    # ---------------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The method's local optimiser over the stacked parameters (:class:`StackedSGD` or :class:`StackedAdam`)."""
        s, optim = self.settings, self.optim
        params = [p for p in self.parameters() if p.requires_grad]
        if s.optimizer == "sgd":
            return StackedSGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        return StackedAdam(params, lr=optim.lr, betas=(s.beta1, s.beta2), eps=s.eps,
                           weight_decay=optim.weight_decay, decoupled=s.optimizer == "adamw")
