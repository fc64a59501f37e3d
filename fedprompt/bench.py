"""``fedprompt bench`` (:func:`fedprompt.commands.bench`): where the time of a round goes (figures printed, never
asserted in tests).

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

import contextlib
import json as jsonlib
import os
import sys
import resource
import statistics
import threading
import time
from dataclasses import replace

import torch

from fedprompt.run import BenchArgs, RunArgs
from fedprompt.errors import FedPromptError

SECTIONS = ("data", "image", "text", "logits", "backward", "optimizer", "evaluation", "communication")


def run_bench(run: RunArgs, options: BenchArgs) -> dict:
    """``fedprompt bench`` (see :func:`fedprompt.commands.bench`)."""
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.truncation:
        return bench_truncation(options.model, options.num_classes, options.n_ctx, options.repeats)
    if run.runtime != "fabric":
        raise FedPromptError("bench times the rounds of the Fabric runtime; leave out --runtime flower "
                             "(benchmarks/bench_flower.py measures Flower's overhead).")
    if run.method is None or run.data is None:
        raise FedPromptError("bench: give a run config (--config CONFIG, as for fit) for the round benchmark, or "
                             "--truncation true for the text-path benchmark.")
    run = replace(run, federation=replace(run.federation, rounds=options.rounds), eval=replace(run.eval, every=1),
                  out_dir=None, resume=None)  # every round evaluated
    show = print if not options.json else lambda *a, **k: None
    rows = bench_rounds(run, show=show, profile=options.profile)
    if options.json:
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


def bench_rounds(run: RunArgs, show=print, profile: bool = False) -> list[dict]:
    """Run ``run.federation.rounds`` rounds with section timers; ``show`` the table; return one row per round
    (with ``profile``, the last row also holds the aten-op and host-sync counts of one more local round)."""
    import lightning as L

    from fedprompt.build import build_parts
    from fedprompt.timing import SectionTimer

    fab = run.fabric
    fabric = L.Fabric(accelerator=fab.accelerator, devices=1, precision=fab.precision)
    device = fabric.device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timer = SectionTimer(sync=sync)
    show(f"bench: building the federation ({run.method.name}, {type(run.data).__name__}, "
          f"{run.backbone.model}, {fab.precision}, {device})", flush=True)
    parts = build_parts(fabric, run, timer=timer)
    driver = parts.fabric_driver(run.federation.rounds, progress=False, timer=timer)
    pool = parts.pool
    rows = []
    header = "round  total  " + "  ".join(f"{s[:6]:>6}" for s in SECTIONS) + "  img/s  peak_GB  util%  K"
    show(header, flush=True)
    for round_idx in range(1, run.federation.rounds + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        pool.trainer.samples = 0
        with _Utilisation(device) as util:
            start = time.perf_counter()
            row = driver.run_round(round_idx)
            if sync:
                sync()
            total = time.perf_counter() - start
        seconds = timer.pop()
        train_time = sum(seconds.get(s, 0.0) for s in SECTIONS[:6])
        out = {"round": round_idx, "seconds": total, **{s: seconds.get(s, 0.0) for s in SECTIONS},
               "train_images": pool.trainer.samples,
               "images_per_second": pool.trainer.samples / train_time if train_time else None,
               "peak_memory_gb": _peak_memory_gb(device), "gpu_utilisation": util.mean(),
               "parallel_clients": pool.group_size, "train_loss": row.get("train_loss"),
               "local_acc": row.get("local_acc")}
        rows.append(out)
        util_text = f"{out['gpu_utilisation']:5.1f}" if out["gpu_utilisation"] is not None else "  n/a"
        ips = f"{out['images_per_second']:6.0f}" if out["images_per_second"] else "   n/a"
        show(f"{round_idx:>5} {total:6.2f}  " + "  ".join(f"{out[s]:6.3f}" for s in SECTIONS)
              + f"  {ips}  {out['peak_memory_gb']:7.2f}  {util_text}  {pool.group_size}", flush=True)
    if profile:
        counts = profile_local_round(parts, run.federation.rounds)
        rows[-1].update(counts)
        show(f"profile of one warm local round ({counts['profiled_steps']} steps, {counts['profiled_client_steps']} "
             f"client-steps, K = {pool.group_size}): aten ops {counts['aten_ops_per_step']:.0f} per step, "
             f"{counts['aten_ops_per_client_step']:.0f} per client-step ({counts['kernel_ops_per_client_step']:.0f} "
             f"kernel-like); host syncs {counts['host_syncs_per_step']:.1f} per step, "
             f"{counts['host_syncs_per_client_step']:.2f} per client-step", flush=True)
    parts.feed.close()
    return rows


#: aten operations that read a device value back to the host (a host sync on a GPU): scalar reads (``.item()``,
#: ``bool(tensor)``) and operations whose output size depends on the data (boolean-mask indexing goes through
#: ``nonzero``). Blocking copies between host and device are syncs too, but on a CPU run there is no device, so the
#: profiler cannot see them; the engine makes its host-to-device copies non-blocking.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::bincount")


@contextlib.contextmanager
def _quiet_stderr():
    """Send what C/C++ code writes to the process's stderr (file descriptor 2) to /dev/null inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _inside(event, label: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == label:
            return True
        parent = parent.cpu_parent
    return False


