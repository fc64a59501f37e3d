"""The client-parallel engine: K clients of a round trained together, in lock-step, on one device.

Their prompts sit stacked in one client module (slot k = client k of the group, see
:class:`fedprompt.methods.PromptClient`). Each step concatenates the K clients' batches, runs the image tower once,
the text encoder once on every client's prompts, the method's logits (FedOTP: one OT solve over every image and
class), and one optimizer step over the stacked parameters. The loss is the sum of the per-client mean losses, so
every client's gradient is exactly its own, and :class:`StackedSGD` applies each client's own SGD update (momentum,
weight decay, learning rate) to its slice only. A client whose plan has ended drops out of the batch while the
others go on. K = 1 is the same code, and any K gives the K = 1 results up to float rounding.

Failures stay with their client: a non-finite loss marks that client failed (its gradients never reach the others';
its state is not used), and an exception in a group is retried client by client so that it is reported with the
right client id. Running out of device memory halves K and retries the group (when K was chosen automatically).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedprompt.errors import FedPromptError
from fedprompt.federation.feed import Feed, LocalPlan

State = dict[str, torch.Tensor]


class StackedSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay (``torch.optim.SGD``'s update, dampening 0, not Nesterov) for parameters
    whose leading dimension indexes clients.

    Before each :meth:`step`, :meth:`set_slots` says which slots take part and their learning rates; the other slots
    (clients that ran out of local data) are left untouched, parameters and momentum alike. For one slot this is
    exactly ``torch.optim.SGD`` (tested), so K clients stepped together equal K separate optimizers.

    Args:
        params: parameters with a leading client dimension.
        lr: learning rate of every slot unless :meth:`set_slots` gives per-slot rates.
        momentum: momentum factor.
        weight_decay: L2 penalty added to the gradient.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD settings lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self._active: torch.Tensor | None = None
        self._slot_lr: torch.Tensor | None = None

    def set_slots(self, active: torch.Tensor, lr: torch.Tensor) -> None:
        """The slots updated by the next step (bool ``[n]``) and their learning rates (``[n]``), for the first n slots
        of every parameter (a group smaller than the module leaves its last slots out of the update entirely)."""
        self._active, self._slot_lr = active, lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        every = self._active is None or bool(self._active.all())  # a CPU tensor: no device sync
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group, every)
        return loss

    def _update(self, param: torch.Tensor, group: dict, every: bool) -> None:
        """One SGD update of the active slots. With every slot active the update runs in place; otherwise the
        inactive slots keep their values through ``torch.where``. Both use the same float operations, so a client's
        update does not depend on which other slots are active."""
        shape = (-1,) + (1,) * (param.dim() - 1)
        used = param.shape[0] if self._active is None else self._active.shape[0]
        full, param = param, param[:used]  # views: in-place updates reach the parameter
        lr = self._slot_lr.to(param.device, param.dtype).view(shape) if self._slot_lr is not None else group["lr"]
        d_p = full.grad[:used]
        if group["weight_decay"]:
            d_p = d_p.add(param, alpha=group["weight_decay"])
        state = self.state[full]
        if group["momentum"] and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(full)
            state["started"] = torch.zeros((full.shape[0],) + (1,) * (full.dim() - 1), dtype=torch.bool,
                                           device=full.device)
        if every:
            if group["momentum"]:
                buf, started = state["momentum_buffer"][:used], state["started"][:used]
                if bool(started.all()):
                    buf.mul_(group["momentum"]).add_(d_p)
                else:  # a slot's first step sets its buffer to d_p, as torch.optim.SGD
                    buf.copy_(torch.where(started, buf * group["momentum"] + d_p, d_p))
                    started.fill_(True)
                d_p = buf
            param.sub_(lr * d_p)
            return
        active = self._active.to(param.device).view(shape)
        if group["momentum"]:
            buf, started = state["momentum_buffer"][:used], state["started"][:used]
            fresh = active & ~started
            buf.copy_(torch.where(fresh, d_p, torch.where(active, buf * group["momentum"] + d_p, buf)))
            started |= active
            d_p = buf
        param.copy_(torch.where(active, param - lr * d_p, param))


class SectionTimer:
    """Wall-clock seconds per named section (data, image, text, logits, backward, optimizer, ...).

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called at both ends of every section so that asynchronous device
    work is charged to the section that launched it; the round benchmark uses it, training does not (no timer).
    """

    def __init__(self, sync=None):
        self.sync = sync
        self.seconds: dict[str, float] = {}

    @contextmanager
    def section(self, name: str):
        if self.sync:
            self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        """The seconds so far, and start again."""
        out, self.seconds = self.seconds, {}
        return out


class NoTimer:
    """A timer that records nothing (the default outside the round benchmark)."""

    def section(self, name: str):
        return _null()

    def add(self, name: str, seconds: float) -> None:
        pass


@contextmanager
def _null():
    yield


@dataclass
class GroupResult:
    """What one client's local round produced."""

    state: State
    loss: float = math.nan
    steps: int = 0
    failure: str | None = None


