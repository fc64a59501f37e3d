"""Parity of fedprompt's MaPLe, IVLP and VPT clients with the official model code
(muzairkhattak/multimodal-prompt-learning, ``trainers/maple.py``, ``trainers/independentVL.py``, ``trainers/vpt.py``,
``clip/model.py``) on the same random CLIP weights and images: logits, loss, one SGD step (the updated prompts and
the logits after it).

    PYTHONPATH=$PWD python benchmarks/parity_official_mpl.py [--official PATH] [--tolerance 1e-5]

The official code is read at run time from a checkout (``--official PATH`` or ``$FEDPROMPT_OFFICIAL_MPL``) or from a
local git mirror of the repository (``$FEDPROMPT_OFFICIAL_MPL_GIT``, default
``/work/.mirror/muzairkhattak+multimodal-prompt-learning/repo``: its ``clip/`` and ``trainers/`` are extracted to a
temporary folder); none of it is part of fedprompt. When neither is there the script prints ``SKIP ...`` and exits 0.

What is stubbed: the official trainers import Dassl (``dassl.engine``, ``dassl.metrics``, ``dassl.utils``,
``dassl.optim``), which no package registry has; only its names are stubbed, since the model classes
(``CustomCLIP``, the prompt learners, the modified CLIP) do not use it. ``ftfy`` is stubbed too when it is not
installed (the class names here are plain ASCII). The weights are an open_clip model with ViT-B/16's widths (text
512, vision 768: MaPLe's code hard-codes them), three layers per tower, 32 px images in 16 px patches, QuickGELU,
random init; their ``clip.build_model`` gets its state dict (the key names are OpenAI's in both), then ``.float()`` and
the fp32 state dict again (``build_model`` rounds the weights to fp16 while loading them).

Two comparisons per method (official code in fp32, SGD lr 0.0035, momentum 0.9, weight decay 5e-4 as Dassl's):

- ``compat: official`` against the official code as released (its ``.half()`` casts round every inserted prompt
  to fp16, after the copy per image or per class, so each copy's gradient is rounded to fp16 before the sum, as
  fedprompt does under ``compat: official``); MaPLe's ``proj`` is cast back to fp32 (the released
  ``self.proj.half()`` cannot take an fp32 input). A gradient entry next to an fp16 rounding boundary may round to
  the neighbouring value on one side (about lr x one fp16 step of the gradient, 1e-7 here);
- ``compat: fixed`` (fedprompt's default) against the official code with ``Tensor.half`` made the identity while it
  runs (no rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace

import torch

MIRROR = Path(os.environ.get("FEDPROMPT_OFFICIAL_MPL_GIT",
                             "/work/.mirror/muzairkhattak+multimodal-prompt-learning/repo"))
ARCH = {"embed_dim": 512, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 768, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 3}}
CLASSES = ["dog", "cat", "sports car", "golden retriever", "oak tree"]
LR, MOMENTUM, WEIGHT_DECAY = 0.0035, 0.9, 5e-4


def official_source(path: str | None, workdir: Path) -> Path | None:
    """A folder with the official ``clip/`` and ``trainers/``, or ``None`` when the code is not available."""
    path = path or os.environ.get("FEDPROMPT_OFFICIAL_MPL")
    if path:
        return Path(path) if (Path(path) / "trainers" / "maple.py").is_file() else None
    if not (MIRROR / "HEAD").exists():
        return None
    out = workdir / "official"
    out.mkdir()
    archive = subprocess.run(["git", "--git-dir", str(MIRROR), "archive", "HEAD", "clip", "trainers"],
                             capture_output=True, check=False)
    if archive.returncode:
        return None
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def stub_dassl() -> None:
    """The Dassl names the official trainers import (their model classes do not use them)."""
    registry = SimpleNamespace(register=lambda *a, **k: (lambda cls: cls))
    modules = {
        "dassl": {}, "dassl.engine": {"TRAINER_REGISTRY": registry, "TrainerX": object},
        "dassl.metrics": {"compute_accuracy": None},
        "dassl.utils": {"load_pretrained_weights": None, "load_checkpoint": None},
        "dassl.optim": {"build_optimizer": None, "build_lr_scheduler": None},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules.setdefault(name, module)
    try:
        import ftfy  # noqa: F401
    except ImportError:
        sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda text: text)


@contextlib.contextmanager
def no_half():
    """``Tensor.half`` as the identity (the official code without its fp16 rounding of inserted prompts)."""
    original = torch.Tensor.half
    torch.Tensor.half = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.half = original


def fedprompt_backbone(workdir: Path):
    from fedprompt.backbone import load_backbone
    from fedprompt.backbone.loading import register_model_config

    config = workdir / "fedprompt-parity-b16.json"
    config.write_text(json.dumps(ARCH))
    register_model_config(config)
    torch.manual_seed(0)
    return load_backbone("fedprompt-parity-b16", None)


def official_clip(backbone, design: dict):
    from clip import clip  # the official package, from the extracted folder

    state = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    model = clip.build_model(dict(state), design).float()
    # build_model stores the weights in fp16 (convert_weights) before loading them: load the fp32 values again
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("VPT" not in key for key in missing):
        raise RuntimeError(f"official CLIP: unexpected keys {unexpected}, missing {missing}")
    return model


def cfg_for(trainer: str, **values):
    section = SimpleNamespace(**values)
    return SimpleNamespace(TRAINER=SimpleNamespace(**{trainer: section}), INPUT=SimpleNamespace(SIZE=(32, 32)))


# ---------------------------------------------------------------------------------------- weights in and out
def maple_pairs(official, client):
    """(official tensor, fedprompt tensor view) pairs of MaPLe's trainable state."""
    learner = official.prompt_learner
    ctx, weight, bias = client.text_prompts.ctx[0], client.coupling.weight[0], client.coupling.bias[0]
    pairs = [(learner.ctx, ctx[0]), (learner.proj.weight, weight[0]), (learner.proj.bias, bias[0])]
    for i, (prompt, layer) in enumerate(zip(learner.compound_prompts_text, learner.compound_prompt_projections)):
        pairs += [(prompt, ctx[i + 1]), (layer.weight, weight[i + 1]), (layer.bias, bias[i + 1])]
    return pairs


