"""Learnable prompt tensors (nothing else): CoOp context vectors and their initialisation."""

from fedprompt.prompts.context import ContextVectors, init_context

__all__ = ["ContextVectors", "init_context"]
