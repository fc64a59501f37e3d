"""FedLoRA speed and memory through ``fedprompt bench``: K = 4 vs K = 1 clients per lock-step step, and peak memory
with 100 clients vs 10 (figures printed, never asserted).

Each measurement is one ``fedprompt bench ... --json true`` in its own process (so that each peak memory is its own
process's: on CPU the peak resident set, on CUDA the peak allocated memory):

- ``speed``: FedLoRA (CLIP-LoRA defaults: both towers, q k v of every block, rank 2, dropout 0.25, AdamW) on the
  smoke config (tiny random model) and on a random ViT-B/32 (224 px generated images, 4 IID clients of 8 train and
  4 test images, one local step of batch 8): aten operations per client-step and per step (the profiler on one warm local round) and
  seconds per round, at ``parallel_clients`` 1 and 4 (the smoke config's 4 clients have 15 / 19 / 14 / 16 images
  and batch 16: a round is 5 client-steps, in 5 steps at K = 1 and in 2 at K = 4);
- ``memory``: the same ViT-B/32 FedLoRA federation with 10 and with 100 clients, the same work per round (4
  clients train one step of 2 images; 100 test images in all), peak memory of each;
- ``bytes``: the LoRA state of one client at ViT-B/16 (both towers, q k v, rank 2) in values and fp32 bytes: what
  ``bytes_up`` and ``bytes_down`` count per client and round (a random ViT-B/16 is built, no download).

    python benchmarks/bench_adapters.py                    # everything (about 10 minutes on 2 busy CPU cores)
    python benchmarks/bench_adapters.py --only speed --models smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
LORA = ["--method", "FedLoRA", "--method.lr", "0.0002", "--log.progress", "false"]
#: a random ViT-B/32 on generated 224 px images: 4 classes, 4 clients
VIT = ["--backbone.model", "ViT-B-32", "--backbone.pretrained", "null", "--data.init_args.image_size", "224",
       "--data.init_args.num_classes", "4", "--data.init_args.train_per_class", "8",
       "--data.init_args.test_per_class", "4", "--data.init_args.partition", "fedprompt.data.IID",
       "--data.init_args.partition.init_args.num_clients", "4", "--train.batch_size", "8",
       "--train.local_steps", "1", "--eval.batch_size", "32"]


def bench(flags: list[str], rounds: int = 2, profile: bool = True, threads: int | None = None) -> list[dict]:
    """One ``fedprompt bench`` in a fresh process; its per-round rows."""
    args = [sys.executable, "-m", "fedprompt", "bench", "--config", SMOKE, *LORA, *flags, "--rounds", str(rounds),
            "--json", "true", "--profile", str(profile).lower()]
    if threads:
        args += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"fedprompt bench failed ({' '.join(args)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout[out.stdout.index("["):])


def speed(models: list[str], threads: int | None) -> None:
    print("FedLoRA, K = clients per lock-step step (fedprompt bench, last of 2 rounds; profile of one more local "
          "round)")
    print(f"{'model':10s} {'K':>2s} {'s/round':>8s} {'train s':>8s} {'ops/client-step':>16s} {'ops/step':>9s} "
          f"{'syncs/step':>10s} {'peak GB':>8s} {'train loss':>10s}")
    for model in models:
        flags = [] if model == "smoke" else VIT
        for k in (1, 4):
            row = bench([*flags, "--federation.parallel_clients", str(k)], threads=threads)[-1]
            train = sum(row[s] for s in ("data", "image", "text", "logits", "backward", "optimizer"))
            print(f"{model:10s} {k:2d} {row['seconds']:8.2f} {train:8.2f} {row['aten_ops_per_client_step']:16.0f} "
                  f"{row['aten_ops_per_step']:9.0f} {row['host_syncs_per_step']:10.1f} {row['peak_memory_gb']:8.2f} "
                  f"{row['train_loss']:10.4f}", flush=True)


def memory(threads: int | None) -> None:
    print("FedLoRA, ViT-B/32, peak memory with 10 vs 100 clients (4 clients train one step of 2 images per round; "
          "100 test images)")
    results = {}
    for clients, fraction in ((10, "0.4"), (100, "0.04")):
        flags = [*VIT, "--data.init_args.train_per_class", "50", "--data.init_args.test_per_class", "25",
                 "--data.init_args.partition.init_args.num_clients", str(clients),
                 "--federation.fraction", fraction, "--train.batch_size", "2", "--federation.parallel_clients", "4"]
        rows = bench(flags, rounds=2, profile=False, threads=threads)
        results[clients] = max(r["peak_memory_gb"] for r in rows)
        print(f"{clients:4d} clients: peak {results[clients]:.3f} GB, {rows[-1]['seconds']:.1f} s per round",
              flush=True)
    print(f"100 / 10 clients: {results[100] / results[10]:.3f}")


def lora_bytes() -> None:
    import torch

    from fedprompt.backbone import Backbone, load_open_clip
    from fedprompt.methods import FedLoRA

    torch.manual_seed(0)
    backbone = Backbone(load_open_clip("ViT-B-16", None))
    state = FedLoRA().build_client(backbone, ["a", "b"]).slot_state(0)
    values = sum(v.numel() for v in state.values())
    text = sum(v.numel() for k, v in state.items() if ".text_" in k)
    print(f"FedLoRA at ViT-B/16 (both towers, q k v, 12 blocks each, rank 2): {len(state)} tensors, {values:,} values "
          f"({text:,} text + {values - text:,} image) = {values * 4:,} bytes in fp32 per client and direction")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["speed", "memory", "bytes"], nargs="+",
                        default=["bytes", "speed", "memory"])
    parser.add_argument("--models", nargs="+", default=["smoke", "ViT-B/32"], choices=["smoke", "ViT-B/32"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of each run")
    args = parser.parse_args(argv)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}")
    if "bytes" in args.only:
        lora_bytes()
    if "speed" in args.only:
        speed(args.models, args.threads)
    if "memory" in args.only:
        memory(args.threads)


if __name__ == "__main__":
    main()
