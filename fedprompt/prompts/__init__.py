"""Learnable prompt tensors (nothing else): CoOp context vectors, visual prompt tokens, their initialisation."""

from fedprompt.prompts.context import ContextVectors, init_context
from fedprompt.prompts.visual import VisualPrompts, init_visual_tokens

__all__ = ["ContextVectors", "VisualPrompts", "init_context", "init_visual_tokens"]
