"""The client abstraction shared by every method.

A :class:`PromptClient` is a ``LightningModule`` that owns only learnable prompt tensors, for ``slots`` clients at
once: every persistent tensor has a leading *client dimension* (slot ``k`` holds one client's prompts), so the
engine (:mod:`fedprompt.federation.engine`) can train K clients of a round in lock-step: one image-tower call on the
K batches concatenated, one text-encoder call on every client's prompts, one optimizer step over the stacked
parameters. The frozen backbone is held as a plain attribute (not a registered submodule), so the module's state is
exactly the prompt state; :meth:`PromptClient.slot_state` and :meth:`PromptClient.load_slot` move one client's state
(the same keys, without the client dimension) in and out of a slot.

A method describes ONE step of its clients on tensors with a leading client dimension, in three parts:

- :meth:`PromptClient.text_features` for the active slots (e.g. ``[A, C, E]``, FedOTP ``[A, 2, C, E]``);
- :meth:`PromptClient.image_features` per sample (the frozen tower, or cached ``features`` / ``tokens``);
- :meth:`PromptClient.logits` for a batch whose samples belong to different clients (``batch["owner"]``).

Batches seen by a client are dicts with

- ``image`` ``[n, 3, H, W]`` (or cached ``features`` ``[n, E]`` / ``tokens`` ``[n, M, E]``) and ``label`` ``[n]``;
- ``slots`` ``[A]``: the slots taking part in this step, and ``owner`` ``[n]``: for each sample, the position of its
  client in ``slots`` (so ``text[owner]`` is each sample's text side).

A plain batch without ``slots``/``owner`` is read as belonging to slot 0 (convenient with ``slots=1``).

Clients must stay independent inside a step: never combine two clients' values in one operation whose backward
multiplies one client's values by another's (zero) gradients, since a failing client's NaN would then reach the
others (``NaN * 0 = NaN``); gather each sample's own client instead (``text[batch["owner"]]``).

A :class:`~fedprompt.methods.method.Method` is the config object a YAML selects with ``class_path``
(:mod:`fedprompt.methods.method`, importable without Lightning so that the command line starts fast).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from fedprompt.backbone import Backbone
from fedprompt.federation.engine import NoTimer, StackedSGD
from fedprompt.methods.method import OptimizerArgs

State = dict[str, torch.Tensor]


def segment_mean(values: torch.Tensor, owner: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group means ``[groups]`` of per-sample ``values`` ``[n]`` (group of sample i: ``owner[i]``)."""
    sums = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add(0, owner, values)
    counts = torch.bincount(owner, minlength=groups).clamp_min(1).to(values.dtype)
    return sums / counts


