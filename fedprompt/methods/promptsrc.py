"""PromptSRC (Khattak et al., ICCV 2023): IVLP's deep text and visual prompts regularised towards the frozen model,
and a Gaussian-weighted average of the prompts for evaluation.

Paper: "Self-regulating Prompts: Foundational Model Adaptation without Forgetting" (official code
muzairkhattak/PromptSRC; federated version in FLiP, 0-ml/flip). Specification: ``specs/baselines-multimodal.md``
section 2. Per client and step, with L2-normalised features:

- prompted text t [C, E] and image v [n, E] features (IVLP, :class:`fedprompt.methods.deep.IVLPClient`), logits
  z = 100 v t^T;
- frozen features: the text ensemble t0 [C, E] (the mean of the unnormalised frozen features of the 60 ImageNet
  templates, normalised after averaging: computed once per class list) and the zero-shot image features v0 of the
  same images through the frozen tower without prompts (one extra image-tower call under ``no_grad``), z0 = 100 v0 t0^T;
- loss = CE(z, y) + 25 mean|t - t0| + 10 mean|v - v0| + KL(softmax z0 || softmax z) / C per image (the released
  ``kl_div(..., reduction="sum") / logits.numel()``: the sum over images and classes divided by B * C).

Gaussian-weighted prompt aggregation (GPA) runs over communication rounds on the server (:class:`GPAAggregator`):
the live prompts are averaged by FedAvg and broadcast as usual, and a copy ``gpa.*`` = the running Gaussian-weighted
average of the global prompts of rounds 1 .. r (weights N(r; gpa_mean, gpa_std^2), renormalised over the rounds so
far) is what evaluation uses. The copy never goes back into training.

FLiP's version (``flcore/models/clip/PromptSRC.py:85-97``) loads the unnormalised running sum back into the model
that is broadcast, so the prompts the clients train from are about zero for the first rounds; that is reproduced
only under ``compat: flip`` (which needs ``gpa_rounds``, the run's rounds, because FLiP normalises the weights over
all of them). FLiP's PromptSRC is also shallow and text-only; that is a setting here (``text_depth: 1``), not part of
``compat: flip``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, WeightedMean
from fedprompt.methods.deep import TEXT_KEY, VISUAL_KEY, IVLPClient, _TextPrompts, sentence_features

#: the live prompt keys and their evaluation copies
GPA_KEYS = {TEXT_KEY: "gpa.text", VISUAL_KEY: "gpa.visual"}

#: the 60 ImageNet templates of PromptSRC's teacher ensemble (``trainers/imagenet_templates.py``; from OpenAI CLIP's
#: "Prompt_Engineering_for_ImageNet" notebook)
IMAGENET_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)


# ------------------------------------------------------------------------------------------------ functions
def template_ensemble(backbone, classnames: list[str], templates=IMAGENET_TEMPLATES) -> torch.Tensor:
    """The frozen teacher text features [C, E]: the mean over ``templates`` of the unnormalised frozen features of
    each class's sentence, L2-normalised after averaging (``promptsrc.py:113-128, 199-200``)."""
    total = sum(sentence_features(backbone, classnames, template.replace("{}", "{name}")) for template in templates)
    return F.normalize(total / len(templates), dim=-1)


