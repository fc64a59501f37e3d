"""The client module shared by every method: what a method writes, and what the base class and the engine own.

A :class:`PromptClient` is a ``LightningModule`` that owns only learnable prompt tensors, for ``slots`` clients at
once: every persistent tensor has a leading *client dimension* (slot ``k`` holds one client's prompts), so the
engine (:mod:`fedprompt.federation.engine`) can train K clients of a round in lock-step: one image-tower call on the
K batches concatenated, one text-encoder call on every client's prompts, one optimizer step over the stacked
parameters. The frozen backbone is held as a plain attribute (not a registered submodule), so the module's state is
exactly the prompt state; :meth:`PromptClient.slot_state` and :meth:`PromptClient.load_slot` move one client's state
(the same keys, without the client dimension) in and out of a slot.

**What a method writes** (its math, for the clients taking part in a step, "the active clients"):

- ``__init__``: its prompt tensors, created with ``slots=self.slots`` (e.g. :class:`fedprompt.prompts.ContextVectors`),
  from its settings ``self.settings`` (the :class:`~fedprompt.methods.method.Method` dataclass);
- :meth:`text_features`: the text side of the active clients, leading dimension A (e.g. ``[A, C, E]``), always the
  same shape in training and evaluation;
- :meth:`image_features`: per sample (the frozen tower or cached ``features`` / ``tokens`` by default);
- :meth:`logits`: ``[n, C]`` for a batch whose samples belong to different active clients;
- optionally :meth:`extra_loss` (a per-client term) or :meth:`loss` (the whole per-client training loss).

**The helpers it uses** instead of handling slots, owners, devices or timers:

- :meth:`active`: a stacked prompt tensor ``[slots, ...]`` -> the active clients' values ``[A, ...]``;
- :meth:`encode_context`: context vectors ``[A, *P, n_ctx, D]`` -> L2-normalised text features ``[A, *P, C, E]``
  against the current class list; :meth:`encode_visual`: its twin for visual prompt tokens in a ViT tower;
- :meth:`set_active`: write the active clients' values ``[A, ...]`` into a per-slot buffer ``[slots, ...]`` (state
  kept per client that is not trained; :meth:`active` reads it back);
- :meth:`per_sample`: ``[A, ...]`` -> ``[n, ...]``, each sample's own client's value; :meth:`client_mean` and
  :meth:`client_sum`: per-sample values ``[n]`` -> per-client means and sums ``[A]``; :meth:`client_counts`: the
  samples of each client; :meth:`client_rows` / :meth:`from_client_rows`: per-sample values laid out per client
  ``[R, A, ...]`` and back; :meth:`cosine` and :meth:`clip_logits`: cosine similarity
  and CLIP's scaled logits with each sample's own client's text; :meth:`for_each_client`: one value repeated for
  every active client;
- :meth:`run_per_client`: a network stacked per slot (:class:`fedprompt.prompts.SlotStacked`) on the active clients.

**What the base class owns**: :meth:`training_step` (the parts in order, one loss per active client), evaluation
(:meth:`text_for`, :meth:`predict_logits`), the step's active slots and sample owners (read from the batch: ``slots``
``[A]`` and ``owner`` ``[n]``, the position in ``slots`` of each sample's client; a plain batch belongs to slot 0),
the optimizer (:class:`fedprompt.optim.StackedSGD`), and the section timers the engine installs around the parts.

Clients must stay independent inside a step: never combine two clients' values in one operation whose backward
multiplies one client's values by another's (zero) gradients, since a failing client's NaN would then reach the
others (``NaN * 0 = NaN``); the helpers above gather each sample's own client instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from fedprompt.backbone import Backbone
from fedprompt.methods.method import Method, OptimizerArgs
from fedprompt.optim import StackedSGD
from fedprompt.prompts import ContextVectors
from fedprompt.timing import NoTimer

State = dict[str, torch.Tensor]


def segment_mean(values: torch.Tensor, owner: torch.Tensor, groups: int,
                 counts: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group means ``[groups]`` of per-sample ``values`` ``[n]`` (group of sample i: ``owner[i]``); ``counts``
    ``[groups]``, the samples per group, when known (no bincount)."""
    sums = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add(0, owner, values)
    if counts is None:
        counts = torch.bincount(owner, minlength=groups)
    return sums / counts.clamp_min(1).to(values.dtype)


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
            "owner": torch.zeros(n, dtype=torch.long, device=device), "members": [0], "sizes": [n]}


