"""Deep and multi-modal prompts as federated baselines: VPT (deep visual prompts), IVLP (independent deep text and
visual prompts) and MaPLe (text prompts coupled into visual prompts at each of the first J layers).

MaPLe is Khattak et al., CVPR 2023 ("MaPLe: Multi-modal Prompt Learning", official code
muzairkhattak/multimodal-prompt-learning); "Deep Vision Prompting" (VPT-style CLIP baseline) and "Independent V-L
Prompting" (IVLP) are the baselines that paper introduces. Their federated versions are FedMGP's baselines
(weihao-bo/FedMGP) and FLiP's MaPLe (0-ml/flip). Specification: ``specs/baselines-multimodal.md`` sections 0-1.

Where the prompts enter (:meth:`fedprompt.backbone.Backbone.encode_prompts` and ``encode_image_prompted``):

- text: the layer-0 context fills positions 1 .. n_ctx of ``[SOS] ctx <words> <class>. [EOS]``; before text layer i
  (1 <= i < ``text_depth``) the residual-stream rows at those positions are replaced by the deep prompt of layer i
  (no positional embedding, no LayerNorm);
- vision: ``visual_tokens`` tokens are appended after the patch tokens (before ``ln_pre``); before image layer i
  (1 <= i < ``visual_depth``) the last ``visual_tokens`` rows are replaced by the deep prompt of layer i; the class
  token is pooled as usual and the prompt outputs are dropped.

All active clients go through one text-encoder call and one image-tower call per step. Prompt state per client:

- VPT: ``visual_prompts.tokens`` [1, (visual_depth,) V, width]; the text side is the frozen features of
  ``"a photo of a {class}."`` (computed once per class list);
- IVLP: ``text_prompts.ctx`` [text_depth, n_ctx, D] (layer 0 from ``ctx_init``, deeper layers N(0, 0.02^2)) and
  ``visual_prompts.tokens``; ``aggregate`` all (default), vision or language (the other modality stays local);
- MaPLe: ``text_prompts.ctx`` [J, n_ctx, D] and the coupling ``coupling.weight`` [J, width, D], ``coupling.bias``
  [J, width] (:mod:`fedprompt.prompts.coupling`); visual prompt j = ``W_j P_j + b_j``. Everything is shared (FedMGP
  and FLiP both average every tensor): 3,555,072 values per client at ViT-B/16 with J = 9, so the upload goes through
  the loop's reduce path (an all-reduce of per-process sums, no gathering of client states).

Differences from the released code, each with a switch where the official behaviour is reproducible:

- ``compat: fixed`` (default) keeps the prompts in fp32; ``compat: official`` rounds every inserted prompt to fp16
  as the released ``.half()`` casts do (``clip/model.py:238, 249, 306, 323, 405, 457``), even in an fp32 model, and,
  as there, after the copy per image (visual prompts) or per class (deep text prompts): the backward of the cast
  rounds each image's or class's gradient to fp16 before they are summed.
- MaPLe's layer-0 coupling runs in the prompts' precision (the released ``self.proj.half()`` breaks fp32 and amp
  runs: ``maple.py:104``).
- ``n_ctx`` larger than the tokens of ``ctx_init`` is an error (the released code silently switches to random
  initialisation; ``ctx_init: null`` asks for that).
- ``keep_init_words: true`` (default, the released behaviour) keeps the words of ``ctx_init`` after the first
  ``n_ctx`` tokens as fixed text: with ``n_ctx: 2`` the sentence is ``[SOS] <a> <photo> of a {class}. [EOS]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, WeightedMean
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors, Coupling, VisualPrompts, couple

TEXT_KEY = "text_prompts.ctx"
VISUAL_KEY = "visual_prompts.tokens"
COUPLING_PREFIX = "coupling."

Compat = Literal["fixed", "official"]


# ------------------------------------------------------------------------------------------------- helpers
def fp16_rounded(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` rounded to fp16 precision and back to its dtype (the released code's ``.half()`` at every prompt
    insertion; gradients pass through the casts)."""
    return tensor.half().to(tensor.dtype)


