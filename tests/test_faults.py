"""Nothing lost, nothing silent (issue 20): run folders under faults (a failed --overwrite, a refused resume, two
writers, kill -9, a full disk, a torn metrics row), a resumed run that must be the same run, values checked before
anything loads, bad images, folders and weight files named in one line, verified caches."""

from __future__ import annotations

import csv
import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import fedprompt.build
import fedprompt.fit
import fedprompt.files as files_module
from conftest import ROOT, one_line, png_claiming, read_rows, snapshot, without_timings
from fedprompt.errors import FedPromptError

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def run_cli(*args) -> None:
    from fedprompt.__main__ import main

    main([str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 2-round smoke run and the uninterrupted 3-round run it continues to."""
    base = tmp_path_factory.mktemp("runs")
    run_cli("fit", "--config", SMOKE, "--out_dir", base / "two")
    run_cli("fit", "--config", SMOKE, "--out_dir", base / "three", "--federation.rounds", "3")
    return base


@pytest.fixture
def finished(runs, tmp_path) -> Path:
    """A copy of the finished 2-round run (tests may break it)."""
    shutil.copytree(runs / "two", tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data or model loaded")

    monkeypatch.setattr(fedprompt.fit, "read_data_and_check_weights", refuse)
    monkeypatch.setattr(fedprompt.build, "load_backbone", refuse)


def last(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


# ------------------------------------------------------------------------------ 1. check everything, then touch
def evil_weights(path: Path, marker: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"visual.proj": Payload()}, path)
    return path


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_its_checks(cli, finished, tmp_path):
    before = snapshot(finished)
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", finished, "--overwrite", "true",
                       "--backbone.pretrained", evil_weights(tmp_path / "w.bin", tmp_path / "ran"))
    assert code == 2 and "holds Python objects other than tensors" in one_line(err)
    assert snapshot(finished) == before and not (tmp_path / "ran").exists()
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", finished, "--overwrite", "true", "--data",
                       "DomainFolders", "--data.root", tmp_path / "missing")
    assert code == 2 and "does not exist" in one_line(err) and snapshot(finished) == before


def test_a_refused_resume_writes_nothing_and_the_plain_resume_still_works(cli, finished, runs):
    before = snapshot(finished)
    code, _, err = cli("fit", "--resume", last(finished), "--federation.rounds", "3",
                       "--data.partition.num_clients", "3")
    assert code == 2 and "data.partition.num_clients: 4 in the checkpoint, 3 now" in one_line(err)
    assert snapshot(finished) == before
    code, _, err = cli("fit", "--resume", last(finished), "--federation.rounds", "3")
    assert code == 0, err
    assert without_timings(read_rows(finished)) == without_timings(read_rows(runs / "three"))


def test_prompt_shapes_are_checked_before_the_run_folder_is_touched(cli, finished):
    ckpt = torch.load(last(finished), weights_only=True)
    ckpt["clients"] = {cid: {"prompt.ctx": torch.zeros(4, 32)} for cid in ckpt["clients"]}
    ckpt["shapes"] = {"prompt.ctx": [4, 32]}
    torch.save(ckpt, last(finished))
    before = snapshot(finished)
    code, _, err = cli("fit", "--resume", last(finished), "--federation.rounds", "3")
    assert code == 2 and "[4, 32] in the checkpoint, [4, 64] in this config" in one_line(err)
    assert snapshot(finished) == before


# ----------------------------------------------------------------------------- 2. a resumed run is the same run
@pytest.mark.parametrize("flags,expected", [
    (["--seed", "7"], "seed: 0 in the checkpoint, 7 now"),
    (["--train.batch_size", "8"], "train.batch_size: 16 in the checkpoint, 8 now"),
    (["--data.seed", "3"], "data.seed: 0 in the checkpoint, 3 now"),
    (["--train.local_epochs", "2", "--fabric.precision", "bf16-mixed"],
     'fabric.precision: "32-true" in the checkpoint, "bf16-mixed" now; train.local_epochs: 1 in the checkpoint, 2 now'),
    (["--federation.parallel_clients", "1"], 'federation.parallel_clients: "auto" in the checkpoint, 1 now'),
    (["--data.num_shots", "4"], "data.num_shots: null in the checkpoint, 4 now"),
])
def test_resume_with_a_setting_that_changes_results_stops_before_anything(cli, finished, no_loading, flags,
                                                                          expected):
    before = snapshot(finished)
    code, _, err = cli("fit", "--resume", last(finished), "--federation.rounds", "3", *flags)
    line = one_line(err)
    assert code == 2 and expected in line and "federation.rounds, " in line, line  # names what may change
    assert snapshot(finished) == before


def test_resume_may_change_rounds_logging_workers_and_caches(cli, finished, runs):
    code, _, err = cli("fit", "--resume", last(finished), "--federation.rounds", "3", "--log.progress", "true",
                       "--log.checkpoint_every", "1", "--train.cache_dir", "null", "--data.num_workers", "0")
    assert code == 0, err
    assert without_timings(read_rows(finished)) == without_timings(read_rows(runs / "three"))
    saved = torch.load(last(finished), weights_only=True)["config"]
    assert saved["log"]["checkpoint_every"] == 1 and saved["federation"]["rounds"] == 3


def test_the_rules_are_one_default_deny_list():
    from fedprompt.federation.checkpoint import RESUME_MAY_CHANGE, config_differences

    saved = {"seed": 0, "fabric": {"devices": 1}, "federation": {"parallel_clients": 1, "rounds": 2},
             "log": {"logger": "csv"}, "data": {"class_path": "fedprompt.data.Synthetic", "init_args": {"seed": 0}}}
    now = json.loads(json.dumps(saved))
    now["federation"]["rounds"], now["log"]["logger"], now["fabric"]["devices"] = 5, "none", 2
    assert config_differences(saved, now) == []  # K = 1: any number of processes gives the same bits
    now["federation"]["parallel_clients"] = saved["federation"]["parallel_clients"] = "auto"
    assert config_differences(saved, now) == ["fabric.devices: 1 in the checkpoint, 2 now"]
    now["fabric"]["devices"] = 1
    now["dp"] = {"noise": 0.5}  # a setting added later (another issue's group): result-changing by default
    assert config_differences(saved, now) == ["dp.noise: not recorded in the checkpoint, 0.5 now"]
    assert config_differences(saved, now, default_of=lambda key: 0.5) == []  # at its default: the old behaviour
    now["data"]["class_path"] = "fedprompt.data.CIFAR"
    assert 'data: "fedprompt.data.Synthetic" in the checkpoint, "fedprompt.data.CIFAR" now' in \
        config_differences(saved, now, default_of=lambda key: 0.5)
    page = " ".join((ROOT / "docs" / "run-folder.md").read_text().split())
    for rule in RESUME_MAY_CHANGE:  # the docs' list (the run folder page, "Resume") is the code's
        assert f"`{rule.key}`" in page, rule.key


def test_a_checkpoint_without_its_config_still_checks_the_method(cli, finished):
    ckpt = torch.load(last(finished), weights_only=True)
    del ckpt["config"]
    torch.save(ckpt, last(finished))
    code, _, err = cli("fit", "--resume", last(finished), "--federation.rounds", "3")
    assert code == 0 and "records no run config" in err


# ----------------------------------------------------------------------------------- 3. one writer per folder
LOCKER = """
import sys, time
from pathlib import Path
from fedprompt.rundir import RunLock
assert RunLock(Path(sys.argv[1])).acquire() is None
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_naming_the_first_and_kill_9_releases_it(cli, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(folder)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = cli("fit", "--config", SMOKE, "--out_dir", folder)
        line = one_line(err)
        assert code == 2 and f"out_dir {folder} is in use: process {holder.pid}" in line and "stop it" in line
        assert [p.name for p in folder.iterdir()] == [".fedprompt.lock"]  # nothing else was written
    finally:
        holder.kill()  # SIGKILL: the operating system releases the lock
        holder.wait()
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", folder, "--federation.rounds", "1")
    assert code == 0, err
    assert not (folder / ".fedprompt.lock").exists() and [r["round"] for r in read_rows(folder)] == [1]


def test_the_lock_is_exclusive_between_two_holders(tmp_path):
    from fedprompt.rundir import RunLock

    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None
    assert f"process {os.getpid()}" in second.acquire()
    first.release()
    assert second.acquire() is None and second.path.exists()  # the file the first deleted, made anew
    second.release()
    assert not second.path.exists()


# --------------------------------------------------------------------------------------- 4. crash-safe files
def test_a_full_disk_while_appending_a_row_keeps_every_row_whole(cli, tmp_path, monkeypatch, runs):
    run = tmp_path / "run"
    real = files_module._write_all

    def disk_full_in_round_2(fd, data):
        if data.startswith(b'{"round": 2,'):
            real(fd, data[: len(data) // 2])  # half the row reaches the disk, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    with monkeypatch.context() as patch:
        patch.setattr(files_module, "_write_all", disk_full_in_round_2)
        code, _, err = cli("fit", "--config", SMOKE, "--out_dir", run, "--federation.rounds", "3")
    line = one_line(err)
    assert code == 2 and f"cannot write the run directory {run} (No space left on device" in line
    assert "checkpoints/last.ckpt keeps round 1" in line
    assert (run / "metrics.jsonl").read_text().endswith("\n") and [r["round"] for r in read_rows(run)] == [1]
    command = line.split("resume: ")[1]
    code, _, err = cli(*shlex.split(command)[1:])
    assert code == 0, err
    assert without_timings(read_rows(run)) == without_timings(read_rows(runs / "three"))


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_good_one(cli, tmp_path, monkeypatch, runs):
    run = tmp_path / "run"
    real = torch.save

    def disk_full_in_round_2(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("round") == 2:
            handle.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, handle, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full_in_round_2)
        code, _, err = cli("fit", "--config", SMOKE, "--out_dir", run, "--federation.rounds", "3")
    assert code == 2 and "No space left on device" in one_line(err) and "keeps round 1" in err
    assert torch.load(last(run), weights_only=True)["round"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no temporary file left
    code, _, err = cli("fit", "--resume", last(run))
    assert code == 0, err
    assert without_timings(read_rows(run)) == without_timings(read_rows(runs / "three"))


def test_a_torn_last_row_is_dropped_on_resume_and_the_csv_rebuilt(cli, finished, runs):
    with open(finished / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 3, "train_loss": 0.')  # a crash mid-append, without the row's newline
    code, _, err = cli("fit", "--resume", last(finished), "--federation.rounds", "3")
    assert code == 0 and "dropped its torn last line" in err, err
    assert without_timings(read_rows(finished)) == without_timings(read_rows(runs / "three"))
    with open(finished / "csv" / "metrics.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2, 3]


def test_a_damaged_row_before_the_last_is_one_error_naming_the_file(tmp_path):
    from fedprompt.federation.checkpoint import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2\n{"round": 3}\n')
    with pytest.raises(FedPromptError, match=f"{path}: line 2 is not a JSON row"):
        read_jsonl(path)
    path.write_text('{"round": 1}\n{"round": 2')
    torn = []
    assert read_jsonl(path, torn) == [{"round": 1}] and torn == ['{"round": 2']


# ------------------------------------------------------------------------------- 5. values checked at parse time
@pytest.mark.parametrize("flags,expected", [
    (["--fabric.precision", "7-bit"], "--fabric.precision must be one of 64, 32, 16, transformer-engine"),
    (["--fabric.accelerator", "quantum"], "--fabric.accelerator must be one of auto, gpu, cpu, cuda"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**64 - 1 (torch's seed range), got -1"),
    (["--seed", str(2**64)], "--seed must be an integer from 0 to 2**64 - 1"),
    (["--data.seed", str(2**32)], "--data.seed must be an integer from 0 to 2**32 - 1 (numpy's RandomState range)"),
    (["--out_dir", ""], "--out_dir is empty"),
    (["--out_dir", " "], "--out_dir is empty"),
    (["--resume", ""], "--resume is empty"),
    (["--federation.max_failed_rounds", "0"], "--federation.max_failed_rounds must be >= 1, got 0"),
    (["--data.max_image_pixels", "0"], "--data.max_image_pixels must be >= 1 (or null for no limit)"),
])
def test_values_out_of_range_are_one_line_before_anything_runs(cli, monkeypatch, flags, expected):
    monkeypatch.setattr(fedprompt.fit, "setup", lambda *a, **k: pytest.fail("the command ran"))
    code, _, err = cli("fit", "--config", SMOKE, *flags)
    assert code == 2 and expected in one_line(err), err


def test_the_edges_of_the_seed_ranges_are_accepted(cli, monkeypatch):
    ran = []
    monkeypatch.setattr(fedprompt.fit, "setup", lambda mode, run: ran.append(run))
    code, _, err = cli("fit", "--config", SMOKE, "--seed", str(2**64 - 1), "--data.seed", str(2**32 - 1),
                       "--fabric.precision", "bf16", "--fabric.accelerator", "cpu")
    assert code == 0, err
    assert ran[0].seed == 2**64 - 1 and ran[0].data.seed == 2**32 - 1


def test_lightning_names_are_lightnings_own():
    import typing

    from lightning.fabric.accelerators import ACCELERATOR_REGISTRY
    from lightning.fabric.connector import _PRECISION_INPUT

    from fedprompt.args import FabricArgs, lightning_names

    accelerators, precisions = lightning_names()
    assert set(ACCELERATOR_REGISTRY.available_accelerators()) | {"auto", "gpu"} == set(accelerators)
    assert {str(v) for t in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(t)} == set(precisions)
    assert "auto" in accelerators and "32-true" in precisions  # the defaults, accepted without asking Lightning
    for name in precisions:
        FabricArgs(precision=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(cli, tmp_path, no_loading):
    code, _, err = cli("fit", "--config", SMOKE, "--fabric.accelerator", "cuda", "--out_dir", tmp_path / "run")
    assert code == 2 and "--fabric.accelerator cuda: this machine has no CUDA device" in one_line(err)
    assert not (tmp_path / "run").exists()


def test_lightning_refusals_are_one_line(cli, tmp_path, no_loading):
    code, _, err = cli("fit", "--config", SMOKE, "--fabric.devices", "x", "--out_dir", tmp_path / "run")
    assert code == 2 and "fabric: Lightning cannot run with accelerator cpu, devices x" in one_line(err)


def test_data_root_that_is_a_file_is_one_line(cli, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    code, _, err = cli("fit", "--config", SMOKE, "--data", "DomainFolders", "--data.root", tmp_path / "file.txt",
                       "--out_dir", tmp_path / "run")
    assert code == 2 and f"{tmp_path / 'file.txt'} is a file, not a folder" in one_line(err)
    assert not (tmp_path / "run").exists()


def test_resuming_a_missing_checkpoint_names_the_checkpoint(cli, tmp_path):
    code, _, err = cli("fit", "--resume", tmp_path / "run" / "checkpoints" / "last.ckpt")
    line = one_line(err)
    assert code == 2 and "checkpoint file not found" in line and "hyperparameters.yaml" not in line


def test_more_shots_than_a_class_has_is_a_warning_naming_the_classes(capsys):
    from fedprompt.data import Synthetic
    from fedprompt.data.partition import IID

    Synthetic(num_classes=2, train_per_class=6, num_shots=1000, partition=IID(2)).setup()
    err = capsys.readouterr().err
    assert "data.num_shots 1000 keeps every train image" in err and "no class of any client has that many" in err
    from fedprompt.data import Sample
    from fedprompt.data.base import ClientSplit
    from fedprompt.data.reader import warn_few_shots

    def client(cid, counts):
        return ClientSplit(cid, [Sample(f"{cid}-{c}-{i}", c) for c, n in enumerate(counts) for i in range(n)], [],
                           name=f"site{cid}")

    warn_few_shots([client(0, [5, 2]), client(1, [0, 9])], ["cat", "dog"], 4, "pets")
    err = capsys.readouterr().err
    assert "data.num_shots 4: 1 (client, class) pair(s) of pets have fewer train images, so all of theirs are " \
           "kept: site0/dog 2." in err
    warn_few_shots([client(0, [5, 4])], ["cat", "dog"], 4, "pets")
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------- 6. images and weight files
def make_folders(root: Path, classes=("cat", "dog")) -> None:
    for split in ("train", "test"):
        for i, c in enumerate(classes):
            for k in range(2):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * i, 10 * k, 0)).save(root / split / c / f"{k}.png")


def test_a_decompression_bomb_header_is_named_while_indexing(tmp_path, monkeypatch):
    from fedprompt.data import SplitFolders
    from fedprompt.data.check import image_problem
    from fedprompt.data.partition import IID

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    make_folders(tmp_path)
    bomb = tmp_path / "train" / "cat" / "bomb.png"
    bomb.write_bytes(png_claiming(20000, 10000))  # 2e8 pixels, 0.8 GB decoded: over Pillow's limit, not memory's
    with pytest.raises(FedPromptError) as err:
        SplitFolders(root=str(tmp_path)).setup()
    assert f"{bomb} (its header claims more than 2 x 89478485 pixels" in str(err.value)
    assert "--data.max_image_pixels" in str(err.value)
    SplitFolders(root=str(tmp_path), max_image_pixels=None, partition=IID(2)).setup()  # no limit: the header reads
    assert Image.MAX_IMAGE_PIXELS is None and image_problem(str(bomb)) is None
    # (a header too large for this machine's memory is refused even without a limit: tests/test_faults_cli.py)


def test_an_unreadable_class_folder_is_an_error_not_skipped(tmp_path, monkeypatch):
    from fedprompt.data import DomainFolders, SplitFolders

    make_folders(tmp_path / "split")
    denied = tmp_path / "split" / "train" / "dog"
    real = os.scandir

    def scandir(path="."):
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(FedPromptError, match=f"cannot read the folder {denied} \\(Permission denied\\)"):
        SplitFolders(root=str(tmp_path / "split")).read()
    monkeypatch.setattr(os, "scandir", real)
    (tmp_path / "domains" / "a").mkdir(parents=True)
    shutil.copytree(tmp_path / "split" / "train", tmp_path / "domains" / "a", dirs_exist_ok=True)
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(p))) if Path(p).name == "a" else listdir(p))
    with pytest.raises(FedPromptError, match="cannot read the folder .*/a"):
        DomainFolders(root=str(tmp_path / "domains")).read()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any folder")
def test_an_unreadable_class_folder_really_unreadable(tmp_path):
    from fedprompt.data import SplitFolders

    make_folders(tmp_path)
    os.chmod(tmp_path / "train" / "dog", 0)
    try:
        with pytest.raises(FedPromptError, match="cannot read the folder"):
            SplitFolders(root=str(tmp_path)).read()
    finally:
        os.chmod(tmp_path / "train" / "dog", 0o755)


def test_an_unreadable_image_file_is_named(tmp_path, monkeypatch):
    from fedprompt.data import check

    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    real = Image.open
    monkeypatch.setattr(check.Image, "open", lambda p, *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(p))) if str(p) == str(path) else real(p, *a, **k))
    assert check.image_problem(str(path)) == "permission denied: the process cannot read the file"


def other_architecture(tmp_path: Path) -> Path:
    from fedprompt.backbone.loading import register_model_config

    config = json.loads((ROOT / "fedprompt" / "backbone" / "configs" / "fedprompt-tiny.json").read_text())
    config["vision_cfg"]["width"] = 128
    (tmp_path / "fedprompt-tiny-wide.json").write_text(json.dumps(config))
    register_model_config(tmp_path / "fedprompt-tiny-wide.json")
    import open_clip

    torch.save(open_clip.create_model("fedprompt-tiny-wide").state_dict(), tmp_path / "wide.bin")
    return tmp_path / "wide.bin"


def test_weight_files_that_are_not_checkpoints_or_would_run_code_are_one_line(tmp_path):
    from fedprompt.backbone import load_backbone

    marker = tmp_path / "ran"
    cases = {"evil.bin": (evil_weights(tmp_path / "evil.bin", marker), "holds Python objects other than tensors "
                                                                       "(posix.system): loading it could run code"),
             "noise.bin": (tmp_path / "noise.bin", "is not a PyTorch checkpoint (or it is damaged)"),
             "noise.safetensors": (tmp_path / "noise.safetensors", "is not a safetensors file (or it is damaged)"),
             "wide.bin": (other_architecture(tmp_path), "holds the weights of another architecture than "
                                                        "fedprompt-tiny: ViT image tower of width 128")}
    for name in ("noise.bin", "noise.safetensors"):
        (tmp_path / name).write_bytes(os.urandom(2048))
    for name, (path, expected) in cases.items():
        with pytest.raises(FedPromptError) as err:
            load_backbone("fedprompt-tiny", str(path))
        message = str(err.value)
        assert expected in message and str(path) in message and "\n" not in message, (name, message)
        assert "weights_only" not in message and "arbitrary code" not in message, name
    assert "ViT image tower of width 64, 2 layers, patch 8" in message  # both architectures named
    assert not marker.exists()  # the payload never ran


def test_a_bad_weights_file_stops_before_the_run_folder(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--backbone.pretrained", evil_weights(tmp_path / "e.pt", tmp_path / "x"),
                       "--out_dir", tmp_path / "run")
    assert code == 2 and "loading it could run code" in one_line(err) and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- 7. errors a person can read
@pytest.mark.parametrize("flags,expected", [
    (["--data.partition.alpha", "x"], "--data.partition.alpha x: invalid value 'x' for Dirichlet (expected a finite "
                                      "number)"),
    (["--data.partition.alph", "3"], "--data.partition.alph 3: Dirichlet has no setting 'alph'; its settings: "
                                     "num_clients, alpha"),
    (["--data.partition", "Foo"], "--data.partition Foo: unknown data.partition class 'Foo'; choose one of ByDomain"),
    (["--data.partition", "IID", "--data.partition.num_clients", "x"],
     "--data.partition.num_clients x: invalid value 'x' for IID (expected an integer)"),
    (["--federation.parallel_clients", "x"], "invalid value 'x' for the federation group (expected an integer or "
                                             "one of auto)"),
    (["--log.logger", "foo"], "invalid value 'foo' for the log group (expected one of csv, wandb, tensorboard, "
                              "none)"),
    (["--method.lr", "nan"], "--method.lr nan: invalid value 'nan' for PromptFL (expected a finite number)"),
])
def test_type_errors_name_the_key_the_value_and_the_type(cli, monkeypatch, flags, expected):
    monkeypatch.setattr(fedprompt.fit, "setup", lambda *a, **k: pytest.fail("the command ran"))
    code, _, err = cli("fit", "--config", SMOKE, *flags)
    assert code == 2 and expected in one_line(err), err


def test_a_nested_config_key_of_the_wrong_type_names_the_file(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((Path(SMOKE).read_text()).replace("alpha: 1.0", "alpha: many"))
    code, _, err = cli("fit", "--config", bad)
    assert code == 2 and f"--config {bad}: data.partition.alpha: invalid value 'many' for Dirichlet" in one_line(err)


def test_an_optional_logger_without_its_package_names_the_extra(cli, tmp_path, monkeypatch, no_loading):
    import importlib.util
    import tomllib

    import fedprompt.loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(fedprompt.loggers.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    code, _, err = cli("fit", "--config", SMOKE, "--log.logger", "tensorboard", "--out_dir", tmp_path / "run")
    assert code == 2 and "pip install 'fedprompt[tensorboard]'" in one_line(err) and not (tmp_path / "run").exists()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("tensorboard") for req in extras["tensorboard"])
    assert any(req.startswith("wandb") for req in extras["wandb"])


def test_rounds_where_every_client_failed_are_printed_and_stop_the_run(cli, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", run, "--method.lr", "1e30", "--federation.rounds", "6",
                       "--federation.on_client_failure", "skip", "--federation.max_failed_rounds", "2")
    lines = err.strip().splitlines()
    assert code == 2 and "round 2: every sampled client failed (client 0: non-finite loss" in err
    assert lines[-1].startswith("fedprompt: error: round 3: every sampled client failed, 2 rounds in a row")
    assert "--federation.max_failed_rounds" in lines[-1]
    assert [r["round"] for r in read_rows(run)] == [1, 2, 3]
    code, _, err = cli("fit", "--resume", last(run), "--federation.max_failed_rounds", "3")
    assert code == 2 and "round 4: every sampled client failed, 3 rounds in a row" in err  # counted over the resume


# --------------------------------------------------------------------------------------------- 8. caches
def test_a_feature_shard_changed_in_place_is_rebuilt_not_used(tiny_backbone, tmp_path, capsys):
    import lightning as L

    from fedprompt.data import Synthetic, clip_transforms
    from fedprompt.data.cache import FeatureCache

    splits = Synthetic(num_classes=2, train_per_class=2, test_per_class=2, image_size=32).setup()
    samples = splits.source.test
    fabric = L.Fabric(accelerator="cpu", devices=1)
    transform = clip_transforms(tiny_backbone.preprocess_cfg, augment=False)[1]

    def features():
        cache = FeatureCache(tiny_backbone, fabric, ("features",), 8, splits.loader, directory=tmp_path)
        return cache, cache.dataset(samples, transform, "test").tensors["features"]

    first, reference = features()
    shard = next((tmp_path / "features").rglob("*.pt"))
    content = torch.load(shard, weights_only=True)
    content["tensors"]["features"][0] += 1.0  # changed in place: same name, same key, same recorded checksum
    torch.save(content, shard)
    again, values = features()
    assert again.encoded == len(samples) and torch.equal(values, reference)
    assert "does not match its key or its content" in capsys.readouterr().err
    third, values = features()
    assert third.encoded == 0 and torch.equal(values, reference)  # the rebuilt shard is used


def test_an_image_store_changed_in_place_is_rebuilt_not_used(tmp_path, capsys):
    from fedprompt.data import Synthetic, clip_transforms
    from fedprompt.data.store import ImageStore, StoreKind

    splits = Synthetic(num_classes=2, train_per_class=2, test_per_class=2, image_size=32).setup()
    calls = []

    def loader(sample):
        calls.append(sample)
        return splits.loader(sample)

    loader.cache_key = "tests.faults-loader"
    kind = StoreKind.test(clip_transforms({"size": 32}, augment=False)[1])
    reference = ImageStore.build(splits.source.test, loader, kind, directory=tmp_path, progress=False)
    pixels = next(tmp_path.glob("*.u8"))
    data = bytearray(pixels.read_bytes())
    data[100] ^= 0xFF
    pixels.write_bytes(bytes(data))  # same size, other content
    calls.clear()
    rebuilt = ImageStore.build(splits.source.test, loader, kind, directory=tmp_path, progress=False)
    assert len(calls) == len(splits.source.test) and torch.equal(rebuilt.images, reference.images)
    assert "does not match its checksum" in capsys.readouterr().err
    calls.clear()
    ImageStore.build(splits.source.test, loader, kind, directory=tmp_path, progress=False)
    assert calls == []  # the rebuilt store is used


def test_a_cache_that_cannot_be_written_stays_in_memory(tiny_backbone, tmp_path, monkeypatch, capsys):
    import lightning as L

    import fedprompt.data.store as store
    from fedprompt.data import Synthetic, clip_transforms
    from fedprompt.data.cache import FeatureCache
    from fedprompt.data.store import ImageStore, StoreKind

    splits = Synthetic(num_classes=2, train_per_class=2, test_per_class=2, image_size=32).setup()
    transform = clip_transforms(tiny_backbone.preprocess_cfg, augment=False)[1]
    real_save = torch.save

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        cache = FeatureCache(tiny_backbone, L.Fabric(accelerator="cpu", devices=1), ("features",), 8, splits.loader,
                             directory=tmp_path)
        features = cache.dataset(splits.source.test, transform, "test").tensors["features"]
    assert features.shape[0] == len(splits.source.test) and not list(tmp_path.rglob("*.pt*"))
    assert "feature cache: cannot write" in capsys.readouterr().err
    assert torch.save is real_save

    def no_space(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "_replace_with", no_space)
    kind = StoreKind.test(clip_transforms({"size": 32}, augment=False)[1])
    images = ImageStore.build(splits.source.test, splits.loader, kind, directory=tmp_path / "images", progress=False)
    assert len(images) == len(splits.source.test) and "the decoded images stay in memory" in capsys.readouterr().err