def scl_kl(logits: torch.Tensor, zero_shot_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per image [n]: KL(softmax(z0 / T) || softmax(z / T)) * T^2 / C; its mean over a client's images is the released
    ``kl_div(log_softmax(z / T), log_softmax(z0 / T), reduction="sum", log_target=True) * T^2 / logits.numel()``."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(zero_shot_logits.float() / temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1) * temperature ** 2 / logits.shape[-1]


def gaussian_log_weight(position: float, mean: float, std: float) -> float:
    """log N(position; mean, std^2) (the GPA weight of a round, unnormalised)."""
    return -0.5 * ((position - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))


def running_mean(average: torch.Tensor | None, value: torch.Tensor, ratio: float) -> torch.Tensor:
    """``average + ratio * (value - average)`` in float64 (``value`` itself when there is no average yet)."""
    if average is None:
        return value.clone()
    mean = average.to(torch.float64)
    return (mean + ratio * (value.to(torch.float64) - mean)).to(value.dtype)


# ----------------------------------------------------------------------------------------------------- server
class GPAAggregator(WeightedMean):
    """Sample-weighted FedAvg of the live prompts plus PromptSRC's Gaussian-weighted prompt aggregation over rounds.

    ``aggregate`` returns the live global prompts and, under the copy keys, the running average
    ``sum_{s <= r} w_s theta_s / sum_{s <= r} w_s`` of the global prompts theta_s of the rounds so far with w_s =
    N(s; mean, std^2) (renormalised in log space, so rounds far from ``mean`` do not underflow; at the last round R it
    is the released weighting over all R rounds). Clients receive both; evaluation uses the copy, training the live
    prompts.

    ``flip_rounds`` (FLiP's server, ``compat: flip``): the broadcast prompts themselves become FLiP's unnormalised
    running sum ``sum_{s <= r} g_{s-1} theta_s`` with g_i = N(i; mean, std^2) / sum_{i' < R} N(i'; mean, std^2) (FLiP
    counts rounds from 0 and normalises over all R of them), and the copy equals them.

    Args:
        copies: live key -> its evaluation copy's key.
        mean, std: the Gaussian over rounds (1-based rounds; FLiP's 0-based under ``flip_rounds``).
        weighted: sample-weighted FedAvg (FedAvg as FLiP; False: unweighted).
        flip_rounds: R, for FLiP's normalisation (``None``: the fixed running average).
    """

    averages_uploads = False  # it also keeps the running GPA average: client-level DP's mean cannot replace it

    def __init__(self, copies: dict[str, str], mean: float, std: float, weighted: bool = True,
                 flip_rounds: int | None = None):
        super().__init__(tuple(copies), weighted=weighted)
        self.copies = dict(copies)
        self.mean, self.std, self.flip_rounds = float(mean), float(std), flip_rounds
        self.average: dict[str, torch.Tensor] = {}
        self.log_total: float | None = None

    def upload(self, client_id, state, round_idx):
        return {k: v for k, v in state.items() if k in self.copies}

    def aggregate(self, uploads, weights, round_idx):
        live = super().aggregate(uploads, weights, round_idx)
        if not live:
            return {}
        if self.flip_rounds is not None:
            logs = [gaussian_log_weight(i, self.mean, self.std) for i in range(self.flip_rounds)]
            top = max(logs)
            norm = top + math.log(sum(math.exp(v - top) for v in logs))
            weight = math.exp(gaussian_log_weight(round_idx - 1, self.mean, self.std) - norm)
            self.average = {k: (self.average.get(k, torch.zeros_like(v, dtype=torch.float64)).to(torch.float64)
                                + weight * v.to(torch.float64)).to(v.dtype) for k, v in live.items()}
            live = {k: v.clone() for k, v in self.average.items()}
        else:
            log_w = gaussian_log_weight(round_idx, self.mean, self.std)
            if self.log_total is None or not self.average:
                ratio, total = 1.0, log_w
            else:  # log(W_{r-1} + w_r) without underflow, and the new round's share w_r / W_r of the average
                total = max(self.log_total, log_w) + math.log1p(math.exp(-abs(self.log_total - log_w)))
                ratio = math.exp(log_w - total)
            self.log_total = total
            self.average = {k: running_mean(self.average.get(k), v, ratio) for k, v in live.items()}
        return {**live, **{self.copies[k]: v.clone() for k, v in self.average.items()}}

    def state_dict(self) -> dict:
        return {"average": {k: v.clone() for k, v in self.average.items()}, "log_total": self.log_total}

    def load_state_dict(self, state: dict) -> None:
        if "average" not in state:
            raise FedPromptError("--resume: the checkpoint has no PromptSRC aggregator state (the Gaussian-weighted "
                                 "prompt average); resume from a checkpoint written by a PromptSRC run.")
        self.average = {k: v.clone() for k, v in state["average"].items()}
        self.log_total = state.get("log_total")


# ----------------------------------------------------------------------------------------------------- client
class PromptSRCClient(IVLPClient):
    """PromptSRC clients: IVLP's prompts, the self-regulating losses, and the evaluation copies ``gpa.text`` /
    ``gpa.visual`` (buffers in the client state, set by :class:`GPAAggregator`; they start as the initial prompts)."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        self.gpa = nn.Module()
        self.gpa.register_buffer("text", self.text_prompts.ctx.detach().clone())
        self.gpa.register_buffer("visual", self.visual_prompts.tokens.detach().clone())

    def class_data(self, classnames):
        return {**super().class_data(classnames), "teacher": template_ensemble(self.backbone, classnames)}

    def _uses_copy(self) -> bool:
        return not self.training and self.settings.gpa

    def text_features(self) -> torch.Tensor:
        ctx = self.gpa.text if self._uses_copy() else self.text_prompts.ctx
        return self.prompted_text(self.active(ctx))

    def image_features(self, batch: dict):
        """Prompted features [n, E]; in training also the zero-shot features of the same images ``(prompted,
        frozen)`` (the frozen tower without prompts, under ``no_grad``)."""
        tokens = self.gpa.visual if self._uses_copy() else self.visual_prompts.tokens
        prompted = self.prompted_image(batch["image"], self.active(tokens)[:, 0])
        if not self.training:
            return prompted
        with torch.no_grad():
            frozen = F.normalize(self.backbone.encode_image(batch["image"]).float(), dim=-1)
        return prompted, frozen

    def logits(self, text, image, batch) -> torch.Tensor:
        return self.clip_logits(image[0] if isinstance(image, tuple) else image, text)

    def loss(self, text, image, batch) -> dict[str, torch.Tensor]:
        """Per client: ``ce`` + ``text`` (25 L1) + ``image`` (10 L1) + ``kl`` (the released weights by default)."""
        s = self.settings
        prompted, frozen = image
        teacher = self.frozen("teacher", text.device)  # [C, E]
        logits = self.clip_logits(prompted, text)
        zero_shot = self._logit_scale * frozen @ teacher.t()
        ce = self.client_mean(F.cross_entropy(logits.float(), batch["label"], reduction="none"))
        return {"ce": ce,
                "text": s.text_loss_weight * (text - teacher).abs().mean(dim=(-2, -1)),
                "image": s.image_loss_weight * self.client_mean((prompted - frozen).abs().mean(-1)),
                "kl": s.logits_loss_weight * self.client_mean(scl_kl(logits, zero_shot))}


# ----------------------------------------------------------------------------------------------------- method
@dataclass(kw_only=True, eq=False)
class PromptSRC(_TextPrompts):
    """PromptSRC: IVLP prompts (4 + 4 tokens, depth 9 / 9) trained with the L1 consistency of the prompted and frozen
    text and image features (weights 25 and 10) and the KL to the zero-shot logits (weight 1), shared by FedAvg
    (sample-weighted, all prompts, as FLiP), and evaluated with the Gaussian-weighted average of the global prompts
    over rounds (``gpa_mean``, ``gpa_std`` in rounds; a copy used only for evaluation). Defaults: the released
    ``PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml`` (lr 0.0025, GPA N(15, 1), read here over rounds). ``compat:
    official`` rounds the inserted prompts to fp16 as the released code; ``compat: flip`` reproduces FLiP's server,
    which broadcasts its unnormalised GPA sum (about zero for the first rounds)."""

    n_ctx: int = 4
    """Learnable text tokens per layer (4: all of "a photo of a")."""
    text_depth: Optional[int] = None
    """Text layers that get prompts (null: the released 9, or every layer of a smaller text tower)."""
    visual_tokens: int = 4
    """Visual prompt tokens per layer (4)."""
    visual_depth: Optional[int] = None
    """Image layers that get prompts (null: the released 9, or every layer of a smaller image tower)."""
    text_loss_weight: float = 25.0
    """Weight of the L1 distance of the prompted to the frozen (template-ensemble) text features (25)."""
    image_loss_weight: float = 10.0
    """Weight of the L1 distance of the prompted to the zero-shot image features (10)."""
    logits_loss_weight: float = 1.0
    """Weight of KL(zero-shot || prompted) of the logits (1)."""
    gpa: bool = True
    """Evaluate the Gaussian-weighted average of the global prompts over rounds (false: the live prompts)."""
    gpa_mean: float = 15.0
    """Mean of the GPA Gaussian, in rounds (the released 15, of 20 epochs)."""
    gpa_std: float = 1.0
    """Standard deviation of the GPA Gaussian, in rounds (1)."""
    gpa_rounds: Optional[int] = None
    """compat: flip only: the run's rounds (FLiP normalises its weights over all of them)."""
    compat: Literal["fixed", "official", "flip"] = "fixed"
    """fixed (default), official (the released fp16 rounding of inserted prompts) or flip (FLiP's server broadcasts
    its unnormalised GPA sum)."""
    lr: float = 0.0025
    """Local SGD learning rate (0.0025 in the released config)."""

    client_class = PromptSRCClient
    shared_prefixes = (TEXT_KEY, VISUAL_KEY)
    released_depths = {"text_depth": 9, "visual_depth": 9}

    def check(self):
        self.check_common(("fixed", "official", "flip"), n_ctx=self.n_ctx, visual_tokens=self.visual_tokens,
                          text_depth=self.text_depth, visual_depth=self.visual_depth)
        if not self.gpa_std > 0:
            raise FedPromptError(f"method.gpa_std={self.gpa_std} must be > 0.")
        if min(self.text_loss_weight, self.image_loss_weight, self.logits_loss_weight) < 0:
            raise FedPromptError("method.text_loss_weight, image_loss_weight and logits_loss_weight must be >= 0.")
        if self.compat == "flip" and (self.gpa_rounds is None or self.gpa_rounds < 1):
            raise FedPromptError("method.compat=flip needs method.gpa_rounds, the run's rounds (federation.rounds): "
                                 "FLiP normalises its Gaussian weights over all of them.")

    def build_aggregator(self) -> Aggregator:
        return GPAAggregator(GPA_KEYS, self.gpa_mean, self.gpa_std,
                             flip_rounds=self.gpa_rounds if self.compat == "flip" else None)