def total_loss(losses: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Each client's loss ``[A]`` from :meth:`PromptClient.training_step`'s result (the sum of named terms)."""
    if isinstance(losses, dict):
        return sum(losses.values())
    return losses


@dataclass
class Step:
    """The clients taking part in the current step: ``slots`` ``[A]`` (module slots), ``owner`` ``[n]`` (position in
    ``slots`` of each sample's client; ``None`` while only the text side is computed), ``counts`` ``[A]`` (samples
    per client, when the engine knows them) and ``seeds`` (one integer per active client in training: its own seed
    for this local step, a function of the run seed, the round, the client and the step, for methods that draw
    random numbers in a step, e.g. noise; ``None`` outside training). ``members`` and ``sizes``: host copies of
    ``slots`` and ``counts`` (the engine's; ``None`` elsewhere), read through :meth:`PromptClient.host_slots` and
    :meth:`PromptClient.sample_sizes` without a device sync."""

    slots: torch.Tensor
    owner: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    seeds: list[int] | None = None
    members: list[int] | None = None
    sizes: list[int] | None = None

    @property
    def clients(self) -> int:
        return self.slots.shape[0]


class PromptClient(L.LightningModule):
    """Base client: prompt parameters of ``slots`` clients over the shared frozen backbone (see the module
    docstring for what a method writes and what the base class owns).

    Args:
        backbone: the frozen backbone shared by every client of this process.
        classnames: class names in label order.
        settings: the method (its dataclass fields are the settings the client reads).
        slots: how many clients this module holds (the client dimension of every prompt tensor).
    """

    #: whether :meth:`set_classes` may point the module at another class list (False when a prompt tensor has a
    #: class dimension, e.g. CoOp's class-specific context)
    switchable_classes = True
    #: the sentence around the learnable context: ``{ctx}`` the ``n_ctx`` placeholders, ``{name}`` the class name
    prompt_template = "{ctx} {name}."
    #: learnable context tokens per prompt (set by the client; ``None``: the client has no prompt sentence)
    n_ctx: int | None = None
    #: state keys whose size along one dimension differs between clients (FedPHA's local prompts of per-client
    #: lengths): key -> that dimension of one client's tensor (no client dimension). A slot holds the largest size;
    #: a client's state holds its own, and :meth:`load_slot` / :meth:`slot_state` pad and cut (see
    #: :meth:`slot_lengths`)
    ragged: dict[str, int] = {}

    def __init__(self, backbone: Backbone, classnames: list[str], settings: Method, slots: int = 1):
        super().__init__()
        self.__dict__["backbone"] = backbone  # a reference, not a submodule: state_dict() holds prompts only
        self.classnames = list(classnames)
        self.settings = settings
        self.slots = int(slots)
        self.timer = NoTimer()  # the engine installs the round benchmark's SectionTimer
        self._logit_scale = backbone.logit_scale  # frozen: read once (a device sync on GPU)
        self._step: Step | None = None

    @property
    def optim(self) -> OptimizerArgs:
        """The local optimiser settings (of a :class:`~fedprompt.methods.method.TrainedMethod`)."""
        return self.settings.optim

    # ------------------------------------------------------------------------------------------ slot state
    def slot_state(self, slot: int) -> State:
        """A detached CPU copy of the state of the client in ``slot`` (keys as in ``state_dict``, no client dim; a
        :attr:`ragged` key cut to the client's own size)."""
        state = {k: v[slot].detach().to("cpu", copy=True) for k, v in self.state_dict().items()}
        for key, dim in self.ragged.items():
            state[key] = state[key].narrow(dim, 0, self._ragged_sizes(key)[slot]).clone()
        return state

    @torch.no_grad()
    def load_slot(self, slot: int, state: State) -> None:
        """Put one client's ``state`` (as returned by :meth:`slot_state`) into ``slot`` (a :attr:`ragged` key's
        tensor fills the first rows of its dimension, the rest of the slot is zero)."""
        own = self.state_dict(keep_vars=True)
        if set(own) != set(state):
            raise KeyError(f"client state keys {sorted(state)} do not match the method's {sorted(own)}")
        for key, tensor in own.items():
            if key in self.ragged:
                dim = self.ragged[key]
                size = state[key].shape[dim]
                tensor[slot].zero_()
                tensor[slot].narrow(dim, 0, size).copy_(state[key])
                self._ragged_sizes(key)[slot] = size
            else:
                tensor[slot].copy_(state[key])

    def _ragged_sizes(self, key: str) -> list[int]:
        """The size of each slot's client along the ragged dimension of ``key`` (host; the full size until a client
        is loaded)."""
        sizes = self.__dict__.setdefault("_ragged", {})
        if key not in sizes:
            full = self.state_dict(keep_vars=True)[key].shape[1 + self.ragged[key]]
            sizes[key] = [full] * self.slots
        return sizes[key]

    def slot_lengths(self, key: str) -> list[int]:
        """The active clients' own sizes along the :attr:`ragged` dimension of ``key`` (host integers)."""
        sizes = self._ragged_sizes(key)
        return [sizes[slot] for slot in self.host_slots()]

    def all_slots(self) -> torch.Tensor:
        return torch.arange(self.slots, device=self.device)

    def init_words(self, phrase: str | None) -> torch.Tensor | None:
        """The token embeddings ``[n, D]`` (on the CPU) of an initialisation phrase such as ``"a photo of a"``
        (``ctx_init``), or ``None`` for none (random initialisation)."""
        return self.backbone.word_embeddings(phrase).cpu() if phrase else None

    # ----------------------------------------------------------------------------------------- class lists
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

    # ------------------------------------------------------------------------------------- the active clients
    @property
    def step(self) -> Step:
        """The clients of the current step (outside a step: every slot, no samples)."""
        if self._step is None:
            return Step(self.all_slots())
        return self._step

    @contextmanager
    def stepping(self, slots: torch.Tensor, owner: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                 seeds: list[int] | None = None, members: list[int] | None = None, sizes: list[int] | None = None):
        """Run the parts for the clients in ``slots`` (and the samples of ``owner``) inside the block."""
        previous, self._step = self._step, Step(slots, owner, counts, seeds, members, sizes)
        try:
            yield self._step
        finally:
            self._step = previous

    def stepping_for(self, batch: dict):
        """The step block of an engine batch (its ``slots``, ``owner``, ``counts`` and ``seeds``): the block
        :meth:`training_step` runs the parts in, and the engine runs :meth:`backward` in."""
        return self._batch_step(batch)[1]

    def _batch_step(self, batch: dict):
        batch = with_owners(batch, self.device)
        return batch, self.stepping(batch["slots"], batch["owner"], batch.get("counts"), batch.get("seeds"),
                                    batch.get("members"), batch.get("sizes"))

    # ------------------------------------------------------------------------------------------- helpers
    def active(self, stacked: torch.Tensor) -> torch.Tensor:
        """The active clients' values ``[A, ...]`` of a stacked prompt tensor ``[slots, ...]``."""
        return stacked[self.step.slots]

    @property
    def clients(self) -> int:
        """The number of active clients A."""
        return self.step.clients

    def host_slots(self) -> list[int]:
        """The active clients' module slots as host integers (the engine's copy; otherwise read from the device)."""
        step = self.step
        return list(step.members) if step.members is not None else step.slots.tolist()

    def sample_sizes(self) -> list[int]:
        """The number of samples of each active client (host integers; the engine's copy, else read from the
        device). A step's samples are grouped by client, in the order of the active clients."""
        step = self.step
        if step.sizes is not None:
            return list(step.sizes)
        if step.counts is not None:
            return step.counts.tolist()
        return torch.bincount(step.owner, minlength=step.clients).tolist()

    def for_each_client(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` (the same for every client) with a leading client dimension: ``[A, *value.shape]``."""
        return value.expand(self.clients, *value.shape)

    def per_sample(self, values: torch.Tensor) -> torch.Tensor:
        """Each sample's own client's value: ``[A, ...]`` -> ``[n, ...]``."""
        return values[self.step.owner]

    def client_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-client means ``[A]`` of per-sample values ``[n]``."""
        step = self.step
        return segment_mean(values, step.owner, step.clients, step.counts)

    def client_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-client sums ``[A, ...]`` of per-sample values ``[n, ...]``."""
        step = self.step
        return torch.zeros(step.clients, *values.shape[1:], dtype=values.dtype, device=values.device).index_add(
            0, step.owner, values)

    def client_counts(self) -> torch.Tensor:
        """The samples of each active client in this step ``[A]``."""
        step = self.step
        return step.counts if step.counts is not None else torch.bincount(step.owner, minlength=step.clients)

    def client_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample values ``[n, ...]`` laid out per client: ``[R, A, ...]``, row j of client a its j-th sample
        (R: the most samples of any active client; zeros past a client's last sample), so that one batched operation
        meets every client's j-th sample at once (DP-FPL's per-example gradients). :meth:`from_client_rows` is the
        inverse."""
        position, rows = self._row_positions()
        out = torch.zeros(rows, self.clients, *values.shape[1:], dtype=values.dtype, device=values.device)
        out[position, self.step.owner] = values
        return out

    def from_client_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-sample values ``[n, ...]`` from their per-client layout ``[R, A, ...]`` (:meth:`client_rows`)."""
        position, _ = self._row_positions()
        return rows[position, self.step.owner]

    def _row_positions(self) -> tuple[torch.Tensor, int]:
        """Each sample's position among its own client's samples ``[n]``, and the most samples of any client."""
        owner = self.step.owner
        position = (F.one_hot(owner, self.clients).cumsum(0) - 1).gather(1, owner.unsqueeze(1)).squeeze(1)
        return position, int(position.max()) + 1

    @torch.no_grad()
    def set_active(self, buffer: torch.Tensor, values: torch.Tensor) -> None:
        """The per-client buffer helper: write the active clients' values ``[A, ...]`` into a per-slot buffer
        ``[slots, ...]`` in place (state a client keeps that is not trained, e.g. ProDA's prompt sampler), leaving
        the other slots as they are; :meth:`active` reads them."""
        buffer.index_copy_(0, self.step.slots, values.to(buffer.dtype))

    def encode_context(self, ctx: torch.Tensor, class_specific: bool = False,
                       deep: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised fp32 text features ``[A, *P, C, E]`` of context vectors ``ctx`` ``[A, *P, n_ctx, D]`` (or
        ``[A, *P, C, n_ctx, D]`` with ``class_specific``) placed into the current class list's prompt sentences
        (:attr:`prompt_template`), every client and prompt in one text-encoder call. ``deep`` ``[A, *P, J - 1,
        n_ctx, D]``: deep text prompts replacing the context rows before each of text layers 1 .. J - 1 (MaPLe,
        IVLP; see :meth:`fedprompt.backbone.Backbone.encode_prompts`)."""
        feats = self.backbone.encode_prompts(self.frozen("tokens", ctx.device), ctx, class_specific=class_specific,
                                             deep=deep)
        return F.normalize(feats.float(), dim=-1)

    def sentence_tokens(self, classnames: list[str], n_ctx: int):
        """The frozen prompt sentences of ``classnames`` with ``n_ctx`` context tokens (:attr:`prompt_template`); a
        method may change them (FedPHA's ``compat: official`` pooling position)."""
        return self.backbone.prompt_tokens(classnames, n_ctx, template=self.prompt_template)

    def tokens_with(self, n_ctx: int, device: torch.device | None = None):
        """:meth:`sentence_tokens` of the current class list with ``n_ctx`` context tokens, computed once per class
        list and length (and moved once per device)."""
        cache = self.__dict__.setdefault("_length_tokens", {})
        key = (tuple(self.classnames), n_ctx)
        if key not in cache:
            cache[key] = self.sentence_tokens(self.classnames, n_ctx)
        if device is None:
            return cache[key]
        if (key, device) not in cache:
            cache[(key, device)] = cache[key].to(device)
        return cache[(key, device)]

    def encode_lengths(self, ctx: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """:meth:`encode_context` for clients whose contexts have their own lengths: ``ctx`` ``[A, *P, L, D]`` where
        client a's context is its first ``lengths[a]`` rows (the rest is ignored) -> L2-normalised fp32 features
        ``[A, *P, C, E]``; each client's sentences hold exactly its own number of context tokens. One encoder call
        per distinct length; each client's features come from its own rows only."""
        groups: dict[int, list[int]] = {}
        for position, length in enumerate(lengths):
            groups.setdefault(int(length), []).append(position)
        parts, order = [], []
        for length, members in groups.items():
            rows = ctx if len(groups) == 1 else ctx.index_select(0, torch.tensor(members, device=ctx.device))
            parts.append(self.backbone.encode_prompts(self.tokens_with(length, ctx.device), rows[..., :length, :]))
            order += members
        feats = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.tensor(order).argsort().to(ctx.device)]
        return F.normalize(feats.float(), dim=-1)

    def encode_visual(self, images: torch.Tensor, tokens: torch.Tensor, of_active: bool = False) -> torch.Tensor:
        """L2-normalised fp32 image features ``[n, G, E]``: each image with each of the G visual prompt sets of its
        own client, from stacked tokens ``[slots, G, (depth,) V, width]``, in one image-tower call. ``of_active``:
        ``tokens`` already hold the active clients' values ``[A, G, ...]`` (tokens computed from their prompts, e.g.
        MaPLe's coupling)."""
        if not of_active:
            tokens = self.active(tokens)
        groups = tokens.shape[1]
        index = self.backbone.group_index(self.step.owner, groups)  # [G, n]
        feats = self.backbone.encode_image_prompted(images, tokens.flatten(0, 1), index)
        return F.normalize(feats.float(), dim=-1).transpose(0, 1)

    def run_per_client(self, network, *inputs: torch.Tensor) -> torch.Tensor:
        """A network stacked per slot (:class:`fedprompt.prompts.SlotStacked`) applied, for each active client, to
        its inputs (each with leading dimension A)."""
        return network(self.step.slots, *inputs)

    def cosine(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``cos(image, text)`` ``[n, C]`` for L2-normalised image features ``[n, E]`` and each sample's own client's
        L2-normalised text features (``text``: ``[A, C, E]``)."""
        return per_owner_matmul(image, text, self.step.owner)

    def clip_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """CLIP's logits ``logit_scale * cos(image, text)`` ``[n, C]`` (see :meth:`cosine`)."""
        return self._logit_scale * self.cosine(image, text)

    # ---------------------------------------------------------------------------------------------- parts
    def text_features(self) -> Any:
        """The text side of the active clients, leading dimension A (e.g. L2-normalised ``[A, C, E]``)."""
        raise NotImplementedError

    def image_features(self, batch: dict) -> torch.Tensor:
        """L2-normalised pooled image features ``[n, E]`` (precomputed ``features`` are used when present)."""
        features = batch.get("features")
        if features is None:
            with torch.no_grad():
                features = self.backbone.encode_image(batch["image"])
        return F.normalize(features.float(), dim=-1)

    def image_tokens(self, batch: dict) -> torch.Tensor:
        """L2-normalised projected patch tokens ``[n, M, E]`` (precomputed ``tokens`` are used when present)."""
        tokens = batch.get("tokens")
        if tokens is None:
            with torch.no_grad():
                _, tokens = self.backbone.encode_image_tokens(batch["image"])
        return F.normalize(tokens.float(), dim=-1)

    def logits(self, text: Any, image: torch.Tensor, batch: dict) -> torch.Tensor:
        """Logits ``[n, C]``, each sample scored with its own client's text side; by default
        :meth:`clip_logits` for text features ``[A, C, E]``."""
        return self.clip_logits(image, text)

    def extra_loss(self, batch: dict, logits: torch.Tensor, text: Any) -> torch.Tensor | None:
        """An additional loss term per active client ``[A]`` (FedProx's proximal term, FedPGP's contrastive loss)."""
        return None

    def loss(self, text: Any, image: torch.Tensor, batch: dict) -> torch.Tensor | dict[str, torch.Tensor]:
        """The training loss of each active client ``[A]``: the mean cross-entropy of :meth:`logits` over its
        samples plus :meth:`extra_loss`. A method may return named per-client terms instead (``{"ce": [A], "kd":
        [A]}``): their sum is the client's loss, and :meth:`backward` receives them separately."""
        logits = self.logits(text, image, batch)
        per_sample = F.cross_entropy(logits.float(), batch["label"], reduction="none")
        loss = self.client_mean(per_sample)
        extra = self.extra_loss(batch, logits, text)
        return loss if extra is None else loss + extra

    # ---------------------------------------------------------------------------------------------- steps
    def _parts(self, batch: dict, text: Any = None) -> tuple[Any, torch.Tensor]:
        """The text side (unless given) and the image side of a step, each in its timer section."""
        if text is None:
            with self.timer.section("text"):
                text = self.text_features()
        with self.timer.section("image"):
            image = self.image_features(batch)
        return text, image

    def forward(self, batch: dict) -> torch.Tensor:
        batch, step = self._batch_step(batch)
        with step:
            text, image = self._parts(batch)
            with self.timer.section("logits"):
                return self.logits(text, image, batch)

    def training_step(self, batch: dict, batch_idx: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
        """One loss per active client ``[A]`` (or named per-client terms, see :meth:`loss`); the engine hands them to
        :meth:`backward`, which sums them, so every client's gradient is exactly its own."""
        batch, step = self._batch_step(batch)
        with step:
            text, image = self._parts(batch)
            with self.timer.section("logits"):
                return self.loss(text, image, batch)

    @torch.no_grad()
    def text_for(self, slots: torch.Tensor) -> Any:
        """The text side of the clients in ``slots`` (computed once per evaluation and passed to
        :meth:`predict_logits`)."""
        with self.stepping(slots):
            return self.text_features()

    @torch.no_grad()
    def predict_logits(self, batch: dict, text: Any = None) -> torch.Tensor:
        """Logits for evaluation; ``text`` (from :meth:`text_for` of ``batch["slots"]``) can be passed to reuse it
        across the batches of an evaluation."""
        batch, step = self._batch_step(batch)
        with step:
            text, image = self._parts(batch, text)
            return self.logits(text, image, batch)

    def backward(self, losses: torch.Tensor | dict[str, torch.Tensor], backward) -> None:
        """Fill the prompt tensors' gradients from this step's losses (what :meth:`training_step` returned);
        ``backward(tensor, **kwargs)`` is Fabric's precision-aware backward. The default is one backward of the sum
        over clients (and terms).

        A method that must shape its gradients (ProGrad's projection of one term's gradient against another's)
        overrides this: e.g. ``backward(terms["kd"].sum(), retain_graph=True)``, keep the ``.grad`` of the
        parameters, zero them, ``backward(terms["ce"].sum())``, then combine per client along the leading slot
        dimension. A slot's gradient only ever depends on its own client's terms, so a per-slot transform keeps the
        clients independent (never mix slots)."""
        backward(total_loss(losses).sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD over the stacked parameters; each step updates only the active clients' slices, each with its own
        learning rate (:class:`fedprompt.optim.StackedSGD`)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return StackedSGD(params, lr=self.optim.lr, momentum=self.optim.momentum,
                          weight_decay=self.optim.weight_decay)

    def on_round_start(self, global_state: State | None) -> None:
        """Hook called after the clients' states were loaded into their slots and before local training."""


class GlobalLocalClient(PromptClient):
    """Clients with two prompts of ``settings.n_ctx`` vectors (both from ``settings.ctx_init``, or random):
    ``global_prompt.ctx`` (shared by the federation) and ``local_prompt.ctx`` (kept by the client). FedOTP and
    PromptFolio build on it; the method's aggregator decides which one is shared."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        words = self.init_words(settings.ctx_init)
        self.n_ctx = settings.n_ctx
        self.global_prompt = ContextVectors(settings.n_ctx, backbone.ctx_dim, words=words, slots=slots)
        self.local_prompt = ContextVectors(settings.n_ctx, backbone.ctx_dim, words=words, slots=slots)

    def prompts(self) -> torch.Tensor:
        """``[A, 2, n_ctx, D]``: each active client's global prompt (index 0) and local prompt (index 1)."""
        return self.active(torch.stack([self.global_prompt.ctx, self.local_prompt.ctx], dim=1))
