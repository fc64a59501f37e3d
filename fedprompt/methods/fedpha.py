"""FedPHA (Fang et al., ICML 2025): a fixed-length global prompt shared by all clients, a local prompt of each
client's own length, an SVD projection of the local prompt against the global one, and a bidirectional alignment.

Each client holds two CoOp contexts (class token at the end, N(0, 0.02^2)): ``global_prompt.ctx`` ``[n_g, D]``,
sent to the server (sample-weighted FedAvg), and ``local_prompt.ctx`` ``[l_k, D]``, kept, whose length ``l_k`` may
differ between clients (the heterogeneous scenario: ``local_lengths``). Clients of different lengths train in one
lock-step group: the module's slots hold the longest local prompt, each client's state holds its own length
(:attr:`fedprompt.methods.PromptClient.ragged`), and each client's sentences have exactly its own number of
context tokens (:meth:`fedprompt.methods.PromptClient.encode_lengths`).

Per client, with ``G`` its global prompt, ``P`` its local prompt and ``G = U S V^T`` the reduced SVD (``k =
min(n_g, D)`` singular values, ``r = floor(k (1 - ratio))``):

- the projected local prompt ``P~ = P (I - V_r V_r^T)`` (``projection: null_space``, default: the local prompt with
  the global prompt's r leading directions removed, i.e. in the approximate null space of G) or ``P~ = P V_2 V_2^T``
  with ``V_2`` the k - r trailing right singular vectors of the reduced SVD (``projection: minor``, the released
  code: it keeps only directions inside G's row space; see the module's docs page for why null_space is the
  default). The SVD is not detached: the alignment's gradient reaches the global prompt through it, as released.
- text features (L2-normalised) of the local prompt ``t^L``, the global prompt ``t^G`` and the projected local
  prompt ``t^P``; logits ``z^L = tau f . t^L`` and ``z^G = tau f . t^G``;
- loss ``CE(z^L) + CE(z^G) + pull_weight MSE(t^L, t^P) + push_weight mean_c relu(alpha - |t^L_c - t^G_c|)``: the
  pull keeps the local features close to their projection, the push keeps them at least ``alpha`` from the global
  features (MSE: the mean over classes and feature entries).

Evaluation scores each client with its local prompt only (``z^L``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from fedprompt.errors import FedPromptError
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors

PROJECTIONS = ("null_space", "minor")


def svd_cutoff(rank: int, ratio: float) -> int:
    """The number r of leading right singular vectors the projection removes: ``int(k * (1 - ratio))``, as
    released (``ratio`` 0.8 with 16 global tokens: r = 3)."""
    return int(rank * (1 - ratio))


def project_local(local: torch.Tensor, global_ctx: torch.Tensor, ratio: float, projection: str) -> torch.Tensor:
    """FedPHA's projected local prompts ``[A, L, D]`` of local prompts ``[A, L, D]`` against each client's own
    global prompt ``[A, n_g, D]`` (one batched SVD in fp32, differentiable; see the module docstring)."""
    with torch.autocast(device_type=local.device.type, enabled=False):
        local, global_ctx = local.float(), global_ctx.float()
        _, _, vh = torch.linalg.svd(global_ctx, full_matrices=False)  # vh [A, k, D]
        v = vh.transpose(-2, -1)  # [A, D, k]
        cutoff = svd_cutoff(v.shape[-1], ratio)
        if projection == "minor":
            kept = v[..., cutoff:]
            return local @ (kept @ kept.transpose(-2, -1))
        top = v[..., :cutoff]
        return local - (local @ top) @ top.transpose(-2, -1)


def alignment_terms(local: torch.Tensor, projected: torch.Tensor, global_feats: torch.Tensor,
                    alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pull term ``MSE(t^L, t^P)`` and the push term ``mean_c relu(alpha - |t^L_c - t^G_c|)`` per client
    ``[A]``, from text features ``[A, C, E]``."""
    pull = (local - projected).pow(2).mean(dim=(-2, -1))
    push = F.relu(alpha - (local - global_feats).norm(dim=-1)).mean(dim=-1)
    return pull, push