def split_init_phrase(backbone, phrase: str, n_ctx: int, setting: str = "method.ctx_init"
                      ) -> tuple[torch.Tensor, str]:
    """The embeddings [n_ctx, D] of the first ``n_ctx`` tokens of ``phrase`` (on the CPU) and the words after them.

    The released MaPLe / IVLP / PromptSRC code initialises the context from the first ``n_ctx`` token embeddings of
    ``CTX_INIT`` and keeps the rest of the phrase in the sentence as fixed text (``maple.py:84-92, 121, 131``).
    """
    words = phrase.replace("_", " ").split()
    embeddings = backbone.word_embeddings(" ".join(words)).cpu()
    if embeddings.shape[0] < n_ctx:
        raise FedPromptError(f"{setting} {phrase!r} has {embeddings.shape[0]} tokens, fewer than n_ctx={n_ctx}; "
                             "use a longer phrase or ctx_init: null (random N(0, 0.02^2) context).")
    count, rest = 0, []
    for k, word in enumerate(words):
        if count == n_ctx:
            rest = words[k:]
            break
        count += backbone.word_embeddings(word).shape[0]
        if count > n_ctx:
            raise FedPromptError(f"{setting} {phrase!r}: n_ctx={n_ctx} ends inside the word {word!r}; choose an "
                                 "n_ctx that covers whole words.")
    return embeddings[:n_ctx], " ".join(rest)


def deep_text_init(words: torch.Tensor | None, depth: int, n_ctx: int, dim: int) -> torch.Tensor:
    """The text prompts [depth, n_ctx, D]: layer 0 from ``words`` (or N(0, 0.02^2)), deeper layers N(0, 0.02^2)
    (``clip/model.py:220``, ``maple.py:111-114``)."""
    prompts = torch.randn(depth, n_ctx, dim) * 0.02
    if words is not None:
        prompts[0] = words.to(torch.float32)
    return prompts


@torch.no_grad()
def sentence_features(backbone, classnames: list[str], template: str) -> torch.Tensor:
    """Frozen, unnormalised fp32 text features [C, E] of ``template`` (``{name}`` the class name) for each class,
    through the prompt path with no learnable tokens (end-of-text truncation: open_clip's ``encode_text`` features)."""
    tokens = backbone.prompt_tokens(classnames, 0, template=template)
    empty = torch.zeros(0, backbone.ctx_dim, device=tokens.embeddings.device, dtype=tokens.embeddings.dtype)
    return backbone.encode_prompts(tokens, empty).float()


def fixed_text_features(backbone, classnames: list[str], template: str) -> torch.Tensor:
    """:func:`sentence_features`, L2-normalised (VPT's frozen text side)."""
    return F.normalize(sentence_features(backbone, classnames, template), dim=-1)


def check_visual_tower(backbone, method: str, depth: int, setting: str = "method.visual_depth") -> None:
    """One clear error when the image tower cannot take ``depth`` layers of visual prompts."""
    if not backbone.supports_visual_prompts:
        raise FedPromptError(f"method: {method} puts prompt tokens into the image tower, which needs a ViT (open_clip "
                             f"VisionTransformer), but '{backbone.name}' has a "
                             f"{type(backbone.model.visual).__name__} image tower; use a ViT backbone (ViT-B-16).")
    if depth > backbone.visual_layers:
        raise FedPromptError(f"{setting}={depth} is larger than the {backbone.visual_layers} layers of the image "
                             f"tower of '{backbone.name}'; use at most {backbone.visual_layers} ({method}).")


def check_text_tower(backbone, method: str, depth: int, setting: str = "method.text_depth") -> None:
    """One clear error when the text tower cannot take ``depth`` layers of text prompts."""
    if depth > 1 and not backbone.supports_deep_text_prompts:
        raise FedPromptError(f"{setting}={depth}: deep text prompts need open_clip's CLIP text transformer, but "
                             f"'{backbone.name}' has a Hugging Face text tower; use {setting.split('.')[-1]}: 1.")
    if depth > backbone.text_layers:
        raise FedPromptError(f"{setting}={depth} is larger than the {backbone.text_layers} layers of the text tower "
                             f"of '{backbone.name}'; use at most {backbone.text_layers} ({method}).")


