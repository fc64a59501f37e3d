"""The local optimiser of the lock-step engine: SGD over parameters whose leading dimension indexes clients.

It lives here, below both the client modules (:mod:`fedprompt.methods`, whose ``configure_optimizers`` builds it)
and the engine (:mod:`fedprompt.federation.engine`, which steps it), so that neither imports the other.
"""

from __future__ import annotations

import torch


class SlotOptimizer(torch.optim.Optimizer):
    """What the stacked optimizers share: per-step active slots and learning rates (:meth:`set_slots`, set by the
    engine), the ``own_lr`` and ``held`` keys of a parameter group (see :class:`StackedSGD`), and the per-step device
    copies of masks and rates (copied once per step without blocking)."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self._active: list[bool] | None = None  # which of the first n slots the next step updates
        self._slot_lr: torch.Tensor | None = None  # host float64 [n]
        self._on_device: dict = {}  # (what, device, dtype) -> the step's mask or rates on that device

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

    def _active_slots(self, param: torch.Tensor, group: dict) -> list[bool]:
        """The slots of ``param`` the next step updates (the engine's, minus the group's ``held`` ones)."""
        active = [True] * param.shape[0] if self._active is None else self._active
        held = group.get("held")
        if held is not None:
            active = [a and not (i < len(held) and held[i]) for i, a in enumerate(active)]
        return active

    def _slot_rates(self, param: torch.Tensor, group: dict, shape: tuple):
        """The learning rate of each slot, shaped to broadcast over ``param`` (or the group's one rate)."""
        if self._slot_lr is not None and not group.get("own_lr"):
            return self._device_copy("lr", self._slot_lr, param.device, param.dtype).view(shape)
        return group["lr"]

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
        raise NotImplementedError


class StackedSGD(SlotOptimizer):
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

    def keep_momentum(self, param: torch.Tensor, buffer: torch.Tensor) -> None:
        """Keep ``param``'s momentum in ``buffer`` (a tensor of its shape, updated in place), started for every slot:
        optimizer state that outlives this optimizer (e.g. a client module's persistent buffer, which is part of the
        client state, so it is checkpointed and resumed with it). A zero buffer steps exactly as a fresh one (its
        first update is ``0 * momentum + d_p = d_p``)."""
        if buffer.shape != param.shape:
            raise ValueError(f"momentum buffer of shape {tuple(buffer.shape)} for a parameter {tuple(param.shape)}")
        self.state[param] = {"momentum_buffer": buffer, "started": [True] * param.shape[0]}

    def _update(self, param: torch.Tensor, group: dict) -> None:
        """One SGD update of the active slots. With every slot active the update runs in place; otherwise the
        inactive slots keep their values through ``torch.where``. Both use the same float operations, so a client's
        update does not depend on which other slots are active."""
        shape = (-1,) + (1,) * (param.dim() - 1)
        active = self._active_slots(param, group)
        if group.get("held") is not None and not any(active):
            return
        used = len(active)
        full, param = param, param[:used]  # views: in-place updates reach the parameter
        lr = self._slot_rates(param, group, shape)
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


class StackedAdam(SlotOptimizer):
    """Adam (``torch.optim.Adam``'s update, not AMSGrad) or, with ``decoupled``, AdamW, for parameters whose leading
    dimension indexes clients; :meth:`set_slots`, ``own_lr`` and ``held`` as :class:`StackedSGD`.

    Each slot counts its own steps (a client that ran out of local data, or is held, neither moves nor advances its
    bias corrections), so for one slot this is ``torch.optim.Adam`` / ``AdamW`` exactly up to float rounding
    (tested), and K clients stepped together equal K separate optimizers. The step counts live on the host.

    Args:
        params: parameters with a leading client dimension (or parameter groups).
        lr: learning rate of every slot unless :meth:`set_slots` gives per-slot rates.
        betas: the moment decay rates.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient (Adam) or decoupled decay ``p -= lr * wd * p`` (AdamW).
        decoupled: AdamW's decoupled weight decay.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid Adam settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decoupled=decoupled))

    def _update(self, param: torch.Tensor, group: dict) -> None:
        """One Adam(W) update of the active slots; the inactive slots keep their values and moments (``torch.where``)."""
        shape = (-1,) + (1,) * (param.dim() - 1)
        active = self._active_slots(param, group)
        if not any(active):
            return
        used = len(active)
        full, param = param, param[:used]
        lr = self._slot_rates(param, group, shape)
        beta1, beta2 = group["betas"]
        state = self.state[full]
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(full), torch.zeros_like(full)
            state["steps"] = [0] * full.shape[0]  # host: each slot's own step count
        steps = [n + 1 if i < used and active[i] else n for i, n in enumerate(state["steps"])]
        state["steps"] = steps
        grad = full.grad[:used]
        new = param
        if group["weight_decay"]:
            if group["decoupled"]:
                new = param * (1 - lr * group["weight_decay"])
            else:
                grad = grad.add(param, alpha=group["weight_decay"])
        exp_avg = state["exp_avg"][:used].lerp(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][:used] * beta2 + (1 - beta2) * grad * grad
        counts = [max(n, 1) for n in steps[:used]]
        step_size = torch.tensor([1.0 / (1 - beta1 ** n) for n in counts], dtype=torch.float64)
        root = torch.tensor([(1 - beta2 ** n) ** 0.5 for n in counts], dtype=torch.float64)
        key = tuple(counts)
        step_size = self._device_copy(("adam_step", key), step_size, param.device, param.dtype).view(shape)
        root = self._device_copy(("adam_root", key), root, param.device, param.dtype).view(shape)
        new = new - lr * step_size * exp_avg / (exp_avg_sq.sqrt() / root + group["eps"])
        if all(active):
            param.copy_(new)
            state["exp_avg"][:used].copy_(exp_avg)
            state["exp_avg_sq"][:used].copy_(exp_avg_sq)
            return
        mask = self._device_copy(("active", tuple(active)), active, param.device, torch.bool).view(shape)
        param.copy_(torch.where(mask, new, param))
        state["exp_avg"][:used].copy_(torch.where(mask, exp_avg, state["exp_avg"][:used]))
        state["exp_avg_sq"][:used].copy_(torch.where(mask, exp_avg_sq, state["exp_avg_sq"][:used]))