def per_owner_matmul(image: torch.Tensor, text: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``out[i] = text[owner[i]] @ image[i]`` for image ``[n, E]`` and text ``[A, C, E]``: ``[n, C]``.

    Each sample meets only its own client's text, forward and backward. (A dense product against every client's
    text would be faster, but its backward multiplies every image by the other clients' zero gradients, and
    ``NaN * 0 = NaN`` would carry one failing client's NaN into the others' gradients.)"""
    if text.shape[0] == 1:
        return image @ text[0].t()
    return torch.einsum("ne,nce->nc", image, text[owner])


def with_owners(batch: dict, device: torch.device | None = None) -> dict:
    """``batch`` with ``slots`` and ``owner`` filled in (slot 0 for every sample) when it has none."""
    if "owner" in batch:
        return batch
    label = batch.get("label")
    n = next(v.shape[0] for k, v in batch.items() if k in ("image", "features", "tokens"))
    device = device or (label.device if isinstance(label, torch.Tensor) else None)
    return {**batch, "slots": torch.zeros(1, dtype=torch.long, device=device),
            "owner": torch.zeros(n, dtype=torch.long, device=device)}


class PromptClient(L.LightningModule):
    """Base client: prompt parameters of ``slots`` clients over the shared frozen backbone.

    Subclasses create their parameters with a leading dimension of size ``slots`` (every slot starting from the same
    initial value, the server's initialisation) and implement :meth:`text_features` and :meth:`logits` (and
    :meth:`image_features` when they read more than the pooled feature); :meth:`extra_loss` adds a per-client term.
    :meth:`training_step` returns one loss per active client: the engine sums them, so every client's gradient is
    exactly its own.

    Args:
        backbone: the frozen backbone shared by every client of this process.
        classnames: class names in label order.
        optim: local optimiser settings.
        slots: how many clients this module holds (the client dimension of every prompt tensor).
    """

    def __init__(self, backbone: Backbone, classnames: list[str], optim: OptimizerArgs | None = None,
                 slots: int = 1):
        super().__init__()
        self.__dict__["backbone"] = backbone  # a reference, not a submodule: state_dict() holds prompts only
        self.classnames = list(classnames)
        self.optim = optim or OptimizerArgs()
        self.slots = int(slots)
        self.timer = NoTimer()  # the round benchmark installs a SectionTimer
        self._logit_scale = backbone.logit_scale  # frozen: read once (a device sync on GPU)

    # ------------------------------------------------------------------------------------------ slot state
    def slot_state(self, slot: int) -> State:
        """A detached CPU copy of the state of the client in ``slot`` (keys as in ``state_dict``, no client dim)."""
        return {k: v[slot].detach().to("cpu", copy=True) for k, v in self.state_dict().items()}

    @torch.no_grad()
    def load_slot(self, slot: int, state: State) -> None:
        """Put one client's ``state`` (as returned by :meth:`slot_state`) into ``slot``."""
        own = self.state_dict(keep_vars=True)
        if set(own) != set(state):
            raise KeyError(f"client state keys {sorted(state)} do not match the method's {sorted(own)}")
        for key, tensor in own.items():
            tensor[slot].copy_(state[key])

    def all_slots(self) -> torch.Tensor:
        return torch.arange(self.slots, device=self.device)

    # ----------------------------------------------------------------------------------------- class lists
    #: whether :meth:`set_classes` may point the module at another class list (False when a prompt tensor has a
    #: class dimension, e.g. CoOp's class-specific context)
    switchable_classes = True

    #: the sentence around the learnable context: ``{ctx}`` the ``n_ctx`` placeholders, ``{name}`` the class name
    prompt_template = "{ctx} {name}."
    #: learnable context tokens per prompt (set by the client; ``None``: the client has no prompt sentence)
    n_ctx: int | None = None

    def class_data(self, classnames: list[str]) -> dict[str, Any]:
        """The frozen data this method derives from a class list, read with :meth:`frozen`; computed once per class
        list. By default the ``tokens`` of :attr:`prompt_template` with ``n_ctx`` placeholders; methods add their
        own entries (``{**super().class_data(classnames), ...}``)."""
        if self.n_ctx is None:
            return {}
        return {"tokens": self.backbone.prompt_tokens(classnames, self.n_ctx, template=self.prompt_template)}

    def set_classes(self, classnames: list[str]) -> None:
        """Point the module at another class list (the prompts do not depend on it; see ``switchable_classes``)."""
        if list(classnames) != self.classnames and not self.switchable_classes:
            raise ValueError(f"{type(self).__name__} has class-specific tensors: build one module per class list")
        self.classnames = list(classnames)

    @property
    def tokens(self):
        """The prompt token data of the current class list (methods whose :meth:`class_data` has ``"tokens"``)."""
        return self.frozen("tokens")

    def frozen(self, name: str, device: torch.device | None = None):
        """The frozen per-class-list value ``name`` of :meth:`class_data` for the current class list, on ``device``
        (moved once and kept)."""
        cache = self.__dict__.setdefault("_frozen", {})
        names = tuple(self.classnames)
        if (names, None) not in cache:
            cache[(names, None)] = self.class_data(self.classnames)
        value = cache[(names, None)][name]
        if device is None:
            return value
        if (names, name, device) not in cache:
            cache[(names, name, device)] = value.to(device)
        return cache[(names, name, device)]

    # ---------------------------------------------------------------------------------------------- parts
    def text_features(self, slots: torch.Tensor | None = None) -> Any:
        """The text side of the clients in ``slots`` ``[A]`` (default: every slot), with leading dimension A
        (e.g. L2-normalised ``[A, C, E]``)."""
        raise NotImplementedError

    def image_features(self, batch: dict) -> torch.Tensor:
        """L2-normalised pooled image features ``[n, E]`` (precomputed ``features`` are used when present)."""
        features = batch.get("features")
        if features is None:
            with torch.no_grad(), self.timer.section("image"):
                features = self.backbone.encode_image(batch["image"])
        return F.normalize(features.float(), dim=-1)

    def image_tokens(self, batch: dict) -> torch.Tensor:
        """L2-normalised projected patch tokens ``[n, M, E]`` (precomputed ``tokens`` are used when present)."""
        tokens = batch.get("tokens")
        if tokens is None:
            with torch.no_grad(), self.timer.section("image"):
                _, tokens = self.backbone.encode_image_tokens(batch["image"])
        return F.normalize(tokens.float(), dim=-1)

    def logits(self, text: Any, image: torch.Tensor, batch: dict) -> torch.Tensor:
        """Logits ``[n, C]``: sample ``i`` is scored with the text side of client ``batch["owner"][i]``.

        The default is CLIP's ``logit_scale * cos(image, text)`` for text features ``[A, C, E]``."""
        return self._logit_scale * per_owner_matmul(image, text, batch["owner"])

    def extra_loss(self, batch: dict, logits: torch.Tensor, text: Any) -> torch.Tensor | None:
        """An additional loss term per active client ``[A]`` (FedProx's proximal term, FedPGP's contrastive loss)."""
        return None

    # ---------------------------------------------------------------------------------------------- steps
    def forward(self, batch: dict) -> torch.Tensor:
        batch = with_owners(batch, self.device)
        with self.timer.section("text"):
            text = self.text_features(batch["slots"])
        image = self.image_features(batch)
        with self.timer.section("logits"):
            return self.logits(text, image, batch)

    def training_step(self, batch: dict, batch_idx: int = 0) -> torch.Tensor:
        """One loss per active client ``[A]``: its mean cross-entropy over its samples plus :meth:`extra_loss`."""
        batch = with_owners(batch, self.device)
        with self.timer.section("text"):
            text = self.text_features(batch["slots"])
        image = self.image_features(batch)
        with self.timer.section("logits"):
            logits = self.logits(text, image, batch)
            per_sample = F.cross_entropy(logits.float(), batch["label"], reduction="none")
            loss = segment_mean(per_sample, batch["owner"], batch["slots"].shape[0])
            extra = self.extra_loss(batch, logits, text)
        return loss if extra is None else loss + extra

    @torch.no_grad()
    def predict_logits(self, batch: dict, text: Any = None) -> torch.Tensor:
        """Logits for evaluation; ``text`` (from :meth:`text_features` of ``batch["slots"]``) can be passed to reuse
        it across the batches of an evaluation."""
        batch = with_owners(batch, self.device)
        if text is None:
            text = self.text_features(batch["slots"])
        return self.logits(text, self.image_features(batch), batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD over the stacked parameters; each step updates only the active clients' slices, each with its own
        learning rate (:class:`fedprompt.federation.engine.StackedSGD`)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return StackedSGD(params, lr=self.optim.lr, momentum=self.optim.momentum,
                          weight_decay=self.optim.weight_decay)

    def on_round_start(self, global_state: State | None) -> None:
        """Hook called after the clients' states were loaded into their slots and before local training."""
