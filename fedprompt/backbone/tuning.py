"""Tuned passes through the frozen towers: LoRA on chosen linear layers, adapters in parallel with or after chosen
blocks, each row of a batch with its own client's weights (the open_clip and Hugging Face internals this needs).

A :class:`TowerTuning` says what one pass applies, as functions of the hidden states (the method's closures over its
stacked modules, :mod:`fedprompt.backbone.adapters`, with each row's slot bound in):

- ``lora[(block, target)]``: ``delta(h) -> [N, L, out]``, added to the output of a linear layer of block ``block``
  (0-based) whose input is ``h``; targets :data:`LORA_TARGETS`: ``q``, ``k``, ``v`` (the query, key and value
  projections: open_clip's fused ``in_proj`` split in three), ``o`` (the attention's output projection), ``mlp_in``
  and ``mlp_out`` (the MLP's two linear layers);
- ``parallel[block]``: ``branch(x, norm) -> [N, L, width]``, added to the block's output, computed from the block's
  input ``x``; ``norm`` is the block's pre-attention LayerNorm as a function (pFedMMA: ``s * up(shared(down(
  ln_1(x))))``; the identity for a post-LN BERT block, whose input is already normalised);
- ``after[block]``: ``adapter(y) -> [N, L, width]``, a residual adapter after the block: ``y + adapter(y)``.

Where each applies:

- open_clip CLIP towers (the causal text transformer, the ViT image tower): every target, ``parallel`` and ``after``.
  A block with LoRA on its attention runs it as separate q, k, v projections and
  ``F.scaled_dot_product_attention`` (as CLIP-LoRA's ``PlainMultiheadAttentionLoRA``); a block without is run as is.
  The updates are per token, so the end-of-text truncation of the text path stays exact.
- Hugging Face text towers (BERT with mean pooling, the offline stand-in): every target and ``parallel`` / ``after``,
  through forward hooks on the layers' own ``nn.Linear`` modules (``attention.self.query`` ... ``output.dense``).
- towers without transformer blocks (timm CNNs such as EfficientNet, ModifiedResNet): nothing; the backbone refuses
  with one line naming the setting. Adapters on pooled features need no tower support at all.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.errors import FedPromptError

#: the linear layers of a transformer block that can carry LoRA
LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_out")
#: the towers a tuning can touch
TOWERS = ("text", "visual")

#: Hugging Face BERT-style layer: target -> submodule path of its nn.Linear
HF_LINEARS = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
              "o": "attention.output.dense", "mlp_in": "intermediate.dense", "mlp_out": "output.dense"}

Delta = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TowerTuning:
    """What a tuned pass applies to one tower (see the module docstring). Block indices are 0-based."""

    lora: dict[tuple[int, str], Delta] = field(default_factory=dict)
    parallel: dict[int, Callable[[torch.Tensor, Callable], torch.Tensor]] = field(default_factory=dict)
    after: dict[int, Delta] = field(default_factory=dict)

    def blocks(self) -> set[int]:
        """The blocks this tuning touches."""
        return {b for b, _ in self.lora} | set(self.parallel) | set(self.after)

    def check(self, layers: int, tower: str, name: str) -> None:
        """One error line for a block index past the tower's ``layers`` or an unknown target."""
        bad = sorted(b for b in self.blocks() if not 0 <= b < layers)
        if bad:
            raise FedPromptError(f"backbone: the {tower} tower of '{name}' has {layers} blocks (0 .. {layers - 1}); "
                                 f"a tuning names block(s) {bad}.")
        targets = sorted({t for _, t in self.lora if t not in LORA_TARGETS})
        if targets:
            raise FedPromptError(f"backbone: unknown LoRA target(s) {targets}; choose from {', '.join(LORA_TARGETS)}.")


# ----------------------------------------------------------------------------------------- open_clip blocks
def check_openclip_block(block, tower: str, name: str) -> None:
    """One error line when ``block`` is not open_clip's ``ResidualAttentionBlock`` with a plain MHA and a 2-layer MLP."""
    ok = (isinstance(getattr(block, "attn", None), nn.MultiheadAttention) and hasattr(block, "ln_1")
          and hasattr(getattr(block, "mlp", None), "c_fc") and not hasattr(block, "ln_1_kv")
          and block.attn._qkv_same_embed_dim)
    if not ok:
        raise FedPromptError(f"backbone: the {tower} tower of '{name}' has {type(block).__name__} blocks, which "
                             "fedprompt cannot tune (LoRA and block adapters need open_clip's ResidualAttentionBlock).")


def _projection(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, delta: Delta | None):
    out = F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))
    return out if delta is None else out + delta(h).to(out.dtype)


