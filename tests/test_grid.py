"""``fedprompt sweep`` as a grid: cells from --configs / --methods / --datasets, two local processes, submitit's local
executor, failed runs reported then retried, a claimed run left to its holder, and the table from the grid folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import ROOT
from fedprompt.grid import run_flags
from fedprompt.rundir import RunLock

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_run_flags_leave_out_the_sweep_options():
    line = ["--config", "a.yaml", "--configs=[b.yaml]", "--federation.rounds", "1", "--seeds", "[1, 2]",
            "--processes", "2", "--method.lr=0.5", "--out_dir", "x", "--launcher", "local", "--data.root", "r"]
    assert run_flags(line) == ["--federation.rounds", "1", "--method.lr=0.5", "--data.root", "r"]


def test_grid_in_two_local_processes_then_complete_and_its_table(cli, tmp_path):
    out = tmp_path / "grid"
    args = ["sweep", "--config", SMOKE, "--federation.rounds", "1", "--methods", "[PromptFL, KgCoOp]",
            "--seeds", "[1]", "--processes", "2", "--out_dir", out]
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert yaml.safe_load((out / "grid.yaml").read_text()) == {"cells": ["promptfl", "kgcoop"], "seeds": [1]}
    for cell, method in (("promptfl", "PromptFL"), ("kgcoop", "KgCoOp")):
        assert summary(out / cell / "seed1")["method"] == method
        assert "fedprompt fit" not in stdout or (out / cell / "seed1.log").is_file()  # each child wrote its log
        assert json.loads((out / cell / "seeds.json").read_text())["seeds"] == [1]
        config = yaml.safe_load((out / cell / "sweep.yaml").read_text())
        assert config["federation"]["rounds"] == 1 and config["method"]["init_args"]["n_ctx"] == 4  # kept settings
    table = (out / "table.md").read_text()
    assert "| PromptFL |" in table and "| KgCoOp |" in table
    # the same command again: every run is complete, nothing runs
    mtime = (out / "kgcoop" / "seed1" / "summary.json").stat().st_mtime_ns
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert "promptfl/seed 1: complete" in stdout and "kgcoop/seed 1: complete" in stdout
    assert (out / "kgcoop" / "seed1" / "summary.json").stat().st_mtime_ns == mtime
    # the table comes from the grid's folder
    code, stdout, err = cli("table", out, "--out", tmp_path / "t", "--figure", "false")
    assert code == 0, err
    assert "| PromptFL |" in stdout and "| KgCoOp |" in stdout


def image_folders(root: Path) -> Path:
    for d in ("a", "b"):
        for c in ("cat", "dog", "owl"):
            (root / d / c).mkdir(parents=True, exist_ok=True)
            for i in range(6):
                Image.new("RGB", (32, 32), (80 * i % 256, 40 * len(d + c), 9 * i)).save(root / d / c / f"{i}.png")
    return root


def test_failed_run_is_reported_then_retried_and_a_claimed_run_left_to_its_holder(cli, tmp_path):
    smoke = yaml.safe_load(Path(SMOKE).read_text())
    good, broken = tmp_path / "good.yaml", tmp_path / "broken.yaml"
    good.write_text(yaml.safe_dump(smoke))
    data = {"class_path": "fedprompt.data.DomainFolders", "init_args": {"root": str(tmp_path / "images")}}
    broken.write_text(yaml.safe_dump({**smoke, "data": data}))  # its images do not exist yet
    out = tmp_path / "grid"
    args = ["sweep", "--configs", f"[{good}, {broken}]", "--federation.rounds", "1", "--seeds", "[1]", "--out_dir",
            out]
    (out / "good").mkdir(parents=True)
    holder = RunLock(out / "good", name=".seed1.lock")  # another sweep runs good/seed 1
    assert holder.acquire() is None
    try:
        code, stdout, err = cli(*args)
    finally:
        holder.release()
    assert code == 2
    assert "good/seed 1: running in another process" in stdout and "1 run(s) still running (good/seed 1)" in err
    assert "1 of 2 run(s) failed: broken/seed 1 (exit status 2" in err and "run the same sweep command again" in err
    assert not (out / "good" / "seed1").exists() and not (out / "table.md").exists()
    assert yaml.safe_load((out / "broken" / "sweep.yaml").read_text())["federation"]["rounds"] == 1  # the flags
    image_folders(tmp_path / "images")
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert summary(out / "good" / "seed1")["rounds"] == 1 and summary(out / "broken" / "seed1")["rounds"] == 1
    assert (out / "table.md").is_file()


def sweep_in_a_process(*args) -> tuple[int, str, str]:
    """``fedprompt sweep ARGS`` in a child process: submitit's executor, its controller processes and their signals
    stay out of the test process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "fedprompt", "sweep", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=1200)
    return done.returncode, done.stdout, done.stderr


def test_submitit_local_executor(tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "sweep"
    code, stdout, err = sweep_in_a_process("--config", SMOKE, "--federation.rounds", "1", "--seeds", "[1, 2]",
                                           "--launcher", "submitit-local", "--slurm", '{"timeout_min": 20}',
                                           "--out_dir", out)
    assert code == 0, err
    assert "seed 1: job" in stdout and "(local;" in stdout
    table = json.loads((out / "seeds.json").read_text())
    assert table["seeds"] == [1, 2] and len(table["metrics"]["local_acc"]["values"]) == 2
    for n in (1, 2):
        assert yaml.safe_load((out / f"seed{n}" / "hyperparameters.yaml").read_text())["seed"] == n
    logs = list((out / "submitit").rglob("*_log.out"))
    assert len(logs) == 2 and any("fedprompt fit --config" in p.read_text() for p in logs)
    # a bad executor parameter is one line
    code, _, err = sweep_in_a_process("--config", SMOKE, "--seeds", "[3]", "--launcher", "submitit-local", "--slurm",
                                      '{"no_such_parameter": 1}', "--out_dir", out)
    assert code == 2 and err.count("\n") == 1 and "--slurm" in err, err


def test_seed_state(tmp_path):
    from fedprompt.sweep import seed_state

    run = tmp_path / "seed1"
    assert seed_state(run, 5) == "new"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert seed_state(run, 5) == "resume"
    (run / "summary.json").write_text(json.dumps({"rounds": 3}))
    assert seed_state(run, 5) == "resume" and seed_state(run, 3) == "done"  # more rounds asked: resumed
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "summary.json").write_text(json.dumps({"rounds": 0}))  # zero-shot: evaluated once, no checkpoint
    assert seed_state(run, 5) == "done"