def ivlp_pairs(official, client, depth_text: int, depth_vision: int):
    ctx, tokens = client.text_prompts.ctx[0], client.visual_prompts.tokens[0, 0]
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    pairs = [(official.prompt_learner.ctx, ctx[0]), (official.image_encoder.VPT, tokens[0])]
    pairs += [(official.text_encoder.transformer.resblocks[i].VPT_shallow, ctx[i]) for i in range(1, depth_text)]
    pairs += [(official.image_encoder.transformer.resblocks[i].VPT_shallow, tokens[i])
              for i in range(1, depth_vision)]
    return pairs


def vpt_pairs(official, client, depth_vision: int):
    tokens = client.visual_prompts.tokens[0, 0]
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    encoder = official.model.image_encoder
    return [(encoder.VPT, tokens[0])] + [(encoder.transformer.resblocks[i].VPT_shallow, tokens[i])
                                         for i in range(1, depth_vision)]


class TrainingForward(torch.nn.Module):
    """The released VPT model (``trainers/vpt.py``), whose forward returns the loss only with ``training=True`` and
    moves its fixed text features with ``.cuda()`` (here the identity)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, labels=None):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        try:
            return self.model(images, labels, training=labels is not None)
        finally:
            torch.Tensor.cuda = cuda


def trainable(official) -> list[torch.nn.Parameter]:
    """The parameters the official trainers train: under ``prompt_learner`` or named ``VPT`` (``maple.py:233-239``)."""
    params = []
    for name, param in official.named_parameters():
        param.requires_grad_("prompt_learner" in name or "VPT" in name)
        if param.requires_grad:
            params.append(param)
    return params


# ---------------------------------------------------------------------------------------------- comparison
def compare(official, client, pairs, images, labels, rounding: bool) -> dict[str, float]:
    """Max abs differences of logits, loss, prompts after one SGD step and logits after it."""
    with torch.no_grad():
        for theirs, ours in pairs:
            ours.copy_(theirs.float())
    guard = contextlib.nullcontext if rounding else no_half
    batch = {"image": images, "label": labels}
    out = {}
    official.eval(), client.eval()
    with torch.no_grad(), guard():
        out["logits"] = (official(images) - client.predict_logits(batch)).abs().max().item()
    official.train(), client.train()
    params = trainable(official)
    sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    with guard():
        loss_theirs = official(images, labels)
    loss_ours = client.training_step(batch).sum()
    out["loss"] = abs(loss_theirs.item() - loss_ours.item())
    before = [ours.detach().clone() for _, ours in pairs]
    sgd.zero_grad()
    loss_theirs.backward()
    sgd.step()
    optimizer = client.configure_optimizers()
    loss_ours.backward()
    optimizer.set_slots(torch.tensor([True]), torch.tensor([LR], dtype=torch.float64))
    optimizer.step()
    out["prompts after one SGD step"] = max((t.float() - o).abs().max().item() for t, o in pairs)
    out["step size"] = max((o.detach() - b).abs().max().item() for (_, o), b in zip(pairs, before))
    official.eval(), client.eval()
    with torch.no_grad(), guard():
        out["logits after the step"] = (official(images) - client.predict_logits(batch)).abs().max().item()
    return out


def run(official_dir: Path, workdir: Path) -> dict[str, dict[str, float]]:
    sys.path.insert(0, str(official_dir))
    stub_dassl()
    from trainers import independentVL, maple, vpt  # the official trainer modules

    from fedprompt.methods import IVLP, VPT, MaPLe

    backbone = fedprompt_backbone(workdir)
    torch.manual_seed(1)
    images = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    results = {}
    for compat in ("official", "fixed"):
        depth = 3
        design = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0,
                  "maple_length": 2}
        torch.manual_seed(2)
        official = maple.CustomCLIP(cfg_for("MAPLE", N_CTX=2, CTX_INIT="a photo of a", PROMPT_DEPTH=depth),
                                    CLASSES, official_clip(backbone, design)).float()
        client = MaPLe(n_ctx=2, text_depth=depth, compat=compat).build_client(backbone, CLASSES)
        results[f"MaPLe J={depth} compat={compat}"] = compare(official, client, maple_pairs(official, client),
                                                              images, labels, rounding=compat == "official")
        dt, dv = 3, 2
        design = {"trainer": "IVLP", "vision_depth": dv, "language_depth": dt, "vision_ctx": 2, "language_ctx": 2}
        torch.manual_seed(3)
        official = independentVL.CustomCLIP(
            cfg_for("IVLP", N_CTX_TEXT=2, N_CTX_VISION=2, CTX_INIT="a photo of a", PROMPT_DEPTH_TEXT=dt,
                    PROMPT_DEPTH_VISION=dv), CLASSES, official_clip(backbone, design)).float()
        client = IVLP(n_ctx=2, visual_tokens=2, text_depth=dt, visual_depth=dv, compat=compat).build_client(
            backbone, CLASSES)
        results[f"IVLP depth {dt}/{dv} compat={compat}"] = compare(
            official, client, ivlp_pairs(official, client, dt, dv), images, labels, rounding=compat == "official")
        design = {"trainer": "VPT", "vision_depth": dv, "vision_ctx": 2, "language_depth": 0, "language_ctx": 0}
        torch.manual_seed(4)
        official = TrainingForward(vpt.CustomCLIP(cfg_for("VPT", N_CTX_VISION=2, PROMPT_DEPTH_VISION=dv), CLASSES,
                                                  official_clip(backbone, design)).float())
        client = VPT(visual_tokens=2, visual_depth=dv, compat=compat).build_client(backbone, CLASSES)
        results[f"VPT depth {dv} compat={compat}"] = compare(official, client, vpt_pairs(official, client, dv), images,
                                                             labels, rounding=compat == "official")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", help="a checkout of muzairkhattak/multimodal-prompt-learning")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        source = official_source(args.official, Path(tmp))
        if source is None:
            print("SKIP: the official MaPLe/IVLP code is not available offline (pass --official PATH, set "
                  "FEDPROMPT_OFFICIAL_MPL, or mirror the repository at $FEDPROMPT_OFFICIAL_MPL_GIT)")
            return 0
        results = run(source, Path(tmp))
    worst = 0.0
    for case, diffs in results.items():
        print(case)
        for name, value in diffs.items():
            if name == "step size":
                print(f"    (largest prompt change of the step: {value:.3e})")
            else:
                print(f"    {name:28s} max |diff| = {value:.3e}")
                worst = max(worst, value)
    print(f"worst {worst:.3e} (tolerance {args.tolerance:g}): {'PASS' if worst <= args.tolerance else 'FAIL'}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
