"""FedLoRA: LoRA inside CLIP's frozen towers, averaged by FedAvg (the federated CLIP-LoRA baseline).

LoRA at CLIP-LoRA's placement and defaults (Zanella & Ben Ayed, CVPRW 2024; MaxZanella/CLIP-LoRA ``loralib/``,
``run_utils.py:20-37``): on the query, key and value projections of every block of both towers, rank 2, alpha 1,
dropout 0.25 on the input of each LoRA branch (independent masks per projection), scaling ``s = alpha / sqrt(r)``
(``layers.py:41-42``; not alpha / r), ``A`` initialised as nn.Linear's weight and ``B = 0`` (``layers.py:63-68``), so
training starts at frozen CLIP. For a frozen projection ``W`` of input ``h``:

    y = W h + b + s * B A drop(h),     A: [r, d_in],  B: [d_out, r]

The text side is the fixed sentence ``text_template`` per class through the (LoRA-carrying) text tower, recomputed at
every step (``lora.py:94-101``); logits ``tau * cos(image, text)``, ``tau`` = CLIP's own (100 for OpenAI weights;
CLIP-LoRA fixes 100, ``logit_scale``); loss: cross-entropy. Local optimiser AdamW (lr 2e-4, weight decay 1e-2,
betas 0.9 / 0.999; ``lora.py:75``). Every client trains and uploads all ``A`` and ``B``; the server takes their
sample-weighted mean, ``A`` and ``B`` separately (FedPuReL's LoRA baseline, ``utils/fed_utils.py:33-51``: the
"FedIT" average, not the average of the products ``B_k A_k``), through the loop's all-reduce path (the whole state is
shared: no client state crosses between processes, and the clients share the global tensors instead of a copy each).

State per client: ``lora.<tower>_<block>_<target>.A`` ``[r, d_in]`` and ``.B`` ``[d_out, r]`` (tower ``text`` or
``visual``). At ViT-B/16 with the defaults: 36 text projections of 512 x 512 (2,048 values each) and 36 image ones of
768 x 768 (3,072 each), 184,320 values = 737,280 bytes in fp32, sent up and down per client and round.

FedPuReL's LoRA baseline (shihaohou/FedPuReL ``federated_main.py:448-456``, ``trainers/purelLora.py``) is the
documented alternative: ``encoder: vision``, ``rank: 8``, ``alpha: 16`` (s = 16 / sqrt 8), SGD lr 1e-3 with Dassl's
momentum 0.9 and weight decay 5e-4, cosine with one constant warm-up epoch (``configs/fedlora_fedpurel_*.yaml``).

Where it applies (``encoder``): the text tower of open_clip CLIP models and of BERT-like Hugging Face towers (the
offline stand-in), the image tower of open_clip ViTs. Image towers without transformer blocks (EfficientNet,
ModifiedResNet) are refused with one line. With ``encoder: text`` the image tower is untouched and its features can be
cached; otherwise the image feature cache is off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.backbone.adapters import StackedLoRA
from fedprompt.backbone.tuning import LORA_TARGETS, TowerTuning
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, WeightedMean
from fedprompt.methods.tuned import TunedClient, TunedMethod

#: CLIP-LoRA's named block sets for 12-layer towers (``loralib/utils.py:10-40``); ``all`` fits any depth
POSITIONS = {"top": [11], "top1": [11], "top2": [10, 11], "top3": [9, 10, 11], "bottom": [0, 1, 2, 3],
             "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11], "half-up": [6, 7, 8, 9, 10, 11],
             "half-bottom": [0, 1, 2, 3, 4, 5]}
#: ``encoder`` setting -> the backbone's towers
ENCODERS = {"both": ("text", "visual"), "text": ("text",), "vision": ("visual",)}


def lora_blocks(settings, layers: int) -> list[int]:
    """The blocks that carry LoRA in a tower of ``layers`` blocks: ``blocks`` if given, else ``position``."""
    if settings.blocks is not None:
        chosen = sorted(set(settings.blocks))
    elif settings.position == "all":
        chosen = list(range(layers))
    else:
        chosen = POSITIONS[settings.position]
    if not chosen or not all(0 <= b < layers for b in chosen):
        which = f"blocks={settings.blocks}" if settings.blocks is not None else f"position={settings.position!r}"
        raise FedPromptError(f"method.{which} names blocks outside 0 .. {layers - 1} (a tower of {layers} blocks); "
                             "use position: all or method.blocks with indices in range.")
    return chosen


class FedLoRAClient(TunedClient):
    """FedLoRA clients: one :class:`StackedLoRA` per (tower, block, projection) in ``lora``."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        self.towers = ENCODERS[settings.encoder]
        self.lora = nn.ModuleDict()
        for tower in self.towers:
            other = "vision" if tower == "text" else "text"
            backbone.check_tunable(tower, f"method.encoder={settings.encoder!r}",
                                   f"use method.encoder: {other}" if settings.encoder == "both" else None)
            for block in lora_blocks(settings, backbone.tunable_layers(tower)):
                for target in settings.params:
                    d_in, d_out = backbone.lora_features(tower, target)
                    self.lora[f"{tower}_{block}_{target}"] = StackedLoRA(
                        d_in, d_out, settings.rank, settings.alpha, slots=slots, scaling=settings.scaling)
        if settings.logit_scale is not None:
            self._logit_scale = float(settings.logit_scale)

    def tuning(self, tower: str, index: torch.Tensor, counts: list[int]) -> TowerTuning:
        """The LoRA of ``tower`` for rows whose slots are ``index`` (``counts`` rows per active client)."""
        dropout = self.dropout(self.settings.dropout, tower, counts)
        lora = {}
        for key, module in self.lora.items():
            owner, block, target = key.split("_", 2)
            if owner == tower:
                lora[(int(block), target)] = partial(module.delta, index=index, dropout=dropout)
        return TowerTuning(lora=lora)

    def text_features(self) -> torch.Tensor:
        if "text" not in self.towers:
            return self.fixed_text()
        counts = [len(self.classnames)] * self.clients
        return self.tuned_text(self.tuning("text", self.text_rows(), counts))

    def image_features(self, batch: dict) -> torch.Tensor:
        if "visual" not in self.towers:
            return super().image_features(batch)
        tuning = self.tuning("visual", self.image_rows(), self.sample_sizes())
        return F.normalize(self.backbone.encode_image_tuned(batch["image"], tuning).float(), dim=-1)


