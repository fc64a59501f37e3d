"""The client abstraction shared by every method.

A :class:`PromptClient` is a ``LightningModule`` that owns only learnable prompt tensors. The frozen backbone is
held as a plain attribute (not a registered submodule), so ``client.state_dict()`` is exactly the prompt state and
moving a client between devices moves kilobytes. A :class:`Method` is the config object a YAML selects with
``class_path``: it holds the method's hyperparameters, builds its client and its aggregator, and says which state
keys are shared with the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F

from fedprompt.backbone import Backbone
from fedprompt.federation.aggregators import Aggregator, WeightedMean


@dataclass
class OptimizerArgs:
    """Local optimiser settings (Dassl defaults: SGD, momentum 0.9, weight decay 5e-4)."""

    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4


class PromptClient(L.LightningModule):
    """Base client: prompt parameters over the shared frozen backbone.

    Subclasses define their parameters in ``__init__`` and implement :meth:`forward` (a batch -> logits over
    ``classnames``) and, if needed, :meth:`extra_loss`. The default :meth:`training_step` is cross-entropy plus
    that extra term.

    Args:
        backbone: the frozen backbone shared by every client of this process.
        classnames: class names in label order.
        optim: local optimiser settings.
    """

    def __init__(self, backbone: Backbone, classnames: list[str], optim: OptimizerArgs | None = None):
        super().__init__()
        self.__dict__["backbone"] = backbone  # a reference, not a submodule: state_dict() holds prompts only
        self.classnames = list(classnames)
        self.optim = optim or OptimizerArgs()

    # --------------------------------------------------------------------------------------------- features
    def image_features(self, batch: dict) -> torch.Tensor:
        """L2-normalised pooled image features of a batch (precomputed ``features`` are used when present)."""
        features = batch.get("features")
        if features is None:
            with torch.no_grad():
                features = self.backbone.encode_image(batch["image"])
        return F.normalize(features.float(), dim=-1)

    def image_tokens(self, batch: dict) -> torch.Tensor:
        """L2-normalised projected patch tokens [B, M, E] (precomputed ``tokens`` are used when present)."""
        tokens = batch.get("tokens")
        if tokens is None:
            with torch.no_grad():
                _, tokens = self.backbone.encode_image_tokens(batch["image"])
        return F.normalize(tokens.float(), dim=-1)

    # ---------------------------------------------------------------------------------------------- steps
    def forward(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def extra_loss(self, batch: dict, logits: torch.Tensor) -> torch.Tensor | None:
        """An additional training loss term (FedProx's proximal term, FedPGP's contrastive loss...)."""
        return None

    def training_step(self, batch: dict, batch_idx: int = 0) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["label"])
        extra = self.extra_loss(batch, logits)
        return loss if extra is None else loss + extra

    @torch.no_grad()
    def predict_logits(self, batch: dict) -> torch.Tensor:
        """Logits for evaluation (the same forward as training unless a method says otherwise)."""
        return self(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.optim.lr, momentum=self.optim.momentum,
                               weight_decay=self.optim.weight_decay)

    def on_round_start(self, global_state: dict[str, torch.Tensor] | None) -> None:
        """Hook called after the client received the server's state and before local training."""


class Method:
    """Base class of a federated prompt-learning method (selected in a config with ``class_path``).

    Class attributes say what the method does:
        ``trains``: whether clients train at all (zero-shot CLIP does not);
        ``communicates``: whether clients talk to a server (local CoOp does not);
        ``global_model``: whether, after aggregation, every client holds the same model (then the accuracy on the
        union of the clients' test data is reported as ``global_acc``);
        ``shared_prefixes``: state-dict key prefixes sent to the server;
        ``image_inputs``: the frozen image outputs the client uses (what the feature cache stores).
    """

    trains = True
    communicates = True
    global_model = True
    shared_prefixes: tuple[str, ...] = ()
    #: frozen image-tower outputs the client reads: "features" (pooled) and/or "tokens" (patch tokens)
    image_inputs: tuple[str, ...] = ("features",)

    def __init__(self, lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4):
        self.optim = OptimizerArgs(lr, momentum, weight_decay)

    @property
    def name(self) -> str:
        return type(self).__name__

    def build_client(self, backbone: Backbone, classnames: list[str]) -> PromptClient:
        """Create this method's client module (its prompt tensors initialised from the current torch seed)."""
        raise NotImplementedError

    def build_aggregator(self) -> Aggregator:
        """The server's merge rule; sample-weighted mean of the shared keys by default."""
        return WeightedMean(self.shared_prefixes)

    def hparams(self) -> dict:
        """The method's hyperparameters as a flat dict (for logs)."""
        out = {k: v for k, v in vars(self).items() if isinstance(v, (int, float, str, bool, type(None)))}
        out.update(vars(self.optim))
        return out
