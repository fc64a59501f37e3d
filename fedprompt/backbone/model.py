"""The frozen backbone: one open_clip model per process, shared by every client.

Methods never touch open_clip themselves. They ask the backbone for

- :meth:`Backbone.prompt_tokens`: the frozen token embeddings of ``[SOS] X X .. X <class>. [EOS]`` for a list of
  class names, with the positions of the ``n_ctx`` learnable context vectors;
- :meth:`Backbone.encode_prompts`: text features for those sentences with the context replaced by learnable
  vectors (any number of leading prompt dimensions, so several prompts are encoded in one call), optionally with deep
  prompts that replace the context rows of the text residual stream at each of the first J layers (MaPLe / IVLP);
- :meth:`Backbone.encode_image` and :meth:`Backbone.encode_image_tokens`: pooled image features and projected
  patch tokens (ViT), spatial positions (timm / ModifiedResNet towers);
- :meth:`Backbone.encode_image_prompted`: pooled image features of a ViT tower that also sees learnable visual
  prompt tokens (VPT / MaPLe style, shallow or deep), for several prompt sets in one call;
- :meth:`Backbone.encode_image_tuned` and ``encode_prompts(..., tuning=)``: a pass through a tower with per-client
  LoRA and block adapters (:mod:`fedprompt.backbone.tuning`), each row with its own client's weights.

Two kinds of text tower sit behind the same interface: open_clip's causal CLIP text transformer and a Hugging Face
text tower (``CustomTextCLIP``), where prompts go in through ``inputs_embeds`` with the attention mask and the
tower's own pooler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedprompt.backbone.loading import LoadedModel, load_open_clip
from fedprompt.backbone.tuning import LORA_TARGETS, HF_LINEARS, TowerTuning, hf_layers, hf_tuning, run_tuned_blocks
from fedprompt.errors import FedPromptError

PLACEHOLDER = "X"


@dataclass
class PromptTokens:
    """Frozen token data of one sentence per class, with ``n_ctx`` placeholder positions after the start token.

    Attributes:
        embeddings: [C, L, D] token embeddings of the sentences (placeholders included, replaced at encode time).
        token_ids: [C, L] token ids.
        attention_mask: [C, L] 1 for real tokens, 0 for padding.
        pool_index: [C] position whose output is the sentence feature (end-of-text for CLIP).
        n_ctx: number of context positions (1 .. n_ctx).
    """

    embeddings: torch.Tensor
    token_ids: torch.Tensor
    attention_mask: torch.Tensor
    pool_index: torch.Tensor
    n_ctx: int

    def to(self, device) -> "PromptTokens":
        return PromptTokens(self.embeddings.to(device), self.token_ids.to(device), self.attention_mask.to(device),
                            self.pool_index.to(device), self.n_ctx)

    def truncated(self) -> "PromptTokens":
        """Cut every sentence after the longest one (its last real token); exact under the masks used here."""
        length = int(self.attention_mask.sum(1).max())
        length = max(length, int(self.pool_index.max()) + 1)
        return PromptTokens(self.embeddings[:, :length], self.token_ids[:, :length],
                            self.attention_mask[:, :length], self.pool_index, self.n_ctx)


class Backbone(nn.Module):
    """A frozen open_clip model in eval mode with a text path that takes learnable prompt embeddings.

    Args:
        loaded: the model and tokenizer from :func:`fedprompt.backbone.loading.load_open_clip`.
        truncate: cut each prompt batch after the longest sentence instead of running all 77 positions (exact:
            the CLIP text transformer is causal and padding is masked in HF towers; ``False`` is the reference).
    """

    def __init__(self, loaded: LoadedModel, truncate: bool = True):
        super().__init__()
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.preprocess_cfg = loaded.preprocess
        self.name = loaded.name
        self.truncate = truncate
        self.model.eval()
        self.model.requires_grad_(False)
        self.is_hf_text = hasattr(self.model, "text") and hasattr(self.model.text, "transformer") and hasattr(
            self.model.text, "pooler")
        if not self.is_hf_text and not hasattr(self.model, "token_embedding"):
            raise FedPromptError(f"backbone.model: '{loaded.name}' has a text tower fedprompt cannot prompt "
                                 f"({type(self.model).__name__}); use a CLIP or HF-text open_clip model.")

    def train(self, mode: bool = True):  # the backbone is frozen: it stays in eval mode (BatchNorm, dropout)
        return super().train(False)

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def ctx_dim(self) -> int:
        """Width of the text token embeddings (the size of one context vector)."""
        return self.token_embedding.embedding_dim

    @property
    def embed_dim(self) -> int:
        """Size of the joint image-text space."""
        return int(self.model.visual.output_dim) if hasattr(self.model.visual, "output_dim") else int(
            self.encode_text(["a"]).shape[-1])

    @property
    def token_embedding(self) -> nn.Embedding:
        if self.is_hf_text:
            return self.model.text.transformer.get_input_embeddings()
        return self.model.token_embedding

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale) of the pretrained model (100 for OpenAI CLIP)."""
        return float(self.model.logit_scale.exp())

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def truncation_is_exact(self) -> bool:
        """Whether cutting prompt batches after the longest sentence leaves features unchanged."""
        if self.is_hf_text:
            return True  # padding is masked out of attention and pooling
        pool = getattr(self.model, "text_pool_type", "argmax")
        return self.model.attn_mask is not None and pool in ("argmax", "eos")

    # --------------------------------------------------------------------------------------------- text side
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def _pad_id(self) -> int:
        if self.is_hf_text:
            return int(self.model.text.config.pad_token_id)
        return int(getattr(self.model, "pad_id", 0) or 0)

    def _pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        if self.is_hf_text:
            pooler = self.model.text.pooler
            if hasattr(pooler, "cls_token_position"):
                return torch.full((ids.shape[0],), pooler.cls_token_position, dtype=torch.long)
            return (ids != self._pad_id()).sum(1) - 1
        pool = getattr(self.model, "text_pool_type", "argmax")
        if pool == "argmax":
            return ids.argmax(dim=-1)
        if pool == "eos":
            return (ids == self.model.text_eos_id).int().argmax(dim=-1)
        if pool == "first":
            return torch.zeros(ids.shape[0], dtype=torch.long)
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long)

    def _attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        if self.is_hf_text:
            return (ids != self._pad_id()).long()
        mask = torch.zeros_like(ids)
        index = self._pool_index(ids)
        for row, end in enumerate(index.tolist()):
            mask[row, : end + 1] = 1
        return mask

    @torch.no_grad()
    def prompt_tokens(self, classnames: list[str], n_ctx: int, template: str = "{ctx} {name}.") -> PromptTokens:
        """Tokenise one sentence per class with ``n_ctx`` placeholder tokens right after the start token.

        ``template`` places the placeholders (``{ctx}``) and the class name (``{name}``); the CoOp default puts the
        class token at the end: ``[SOS] X X .. X <name>. [EOS]``. Fixed words may follow the placeholders (FedMGP:
        ``"{ctx} of a {name}."``).
        """
        ctx_text = " ".join([PLACEHOLDER] * n_ctx)
        sentences = [" ".join(template.format(ctx=ctx_text, name=name.replace("_", " ")).split())
                     for name in classnames]
        ids = self.tokenize(sentences).cpu()
        if n_ctx:
            placeholder = self.tokenize([PLACEHOLDER]).cpu()[0, 1]
            if not bool((ids[:, 1: 1 + n_ctx] == placeholder).all()):
                raise FedPromptError(f"prompt template {template!r}: the {n_ctx} context tokens must come right "
                                     "after the start token (the template must begin with '{ctx}').")
        weight = self.token_embedding.weight
        embeddings = self.token_embedding(ids.to(weight.device)).detach()
        tokens = PromptTokens(embeddings, ids.to(weight.device), self._attention_mask(ids).to(weight.device),
                              self._pool_index(ids).to(weight.device), n_ctx)
        return tokens.truncated() if self.truncate and self.truncation_is_exact else tokens

    @torch.no_grad()
    def word_embeddings(self, words: str) -> torch.Tensor:
        """Token embeddings [n, D] of the words of a phrase (e.g. ``"a photo of a"`` for context initialisation)."""
        ids = self.tokenize([words])[0]
        n = int(self._attention_mask(ids[None])[0].sum()) - 2  # minus start and end tokens
        return self.token_embedding(ids[1: 1 + n].to(self.token_embedding.weight.device)).detach().clone()

    def encode_prompts(self, tokens: PromptTokens, ctx: torch.Tensor, class_specific: bool = False,
                       deep: torch.Tensor | None = None, tuning: TowerTuning | None = None) -> torch.Tensor:
        """Text features for learnable context vectors placed into the sentences of ``tokens``.

        Args:
            tokens: from :meth:`prompt_tokens` (C classes).
            ctx: [*P, n_ctx, D] unified context (shared by all classes), or with ``class_specific`` [*P, C, n_ctx, D],
                with any leading prompt dimensions ``*P`` (e.g. FedOTP's global and local prompt, FedMGP's groups).
            class_specific: whether ``ctx`` holds one context per class (CoOp's CSC).
            deep: deep text prompts [*P, J - 1, n_ctx, D] (MaPLe / IVLP, shared by the C classes of each prompt;
                or [*P, C, J - 1, n_ctx, D], one copy per sentence, e.g. each rounded on its own):
                before text layer i (1 <= i < J) the residual-stream rows of the context positions 1 .. n_ctx are
                replaced by ``deep[..., i - 1, :, :]`` as they are (no positional embedding, no LayerNorm); the start
                token and every row after the context are kept, layers i >= J are untouched, and the causal mask is
                the tower's own (the context rows come before every end-of-text token, so end-of-text truncation
                stays exact). ``None``, or J - 1 = 0 rows (depth 1), is the shallow path exactly; at most
                :attr:`text_layers` - 1 deep layers.
            tuning: LoRA and block adapters in the text tower (:class:`fedprompt.backbone.tuning.TowerTuning`) for
                the ``prod(P) * C`` sentences of the call, in order (prompt-major: the C classes of prompt 0, then of
                prompt 1, ...); its closures see the hidden states of all of them. Not together with ``deep``.

        Returns:
            [*P, C, E] unnormalised text features.
        """
        n_cls, length, dim = tokens.embeddings.shape
        if class_specific:
            lead = ctx.shape[:-3]
        else:
            lead = ctx.shape[:-2]
            ctx = ctx.unsqueeze(-3).expand(*lead, n_cls, tokens.n_ctx, dim)
        emb = tokens.embeddings.to(ctx.dtype)
        emb = emb.expand(*lead, n_cls, length, dim)
        x = torch.cat([emb[..., :1, :], ctx, emb[..., 1 + tokens.n_ctx:, :]], dim=-2)
        flat = x.reshape(-1, length, dim)
        repeat = flat.shape[0] // n_cls
        encode = self._compiled_text or self._encode_embeddings
        if tuning is not None:
            if deep is not None and deep.shape[-3] > 0:
                raise FedPromptError("backbone.encode_prompts: deep text prompts and a tower tuning cannot be "
                                     "combined in one call.")
            self.check_tunable("text", "backbone.encode_prompts")
            features = self._encode_embeddings(flat, tokens.attention_mask.repeat(repeat, 1),
                                               tokens.pool_index.repeat(repeat), tuning=tuning)
        elif deep is not None and deep.shape[-3] > 0:
            deep = self._deep_text_prompts(deep, lead, tokens.n_ctx, dim, n_cls)
            features = encode(flat, tokens.attention_mask.repeat(repeat, 1), tokens.pool_index.repeat(repeat), deep)
        else:
            features = encode(flat, tokens.attention_mask.repeat(repeat, 1), tokens.pool_index.repeat(repeat))
        return features.reshape(*lead, n_cls, -1)

    @property
    def text_layers(self) -> int:
        """Number of transformer layers of the text tower (the largest deep text-prompt depth J)."""
        if self.is_hf_text:
            encoder = getattr(self.model.text.transformer, "encoder", None)
            return len(encoder.layer) if encoder is not None and hasattr(encoder, "layer") else 0
        return len(self.model.transformer.resblocks)

    @property
    def supports_deep_text_prompts(self) -> bool:
        """Whether :meth:`encode_prompts` takes ``deep`` prompts (open_clip's CLIP text transformer; not HF towers)."""
        return not self.is_hf_text

    def _deep_text_prompts(self, deep: torch.Tensor, lead: tuple, n_ctx: int, dim: int, n_cls: int) -> torch.Tensor:
        """``deep`` checked and flattened to [prod(P), J - 1, n_ctx, D] (one row per prompt of the flat batch), or
        [prod(P) * C, J - 1, n_ctx, D] (one per sentence) when it has a class dimension."""
        if not self.supports_deep_text_prompts:
            raise FedPromptError(f"backbone: deep text prompts need open_clip's CLIP text transformer, but "
                                 f"'{self.name}' has a Hugging Face text tower; use text_depth: 1 (shallow) or a CLIP "
                                 "backbone.")
        layers = self.text_layers
        if tuple(deep.shape[:-3]) not in (tuple(lead), (*lead, n_cls)) or tuple(deep.shape[-2:]) != (n_ctx, dim) \
                or not deep.shape[-3] < layers:
            raise FedPromptError(f"backbone.encode_prompts: deep prompts of shape {tuple(deep.shape)}; expected "
                                 f"[{', '.join(map(str, lead)) + ', ' if lead else ''}J - 1, {n_ctx}, {dim}] with "
                                 f"J <= {layers} (the text tower's layers).")
        return deep.reshape(-1, *deep.shape[-3:])

    _compiled_text = None

    def compile_text(self, enabled: bool = True, backend: str = "inductor", mode: str | None = None) -> None:
        """Run the prompt text path (:meth:`encode_prompts`) as a compiled graph (``torch.compile``), or eagerly
        again with ``enabled=False``. The default mode is ``reduce-overhead`` on CUDA (CUDA graphs: the 12 text
        layers' small kernels replay without launch overhead) and ``default`` elsewhere; each new batch shape
        (another number of active clients) compiles once. Features equal the eager path up to float rounding."""
        if not enabled:
            self.__dict__["_compiled_text"] = None
            return
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.__dict__["_compiled_text"] = torch.compile(self._encode_embeddings, backend=backend, mode=mode,
                                                        dynamic=False)

    def _encode_embeddings(self, x: torch.Tensor, mask: torch.Tensor, pool_index: torch.Tensor,
                           deep: torch.Tensor | None = None, tuning: TowerTuning | None = None) -> torch.Tensor:
        if self.is_hf_text:
            text = self.model.text
            if tuning is None:
                out = text.transformer(inputs_embeds=x, attention_mask=mask)
            else:
                with hf_tuning(hf_layers(text), tuning, self.name):
                    out = text.transformer(inputs_embeds=x, attention_mask=mask)
            return text.proj(text.pooler(out, mask))
        m = self.model
        length = x.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = x.to(cast) + m.positional_embedding[:length].to(cast)
        attn_mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
        if tuning is not None:
            x = run_tuned_blocks(m.transformer, x, attn_mask, tuning, "text", self.name)
        elif deep is None:
            x = m.transformer(x, attn_mask=attn_mask)
        else:
            rows = x.shape[0] // deep.shape[0]  # the classes of each prompt

            def replace(i: int, h: torch.Tensor, batch_first: bool) -> torch.Tensor:
                fresh = deep[:, i - 1].to(h.dtype)  # [prod(P), n_ctx, D]
                fresh = fresh.unsqueeze(1).expand(-1, rows, -1, -1).reshape(-1, *fresh.shape[1:])
                n_ctx = fresh.shape[1]
                if batch_first:
                    return torch.cat([h[:, :1], fresh, h[:, 1 + n_ctx:]], dim=1)
                return torch.cat([h[:1], fresh.transpose(0, 1), h[1 + n_ctx:]], dim=0)

            x = self._run_blocks(m.transformer, x, attn_mask, deep.shape[1], replace)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pool_index]
        if m.text_projection is None:
            return x
        return m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """open_clip's own ``encode_text`` on plain sentences (the reference the prompt path is tested against)."""
        return self.model.encode_text(self.tokenize(texts).to(self.device))

    # -------------------------------------------------------------------------------------------- image side
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, projected, unnormalised image features [B, E]."""
        return self.model.encode_image(images)

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [B, E] and projected local features [B, M, E] from one pass of the image tower.

        ViT: the patch tokens after ``ln_post`` and ``proj`` (M = grid^2). timm towers with a linear head: each
        spatial position of the last feature map through the head (M = H*W; their mean is the pooled feature).
        ModifiedResNet (RN50): the attention pool applied to every position, as the official FedOTP code does.
        """
        visual = self.model.visual
        kind = type(visual).__name__
        if kind == "VisionTransformer":
            return self._vit_tokens(visual, images)
        if kind == "TimmModel":
            return self._timm_tokens(visual, images)
        if kind == "ModifiedResNet":
            return self._resnet_tokens(visual, images)
        raise FedPromptError(f"backbone: patch tokens are not available for image tower {kind}.")

    # ------------------------------------------------------------------------- tuned towers (LoRA, adapters)
    def tunable_layers(self, tower: str) -> int:
        """The transformer blocks of ``tower`` (``text`` or ``visual``) that LoRA and block adapters can enter (0 when
        the tower has none: timm CNNs, ModifiedResNet, or a Hugging Face text tower that is not BERT-like)."""
        if tower == "text":
            if self.is_hf_text:
                layers = hf_layers(self.model.text)
                return 0 if layers is None else len(layers)
            return len(self.model.transformer.resblocks)
        visual = self.model.visual
        return len(visual.transformer.resblocks) if type(visual).__name__ == "VisionTransformer" else 0

    def check_tunable(self, tower: str, setting: str, fix: str | None = None) -> None:
        """One error line naming ``setting`` (and what to do: ``fix``) when ``tower`` has no transformer blocks to
        tune."""
        if self.tunable_layers(tower) == 0:
            kind = type(self.model.text if tower == "text" and self.is_hf_text else
                        self.model if tower == "text" else self.model.visual).__name__
            fix = fix or f"leave the {tower} tower out of this setting"
            raise FedPromptError(f"{setting}: LoRA and block adapters enter the {tower} tower's transformer blocks, "
                                 f"but '{self.name}' has a {kind} {tower} tower without such blocks; {fix} "
                                 "(adapters on pooled features still apply).")

    def tower_width(self, tower: str) -> int:
        """The width of the hidden states of ``tower``'s blocks (768 for ViT-B/16's image tower, 512 for its text)."""
        self.check_tunable(tower, f"backbone.tower_width({tower!r})")
        if tower == "visual":
            return int(self.model.visual.transformer.width)
        if self.is_hf_text:
            return int(self.model.text.config.hidden_size)
        return int(self.model.transformer.width)

    def lora_features(self, tower: str, target: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of the linear layer ``target`` (:data:`LORA_TARGETS`) in ``tower``'s
        blocks (the same in every block)."""
        if target not in LORA_TARGETS:
            raise FedPromptError(f"LoRA target {target!r}: choose from {', '.join(LORA_TARGETS)}.")
        self.check_tunable(tower, f"LoRA on the {tower} tower")
        if tower == "text" and self.is_hf_text:
            layer = hf_layers(self.model.text)[0].get_submodule(HF_LINEARS[target])
            return int(layer.in_features), int(layer.out_features)
        width = self.tower_width(tower)
        blocks = (self.model.visual.transformer if tower == "visual" else self.model.transformer).resblocks
        hidden = int(blocks[0].mlp.c_fc.out_features)
        return {"mlp_in": (width, hidden), "mlp_out": (hidden, width)}.get(target, (width, width))

    def encode_image_tuned(self, images: torch.Tensor, tuning: TowerTuning) -> torch.Tensor:
        """Pooled, projected, unnormalised image features ``[B, E]`` of a ViT tower run with ``tuning`` (LoRA and
        block adapters, each image with its own client's weights: the tuning's closures say how); the tower's own
        embedding, pooling and projection (with an empty tuning this is :meth:`encode_image`)."""
        self.check_tunable("visual", "backbone.encode_image_tuned")
        visual = self.model.visual
        x = visual._embeds(images)
        x = run_tuned_blocks(visual.transformer, x, None, tuning, "visual", self.name)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled

    # ------------------------------------------------------------------------------- visual prompt tokens
    @property
    def supports_visual_prompts(self) -> bool:
        """Whether the image tower has a token sequence that visual prompts can join (open_clip ViT towers)."""
        return type(self.model.visual).__name__ == "VisionTransformer"

    def _prompt_tower(self, what: str):
        visual = self.model.visual
        if not self.supports_visual_prompts:
            raise FedPromptError(
                f"backbone.{what}: visual prompt tokens need a ViT image tower (open_clip VisionTransformer), but "
                f"'{self.name}' has a {type(visual).__name__} image tower without a token sequence; use a ViT "
                "backbone or disable the visual prompts (visual_groups: 0).")
        return visual

    @property
    def visual_width(self) -> int:
        """Width of the ViT image tower's tokens (the size of one visual prompt token; 768 for ViT-B/16)."""
        return int(self._prompt_tower("visual_width").transformer.width)

    @property
    def visual_layers(self) -> int:
        """Number of transformer layers of the ViT image tower (the largest deep-prompt depth)."""
        return len(self._prompt_tower("visual_layers").transformer.resblocks)

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The input tokens of a ViT image tower before ``ln_pre``: patch embedding, class token first, positional
        embedding added (``[B, 1 + grid^2, width]``; FedMVP's PromptFormer queries its patch rows)."""
        visual = self._prompt_tower("patch_embeddings")
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)

    @staticmethod
    def group_index(owner: torch.Tensor, groups: int) -> torch.Tensor:
        """The ``index`` of :meth:`encode_image_prompted` for images of several clients, G prompt groups each.

        With the clients' prompts stacked as ``[K, G, V, width]`` and flattened to ``[K * G, V, width]``, row
        ``(g, b)`` of the result is ``owner[b] * G + g``: image b seen with group g of its own client.

        Args:
            owner: [B] client position (0 .. K-1) of each image.
            groups: prompt groups per client (G).

        Returns:
            [G, B] long tensor.
        """
        offsets = torch.arange(groups, device=owner.device, dtype=torch.long)
        return owner.long().unsqueeze(0) * groups + offsets.unsqueeze(1)

    def encode_image_prompted(self, images: torch.Tensor, prompts: torch.Tensor,
                              index: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled, projected, unnormalised image features of a ViT tower that also sees learnable prompt tokens.

        The images are patch-embedded once (class token, positional embedding); each row then gets the V prompt
        tokens of its prompt set appended after the patch tokens (no positional embedding), the tower's ``ln_pre``
        applies to them as to every input token, and the transformer runs once over all rows. Deep prompts
        (MaPLe / VPT-deep) replace the prompt outputs of the previous layer with fresh tokens at each of the first
        ``depth`` layers (the layer-0 tokens are the input tokens and go through ``ln_pre``; deeper ones enter as
        they are). After the last layer the prompt outputs are dropped and the tower's own pooling runs on the
        remaining sequence (open_clip's ``_pool``: ``ln_post`` and the class token, or the patch mean for
        ``pool_type='avg'``, or the attentional pool), then ``proj``. With V = 0 this is exactly
        :meth:`encode_image`. The tower stays frozen; gradients reach ``prompts``.

        Args:
            images: [B, 3, H, W] preprocessed images.
            prompts: P prompt sets, shallow ``[P, V, width]`` or deep ``[P, depth, V, width]`` (1 <= depth <=
                :attr:`visual_layers`; ``depth = 1`` equals the shallow form).
            index: which prompt set each output row uses. ``None``: every image with every prompt set, output
                ``[P, B, E]`` (FedMGP's G groups for one client's batch). A long tensor ``[*R, B]`` with values in
                ``0 .. P-1``: output ``[*R, B, E]`` whose row ``(r, b)`` is image b with ``prompts[index[r, b]]``
                (e.g. ``[B]`` for one prompt set per image, or :meth:`group_index` for the G groups of each
                image's own client when several clients' images share one call).

        Returns:
            ``[P, B, E]`` (no ``index``) or ``[*R, B, E]``.
        """
        visual = self._prompt_tower("encode_image_prompted")
        layers = self._layer_prompts(prompts, visual)  # [P, depth, V, width]
        x = visual._embeds(images)  # [B, N, width]: patch embedding, class token, positions, ln_pre (per token)
        batch, n_tokens, width = x.shape
        if index is None:
            index = torch.arange(layers.shape[0], device=x.device).unsqueeze(1).expand(-1, batch)
        if index.shape[-1] != batch:
            raise FedPromptError(f"backbone.encode_image_prompted: index has shape {tuple(index.shape)}; its last "
                                 f"dimension must be the batch size {batch}.")
        lead, rows = index.shape[:-1], index.reshape(-1)
        x = x.unsqueeze(0).expand(rows.numel() // batch, batch, n_tokens, width).reshape(-1, n_tokens, width)
        first = visual.ln_pre(layers[:, 0].to(x.dtype))[rows]  # [R*B, V, width]
        x = torch.cat([x, first.to(x.dtype)], dim=1)
        if layers.shape[1] == 1:
            x = visual.transformer(x)
        else:
            x = self._deep_transformer(visual.transformer, x, layers[:, 1:], rows, n_tokens)
        pooled, _ = visual._pool(x[:, :n_tokens])
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled.reshape(*lead, batch, pooled.shape[-1])

    @staticmethod
    def _layer_prompts(prompts: torch.Tensor, visual) -> torch.Tensor:
        width, n_layers = visual.transformer.width, len(visual.transformer.resblocks)
        if prompts.dim() == 3:
            prompts = prompts.unsqueeze(1)
        if prompts.dim() != 4 or prompts.shape[-1] != width or not 1 <= prompts.shape[1] <= n_layers:
            raise FedPromptError(
                f"backbone.encode_image_prompted: prompts of shape {tuple(prompts.shape)}; expected [P, V, {width}] "
                f"(shallow) or [P, depth, V, {width}] with 1 <= depth <= {n_layers} (deep).")
        return prompts

    @staticmethod
    def _run_blocks(transformer, x: torch.Tensor, attn_mask: torch.Tensor | None, deep_layers: int,
                    replace) -> torch.Tensor:
        """open_clip's ``Transformer.forward`` on batch-first ``x`` with ``x = replace(i, x, batch_first)`` before
        layer i for 1 <= i <= ``deep_layers`` (deep prompts: the text context rows, or the visual prompt rows)."""
        batch_first = getattr(transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1).contiguous()  # NLD -> LND
        for i, block in enumerate(transformer.resblocks):
            if 1 <= i <= deep_layers:
                x = replace(i, x, batch_first)
            x = block(x, attn_mask=attn_mask)
        return x if batch_first else x.transpose(0, 1)

    @classmethod
    def _deep_transformer(cls, transformer, x: torch.Tensor, deeper: torch.Tensor, rows: torch.Tensor,
                          n_tokens: int) -> torch.Tensor:
        """The image tower's transformer with the prompt outputs replaced by ``deeper[:, i - 1]`` before layer i
        (1 <= i <= deeper.shape[1])."""
        def replace(i: int, h: torch.Tensor, batch_first: bool) -> torch.Tensor:
            fresh = deeper[:, i - 1].to(h.dtype)[rows]  # [R*B, V, width]
            if batch_first:
                return torch.cat([h[:, :n_tokens], fresh], dim=1)
            return torch.cat([h[:n_tokens], fresh.transpose(0, 1)], dim=0)

        return cls._run_blocks(transformer, x, None, deeper.shape[1], replace)

    @staticmethod
    def _vit_tokens(visual, images):
        if visual.attn_pool is not None or visual.final_ln_after_pool:
            raise FedPromptError("backbone: patch tokens need a ViT without attentional pooling.")
        x = visual._embeds(images)
        x = visual.transformer(x)
        x = visual.ln_post(x)
        pooled, tokens = visual._global_pool(x)
        if visual.proj is not None:
            pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
        return pooled, tokens

    @staticmethod
    def _timm_tokens(visual, images):
        head = visual.head
        if not all(isinstance(layer, (nn.Linear, nn.Dropout, nn.Identity)) for layer in head):
            raise FedPromptError("backbone: spatial tokens need a timm tower whose head is a linear projection.")
        fmap = visual.trunk.forward_features(images)
        pooled = head(visual.trunk.forward_head(fmap))
        tokens = head(fmap.flatten(2).transpose(1, 2))
        return pooled, tokens

    @staticmethod
    def _resnet_tokens(visual, images):
        x = visual.stem(images.to(visual.conv1.weight.dtype))
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        pool = visual.attnpool
        x = x.flatten(2).permute(2, 0, 1)  # [HW, B, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
        out = out.permute(1, 0, 2)
        return out[:, 0], out[:, 1:]


_CACHE: dict[tuple, Backbone] = {}


def load_backbone(model: str = "ViT-B-16", pretrained: str | None = "openai", truncate: bool = True,
                  cache_dir: str | None = None) -> Backbone:
    """Load (once per process) the frozen backbone shared by every client.

    Args:
        model: open_clip architecture name (``ViT-B-16``, ``RN50``, ``fedprompt-tiny`` ...) or ``hf-hub:org/repo``.
        pretrained: open_clip tag (needs network), local checkpoint file, local model folder, or ``None``
            for random init.
        truncate: exact end-of-text truncation of prompt batches (``False`` runs all 77 positions).
        cache_dir: download cache for pretrained tags.
    """
    if pretrained and os.path.isdir(pretrained):  # a local model folder defines the architecture itself
        model, pretrained = "", os.path.realpath(pretrained)
    # a random-init model depends on the torch seed: cache it per seed so in-process runs stay reproducible
    key = (model, pretrained, truncate, cache_dir, torch.initial_seed() if pretrained is None else None)
    if key not in _CACHE:
        _CACHE[key] = Backbone(load_open_clip(model, pretrained, cache_dir), truncate=truncate)
    return _CACHE[key]