def lora_attention(attn: nn.MultiheadAttention, h: torch.Tensor, attn_mask: torch.Tensor | None,
                   deltas: dict[str, Delta]) -> torch.Tensor:
    """Self-attention of batch-first ``h`` ``[N, L, d]`` with ``attn``'s frozen weights, its fused input projection
    split into q, k, v, and the LoRA updates ``deltas`` (``q``, ``k``, ``v``, ``o``) added to the projections."""
    d, heads = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    parts = [_projection(h, w[i * d:(i + 1) * d], None if b is None else b[i * d:(i + 1) * d], deltas.get(name))
             for i, name in enumerate(("q", "k", "v"))]
    n, length, _ = h.shape
    q, k, v = (p.view(n, length, heads, d // heads).transpose(1, 2) for p in parts)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # nn.MultiheadAttention: True = not allowed
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(attn_mask,
                                                                                                 float("-inf"))
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = out.transpose(1, 2).reshape(n, length, d)
    return _projection(out, attn.out_proj.weight, attn.out_proj.bias, deltas.get("o"))


def _mlp(mlp: nn.Module, h: torch.Tensor, deltas: dict[str, Delta]) -> torch.Tensor:
    if "mlp_in" not in deltas and "mlp_out" not in deltas:
        return mlp(h)
    z = _projection(h, mlp.c_fc.weight, mlp.c_fc.bias, deltas.get("mlp_in"))
    z = mlp.gelu(z)
    return _projection(z, mlp.c_proj.weight, mlp.c_proj.bias, deltas.get("mlp_out"))


def tuned_block(block, x: torch.Tensor, attn_mask: torch.Tensor | None, index: int,
                tuning: TowerTuning) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` on batch-first ``x`` with the tuning's LoRA on its linear layers, its
    parallel branch (from the block input) and its after-block adapter."""
    deltas = {target: fn for (b, target), fn in tuning.lora.items() if b == index}
    h = block.ln_1(x)
    if any(t in deltas for t in ("q", "k", "v", "o")):
        attended = lora_attention(block.attn, h, attn_mask, deltas)
    else:
        attended = block.attention(q_x=h, attn_mask=attn_mask)
    y = x + block.ls_1(attended)
    y = y + block.ls_2(_mlp(block.mlp, block.ln_2(y), deltas))
    if index in tuning.parallel:
        y = y + tuning.parallel[index](x, block.ln_1).to(y.dtype)
    if index in tuning.after:
        y = y + tuning.after[index](y).to(y.dtype)
    return y


def run_tuned_blocks(transformer, x: torch.Tensor, attn_mask: torch.Tensor | None, tuning: TowerTuning,
                     tower: str, name: str) -> torch.Tensor:
    """open_clip's ``Transformer.forward`` on batch-first ``x`` ``[N, L, d]``, the blocks the tuning touches run by
    :func:`tuned_block` (the others as they are); returns batch-first ``[N, L, d]``."""
    blocks = transformer.resblocks
    tuning.check(len(blocks), tower, name)
    touched = tuning.blocks()
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(blocks):
        if i in touched:
            check_openclip_block(block, tower, name)
            x = tuned_block(block, x, attn_mask, i, tuning)
        elif batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


# ---------------------------------------------------------------------------------- Hugging Face text towers
def _hf_output(output, add: Callable[[torch.Tensor], torch.Tensor]):
    """``output`` (a tensor, or a tuple whose first entry is the hidden states) with ``add`` applied to its hidden
    states."""
    if isinstance(output, tuple):
        return (add(output[0]), *output[1:])
    return add(output)


@contextmanager
def hf_tuning(layers, tuning: TowerTuning, name: str):
    """Forward hooks on the BERT-style ``layers`` (``encoder.layer``) applying ``tuning`` inside the block."""
    tuning.check(len(layers), "text", name)
    handles = []
    try:
        for (index, target), delta in tuning.lora.items():
            linear = layers[index].get_submodule(HF_LINEARS[target])
            handles.append(linear.register_forward_hook(
                lambda module, args, out, delta=delta: out + delta(args[0]).to(out.dtype)))
        for index, branch in tuning.parallel.items():
            inputs = {}
            handles.append(layers[index].register_forward_pre_hook(
                lambda module, args, inputs=inputs: inputs.__setitem__("x", args[0])))
            handles.append(layers[index].register_forward_hook(
                lambda module, args, out, inputs=inputs, branch=branch: _hf_output(
                    out, lambda y: y + branch(inputs.pop("x"), lambda h: h).to(y.dtype))))
        for index, adapter in tuning.after.items():
            handles.append(layers[index].register_forward_hook(
                lambda module, args, out, adapter=adapter: _hf_output(out, lambda y: y + adapter(y).to(y.dtype))))
        yield
    finally:
        for handle in handles:
            handle.remove()


def hf_layers(text_tower):
    """The transformer layers of a Hugging Face text tower (``encoder.layer``), or ``None``."""
    encoder = getattr(text_tower.transformer, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not all(all(_has(layer, path) for path in HF_LINEARS.values()) for layer in layers):
        return None
    return layers


def _has(module: nn.Module, path: str) -> bool:
    try:
        return isinstance(module.get_submodule(path), nn.Linear)
    except AttributeError:
        return False
