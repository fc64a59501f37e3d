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
right client id. Running out of device memory halves K and retries the group (when K was chosen automatically), and
later rounds start from the size that fit (:class:`GroupSize`).

A step reads nothing back from the device: the step's slots, sample owners and per-client sample counts are built on
the host and copied without blocking, and the optimizer keeps its bookkeeping on the host
(:class:`fedprompt.optim.StackedSGD`). Each client's losses are read back once, at the end of its local round.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from fedprompt.errors import FedPromptError
from fedprompt.federation.feed import Feed, LocalPlan
from fedprompt.federation.sampling import derive_seed
from fedprompt.optim import StackedSGD
from fedprompt.timing import NoTimer, SectionTimer

#: separates the methods' per-step random stream (``client.step.seeds``) from the augmentation's (same step seed)
METHOD_STREAM = 0x4D455448
#: the profiler label of one lock-step step (``fedprompt bench`` counts the aten ops and host syncs inside it)
STEP_RECORD = "fedprompt::step"

__all__ = ["GroupResult", "GroupSize", "LockstepTrainer", "NoTimer", "SectionTimer", "StackedSGD", "run_groups"]

State = dict[str, torch.Tensor]


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
        losses: list[list[torch.Tensor]] = [[] for _ in plans]
        lr_steps = [0] * len(plans)
        data_start = time.perf_counter()
        for step, batch in enumerate(self.feed.train_steps(plans)):
            with record_function(STEP_RECORD):
                self._step(client, stacked, optimizer, plans, batch, step, losses, lr_steps, data_start)
            data_start = time.perf_counter()
        return {plan.cid: self._result(client, slot, plan, losses[slot]) for slot, plan in enumerate(plans)}

    def _step(self, client, stacked, optimizer, plans, batch, step, losses, lr_steps, data_start) -> None:
        """One lock-step step: the batch to the device, the clients' losses, one backward, one optimizer step (each
        client at its own learning rate), and the losses kept on the device."""
        fabric, timer = self.fabric, self.timer
        timer.add("data", time.perf_counter() - data_start)
        self.samples += sum(batch.counts)
        with timer.section("data"):
            data = self.feed.finish(fabric.to_device({**batch.data, **step_clients(batch.members, batch.counts)}))
            data["seeds"] = [derive_seed(plans[j].seeds[step], METHOD_STREAM) for j in batch.members]
            data["members"], data["sizes"] = list(batch.members), list(batch.counts)  # host copies: no sync
        with fabric.autocast():
            terms = client.training_step(data, step)
        with timer.section("backward"), client.stepping_for(data):
            client.backward(terms, fabric.backward)  # (its self.step is this step's, seeds included)
        per_client = sum(terms.values()) if isinstance(terms, dict) else terms
        with timer.section("optimizer"):
            members = set(batch.members)
            rates = [0.0] * len(plans)  # the group's slots; the module may have more
            for j in batch.members:
                rates[j] = client.optim.lr_at(lr_steps[j], plans[j].steps, plans[j].epoch_steps,
                                              plans[j].epochs_before)
                lr_steps[j] += 1
            stacked.set_slots(torch.tensor([j in members for j in range(len(plans))]),
                              torch.tensor(rates, dtype=torch.float64))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        detached = per_client.detach()
        for pos, j in enumerate(batch.members):
            losses[j].append(detached[pos])

    @staticmethod
    def _result(client, slot: int, plan: LocalPlan, losses: list[torch.Tensor]) -> GroupResult:
        values = torch.stack(losses).float().cpu() if losses else torch.zeros(0)
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            step = int(bad[0])
            return GroupResult({}, math.nan, step + 1, f"non-finite loss {float(values[step])} at local step {step}")
        return GroupResult(client.slot_state(slot), float(values.mean()) if len(values) else math.nan, len(values))


def step_clients(members: list[int], counts: list[int]) -> dict[str, torch.Tensor]:
    """The clients of one lock-step step, built on the host: ``slots`` ``[A]`` (their module slots), ``owner``
    ``[n]`` (each sample's position in ``slots``) and ``counts`` ``[A]`` (samples per client)."""
    owner = [position for position, count in enumerate(counts) for _ in range(count)]
    return {"slots": torch.tensor(members, dtype=torch.long), "owner": torch.tensor(owner, dtype=torch.long),
            "counts": torch.tensor(counts, dtype=torch.long)}


@dataclass
class GroupSize:
    """The lock-step group size K of a run: ``size`` clients per group; ``adaptive`` (``parallel_clients: auto``)
    halves it when the device runs out of memory, and the smaller size stays for the rest of the run."""

    size: int
    adaptive: bool = False

    def shrink(self) -> bool:
        """Halve K after an out-of-memory error; ``False`` when that is not allowed (fixed K, or K = 1)."""
        if not self.adaptive or self.size == 1:
            return False
        self.size = max(1, self.size // 2)
        return True


def run_groups(trainer: LockstepTrainer, client_for, classes_of, plans: list[LocalPlan], group: GroupSize, states,
               global_state, on_group=None) -> dict[int, GroupResult]:
    """Train ``plans`` in lock-step groups of at most ``group.size`` clients of the same class list.

    ``classes_of(plan)`` gives a plan's class list and ``client_for(classnames)`` the client module set to it (with
    at least ``group.size`` slots); an adaptive ``group`` halves its size on a device out-of-memory error, retries,
    and keeps the smaller size for later groups and rounds. A group that raises anything else is run again client by
    client, so that the failure is charged to its client (and reported as that client's ``failure``);
    :class:`FedPromptError` (a user error) always propagates.
    """
    results: dict[int, GroupResult] = {}
    by_classes: dict[tuple, list[LocalPlan]] = {}
    for plan in plans:
        by_classes.setdefault(tuple(classes_of(plan)), []).append(plan)
    for classnames, members in by_classes.items():
        start = 0
        while start < len(members):
            chunk = members[start:start + group.size]
            try:
                results.update(trainer.train(client_for(list(classnames)), chunk, states, global_state))
            except torch.cuda.OutOfMemoryError:
                if not group.shrink():
                    raise
                torch.cuda.empty_cache()
                continue
            except FedPromptError:
                raise
            except Exception as err:  # noqa: BLE001 - reported per client below, never dropped
                if len(chunk) == 1:
                    results[chunk[0].cid] = GroupResult({}, failure=f"{type(err).__name__}: {err}")
                else:
                    for plan in chunk:
                        results.update(run_groups(trainer, client_for, classes_of, [plan], GroupSize(1), states,
                                                  global_state))
            if on_group is not None:
                on_group(len(chunk))
            start += len(chunk)
    return results
