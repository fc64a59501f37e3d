"""``fedprompt bench``: where the time of a round goes (figures printed, never asserted in tests).

Two benchmarks:

- the round benchmark (``--config CONFIG`` and any ``fit`` flags): runs a few rounds of the configured federation
  and prints, per round, seconds split into data, image tower, text encoder, logits (FedOTP: similarity and OT),
  backward, optimizer, evaluation and communication, train images per second, peak memory and the mean device
  utilisation (CUDA, where the driver reports it); ``--json true`` prints the same rows as JSON instead. Sections
  are timed with a device synchronisation at both ends, so the figures add up but the run is slightly slower than
  ``fit``.
- ``--truncation true``: one forward+backward of the prompt text path with and without end-of-text truncation on a
  random-init backbone, and the largest feature difference (exactness check of that speed-up).
"""

from __future__ import annotations

import json as jsonlib
import resource
import statistics
import threading
import time
from typing import Optional

import torch

from fedprompt.args import BackboneArgs, EvalArgs, FabricArgs, FederationArgs, LogArgs, TrainArgs
from fedprompt.data import FederatedData
from fedprompt.errors import FedPromptError
from fedprompt.methods import Method

SECTIONS = ("data", "image", "text", "logits", "backward", "optimizer", "evaluation", "communication")


def bench(method: Optional[Method] = None, data: Optional[FederatedData] = None,
          backbone: BackboneArgs = BackboneArgs(), federation: FederationArgs = FederationArgs(),
          train: TrainArgs = TrainArgs(), eval: EvalArgs = EvalArgs(), log: LogArgs = LogArgs(),
          fabric: FabricArgs = FabricArgs(), out_dir: Optional[str] = None, resume: Optional[str] = None,
          seed: int = 0, rounds: int = 3, json: bool = False, truncation: bool = False,
          model: str = "ViT-B-32", num_classes: int = 50, n_ctx: int = 16, repeats: int = 3,
          threads: Optional[int] = None) -> dict:
    """Time a few rounds of a configured federation (``--config CONFIG``), or with ``--truncation true`` the
    prompt text path with and without end-of-text truncation.

    Args:
        method: the method (as in fit).
        data: the dataset and its split (as in fit).
        backbone: the frozen open_clip model.
        federation: the federated protocol (``federation.rounds`` is replaced by ``rounds``).
        train: local training.
        eval: evaluation (every benchmarked round is evaluated).
        log: ignored (nothing is logged or checkpointed).
        fabric: devices and precision (one device).
        out_dir: ignored.
        resume: ignored.
        seed: run seed.
        rounds: rounds to time.
        json: print the per-round rows as JSON (for scripts) instead of the table.
        truncation: run the text-truncation benchmark instead (uses model, num_classes, n_ctx, repeats).
        model: truncation benchmark: open_clip architecture (random init: no download).
        num_classes: truncation benchmark: class prompts encoded together.
        n_ctx: truncation benchmark: context tokens.
        repeats: truncation benchmark: timed repetitions (after one warm-up).
        threads: torch CPU threads (default: torch's choice).
    """
    if threads:
        torch.set_num_threads(threads)
    if truncation:
        return bench_truncation(model, num_classes, n_ctx, repeats)
    if method is None or data is None:
        raise FedPromptError("bench: give a run config (--config CONFIG, as for fit) for the round benchmark, or "
                             "--truncation true for the text-path benchmark.")
    if rounds < 1:
        raise FedPromptError(f"bench: --rounds must be >= 1, got {rounds}")
    federation.rounds = rounds
    cfg = dict(method=method, data=data, backbone=backbone, federation=federation, train=train, eval=eval, log=log,
               fabric=fabric, out_dir=None, resume=None, seed=seed)
    rows = bench_rounds(cfg, show=print if not json else lambda *a, **k: None)
    if json:
        print(jsonlib.dumps(rows, indent=1))
    return {"rounds": rows}


class _Utilisation:
    """Mean GPU utilisation (percent) sampled every 0.1 s in a background thread (CUDA with NVML only)."""

    def __init__(self, device: torch.device):
        self.samples: list[float] = []
        self.ok = device.type == "cuda"
        if self.ok:
            try:
                torch.cuda.utilization(device)
            except Exception:  # no NVML (pynvml) on this machine
                self.ok = False
        self.device = device
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.ok:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.1):
            self.samples.append(float(torch.cuda.utilization(self.device)))

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process peak)


