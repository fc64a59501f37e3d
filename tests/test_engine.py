"""The engine's bookkeeping: a group size that ran out of memory stays smaller for the rest of the run (and every
metrics row says which K ran), the optimizer step reads nothing back from the device, and a lock-step step's host
syncs do not grow with K (counted by the profiler, as ``fedprompt bench`` reports them)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fedprompt.federation.engine as engine
from conftest import ROOT, read_rows, without_timings
from fedprompt.bench import SYNC_OPS, count_ops
from fedprompt.optim import StackedSGD

SMOKE = str(ROOT / "configs" / "smoke.yaml")
COMMON = ["--config", SMOKE, "--federation.rounds", "3", "--federation.fraction", "0.75", "--log.progress", "false"]


def test_out_of_memory_halves_k_once_and_later_rounds_start_there(cli, tmp_path, monkeypatch):
    """Groups of more than 2 clients run out of memory (injected): round 1 tries 4, then trains 2 + 2; rounds 2
    and 3 start at 2 (never 4 again); the run equals one with K = 2 from the start."""
    original = engine.LockstepTrainer.train
    sizes = []

    def train(self, client, plans, states, global_state):
        sizes.append(len(plans))
        if len(plans) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return original(self, client, plans, states, global_state)

    monkeypatch.setattr(engine.LockstepTrainer, "train", train)
    code, _, err = cli("fit", *COMMON, "--out_dir", tmp_path / "auto")
    assert code == 0, err
    assert sizes == [4, 2, 2, 2, 1, 2, 1]  # 4 clients, then 3 and 3 (fraction 0.75)
    rows = read_rows(tmp_path / "auto")
    assert [r["parallel_clients"] for r in rows] == [2, 2, 2]
    monkeypatch.setattr(engine.LockstepTrainer, "train", original)
    code, _, err = cli("fit", *COMMON, "--out_dir", tmp_path / "k2", "--federation.parallel_clients", "2")
    assert code == 0, err
    fixed = read_rows(tmp_path / "k2")
    assert [r["parallel_clients"] for r in fixed] == [2, 2, 2]
    for a, b in zip(without_timings(rows), without_timings(fixed)):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["client_acc"] == b["client_acc"]


def test_out_of_memory_with_a_fixed_k_is_not_hidden(cli, tmp_path, monkeypatch):
    def train(self, client, plans, states, global_state):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")

    monkeypatch.setattr(engine.LockstepTrainer, "train", train)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cli("fit", *COMMON, "--out_dir", tmp_path, "--federation.parallel_clients", "2")


def host_syncs(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return count_ops(prof.events())["syncs"]


@pytest.mark.parametrize("active", [[True, True, True], [True, False, True]])
def test_the_optimizer_step_reads_nothing_back(active):
    param = torch.nn.Parameter(torch.randn(3, 4, 5))
    opt = StackedSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(3):  # first steps (fresh buffers) and later ones, masked and not
        param.grad = torch.randn(3, 4, 5)
        opt.set_slots(torch.tensor(active), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
        assert host_syncs(opt.step) == 0, step


@pytest.mark.parametrize("method", ["PromptFL", "FedPGP", "FedMGP"])
def test_a_lockstep_step_has_no_host_sync_at_any_k(cli, method, capsys):
    """PromptFL, FedPGP and FedMGP steps read nothing back (FedOTP's OT early exit is the one sync by design)."""
    per_step = {}
    for k in ("1", "4"):
        code, out, err = cli("bench", "--config", SMOKE, "--rounds", "1", "--json", "true", "--method", method,
                             "--federation.parallel_clients", k)
        assert code == 0, err
        row = json.loads(out[out.index("["):])[-1]
        assert row["parallel_clients"] == int(k) and row["profiled_client_steps"] >= row["profiled_steps"] > 0
        per_step[k] = row["host_syncs_per_step"]
        assert row["aten_ops_per_client_step"] > 0
    assert per_step == {"1": 0.0, "4": 0.0}


def test_sync_ops_are_the_ones_that_read_device_values():
    assert "aten::_local_scalar_dense" in SYNC_OPS and "aten::nonzero" in SYNC_OPS
    x = torch.randn(4)
    assert host_syncs(lambda: float(x.sum())) == 1
    assert host_syncs(lambda: x + 1) == 0


def test_each_client_gets_its_own_step_seed_whatever_k(cli, tmp_path, monkeypatch):
    from fedprompt.methods.base import PromptClient

    original, seen = PromptClient.training_step, []

    def record(self, batch, batch_idx=0):
        seen.extend(batch["seeds"])
        assert len(batch["seeds"]) == batch["slots"].shape[0]
        return original(self, batch, batch_idx)

    monkeypatch.setattr(PromptClient, "training_step", record)
    runs = {}
    for k in ("1", "4"):
        seen.clear()
        code, _, err = cli("fit", *COMMON, "--out_dir", tmp_path / k, "--federation.parallel_clients", k)
        assert code == 0, err
        runs[k] = sorted(seen)
    assert runs["1"] == runs["4"] and len(set(runs["1"])) == len(runs["1"]) > 4


def test_named_loss_terms_are_summed_by_the_default_backward(tiny_backbone):
    """A client whose loss is {"ce": ..., "twice": ...} gets the gradient of their sum (the base backward)."""
    from fedprompt.methods import PromptFL

    torch.manual_seed(0)
    client = PromptFL(n_ctx=2).build_client(tiny_backbone, ["a", "b"], slots=2)
    batch = {"features": torch.randn(6, tiny_backbone.embed_dim), "label": torch.tensor([0, 1, 0, 1, 1, 0]),
             "slots": torch.tensor([0, 1]), "owner": torch.tensor([0, 0, 0, 1, 1, 1])}
    plain = client.training_step(batch)
    client.backward(plain, lambda t, **kw: t.backward(**kw))
    expected = client.prompt.ctx.grad.clone()
    client.prompt.ctx.grad = None
    client.loss = lambda text, image, b: {"ce": PromptFL.client_class.loss(client, text, image, b),
                                          "none": torch.zeros(2)}
    terms = client.training_step(batch)
    assert set(terms) == {"ce", "none"}
    client.backward(terms, lambda t, **kw: t.backward(**kw))
    torch.testing.assert_close(client.prompt.ctx.grad, expected)
