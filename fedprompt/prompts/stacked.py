"""A small network per client slot: a module's parameters stacked along a leading client dimension.

Prompt methods whose learnable part is a network rather than prompt vectors (FedTPG's prompt generator) keep one
copy of the network per client slot, like every other prompt tensor (see :class:`fedprompt.methods.PromptClient`).
:class:`SlotStacked` stores the copies as parameters of shape ``[slots, *shape]`` under the network's own names and
runs the network for several slots in one call with ``torch.func.functional_call`` under ``torch.vmap``.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.func import functional_call, vmap


class SlotStacked(nn.Module):
    """``slots`` copies of ``template``'s parameters, stacked: the state keys are the template's parameter names
    with a leading client dimension (every slot starts from the template's values).

    Args:
        template: the network (its parameters are the initial value of every slot; it is kept as the function that
            :meth:`forward` evaluates, not as a submodule).
        slots: number of client slots.
    """

    def __init__(self, template: nn.Module, slots: int):
        super().__init__()
        self.__dict__["template"] = template
        self.names = [name for name, _ in template.named_parameters()]
        if any(True for _ in template.buffers()):
            raise ValueError("SlotStacked: the template must hold parameters only (no buffers)")
        stacked = copy.deepcopy(template)
        for name in self.names:
            owner_name, _, leaf = name.rpartition(".")
            owner = stacked.get_submodule(owner_name) if owner_name else stacked
            value = getattr(owner, leaf).detach()
            delattr(owner, leaf)
            owner.register_parameter(leaf, nn.Parameter(value.unsqueeze(0).repeat(slots, *[1] * value.dim())))
        # adopt the copy's structure, so that the state keys are the template's own parameter names
        for name, child in stacked.named_children():
            self.add_module(name, child)
        for name, param in stacked.named_parameters(recurse=False):
            self.register_parameter(name, param)

    def single(self, slot: int, *args: torch.Tensor) -> torch.Tensor:
        """The network of one slot (a host integer) applied to ``args`` as they are (no client dimension): for inputs
        whose size differs between clients, e.g. each client's own images (gradients reach that slot only)."""
        params = dict(self.named_parameters())
        return functional_call(self.template, {name: params[name][slot] for name in self.names}, args)

    def forward(self, slots: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        """The network of each slot in ``slots`` ``[A]`` applied to its inputs ``args`` (each with leading dim A)."""
        params = dict(self.named_parameters())
        chosen = {name: params[name][slots] for name in self.names}

        def one(weights, *inputs):
            return functional_call(self.template, weights, inputs)

        with warnings.catch_warnings():  # vmap has no batching rule for fused attention: a (correct) loop inside
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            return vmap(one)(chosen, *args)
