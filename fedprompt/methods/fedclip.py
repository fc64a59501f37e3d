"""FedCLIP (Lu et al., IEEE Data Eng. Bull. 2023; microsoft/PersonalizedFL ``fedclip/``): an attention adapter on
CLIP's pooled image features, the only part that is trained and communicated.

For the frozen image feature ``g`` (unnormalised, ``d`` = the joint width; ``nets/models.py:48-50``):

    a = softmax(W2 tanh(W1 g + b1) + b2)      (softmax over the d features),     g' = a * g

then ``g'`` is L2-normalised; the text side is the frozen feature of ``"a picture of a {class}"`` (no period; the
raw folder name, ``utils/prepare_data_dg_clip.py:21-31``). ``W1, W2`` are ``[d, d]`` with nn.Linear's initialisation,
the same for every client (the server's adapter deep-copied, ``fed_at_clip.py:155, 160``).

Loss (``loss: contrastive``, the official ``fed_at_clip.py:53-61``): CLIP's symmetric contrastive loss **within the
batch**, ``tau g'_n . t_{y_m}`` for the images n and texts m of one client's batch, targets the diagonal:
``(CE(logits, arange) + CE(logits^T, arange)) / 2``. Two images of the same class in a batch are each other's
negatives: the official behaviour (and presumably the paper's), kept as the default; ``loss: ce`` is cross-entropy
over the classes instead. A client's step with a single image is skipped (no optimiser step, ``fed_at_clip.py:39``).
Prediction: the argmax of ``tau g' . t_c`` over the classes.

Optimiser: Adam (lr 5e-5, betas 0.9 / 0.98, eps 1e-6, L2 weight decay 0.2; ``fed_at_clip.py:123, 138-141``),
re-created every round (as fedprompt does for every method). Aggregation: the **uniform** mean of the adapters of
the clients that trained (``fed_at_clip.py:97-116, 158-159``), written back into every client. Bytes per client and
direction: ``2 d (d + 1)`` values: 525,312 values = 2,101,248 bytes in fp32 at d = 512 (ViT-B/32, the official
backbone).

The image tower is frozen: its features are cached (``train.feature_cache``) and the adapter runs on them. The
adapter needs no transformer blocks, so it applies to every image tower (the offline stand-in's EfficientNet too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.backbone.adapters import StackedLinear
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, WeightedMean
from fedprompt.methods.tuned import TunedClient, TunedMethod


class FedCLIPClient(TunedClient):
    """FedCLIP clients: the attention adapter ``adapter.fc1`` and ``adapter.fc2`` (``[d, d]`` weights, ``[d]`` biases
    per client) on the pooled image features."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        width = backbone.embed_dim
        self.adapter = nn.ModuleDict({"fc1": StackedLinear(width, width, slots),
                                      "fc2": StackedLinear(width, width, slots)})
        self._optimizer = None

    def text_features(self) -> torch.Tensor:
        return self.fixed_text()

    def image_features(self, batch: dict) -> torch.Tensor:
        """``normalize(a * g)`` with ``a = softmax(fc2(tanh(fc1(g))))``, each image with its own client's adapter."""
        features = batch.get("features")
        if features is None:
            with torch.no_grad():
                features = self.backbone.encode_image(batch["image"])
        g = features.float()
        index = self.image_rows()
        hidden = torch.tanh(self.adapter["fc1"](g, index))
        attention = torch.softmax(self.adapter["fc2"](hidden, index), dim=-1)
        return F.normalize(attention * g, dim=-1)

    def loss(self, text, image, batch):
        if self.settings.loss == "ce":
            return super().loss(text, image, batch)
        counts = self.sample_sizes()
        self._hold(self.host_slots(), counts)
        labels, tau = batch["label"], self._logit_scale
        losses, start = [], 0
        for position, count in enumerate(counts):  # each client's batch on its own (contiguous rows)
            rows = slice(start, start + count)
            texts = text[position][labels[rows]]  # [b, E]: the text of each image's class
            logits = tau * image[rows] @ texts.t()
            target = torch.arange(count, device=logits.device)
            losses.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2)
            start += count
        return torch.stack(losses)

    def _hold(self, slots: list[int], counts: list[int]) -> None:
        """Clients with a single image in this step take no optimiser step (the release skips such a batch)."""
        if self._optimizer is None or not self.training:
            return
        held = [False] * self.slots
        for slot, count in zip(slots, counts):
            held[slot] = count <= 1
        for group in self._optimizer.param_groups:
            group["held"] = held

    def configure_optimizers(self):
        self._optimizer = super().configure_optimizers()
        return self._optimizer


@dataclass(kw_only=True, eq=False)
class FedCLIP(TunedMethod):
    """FedCLIP: an attention adapter on the frozen image features, the only trained and communicated part (uniform
    mean). Defaults: the official ``fed_at_clip.py`` (Adam lr 5e-5, betas 0.9 / 0.98, eps 1e-6, weight decay 0.2;
    ``"a picture of a {class}"``; the in-batch contrastive loss)."""

    text_template: str = "a picture of a {name}"
    """The fixed sentence of each class (the release: "a picture of a " + folder name)."""
    loss: Literal["contrastive", "ce"] = "contrastive"
    """contrastive: CLIP's in-batch symmetric loss (the release); ce: cross-entropy over the classes."""
    weighted: bool = False
    """Sample-weighted mean of the adapters; false (default): the release's uniform mean."""
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    """Local optimiser (the release: adam)."""
    lr: float = 5e-5
    """Local learning rate (the release: 5e-5)."""
    beta2: float = 0.98
    """Adam's second-moment decay (the release: 0.98)."""
    eps: float = 1e-6
    """Adam's eps (the release: 1e-6)."""
    weight_decay: float = 0.2
    """Adam's L2 weight decay (the release: 0.2)."""

    client_class = FedCLIPClient
    shared_prefixes = ("adapter.",)

    def check(self):
        self.check_tuned()
        if self.loss not in ("contrastive", "ce"):
            raise FedPromptError(f"method.loss={self.loss!r}: use contrastive or ce.")

    def build_aggregator(self) -> Aggregator:
        """The (uniform) mean of the adapters, merged by the loop's all-reduce path (the whole state is shared)."""
        return WeightedMean(self.shared_prefixes, weighted=self.weighted, reduce=True)