class FedPHAClient(PromptClient):
    """FedPHA clients: ``global_prompt.ctx`` (shared, ``n_ctx_global`` tokens) and ``local_prompt.ctx`` (kept; slots
    hold the longest local length, each client's state its own), from the :class:`FedPHA` settings."""

    ragged = {"local_prompt.ctx": 0}

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        if settings.compat == "official" and backbone.is_hf_text:
            raise FedPromptError("method.compat=official reproduces the released pooling position of CLIP's causal "
                                 f"text tower, but '{backbone.name}' has a Hugging Face text tower; use compat: "
                                 "fixed.")
        self.n_ctx = settings.n_ctx_global
        self.global_prompt = ContextVectors(settings.n_ctx_global, backbone.ctx_dim, slots=slots)
        self.local_prompt = ContextVectors(settings.longest_local, backbone.ctx_dim, slots=slots)

    def sentence_tokens(self, classnames: list[str], n_ctx: int):
        """The prompt sentences with ``n_ctx`` context tokens; under ``compat: official`` pooled where the released
        heterogeneous code pools: at the end-of-text position of a sentence with the longest prompt of the run."""
        tokens = super().sentence_tokens(classnames, n_ctx)
        shift = self.settings.longest_prompt - n_ctx
        if self.settings.compat != "official" or shift == 0:
            return tokens
        return shifted_pool(self.backbone, tokens, shift)

    def local_features(self) -> torch.Tensor:
        """L2-normalised local-prompt features ``[A, C, E]`` of the active clients."""
        return self.encode_lengths(self.active(self.local_prompt.ctx), self.slot_lengths("local_prompt.ctx"))

    def text_features(self):
        """Evaluation: the local-prompt features ``[A, C, E]``. Training: ``{"local", "projected", "global"}``, the
        features of the local, projected local and global prompts (``[A, C, E]`` each)."""
        if not self.training:
            return self.local_features()
        s = self.settings
        local = self.active(self.local_prompt.ctx)
        global_ctx = self.active(self.global_prompt.ctx)
        projected = project_local(local, global_ctx, s.ratio, s.projection)
        pair = self.encode_lengths(torch.stack([local, projected.to(local.dtype)], dim=1),
                                   self.slot_lengths("local_prompt.ctx"))
        global_feats = self.encode_lengths(global_ctx, [s.n_ctx_global] * self.clients)
        return {"local": pair[:, 0], "projected": pair[:, 1], "global": global_feats}

    def logits(self, text, image, batch) -> torch.Tensor:
        return self.clip_logits(image, text["local"] if isinstance(text, dict) else text)

    def loss(self, text, image, batch) -> dict[str, torch.Tensor]:
        """Per client: ``ce`` (CE of the local and of the global logits) and ``align`` (pull + push)."""
        s = self.settings
        label = batch["label"]
        ce_local = F.cross_entropy(self.clip_logits(image, text["local"]).float(), label, reduction="none")
        ce_global = F.cross_entropy(self.clip_logits(image, text["global"]).float(), label, reduction="none")
        pull, push = alignment_terms(text["local"], text["projected"], text["global"], s.alpha)
        return {"ce": self.client_mean(ce_local) + self.client_mean(ce_global),
                "align": s.pull_weight * pull + s.push_weight * push}


def shifted_pool(backbone, tokens, shift: int):
    """``tokens`` pooled ``shift`` positions after each sentence's end-of-text token (the released heterogeneous
    trainer's pooling for prompts shorter than the longest): the sentences are extended with the tower's padding
    token where needed, so the pooled row is the one the released 77-token sequence has there."""
    needed = int(tokens.pool_index.max()) + 1 + shift
    extra = max(0, needed - tokens.embeddings.shape[1])
    if extra:
        n_cls = tokens.embeddings.shape[0]
        pad_ids = torch.zeros(n_cls, extra, dtype=tokens.token_ids.dtype, device=tokens.token_ids.device)
        with torch.no_grad():
            pad = backbone.token_embedding(pad_ids.to(backbone.token_embedding.weight.device)).to(tokens.embeddings)
        tokens = replace(tokens, embeddings=torch.cat([tokens.embeddings, pad], dim=1),
                         token_ids=torch.cat([tokens.token_ids, pad_ids], dim=1),
                         attention_mask=torch.cat([tokens.attention_mask, torch.zeros_like(pad_ids)], dim=1))
    return replace(tokens, pool_index=tokens.pool_index + shift)


