"""Nothing silent, third pass (issue 31), the user-facing side: ``fedprompt table`` and ``sweep`` under faults (an
unknown metric, an output that cannot be written, a full disk), Python-object YAML tags in every file fedprompt
reads, images too large to decode, strict JSON for infinite epsilons, one delta check for both kinds of DP, errors
before torch is imported, help that names the methods, and progress that suits a log file.

Every refused command is one line (no traceback) and leaves the run folders it was given byte-identical."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import fedprompt.files as files_module
from conftest import ROOT, one_line, png_claiming, read_rows, snapshot
from fedprompt.errors import FedPromptError

SMOKE = str(ROOT / "configs" / "smoke.yaml")
EVIL_TAG = '!!python/object/apply:os.system ["touch {marker}"]'


def strict_json(text: str):
    """JSON as a strict parser reads it (RFC 8259: no Infinity or NaN tokens)."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def full_disk_when(predicate):
    """A stand-in for the checked path's byte writer that fails like a full disk for the data ``predicate`` picks."""
    real = files_module._write_handle

    def write(handle, data):
        if predicate(data):
            handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(handle, data)

    return write


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory) -> Path:
    """A finished 2-round smoke run with client-level DP and noise multiplier 0: an infinite epsilon every round."""
    from fedprompt.__main__ import main

    run = tmp_path_factory.mktemp("dp") / "run"
    main(["fit", "--config", SMOKE, "--dp.noise_multiplier", "0", "--dp.clip_norm", "0.1", "--out_dir", str(run)])
    return run