@dataclass(kw_only=True, eq=False)
class FedLoRA(TunedMethod):
    """FedLoRA: LoRA on chosen linear layers of CLIP's frozen towers, FedAvg of the factors (A and B separately).
    Defaults: CLIP-LoRA's (both towers, q k v of every block, rank 2, alpha 1, dropout 0.25, alpha / sqrt(r), AdamW lr
    2e-4 weight decay 1e-2); FedPuReL's LoRA baseline: ``encoder: vision, rank: 8, alpha: 16, optimizer: sgd, lr:
    0.001``."""

    encoder: Literal["both", "text", "vision"] = "both"
    """The towers that carry LoRA: both, text or vision (CLIP-LoRA's --encoder)."""
    position: str = "all"
    """The blocks with LoRA: all, or CLIP-LoRA's names for 12-layer towers (bottom, mid, up, half-up, half-bottom,
    top, top1, top2, top3)."""
    blocks: Optional[list[int]] = None
    """Explicit 0-based block indices (in every tower with LoRA), instead of position."""
    params: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    """The projections with LoRA: q, k, v, o (attention output), mlp_in, mlp_out (CLIP-LoRA: q, k, v)."""
    rank: int = 2
    """LoRA rank r."""
    alpha: float = 1.0
    """LoRA alpha."""
    dropout: float = 0.25
    """Dropout on the input of each LoRA branch (independent masks per projection and client)."""
    scaling: Literal["sqrt", "linear"] = "sqrt"
    """The update's scale: sqrt (alpha / sqrt(r), CLIP-LoRA) or linear (alpha / r, the original LoRA)."""
    logit_scale: Optional[float] = None
    """tau of the logits; null: the model's own exp(logit_scale) (100 for OpenAI CLIP; CLIP-LoRA fixes 100)."""
    weighted: bool = True
    """Sample-weighted mean of the factors (FedPuReL); false: the plain mean."""
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    """Local optimiser (CLIP-LoRA: adamw)."""
    lr: float = 2e-4
    """Local learning rate (CLIP-LoRA: 2e-4)."""
    weight_decay: float = 1e-2
    """AdamW's decoupled weight decay (CLIP-LoRA: 1e-2)."""

    client_class = FedLoRAClient
    shared_prefixes = ("lora.",)

    @property
    def frozen_image_tower(self) -> bool:
        """The image tower is frozen (its features can be cached) when only the text tower carries LoRA."""
        return self.encoder == "text"

    def check(self):
        self.check_tuned()
        if self.encoder not in ENCODERS:
            raise FedPromptError(f"method.encoder={self.encoder!r}: use both, text or vision.")
        if self.position != "all" and self.position not in POSITIONS:
            raise FedPromptError(f"method.position={self.position!r}: use all or one of {', '.join(POSITIONS)}.")
        bad = [p for p in self.params if p not in LORA_TARGETS]
        if bad or not self.params:
            raise FedPromptError(f"method.params={self.params}: choose one or more of {', '.join(LORA_TARGETS)}.")
        if self.rank < 1 or not 0 <= self.dropout < 1 or self.alpha <= 0:
            raise FedPromptError(f"method.rank={self.rank}, method.dropout={self.dropout}, method.alpha={self.alpha}: "
                                 "the rank must be >= 1, the dropout in [0, 1) and alpha > 0.")
        if self.logit_scale is not None and self.logit_scale <= 0:
            raise FedPromptError(f"method.logit_scale={self.logit_scale} must be > 0 (or null: the model's).")

    def build_aggregator(self) -> Aggregator:
        """The mean of every factor; the whole state is shared, so it is merged by the loop's all-reduce path and the
        clients hold the global tensors without a copy each (memory flat in the number of clients)."""
        return WeightedMean(self.shared_prefixes, weighted=self.weighted, reduce=True)
