"""FedMVP (Singha et al., ICCV 2025): instance-level visual prompts from each image and LLM-generated class
attributes, scored by classification by description.

Every client trains the same network, the PromptFormer (:class:`fedprompt.prompts.PromptFormer`): the patch
embeddings of an image attend to the frozen text features of its class list's attribute sentences, and the result,
pooled to ``visual_tokens`` tokens, joins the ViT image tower's input sequence (shallow, after the patch tokens,
through ``ln_pre`` like every input token). The server takes the unweighted mean of the whole PromptFormer (the
released rule), so every client holds the same model after a round.

For a class list with attributes ``a_{c,j}`` (``method.attributes``: FedMVP's JSON files, ``{class name: [attribute,
...]}``), each attribute becomes a sentence (``method.sentence``, by default the release's "a photo of a {name},
which has {attribute}" wording) encoded by the frozen text tower: ``e_{c,j}`` (L2-normalised). With ``f`` the
prompted, L2-normalised image feature:

- logits ``z_c = mean_j tau f . e_{c,j}`` (the mean over class c's attributes);
- consistency ``r = 1 - cos(f, f0)`` with ``f0`` the frozen tower's feature of the image flipped horizontally with
  probability ``flip_probability`` (one decision per client and step, from the client's step seed);
- loss ``CE(z, y) + alpha r`` per client (``alpha`` 10).

The PromptFormer's keys and values are the sentences' features (``context: sentences``, the release for most
datasets) or the raw attributes' (``context: attributes``, the release for OfficeHome and TerraIncognita).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.backbone.adapters import StackedLoRA
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, WeightedMean
from fedprompt.methods.base import PromptClient, total_loss
from fedprompt.optim import StackedSGD
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import PromptFormer, SlotStacked

#: sentences encoded per text-tower call when a class list's attributes are encoded
ENCODE_CHUNK = 1024
#: a dataset name (normalised: lower case, letters and digits) -> the released attribute file's stem, for folders
#: the attention inputs FedMVP's optional LoRA adapts (the release's query, key and value factors)
LORA_ROLES = ("query", "key", "value")
RELEASE_STEMS = {"imagenet": "imagenet", "pacs": "pacs", "officehome": "officehome", "vlcs": "vlcs",
                 "terra": "terraincognita", "domainnet": "domainnet"}


def descriptor_clause(attribute: str) -> str:
    """An attribute worded as a relative clause, the rule of classification by description that FedMVP's release
    applies (an attribute starting with "a" -- any such word -- or "used": "which is ..."; with "has", "often",
    "typically", "may" or "can": "which ..."; otherwise "which has ...")."""
    if attribute.startswith(("a", "used")):
        return f"which is {attribute}"
    if attribute.startswith(("has", "often", "typically", "may", "can")):
        return f"which {attribute}"
    return f"which has {attribute}"


_FILES: dict[tuple, dict[str, list[str]]] = {}


def read_attribute_file(path: Path) -> dict[str, list[str]]:
    """A JSON attribute file ``{class name: [attribute, ...]}`` (read once per process); one error line naming the
    file when it is missing or not of that form."""
    path = Path(path)
    try:
        key = (path.resolve(), path.stat().st_mtime_ns)
    except OSError:
        key = (path, None)
    if key not in _FILES:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FedPromptError(f"method.attributes: {path} not found; give FedMVP's attribute JSON file (its "
                                 "attributes/<dataset>.json) or the folder that holds them.") from None
        except (OSError, ValueError) as err:
            raise FedPromptError(f"method.attributes: cannot read {path} as JSON ({err}).") from None
        if not isinstance(data, dict) or not all(
                isinstance(v, list) and all(isinstance(a, str) for a in v) for v in data.values()):
            raise FedPromptError(f"method.attributes: {path} must be a JSON object {{class name: [attribute "
                                 "strings]}}.")
        _FILES[key] = data
    return _FILES[key]


def class_attributes(path: Path, classnames: list[str], dataset: str) -> list[list[str]]:
    """Each class's attributes in class order (a class is found under its name with underscores as spaces, or the
    same name in another case); one error line naming the file, the dataset and the first class without any."""
    table = read_attribute_file(path)
    folded = {key.casefold(): key for key in table}
    out = []
    for name in classnames:
        spoken = name.replace("_", " ")
        key = spoken if spoken in table else folded.get(spoken.casefold())
        if key is None or not table[key]:
            raise FedPromptError(f"method.attributes: {path} has no attributes for class {spoken!r} of dataset "
                                 f"{dataset or '(unnamed)'}; add the class with a list of attribute strings, or give "
                                 "this dataset's attribute file.")
        out.append(list(table[key]))
    return out


@torch.no_grad()
def frozen_text_features(backbone, sentences: list[str]) -> torch.Tensor:
    """L2-normalised fp32 features ``[len(sentences), E]`` of plain sentences from the frozen text tower (no
    autocast), encoded in chunks of :data:`ENCODE_CHUNK`."""
    with torch.autocast(device_type=backbone.device.type, enabled=False):
        parts = [backbone.encode_text(sentences[i:i + ENCODE_CHUNK]).float()
                 for i in range(0, len(sentences), ENCODE_CHUNK)]
    return F.normalize(torch.cat(parts), dim=-1)


class FedMVPClient(PromptClient):
    """FedMVP clients: one PromptFormer each (``former.*``, stacked over slots), from the :class:`FedMVP`
    settings. The text side is frozen (the attribute sentences' features, the same for every client)."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        if not backbone.supports_visual_prompts:
            raise FedPromptError(f"backbone.model: FedMVP's PromptFormer reads the patch tokens of a ViT image tower "
                                 "and adds visual prompts to its sequence, but this backbone's image tower is a "
                                 f"{type(backbone.model.visual).__name__} without a token sequence; use a ViT backbone "
                                 "(ViT-B-16).")
        self.lora = settings.lora_threshold is not None
        template = PromptFormer(backbone.visual_width, backbone.embed_dim, settings.heads, settings.ff_mult,
                                settings.visual_tokens)
        self.former = SlotStacked(template, slots)
        if self.lora:  # the release's unscaled factors, both N(0, 0.02^2), on the attention's inputs (shared)
            width = backbone.visual_width
            self.lora_factors = nn.ModuleDict({role: StackedLoRA(width, width, settings.lora_rank, slots=slots,
                                                                 scale=1.0, init="normal") for role in LORA_ROLES})
            # each client's own switch and the loss of its last step (client state, never sent)
            self.register_buffer("lora_on", torch.zeros(slots))
            self.register_buffer("last_loss", torch.full((slots,), math.inf))
        self._lora_slots = [False] * slots  # host copy of lora_on, set at the start of a round

    def on_round_start(self, global_state) -> None:
        """A client whose last step of its previous round had a loss below ``lora_threshold`` switches to LoRA
        (for good): from now on it trains the LoRA factors and the context map, and holds the cross-attention."""
        if not self.lora:
            return
        with torch.no_grad():
            self.lora_on.copy_(torch.maximum(self.lora_on, (self.last_loss < self.settings.lora_threshold).float()))
        self._lora_slots = [bool(flag) for flag in self.lora_on.tolist()]  # one host read per round

    def configure_optimizers(self):
        """SGD as every method; with LoRA, three groups: the cross-attention (held for switched clients), the
        context map (always trained) and the LoRA factors (held for the others), so a client steps the same in a
        lock-step group as alone."""
        if not self.lora:
            return super().configure_optimizers()
        params = dict(self.former.named_parameters())
        context = [params.pop(name) for name in list(params) if name.startswith("context.")]
        switched = list(self._lora_slots)
        optim = self.optim
        return StackedSGD([{"params": list(params.values()), "held": switched}, {"params": context},
                           {"params": list(self.lora_factors.parameters()), "held": [not on for on in switched]}],
                          lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)

    def backward(self, losses, backward) -> None:
        """The default backward; with LoRA the active clients' losses are kept first (the switch reads the last)."""
        if self.lora:
            with torch.no_grad():
                self.set_active(self.last_loss, total_loss(losses).detach().float())
        super().backward(losses, backward)

    def class_data(self, classnames: list[str]) -> dict:
        """The attribute sentences' features ``descriptions`` [M, E], the class of each (``class_of`` [M]), the
        attributes per class (``counts`` [C]) and the PromptFormer's ``context`` [M, E]."""
        s = self.settings
        path, dataset = s.attribute_source(classnames)
        per_class = class_attributes(path, classnames, dataset)
        sentences = [s.sentence.format(name=name.replace("_", " "), clause=descriptor_clause(a), attribute=a)
                     for name, attributes in zip(classnames, per_class) for a in attributes]
        descriptions = frozen_text_features(self.backbone, sentences)
        raw = [a for attributes in per_class for a in attributes]
        context = descriptions if s.context == "sentences" else frozen_text_features(self.backbone, raw)
        return {"descriptions": descriptions, "context": context,
                "class_of": torch.tensor([c for c, a in enumerate(per_class) for _ in a]),
                "counts": torch.tensor([len(a) for a in per_class])}

    def text_features(self) -> torch.Tensor:
        """The attribute sentences' features for every active client ``[A, M, E]`` (frozen, shared)."""
        return self.for_each_client(self.frozen("descriptions", self.device))

    def prompted_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised features ``[n, E]`` of each image with the visual prompts its own client's PromptFormer
        makes from it (the clients' samples are contiguous, in the order of the active clients)."""
        with torch.no_grad():
            patches = self.backbone.patch_embeddings(images)[:, 1:]
        context = self.frozen("context", images.device)
        prompts, start = [], 0
        for slot, size in zip(self.host_slots(), self.sample_sizes()):
            if size:
                adapt = self.lora_adapter(slot) if self.lora and self.training and self._lora_slots[slot] else None
                prompts.append(self.former.single(slot, patches[start:start + size], context, adapt))
            start += size
        index = torch.arange(images.shape[0], device=images.device)
        feats = self.backbone.encode_image_prompted(images, torch.cat(prompts), index)
        return F.normalize(feats.float(), dim=-1)

    def lora_adapter(self, slot: int):
        """``adapt(role, x)`` for the PromptFormer of ``slot``: ``x + x A B`` with that client's factors of ``role``."""
        def adapt(role: str, x: torch.Tensor) -> torch.Tensor:
            index = torch.full(x.shape[:1], slot, device=x.device)
            return x + self.lora_factors[role].delta(x, index).to(x.dtype)
        return adapt

    def flipped(self, images: torch.Tensor) -> torch.Tensor:
        """The images each client's consistency term sees: flipped horizontally with ``flip_probability``, one
        decision per client and step from its step seed (the global torch generator outside the engine)."""
        p = self.settings.flip_probability
        seeds = self.step.seeds
        flags = []
        for position in range(self.clients):
            generator = torch.Generator().manual_seed(seeds[position]) if seeds else None
            flags.append(bool(torch.rand(1, generator=generator) < p))
        mask = [flag for flag, size in zip(flags, self.sample_sizes()) for _ in range(size)]
        mask = torch.tensor(mask, device=images.device).view(-1, 1, 1, 1)
        return torch.where(mask, images.flip(-1), images)

    def image_features(self, batch: dict):
        """Prompted features ``[n, E]``; in training also the frozen tower's features of the flipped images
        ``(prompted, frozen)``."""
        images = batch["image"]
        prompted = self.prompted_features(images)
        if not self.training:
            return prompted
        with torch.no_grad():
            frozen = F.normalize(self.backbone.encode_image(self.flipped(images)).float(), dim=-1)
        return prompted, frozen

    def logits(self, text, image, batch) -> torch.Tensor:
        """``z_c = mean_j tau f . e_{c,j}`` ``[n, C]`` (the text side is the same for every client)."""
        image = image[0] if isinstance(image, tuple) else image
        sims = (self._logit_scale * image) @ text[0].t()  # [n, M]
        counts = self.frozen("counts", image.device)
        class_of = self.frozen("class_of", image.device)
        if bool((counts == counts[0]).all()):
            return sims.view(sims.shape[0], len(counts), -1).mean(-1)
        sums = torch.zeros(sims.shape[0], len(counts), dtype=sims.dtype, device=sims.device)
        return sums.index_add(1, class_of, sims) / counts.to(sims.dtype)

    def loss(self, text, image, batch) -> dict[str, torch.Tensor]:
        """Per client: ``ce`` and ``consistency`` (``alpha`` x (1 - mean cos(prompted, frozen flipped)))."""
        prompted, frozen = image
        logits = self.logits(text, prompted, batch)
        ce = self.client_mean(F.cross_entropy(logits.float(), batch["label"], reduction="none"))
        cosine = F.cosine_similarity(prompted, frozen, dim=-1, eps=1e-7)
        return {"ce": ce, "consistency": self.settings.alpha * (1.0 - self.client_mean(cosine))}


@dataclass(kw_only=True, eq=False)
class FedMVP(TrainedMethod):
    """FedMVP: a PromptFormer (cross-attention of image patches over class-attribute features) makes instance-level
    visual prompts; every client trains it, the server takes the unweighted mean.

    Defaults are the released ones (``Launch_FL.py``, ``config/defaults.py``, ``model/FedMVP.py``): 4 visual
    tokens, 4 heads, GEGLU x4, alpha 10, flip probability 0.5, SGD lr 0.003, momentum 0.9, weight decay 1e-5, cosine
    over the rounds with one schedule per client (``lr_scope: client``, T_max 100 = the release's default rounds).

    Differences from the released code (see docs/methods-fedmvp-fedpha.md): a step per batch (the release steps
    once per round, on the last batch's loss: ``--train.local_steps 1`` is the nearest protocol); logit columns in
    the dataset's class order (the release follows the JSON file's key order); one sentence template for every
    client and target (the release words some datasets per domain, e.g. "a sketch of a ..."); the PromptFormer in
    the run's precision (the release casts it to fp16); each client gets a fresh optimizer every round. The
    release's optional LoRA (``lora_threshold``): a switched client trains it from its next round on (the release's
    switching step already holds the cross-attention); as in the release, evaluation runs without it.
    """

    attributes: Optional[str] = None
    """FedMVP's class attributes: a JSON file {class name: [attribute, ...]} (the release's attributes/<dataset>.json),
    or the folder holding one such file per dataset (<dataset>.json, e.g. caltech101.json; pacs.json for PACS)."""
    sentence: str = "a photo of a {name}, {clause}"
    """How an attribute becomes the sentence the text tower encodes: {name} the class name, {clause} the attribute as
    a "which is / which has ..." clause (the release's wording), {attribute} the attribute as written."""
    context: Literal["sentences", "attributes"] = "sentences"
    """The PromptFormer's keys and values: the sentences' features (the release for most datasets) or the raw
    attributes' (the release for OfficeHome and TerraIncognita)."""
    visual_tokens: int = 4
    """Visual prompt tokens per image (the release's AdaptiveAvgPool1d(4))."""
    heads: int = 4
    """Attention heads of the PromptFormer (4)."""
    ff_mult: int = 4
    """Hidden width of its GEGLU feed-forward block as a multiple of the tower width (4)."""
    alpha: float = 10.0
    """Weight of the consistency term (TRAIN.ALPHA, 10)."""
    flip_probability: float = 0.5
    """Probability that a client's step compares with the frozen features of the flipped images (0.5)."""
    weighted: bool = False
    """Sample-weighted mean instead of the released unweighted one."""
    lora_threshold: Optional[float] = None
    """The release's LoRA for clients that learn fast (0.5: the release, where it is always armed; null: off): a
    client whose loss on the last step of a round is below this trains, from its next round on, LoRA factors on the
    PromptFormer's attention inputs (and the context map) with the cross-attention held; the factors are shared
    like the rest, the switch is the client's own."""
    lora_rank: int = 8
    """Rank of those LoRA factors (the release: 8)."""
    lr: float = 0.003
    """Local SGD learning rate (0.003)."""
    weight_decay: float = 1e-5
    """SGD weight decay (1e-5)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """cosine (the release) or constant."""
    lr_scope: Literal["local", "official", "client"] = "client"
    """client: each client's own cosine over the run, stepped after each of its local epochs (the release)."""
    cosine_epochs: Optional[int] = 100
    """The cosine's T_max in epochs (the release: the rounds, 100 by default; set it to the rounds x local epochs)."""

    client_class = FedMVPClient
    shared_prefixes = ("former.", "lora_factors.")
    frozen_image_tower = False
    image_inputs = ()

    def build_aggregator(self) -> Aggregator:
        # the reduce path needs whole states shared; the LoRA switch keeps two local keys per client
        return WeightedMean(self.shared_prefixes, weighted=self.weighted, reduce=self.lora_threshold is None)

    # ------------------------------------------------------------------------------------- attribute files
    def attribute_file(self, dataset: str) -> Path:
        """The attribute file of ``dataset``: ``attributes`` itself, or in a folder ``<dataset>.json`` (or the
        release's file name for it, e.g. pacs.json for pacs-mini)."""
        path = Path(self.attributes).expanduser()
        if not path.is_dir():
            return path
        candidates = [dataset] if dataset else []
        normal = "".join(ch for ch in dataset.lower() if ch.isalnum())
        candidates += [stem for prefix, stem in RELEASE_STEMS.items() if normal.startswith(prefix)]
        for stem in candidates:
            if (path / f"{stem}.json").is_file():
                return path / f"{stem}.json"
        return path / f"{candidates[0] if candidates else 'attributes'}.json"

    def attribute_source(self, classnames: list[str]) -> tuple[Path, str]:
        """The attribute file and dataset of a class list (from :meth:`prepare_data`; a single file otherwise)."""
        known = getattr(self, "_sources", {}).get(tuple(classnames))
        return known if known is not None else (self.attribute_file(""), "")

    def prepare_data(self, splits, eval_sets: list) -> None:
        """Find and check the attribute file of every class list the run scores (each client's, each evaluation
        set's): one error line naming the file, the dataset and a class without attributes."""
        lists: dict[tuple, str] = {}
        for client in splits.clients:
            lists.setdefault(tuple(client.classnames or splits.classnames), client.dataset or splits.source.name)
        for eval_set in eval_sets:
            lists.setdefault(tuple(eval_set.classnames), eval_set.dataset)
        self._sources = {names: (self.attribute_file(dataset), dataset) for names, dataset in lists.items()}
        for names, (path, dataset) in self._sources.items():
            class_attributes(path, list(names), dataset)

    def check(self):
        if not self.attributes:
            raise FedPromptError("method.attributes is not set: give FedMVP's class attributes, a JSON file {class: "
                                 "[attributes]} (the release's attributes/<dataset>.json) or the folder holding them.")
        try:
            self.sentence.format(name="x", clause="y", attribute="z")
        except (KeyError, IndexError, ValueError) as err:
            raise FedPromptError(f"method.sentence {self.sentence!r}: only {{name}}, {{clause}} and {{attribute}} may "
                                 f"appear ({err}).") from None
        if "{name}" not in self.sentence or not ("{clause}" in self.sentence or "{attribute}" in self.sentence):
            raise FedPromptError(f"method.sentence {self.sentence!r} must hold {{name}} and {{clause}} (or "
                                 "{attribute}).")
        if self.context not in ("sentences", "attributes"):
            raise FedPromptError(f"method.context: use sentences or attributes, got {self.context!r}")
        if min(self.visual_tokens, self.heads, self.ff_mult) < 1:
            raise FedPromptError(f"method.visual_tokens, method.heads and method.ff_mult must be >= 1, got "
                                 f"{self.visual_tokens}, {self.heads}, {self.ff_mult}")
        if not (0 <= self.flip_probability <= 1 and self.alpha >= 0):
            raise FedPromptError(f"method.flip_probability must be in [0, 1] and method.alpha >= 0, got "
                                 f"{self.flip_probability} and {self.alpha}")
        if self.lora_threshold is not None and not math.isfinite(self.lora_threshold):
            raise FedPromptError(f"method.lora_threshold must be a finite loss value (the release: 0.5) or null, got "
                                 f"{self.lora_threshold}")
        if self.lora_rank < 1:
            raise FedPromptError(f"method.lora_rank must be >= 1, got {self.lora_rank}")