@pytest.fixture
def run_copy(dp_run, tmp_path) -> Path:
    import shutil

    shutil.copytree(dp_run, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------------------------------- strict JSON
def test_an_infinite_epsilon_is_written_as_null_in_strict_json(dp_run):
    rows = [strict_json(line) for line in (dp_run / "metrics.jsonl").read_text().splitlines()]
    summary = strict_json((dp_run / "summary.json").read_text())
    assert [r["epsilon"] for r in rows] == [None, None] and summary["epsilon"] is None
    assert summary["dp_noise_multiplier"] == 0 and isinstance(summary["local_acc"], float)


def test_readers_cope_with_null_table_and_resume(cli, run_copy, tmp_path):
    code, out, err = cli("table", run_copy, "--metric", "epsilon", "--out", tmp_path / "t", "--figure", "false")
    assert code == 0, err
    assert "| PromptFL | – |" in out  # no finite value: a dash
    code, out, err = cli("table", run_copy, "--out", tmp_path / "t", "--figure", "false")
    assert code == 0 and "| PromptFL | " in out, err
    code, _, err = cli("fit", "--resume", run_copy / "checkpoints" / "last.ckpt", "--federation.rounds", "3")
    assert code == 0, err
    assert [r["round"] for r in read_rows(run_copy)] == [1, 2, 3]
    assert strict_json((run_copy / "summary.json").read_text())["epsilon"] is None


def test_strict_json_helpers():
    assert files_module.dumps({"a": float("inf"), "b": [float("nan"), 1.5], "c": (float("-inf"),)}) == \
        '{"a": null, "b": [null, 1.5], "c": [null]}'
    assert files_module.finite(2.0) == 2.0 and files_module.finite("inf") == "inf"


# --------------------------------------------------------------------------------------------------- table
def test_an_unknown_metric_is_one_line_listing_the_known_ones(cli, run_copy, tmp_path):
    before = snapshot(run_copy)
    code, _, err = cli("table", run_copy, "--metric", "nope", "--out", tmp_path / "t")
    line = one_line(err)
    assert code == 2 and "table: --metric nope: no run has this metric; the runs' metrics" in line, line
    assert "local_acc" in line and "global_acc" in line
    code, _, err = cli("table", run_copy, "--columns", "metrics", "--metrics", "[local_acc, nope, nada]", "--out",
                       tmp_path / "t")
    assert code == 2 and "table: --metrics nope, nada: no run has these metrics" in one_line(err)
    code, _, err = cli("table", run_copy, "--columns", "targets", "--metric", "nope", "--out", tmp_path / "t")
    assert code == 2 and "--metric nope: no run has this metric" in one_line(err)
    assert not list(tmp_path.glob("t.*")) and snapshot(run_copy) == before


def test_table_output_that_cannot_be_written_is_one_line(cli, run_copy, tmp_path):
    before = snapshot(run_copy)
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("table", run_copy, "--out", tmp_path / "afile" / "t")
    line = one_line(err)
    assert code == 2 and f"cannot write the table {tmp_path / 'afile' / 't'}.md" in line and "a part of the path is a file" in line
    assert "no file of the table was changed" in line
    code, _, err = cli("table", run_copy, "--out", tmp_path / "new" / "deeper" / "t", "--figure", "false")
    assert code == 0, err  # a folder that does not exist yet is made
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["t.csv", "t.md"]
    assert snapshot(run_copy) == before


def test_a_full_disk_while_writing_the_table_changes_no_file_of_it(cli, run_copy, tmp_path, monkeypatch):
    out = tmp_path / "tables"
    out.mkdir()
    (out / "t.md").write_text("the old table\n")
    before, folder = snapshot(run_copy), snapshot(out)
    monkeypatch.setattr(files_module, "_write_handle", full_disk_when(lambda data: data.startswith(b"method,")))
    code, _, err = cli("table", run_copy, "--out", out / "t")
    line = one_line(err)
    assert code == 2 and "No space left on device (the disk or quota is full)" in line
    assert f"cannot write the table {out / 't'}.md" in line
    assert snapshot(out) == folder and snapshot(run_copy) == before  # the old table whole, no temporary file


# --------------------------------------------------------------------------------------------------- sweep
def fake_seed(out: Path, n: int, *args) -> None:
    """What a finished seed of a sweep leaves (the fit child process is not run)."""
    (out / f"seed{n}").mkdir(parents=True, exist_ok=True)
    (out / f"seed{n}" / "summary.json").write_text(json.dumps({"method": "PromptFL", "rounds": 2,
                                                               "local_acc": 0.5 + n / 10}))


def test_a_full_disk_while_writing_seeds_json_keeps_every_seed(cli, tmp_path, monkeypatch):
    import fedprompt.launchers

    def fake_run(spec: dict) -> dict:  # the launcher's one run: the fit child process is not run
        fake_seed(Path(spec["folder"]), spec["seed"])
        return {"status": "ok", "code": 0}

    out = tmp_path / "sweep"
    monkeypatch.setattr(fedprompt.launchers, "run_one", fake_run)
    monkeypatch.setattr(files_module, "_write_handle", full_disk_when(lambda data: b'"seeds"' in data))
    code, _, err = cli("sweep", "--config", SMOKE, "--seeds", "[1, 2]", "--out_dir", out)
    line = one_line(err)
    assert code == 2 and f"cannot write {out / 'seeds.json'} (No space left on device" in line
    assert f"every seed's run is kept in {out}" in line and "run the same sweep command again" in line
    assert sorted(p.name for p in out.iterdir()) == ["seed1", "seed2", "sweep.yaml"]
    monkeypatch.undo()
    monkeypatch.setattr(fedprompt.launchers, "run_one", lambda spec: pytest.fail("a finished seed ran again"))
    code, _, err = cli("sweep", "--config", SMOKE, "--seeds", "[1, 2]", "--out_dir", out)
    assert code == 0, err
    assert strict_json((out / "seeds.json").read_text())["metrics"]["local_acc"]["values"] == [0.6, 0.7]


# ------------------------------------------------------------------------------------------ Python-object tags
def test_a_python_tag_in_any_yaml_file_fedprompt_reads_is_one_line(cli, run_copy, tmp_path):
    marker = tmp_path / "ran"
    tag = EVIL_TAG.format(marker=marker)
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"method: {tag}\n")
    code, _, err = cli("fit", "--config", evil, "--out_dir", tmp_path / "new")
    line = one_line(err)
    assert code == 2 and f"--config {evil}: the tag !!python/object/apply:os.system at line 1, column 9" in line
    assert "fedprompt reads plain YAML only" in line and not (tmp_path / "new").exists()
    # a sweep folder whose sweep.yaml was replaced
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.yaml").write_text(f"seed: {tag}\n")
    before = snapshot(sweep)
    code, _, err = cli("sweep", "--config", SMOKE, "--out_dir", sweep)
    assert code == 2 and f"sweep: {sweep / 'sweep.yaml'}: the tag !!python/object/apply:os.system" in one_line(err)
    assert snapshot(sweep) == before
    # a run directory's hyperparameters.yaml: read by table, and by fit --resume without --config
    (run_copy / "hyperparameters.yaml").write_text(f"method: {tag}\n")
    before = snapshot(run_copy)
    code, _, err = cli("table", run_copy, "--out", tmp_path / "t")
    assert code == 2 and "hyperparameters.yaml: the tag !!python/object/apply:os.system" in one_line(err)
    code, _, err = cli("fit", "--resume", run_copy / "checkpoints" / "last.ckpt")
    assert code == 2 and "hyperparameters.yaml: the tag !!python/object/apply:os.system" in one_line(err)
    assert snapshot(run_copy) == before and not marker.exists()