# --------------------------------------------------------------------------------------------------- clients
class DeepPromptClient(PromptClient):
    """What the VPT, IVLP and MaPLe clients share: the ``compat`` rounding and the text prompts' sentence."""

    def build_text_prompts(self, backbone, settings, slots: int) -> None:
        """``text_prompts.ctx`` [slots, text_depth, n_ctx, D] and the sentence around it (:attr:`prompt_template`)."""
        depth = settings.text_depth
        check_text_tower(backbone, settings.name, depth)
        self.n_ctx = settings.n_ctx
        words, rest = (split_init_phrase(backbone, settings.ctx_init, settings.n_ctx) if settings.ctx_init
                       else (None, ""))
        if rest and settings.keep_init_words:
            self.prompt_template = "{ctx} " + rest + " {name}."
        initial = deep_text_init(words, depth, settings.n_ctx, backbone.ctx_dim)
        self.text_prompts = ContextVectors(settings.n_ctx, backbone.ctx_dim, shape=(depth,), slots=slots,
                                           initial=initial)

    def prompted_text(self, ctx: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features [A, C, E] of the active clients' text prompts ``ctx`` [A, J, n_ctx, D] (layer
        0 into the sentence, layers 1 .. J - 1 as deep prompts), in one encoder call. Under ``compat: official``
        every class's sentence gets its own copy of the deep prompts, rounded to fp16 (the released ``.half()`` comes
        after ``.expand`` over the classes: each class's gradient is rounded before the sum over classes)."""
        deep = ctx[:, 1:]
        if self.settings.compat == "official":
            deep = fp16_rounded(deep.unsqueeze(1).expand(-1, len(self.classnames), *deep.shape[1:]))
        return self.encode_context(ctx[:, 0], deep=deep)

    def prompted_image(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features [n, E]: each image with its own client's visual prompts ``tokens`` (the
        active clients' [A, (depth,) V, width]), in one image-tower call. Under ``compat: official`` every image gets
        its own copy of its client's prompts, rounded to fp16 (the released ``.half()`` after ``.expand`` over the
        batch: each image's gradient is rounded before the sum over the batch)."""
        if self.settings.compat != "official":
            return self.encode_visual(images, tokens.unsqueeze(1), of_active=True)[:, 0]
        own = fp16_rounded(self.per_sample(tokens))  # [n, (depth,) V, width]
        feats = self.backbone.encode_image_prompted(images, own, torch.arange(own.shape[0], device=own.device))
        return F.normalize(feats.float(), dim=-1)


class VPTClient(DeepPromptClient):
    """VPT clients: ``visual_prompts.tokens`` [slots, 1, (visual_depth,) V, width]; the text side is the frozen
    features of :attr:`VPT.text_template` (``vpt.py:67-89``)."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        check_visual_tower(backbone, settings.name, settings.visual_depth)
        self.visual_prompts = VisualPrompts(1, settings.visual_tokens, backbone.visual_width, settings.visual_depth,
                                            slots=slots)

    def class_data(self, classnames):
        return {"text": fixed_text_features(self.backbone, classnames, self.settings.text_template)}

    def text_features(self) -> torch.Tensor:
        """The frozen text features, the same [C, E] for every active client: [A, C, E]."""
        return self.for_each_client(self.frozen("text", self.device))

    def image_features(self, batch: dict) -> torch.Tensor:
        return self.prompted_image(batch["image"], self.active(self.visual_prompts.tokens)[:, 0])


class IVLPClient(DeepPromptClient):
    """IVLP clients: independent text prompts ``text_prompts.ctx`` [slots, text_depth, n_ctx, D] and visual prompts
    ``visual_prompts.tokens`` [slots, 1, (visual_depth,) V, width] (``independentVL.py``, ``clip/model.py:191-256``)."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        check_visual_tower(backbone, settings.name, settings.visual_depth)
        self.build_text_prompts(backbone, settings, slots)
        self.visual_prompts = VisualPrompts(1, settings.visual_tokens, backbone.visual_width, settings.visual_depth,
                                            slots=slots)

    def text_features(self) -> torch.Tensor:
        return self.prompted_text(self.active(self.text_prompts.ctx))

    def image_features(self, batch: dict) -> torch.Tensor:
        return self.prompted_image(batch["image"], self.active(self.visual_prompts.tokens)[:, 0])


class MaPLeClient(DeepPromptClient):
    """MaPLe clients: text prompts ``text_prompts.ctx`` [slots, J, n_ctx, D] and the coupling functions
    ``coupling.weight`` [slots, J, width, D], ``coupling.bias`` [slots, J, width]; the visual prompts of layer j are
    ``W_j P_j + b_j`` (``maple.py:171-176``), so the image loss reaches the text prompts too."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        check_visual_tower(backbone, settings.name, settings.text_depth, "method.text_depth")
        self.build_text_prompts(backbone, settings, slots)
        self.coupling = Coupling(settings.text_depth, backbone.ctx_dim, backbone.visual_width, slots)

    def visual_tokens(self) -> torch.Tensor:
        """The active clients' visual prompts [A, J, n_ctx, width] (J = 1: [A, 1, n_ctx, width], shallow)."""
        return couple(self.active(self.text_prompts.ctx), self.active(self.coupling.weight),
                      self.active(self.coupling.bias))

    def text_features(self) -> torch.Tensor:
        return self.prompted_text(self.active(self.text_prompts.ctx))

    def image_features(self, batch: dict) -> torch.Tensor:
        return self.prompted_image(batch["image"], self.visual_tokens())


# --------------------------------------------------------------------------------------------------- methods
@dataclass(kw_only=True, eq=False)
class _DeepPrompts(TrainedMethod):
    """Settings shared by VPT, IVLP and MaPLe."""

    compat: Compat = "fixed"
    """fixed (fp32 prompts) or official (every inserted prompt rounded to fp16, as the released .half() casts)."""

    frozen_image_tower = False  # visual prompts: the image tower's outputs depend on the prompts
    #: the released value of each depth setting (null in the config: this value where the tower has the layers)
    released_depths: ClassVar[dict[str, int]] = {}

    def depth_limit(self, backbone, name: str) -> tuple[int, str] | None:
        """The most layers ``backbone`` takes for depth setting ``name``, and why (``None``: no limit to derive
        from, e.g. an image tower that takes no prompts at all, which the client refuses in one line)."""
        if name == "visual_depth":
            if not backbone.supports_visual_prompts:
                return None
            return backbone.visual_layers, f"the image tower of '{backbone.name}' has {backbone.visual_layers} layers"
        if not backbone.supports_deep_text_prompts:
            return 1, f"the Hugging Face text tower of '{backbone.name}' takes input-layer prompts only"
        return backbone.text_layers, f"the text tower of '{backbone.name}' has {backbone.text_layers} layers"

    def derived_settings(self, backbone):
        """Each depth left null: the released depth, or every layer of a tower that has fewer."""
        derived = {}
        for name, official in self.released_depths.items():
            if getattr(self, name) is not None:
                continue
            limit = self.depth_limit(backbone, name)  # None: the client refuses the backbone in one line
            derived[name] = (official, official, "") if limit is None else (min(official, limit[0]), official,
                                                                             limit[1])
        return derived

    def check_common(self, compat: tuple[str, ...] = ("fixed", "official"), **counts: int | None) -> None:
        """One error line for a token count or depth below 1 (``counts``: setting -> value; null: derived) or an
        unknown compat."""
        bad = [f"method.{name}={value}" for name, value in counts.items() if value is not None and value < 1]
        if bad:
            raise FedPromptError(f"{', '.join(bad)}: {self.name} needs at least one prompt token and a depth of at "
                                 "least 1 (1: the input layer only).")
        if self.compat not in compat:
            raise FedPromptError(f"method.compat={self.compat!r}: use {' or '.join(compat)}.")


@dataclass(kw_only=True, eq=False)
class VPT(_DeepPrompts):
    """VPT (deep vision prompting, the MaPLe paper's baseline): learnable tokens in the ViT image tower, shared by
    FedAvg (sample-weighted, FedMGP's ``vpt_learner.py``); the text side is frozen CLIP features of
    ``"a photo of a {class}."``. Defaults: the released ``VPT/vit_b16_c2_ep5_batch4_4.yaml`` (8 tokens, depth 12, lr
    0.0025); FedMGP's federated baseline runs it shallow with 4 tokens (``configs/vpt_*.yaml``)."""

    visual_tokens: int = 8
    """Visual prompt tokens per layer (8 in the released config; 4 in FedMGP's)."""
    visual_depth: Optional[int] = None
    """Layers that get fresh visual prompts (1: input only, shallow; null: the released 12, every layer of ViT-B/16,
    or every layer of a smaller image tower)."""
    text_template: str = "a photo of a {name}."
    """The frozen sentence of each class ({name}: the class name)."""
    lr: float = 0.0025
    """Local SGD learning rate (0.0025 in the released config)."""

    client_class = VPTClient
    shared_prefixes = ("visual_prompts.",)
    released_depths = {"visual_depth": 12}

    def check(self):
        self.check_common(visual_tokens=self.visual_tokens, visual_depth=self.visual_depth)
        if "{name}" not in self.text_template:
            raise FedPromptError(f"method.text_template={self.text_template!r} must contain {{name}}.")


@dataclass(kw_only=True, eq=False)
class _TextPrompts(_DeepPrompts):
    """The text-prompt settings of IVLP, MaPLe and PromptSRC."""

    n_ctx: int = 2
    """Learnable text tokens per layer (2: "a photo" of "a photo of a")."""
    text_depth: Optional[int] = None
    """Text layers that get prompts J (1: input only, shallow; null: the released 9, or every layer of a smaller
    tower)."""
    ctx_init: Optional[str] = "a photo of a"
    """The words whose first n_ctx token embeddings initialise the layer-0 context (null: N(0, 0.02^2))."""
    keep_init_words: bool = True
    """Keep the words of ctx_init after the first n_ctx tokens as fixed text ("[SOS] p1 p2 of a {class}."), as the
    released code does; false: "[SOS] p1 p2 {class}."."""


@dataclass(kw_only=True, eq=False)
class IVLP(_TextPrompts):
    """IVLP (independent vision-language prompting, the MaPLe paper's baseline): deep text prompts and deep visual
    prompts, learnt independently. ``aggregate``: what the server averages (sample-weighted FedAvg, FedMGP's
    ``ivlp_learner.py``): all (default), vision or language, the other modality staying on each client. Defaults:
    the released ``IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml`` (2 + 2 tokens, depth 12 / 12, lr 0.0035); FedMGP's
    federated baseline runs it shallow (depth 1 / 1, ``configs/ivlp_*.yaml``)."""

    text_depth: Optional[int] = None
    """Text layers that get prompts (1: input only, shallow; null: the released 12, or every layer of a smaller
    text tower)."""
    visual_tokens: int = 2
    """Visual prompt tokens per layer (2)."""
    visual_depth: Optional[int] = None
    """Image layers that get prompts (1: input only, shallow; null: the released 12, or every layer of a smaller
    image tower)."""
    aggregate: Literal["all", "vision", "language"] = "all"
    """What the server averages: all (default), vision (text prompts stay local) or language (visual prompts stay
    local)."""
    lr: float = 0.0035
    """Local SGD learning rate (0.0035 in the released config)."""

    client_class = IVLPClient
    released_depths = {"text_depth": 12, "visual_depth": 12}

    @property
    def shared_prefixes(self) -> tuple[str, ...]:
        return {"all": (TEXT_KEY, VISUAL_KEY), "vision": (VISUAL_KEY,), "language": (TEXT_KEY,)}[self.aggregate]

    @property
    def global_model(self) -> bool:
        return self.aggregate == "all"

    def check(self):
        self.check_common(n_ctx=self.n_ctx, visual_tokens=self.visual_tokens, text_depth=self.text_depth,
                          visual_depth=self.visual_depth)
        if self.aggregate not in ("all", "vision", "language"):
            raise FedPromptError(f"method.aggregate={self.aggregate!r}: use all, vision or language.")


@dataclass(kw_only=True, eq=False)
class MaPLe(_TextPrompts):
    """MaPLe (Khattak et al., CVPR 2023): text prompts at each of the first J = ``text_depth`` layers, coupled into
    the image tower's prompts of the same layers by per-layer linear maps (the visual prompts have ``n_ctx`` tokens
    and depth J). Every tensor is shared (sample-weighted FedAvg, as FedMGP's ``fedmaple_learner.py`` and FLiP's
    ``server_maple.py``): 3.55 M values per client at ViT-B/16 with J = 9, merged by the loop's all-reduce path.
    Defaults: the released ``MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`` (n_ctx 2, J 9, lr 0.0035); FLiP's defaults
    are J = 1 (shallow), 4 random tokens (``--method.text_depth 1 --method.n_ctx 4 --method.ctx_init null``)."""

    lr: float = 0.0035
    """Local SGD learning rate (0.0035 in the released config)."""

    client_class = MaPLeClient
    shared_prefixes = ("text_prompts.", COUPLING_PREFIX)
    released_depths = {"text_depth": 9}

    def depth_limit(self, backbone, name):
        """J prompts the text tower and, coupled, the image tower: the smaller of the two limits."""
        limits = [limit for limit in (super().depth_limit(backbone, "text_depth"),
                                      super().depth_limit(backbone, "visual_depth")) if limit is not None]
        return min(limits) if limits else None

    def check(self):
        self.check_common(n_ctx=self.n_ctx, text_depth=self.text_depth)

    def build_aggregator(self) -> Aggregator:
        return WeightedMean(self.shared_prefixes, reduce=True)
