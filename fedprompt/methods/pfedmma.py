"""pFedMMA (ICLR 2026; sajjad-ucsb/pFedMMA ``trainers/pFedMMA.py``, ``clip/model.py``): multi-modal adapters in both
frozen towers; each client keeps its modality-specific down/up projections, and only the cross-modal projection they
share is communicated.

At each layer i in ``adapter_start .. adapter_end`` (the release's 1-based layer index: block i - 1, 0-based, carries
layer i; ``clip/model.py:224``) a branch runs in parallel with the whole block, from the block input ``x``:

    y = s * up_t( relu( shared_i( relu( down_t( ln_1(x) ) ) ) ) ),      block output + y

(``clip/model.py:188-215``) with the tower's own ``down_t`` (Linear width -> m, ReLU) and ``up_t`` (Linear m -> width)
and ``shared_i`` (Linear m -> m, ReLU), **one module used by both towers** at layer i (``pFedMMA.py:95-109``). The
release wraps the branch in gradient-scale layers (``clip/gsl.py``): ``x`` enters it as ``gsl(x, s)`` and ``y`` leaves
as ``gsl(y, 1/s)``, so the adapters receive ``1/s`` times the true gradient (1000x at s = 0.001) and the gradient
that flows back into ``x`` through the branch is scaled by ``s``; this is the method's training rule and is kept.
Every Linear starts kaiming-normal (fan-out, ReLU gain) with a zero bias (``pFedMMA.py:142-145``), the same in every
client. The text side is ``"a photo of a {class}."`` (``TEXT_CTX_INIT``) through the adapted text tower; logits
``tau * cos`` with CLIP's tau; cross-entropy.

Defaults (the release's ``configs/trainers/pFedMMA/vit_b16.yaml``, which overrides its argparse values): layers
5 .. 12, m = 32, s = 0.001; SGD lr 1e-3 (Dassl's momentum 0.9, weight decay 5e-4), batch 32. Communicated and
averaged (sample-weighted, ``federated_main.py:539-549``): ``shared_adapter`` only, written back into every client;
``text_adapter`` and ``visual_adapter`` stay private. State per client, at ViT-B/16 with the defaults: shared 8 x
(32 x 32 + 32) = 8,448 values (33,792 bytes up and down), private 8 x (2 x 512 x 32 + 512 + 32) + 8 x (2 x 768 x 32 +
768 + 32) = 666,112 values.

Official behaviours not reproduced, by reading (see ``docs/methods-adapters.md``): the cached inference text features
(``pFedMMA.py:173, 206-211``: computed for the first client evaluated and reused for every client and round) --
fedprompt computes each client's own every evaluation; the input-level adapter (layer 0, only when ``adapter_start``
is 0) is not built (``adapter_start`` must be >= 1; left null it is the release's 5, or the last layer of a tower
with fewer than 5).

Where it applies (``towers``): ``both`` needs transformer blocks in both towers (open_clip CLIP ViTs). ``text`` is the
text half alone (the offline stand-in, whose EfficientNet image tower has no blocks; a BERT block is post-LN, so its
branch reads the block input as it is, already normalised); ``vision`` the image half. With ``towers: text`` the image
features can be cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.backbone.adapters import StackedLinear, scale_gradient
from fedprompt.backbone.tuning import TowerTuning
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, WeightedMean
from fedprompt.methods.tuned import TunedClient, TunedMethod

#: the release's adapted layers (``vit_b16.yaml``: 5 .. 12, 1-based)
RELEASED_LAYERS = (5, 12)
#: ``towers`` setting -> the backbone's towers
TOWERS = {"both": ("text", "visual"), "text": ("text",), "vision": ("visual",)}


def kaiming_fan_out(weight: torch.Tensor) -> None:
    """The release's initialisation of every adapter Linear (``nn.init.kaiming_normal_``, fan-out, ReLU)."""
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