def test_read_yaml_names_the_file_line_and_column():
    with pytest.raises(FedPromptError, match=r"x.yaml: the tag !!python/name:os.system at line 2, column 4 "):
        files_module.load_yaml("a: 1\nb: !!python/name:os.system ''\n", "x.yaml")
    assert files_module.load_yaml("a: [1, 2]\n", "x") == {"a": [1, 2]}


# -------------------------------------------------------------------------------------------------- images
def image_folders(root: Path) -> None:
    for split in ("train", "test"):
        for i, c in enumerate(("cat", "dog")):
            for k in range(2):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * i, 10 * k, 0)).save(root / split / c / f"{k}.png")


def test_an_image_header_of_ten_billion_pixels_without_a_limit_is_named_while_indexing(cli, tmp_path, monkeypatch):
    import fedprompt.data.check

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setattr(fedprompt.data.check, "memory_bytes", lambda: 24 * 2**30)  # as this machine, anywhere
    image_folders(tmp_path / "data")
    bomb = tmp_path / "data" / "train" / "cat" / "bomb.png"
    bomb.write_bytes(png_claiming(100000, 100000))
    code, _, err = cli("fit", "--config", SMOKE, "--data", "SplitFolders", "--data.root", tmp_path / "data",
                       "--data.max_image_pixels", "null", "--data.partition", "IID",
                       "--data.partition.num_clients", "2", "--out_dir", tmp_path / "run")
    line = one_line(err)
    assert code == 2 and f"{bomb} (its header claims 100000 x 100000 pixels, 37 GiB once decoded, more than " \
        "this machine's 24 GiB of memory" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_runs_out_of_memory_while_decoding_is_one_line(cli, tmp_path, monkeypatch, workers):
    image_folders(tmp_path / "data")
    real = Image.Image.convert

    def out_of_memory(self, *args, **kwargs):
        if str(getattr(self, "filename", "")).endswith("cat/1.png"):
            raise MemoryError()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", out_of_memory)  # forked data workers inherit it
    code, _, err = cli("fit", "--config", SMOKE, "--data", "SplitFolders", "--data.root", tmp_path / "data",
                       "--data.partition", "IID", "--data.partition.num_clients", "2", "--data.num_workers", workers,
                       "--out_dir", tmp_path / "run")
    line = one_line(err)
    assert code == 2 and line == (f"fedprompt: error: cannot decode image {tmp_path / 'data' / 'train' / 'cat' / '1.png'}: "
                                  "its header claims 8 x 8 pixels, more than this process can hold in memory. Remove "
                                  "or replace the file (with --data.max_image_pixels at its default such files are "
                                  "refused while the data is indexed).")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------ DP
def test_one_delta_check_for_client_level_and_record_level_dp(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--method", "DPFPL", "--method.n_ctx", "4", "--method.rank", "2",
                       "--method.noise_multiplier", "1.0", "--method.delta", "0.5", "--federation.rounds", "1",
                       "--out_dir", tmp_path / "record")
    assert code == 0, err
    assert "fedprompt: warning: method.delta 0.5 is not below 1 / 14 training samples (the smallest client's): the " \
        "guarantee allows one training sample to leak outright with that probability; lower method.delta." in err
    code, _, err = cli("fit", "--config", SMOKE, "--dp.noise_multiplier", "1.0", "--dp.clip_norm", "0.1",
                       "--dp.delta", "0.5", "--federation.rounds", "1", "--out_dir", tmp_path / "client")
    assert code == 0, err
    assert "fedprompt: warning: dp.delta 0.5 is not below 1 / 4 clients: the guarantee allows one client's data to " \
        "leak outright with that probability; lower dp.delta." in err
    code, _, err = cli("fit", "--config", SMOKE, "--method", "DPFPL", "--method.n_ctx", "4", "--method.rank", "2",
                       "--method.noise_multiplier", "1.0", "--federation.rounds", "1", "--out_dir", tmp_path / "ok")
    assert code == 0 and "delta" not in err, err


