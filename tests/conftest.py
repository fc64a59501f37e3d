"""Shared fixtures: the tiny random-init architecture, the real images in ../shared/data, an in-process CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning  # noqa: F401  (imported here, its log handler binds to the session's stderr, not one test's capsys)
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network (and nothing probes it)
if "FEDPROMPT_CACHE" not in os.environ:  # decoded images and features persist here, never in ~/.cache
    import tempfile

    os.environ["FEDPROMPT_CACHE"] = tempfile.mkdtemp(prefix="fedprompt-test-cache-")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDPROMPT_SHARED", ROOT.parent / "shared"))
PACS = SHARED / "data" / "pacs-mini"
CIFAR10 = SHARED / "data" / "cifar10-mini"
EFFL0 = SHARED / "models" / "effl0-minilm"

TINY = ["--backbone.model", "fedprompt-tiny", "--backbone.pretrained", "null"]


def require(path: Path) -> Path:
    """Skip the test with a clear reason when shared test data is absent."""
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (set FEDPROMPT_SHARED to the folder with data/ and models/)")
    return path


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole suite: its workloads are tiny, and on a shared 2-core machine OpenMP's spinning
    threads make them many times slower under load (subprocess tests choose their own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_backbone():
    from fedprompt.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone("fedprompt-tiny", None)


@pytest.fixture
def cli(capsys):
    """Run ``fedprompt ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from fedprompt.__main__ import main

    def run(*args: str):
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def tiny_fit(method, out_dir: Path, rounds: int, resume: Path | None = None, local_epochs: int = 1) -> dict:
    """``fit`` in-process on the tiny model and generated images: 2 domain clients of 4 classes (8 train, 4 test
    images per class), one client sampled after round 1, augmentation on, a checkpoint every round; returns the
    summary."""
    from fedprompt.args import BackboneArgs, EvalArgs, FabricArgs, FederationArgs, LogArgs, TrainArgs
    from fedprompt.data import Synthetic
    from fedprompt.commands import fit

    return fit(method=method,
               data=Synthetic(num_classes=4, train_per_class=8, test_per_class=4, image_size=32, num_domains=2),
               backbone=BackboneArgs(model="fedprompt-tiny", pretrained=None),
               federation=FederationArgs(rounds=rounds, fraction=0.5),
               train=TrainArgs(local_epochs=local_epochs, batch_size=8, augment=True), eval=EvalArgs(batch_size=64),
               log=LogArgs(logger="none", progress=False, checkpoint_every=1),
               fabric=FabricArgs(accelerator="cpu", devices=1, precision="32-true"),
               out_dir=str(out_dir), resume=str(resume) if resume else None, seed=0)


def resumed_and_straight(method, tmp_path: Path, rounds: int = 3) -> tuple[dict, dict]:
    """``tiny_fit`` of ``method`` interrupted after ``rounds - 1`` rounds and resumed, and the same run straight
    through: asserts their metrics rows are equal; returns both final checkpoints (resumed, straight)."""
    tiny_fit(method, tmp_path / "straight", rounds=rounds)
    tiny_fit(method, tmp_path / "cut", rounds=rounds - 1)
    tiny_fit(method, tmp_path / "cut", rounds=rounds, resume=tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert without_timings(read_rows(tmp_path / "cut")) == without_timings(read_rows(tmp_path / "straight"))
    return tuple(torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
                 for run in ("cut", "straight"))


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


#: row keys that describe how a run executed rather than what it computed (they differ between equal runs)
EXECUTION_KEYS = ("parallel_clients",)


def without_timings(rows: list[dict]) -> list[dict]:
    """Metrics rows without what may differ between runs that compute the same thing: the ``*_seconds`` timings and
    the lock-step group size (``parallel_clients``)."""
    return [{k: v for k, v in row.items() if not k.endswith("_seconds") and k not in EXECUTION_KEYS} for row in rows]


def run_parity_script(name: str, **options) -> dict:
    """Run ``benchmarks/<name>.py``'s parity checks against the official code (one seed; the script runs two; its
    ``run`` takes ``options``) and return the methods that ran with their results; skip the test when no mirror of
    the official code is present."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    threads = torch.get_num_threads()
    try:
        results = parity.run(seeds=(1,), **options)
    finally:
        torch.set_num_threads(threads)
    ran = {k: v for k, v in results.items() if v is not None}
    if not ran:
        pytest.skip(f"no mirror of the official repositories under {parity.default_mirror()} (set FEDPROMPT_MIRROR)")
    return ran


def stacked_against_single(make_stacked, make_single, rates=(0.1, 0.05, 0.2), steps_of=(4, 2, 3)):
    """A stacked optimiser (``make_stacked(params)``) over 3 slots and one torch optimiser per slot
    (``make_single(params, lr)``) stepped with the same random gradients at per-slot ``rates``; slot k takes
    ``steps_of[k]`` of the steps (an inactive slot has a zero gradient and its single takes no step). Returns the
    start, the stacked values ``[3, 4, 5]`` and the singles' values."""
    torch.manual_seed(0)
    start = torch.randn(3, 4, 5)
    stacked = torch.nn.Parameter(start.clone())
    singles = [torch.nn.Parameter(start[k].clone()) for k in range(3)]
    opt = make_stacked([stacked])
    torch_opts = [make_single([p], r) for p, r in zip(singles, rates)]
    for step in range(max(steps_of)):
        grads = torch.randn(3, 4, 5)
        active = torch.tensor([step < n for n in steps_of])
        stacked.grad = grads * active.view(-1, 1, 1)  # an inactive client has no loss: zero gradient
        opt.set_slots(active, torch.tensor(rates, dtype=torch.float64))
        opt.step()
        for k in range(3):
            if active[k]:
                singles[k].grad = grads[k].clone()
                torch_opts[k].step()
    return start, stacked.data, [p.data for p in singles]


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` and its bytes (a refused command must leave a run folder byte-identical)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    """The one error line of a refused command's stderr (warnings aside); fails on a traceback or more lines."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("fedprompt: warning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims ``width`` x ``height`` pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 7)) + \
        chunk(b"IEND", b"")
