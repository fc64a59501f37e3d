"""Per-client trainable modules for the frozen towers: LoRA factors, linear layers and dropout, with every weight
stacked along a leading client dimension (``[slots, ...]``, slot k = client k of a lock-step group).

These modules hold learnable tensors only; nothing here touches open_clip. Their forward takes ``index``, a long
tensor ``[N]`` with the slot of each row of the input (a row is one image, or one sentence, or one token sequence),
and applies every row through its own slot's weights in one batched matmul (the weights are gathered per row, so a
row's output and its gradient only ever involve its own client's weights: a failing client's NaN cannot reach the
others). Where these modules sit inside a tower is said by a :class:`fedprompt.backbone.tuning.TowerTuning`, which
the backbone applies (:meth:`fedprompt.backbone.Backbone.encode_image_tuned`, ``encode_prompts(..., tuning=)``).

The API, for any method (FedLoRA, pFedMMA, FedCLIP here; FedMVP's optional LoRA on its own attention):

- :func:`routed_linear`: ``x[n] @ weight[index[n]]^T + bias[index[n]]`` for every row n, one ``bmm``;
- :class:`StackedLinear`: a linear layer per slot (``weight [slots, out, in]``, ``bias [slots, out]``), initialised as
  ``nn.Linear`` (or by a given function), the same initial value in every slot;
- :class:`StackedLoRA`: LoRA factors of one frozen linear layer per slot, ``A [slots, rank, in]``,
  ``B [slots, out, rank]``; :meth:`StackedLoRA.delta` is the low-rank update ``s * B A drop(x)`` of each row, with
  ``s = alpha / sqrt(rank)`` (CLIP-LoRA, the default), ``alpha / rank`` (the original LoRA) or a given ``scale``;
  ``A`` from nn.Linear's init and ``B = 0`` (the update starts at zero) or both ``N(0, std^2)``;
- :class:`SlotDropout`: dropout whose masks come from one generator per client, so that a client's masks do not
  depend on which other clients share its batch (lock-step K clients = one at a time);
- :func:`scale_gradient`: the identity forward, the gradient multiplied by a factor backward (pFedMMA's
  gradient-scale layer).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import nn

Init = Callable[[torch.Tensor], None]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``factor`` in the backward pass."""
    return _ScaleGradient.apply(x, float(factor))