# -------------------------------------------------------------------------------------- errors before imports
CASES = {
    "missing": (["fit", "--config", "{tmp}/nope.yaml"], "--config {tmp}/nope.yaml: no such file."),
    "syntax": (["fit", "--config", "{tmp}/broken.yaml"], "--config {tmp}/broken.yaml: YAML syntax error at line 3, column 1"),
    "tag": (["fit", "--config", "{tmp}/tag.yaml"], "--config {tmp}/tag.yaml: the tag !!python/object/apply:os.system"),
    "top key": (["fit", "--config", SMOKE, "--federaton.rounds", "3"], "--federaton.rounds 3: no such setting"),
    "group key": (["fit", "--config", SMOKE, "--federation.round", "3"],
                  "--federation.round 3: the federation group has no setting 'round'"),
    "group type": (["fit", "--config", SMOKE, "--federation.rounds", "three"],
                   "--federation.rounds three: invalid value 'three' for the federation group (expected an integer)"),
    "method": (["fit", "--config", SMOKE, "--method", "FedOPT"], "--method FedOPT: unknown method class 'FedOPT'"),
    "method key": (["fit", "--config", "{tmp}/method_key.yaml"],
                   "--config {tmp}/method_key.yaml: method.n_ctxx: FedOTP has no setting 'n_ctxx'"),
    "method type": (["zeroshot", "--config", SMOKE, "--method", "FedOTP", "--method.eps", "small"],
                    "--method.eps small: invalid value 'small' for FedOTP (expected a finite number)"),
    "data key": (["partition", "--config", SMOKE, "--data.num_classe", "3"],
                 "--data.num_classe 3: Synthetic has no setting 'num_classe'"),
    "sweep option": (["sweep", "--config", SMOKE, "--seeds", "one"], "--seeds one: invalid value 'one'"),
}
NO_TORCH = """
import json, sys
from fedprompt.__main__ import main
results = {}
for name, (argv, _) in json.loads(sys.argv[1]).items():
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    results[name] = [code, [m for m in ("torch", "lightning", "open_clip") if m in sys.modules]]
print("RESULTS " + json.dumps(results))
"""


def test_config_errors_happen_without_importing_torch(tmp_path):
    """A config typo costs no torch import: files, YAML, keys and types (the method's from its source) are checked
    first. Each case runs in one fresh interpreter and checks ``sys.modules`` after it (no timing)."""
    (tmp_path / "broken.yaml").write_text("federation:\n  rounds: [1\n")
    (tmp_path / "tag.yaml").write_text(f"method: {EVIL_TAG.format(marker=tmp_path / 'ran')}\n")
    (tmp_path / "method_key.yaml").write_text("method:\n  class_path: fedprompt.methods.FedOTP\n  init_args:\n"
                                              "    n_ctxx: 4\n")
    cases = {name: ([a.format(tmp=tmp_path) for a in argv], text.format(tmp=tmp_path))
             for name, (argv, text) in CASES.items()}
    out = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(cases)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    results = json.loads(out.stdout.split("RESULTS ", 1)[1])
    errors = [line for line in out.stderr.splitlines() if line.startswith("fedprompt: error: ")]
    assert len(errors) == len(cases) and "Traceback" not in out.stderr, out.stderr[-3000:]
    for (name, (_, text)), line in zip(cases.items(), errors):
        assert results[name] == [2, []], (name, results[name], line)
        assert text in line, (name, line)
    assert not (tmp_path / "ran").exists()