class PFedMMAClient(TunedClient):
    """pFedMMA clients: ``text_adapter.<i>.down|up`` and ``visual_adapter.<i>.down|up`` (private) and
    ``shared_adapter.<i>`` (communicated), for the release's layer indices i."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        self.towers = TOWERS[settings.towers]
        m = settings.adapter_dim
        layers = range(settings.adapter_start, settings.adapter_end + 1)
        for tower in self.towers:
            other = "vision" if tower == "text" else "text"
            backbone.check_tunable(tower, f"method.towers={settings.towers!r}",
                                   f"use method.towers: {other}" if settings.towers == "both" else None)
            depth = backbone.tunable_layers(tower)
            if settings.adapter_end > depth:
                raise FedPromptError(f"method.adapter_end={settings.adapter_end} is past the {depth} layers of the "
                                     f"{tower} tower of '{backbone.name}'; use at most {depth}.")
            width = backbone.tower_width(tower)
            self.add_module(f"{tower}_adapter", nn.ModuleDict({str(i): nn.ModuleDict({
                "down": StackedLinear(width, m, slots, init=kaiming_fan_out),
                "up": StackedLinear(m, width, slots, init=kaiming_fan_out)}) for i in layers}))
        self.shared_adapter = nn.ModuleDict({str(i): StackedLinear(m, m, slots, init=kaiming_fan_out)
                                             for i in layers})

    def branch(self, x: torch.Tensor, norm, *, tower: str, layer: str, index: torch.Tensor) -> torch.Tensor:
        """The adapter branch of ``layer`` in ``tower`` for block input ``x`` (rows' slots ``index``)."""
        s = self.settings.adapter_scale
        own = getattr(self, f"{tower}_adapter")[layer]
        y = norm(scale_gradient(x, s))
        y = F.relu(own["down"](y, index))
        y = F.relu(self.shared_adapter[layer](y, index))
        return scale_gradient(own["up"](y, index) * s, 1.0 / s)

    def tuning(self, tower: str, index: torch.Tensor) -> TowerTuning:
        parallel = {int(layer) - 1: partial(self.branch, tower=tower, layer=layer, index=index)
                    for layer in self.shared_adapter}
        return TowerTuning(parallel=parallel)

    def text_features(self) -> torch.Tensor:
        if "text" not in self.towers:
            return self.fixed_text()
        return self.tuned_text(self.tuning("text", self.text_rows()))

    def image_features(self, batch: dict) -> torch.Tensor:
        if "visual" not in self.towers:
            return super().image_features(batch)
        feats = self.backbone.encode_image_tuned(batch["image"], self.tuning("visual", self.image_rows()))
        return F.normalize(feats.float(), dim=-1)


@dataclass(kw_only=True, eq=False)
class PFedMMA(TunedMethod):
    """pFedMMA: per-tower down/up adapter projections kept on each client around one cross-modal projection per layer
    that the federation shares (sample-weighted FedAvg of ``shared_adapter`` only). Defaults: the release's
    ``vit_b16.yaml`` (layers 5 .. 12, m 32, scale 0.001, "a photo of a {class}.", SGD lr 1e-3)."""

    towers: Literal["both", "text", "vision"] = "both"
    """The towers with adapters: both (the method), text or vision (one half; e.g. a backbone whose image tower has
    no transformer blocks)."""
    adapter_start: Optional[int] = None
    """First adapted layer, the release's 1-based index (layer i = block i - 1); >= 1 (null: the release's 5, or
    ``adapter_end`` when a small tower ends before it)."""
    adapter_end: Optional[int] = None
    """Last adapted layer, inclusive (null: the release's 12, or the last layer of a tower with fewer)."""
    adapter_dim: int = 32
    """The adapters' inner width m."""
    adapter_scale: float = 0.001
    """The branch's output scale s (the adapters' gradients are scaled by 1/s, as the release's gradient-scale
    layers)."""
    lr: float = 0.001
    """Local SGD learning rate (the release: 1e-3)."""

    client_class = PFedMMAClient
    shared_prefixes = ("shared_adapter.",)
    global_model = False

    @property
    def frozen_image_tower(self) -> bool:
        """The image tower is frozen (its features can be cached) with text adapters only."""
        return self.towers == "text"

    def check(self):
        self.check_tuned()
        if self.towers not in TOWERS:
            raise FedPromptError(f"method.towers={self.towers!r}: use both, text or vision.")
        start, end = self.adapter_start, self.adapter_end
        if (start is not None and start < 1) or (start is not None and end is not None and start > end) \
                or (end is not None and end < 1):
            raise FedPromptError(f"method.adapter_start={self.adapter_start}, method.adapter_end={self.adapter_end}: "
                                 "need 1 <= adapter_start <= adapter_end (the input-level adapter, layer 0, is not "
                                 "supported).")
        if self.adapter_dim < 1 or not self.adapter_scale > 0:
            raise FedPromptError(f"method.adapter_dim={self.adapter_dim}, method.adapter_scale={self.adapter_scale}: "
                                 "need adapter_dim >= 1 and adapter_scale > 0.")

    def derived_settings(self, backbone):
        """The layers left null: the release's 5 .. 12, or the last layers that the shallowest adapted tower has."""
        towers = [t for t in TOWERS.get(self.towers, ()) if backbone.tunable_layers(t) > 0]
        if not towers:  # no blocks to adapt: the client refuses the backbone in one line
            return {}
        depth, tower = min((backbone.tunable_layers(t), t) for t in towers)
        why = f"the {tower} tower of '{backbone.name}' has {depth} layers"
        derived = {}
        end = self.adapter_end
        if end is None:
            end = min(RELEASED_LAYERS[1], depth)
            derived["adapter_end"] = (end, RELEASED_LAYERS[1], why)
        if self.adapter_start is None:
            derived["adapter_start"] = (min(RELEASED_LAYERS[0], end), RELEASED_LAYERS[0],
                                        why if self.adapter_end is None else f"method.adapter_end is {end}")
        return derived

    def build_aggregator(self) -> Aggregator:
        return WeightedMean(self.shared_prefixes)
