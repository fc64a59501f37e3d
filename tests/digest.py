"""Smoke-run digest: every method's metrics rows and final prompt state on the smoke config, so that a change that
must not move a number (a refactoring of the method interface, the engine or the loop) can be checked against the
runs recorded before it.

``python tests/digest.py --write tests/data/smoke_digest.pt`` records the digest; ``tests/test_digest.py`` runs the
same cases and compares (losses within 1e-5 relative, accuracies and every other row value equal, prompt states
within 1e-5). The reference in ``tests/data`` was recorded on main at cdfad7f, before the method interface was
reshaped (issue 15); regenerate it only for a change that is meant to move numbers, and say so in the commit. A new
method's cases join it with ``--add --cases NAME ...`` (the recorded cases stay as they are): FedPHA and FedMVP were
added so (issue 27), and FedAPT, FOCoOp and PromptFL-ood (OOD detection in the evaluation) after them. Cases may
also be recorded in their own files beside it (``smoke_digest_<topic>.pt``, e.g. ``--cases FedLoRA FedCLIP --write
tests/data/smoke_digest_adapters.pt``: issue 26); the test reads every ``smoke_digest*.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# unequal client sizes (Dirichlet: 15/19/14/16 train images), 3 of 4 clients sampled after round 1
COMMON = ["--config", SMOKE, "--federation.rounds", "3", "--federation.fraction", "0.75", "--log.progress", "false"]

#: where the local optimiser's settings live on the command line (the flat form: --method.lr)
OPTIM = "--method."


def optim(**settings) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"{OPTIM}{key}", str(value))]


#: case name -> (command, flags)
CASES: dict[str, tuple[str, list[str]]] = {
    "PromptFL": ("fit", ["--method", "PromptFL"]),
    "PromptFL-augment": ("fit", ["--method", "PromptFL", "--train.augment", "true"]),
    "PromptFL-device-augment": ("fit", ["--method", "PromptFL", "--train.augment", "true",
                                        "--train.device_augment", "true"]),
    "PromptFL-cosine-official": ("fit", ["--method", "PromptFL", *optim(lr_schedule="cosine", warmup_epochs=1,
                                                                         lr_scope="official")]),
    "FedProx": ("fit", ["--method", "FedProx", "--method.mu", "0.5"]),
    "FedPer": ("fit", ["--method", "FedPer", "--method.n_ctx", "4"]),
    "LocalCoOp": ("fit", ["--method", "LocalCoOp"]),
    "LocalCoOp-csc": ("fit", ["--method", "LocalCoOp", "--method.csc", "true", "--method.n_ctx", "4"]),
    "FedOTP": ("fit", ["--method", "FedOTP", "--method.n_ctx", "4", *optim(lr=0.5)]),
    "FedOTP-balanced-uncached": ("fit", ["--method", "FedOTP", "--method.n_ctx", "4", "--method.ot", "balanced",
                                         "--eval.feature_cache", "false", *optim(lr=0.5)]),
    "FedMGP": ("fit", ["--method", "FedMGP", "--method.n_ctx", "2", *optim(lr=0.01)]),
    "FedMGP-official-code": ("fit", ["--method", "FedMGP", "--method.n_ctx", "2", "--method.compat", "official",
                                     "--method.diversity", "code", "--method.inference", "max_logits",
                                     *optim(lr=0.01)]),
    "FedMGP-text-only": ("fit", ["--method", "FedMGP", "--method.n_ctx", "2", "--method.visual_groups", "0",
                                 "--method.inference", "feature_average", *optim(lr=0.01)]),
    "FedTPG": ("fit", ["--method", "FedTPG", *optim(lr=0.01)]),
    "FedPGP": ("fit", ["--method", "FedPGP", "--method.n_ctx", "4", "--method.bottleneck", "2", *optim(lr=0.5)]),
    "FedPGP-literal-x": ("fit", ["--method", "FedPGP", "--method.n_ctx", "4", "--method.bottleneck", "2",
                                 "--method.literal_x_prompt", "true", *optim(lr=0.5)]),
    "PromptFolio": ("fit", ["--method", "PromptFolio", "--method.n_ctx", "4",
                            *optim(lr=0.1, lr_scope="official", cosine_epochs=3)]),
    "PromptFL-base-to-novel": ("fit", ["--method", "PromptFL", "--data.subsample_classes", "base",
                                       "--data.num_classes", "6"]),
    "ZeroShot": ("zeroshot", ["--method", "ZeroShot"]),
    "FedPHA": ("fit", ["--method", "FedPHA", "--method.n_ctx_global", "4", "--method.n_ctx_local", "4",
                       *optim(lr=0.5)]),
    "FedPHA-heterogeneous-official": ("fit", ["--method", "FedPHA", "--method.n_ctx_global", "4",
                                              "--method.local_lengths", "[2,4,3,4]", "--method.compat", "official",
                                              "--method.projection", "minor", *optim(lr=0.5)]),
    "FedMVP": ("fit", ["--method", "FedMVP", "--method.attributes", str(ROOT / "tests" / "data" /
                                                                         "synthetic_attributes.json"),
                       *optim(lr=0.05)]),
    "FedAPT": ("fit", ["--method", "FedAPT", "--method.n_ctx", "2", "--method.domain_of", "client", *optim(lr=0.5)]),
    "FOCoOp": ("fit", ["--method", "FOCoOp", "--method.n_ctx", "2", "--method.num_negatives", "4",
                       "--method.negative_words", str(ROOT / "tests" / "data" / "negative_words"), *optim(lr=0.05)]),
    "PromptFL-ood": ("fit", ["--method", "PromptFL", "--data.subsample_classes", "base", "--data.num_classes", "6",
                             "--eval.ood", "[novel]", "--eval.ood_scores", "[msp,energy,mcm,neglabel]",
                             "--eval.ood_negatives", str(ROOT / "tests" / "data" / "negative_words"),
                             "--eval.ood_negative_count", "8"]),
    # issue 26 (recorded in smoke_digest_adapters.pt): LoRA in both towers with dropout and AdamW; LoRA in the text
    # tower only with SGD and the image feature cache; FedCLIP's adapter and Adam; pFedMMA in both towers
    "FedLoRA": ("fit", ["--method", "FedLoRA", *optim(lr=0.01)]),
    "FedLoRA-text-sgd-cached": ("fit", ["--method", "FedLoRA", "--method.encoder", "text", "--method.optimizer",
                                        "sgd", "--train.feature_cache", "true", *optim(lr=0.05)]),
    "FedCLIP": ("fit", ["--method", "FedCLIP", *optim(lr=0.001)]),
    "PFedMMA": ("fit", ["--method", "PFedMMA", "--method.adapter_start", "1", "--method.adapter_end", "2",
                        *optim(lr=0.01)]),
}


def run_case(name: str, out_dir: Path) -> dict:
    """Run one case in-process; returns {"rows": [...], "clients": {...}, "global": {...}}."""
    import json

    from fedprompt.__main__ import main

    command, flags = CASES[name]
    args = [command, *COMMON, *flags, "--out_dir", str(out_dir)]
    if command == "zeroshot":
        args = [a for a in args if a not in ("--federation.rounds", "3")]
    try:
        main(args)
    except SystemExit as exit_:
        raise RuntimeError(f"digest case {name} failed (exit {exit_.code}): fedprompt {' '.join(args)}") from None
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]
    ckpt = out_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return {"rows": rows, "clients": {}, "global": {}}
    state = torch.load(ckpt, weights_only=True)
    return {"rows": rows, "clients": state["clients"], "global": state["global"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, required=True, help="where to save the digest (.pt)")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--add", action="store_true",
                        help="record only --cases into the existing digest at --write (the other cases are kept)")
    args = parser.parse_args(argv)
    import tempfile

    torch.set_num_threads(1)
    digest = torch.load(args.write, weights_only=True) if args.add else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            print(f"digest: {name}", flush=True)
            digest[name] = run_case(name, Path(tmp) / name)
    args.write.parent.mkdir(parents=True, exist_ok=True)
    torch.save(digest, args.write)
    print(f"-> {args.write} ({args.write.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