def count_ops(events, label: str | None = None) -> dict[str, int]:
    """aten operations of profiler ``events`` (inside the ranges recorded as ``label`` when given): all of them
    (nested calls included), the kernel-like ones (no aten operation inside) and the host syncs
    (:data:`SYNC_OPS`)."""
    aten = [e for e in events if e.name.startswith("aten::") and (label is None or _inside(e, label))]
    leaves = [e for e in aten if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    syncs = [e for e in aten if e.name in SYNC_OPS]
    return {"aten": len(aten), "kernels": len(leaves), "syncs": len(syncs)}


def profile_local_round(parts, round_idx: int) -> dict:
    """Profile (torch profiler, host activities) one more local round of the clients this process trains in
    ``round_idx``; the clients' states are not changed. Returns the aten operations and host syncs inside the
    lock-step steps, per step and per client-step (one client's step; a step of K clients is K client-steps), and
    the scalar reads of the local round outside its steps (``host_reads_outside_steps``: on the host's own tensors,
    such as the feature cache's gathers, and each client's losses read back once at the end of its round, the one
    of them that is a device sync on a GPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from fedprompt.federation.engine import STEP_RECORD
    from fedprompt.federation.sampling import place

    pool = parts.pool
    mine = place(parts.sampler.trained(round_idx), pool.fabric.global_rank, pool.fabric.world_size)
    plans = [parts.sampler.plan(cid, round_idx) for cid in mine]
    by_classes: dict[tuple, list] = {}
    for plan in plans:
        by_classes.setdefault(tuple(pool.classnames_of(plan.cid)), []).append(plan)
    steps = sum(max(p.steps for p in chunk) for members in by_classes.values() for chunk in pool.chunks(members))
    client_steps = sum(p.steps for p in plans)
    prof = torch_profile(activities=[ProfilerActivity.CPU])
    with _quiet_stderr():  # the profiler's C++ side writes a line at its start and stop, whatever the log level
        prof.start()
    try:
        pool.train(mine, round_idx, parts.server.global_state)
    finally:
        with _quiet_stderr():
            prof.stop()
    events = prof.events()
    counts, everything = count_ops(events, STEP_RECORD), count_ops(events)
    return {"profiled_steps": steps, "profiled_client_steps": client_steps,
            "host_reads_outside_steps": everything["syncs"] - counts["syncs"],
            "aten_ops_per_step": counts["aten"] / max(steps, 1),
            "aten_ops_per_client_step": counts["aten"] / max(client_steps, 1),
            "kernel_ops_per_client_step": counts["kernels"] / max(client_steps, 1),
            "host_syncs_per_step": counts["syncs"] / max(steps, 1),
            "host_syncs_per_client_step": counts["syncs"] / max(client_steps, 1)}


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
