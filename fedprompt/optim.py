"""The local optimiser of the lock-step engine: SGD over parameters whose leading dimension indexes clients.

It lives here, below both the client modules (:mod:`fedprompt.methods`, whose ``configure_optimizers`` builds it)
and the engine (:mod:`fedprompt.federation.engine`, which steps it), so that neither imports the other.
"""

from __future__ import annotations

import torch


class StackedSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay (``torch.optim.SGD``'s update, dampening 0, not Nesterov) for parameters
    whose leading dimension indexes clients.

    Before each :meth:`step`, :meth:`set_slots` says which slots take part and their learning rates; the other slots
    (clients that ran out of local data) are left untouched, parameters and momentum alike. For one slot this is
    exactly ``torch.optim.SGD`` (tested), so K clients stepped together equal K separate optimizers.

    A step reads nothing back from the device: which slots are active and which have a momentum buffer yet is kept
    on the host (as Python booleans), and the per-slot masks and rates are copied to the device once per step without
    blocking.

    Two optional keys of a parameter group serve parts of a client that follow their own rule:

    - ``own_lr: True``: the group keeps its own ``lr`` (a constant rate, e.g. pFedMoAP's gating network) instead of
      the per-slot rates of :meth:`set_slots` (the schedule of the prompts);
    - ``held``: host booleans, one per slot (``None`` or absent: none), set by the client before a step: those slots
      of the group take no step at all, as ``torch.optim.SGD`` skips a parameter without a gradient (pFedMoAP's
      gating of a client that has no experts yet). A client whose part is not used in a step is then stepped the
      same way whether it trains alone or in a lock-step group.

    Args:
        params: parameters with a leading client dimension (or parameter groups).
        lr: learning rate of every slot unless :meth:`set_slots` gives per-slot rates.
        momentum: momentum factor.
        weight_decay: L2 penalty added to the gradient.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD settings lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self._active: list[bool] | None = None  # which of the first n slots the next step updates
        self._slot_lr: torch.Tensor | None = None  # host float64 [n]
        self._on_device: dict = {}  # (what, device, dtype) -> the step's mask or rates on that device

    def keep_momentum(self, param: torch.Tensor, buffer: torch.Tensor) -> None:
        """Keep ``param``'s momentum in ``buffer`` (a tensor of its shape, updated in place), started for every slot:
        optimizer state that outlives this optimizer (e.g. a client module's persistent buffer, which is part of the
        client state, so it is checkpointed and resumed with it). A zero buffer steps exactly as a fresh one (its
        first update is ``0 * momentum + d_p = d_p``)."""
        if buffer.shape != param.shape:
            raise ValueError(f"momentum buffer of shape {tuple(buffer.shape)} for a parameter {tuple(param.shape)}")
        self.state[param] = {"momentum_buffer": buffer, "started": [True] * param.shape[0]}

    def set_slots(self, active, lr: torch.Tensor) -> None:
        """The slots updated by the next step (``n`` booleans: a list or a host tensor) and their learning rates (a
        host tensor ``[n]``), for the first n slots of every parameter (a group smaller than the module leaves its
        last slots out of the update entirely)."""
        values = active.tolist() if isinstance(active, torch.Tensor) else active
        self._active, self._slot_lr = [bool(a) for a in values], lr.cpu()
        self._on_device = {}

    def _device_copy(self, what: str, value, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``value`` (a host tensor or list of this step) on ``device``, copied once per step without blocking."""
        key = (what, device, dtype)
        if key not in self._on_device:
            self._on_device[key] = torch.as_tensor(value).to(device=device, dtype=dtype, non_blocking=True)
        return self._on_device[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        """One SGD update of the active slots. With every slot active the update runs in place; otherwise the
        inactive slots keep their values through ``torch.where``. Both use the same float operations, so a client's
        update does not depend on which other slots are active."""
        shape = (-1,) + (1,) * (param.dim() - 1)
        active = [True] * param.shape[0] if self._active is None else self._active
        held = group.get("held")
        if held is not None:
            active = [a and not (i < len(held) and held[i]) for i, a in enumerate(active)]
            if not any(active):
                return
        used = len(active)
        full, param = param, param[:used]  # views: in-place updates reach the parameter
        if self._slot_lr is not None and not group.get("own_lr"):
            lr = self._device_copy("lr", self._slot_lr, param.device, param.dtype).view(shape)
        else:
            lr = group["lr"]
        d_p = full.grad[:used]
        if group["weight_decay"]:
            d_p = d_p.add(param, alpha=group["weight_decay"])
        every = all(active)  # host booleans: no device sync
        if group["momentum"]:
            state = self.state[full]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(full)
                state["started"] = [False] * full.shape[0]  # host: which slots have a buffer
            started = state["started"]
            d_p = self._momentum(state["momentum_buffer"][:used], started[:used], active, d_p, group["momentum"],
                                 every, param.device, shape)
            state["started"] = [s or (i < used and active[i]) for i, s in enumerate(started)]
        if every:
            param.sub_(lr * d_p)
        else:
            mask = self._device_copy(("active", tuple(active)), active, param.device, torch.bool).view(shape)
            param.copy_(torch.where(mask, param - lr * d_p, param))

    def _momentum(self, buf: torch.Tensor, started: list[bool], active: list[bool], d_p: torch.Tensor,
                  momentum: float, every: bool, device: torch.device, shape: tuple) -> torch.Tensor:
        """Update the momentum buffer of the active slots (a slot's first step sets it to ``d_p``, as
        ``torch.optim.SGD``); returns the buffer (the step direction)."""
        fresh = [a and not s for a, s in zip(active, started)]
        if every and not any(fresh):
            buf.mul_(momentum).add_(d_p)
        elif every and all(fresh):
            buf.copy_(d_p)
        else:
            fresh_mask = torch.tensor(fresh).to(device, non_blocking=True).view(shape)
            update = buf * momentum + d_p
            if not every:
                active_mask = self._device_copy(("active", tuple(active)), active, device, torch.bool).view(shape)
                update = torch.where(active_mask, update, buf)
            buf.copy_(torch.where(fresh_mask, d_p, update))
        return buf