def bench_rounds(cfg: dict, show=print) -> list[dict]:
    """Run ``cfg["federation"].rounds`` rounds with section timers; ``show`` the table; return one row per round."""
    import lightning as L

    from fedprompt.federation.engine import SectionTimer
    from fedprompt.fit import build_federation

    fab = cfg["fabric"]
    fabric = L.Fabric(accelerator=fab.accelerator, devices=1, precision=fab.precision)
    device = fabric.device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timer = SectionTimer(sync=sync)
    show(f"bench: building the federation ({cfg['method'].name}, {type(cfg['data']).__name__}, "
          f"{cfg['backbone'].model}, {fab.precision}, {device})", flush=True)
    fed, _ = build_federation(fabric, cfg, timer=timer)
    fed.progress = False
    rows = []
    header = "round  total  " + "  ".join(f"{s[:6]:>6}" for s in SECTIONS) + "  img/s  peak_GB  util%  K"
    show(header, flush=True)
    for round_idx in range(1, cfg["federation"].rounds + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fed.trainer.samples = 0
        with _Utilisation(device) as util:
            start = time.perf_counter()
            row = fed.run_round(round_idx)
            metrics = fed.evaluate_all()
            if sync:
                sync()
            total = time.perf_counter() - start
        seconds = timer.pop()
        train_time = sum(seconds.get(s, 0.0) for s in SECTIONS[:6])
        out = {"round": round_idx, "seconds": total, **{s: seconds.get(s, 0.0) for s in SECTIONS},
               "train_images": fed.trainer.samples,
               "images_per_second": fed.trainer.samples / train_time if train_time else None,
               "peak_memory_gb": _peak_memory_gb(device), "gpu_utilisation": util.mean(),
               "parallel_clients": fed.group_size, "train_loss": row.get("train_loss"),
               "local_acc": metrics.get("local_acc")}
        rows.append(out)
        util_text = f"{out['gpu_utilisation']:5.1f}" if out["gpu_utilisation"] is not None else "  n/a"
        ips = f"{out['images_per_second']:6.0f}" if out["images_per_second"] else "   n/a"
        show(f"{round_idx:>5} {total:6.2f}  " + "  ".join(f"{out[s]:6.3f}" for s in SECTIONS)
              + f"  {ips}  {out['peak_memory_gb']:7.2f}  {util_text}  {fed.group_size}", flush=True)
    fed.feed.close()
    return rows


def timed(fns: list, repeats: int) -> list[tuple[float, object]]:
    """Median seconds of each function over ``repeats`` calls after one warm-up call each, the functions called in
    turn (so a change of machine load hits all of them alike); returns [(seconds, last result)] in order (used by
    the scripts in ``benchmarks/``)."""
    outs = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), out) for t, out in zip(times, outs)]


def _progress(text: str) -> None:
    print(text, flush=True)


def _time(fn, repeats: int, label: str) -> float:
    _progress(f"  {label}: warm-up ...")
    fn()
    total = 0.0
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
        _progress(f"  {label}: repetition {i + 1}/{repeats}: {(time.perf_counter() - start) * 1000:.1f} ms")
    return total / repeats


def bench_truncation(model: str = "ViT-B-32", num_classes: int = 50, n_ctx: int = 16, repeats: int = 3) -> dict:
    """Time one forward+backward of the prompt text path with and without end-of-text truncation
    (random-init backbone, CPU); prints both figures and the largest feature difference. Each step says what it
    is doing as it starts, so a bench that takes minutes on a CPU is never silent."""
    from fedprompt.backbone import Backbone, load_open_clip

    _progress(f"building {model} (random init) ...")
    tic = time.perf_counter()
    loaded = load_open_clip(model, None)
    _progress(f"built in {time.perf_counter() - tic:.1f} s; timing the text path ({num_classes} classes, "
              f"{n_ctx} context tokens, {repeats} repetitions after a warm-up)")
    fast, full = Backbone(loaded, truncate=True), Backbone(loaded, truncate=False)
    names = [f"class number {i}" for i in range(num_classes)]
    ctx = (torch.randn(n_ctx, fast.ctx_dim) * 0.02).requires_grad_()
    results = {}
    for label, bb in (("truncated", fast), ("77 tokens", full)):
        tokens = bb.prompt_tokens(names, n_ctx)

        def step():
            ctx.grad = None
            bb.encode_prompts(tokens, ctx).sum().backward()

        results[label] = _time(step, repeats, label)
        print(f"text forward+backward, {label:>9}: {results[label] * 1000:8.1f} ms "
              f"({tokens.embeddings.shape[1]} positions, {num_classes} classes, {model})")
    _progress("comparing the features of both paths ...")
    with torch.no_grad():
        diff = (fast.encode_prompts(fast.prompt_tokens(names, n_ctx), ctx)
                - full.encode_prompts(full.prompt_tokens(names, n_ctx), ctx)).abs().max()
    print(f"speed-up {results['77 tokens'] / results['truncated']:.1f}x, max |feature difference| {float(diff):.2e}")
    return results
