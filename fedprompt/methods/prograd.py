"""ProGrad (Zhu et al., ICCV 2023): CoOp whose gradient is projected so that it never conflicts with the gradient of
a distillation loss from zero-shot CLIP.

Each client holds one CoOp context ``prompt.ctx`` ([n_ctx, D]). A step has two losses per client (the teacher is
zero-shot CLIP with a hand-crafted prompt per dataset, on the same frozen image features):

    L_ce = CE(z, y),    L_kd = T^2 * (1/B) sum_b sum_c -softmax(z_zs_b / T)_c * log softmax(z_b / T)_c

with z the CoOp logits and z_zs = logit_scale * cos(x, w^zs) the teacher's (w^zs the hand-crafted prompt's text
features, encoded once per class list; no second CLIP). The update (``ProGrad:Dassl.ProGrad.pytorch/dassl/engine/
trainer.py:311-349``), for every parameter tensor and, here, for every client separately:

1. g_kd = the gradient of L_kd (first backward pass, the graph kept); 2. g_ce = the gradient of L_ce (second pass);
3. if <g_ce, g_kd> < 0: g = g_ce - weight * <g_ce, g_kd> / |g_kd|^2 * g_kd (g_ce minus its component along g_kd),
   otherwise g = g_ce (the distillation gradient is never added);
4. the optimizer step (weight decay and momentum apply to g).

In the lock-step engine the prompt tensors are stacked ``[slots, ...]``; the dot products and norms are taken per
slot over the other dimensions, so each client's projection uses only its own two gradients (a slot's gradients
come only from its own client's losses). ``compat: flip`` is FLiP's "ProGrad", which projects nothing: the loss is
``L_ce + weight * L_kd`` with one backward pass. Inference is plain CoOp (the teacher is unused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from fedprompt.errors import FedPromptError
from fedprompt.methods.base import PromptClient
from fedprompt.methods.kgcoop import check_template, hand_crafted_features
from fedprompt.methods.method import TrainedMethod
from fedprompt.prompts import ContextVectors


def prograd_context(n_ctx: int, words: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """ProGrad's initial context ``[n_ctx, D]`` from the init phrase's token embeddings ``words`` ``[n, D]``: zeros for
    the first ``n_ctx - n`` vectors, the phrase in the last ``n`` (``ProGrad:trainers/prograd.py:78-95``); ``None``
    without words (random N(0, 0.02^2))."""
    if words is None:
        return None
    if words.shape[0] > n_ctx:
        raise FedPromptError(f"method.ctx_init: the init phrase has {words.shape[0]} tokens but n_ctx is {n_ctx}; "
                             "ProGrad needs n_ctx >= the phrase's token count.")
    initial = torch.zeros(n_ctx, dim)
    initial[n_ctx - words.shape[0]:] = words.float()
    return initial


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample soft-target cross-entropy ``T^2 * sum_c -softmax(teacher / T) log softmax(student / T)`` ``[n]``
    (ProGrad's ``ProGradLoss``; the teacher is a constant)."""
    target = F.softmax(teacher.detach().float() / temperature, dim=-1)
    return -(target * F.log_softmax(student.float() / temperature, dim=-1)).sum(-1) * temperature ** 2