class LockstepTrainer:
    """Trains groups of clients in lock-step on this process's device.

    Args:
        fabric: Lightning Fabric (device, autocast, backward).
        feed: serves the groups' batches.
        timer: a :class:`SectionTimer` (the round benchmark) or ``None``.
    """

    def __init__(self, fabric, feed: Feed, timer: SectionTimer | None = None):
        self.fabric = fabric
        self.feed = feed
        self.timer = timer or NoTimer()
        self.samples = 0  # train samples processed (the round benchmark's images per second)

    def train(self, client, plans: list[LocalPlan], states: dict[int, State],
              global_state: State | None) -> dict[int, GroupResult]:
        """Train the clients of ``plans`` (at most ``client.slots``) from ``states``; returns each one's result."""
        fabric, timer = self.fabric, self.timer
        if len(plans) > client.slots:
            raise ValueError(f"{len(plans)} clients for a module with {client.slots} slots")
        for slot, plan in enumerate(plans):
            client.load_slot(slot, states[plan.cid])
        client.timer = timer
        client.on_round_start(global_state or None)
        optimizer = fabric.setup_optimizers(client.configure_optimizers())
        stacked = getattr(optimizer, "optimizer", optimizer)
        client.train()
        device = fabric.device
        losses: list[list[torch.Tensor]] = [[] for _ in plans]
        lr_steps = [0] * len(plans)
        data_start = time.perf_counter()
        for step, batch in enumerate(self.feed.train_steps(plans)):
            timer.add("data", time.perf_counter() - data_start)
            self.samples += sum(batch.counts)
            with timer.section("data"):
                data = self.feed.finish(fabric.to_device(batch.data))
                slots = torch.as_tensor(batch.members, dtype=torch.long, device=device)
                owner = torch.repeat_interleave(torch.arange(len(batch.members), device=device),
                                                torch.as_tensor(batch.counts, device=device))
            with fabric.autocast():
                per_client = client.training_step({**data, "slots": slots, "owner": owner}, step)
            with timer.section("backward"):
                fabric.backward(per_client.sum())
            with timer.section("optimizer"):
                active = torch.zeros(len(plans), dtype=torch.bool)  # the group's slots; the module may have more
                active[batch.members] = True
                rates = torch.zeros(len(plans), dtype=torch.float64)
                for j in batch.members:
                    rates[j] = client.optim.lr_at(lr_steps[j], plans[j].steps, plans[j].epoch_steps,
                                                  plans[j].epochs_before)
                    lr_steps[j] += 1
                stacked.set_slots(active, rates)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            detached = per_client.detach()
            for pos, j in enumerate(batch.members):
                losses[j].append(detached[pos])
            data_start = time.perf_counter()
        return {plan.cid: self._result(client, slot, plan, losses[slot]) for slot, plan in enumerate(plans)}

    @staticmethod
    def _result(client, slot: int, plan: LocalPlan, losses: list[torch.Tensor]) -> GroupResult:
        values = torch.stack(losses).float().cpu() if losses else torch.zeros(0)
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            step = int(bad[0])
            return GroupResult({}, math.nan, step + 1, f"non-finite loss {float(values[step])} at local step {step}")
        return GroupResult(client.slot_state(slot), float(values.mean()) if len(values) else math.nan, len(values))


def run_groups(trainer: LockstepTrainer, client_for, classes_of, plans: list[LocalPlan], group_size: int, states,
               global_state, adaptive: bool, on_group=None) -> dict[int, GroupResult]:
    """Train ``plans`` in lock-step groups of at most ``group_size`` clients of the same class list.

    ``classes_of(plan)`` gives a plan's class list and ``client_for(classnames)`` the client module set to it (with
    at least ``group_size`` slots); ``adaptive`` halves the group size on a device out-of-memory error and retries.
    A group that raises anything else is run again client by client, so that the failure is charged to its client
    (and reported as that client's ``failure``); :class:`FedPromptError` (a user error) always propagates.
    """
    results: dict[int, GroupResult] = {}
    by_classes: dict[tuple, list[LocalPlan]] = {}
    for plan in plans:
        by_classes.setdefault(tuple(classes_of(plan)), []).append(plan)
    for classnames, members in by_classes.items():
        start = 0
        while start < len(members):
            group = members[start:start + group_size]
            try:
                results.update(trainer.train(client_for(list(classnames)), group, states, global_state))
            except torch.cuda.OutOfMemoryError:
                if not adaptive or group_size == 1:
                    raise
                group_size = max(1, group_size // 2)
                torch.cuda.empty_cache()
                continue
            except FedPromptError:
                raise
            except Exception as err:  # noqa: BLE001 - reported per client below, never dropped
                if len(group) == 1:
                    results[group[0].cid] = GroupResult({}, failure=f"{type(err).__name__}: {err}")
                else:
                    for plan in group:
                        results.update(run_groups(trainer, client_for, classes_of, [plan], 1, states, global_state,
                                                  False))
            if on_group is not None:
                on_group(len(group))
            start += len(group)
    return results
