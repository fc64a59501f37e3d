"""Zero-shot CLIP: hand-written prompts, no training, no communication."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedprompt.federation.aggregators import Aggregator, NoCommunication
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import Method


class ZeroShotClient(PromptClient):
    """Classifies with the text features of ``template.format(class name)``; it has no parameters."""

    @torch.no_grad()
    def class_data(self, classnames: list[str]) -> dict:
        sentences = [self.settings.template.format(name.replace("_", " ")) for name in classnames]
        return {"text": F.normalize(self.backbone.encode_text(sentences).float(), dim=-1)}

    def text_features(self) -> torch.Tensor:
        """The template's L2-normalised text features, the same for every client: [A, C, E]."""
        return self.for_each_client(self.frozen("text", self.backbone.device))


@dataclass(kw_only=True, eq=False)
class ZeroShot(Method):
    """Zero-shot CLIP with one template (every federated prompt repo uses ``"a photo of a {}."``)."""

    template: str = "a photo of a {}."
    """Prompt template with {} for the class name."""

    client_class = ZeroShotClient
    trains = False
    communicates = False
    global_model = True

    def build_aggregator(self) -> Aggregator:
        return NoCommunication()
