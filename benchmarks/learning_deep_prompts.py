"""Offline evidence that deep and visual prompts learn: VPT, IVLP, MaPLe, PromptSRC and FedMGP's visual groups on the
tiny random-init ViT (``fedprompt-tiny``: 2 layers per tower) and generated images (``fedprompt.data.Synthetic``).

No small pretrained ViT image-text model installs from a package registry on the development machines (the offline
stand-in ``../shared/models/effl0-minilm`` has an EfficientNet image tower, without tokens), so this is the only
offline check that the prompts in the image tower train: the train loss falls and the accuracy on the held-out
generated test images rises above chance. It says nothing about accuracy on real data.

    PYTHONPATH=$PWD python benchmarks/learning_deep_prompts.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import torch

from fedprompt.args import BackboneArgs, EvalArgs, FabricArgs, FederationArgs, LogArgs, TrainArgs
from fedprompt.data import Dirichlet, Synthetic
from fedprompt.commands import fit
from fedprompt.methods import IVLP, VPT, FedMGP, MaPLe, PromptSRC, ZeroShot

CLASSES = 4


def methods():
    return {
        "zero-shot (no prompts, untrained)": ZeroShot(),
        "VPT (4 tokens, depth 2)": VPT(visual_tokens=4, visual_depth=2, lr=0.05),
        "IVLP (2 + 2 tokens, depth 2 / 2)": IVLP(n_ctx=2, visual_tokens=2, text_depth=2, visual_depth=2, lr=0.05),
        "MaPLe (2 tokens, J = 2)": MaPLe(n_ctx=2, text_depth=2, lr=0.01),
        "PromptSRC (4 + 4, depth 2 / 2)": PromptSRC(text_depth=2, visual_depth=2, lr=0.05, gpa_mean=6, gpa_std=1),
        "FedMGP (5 + 5 groups, visual depth 1)": FedMGP(n_ctx=2, lr=0.05),
        "FedMGP (5 + 5 groups, visual depth 2)": FedMGP(n_ctx=2, visual_depth=2, lr=0.05),
    }


def run(method, out: Path, rounds: int) -> list[dict]:
    with contextlib.redirect_stdout(io.StringIO()):  # fit's own per-client table
        _fit(method, out, rounds)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _fit(method, out: Path, rounds: int) -> None:
    fit(method=method,
        data=Synthetic(num_classes=CLASSES, train_per_class=16, test_per_class=8, image_size=32,
                       partition=Dirichlet(num_clients=4, alpha=1.0, min_size=4)),
        backbone=BackboneArgs(model="fedprompt-tiny", pretrained=None),
        federation=FederationArgs(rounds=rounds, fraction=1.0),
        train=TrainArgs(local_epochs=2, batch_size=8, augment=False), eval=EvalArgs(batch_size=64, every=1),
        log=LogArgs(logger="none", progress=False), fabric=FabricArgs(accelerator="cpu", devices=1,
                                                                        precision="32-true"),
        out_dir=str(out), seed=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"chance: {1 / CLASSES:.3f}; 4 clients, Dirichlet(1.0), 16 train / 8 test images per class, "
          f"{args.rounds} rounds of 2 local epochs")
    print(f"{'method':40s} {'loss round 1':>12s} {'loss last':>10s} {'acc round 1':>11s} {'acc last':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, method) in enumerate(methods().items()):
            rows = run(method, Path(tmp) / str(i), args.rounds)
            first, last = rows[0], rows[-1]
            loss = [f"{r['train_loss']:.3f}" if r.get("train_loss") is not None else "-" for r in (first, last)]
            print(f"{name:40s} {loss[0]:>12s} {loss[1]:>10s} {first['local_acc']:11.3f} {last['local_acc']:9.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
