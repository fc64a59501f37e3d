"""CoCoOp's lock-step training step: time per client-step with K clients in one step (K = 1, 2, 4).

Each client-step is B images x C classes of per-image prompts through the text encoder; with K clients in lock-step
the K x B x C sentences of a step go through it in one call (``fedprompt.methods.cocoop``). The script times the
training step (forward and backward to the context and the meta-net) on cached image features, random-init weights
(no download), and checks that the K-client step gives each client the losses and gradients it gets alone.

    python benchmarks/bench_cocoop.py                          # fedprompt-tiny and ViT-B-32, B 16, C 4, 1 thread
    python benchmarks/bench_cocoop.py --model ViT-B-32 --batch 8 --classes 10 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fedprompt.backbone import load_backbone  # noqa: E402
from fedprompt.bench import timed  # noqa: E402
from fedprompt.methods import CoCoOp  # noqa: E402


def step_batch(backbone, clients: int, batch: int, classes: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = clients * batch
    return {"features": torch.randn(n, backbone.embed_dim, generator=g), "label": torch.arange(n) % classes,
            "owner": torch.arange(clients).repeat_interleave(batch), "slots": torch.arange(clients),
            "counts": torch.full((clients,), batch)}


def run_step(client, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    client.zero_grad(set_to_none=True)
    losses = client.training_step(batch)
    losses.sum().backward()
    return losses.detach(), [p.grad for p in client.parameters()]


def bench(model: str, batch: int, classes: int, ks: list[int], repeats: int) -> None:
    torch.manual_seed(0)
    backbone = load_backbone(model, None)
    names = [f"class {i}" for i in range(classes)]
    torch.manual_seed(1)
    client = CoCoOp().build_client(backbone, names, slots=max(ks))
    client.train()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every slot its own values
        for p in client.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    data = {k: step_batch(backbone, k, batch, classes) for k in ks}
    # the K settings timed in turn (median of each after a warm-up), so a change of machine load hits all alike
    results = timed([lambda d=data[k]: run_step(client, d) for k in ks], repeats)
    alone_losses, alone_grads = run_step(client, data[1])
    alone_loss, alone_grads = alone_losses[0].clone(), [g[0].clone() for g in alone_grads]
    for k, (seconds, _) in zip(ks, results):
        losses, grads = run_step(client, data[k])
        # client 0 of the K-client step against client 0 alone (the same images)
        torch.testing.assert_close(losses[0], alone_loss, rtol=1e-4, atol=1e-5)
        for gr, ref in zip(grads, alone_grads):
            torch.testing.assert_close(gr[0], ref, rtol=1e-3, atol=1e-6)
        print(f"{model:14s} K = {k}: {k * batch * classes:5d} sentences per step, {1000 * seconds:8.1f} ms per step, "
              f"{1000 * seconds / k:8.1f} ms per client-step")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["fedprompt-tiny", "ViT-B-32"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for model in args.model:
        bench(model, args.batch, args.classes, sorted(set(args.clients) | {1}), args.repeats)
    print(f"(load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
