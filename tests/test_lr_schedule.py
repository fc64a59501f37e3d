"""The local learning-rate schedule: Dassl's cosine with constant warm-up, stepped once per epoch, checked against
torch's CosineAnnealingLR; per client per round (``lr_scope: local``) or one schedule for the whole run shared by
all clients in training order (``lr_scope: official``), or one schedule per client over the run (``lr_scope:
client``, FedTPG's), checked on the rates the engine really hands StackedSGD."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT, read_rows
from fedprompt.data import Dirichlet, Synthetic
from fedprompt.errors import FedPromptError
from fedprompt.federation.engine import StackedSGD
from fedprompt.federation.feed import local_epoch_count, local_plan
from fedprompt.methods import OptimizerArgs, PromptFolio

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def torch_cosine_lrs(lr: float, t_max: float, epochs: int) -> list[float]:
    """The learning rate of each epoch under torch's CosineAnnealingLR stepped once per epoch."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, t_max)
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def dassl_reference(lr: float, t_max: float, warmup: int, warmup_lr: float, epochs: int) -> list[float]:
    """Dassl's constant warm-up then cosine (WARMUP_RECOUNT): ``warmup`` epochs at ``warmup_lr``, then torch's
    CosineAnnealingLR from its start."""
    return [warmup_lr] * warmup + torch_cosine_lrs(lr, t_max, epochs - warmup)


def test_constant_schedule_is_the_base_rate():
    args = OptimizerArgs(lr=0.003)
    assert {args.lr_at(s, 10, 3, e) for s in range(10) for e in (0, 7)} == {0.003}


