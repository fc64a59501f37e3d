"""``fedprompt bench``: timings of the exact speed-ups (figures printed, never asserted in tests).

Each step says what it is doing as it starts (building the model, warming up, each timed repetition), so a bench
that takes minutes on a CPU is never silent.
"""

from __future__ import annotations

import time

import torch


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


def bench(model: str = "ViT-B-32", num_classes: int = 50, n_ctx: int = 16, repeats: int = 3,
          threads: int | None = None) -> dict:
    """Time one forward+backward of the prompt text path with and without end-of-text truncation
    (random-init backbone, CPU); prints both figures and the largest feature difference.

    Args:
        model: open_clip architecture (random init: no download).
        num_classes: number of class prompts encoded together.
        n_ctx: context tokens.
        repeats: timed repetitions (after one warm-up).
        threads: torch CPU threads (default: torch's choice).
    """
    from fedprompt.backbone import Backbone, load_open_clip

    if threads:
        torch.set_num_threads(threads)
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
