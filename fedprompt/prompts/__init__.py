"""Learnable prompt tensors (nothing else): CoOp context vectors, FedPGP's low-rank term, visual prompt tokens,
FedTPG's generator, FedMVP's PromptFormer, MaPLe's coupling functions, and a network stacked per client slot."""

from fedprompt.prompts.context import ContextVectors, init_context
from fedprompt.prompts.coupling import Coupling, couple
from fedprompt.prompts.former import PromptFormer
from fedprompt.prompts.generator import GEGLU, PromptGenerator
from fedprompt.prompts.lowrank import LowRankContext, low_rank_product
from fedprompt.prompts.stacked import SlotStacked
from fedprompt.prompts.visual import VisualPrompts, init_visual_tokens

__all__ = ["ContextVectors", "Coupling", "GEGLU", "LowRankContext", "PromptFormer", "PromptGenerator", "SlotStacked",
           "VisualPrompts", "couple", "init_context", "init_visual_tokens", "low_rank_product"]
