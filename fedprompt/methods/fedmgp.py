"""FedMGP (Bo et al., NeurIPS 2025): multi-group text and visual prompts, a diversity loss between the groups, and
similarity-guided aggregation of a few groups per client.

Paper: "FedMGP: Personalized Federated Learning with Multi-Group Text-Visual Prompts" (arXiv 2511.00480; official
code weihao-bo/FedMGP). This module holds the method's pure functions, its server rule, its client module
(:class:`FedMGPClient`) and the method (:class:`FedMGP`):

- prompt state: text groups ``text_prompts.ctx`` [G_t, n_ctx, D] (:func:`init_text_groups`: the embeddings of the
  first words of "a photo of a" plus N(0, 0.01^2) noise per group) and visual groups ``visual_prompts.tokens``
  [G_v, V, width] (:class:`fedprompt.prompts.VisualPrompts`, N(0, 0.02^2));
- features: text features [G_t, C, E] from one :meth:`Backbone.encode_prompts` call, image features [G_v, B, E] from
  one :meth:`Backbone.encode_image_prompted` call;
- logits: :func:`group_logits` pairs text group g with visual group g; :func:`combine_group_logits` and
  :func:`feature_average_logits` give the prediction; the loss is :func:`group_cross_entropy` +
  lambda * :func:`diversity_loss`;
- communication: :class:`FedMGPAggregator` (each client sends s of its groups, chosen by :func:`select_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator
from fedprompt.federation.sampling import derive_seed
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors, VisualPrompts

TEXT_KEY = "text_prompts.ctx"
VISUAL_KEY = "visual_prompts.tokens"
#: separates the group-selection random stream from the other streams derived from the run seed
SELECTION_STREAM = 0x464D4750

DiversityVariant = Literal["paper", "code"]
Distance = Literal["cos", "l1", "l2"]
SelectionMode = Literal["similarity", "random", "fixed"]


# --------------------------------------------------------------------------------------------- initialisation
def init_text_groups(words: torch.Tensor, groups: int, std: float = 0.01,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """FedMGP's text groups [groups, n_ctx, D]: copies of word embeddings ``words`` [n_ctx, D] (e.g. the first two
    tokens of "a photo of a") plus independent N(0, std^2) noise per group (the official code seeds each group with
    123 + g; here one generator seeded from the run's seed draws all groups)."""
    base = words.detach().to(torch.float32)
    noise = torch.randn(groups, *base.shape, generator=generator) * std
    return base.unsqueeze(0) + noise


# ------------------------------------------------------------------------------------------- logits and losses
def _paired(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text groups paired as the official code pairs them: group g with group g; extra text groups with
    visual group 0, extra visual groups with text group 0."""
    n_img, n_txt = image.shape[-3], text.shape[-3]
    if n_img == 0 or n_txt == 0:
        raise FedPromptError("fedmgp: group logits need at least one image-feature group and one text group "
                             "(without visual prompts pass the plain image features as one group).")
    n = max(n_img, n_txt)
    img_idx = torch.tensor([g if g < n_img else 0 for g in range(n)]).to(image.device, non_blocking=True)
    txt_idx = torch.tensor([g if g < n_txt else 0 for g in range(n)]).to(text.device, non_blocking=True)
    return image.index_select(-3, img_idx), text.index_select(-3, txt_idx)


def group_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Per-group logits ``logit_scale * I_g T_g^T``.

    Args:
        image: [*K, G_v, B, E] L2-normalised image features (G_v = 1 with the plain features when there are no visual
            prompts).
        text: [*K, G_t, C, E] L2-normalised text features.
        logit_scale: 100 for OpenAI CLIP.

    Returns:
        [*K, max(G_v, G_t), B, C]: text group g with visual group g; extra text groups use visual group 0 and extra
        visual groups text group 0 (the official pairing).
    """
    image, text = _paired(image, text)
    return logit_scale * torch.einsum("...gbe,...gce->...gbc", image, text)


def combine_group_logits(logits: torch.Tensor,
                         mode: Literal["average", "max_logits", "selected_group"] = "average",
                         group: int = 0) -> torch.Tensor:
    """The prediction [*K, B, C] from group logits [*K, G, B, C].

    ``average`` (default): the mean over groups. ``max_logits``: for each image, the logits of the group whose
    largest class logit is the highest. ``selected_group``: the logits of group ``group``. (``feature_average`` needs
    the features: :func:`feature_average_logits`.)
    """
    if mode == "average":
        return logits.mean(dim=-3)
    if mode == "selected_group":
        return logits.select(-3, group)
    if mode == "max_logits":
        best = logits.amax(dim=-1).argmax(dim=-2)  # [*K, B]
        index = best.unsqueeze(-2).unsqueeze(-1).expand(*best.shape[:-1], 1, best.shape[-1], logits.shape[-1])
        return logits.gather(-3, index).squeeze(-3)
    raise FedPromptError(f"fedmgp inference mode {mode!r}: use average, max_logits, selected_group or "
                         "feature_average.")


def feature_average_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``feature_average`` prediction: ``logit_scale * mean_g(I_g) mean_g(T_g)^T`` from L2-normalised features
    [*K, G_v, B, E] and [*K, G_t, C, E] (the means are not renormalised, as in the official code)."""
    return logit_scale * image.mean(dim=-3) @ text.mean(dim=-3).transpose(-1, -2)


def group_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over groups of each group's cross-entropy: logits [G, B, C], labels [B] -> scalar."""
    groups, batch, n_cls = logits.shape
    return F.cross_entropy(logits.float().reshape(groups * batch, n_cls), labels.repeat(groups))


def _pair_terms(features: torch.Tensor, variant: DiversityVariant, distance: Distance) -> torch.Tensor:
    """[*K, G, N, E] -> [*K]: the mean over the N rows (classes or images) of the mean over group pairs i < j of the
    pair term (cosine similarity for ``paper``; d(f_i, f_j) for ``code``)."""
    groups = features.shape[-3]
    f = F.normalize(features.float(), dim=-1)
    i, j = torch.triu_indices(groups, groups, offset=1, device=f.device)
    a, b = f.index_select(-3, i), f.index_select(-3, j)  # [*K, pairs, N, E]
    if variant == "paper" or distance == "cos":
        cos = (a * b).sum(-1)
        terms = cos if variant == "paper" else 1.0 - cos
    elif distance == "l1":
        terms = -(a - b).abs().mean(-1)
    elif distance == "l2":
        terms = -torch.sqrt((a - b).square().sum(-1) + 1e-8)
    else:
        raise FedPromptError(f"fedmgp diversity distance {distance!r}: use cos, l1 or l2.")
    return terms.mean(dim=(-2, -1))


def diversity_loss(text: torch.Tensor | None, image: torch.Tensor | None, variant: DiversityVariant = "paper",
                   distance: Distance = "l1") -> torch.Tensor:
    """FedMGP's diversity term between prompt groups, from text features [*K, G_t, C, E] and image features
    [*K, G_v, B, E] (either may be ``None`` or have fewer than two groups: that modality then has no term).

    Both variants L2-normalise the features first (the official code computes the loss on normalised features) and
    average each modality's term over its rows (classes for text, images for vision) and over group pairs i < j;
    with both modalities present the result is the mean of the two (1/2 (D_text + D_vis)), with one, that one.

    ``paper`` (default): D = the mean pairwise cosine similarity between the groups' features; minimising it pushes
    the groups apart, which is what the paper says the loss is for ("drive each prompt group to specialize in
    distinct and complementary semantic aspects"). The paper's equation itself could not be read here (only the
    abstract was available), so its equation number is not cited; check it against the PDF (arXiv 2511.00480).

    ``code``: the released code (``_compute_divergent_loss``): per pair d = 1 - cos (``distance="cos"``),
    -mean|f_i - f_j| (``"l1"``, the config's choice) or -sqrt(||f_i - f_j||^2 + 1e-8) (``"l2"``), and the absolute
    value of the combined term. Every choice decreases as the groups become more alike, so minimising it pulls the
    groups together: kept for the ablation against the paper's intent.

    Returns:
        [*K] (a scalar for single-client features); multiply by lambda (1.0 in the official config) yourself.
    """
    if variant not in ("paper", "code"):
        raise FedPromptError(f"fedmgp diversity {variant!r}: use paper or code.")
    terms = [_pair_terms(f, variant, distance) for f in (text, image) if f is not None and f.shape[-3] > 1]
    if not terms:
        lead = next((f.shape[:-3] for f in (text, image) if f is not None), ())
        device = next((f.device for f in (text, image) if f is not None), None)
        return torch.zeros(lead, device=device)
    combined = torch.stack(terms).mean(dim=0)
    return combined.abs() if variant == "code" else combined


# -------------------------------------------------------------------------------------------- group selection
def group_similarity(prompts: torch.Tensor, global_prompts: torch.Tensor) -> torch.Tensor:
    """sim_g = max over r of cos(vec(prompts[g]), vec(global_prompts[r])), in float64: [G, ...], [S, ...] -> [G]."""
    local = prompts.detach().reshape(prompts.shape[0], -1).to(torch.float64)
    glob = global_prompts.detach().reshape(global_prompts.shape[0], -1).to(torch.float64)
    if local.shape[1] != glob.shape[1]:
        raise FedPromptError(f"fedmgp: client prompts {tuple(prompts.shape)} and global prompts "
                             f"{tuple(global_prompts.shape)} differ in size; resume with the run's own config.")
    cos = F.cosine_similarity(local.unsqueeze(1), glob.unsqueeze(0), dim=-1)  # [G, S]
    return cos.amax(dim=1)


def selection_probabilities(similarity: torch.Tensor, temperature: float = 1.0, highest: bool = True) -> torch.Tensor:
    """p = softmax(sim / T) in float64 (softmax(-sim / T) with ``highest=False``: prefer the least similar)."""
    if temperature <= 0:
        raise FedPromptError(f"fedmgp temperature {temperature}: must be > 0.")
    sim = similarity.to(torch.float64)
    return torch.softmax((sim if highest else -sim) / temperature, dim=0)


def sample_groups(probabilities: torch.Tensor, count: int, uniforms) -> list[int]:
    """Successive sampling without replacement (the official code's rule: one draw at a time from the renormalised
    probabilities of the groups not yet picked), by inverse CDF: the k-th pick is the first remaining group whose
    cumulative renormalised probability exceeds ``uniforms[k]`` (values in [0, 1)). Returns the picks in sampling
    order."""
    p = probabilities.detach().to(torch.float64).cpu().numpy()
    remaining = list(range(len(p)))
    picks = []
    for u in list(uniforms)[:count]:
        weights = p[remaining]
        cdf = np.cumsum(weights) / weights.sum()
        k = min(int(np.searchsorted(cdf, float(u), side="right")), len(remaining) - 1)
        picks.append(remaining.pop(k))
    return picks


def selection_seed(run_seed: int, client_id: int, round_idx: int) -> int:
    """Seed of a client's group selection in a round (the text and visual selections share it, as in the official
    code, so round 1 picks the same indices for both when G_t = G_v)."""
    return derive_seed(run_seed, client_id, round_idx, SELECTION_STREAM)


def select_groups(prompts: torch.Tensor, global_prompts: torch.Tensor | None, count: int, seed: int,
                  temperature: float = 1.0, mode: SelectionMode = "similarity", highest: bool = True) -> list[int]:
    """The ``count`` groups (in sampling order) a client sends.

    Args:
        prompts: the client's groups [G, ...] after local training.
        global_prompts: the previous round's global slots [S, ...], or ``None`` (round 1: uniform choice).
        count: groups to send (s).
        seed: from :func:`selection_seed`.
        temperature: softmax temperature T.
        mode: ``similarity`` (p = softmax(sim / T), the official default), ``random`` (uniform every round) or
            ``fixed`` (groups 0 .. s-1, the official ``top_fixed``).
        highest: prefer the most similar groups (``AGGREGATE_HIGHEST_SIM``); ``False`` the least similar.
    """
    groups = prompts.shape[0]
    if not 1 <= count <= groups:
        raise FedPromptError(f"fedmgp groups_to_send={count}: must be between 1 and the number of groups ({groups}).")
    if mode == "fixed":
        return list(range(count))
    if mode not in ("similarity", "random"):
        raise FedPromptError(f"fedmgp selection {mode!r}: use similarity, random or fixed.")
    if mode == "random" or global_prompts is None:
        probs = torch.full((groups,), 1.0 / groups, dtype=torch.float64)
    else:
        probs = selection_probabilities(group_similarity(prompts, global_prompts), temperature, highest)
    return sample_groups(probs, count, np.random.default_rng(seed).random(count))


# --------------------------------------------------------------------------------------------------- server
@dataclass
class _RoundRecord:
    """What ``apply`` needs from the last ``aggregate``: its round, the senders, the global slots they selected
    against."""

    round_idx: int
    senders: frozenset
    previous: dict


class FedMGPAggregator(Aggregator):
    """Similarity-guided group aggregation, run separately for each group key (text and visual).

    - ``upload``: the client selects ``groups_to_send`` (s) of its G groups with :func:`select_groups` (round 1, or
      no global slots yet: uniformly at random; later p = softmax(sim / T) against the previous round's slots) and
      sends those groups only, in sampling order: ``{key: [s, ...]}``, so bytes up are s groups per key.
    - ``aggregate``: slot r = the unweighted mean of every sender's r-th sent group (sampling order, not nearest-slot
      matching, as in the official code); the new global state is ``{key: [s, ...]}``.
    - ``apply``: a client that sent in this round recomputes its own selection (from its post-training state, the
      slots it selected against, the run seed, its id and the round: deterministic, so every rank gets the same
      answer without exchanging indices, which would add bytes) and overwrites its r-th sent group with slot r; its
      other G - s groups stay local.
    - A client that did not send in the round (not sampled, or failed) receives nothing and keeps all its groups:
      there is no slot-to-group mapping for it. It selects against the latest slots when it is next sampled (the
      server sends them then; that is what ``download`` and the loop's ``bytes_down`` count).

    The state (the last global slots and their round) is checkpointed by :meth:`state_dict`; a resumed run selects
    exactly as the uninterrupted one.

    Args:
        keys: state keys of the group tensors (leading dimension = groups); keys missing from a client's state or
            with zero groups are skipped.
        groups_to_send: s (``TOPK`` = 2 in the official config).
        temperature: softmax temperature T (1.0).
        seed: the run's seed (selection seeds derive from it, the client id and the round).
        selection: ``similarity`` (default), ``random`` or ``fixed`` (see :func:`select_groups`).
        highest: prefer the most similar groups (the official ``AGGREGATE_HIGHEST_SIM: True``).
        official_visual: the released code's bug: the aggregated visual prompts never reach the model, so after
            each round every client's visual groups are the initial ones again (``FedMGP(compat="official")``).
    """

    def __init__(self, keys: tuple[str, ...] = (TEXT_KEY, VISUAL_KEY), groups_to_send: int = 2,
                 temperature: float = 1.0, seed: int = 0, selection: SelectionMode = "similarity",
                 highest: bool = True, official_visual: bool = False):
        super().__init__(tuple(keys))
        self.keys = tuple(keys)
        self.groups_to_send = groups_to_send
        self.temperature = temperature
        self.seed = seed
        self.selection_mode = selection
        self.highest = highest
        self.global_prompts: dict[str, torch.Tensor] = {}
        self.last_round = 0
        self._record: _RoundRecord | None = None
        self.official_visual = official_visual
        self._initial_visual: torch.Tensor | None = None

    def _group_keys(self, state: dict[str, torch.Tensor]) -> list[str]:
        return [k for k in self.keys if k in state and state[k].shape[0] > 0]

    def _select(self, client_id: int, state: dict[str, torch.Tensor], round_idx: int,
                previous: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        seed = selection_seed(self.seed, client_id, round_idx)
        return {key: select_groups(state[key], previous.get(key), self.groups_to_send, seed, self.temperature,
                                   self.selection_mode, self.highest)
                for key in self._group_keys(state)}

    def selection(self, client_id: int, state: dict[str, torch.Tensor], round_idx: int) -> dict[str, list[int]]:
        """The groups (per key, in sampling order) the client with post-training ``state`` sends in ``round_idx``,
        against the current global slots (what :meth:`upload` sends)."""
        return self._select(client_id, state, round_idx, self.global_prompts)

    def upload(self, client_id, state, round_idx):
        if round_idx < 1:  # the loop's initial "upload" of the server's initialisation: no group is selected yet
            if VISUAL_KEY in state:
                self._initial_visual = state[VISUAL_KEY].clone()
            return {}
        chosen = self.selection(client_id, state, round_idx)
        return {key: state[key][idx].clone() for key, idx in chosen.items()}

    def aggregate(self, uploads, weights, round_idx):
        senders = sorted(cid for cid, up in uploads.items() if up)
        merged = {}
        for key in self.keys:
            sent = [uploads[cid][key] for cid in senders if key in uploads[cid]]
            if sent:
                mean = torch.stack([t.to(torch.float64) for t in sent]).mean(dim=0)
                merged[key] = mean.to(sent[0].dtype)
        self._record = _RoundRecord(round_idx, frozenset(senders), dict(self.global_prompts))
        if merged:
            self.global_prompts = {k: v.clone() for k, v in merged.items()}
            self.last_round = round_idx
        return merged

    def download(self, global_state, client_id):
        return global_state

    def apply(self, client_state, received, client_id):
        record = self._record
        new = dict(client_state)
        if self.official_visual and VISUAL_KEY in new and self._initial_visual is not None:
            new[VISUAL_KEY] = self._initial_visual.clone()  # the released code's lost visual prompts
        if record is None or client_id not in record.senders or not received:
            return new
        chosen = self._select(client_id, client_state, record.round_idx, record.previous)
        for key, idx in chosen.items():
            if key in received and not (self.official_visual and key == VISUAL_KEY):
                groups = client_state[key].clone()
                groups[idx] = received[key].to(groups.dtype)
                new[key] = groups
        return new

    def state_dict(self) -> dict:
        state = {"global_prompts": {k: v.clone() for k, v in self.global_prompts.items()},
                 "last_round": self.last_round}
        if self._record is not None:  # what apply needs after the last aggregate (a client-side apply elsewhere)
            record = self._record
            state["record"] = {"round": record.round_idx, "senders": sorted(record.senders),
                               "previous": {k: v.clone() for k, v in record.previous.items()}}
        return state

    def load_state_dict(self, state: dict) -> None:
        if "global_prompts" not in state:
            raise FedPromptError("--resume: the checkpoint has no FedMGP aggregator state (the global prompt slots "
                                 "the next round selects against); resume from a checkpoint written by a FedMGP run.")
        self.global_prompts = {k: v.clone() for k, v in state["global_prompts"].items()}
        self.last_round = int(state.get("last_round", 0))
        record = state.get("record")
        self._record = None if record is None else _RoundRecord(
            int(record["round"]), frozenset(int(c) for c in record["senders"]),
            {k: v.clone() for k, v in record["previous"].items()})


# --------------------------------------------------------------------------------------------------- client
class FedMGPClient(PromptClient):
    """FedMGP clients: G_t text groups ``text_prompts.ctx`` [G_t, n_ctx, D] and G_v visual groups
    ``visual_prompts.tokens`` [G_v, V, width] per client (stacked over slots), from the :class:`FedMGP` settings.

    The text groups fill ``[SOS] p1 p2 of a {class}. [EOS]`` (one encoder call for every client and group); the
    visual groups join the ViT image tower's tokens (one tower call: each image once per group of its own client).
    Text group g pairs with visual group g; the loss is the mean over groups of the cross-entropy plus lambda times
    the diversity term; the prediction combines the groups (``inference``).
    """

    prompt_template = "{ctx} of a {name}."  # [SOS] p1 p2 of a {class}. [EOS]

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        self.n_ctx = settings.n_ctx
        words = backbone.word_embeddings(settings.ctx_init)[: settings.n_ctx].cpu()
        if words.shape[0] != settings.n_ctx:
            raise FedPromptError(f"method.ctx_init {settings.ctx_init!r} has fewer than n_ctx={settings.n_ctx} "
                                 "tokens.")
        text = init_text_groups(words, settings.text_groups)
        self.text_prompts = ContextVectors(settings.n_ctx, backbone.ctx_dim, shape=(settings.text_groups,),
                                           slots=slots, initial=text)
        if settings.visual_groups:
            if not backbone.supports_visual_prompts:
                backbone.encode_image_prompted(torch.zeros(0), torch.zeros(0))  # raises the clear error
            self.visual_prompts = VisualPrompts(settings.visual_groups, settings.visual_tokens, backbone.visual_width,
                                                settings.visual_depth, slots=slots)
            # the released code never loads aggregated visual prompts (compat: official): keep the initial ones
            self.register_buffer("initial_visual", self.visual_prompts.tokens.detach().clone(), persistent=False)

    def text_features(self) -> torch.Tensor:
        """L2-normalised text features [A, G_t, C, E] of every group of the active clients."""
        return self.encode_context(self.active(self.text_prompts.ctx))

    def image_features(self, batch: dict) -> torch.Tensor:
        """L2-normalised image features [n, G_v, E]: each image with every visual group of its own client (the
        plain, cacheable features as one group when there are no visual prompts)."""
        if not self.settings.visual_groups:
            return super().image_features(batch).unsqueeze(1)
        return self.encode_visual(batch["image"], self.visual_prompts.tokens)

    def group_logits(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """[n, G, C]: sample i scored by each group pair of its own client."""
        return group_logits(image.unsqueeze(-2), self.per_sample(text), self._logit_scale).squeeze(-2)

    def logits(self, text: torch.Tensor, image: torch.Tensor, batch: dict) -> torch.Tensor:
        s = self.settings
        if s.inference == "feature_average":
            return feature_average_logits(image.unsqueeze(-2), self.per_sample(text), self._logit_scale).squeeze(-2)
        return combine_group_logits(self.group_logits(text, image).unsqueeze(-2), s.inference,
                                    s.selected_group).squeeze(-2)

    def loss(self, text: torch.Tensor, image: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per client: mean over groups of the cross-entropy, plus lambda times the diversity term."""
        logits = self.group_logits(text, image)  # [n, G, C]
        n, groups, n_cls = logits.shape
        per_sample = F.cross_entropy(logits.float().reshape(n * groups, n_cls),
                                     batch["label"].repeat_interleave(groups), reduction="none")
        loss = self.client_mean(per_sample.view(n, groups).mean(1))
        weight = self.settings.diversity_weight
        if weight:
            loss = loss + weight * self.diversity(text, image if self.settings.visual_groups else None)
        return loss

    def diversity(self, text: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """:func:`diversity_loss` of each active client ``[A]``, from text features ``[A, G_t, C, E]`` and the image
        features of the batch ``[n, G_v, E]``: a client's visual term is the mean over its own images (so it does not
        depend on the other clients' images); the modalities combine as in :func:`diversity_loss`."""
        variant, distance = self.settings.diversity, self.settings.distance
        terms = []
        if text.shape[-3] > 1:
            terms.append(_pair_terms(text, variant, distance))
        if image is not None and image.shape[1] > 1:
            terms.append(self.client_mean(_pair_terms(image.unsqueeze(-2), variant, distance)))  # one row per image
        if not terms:
            return torch.zeros(text.shape[0], device=text.device)
        combined = torch.stack(terms).mean(dim=0)
        return combined.abs() if variant == "code" else combined

    def on_round_start(self, global_state):
        if self.settings.visual_groups and self.settings.compat == "official":
            with torch.no_grad():  # the released code restarts every local round from the initial visual prompts
                self.visual_prompts.tokens.copy_(self.initial_visual)


@dataclass(kw_only=True, eq=False)
class FedMGP(TrainedMethod):
    """FedMGP: groups of paired text and visual prompts per client, a diversity loss between the groups, and
    similarity-guided aggregation of a few groups (Bo et al., NeurIPS 2025; specs section 4).

    Each client holds ``text_groups`` text prompts (``n_ctx`` vectors from "a photo", plus noise; the rest of the
    sentence stays "of a {class}.") and ``visual_groups`` visual prompts (``visual_tokens`` tokens appended to the
    ViT image tower's input). Text group g pairs with visual group g; the prediction is the mean of the group logits.
    Each round a client sends ``groups_to_send`` groups of each kind, drawn with p = softmax(sim / T) of their best
    cosine to the previous round's global slots (uniform in round 1); the server's slot r is the unweighted mean of
    the clients' r-th sent groups, and each client overwrites its r-th sent group with slot r (the other groups stay
    local). See :class:`FedMGPAggregator`.

    Differences from the released code (specs section 4), each with a switch to the released behaviour:

    - ``diversity: paper`` (default) minimises the mean pairwise cosine similarity between the groups' features,
      pushing them apart as the paper intends; ``diversity: code`` reproduces the released loss, which pulls them
      together (its sign).
    - ``compat: fixed`` (default) loads the aggregated visual groups like the text groups; ``compat: official``
      reproduces the released code, whose aggregated visual prompts never reach the model (every local round and
      every evaluation uses the initial visual prompts).
    - Everything is seeded from the run's seed (the released code seeds the visual prompts from the clock), and
      model selection never looks at test accuracy (the released code picks best_model.pt on the test set).

    The image tower sees trainable tokens, so its outputs cannot be cached (``train.feature_cache`` is refused and
    test images go through the tower at every evaluation), except with ``visual_groups: 0`` (text groups only).
    Like every trained method it takes the optimiser settings, learning-rate schedule included (the official config:
    SGD lr 1e-3, constant).
    """

    text_groups: int = 5
    """Text prompt groups G_t (5)."""
    visual_groups: int = 5
    """Visual prompt groups G_v (5; 0: text groups only, any image tower)."""
    n_ctx: int = 2
    """Learnable text tokens per group (2: "a photo" of "a photo of a")."""
    visual_tokens: int = 2
    """Visual tokens per group V (2)."""
    visual_depth: int = 1
    """1 for shallow visual prompts (input layer only, the official setting); more for deep prompts replacing the
    prompt outputs at each of the first visual_depth layers."""
    ctx_init: str = "a photo of a"
    """The words whose first n_ctx token embeddings initialise every text group."""
    diversity: DiversityVariant = "paper"
    """paper (push the groups apart: the mean pairwise cosine) or code (the released loss and its sign)."""
    diversity_weight: float = 1.0
    """lambda (1.0)."""
    distance: Distance = "l1"
    """The released code's pair distance for diversity: code (l1 in its config; cos, l2)."""
    inference: Literal["average", "max_logits", "feature_average", "selected_group"] = "average"
    """average of the group logits (default), max_logits, feature_average or selected_group."""
    selected_group: int = 0
    """The group of inference: selected_group."""
    groups_to_send: int = 2
    """Groups of each kind a client sends per round (s = 2)."""
    temperature: float = 1.0
    """Softmax temperature of the selection (1.0)."""
    selection: SelectionMode = "similarity"
    """similarity (default), random or fixed (always groups 0 .. s-1)."""
    compat: Literal["fixed", "official"] = "fixed"
    """fixed (default) or official (the released code's lost visual prompts)."""
    lr: float = 0.001
    """Local SGD learning rate (1e-3 in the official config)."""

    client_class = FedMGPClient
    shared_prefixes = (TEXT_KEY, VISUAL_KEY)
    global_model = False

    @property
    def frozen_image_tower(self) -> bool:
        """Only with text groups alone does the image side stay the frozen tower (cacheable)."""
        return self.visual_groups == 0

    def check(self):
        if self.text_groups < 1 or self.visual_groups < 0 or self.n_ctx < 1 or self.visual_tokens < 1 \
                or self.visual_depth < 1:
            raise FedPromptError("method: FedMGP needs text_groups >= 1, visual_groups >= 0, n_ctx >= 1, "
                                 f"visual_tokens >= 1 and visual_depth >= 1 (got {self.text_groups}, "
                                 f"{self.visual_groups}, {self.n_ctx}, {self.visual_tokens}, {self.visual_depth}).")
        if not 1 <= self.groups_to_send <= min(self.text_groups, self.visual_groups or self.text_groups):
            raise FedPromptError(f"method.groups_to_send={self.groups_to_send} must be between 1 and the number of "
                                 f"groups ({self.text_groups} text, {self.visual_groups} visual).")
        if self.diversity not in ("paper", "code") or self.compat not in ("fixed", "official"):
            raise FedPromptError(f"method.diversity must be paper or code and method.compat fixed or official "
                                 f"(got {self.diversity!r}, {self.compat!r}).")

    def build_aggregator(self) -> FedMGPAggregator:
        keys = (TEXT_KEY, VISUAL_KEY) if self.visual_groups else (TEXT_KEY,)
        return FedMGPAggregator(keys, self.groups_to_send, self.temperature, selection=self.selection,
                                official_visual=self.compat == "official")