def test_partition_reads_a_full_run_config_without_importing_torch(tmp_path):
    code = ("import sys\nfrom fedprompt.__main__ import main\nmain(['partition', '--config', sys.argv[1], "
            "'--method.n_ctx', '8'])\nprint('HEAVY', [m for m in ('torch', 'lightning') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, SMOKE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout and "4 clients, 4 classes, 64 train / 32 test samples" in out.stdout


# ------------------------------------------------------------------------------------------ help that names
def test_method_help_is_read_from_the_source_with_the_command_in_its_usage(tmp_path):
    code = ("import sys\nfrom fedprompt.__main__ import main\nmain(['fit', '--method.help', 'FedOTP'])\n"
            "print('HEAVY', [m for m in ('torch', 'lightning') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: fedprompt fit [--method.lr LR]") and "HEAVY []" in out.stdout
    text = " ".join(out.stdout.split())
    assert "--method.ot {unbalanced,balanced,uniform}" in text
    assert "Entropic regularisation (0.1 in the CIFAR-100 script and the argparse default; 0.01 in few-shot). " \
        "(type: float, default: 0.1)" in text


def test_method_help_without_a_known_method_lists_them(cli):
    from fedprompt.methods import METHODS

    code, out, _ = cli("fit", "--method.help")
    assert code == 0 and f"NAME: {', '.join(METHODS)}, or the class_path" in out
    code, _, err = cli("fit", "--method.help", "FedOPT")
    assert code == 2 and f"--method.help FedOPT: unknown method; choose one of {', '.join(METHODS)}" in one_line(err)


def test_the_method_catalog_equals_the_imported_classes():
    """``--method.help`` and the checks before torch read each method's fields from its source; they must be the
    dataclass's own: the same names in the same order, annotations, defaults and docstrings."""
    import ast
    import dataclasses
    import typing

    import fedprompt.methods
    from fedprompt.methods import METHODS
    from fedprompt.methods.catalog import method_spec

    for name in METHODS:
        cls, spec = getattr(fedprompt.methods, name), method_spec(name)
        fields = [f for f in dataclasses.fields(cls) if f.init]
        assert [f.name for f in fields] == list(spec.settings), name
        hints = typing.get_type_hints(cls)
        for f in fields:
            setting = spec.settings[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert setting.annotation == hints[f.name] and ast.literal_eval(setting.default) == default, (name, f)
            assert setting.doc, (name, f.name)


def test_fit_help_names_the_methods_not_the_base_classes(cli):
    from fedprompt.methods import METHODS

    code, out, _ = cli("fit", "--help")
    text = " ".join(out.split())
    start = text.index("--method METHOD The federated")
    entry = text[start: text.index("--data", start)]
    assert code == 0 and "known subclasses" not in entry and "fedprompt.methods.TrainedMethod" not in entry
    assert "one of: " + ", ".join(METHODS) in entry and "--method.help NAME" in entry


def test_partition_prints_whole_class_names(cli, tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for i, name in enumerate(("a_rather_long_class_name", "another_long_class_name")):
            (root / split / name).mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (8, 8), (80 * i, 30 * k, 0)).save(root / split / name / f"{k}.png")
    code, out, err = cli("partition", "--data", "SplitFolders", "--data.root", root, "--data.partition", "IID",
                         "--data.partition.num_clients", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["class", "0", "1"]
    assert lines[1].split()[0] == "a_rather_long_class_name" and lines[2].split()[0] == "another_long_class_name"
    assert sum(map(int, lines[1].split()[1:])) == 3 and lines[5] == "clients: 0 client0, 1 client1"


# -------------------------------------------------------------------------------------------------- progress
def test_progress_in_a_log_is_plain_lines(cli, tmp_path):
    """Output that is not a terminal (pytest captures it) gets one plain line per update, never a carriage
    return: a line per round here."""
    code, out, err = cli("fit", "--config", SMOKE, "--log.progress", "true", "--out_dir", tmp_path / "run")
    assert code == 0, err
    assert "\r" not in err and "\r" not in out
    rounds = [line for line in err.splitlines() if line.startswith("fedprompt: rounds: ")]
    assert [line.split()[2] for line in rounds] == ["1/2", "2/2"] and "loss=" in rounds[0] and "acc=" in rounds[0]


def test_line_progress_is_rate_limited_and_ends_with_a_line(monkeypatch, capsys):
    import fedprompt.progress as progress

    clock = iter([0.0, 1.0, 20.0, 21.0, 40.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.tqdm(total=6, desc="encoding images", unit="img")
    for _ in range(3):
        bar.update(2)  # at 1 s: no line; at 20 s: a line (15 s since the last); at 21 s: the end, left to close
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["fedprompt: encoding images: 4/6 img (67 %), 20 s",
                                                    "fedprompt: encoding images: 6/6 img (100 %), 40 s"]
    assert progress.tqdm(range(3), disable=True).disable


def test_the_lightning_names_checked_without_lightning_are_lightnings():
    """``fabric.accelerator`` and ``fabric.precision`` names that every Lightning accepts are taken without
    importing it (a config check stays light); they must be in this Lightning's own lists."""
    from fedprompt.args import COMMON_ACCELERATORS, COMMON_PRECISIONS, lightning_names

    accelerators, precisions = lightning_names()
    assert set(COMMON_ACCELERATORS) <= set(accelerators) and set(COMMON_PRECISIONS) <= set(precisions)
