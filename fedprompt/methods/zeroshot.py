"""Zero-shot CLIP: hand-written prompts, no training, no communication."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedprompt.backbone import Backbone
from fedprompt.federation.aggregators import Aggregator, NoCommunication
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import Method


class ZeroShotClient(PromptClient):
    """Classifies with the text features of ``template.format(class name)``; it has no parameters."""

    def __init__(self, backbone: Backbone, classnames: list[str], template: str = "a photo of a {}.",
                 slots: int = 1):
        super().__init__(backbone, classnames, slots=slots)
        self.template = template

    @torch.no_grad()
    def class_data(self, classnames: list[str]) -> dict:
        sentences = [self.template.format(name.replace("_", " ")) for name in classnames]
        return {"text": F.normalize(self.backbone.encode_text(sentences).float(), dim=-1)}

    def text_features(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """The template's L2-normalised text features, the same for every client: [A, C, E]."""
        text = self.frozen("text", self.backbone.device)
        return text.expand(self.slots if slots is None else slots.shape[0], *text.shape)


class ZeroShot(Method):
    """Zero-shot CLIP with one template (every federated prompt repo uses ``"a photo of a {}."``).

    Args:
        template: prompt template with ``{}`` for the class name.
    """

    trains = False
    communicates = False
    global_model = True

    def __init__(self, template: str = "a photo of a {}."):
        super().__init__()
        self.template = template

    def build_client(self, backbone, classnames, slots=1):
        return ZeroShotClient(backbone, classnames, self.template, slots)

    def build_aggregator(self) -> Aggregator:
        return NoCommunication()
