"""A run directory belongs to one run: nothing is overwritten or lost, resume continues only the run it belongs to,
and every failure around it is one line."""

import csv
import json
import os
import shlex
import stat

import pytest
import torch

import fedprompt.build
import fedprompt.federation.clients
import fedprompt.fit
import fedprompt.run_folder
from conftest import ROOT, read_rows, without_timings

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def snapshot(run):
    """Content of every file of a run directory (to show that a command changed nothing)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(cli, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", run)
    assert code == 0, err
    return run


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command reads data or loads a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("data or model loaded")

    monkeypatch.setattr(fedprompt.fit, "read_data_and_check_weights", refuse)
    monkeypatch.setattr(fedprompt.build, "load_backbone", refuse)


def test_resuming_a_finished_run_changes_nothing_and_more_rounds_continue_it(cli, finished_run, no_loading):
    before = snapshot(finished_run)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert "local_acc" in summary and "client_acc" in summary and "train_loss" in summary
    code, out, err = cli("fit", "--resume", finished_run / "checkpoints" / "last.ckpt")
    assert code == 0, err
    assert "is complete (round 2 of 2); nothing changed" in out and "--federation.rounds" in out
    assert snapshot(finished_run) == before


def test_raising_rounds_continues_a_finished_run(cli, finished_run):
    rows = read_rows(finished_run)
    code, _, err = cli("fit", "--resume", finished_run / "checkpoints" / "last.ckpt", "--federation.rounds", "3")
    assert code == 0, err
    continued = read_rows(finished_run)
    assert [r["round"] for r in continued] == [1, 2, 3] and continued[:2] == rows
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["local_acc"] == continued[-1]["local_acc"]


def test_a_complete_run_without_summary_gets_it_back(cli, finished_run):
    """Killed between the last checkpoint and summary.json: resuming rewrites the summary from metrics.jsonl."""
    summary = json.loads((finished_run / "summary.json").read_text())
    (finished_run / "summary.json").unlink()
    code, _, err = cli("fit", "--resume", finished_run / "checkpoints" / "last.ckpt")
    assert code == 0, err
    again = json.loads((finished_run / "summary.json").read_text())
    for key in ("local_acc", "global_acc", "client_acc", "train_loss", "rounds"):
        assert again[key] == summary[key], key


def test_zeroshot_and_fit_do_not_write_into_each_others_run(cli, finished_run, tmp_path, no_loading):
    before = snapshot(finished_run)
    code, _, err = cli("zeroshot", "--config", SMOKE, "--method", "ZeroShot", "--out_dir", finished_run)
    assert code == 2 and f"out_dir {finished_run} already holds a run" in err and "--overwrite true" in err
    assert "--resume" not in err  # zeroshot cannot resume
    assert len(err.strip().splitlines()) == 1 and snapshot(finished_run) == before
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", finished_run)
    assert code == 2 and "PromptFL run with checkpoints/last.ckpt" in err
    assert f"--resume {finished_run / 'checkpoints' / 'last.ckpt'}" in err and "another --out_dir" in err
    assert snapshot(finished_run) == before


def test_fit_refuses_a_zeroshot_run_and_overwrite_replaces_it(cli, tmp_path):
    run = tmp_path / "zs"
    assert cli("zeroshot", "--config", SMOKE, "--method", "ZeroShot", "--out_dir", run)[0] == 0
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", run)
    assert code == 2 and "ZeroShot run with summary.json" in err
    (run / "notes.txt").write_text("mine")  # not a run file: --overwrite keeps it
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", run, "--overwrite", "true")
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["method"] == "PromptFL"
    assert [r["round"] for r in read_rows(run)] == [1, 2] and (run / "notes.txt").read_text() == "mine"
    saved = (run / "hyperparameters.yaml").read_text()
    assert "overwrite: false" in saved  # resuming with the saved config never deletes the run


def test_overwrite_and_resume_exclude_each_other(cli, finished_run):
    code, _, err = cli("fit", "--resume", finished_run / "checkpoints" / "last.ckpt", "--overwrite", "true")
    assert code == 2 and "--overwrite" in err and "--resume" in err


def test_resume_stays_in_its_run_directory(cli, finished_run, tmp_path, no_loading):
    code, _, err = cli("fit", "--config", SMOKE, "--resume", finished_run / "checkpoints" / "last.ckpt",
                       "--federation.rounds", "3", "--out_dir", tmp_path / "elsewhere")
    assert code == 2 and "not the run directory of --resume" in err and not (tmp_path / "elsewhere").exists()


def interrupt_after_round(monkeypatch, stop_round: int):
    """Ctrl-C right after the checkpoint of ``stop_round`` is written."""
    save = fedprompt.run_folder.save_checkpoint

    def save_then_interrupt(state, path):
        save(state, path)
        if state["round"] == stop_round and path.name == "last.ckpt":
            raise KeyboardInterrupt

    monkeypatch.setattr(fedprompt.run_folder, "save_checkpoint", save_then_interrupt)


def csv_rows(run):
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_interrupt_names_the_resume_command_and_every_log_keeps_every_round(cli, tmp_path, monkeypatch):
    flags = ["--federation.rounds", "4", "--federation.fraction", "0.5"]
    assert cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "full", *flags)[0] == 0
    run = tmp_path / "cut"
    with monkeypatch.context() as patch:
        interrupt_after_round(patch, 2)
        code, _, err = cli("fit", "--config", SMOKE, "--out_dir", run, *flags)
    assert code == 130
    line = err.strip().splitlines()[-1]
    assert str(run) in line and "round 2 of 4" in line
    command = line.split("Resume with: ")[1]
    assert command == f"fedprompt fit --resume {run / 'checkpoints' / 'last.ckpt'}"
    assert [int(r["step"]) for r in csv_rows(run)] == [1, 2]  # on disk at the interrupt
    code, _, err = cli(*shlex.split(command)[1:])  # exactly the printed command (the config is the run's own)
    assert code == 0, err
    assert without_timings(read_rows(run)) == without_timings(read_rows(tmp_path / "full"))
    rows = csv_rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["local_acc"]) for r in rows] == [r["local_acc"] for r in read_rows(run)]


def test_interrupt_before_the_first_checkpoint_says_there_is_nothing_to_resume(cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(fedprompt.federation.clients.ClientPool, "start",
                      lambda self, initial: (_ for _ in ()).throw(KeyboardInterrupt()))
        code, _, err = cli("fit", "--config", SMOKE, "--out_dir", run)
    assert code == 130 and "nothing was written" in err and str(run) in err
    assert cli("fit", "--config", SMOKE, "--out_dir", run, "--federation.rounds", "1")[0] == 0


@pytest.mark.parametrize("flags,expected", [
    (["--method", "LocalCoOp"], "is a PromptFL checkpoint but the config's method is LocalCoOp"),
    (["--method", "fedprompt.methods.FedOTP", "--method.n_ctx", "4"], "is a PromptFL checkpoint"),
    (["--method.n_ctx", "8"], "method.n_ctx=4 in the checkpoint, 8 in the config"),
])
def test_resume_with_another_method_or_shape_stops_before_loading(cli, finished_run, no_loading, flags, expected):
    before = snapshot(finished_run)
    code, _, err = cli("fit", "--config", SMOKE, "--resume", finished_run / "checkpoints" / "last.ckpt",
                       "--federation.rounds", "3", *flags)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(finished_run) == before


def test_checkpoint_records_method_hyperparameters_and_shapes(finished_run):
    ckpt = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["method"] == "PromptFL" and ckpt["method_hparams"]["n_ctx"] == 4
    assert ckpt["shapes"] == {"prompt.ctx": [4, 64]}


def test_resume_with_other_prompt_shapes_is_one_line(cli, finished_run, tmp_path):
    """A checkpoint whose prompts do not fit the client this config builds (e.g. another backbone width)."""
    ckpt = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["clients"] = {cid: {"prompt.ctx": torch.zeros(4, 32)} for cid in ckpt["clients"]}
    ckpt["shapes"] = {"prompt.ctx": [4, 32]}
    torch.save(ckpt, finished_run / "checkpoints" / "last.ckpt")
    code, _, err = cli("fit", "--resume", finished_run / "checkpoints" / "last.ckpt", "--federation.rounds", "3")
    assert code == 2 and "prompt.ctx: [4, 32] in the checkpoint, [4, 64] in this config" in err
    assert "size mismatch" not in err and "Traceback" not in err


def test_evaluate_reads_the_run_config_when_none_is_given(cli, finished_run):
    code, out, err = cli("evaluate", "--resume", finished_run / "checkpoints" / "last.ckpt")
    assert code == 0, err
    evaluated = json.loads((finished_run / "eval.json").read_text())
    assert evaluated["local_acc"] == read_rows(finished_run)[-1]["local_acc"]
    assert evaluated["checkpoint"] == str(finished_run / "checkpoints" / "last.ckpt")


def test_evaluate_without_a_run_config_says_so(cli, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    code, _, err = cli("evaluate", "--resume", tmp_path / "checkpoints" / "last.ckpt")
    assert code == 2 and "hyperparameters.yaml" in err and "--config" in err


def test_corrupt_checkpoint_is_one_line_without_unsafe_advice(cli, tmp_path):
    bad = tmp_path / "checkpoints" / "last.ckpt"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    code, _, err = cli("fit", "--config", SMOKE, "--resume", bad)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{bad} is not a fedprompt checkpoint" in err and "weights_only" not in err
    torch.save({"model": torch.zeros(2)}, bad)  # a torch file, but not ours
    code, _, err = cli("fit", "--config", SMOKE, "--resume", bad)
    assert code == 2 and "not a fedprompt checkpoint" in err


def test_out_dir_under_a_file_is_one_line(cli, tmp_path, no_loading):
    (tmp_path / "file").write_text("x")
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "file" / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "is a file, not a folder" in err and str(tmp_path / "file" / "run") in err
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "file")
    assert code == 2 and "is a file, not a folder" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to read-only folders")
def test_read_only_out_dir_is_one_line(cli, tmp_path, no_loading):
    tmp_path.joinpath("ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "ro" / "run")
    assert code == 2 and "cannot be created" in err and "Traceback" not in err


def test_run_files_have_the_usual_permissions(cli, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli("fit", "--config", SMOKE, "--out_dir", tmp_path, "--federation.rounds", "1")[0] == 0
    finally:
        os.umask(old)
    for name in ("hyperparameters.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.ckpt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_data_and_weights_problems_are_reported_together(cli, tmp_path):
    code, _, err = cli("fit", "--config", ROOT / "configs" / "promptfl_pacs.yaml", "--data.root", tmp_path / "nope",
                       "--backbone.pretrained", tmp_path / "weights.safetensors", "--out_dir", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "(1) data.root" in err and "(2) backbone.pretrained" in err and "weights.safetensors" in err
    assert not (tmp_path / "run" / "hyperparameters.yaml").exists()


def test_zeroshot_never_trains_even_a_trainable_method(cli, tmp_path):
    code, _, err = cli("zeroshot", "--config", SMOKE, "--out_dir", tmp_path)  # smoke.yaml's method is PromptFL
    assert code == 0, err
    assert [r["round"] for r in read_rows(tmp_path)] == [0] and not (tmp_path / "checkpoints").exists()


def test_a_run_that_fails_before_writing_leaves_no_empty_folder(cli, tmp_path):
    out = tmp_path / "runs" / "new"
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", out, "--data", "fedprompt.data.DomainFolders",
                       "--data.root", tmp_path / "missing")
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "runs").exists()
