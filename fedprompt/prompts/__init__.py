"""Learnable prompt tensors (nothing else): CoOp context vectors and their initialisation, FedPGP's low-rank term,
FedTPG's generator."""

from fedprompt.prompts.context import ContextVectors, init_context
from fedprompt.prompts.generator import GEGLU, PromptGenerator
from fedprompt.prompts.lowrank import LowRankContext

__all__ = ["ContextVectors", "GEGLU", "LowRankContext", "PromptGenerator", "init_context"]