def test_local_cosine_with_warmup_equals_torch_per_epoch():
    """PromptFolio's vit_b16.yaml: lr 0.002, 1 warm-up epoch at 1e-5, cosine with T_max = 5 local epochs."""
    args = OptimizerArgs(lr=0.002, lr_schedule="cosine", warmup_epochs=1, warmup_lr=1e-5)
    epoch_steps, total = 7, 35  # 5 local epochs of 7 steps
    reference = dassl_reference(0.002, 5.0, 1, 1e-5, 5)
    for step in (0, 6, 7, 13, 14, 20, 21, 28, 34):
        assert args.lr_at(step, total, epoch_steps) == pytest.approx(reference[step // epoch_steps], rel=1e-12,
                                                                     abs=1e-15), step
    # the numbers themselves: warm-up, the base rate, then cos(pi t / 5)
    assert args.lr_at(0, total, epoch_steps) == 1e-5
    assert args.lr_at(7, total, epoch_steps) == pytest.approx(0.002)
    assert args.lr_at(34, total, epoch_steps) == pytest.approx(0.002 * (1 + math.cos(3 * math.pi / 5)) / 2)
    # the local scope restarts every round: the run position is ignored
    assert args.lr_at(7, total, epoch_steps, epochs_before=123) == args.lr_at(7, total, epoch_steps)


def test_local_steps_count_passes_as_epochs():
    """20 local steps of a client with 7 steps per pass: 3 epochs (7, 7, 6 steps), T_max 3."""
    args = OptimizerArgs(lr=0.01, lr_schedule="cosine")
    reference = torch_cosine_lrs(0.01, 3.0, 3)
    assert [args.lr_at(s, 20, 7) for s in (0, 6, 7, 13, 14, 19)] == pytest.approx(
        [reference[0], reference[0], reference[1], reference[1], reference[2], reference[2]], rel=1e-12)
    assert local_epoch_count(num_samples=100, batch_size=16, epochs=5, max_steps=20) == 3
    assert local_epoch_count(num_samples=100, batch_size=16, epochs=5, max_steps=None) == 5
    assert local_plan(0, 100, 16, 1, 20, seed=0).epoch_steps == 7
    # cosine_epochs fixes T_max whatever the local round's length
    fixed = OptimizerArgs(lr=0.01, lr_schedule="cosine", cosine_epochs=10)
    assert fixed.lr_at(14, 20, 7) == pytest.approx(torch_cosine_lrs(0.01, 10.0, 3)[2], rel=1e-12)


def test_official_scope_continues_one_schedule_over_the_run_and_cycles_past_t_max():
    """One scheduler for the run: epoch e of a client with 23 epochs before it is the schedule's epoch 23 + e; past
    T_max torch's CosineAnnealingLR goes back up (period 2 T_max), and so does the schedule."""
    args = OptimizerArgs(lr=0.002, lr_schedule="cosine", warmup_epochs=1, warmup_lr=1e-5, lr_scope="official")
    reference = dassl_reference(0.002, 5.0, 1, 1e-5, 40)
    for before in (0, 5, 23, 34):
        for step in range(0, 35, 3):
            assert args.lr_at(step, 35, 7, before) == pytest.approx(reference[before + step // 7], rel=1e-9,
                                                                    abs=1e-15), (before, step)
    assert args.lr_at(0, 35, 7, 6) == pytest.approx(0.0, abs=1e-15)  # schedule epoch 6 = cosine t = 5 = T_max
    assert args.lr_at(0, 35, 7, 11) == pytest.approx(0.002)  # t = 10: back at the base rate


def test_client_scope_is_each_clients_own_scheduler_over_the_run():
    """FedTPG's released code: one CosineAnnealingLR(T_max = 500) per client, stepped after each of its local
    passes; a client's rate in its n-th local round (0-based, one pass each) is the scheduler's n-th value."""
    args = OptimizerArgs(lr=0.003, momentum=0.9, weight_decay=1e-5, lr_schedule="cosine", lr_scope="client",
                         cosine_epochs=500)
    reference = torch_cosine_lrs(0.003, 500.0, 500)
    for before in (0, 1, 249, 250, 499):
        assert args.lr_at(0, 1, 0, before) == pytest.approx(reference[before], rel=1e-9, abs=1e-15), before
    assert args.lr_at(0, 1, 0, 0) == 0.003
    assert args.lr_at(0, 1, 0, 250) == pytest.approx(0.0015)
    assert args.lr_at(0, 1, 0, 499) == pytest.approx(0.003 * (1 + math.cos(math.pi * 499 / 500)) / 2)
    assert args.counts_run_epochs and not OptimizerArgs(lr_scope="client").counts_run_epochs  # constant: no count


def test_bad_schedule_settings_are_refused(cli, tmp_path):
    with pytest.raises(FedPromptError, match="lr_schedule"):
        OptimizerArgs(lr_schedule="linear")
    with pytest.raises(FedPromptError, match="lr_scope"):
        OptimizerArgs(lr_scope="global")
    with pytest.raises(FedPromptError, match="cosine_epochs"):
        PromptFolio(cosine_epochs=0)
    code, _, err = cli("fit", "--config", SMOKE, "--method", "PromptFolio", "--method.lr_schedule", "step",
                       "--out_dir", tmp_path)
    assert code == 2 and "lr_schedule" in err and "step" in err and "Traceback" not in err


@pytest.mark.parametrize("scope", ["local", "official", "client"])
def test_engine_hands_each_client_its_scheduled_rate(cli, tmp_path, monkeypatch, scope):
    """A real run (3 of 4 clients after round 1, unequal client sizes, 2 local epochs, all clients in one lock-step
    group): the per-slot rates given to StackedSGD are each client's schedule at its own local step."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = StackedSGD.set_slots

    def spy(self, active, lr):
        seen.append((active.clone(), lr.clone()))
        original(self, active, lr)

    monkeypatch.setattr(StackedSGD, "set_slots", spy)
    method = "FedTPG" if scope == "client" else "PromptFolio"  # the client scope is FedTPG's
    code, _, err = cli("fit", "--config", SMOKE, "--method", method, "--method.n_ctx", "4",
                       "--method.lr", "0.05", "--method.lr_schedule", "cosine", "--method.warmup_epochs", "1",
                       "--method.lr_scope", scope, "--method.cosine_epochs", "3",
                       "--federation.rounds", "3", "--federation.fraction", "0.75", "--train.local_epochs", "2",
                       "--train.batch_size", "8", "--out_dir", tmp_path)
    assert code == 0, err
    data = Synthetic(num_classes=4, train_per_class=16, test_per_class=8, image_size=32,
                     partition=Dirichlet(num_clients=4, alpha=1.0, min_size=4)).setup()  # smoke.yaml's split
    sizes = [len(c.train) for c in data.clients]
    epoch_steps = [math.ceil(n / 8) for n in sizes]
    args = OptimizerArgs(lr=0.05, lr_schedule="cosine", warmup_epochs=1, lr_scope=scope, cosine_epochs=3)
    rows = read_rows(tmp_path)
    expected = []  # per optimizer step: which of the group's slots step, and each one's rate (0 when idle)
    before = 0
    own = dict.fromkeys(range(4), 0)  # client scope: each client's own epochs so far
    for row in rows:
        clients = row["clients"]
        offsets = {}
        for cid in clients:  # one client after another, by increasing id
            offsets[cid] = own[cid] if scope == "client" else before
            before += 2
            own[cid] += 2
        plans = [2 * epoch_steps[cid] for cid in clients]
        for step in range(max(plans)):
            active = [step < n for n in plans]
            rates = [args.lr_at(step, plans[j], epoch_steps[cid], offsets[cid]) if active[j] else 0.0
                     for j, cid in enumerate(clients)]
            expected.append((active, rates))
    assert len(seen) == len(expected)
    for (active, lr), (want_active, want_lr) in zip(seen, expected):
        assert active.tolist() == want_active
        assert lr.tolist() == pytest.approx(want_lr, rel=1e-12, abs=1e-15)
    distinct = {round(float(r), 12) for active, lr in seen for r in lr[active]}
    if scope == "local":  # every local round: the warm-up epoch, then the base rate
        assert distinct == {1e-5, 0.05}
    elif scope == "client":  # each client: one warm-up (its first epoch), then its own cosine (T_max 3)
        assert 1e-5 in distinct and 0.05 in distinct and 0.0 in distinct and len(distinct) >= 4
        assert sum(round(float(r), 12) == 1e-5 for active, lr in seen for r in lr[active]) == \
            sum(epoch_steps)  # exactly one warm-up epoch per client for the whole run
    else:  # one warm-up for the whole run, then the cosine (T_max 3) cycling over the clients' epochs
        assert 1e-5 in distinct and 0.0 in distinct and len(distinct) >= 4
