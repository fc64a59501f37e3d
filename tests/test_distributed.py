"""The multi-process path (two CPU processes, gloo) gives the same aggregated prompts and metrics as one process."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, read_rows, without_timings

FLAGS = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--federation.rounds", "3", "--federation.fraction",
         "0.75", "--train.augment", "true"]


def run(out_dir, *extra):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's path
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "fedprompt", "fit", *FLAGS, "--out_dir", str(out_dir), *extra],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_gloo_processes_match_one_process(tmp_path):
    """Bit-identical when the lock-step groups are the same (one client at a time): only the placement differs."""
    run(tmp_path / "one", "--federation.parallel_clients", "1")
    run(tmp_path / "two", "--federation.parallel_clients", "1", "--fabric.accelerator", "cpu", "--fabric.devices", "2",
        "--fabric.strategy", "ddp")
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(one["global"]["prompt.ctx"], two["global"]["prompt.ctx"])  # bit-identical
    for cid in one["clients"]:
        assert torch.equal(one["clients"][cid]["prompt.ctx"], two["clients"][cid]["prompt.ctx"])
    rows_one, rows_two = without_timings(read_rows(tmp_path / "one")), without_timings(read_rows(tmp_path / "two"))
    assert rows_one == rows_two
    assert [len(r["clients"]) for r in rows_one] == [4, 3, 3]  # round 1 everyone, then 3 of 4 (uneven ranks)


def test_fedtpg_reduce_path_two_processes_match_one(tmp_path):
    """FedTPG merges by an all-reduce of per-process float64 sums (no client state is gathered). With the default
    parallel_clients (auto) one process trains its 4 clients in one lock-step group and each of two processes 2,
    so the runs agree up to float rounding."""
    extra = ["--method", "FedTPG", "--method.lr", "0.01"]
    run(tmp_path / "one", *extra)
    run(tmp_path / "two", *extra, "--fabric.accelerator", "cpu", "--fabric.devices", "2", "--fabric.strategy", "ddp")
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in one["global"].items():
        torch.testing.assert_close(value, two["global"][key], rtol=1e-4, atol=1e-6)
    rows_one, rows_two = without_timings(read_rows(tmp_path / "one")), without_timings(read_rows(tmp_path / "two"))
    assert [r["client_acc"] for r in rows_one] == [r["client_acc"] for r in rows_two]
    assert [r["bytes_up"] for r in rows_one] == [r["bytes_up"] for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


def test_maple_reduce_path_two_processes_match_one(tmp_path):
    """MaPLe's deep text prompts and per-client coupling (every tensor shared) through the all-reduce path on two
    processes agree with one process up to float rounding."""
    extra = ["--method", "MaPLe", "--method.text_depth", "2", "--method.lr", "0.01", "--federation.rounds", "2"]
    run(tmp_path / "one", *extra)
    run(tmp_path / "two", *extra, "--fabric.accelerator", "cpu", "--fabric.devices", "2", "--fabric.strategy", "ddp")
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(one["global"]) == {"text_prompts.ctx", "coupling.weight", "coupling.bias"}
    for key, value in one["global"].items():
        torch.testing.assert_close(value, two["global"][key], rtol=1e-4, atol=1e-6)
    rows_one, rows_two = without_timings(read_rows(tmp_path / "one")), without_timings(read_rows(tmp_path / "two"))
    assert [r["client_acc"] for r in rows_one] == [r["client_acc"] for r in rows_two]
    assert [r["bytes_up"] for r in rows_one] == [r["bytes_up"] for r in rows_two]


def test_client_level_dp_noise_is_the_same_on_every_process(tmp_path):
    """DP-FedAvg with Poisson sampling and adaptive clipping: the server's noise is seeded by the run seed and the
    round, so two processes give the one-process run (one client at a time: bit-identical)."""
    extra = ["--federation.parallel_clients", "1", "--dp.noise_multiplier", "0.8", "--dp.clip_norm", "0.05",
             "--dp.adaptive_clipping", "true", "--dp.count_stddev", "1.0"]
    run(tmp_path / "one", *extra)
    run(tmp_path / "two", *extra, "--fabric.accelerator", "cpu", "--fabric.devices", "2", "--fabric.strategy", "ddp")
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(one["global"]["prompt.ctx"], two["global"]["prompt.ctx"])
    assert one["aggregator"]["clip_norm"] == two["aggregator"]["clip_norm"]
    rows_one, rows_two = without_timings(read_rows(tmp_path / "one")), without_timings(read_rows(tmp_path / "two"))
    assert rows_one == rows_two and all(r["epsilon"] > 0 for r in rows_one)