@torch.no_grad()
def project_conflicting(grad: torch.Tensor, reference: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """ProGrad's projection per slot (the leading dimension): where ``<grad, reference> < 0`` over the other
    dimensions, ``grad - weight * <grad, reference> / |reference|^2 * reference``; elsewhere ``grad`` unchanged."""
    g, r = grad.flatten(1), reference.flatten(1).to(grad.dtype)
    dot = (g * r).sum(1)
    norm2 = (r * r).sum(1)
    conflict = dot < 0  # implies |reference| > 0
    coef = torch.where(conflict, weight * dot / torch.where(conflict, norm2, torch.ones_like(norm2)),
                       torch.zeros_like(dot))
    return (g - coef.unsqueeze(1) * r).view_as(grad)


class ProGradClient(PromptClient):
    """ProGrad clients: one CoOp context ``prompt.ctx`` each, from the :class:`ProGrad` settings."""

    def __init__(self, backbone, classnames, settings, slots=1):
        super().__init__(backbone, classnames, settings, slots)
        words = self.init_words(settings.ctx_init)
        self.n_ctx = settings.n_ctx
        self.prompt = ContextVectors(self.n_ctx, backbone.ctx_dim, slots=slots,
                                     initial=prograd_context(self.n_ctx, words, backbone.ctx_dim))

    def class_data(self, classnames: list[str]) -> dict:
        """The prompt tokens and the teacher's text features ``teacher`` [C, E], encoded once per class list."""
        return {**super().class_data(classnames),
                "teacher": hand_crafted_features(self.backbone, self.settings.teacher_prompt, classnames)}

    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features [A, C, E] of the active clients (one encoder call)."""
        return self.encode_context(self.active(self.prompt.ctx))

    def loss(self, text, image, batch) -> dict[str, torch.Tensor]:
        """``{"ce": [A], "kd": [A]}``: each client's mean cross-entropy and mean distillation loss (``kd`` is weighted
        by ``weight`` under ``compat: flip``, where the two are simply summed)."""
        logits = self.logits(text, image, batch)
        teacher = self._logit_scale * image @ self.frozen("teacher", image.device).t()
        s = self.settings
        ce = self.client_mean(F.cross_entropy(logits.float(), batch["label"], reduction="none"))
        kd = self.client_mean(distillation_loss(logits, teacher, s.temperature))
        return {"ce": ce, "kd": s.weight * kd if s.compat == "flip" else kd}

    def backward(self, losses, backward) -> None:
        """Two backward passes and the per-client projection of g_ce against g_kd (``compat: flip``: one pass of the
        sum)."""
        if self.settings.compat == "flip":
            return super().backward(losses, backward)
        params = [p for p in self.parameters() if p.requires_grad]
        backward(losses["kd"].sum(), retain_graph=True)
        kd_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
        backward(losses["ce"].sum())
        for p, kd_grad in zip(params, kd_grads):
            if p.grad is not None and kd_grad is not None:
                p.grad.copy_(project_conflicting(p.grad, kd_grad, self.settings.weight))


@dataclass(kw_only=True, eq=False)
class ProGrad(TrainedMethod):
    """ProGrad: a shared CoOp context trained with the cross-entropy gradient projected away from conflicts with the
    zero-shot distillation gradient, per parameter and per client, before the optimizer step.

    Sent and averaged (sample-weighted FedAvg): the context only (the teacher is a frozen text table, never sent).
    Defaults: the official scripts' (16 context vectors, the last ones initialised from the dataset template without
    its class slot, the first ones zeros; lambda = ``weight`` 1.0, T 1.0; SGD lr 0.002). ``compat: flip`` is FLiP's
    KD-add variant (``L_ce + weight * L_kd``, no projection; FLiP's configs also use 4 random context vectors:
    ``configs/prograd_*_flip.yaml``). ``teacher_prompt`` is ProGrad's dataset template (e.g. "a type of pet, a photo
    of a {}."; the dataset configs set it and ``ctx_init``).

    ``train_loss`` in the metrics is the sum of both terms (CE + KD).
    """

    n_ctx: int = 16
    """Context tokens (16 in the official scripts)."""
    ctx_init: Optional[str] = "a photo of a"
    """Initialisation words, placed in the last context vectors after zeros (the official rule; its dataset template
    without " {}."; null: random N(0, 0.02^2), as FLiP). Unlike the official code, which counts words by spaces, every
    token of the phrase becomes context (the official code leaves the last word of templates with a comma fixed)."""
    teacher_prompt: str = "a photo of a {}."
    """The zero-shot teacher's hand-crafted prompt, {} for the class name (ProGrad's dataset template)."""
    weight: float = 1.0
    """lambda: the share of the conflicting component removed (1.0; the README's 0.8 for 8/16 shots on Flowers102,
    DTD, EuroSAT); under compat: flip the weight of the added KD loss (1.0)."""
    temperature: float = 1.0
    """Distillation temperature T (1.0)."""
    compat: Literal["paper", "flip"] = "paper"
    """paper: the gradient projection; flip: FLiP's CE + weight x KD without projection."""
    lr: float = 0.002
    """Local SGD learning rate (0.002)."""

    client_class = ProGradClient
    shared_prefixes = ("prompt.",)

    def check(self):
        if self.compat not in ("paper", "flip"):
            raise FedPromptError(f"method.compat must be 'paper' or 'flip', got {self.compat!r}")
        if self.n_ctx < 1:
            raise FedPromptError(f"method.n_ctx must be >= 1, got {self.n_ctx}")
        if not self.weight >= 0:
            raise FedPromptError(f"method.weight must be >= 0 (ProGrad's lambda), got {self.weight}")
        if not self.temperature > 0:
            raise FedPromptError(f"method.temperature must be > 0 (the distillation temperature), got "
                                 f"{self.temperature}")
        check_template("teacher_prompt", self.teacher_prompt)
