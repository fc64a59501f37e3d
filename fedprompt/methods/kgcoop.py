"""KgCoOp (Yao et al., CVPR 2023): CoOp with a knowledge-guided term that keeps the learned class text features close
to those of CLIP's hand-crafted prompt.

Each client holds one CoOp context ``prompt.ctx`` ([n_ctx, D], "a photo of a" by default). With w_c the L2-normalised
text feature of the learned prompt of class c and w_c^clip that of the hand-crafted sentence (one template per
dataset, e.g. "a photo of a {}, a type of pet."), the loss of a client is

    L = CE(logit_scale * cos(x, w), y) + weight * (1 - (1/C) sum_c cos(w_c, w_c^clip))

as in the official code (``KgCoOp:KgCoOp/trainers/kgcoop.py:223-243, 297-311``; ``1 - cos = |w - w^clip|^2 / 2`` for
unit vectors). The paper writes the term as the mean squared distance ``(1/C) sum_c |w_c - w_c^clip|^2``:
``distance: squared_l2`` uses that form (twice the code's term at the same weight). Inference is plain CoOp.

w^clip is a constant: encoded once per class list by the frozen text tower (fp32, no autocast) and cached, as
FedPGP's positive; the official code keeps it from a second CLIP built at start-up.

**Federation.** Only the context is sent (sample-weighted FedAvg). FLiP also sends and averages the official
prompt learner's unused ``bias_vectors`` and 512 x 512 ``meta_net`` (they never change: no gradient reaches them),
265,216 floats per client instead of 2,048; fedprompt sends what is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from fedprompt.errors import FedPromptError
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors

#: KgCoOp's weight by ``compat`` when ``weight`` is null: the official scripts' 8.0, FLiP's fixed 1.0
KG_WEIGHTS = {"paper": 8.0, "flip": 1.0}
#: the distances between learned and hand-crafted text features
KG_DISTANCES = ("cosine", "squared_l2")


@torch.no_grad()
def hand_crafted_features(backbone, template: str, classnames: list[str]) -> torch.Tensor:
    """L2-normalised fp32 text features ``[C, E]`` of a hand-crafted prompt (``{}`` for the class name, underscores
    in class names read as spaces), from the frozen text tower without autocast."""
    sentences = [template.format(name.replace("_", " ")) for name in classnames]
    with torch.autocast(device_type=backbone.device.type, enabled=False):
        return F.normalize(backbone.encode_text(sentences).float(), dim=-1)


def check_template(name: str, template: str) -> None:
    """One error naming ``method.<name>`` unless ``template`` holds ``{}`` exactly once."""
    if template.count("{}") != 1:
        raise FedPromptError(f"method.{name} must contain '{{}}' once for the class name, got {template!r}")


def knowledge_distance(text: torch.Tensor, hand: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """KgCoOp's term per client ``[A]`` (unweighted): ``1 - mean_c cos(text_c, hand_c)`` (``cosine``, the official
    code) or ``mean_c |text_c - hand_c|^2`` (``squared_l2``, the paper's formula), for L2-normalised text features
    ``[A, C, E]`` and hand-crafted ones ``[C, E]``."""
    if distance == "squared_l2":
        return (text - hand).pow(2).sum(-1).mean(-1)
    return 1.0 - (text * hand).sum(-1).mean(-1)


class KgCoOpClient(PromptClient):
    """KgCoOp clients: one CoOp context ``prompt.ctx`` each, from the :class:`KgCoOp` settings."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        words = self.init_words(settings.ctx_init)
        self.n_ctx = settings.n_ctx or (words.shape[0] if words is not None else 4)
        self.prompt = ContextVectors(self.n_ctx, backbone.ctx_dim, words=words, slots=slots)

    def class_data(self, classnames: list[str]) -> dict:
        """The prompt tokens and the hand-crafted prompt's features ``hand`` [C, E], encoded once per class list."""
        return {**super().class_data(classnames),
                "hand": hand_crafted_features(self.backbone, self.settings.hand_prompt, classnames)}

    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features [A, C, E] of the active clients (one encoder call)."""
        return self.encode_context(self.active(self.prompt.ctx))

    def extra_loss(self, batch: dict, logits: torch.Tensor, text: torch.Tensor) -> torch.Tensor | None:
        """``weight * distance(w, w^clip)`` per active client ``[A]`` (see :func:`knowledge_distance`)."""
        weight = self.settings.kg_weight
        if weight == 0:
            return None
        return weight * knowledge_distance(text, self.frozen("hand", text.device), self.settings.distance)


@dataclass(kw_only=True, eq=False)
class KgCoOp(TrainedMethod):
    """KgCoOp: a shared CoOp context, trained with cross-entropy plus ``weight`` x the distance between its class
    text features and the hand-crafted prompt's.

    Sent and averaged (sample-weighted FedAvg): the context only. Defaults: the official code's (4 context vectors
    from "a photo of a", which the official code hard-codes whatever CTX_INIT says; ``weight`` 8.0 from its scripts;
    the code's ``1 - cos`` distance; SGD lr 0.002). ``compat: flip`` takes FLiP's fixed weight 1.0 when ``weight`` is
    null (FLiP's configs also start from a random context: ``configs/kgcoop_*_flip.yaml``). ``hand_prompt`` is the
    dataset's template (``KgCoOp:trainers/kgcoop.py:37-54``; the dataset configs set it).
    """

    n_ctx: Optional[int] = 4
    """Context tokens (4; null: the token count of ctx_init)."""
    ctx_init: Optional[str] = "a photo of a"
    """Initialisation words ("a photo of a", the official code's; null: random N(0, 0.02^2), as FLiP)."""
    hand_prompt: str = "a photo of a {}."
    """The hand-crafted prompt, {} for the class name (the dataset's template, e.g. "a photo of a {}, a type of
    pet." for Oxford Pets)."""
    weight: Optional[float] = None
    """Weight of the knowledge-guided term (null: 8.0, the official scripts' value; 1.0 under compat: flip)."""
    distance: Literal["cosine", "squared_l2"] = "cosine"
    """The term: 1 - mean cos (the official code's) or mean squared L2 distance (the paper's formula: twice the
    former for unit vectors)."""
    compat: Literal["paper", "flip"] = "paper"
    """paper: the official code's defaults; flip: FLiP's (weight 1.0 unless set)."""
    lr: float = 0.002
    """Local SGD learning rate (0.002 in the official config and in FLiP)."""

    client_class = KgCoOpClient
    shared_prefixes = ("prompt.",)

    @property
    def kg_weight(self) -> float:
        """The weight in use: ``weight``, or the default of ``compat``."""
        return KG_WEIGHTS[self.compat] if self.weight is None else float(self.weight)

    def check(self):
        if self.compat not in KG_WEIGHTS:
            raise FedPromptError(f"method.compat must be 'paper' or 'flip', got {self.compat!r}")
        if self.distance not in KG_DISTANCES:
            raise FedPromptError(f"method.distance must be one of {', '.join(KG_DISTANCES)}, got {self.distance!r}")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1 (or null with ctx_init), got {self.n_ctx}")
        if self.n_ctx is None and not self.ctx_init:
            raise FedPromptError("method.n_ctx is null but method.ctx_init is not set: give n_ctx, or ctx_init to "
                                 "take its token count.")
        if self.weight is not None and not self.weight >= 0:
            raise FedPromptError(f"method.weight must be >= 0 (the knowledge-guided term's weight), got "
                                 f"{self.weight}")
        check_template("hand_prompt", self.hand_prompt)
