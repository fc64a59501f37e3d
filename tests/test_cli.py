"""The command line itself: cheap to import, documented options, range checks before anything loads, bench progress."""

import re
import subprocess
import sys

import pytest

import fedprompt.fit
from conftest import ROOT

SMOKE = str(ROOT / "configs" / "smoke.yaml")
HEAVY = ("torch", "lightning", "open_clip", "transformers", "torchvision", "torchmetrics")


def import_times(code: str) -> dict[str, int]:
    """Cumulative import time in microseconds of every module imported by ``code`` (python -X importtime)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    times = {}
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            times[match.group(3)] = int(match.group(1))
    return times


def test_importing_the_cli_is_cheap_relative_to_torch():
    loaded = subprocess.run([sys.executable, "-c", "import sys, fedprompt.__main__; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    assert not [m for m in HEAVY if m in loaded]
    times = import_times("import fedprompt.__main__; import torch")
    assert times["fedprompt.__main__"] < 0.1 * times["torch"], times  # relative: the same process, the same machine


def test_version_is_the_installed_packages_and_imports_nothing_heavy(cli):
    from importlib.metadata import PackageNotFoundError, version

    import fedprompt

    try:
        installed = version("fedprompt")
    except PackageNotFoundError:  # run from a source tree without installing it
        installed = fedprompt.__version__
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"fedprompt {installed}"
    loaded = subprocess.run([sys.executable, "-c", "import sys; from fedprompt.__main__ import main; main(['--version']);"
                             " print(' '.join(sys.modules))"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert loaded.stdout.startswith("fedprompt ")
    assert not [m for m in (*HEAVY, "jsonargparse") if m in loaded.stdout.split()]
    code, out, _ = cli("--help")
    assert "--version" in out


def test_help_shows_the_attribute_docstrings(cli):
    code, out, _ = cli("fit", "--help")
    assert code == 0
    for text in ("Communication rounds.", "Train batch size", "Evaluate every N rounds", "Experiment logger",
                 "Processes per node", "open_clip architecture name", "--overwrite"):
        assert text in " ".join(out.split()), text


@pytest.mark.parametrize("flags,expected", [
    (["--federation.rounds", "-1"], "--federation.rounds must be >= 1, got -1"),
    (["--federation.fraction", "1.5"], "--federation.fraction must be in (0, 1], got 1.5"),
    (["--federation.fraction", "0"], "--federation.fraction must be in (0, 1], got 0.0"),
    (["--train.batch_size", "0"], "--train.batch_size must be >= 1, got 0"),
    (["--train.local_steps", "0"], "--train.local_steps must be >= 1, got 0"),
    (["--train.local_epochs", "0"], "--train.local_epochs must be >= 1, got 0"),
    (["--eval.every", "0"], "--eval.every must be >= 1, got 0"),
    (["--eval.batch_size", "-3"], "--eval.batch_size must be >= 1, got -3"),
    (["--log.checkpoint_every", "-1"], "--log.checkpoint_every must be >= 0, got -1"),
    (["--fabric.devices", "0"], "--fabric.devices must be >= 1, got 0"),
    (["--fabric.num_nodes", "0"], "--fabric.num_nodes must be >= 1, got 0"),
    (["--data.num_shots", "0"], "--data.num_shots must be >= 1"),
    (["--data.num_workers", "-1"], "--data.num_workers must be >= 0, got -1"),
    (["--data.train_per_class", "0"], "--data.train_per_class must be >= 1, got 0"),
    (["--federation.rounds", "0", "--federation.fraction", "2"],
     "--federation.rounds must be >= 1, got 0; --federation.fraction must be in (0, 1], got 2.0"),
])
def test_numeric_arguments_are_range_checked_before_anything_runs(cli, monkeypatch, flags, expected):
    monkeypatch.setattr(fedprompt.fit, "setup", lambda *a, **k: pytest.fail("the command ran"))
    code, _, err = cli("fit", "--config", SMOKE, *flags)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_range_checks_accept_the_edges(cli, monkeypatch):
    ran = []
    monkeypatch.setattr(fedprompt.fit, "setup", lambda mode, run: ran.append(run))
    code, _, err = cli("fit", "--config", SMOKE, "--federation.rounds", "1", "--federation.fraction", "1",
                       "--log.checkpoint_every", "0", "--fabric.devices", "-1")
    assert code == 0, err
    assert ran[0].federation.rounds == 1 and ran[0].fabric.devices == -1


def test_bench_reports_progress(cli):
    code, out, err = cli("bench", "--truncation", "true", "--model", "fedprompt-tiny", "--num_classes", "3", "--n_ctx",
                         "2", "--repeats", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "building fedprompt-tiny (random init) ..."
    for label in ("truncated", "77 tokens"):
        assert f"  {label}: warm-up ..." in lines and any(f"  {label}: repetition 2/2:" in x for x in lines)
    assert "comparing the features" in out and lines[-1].startswith("speed-up")


@pytest.mark.parametrize("flags,expected", [
    (["--method.lr", "fast"], "--method.lr fast: invalid value 'fast' for PromptFL (expected a finite number)"),
    (["--method.n_ctx", "four"], "--method.n_ctx four: invalid value 'four' for PromptFL (expected an integer or null)"),
    (["--method.lrr", "0.1"], "--method.lrr 0.1: PromptFL has no setting 'lrr'; its settings: lr, momentum"),
    (["--method", "NoSuch"],
     "--method NoSuch: unknown method class 'NoSuch'; choose one of CoCoOp, DPFPL, FOCoOp, FedAPT, FedCLIP, FedLoRA, FedMGP"),
    (["--federation.roundz", "3"], "--federation.roundz 3: the federation group has no setting 'roundz'"),
    (["--seed", "x"], "--seed x: invalid value 'x' (expected an integer)"),
    (["--method", "FedOTP", "--method.ot", "dykstra"],
     "--method.ot dykstra: invalid value 'dykstra' for FedOTP (expected one of unbalanced, balanced, uniform)"),
])
def test_a_bad_flag_is_one_line_naming_flag_value_and_type(cli, monkeypatch, flags, expected):
    monkeypatch.setattr(fedprompt.fit, "setup", lambda *a, **k: pytest.fail("the command ran"))
    code, _, err = cli("fit", "--config", SMOKE, *flags)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_a_bad_config_file_is_named_with_its_key_or_its_yaml_line(cli, tmp_path):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("method:\n  class_path: fedprompt.methods.FedOTP\n  init_args: {n_ctx: four}\n")
    code, _, err = cli("fit", "--config", wrong)
    assert code == 2 and f"--config {wrong}: method.n_ctx: invalid value 'four' for FedOTP" in err, err
    broken = tmp_path / "broken.yaml"
    broken.write_text("federation:\n  rounds: [1\n")
    code, _, err = cli("fit", "--config", broken)
    assert code == 2 and f"--config {broken}: YAML syntax error at line 3, column 1" in err, err
    code, _, err = cli("fit", "--config", tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml: no such file" in err
    # an inline YAML value of a flag: the flag, the value and the column, in one line
    for flag in (["--federation", "{rounds: [1"], ["--federation={rounds: [1"]):
        code, _, err = cli("fit", "--config", SMOKE, *flag)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--federation {rounds: [1: YAML syntax error at column 12" in err and "--federation.KEY VALUE" in err, err
    code, _, err = cli("fitt")
    assert code == 2 and "unknown command 'fitt'; choose one of fit, evaluate" in err


def test_help_lists_the_commands_in_whole_sentences_and_fit_help_lists_the_methods(cli):
    code, out, _ = cli("--help")
    text = " ".join(out.split())
    assert code == 0 and "fit Train prompts across federated clients and write the run directory (metrics.jsonl, " \
        "summary.json, checkpoints/last.ckpt)." in text
    assert "bench Time a few rounds of a configured federation" in text and "end-of-text truncation." in text
    code, out, _ = cli("fit", "--help")
    from fedprompt.methods import METHODS

    assert code == 0 and all(name in out for name in METHODS) and "PromptFL" in METHODS


def test_help_pages_do_not_import_lightning():
    """`fedprompt fit --help` builds its parser from the light Method and FederatedData base classes: torch,
    Lightning, open_clip and torchmetrics (seconds of imports) stay out of a help request."""
    import subprocess
    import sys

    code = ("import sys\nfrom fedprompt.__main__ import main\ntry:\n    main(['fit', '--help'])\nexcept SystemExit:\n"
            "    pass\nheavy = [m for m in ('lightning', 'open_clip', 'torchmetrics', 'transformers') if m in sys.modules]"
            "\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]
    assert "--federation.parallel_clients" in out.stdout
