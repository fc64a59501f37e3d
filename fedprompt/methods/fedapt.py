"""FedAPT (Su et al., AAAI 2024): class-specific prompts personalised by fixed random domain keys, and a shared
domain query that mixes the keys per test image.

Every client holds the same two trained tensors, both sent and averaged (the release: the unweighted mean over the
round's clients): the class-specific context ``prompt.ctx`` ``[C, n_ctx, D]`` (N(0, 0.02^2)) and the domain query
``query.weight`` ``[K_d, E]`` (a bias-free linear layer from the image feature to one score per domain key; PyTorch's
default Linear initialisation). ``K_d`` domain keys ``kappa`` ``[K_d, n_ctx, D]`` are drawn once from U[0, 1) (a seeded
generator, ``key_seed``) and never trained; a client's own key is the one of its domain (``domain``, a per-client
integer kept in its state; ``domain_of``: the domain of its images, or every client its own key as the release's
one-client-per-domain script).

Training, client k with domain d(k), image g (unnormalised feature), f = g / |g|:

- its prompt is ``ctx + ctx * kappa_{d(k)}`` (elementwise, every class), its text features ``t_c``;
- loss ``CE(tau f . t, y) + CE(q, d(k))`` with the domain scores ``q = W g`` (every sample of the client carries
  the client's domain label).

Evaluation (``eval_prompt: mixture``, the release's server model; every client holds the same tensors after the
broadcast, so this is one global model): per image, ``s = W g``, ``s^ = (s - mean(s)) / std(s)`` over the K_d scores
(unbiased std), ``w = softmax(s^ / temperature)``, the prompt ``ctx + ctx * sum_d w_d kappa_d``, and the logits
``tau f . t_b`` against that image's own class features: the text encoder runs on every image's C sentences (in
chunks of at most ``max_sentences`` sentences). ``eval_prompt: own`` scores each client with its own key instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import Aggregator, WeightedMean
from fedprompt.methods.base import PromptClient
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors


def domain_keys(count: int, n_ctx: int, dim: int, seed: int) -> torch.Tensor:
    """The fixed domain keys ``[count, n_ctx, dim]``, U[0, 1) from a generator seeded with ``seed`` (the release
    draws them with ``torch.rand`` once and never trains them)."""
    return torch.rand(count, n_ctx, dim, generator=torch.Generator().manual_seed(seed))


def key_weights(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """The release's key mixture ``softmax(((s - mean s) / std s) / temperature)`` over the last dimension of the
    domain scores ``s`` ``[n, K_d]`` (unbiased std)."""
    centred = scores - scores.mean(dim=-1, keepdim=True)
    return torch.softmax(centred / scores.var(dim=-1, keepdim=True).sqrt() / temperature, dim=-1)


def keyed_context(ctx: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``ctx + ctx * key`` for class-specific contexts ``ctx`` ``[N, C, n_ctx, D]`` and keys ``[N, n_ctx, D]``."""
    return ctx + ctx * key.unsqueeze(-3)


