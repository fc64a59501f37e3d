"""FedMGP local step with G prompt groups: one encoder call for all groups vs one call per group (CPU timings).

The official FedMGP code runs the image tower once per visual group and the text tower once per text group (five
image passes and five text passes per step at G = 5). fedprompt runs each tower once: the images are patch-embedded
once and repeated per group with that group's tokens (``Backbone.encode_image_prompted``), and the G x C prompts go
through the text tower together (``Backbone.encode_prompts`` with a leading group dimension). This script times
both ways on the same frozen random-init backbone (no download), checks that they give the same features, and prints
the ratio:

- image side: forward + backward to the visual tokens [G, V, width];
- text side: forward + backward to the text groups [G, n_ctx, D] (sentences ``[SOS] p1 p2 of a {class}.``);
- the whole step: both towers, group logits, mean group cross-entropy + diversity loss, backward, SGD step.

    python benchmarks/bench_fedmgp.py                      # ViT-B-32, batch 8, 7 classes, G = 5, 2 + 2 tokens
    python benchmarks/bench_fedmgp.py --model fedprompt-tiny --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fedprompt.backbone import Backbone, load_open_clip, register_bundled_configs  # noqa: E402
from fedprompt.bench import timed  # noqa: E402
from fedprompt.methods.fedmgp import diversity_loss, group_cross_entropy, group_logits, init_text_groups  # noqa: E402
from fedprompt.prompts import init_visual_tokens  # noqa: E402

CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


def image_features(backbone: Backbone, images: torch.Tensor, tokens: torch.Tensor, per_group: bool) -> torch.Tensor:
    """[G, B, E] image features: one tower call, or one call per group (the official code's way)."""
    if per_group:
        return torch.stack([backbone.encode_image_prompted(images, tokens[g:g + 1])[0] for g in range(len(tokens))])
    return backbone.encode_image_prompted(images, tokens)


def text_features(backbone: Backbone, prompt_tokens, ctx: torch.Tensor, per_group: bool) -> torch.Tensor:
    """[G, C, E] text features: one tower call over G x C sentences, or one call per group."""
    if per_group:
        return torch.stack([backbone.encode_prompts(prompt_tokens, ctx[g]) for g in range(len(ctx))])
    return backbone.encode_prompts(prompt_tokens, ctx)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip ViT architecture (random init, no download)")
    parser.add_argument("--batch", type=int, default=8, help="images per local step (FedMGP's config: 8)")
    parser.add_argument("--classes", type=int, default=7, help="number of classes")
    parser.add_argument("--groups", type=int, default=5, help="prompt groups G (text and visual)")
    parser.add_argument("--n_ctx", type=int, default=2, help="text context tokens per group")
    parser.add_argument("--visual_tokens", type=int, default=2, help="visual prompt tokens per group")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and the prompts")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_bundled_configs()
    classes = CLASSES[: args.classes] if args.classes <= len(CLASSES) else [f"class {i}" for i in range(args.classes)]
    torch.manual_seed(args.seed)
    backbone = Backbone(load_open_clip(args.model, None))
    g = torch.Generator().manual_seed(args.seed)
    size = backbone.image_size
    images = torch.randn(args.batch, 3, size, size, generator=g)
    labels = torch.randint(0, len(classes), (args.batch,), generator=g)
    prompt_tokens = backbone.prompt_tokens(classes, args.n_ctx, template="{ctx} of a {name}.")
    words = backbone.word_embeddings("a photo of a")[: args.n_ctx]
    ctx0 = init_text_groups(words, args.groups, generator=g)
    tokens0 = init_visual_tokens(args.groups, args.visual_tokens, backbone.visual_width, generator=g)
    scale = backbone.logit_scale

    def image_step(per_group):
        tokens = tokens0.clone().requires_grad_()

        def step():
            tokens.grad = None
            feats = image_features(backbone, images, tokens, per_group)
            feats.square().sum().backward()
            return feats.detach(), tokens.grad.clone()

        return step

    def text_step(per_group):
        ctx = ctx0.clone().requires_grad_()

        def step():
            ctx.grad = None
            feats = text_features(backbone, prompt_tokens, ctx, per_group)
            feats.square().sum().backward()
            return feats.detach(), ctx.grad.clone()

        return step

    def client_step(per_group):
        ctx, tokens = ctx0.clone().requires_grad_(), tokens0.clone().requires_grad_()
        optimizer = torch.optim.SGD([ctx, tokens], lr=1e-3, momentum=0.9, weight_decay=5e-4)

        def step():
            with torch.no_grad():  # every repetition is the same step from the same prompts
                ctx.copy_(ctx0)
                tokens.copy_(tokens0)
            optimizer.zero_grad(set_to_none=True)
            text = F.normalize(text_features(backbone, prompt_tokens, ctx, per_group).float(), dim=-1)
            image = F.normalize(image_features(backbone, images, tokens, per_group).float(), dim=-1)
            logits = group_logits(image, text, scale)
            loss = group_cross_entropy(logits, labels) + diversity_loss(text, image)
            loss.backward()
            optimizer.step()
            return logits.detach(), tokens.detach().clone()

        return step

    rows = []
    for name, make in (("image tower fwd+bwd", image_step), ("text tower fwd+bwd", text_step),
                       ("client update step", client_step)):
        (one_s, one_out), (many_s, many_out) = timed([make(False), make(True)], args.repeats)
        diff = max(float((a - b).abs().max()) for a, b in zip(one_out, many_out))
        scale_ref = max(float(b.abs().max()) for b in many_out)
        assert diff <= 1e-4 * max(scale_ref, 1.0), f"{name}: the two ways differ by {diff:.3e}"
        rows.append((name, one_s, many_s, diff))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"FedMGP local step on CPU ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{load:.1f} at the end): {args.model} random init, batch {args.batch}, {len(classes)} classes, "
          f"G = {args.groups} groups, {args.n_ctx} text + {args.visual_tokens} visual tokens per group, "
          f"{prompt_tokens.embeddings.shape[1]} text positions; median of {args.repeats} after one warm-up")
    print(f"{'':<22}{'one call':>12}{f'{args.groups} calls':>12}{'ratio':>9}{'max |diff|':>14}")
    for name, one_s, many_s, diff in rows:
        print(f"{name:<22}{one_s * 1e3:>9.1f} ms{many_s * 1e3:>9.1f} ms{many_s / one_s:>8.2f}x{diff:>14.2e}")
    print("features, gradients and updated prompts agree between the two ways (within 1e-4 relative): yes")


if __name__ == "__main__":
    main()