@dataclass(kw_only=True, eq=False)
class FedPHA(TrainedMethod):
    """FedPHA: a global prompt (sample-weighted FedAvg) and a local prompt per client (kept), whose lengths may
    differ between clients, trained with the global prompt's SVD projection and the bidirectional alignment.

    Defaults are the released ones (``federated_main.py`` of the complete release, its dataset configs and
    ``GL_SVDMSE*.py``): 16 global and 16 local tokens, ratio 0.8, alpha 1.0, pull and push weights 1.0, SGD lr 0.001,
    momentum 0.9, weight decay 5e-4, constant rate. The heterogeneous scenario gives one length per client in
    ``local_lengths`` (client-id order; the release's Office31 default [16, 16, 16, 32, 32, 16]).

    Differences from the released code (see docs/methods-fedmvp-fedpha.md): ``projection: null_space`` (default)
    removes the global prompt's leading directions instead of keeping its trailing ones inside its row space
    (``minor``, released); each client's sentences hold its own number of context tokens, pooled at its own
    end-of-text token (``compat: official`` pools where the released heterogeneous code pools, at the longest
    prompt's end-of-text position); every client's local prompt starts from the same draw (the first ``l_k`` rows of
    one N(0, 0.02^2) draw of the longest length; released: a separate draw per client); each client gets a fresh
    optimizer every round (released: one SGD, momentum included, shared by all clients and rounds).
    """

    n_ctx_global: int = 16
    """Tokens of the global prompt (the shared, fixed length: --n_ctx 16)."""
    n_ctx_local: int = 16
    """Tokens of every client's local prompt when local_lengths is null (16)."""
    local_lengths: Optional[list[int]] = None
    """One local prompt length per client, in client-id order (the heterogeneous scenario, e.g. [16, 16, 16, 32,
    32, 16]); null: n_ctx_local for every client."""
    ratio: float = 0.8
    """SVD ratio: the projection removes the leading int(k (1 - ratio)) right singular directions of the global
    prompt, k = min(n_ctx_global, width) (--ratio 0.8)."""
    alpha: float = 1.0
    """Margin of the push term: local and global class features at least alpha apart (--alpha 1.0)."""
    pull_weight: float = 1.0
    """Weight of the pull term MSE(local, projected local) (1.0, hard-coded in the release)."""
    push_weight: float = 1.0
    """Weight of the push term (1.0, hard-coded in the release)."""
    projection: Literal["null_space", "minor"] = "null_space"
    """null_space: P (I - V_r V_r^T), the local prompt without the global prompt's r leading directions; minor: P V_2
    V_2^T with V_2 the trailing k - r right singular vectors of the reduced SVD (the released code)."""
    compat: Literal["fixed", "official"] = "fixed"
    """fixed: each sentence pooled at its own end-of-text token; official: the released heterogeneous trainer's
    pooling, at the end-of-text position of the longest prompt of the run (a later token for shorter prompts)."""
    lr: float = 0.001
    """Local SGD learning rate (0.001 in every released dataset config)."""

    client_class = FedPHAClient
    shared_prefixes = ("global_prompt.",)
    global_model = False

    @property
    def longest_local(self) -> int:
        """The longest local prompt of the run (the size of the module's local-prompt slots)."""
        return max(self.local_lengths) if self.local_lengths else self.n_ctx_local

    @property
    def longest_prompt(self) -> int:
        """The longest prompt of the run, global or local (the released heterogeneous tokenisation's length)."""
        return max(self.n_ctx_global, self.longest_local)

    def local_length(self, client_id: int) -> int:
        """Client ``client_id``'s local prompt length."""
        if self.local_lengths is None:
            return self.n_ctx_local
        if client_id >= len(self.local_lengths):
            raise FedPromptError(f"method.local_lengths has {len(self.local_lengths)} entries but the data makes more "
                                 f"clients (client {client_id} has none); give one length per client.")
        return self.local_lengths[client_id]

    def initial_client_state(self, client_id: int, state: dict) -> dict:
        """The server's initial prompts with the local prompt cut to the client's own length."""
        return {**state, "local_prompt.ctx": state["local_prompt.ctx"][: self.local_length(client_id)].clone()}

    def check(self):
        lengths = [self.n_ctx_global, self.n_ctx_local, *(self.local_lengths or [])]
        if min(lengths) < 1:
            raise FedPromptError(f"method.n_ctx_global, method.n_ctx_local and method.local_lengths must be >= 1, "
                                 f"got {self.n_ctx_global}, {self.n_ctx_local}, {self.local_lengths}")
        if self.local_lengths is not None and not self.local_lengths:
            raise FedPromptError("method.local_lengths is empty: give one length per client, or null.")
        if not 0 <= self.ratio <= 1:
            raise FedPromptError(f"method.ratio must be in [0, 1], got {self.ratio}")
        if not all(value >= 0 for value in (self.alpha, self.pull_weight, self.push_weight)):
            raise FedPromptError(f"method.alpha, method.pull_weight and method.push_weight must be >= 0, got "
                                 f"{self.alpha}, {self.pull_weight}, {self.push_weight}")
        if self.projection not in PROJECTIONS:
            raise FedPromptError(f"method.projection: use {' or '.join(PROJECTIONS)}, got {self.projection!r}")
        if self.compat not in ("fixed", "official"):
            raise FedPromptError(f"method.compat: use fixed or official, got {self.compat!r}")