class FedAPTClient(PromptClient):
    """FedAPT clients: ``prompt.ctx`` ``[C, n_ctx, D]`` and ``query.weight`` ``[K_d, E]`` (both shared) and ``domain``
    (the client's domain-key index, kept), from the :class:`FedAPT` settings."""

    switchable_classes = False

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        self.n_ctx = settings.n_ctx
        count = settings.key_count
        # drawn in the release's order: the context, then the query layer
        self.prompt = ContextVectors(settings.n_ctx, backbone.ctx_dim, n_cls=len(classnames), slots=slots)
        template = nn.Linear(backbone.embed_dim, count, bias=False)
        self.query = nn.Module()
        self.query.weight = nn.Parameter(template.weight.detach().unsqueeze(0).repeat(slots, 1, 1))
        self.register_buffer("domain", torch.zeros(slots, dtype=torch.long))
        self.register_buffer("keys", domain_keys(count, settings.n_ctx, backbone.ctx_dim, settings.key_seed),
                             persistent=False)

    def image_features(self, batch: dict) -> torch.Tensor:
        """Unnormalised fp32 image features ``[n, E]`` (the domain query reads them as they are)."""
        features = batch.get("features")
        if features is None:
            with torch.no_grad():
                features = self.backbone.encode_image(batch["image"])
        return features.float()

    def domain_scores(self, image: torch.Tensor) -> torch.Tensor:
        """``q = W g`` ``[n, K_d]``, each image through its own client's query layer."""
        weight = self.per_sample(self.active(self.query.weight))
        return torch.einsum("ne,nke->nk", image, weight.to(image.dtype))

    def text_features(self):
        """Training (and ``eval_prompt: own``): each active client's text features ``[A, C, E]`` with its own key.
        Evaluation with ``eval_prompt: mixture``: the active clients' contexts ``[A, C, n_ctx, D]`` (the text
        depends on the image; the encoder runs in :meth:`logits`)."""
        ctx = self.active(self.prompt.ctx)
        if not self.training and self.settings.eval_prompt == "mixture":
            return ctx
        key = self.keys[self.active(self.domain)]
        return self.encode_context(keyed_context(ctx, key.to(ctx.dtype)), class_specific=True)

    def mixed_text(self, ctx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features ``[n, C, E]`` of each image's prompt ``ctx_b + ctx_b * sum_d w_bd kappa_d``
        (``ctx``: the active clients' contexts ``[A, C, n_ctx, D]``, image b with its own client's; ``weights``
        ``[n, K_d]``), at most ``max_sentences`` sentences per encoder call."""
        mix = torch.einsum("nk,kld->nld", weights, self.keys.to(weights.dtype))
        per_call = max(1, self.settings.max_sentences // max(1, len(self.classnames)))
        owners = self.per_sample(torch.arange(len(ctx), device=ctx.device))  # each image's client among the active
        parts = []
        for owner, key in zip(owners.split(per_call), mix.split(per_call)):
            own = ctx[owner]
            parts.append(self.encode_context(keyed_context(own, key.to(own.dtype)), class_specific=True))
        return torch.cat(parts)

    def logits(self, text, image, batch) -> torch.Tensor:
        feats = F.normalize(image, dim=-1)
        if text.dim() == 3:  # class features [A, C, E]: each client's own key
            return self.clip_logits(feats, text)
        weights = key_weights(self.domain_scores(image), self.settings.temperature)
        return self._logit_scale * torch.einsum("ne,nce->nc", feats, self.mixed_text(text, weights))

    def loss(self, text, image, batch) -> dict[str, torch.Tensor]:
        """Per client: ``ce`` (the class cross-entropy with its own key) and ``domain`` (the cross-entropy of the
        domain scores against the client's domain)."""
        class_ce = F.cross_entropy(self.clip_logits(F.normalize(image, dim=-1), text).float(), batch["label"],
                                   reduction="none")
        target = self.per_sample(self.active(self.domain))
        domain_ce = F.cross_entropy(self.domain_scores(image).float(), target, reduction="none")
        return {"ce": self.client_mean(class_ce), "domain": self.client_mean(domain_ce)}


@dataclass(kw_only=True, eq=False)
class FedAPT(TrainedMethod):
    """FedAPT: class-specific prompts modulated by a fixed random key per domain, and a domain query that mixes the
    keys per image at test time; both the prompts and the query are averaged over the round's clients.

    Defaults are the release's (``supervised/prompt-ours.py``, ``PromptModels/clip_queryv2.py``, ``utils.py``):
    24 context tokens per class (16 in the five-clients-per-domain script), keys U[0, 1), temperature 0.01, SGD lr
    0.01, momentum 0.9, weight decay 1e-5, a fresh optimizer every round, the unweighted mean. The release trains in
    fp16 on CUDA with ViT-B/32; fedprompt keeps the prompts in fp32. Its keys come from the global torch stream after
    the model is loaded; here from ``key_seed``. See docs/methods-fedapt-focoop.md.
    """

    n_ctx: int = 24
    """Context tokens per class (--gctx: 24 one client per domain, 16 five clients per domain)."""
    temperature: float = 0.01
    """Temperature of the key mixture softmax (--t 0.01: nearly one key per image)."""
    domain_of: Literal["data", "client"] = "data"
    """Which key a client trains with: data, the domain of its images (clients of one domain share a key; the
    release's five-clients-per-domain script); client, one key per client (the one-client-per-domain script's
    domain label = the client index)."""
    num_domains: Optional[int] = None
    """The number of domain keys (null: from the data, the domains or the clients as domain_of says)."""
    key_seed: int = 1
    """Seed of the keys' U[0, 1) draw (the release: the global stream after seed 1)."""
    eval_prompt: Literal["mixture", "own"] = "mixture"
    """mixture: each test image's own key mixture (the release's server model; every client holds it); own: each
    client with its own domain key (a personalised model per client)."""
    weighted: bool = False
    """Sample-weighted mean instead of the release's unweighted mean over the round's clients."""
    max_sentences: int = 4096
    """The most sentences (images x classes) per text-encoder call in the mixture evaluation."""
    lr: float = 0.01
    """Local SGD learning rate (0.01, hard-coded in the release)."""
    weight_decay: float = 1e-5
    """SGD weight decay (1e-5)."""

    client_class = FedAPTClient
    shared_prefixes = ("prompt.", "query.")

    @property
    def global_model(self) -> bool:  # every client holds the same tensors; own keys make personal models
        return self.eval_prompt == "mixture"

    @property
    def key_count(self) -> int:
        """The number of domain keys (the setting, or what :meth:`prepare_data` found)."""
        count = self.num_domains if self.num_domains is not None else getattr(self, "_key_count", None)
        if count is None:
            raise FedPromptError("FedAPT: the number of domain keys is not known; set method.num_domains.")
        return count

    def build_aggregator(self) -> Aggregator:
        return WeightedMean(self.shared_prefixes, weighted=self.weighted)

    def prepare_data(self, splits, eval_sets: list) -> None:
        """Each client's key index: the domain of its images (one line naming a client with several) or its id."""
        clients = splits.clients
        if self.domain_of == "client":
            self._client_keys = list(range(len(clients)))
            found = len(clients)
        else:
            domains = splits.source.domains
            self._client_keys = []
            for client in clients:
                own = sorted({s.domain for s in client.train})
                if len(own) != 1:
                    raise FedPromptError(f"FedAPT: client {client.client_id} ({client.name}) holds images of "
                                         f"{len(own)} domains; use a partition by domain (fedprompt.data.ByDomain) "
                                         "or method.domain_of client.")
                self._client_keys.append(domains.index(own[0]))
            found = len(domains)
        if self.num_domains is not None and self.num_domains < found:
            raise FedPromptError(f"method.num_domains is {self.num_domains} but the data has {found} "
                                 f"{'clients' if self.domain_of == 'client' else 'domains'}; give at least that "
                                 "many, or null.")
        self._key_count = found
        if self.key_count < 2:
            raise FedPromptError(f"FedAPT needs at least 2 domain keys (the key mixture standardises the scores "
                                 f"over keys), the data gives {found}; use multi-domain data or method.domain_of "
                                 "client with several clients.")

    def initial_client_state(self, client_id: int, state: dict) -> dict:
        """The server's initial tensors with the client's own key index."""
        keys = getattr(self, "_client_keys", None)
        index = keys[client_id] if keys is not None else client_id % self.key_count
        return {**state, "domain": torch.tensor(index, dtype=torch.long)}

    def check(self):
        if self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1, got {self.n_ctx}")
        if not self.temperature > 0:
            raise FedPromptError(f"method.temperature must be > 0, got {self.temperature}")
        if self.num_domains is not None and self.num_domains < 2:
            raise FedPromptError(f"method.num_domains must be >= 2 (or null), got {self.num_domains}")
        if self.domain_of not in ("data", "client"):
            raise FedPromptError(f"method.domain_of: use data or client, got {self.domain_of!r}")
        if self.eval_prompt not in ("mixture", "own"):
            raise FedPromptError(f"method.eval_prompt: use mixture or own, got {self.eval_prompt!r}")
        if self.max_sentences < 1:
            raise FedPromptError(f"method.max_sentences must be >= 1, got {self.max_sentences}")
