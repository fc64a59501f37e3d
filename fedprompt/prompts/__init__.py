"""Learnable prompt tensors (nothing else): CoOp context vectors and their initialisation, FedTPG's generator."""

from fedprompt.prompts.context import ContextVectors, init_context
from fedprompt.prompts.generator import GEGLU, PromptGenerator

__all__ = ["ContextVectors", "GEGLU", "PromptGenerator", "init_context"]