def routed_linear(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Each row of ``x`` ``[N, ..., in]`` through its own slot's linear map: ``x[n] @ weight[index[n]]^T (+
    bias[index[n]])``, with ``weight`` ``[S, out, in]``, ``bias`` ``[S, out]`` and ``index`` ``[N]`` (values in
    ``0 .. S-1``); returns ``[N, ..., out]``. One batched matmul over the rows (the weights gathered per row)."""
    rows = x.shape[0]
    flat = x.reshape(rows, -1, x.shape[-1])
    w = weight[index].to(x.dtype)  # [N, out, in]
    out = torch.bmm(flat, w.transpose(1, 2))
    if bias is not None:
        out = out + bias[index].to(out.dtype).unsqueeze(1)
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _linear_init(in_features: int, out_features: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear's default initial weight and bias (kaiming-uniform with a = sqrt(5); bias U(+-1/sqrt(in)))."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    return layer.weight.detach(), (layer.bias.detach() if bias else None)


class StackedLinear(nn.Module):
    """A linear layer per client slot: ``weight`` ``[slots, out, in]``, ``bias`` ``[slots, out]`` (optional), every
    slot starting from the same value: ``nn.Linear``'s initialisation, or ``init(weight)`` on one ``[out, in]``
    weight with a zero bias (e.g. pFedMMA's kaiming-normal, fan-out).

    Args:
        in_features: input width.
        out_features: output width.
        slots: client slots.
        bias: whether the layer has a bias.
        init: optional initialiser of one ``[out, in]`` weight (in place); the bias then starts at zero.
    """

    def __init__(self, in_features: int, out_features: int, slots: int = 1, bias: bool = True,
                 init: Init | None = None):
        super().__init__()
        weight, b = _linear_init(in_features, out_features, bias)
        if init is not None:
            weight = torch.empty(out_features, in_features)
            init(weight)
            b = torch.zeros(out_features) if bias else None
        self.weight = nn.Parameter(weight.unsqueeze(0).repeat(slots, 1, 1))
        self.bias = nn.Parameter(b.unsqueeze(0).repeat(slots, 1)) if bias else None

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, ..., in]``, each row through the layer of its slot ``index[n]``: ``[N, ..., out]``."""
        return routed_linear(x, self.weight, index, self.bias)


class StackedLoRA(nn.Module):
    """LoRA factors of one frozen linear layer ``W`` ``[out, in]`` for ``slots`` clients: ``A`` ``[slots, rank, in]``,
    ``B`` ``[slots, out, rank]``; the layer computes ``W x + b + s * B A drop(x)``.

    Args:
        in_features: the frozen layer's input width.
        out_features: its output width.
        rank: the rank r.
        alpha: the LoRA alpha.
        slots: client slots.
        scaling: ``sqrt`` (``s = alpha / sqrt(r)``, CLIP-LoRA's ``loralib/layers.py:41-42``) or ``linear``
            (``alpha / r``, the original LoRA).
        scale: a fixed ``s`` instead (e.g. 1 for an unscaled update), overriding ``alpha`` and ``scaling``.
        init: ``zero_b``: ``A`` as nn.Linear's weight (kaiming-uniform, a = sqrt(5)) and ``B = 0``, so the update
            starts at zero (CLIP-LoRA, ``layers.py:63-68``); ``normal``: both ``N(0, std^2)``.
        std: the standard deviation of the ``normal`` initialisation.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = 1.0, slots: int = 1,
                 scaling: Literal["sqrt", "linear"] = "sqrt", scale: float | None = None,
                 init: Literal["zero_b", "normal"] = "zero_b", std: float = 0.02):
        super().__init__()
        if rank < 1:
            raise ValueError(f"StackedLoRA: rank must be >= 1, got {rank}")
        if init == "zero_b":
            a = torch.empty(rank, in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(out_features, rank)
        elif init == "normal":
            a, b = torch.randn(rank, in_features) * std, torch.randn(out_features, rank) * std
        else:
            raise ValueError(f"StackedLoRA: unknown init {init!r} (zero_b or normal)")
        self.A = nn.Parameter(a.unsqueeze(0).repeat(slots, 1, 1))
        self.B = nn.Parameter(b.unsqueeze(0).repeat(slots, 1, 1))
        self.rank = rank
        if scale is None:
            scale = alpha / math.sqrt(rank) if scaling == "sqrt" else alpha / rank
        self.scale = float(scale)

    def delta(self, x: torch.Tensor, index: torch.Tensor, dropout: Callable | None = None) -> torch.Tensor:
        """The low-rank update ``s * B A drop(x)`` of every row of ``x`` ``[N, ..., in]`` with its own slot's factors
        (``index`` ``[N]``); ``dropout`` (e.g. a :class:`SlotDropout`) is applied to the input of this branch only."""
        if dropout is not None:
            x = dropout(x)
        low = routed_linear(x, self.A, index)  # [N, ..., r]
        return routed_linear(low, self.B, index) * self.scale


class SlotDropout:
    """Dropout with rate ``p`` whose masks for the rows of each client come from that client's own generator.

    The rows of an input must be grouped by client, in order: ``counts[a]`` rows of client a (as the engine lays out
    a lock-step batch, and as text rows are laid out per client). Each client draws its mask from its own generator
    (seeded with ``seeds[a]``, e.g. its step seed), in the order of the calls, so its masks do not depend on the other
    clients of the step. Kept entries are scaled by ``1 / (1 - p)``, as ``nn.Dropout``.

    Args:
        p: drop probability.
        seeds: one seed per client.
        counts: rows per client (host integers).
        device: where the masks are drawn.
    """

    def __init__(self, p: float, seeds: list[int], counts: list[int], device: torch.device):
        if len(seeds) != len(counts):
            raise ValueError(f"SlotDropout: {len(seeds)} seeds for {len(counts)} clients")
        self.p = float(p)
        self.counts = [int(c) for c in counts]
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % 2**63) for s in seeds]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != sum(self.counts):
            raise ValueError(f"SlotDropout: {x.shape[0]} rows, but the clients have {sum(self.counts)}")
        draws = [torch.rand((count, *x.shape[1:]), generator=g, device=self.device)
                 for g, count in zip(self.generators, self.counts)]
        keep = torch.cat(draws) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)
