"""Parity of fedprompt's CoCoOp, KgCoOp, ProGrad and PLOT clients with the official model code.

The official repositories (KaiyangZhou/CoOp for CoCoOp, htyao89/KgCoOp, BeierZhu/Prompt-align for ProGrad,
CHENGY12/PLOT for PLOT-CoOp) are read at run time from local git mirrors (``--mirror``, default
``$FEDPROMPT_MIRROR`` or ``/work/.mirror``, holding ``<owner>+<name>/repo``: bare clones, e.g. made by
``git clone --mirror``); nothing of them is copied into fedprompt. Each repository's subtree is extracted into a
temporary folder and its own ``clip`` package and trainer module are imported from there. Dassl is not needed: the
trainers import it only for the training loop, so tiny stand-ins of ``dassl.engine`` / ``metrics`` / ``utils`` /
``optim`` satisfy the imports (the model classes never call them); the official code's downloads and ``.cuda()``
calls are redirected to the in-memory model. ProGrad's update rule is the function
``prograd_backward_and_update`` of its modified Dassl (``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``), taken
from the file and run as it is.

For each method: one random-init OpenAI CLIP (the repository's own ``clip.model.CLIP``: a tiny ViT, or a tiny
ModifiedResNet for PLOT, whose attention pool returns all tokens, its attention sharpened so that the local features
differ, see ``SHARPEN``) is built, converted to open_clip (same weights) and wrapped as fedprompt's frozen backbone; the official prompt learner's tensors (perturbed at random so that
nothing sits at its initial value) are copied into fedprompt's client; then the same random images go through both:

- evaluation logits; the training loss; one SGD step (momentum 0.9, weight decay 5e-4; ProGrad with its
  projection) -- the gradients and the updated prompt tensors.

The script prints the largest absolute difference of each and fails (exit status 1) above ``--tol`` (1e-5). When a
mirror is missing the method is skipped with a line saying so (exit status 0 if nothing ran).

    python benchmarks/parity_text_baselines.py
    python benchmarks/parity_text_baselines.py --mirror /path/to/mirrors --methods CoCoOp PLOT
    python benchmarks/parity_text_baselines.py --methods PLOT --plot-eps 0.11   # must FAIL: eps is seen
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fedprompt.backbone import Backbone  # noqa: E402
from fedprompt.backbone.loading import LoadedModel  # noqa: E402
from fedprompt.methods import PLOT, CoCoOp, KgCoOp, ProGrad  # noqa: E402
from fedprompt.methods.fedotp import ot_logits  # noqa: E402

CLASSES = ["dog", "golden retriever", "giraffe", "guitar", "house"]

#: method -> (mirror folder, subtree, trainer file inside the subtree)
REPOS = {
    "CoCoOp": ("KaiyangZhou+CoOp", "", "trainers/cocoop.py"),
    "KgCoOp": ("htyao89+KgCoOp", "KgCoOp", "trainers/kgcoop.py"),
    "ProGrad": ("BeierZhu+Prompt-align", "ProGrad.public", "trainers/prograd.py"),
    "PLOT": ("CHENGY12+PLOT", "plot-coop", "trainers/plot.py"),
}
PROGRAD_DASSL = "Dassl.ProGrad.pytorch/dassl/engine/trainer.py"


def ns(**kwargs) -> types.SimpleNamespace:
    """A Dassl-style config node (attribute access)."""
    return types.SimpleNamespace(**kwargs)


# -------------------------------------------------------------------------------------------- the official code
def extract(mirror: Path, repo: str, subtree: str, into: Path) -> Path:
    """The subtree of the mirror's HEAD, extracted into ``into``; returns its folder."""
    git_dir = mirror / repo / "repo"
    args = ["git", f"--git-dir={git_dir}", "archive", "HEAD"] + ([subtree] if subtree else [])
    data = subprocess.run(args, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / subtree if subtree else into


def install_dassl_stubs() -> None:
    """Stand-ins for the Dassl modules the trainer files import (their model classes use none of them)."""
    class Registry:
        def register(self, *args):
            return lambda obj: obj

    def unused(*args, **kwargs):
        raise RuntimeError("the parity check never calls Dassl's training loop")

    modules = {
        "dassl": {},
        "dassl.engine": {"TRAINER_REGISTRY": Registry(), "TrainerX": type("TrainerX", (), {})},
        "dassl.metrics": {"compute_accuracy": unused},
        "dassl.utils": {"load_pretrained_weights": unused, "load_checkpoint": unused, "count_num_param": unused},
        "dassl.optim": {"build_optimizer": unused, "build_lr_scheduler": unused},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def import_official(root: Path, trainer: str, stubs=install_dassl_stubs, dassl: str = "dassl"):
    """The repository's ``clip`` package and trainer module, imported from ``root`` (fresh each time), after
    ``stubs()`` installed the stand-ins for its Dassl package (imported as ``dassl``)."""
    for name in [m for m in sys.modules if m == "clip" or m.startswith(("clip.", dassl, "official_trainer"))]:
        del sys.modules[name]
    stubs()
    sys.path.insert(0, str(root))
    try:
        clip = importlib.import_module("clip")
        importlib.import_module("clip.model")
        spec = importlib.util.spec_from_file_location("official_trainer", root / trainer)
        module = importlib.util.module_from_spec(spec)
        sys.modules["official_trainer"] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
    return clip, module


def official_function(path: Path, name: str):
    """A function defined in a class of the file at ``path``, taken from its source and defined on its own."""
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            namespace = {"torch": torch}
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
            return namespace[name]
    raise LookupError(f"{name} not found in {path}")


@contextlib.contextmanager
def cpu_only():
    """The official constructors call ``.cuda()``; keep everything on the CPU while they run."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


# ----------------------------------------------------------------------------------------------- the models
def tiny_clip(clip, resnet: bool, seed: int = 0):
    """A random-init OpenAI CLIP from the repository's ``clip.model.CLIP``: embed 32, text 2 layers x 64 wide,
    vision a 2-layer ViT (patch 8, 32 px) or a ModifiedResNet (1 block per stage, width 8, 64 px)."""
    torch.manual_seed(seed)
    if resnet:
        model = clip.model.CLIP(32, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 2)
    else:
        model = clip.model.CLIP(32, 32, 2, 64, 8, 77, 49408, 64, 1, 2)
    with torch.no_grad():  # a logit scale that makes the softmax sharp enough to matter (exp(3) = 20)
        model.logit_scale.fill_(3.0)
    return model.float().eval()


def fedprompt_backbone(official) -> Backbone:
    """The same weights as an open_clip model in fedprompt's frozen backbone."""
    import open_clip
    from open_clip.model import build_model_from_openai_state_dict

    state = {k: v.clone() for k, v in official.state_dict().items()}
    model = build_model_from_openai_state_dict(dict(state), cast_dtype=None).float()
    model.load_state_dict(state)  # again in fp32 (the builder rounds the weights through fp16)
    return Backbone(LoadedModel(model.eval(), open_clip.get_tokenizer("ViT-B-32"), {}, "parity"))


def perturb_(params, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def images(backbone: Backbone, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % len(CLASSES)


def sgd(params, lr=0.002):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def fedprompt_step(client, image, label, lr=0.002) -> torch.Tensor:
    """fedprompt's training loss, backward (the client's own) and one StackedSGD step; returns the loss."""
    client.train()
    optimizer = client.configure_optimizers()
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = client.training_step({"image": image, "label": label})
    client.backward(losses, lambda t, **kw: t.backward(**kw))
    optimizer.step()
    total = sum(losses.values()) if isinstance(losses, dict) else losses
    return total[0].detach()


def report(name: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], tol: float, note: str = "") -> bool:
    worst = {k: float((a.detach().double() - b.detach().double()).abs().max()) for k, (a, b) in pairs.items()}
    ok = all(v <= tol for v in worst.values())
    figures = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    print(f"{name:8s} {'ok  ' if ok else 'FAIL'} max |official - fedprompt|: {figures}{note}")
    return ok


# ---------------------------------------------------------------------------------------------- the methods
def parity_cocoop(root: Path, tol: float, seed: int) -> bool:
    clip, module = import_official(root, REPOS["CoCoOp"][2])
    clip_model = tiny_clip(clip, resnet=False)
    backbone = fedprompt_backbone(clip_model)
    cfg = ns(TRAINER=ns(COCOOP=ns(N_CTX=4, CTX_INIT="a photo of a", PREC="fp32")), INPUT=ns(SIZE=(32, 32)), MODEL=ns(BACKBONE=ns(NAME="tiny")))
    torch.manual_seed(seed)
    official = module.CustomCLIP(cfg, CLASSES, clip_model)
    learner = official.prompt_learner
    perturb_(learner.parameters(), seed)
    client = CoCoOp(n_ctx=4, ctx_init=None).build_client(backbone, CLASSES)
    with torch.no_grad():
        client.prompt.ctx[0].copy_(learner.ctx)
        for name in ("linear1", "linear2"):
            getattr(client.meta_net, name).weight[0].copy_(getattr(learner.meta_net, name).weight)
            getattr(client.meta_net, name).bias[0].copy_(getattr(learner.meta_net, name).bias)
    image, label = images(backbone, 4, seed)

    official.eval()
    with torch.no_grad():
        logits_o = official(image)
    client.eval()
    logits_f = client.predict_logits({"image": image})

    official.eval()
    learner.train()  # Dassl puts the registered prompt learner in train mode; the CLIP towers stay in eval mode
    loss_o = official(image, label)
    optimizer = sgd(learner.parameters())
    optimizer.zero_grad()
    loss_o.backward()
    optimizer.step()
    loss_f = fedprompt_step(client, image, label)
    pairs = {"logits": (logits_o, logits_f), "loss": (loss_o, loss_f),
             "grad ctx": (learner.ctx.grad, client.prompt.ctx.grad[0]),
             "grad meta_net": (learner.meta_net.linear1.weight.grad, client.meta_net.linear1.weight.grad[0]),
             "ctx after step": (learner.ctx, client.prompt.ctx[0]),
             "meta_net after step": (torch.cat([learner.meta_net.linear1.weight.flatten(),
                                                learner.meta_net.linear2.weight.flatten()]),
                                     torch.cat([client.meta_net.linear1.weight[0].flatten(),
                                                client.meta_net.linear2.weight[0].flatten()]))}
    return report("CoCoOp", pairs, tol)


def parity_kgcoop(root: Path, tol: float, seed: int) -> bool:
    clip, module = import_official(root, REPOS["KgCoOp"][2])
    clip_model = tiny_clip(clip, resnet=False)
    backbone = fedprompt_backbone(clip_model)
    cfg = ns(TRAINER=ns(COOP=ns(N_CTX=4, CTX_INIT=True, CSC=False, PREC="fp32", CLASS_TOKEN_POSITION="end", W=8.0),
                        COCOOP=ns(PREC="fp32")),
             INPUT=ns(SIZE=(32, 32)), DATASET=ns(NAME="OxfordPets"), MODEL=ns(BACKBONE=ns(NAME="tiny")))
    module.load_clip_to_cpu = lambda cfg: copy.deepcopy(clip_model)  # the second CLIP of the hand-crafted features
    torch.manual_seed(seed)
    with cpu_only():
        official = module.CustomCLIP(cfg, CLASSES, clip_model)
    learner = official.prompt_learner
    perturb_([learner.ctx], seed)
    client = KgCoOp(n_ctx=4, ctx_init="a photo of a", hand_prompt=module.CUSTOM_TEMPLATES["OxfordPets"],
                    weight=8.0).build_client(backbone, CLASSES)
    with torch.no_grad():
        client.prompt.ctx[0].copy_(learner.ctx)
    image, label = images(backbone, 4, seed)

    official.eval()
    with torch.no_grad():
        logits_o, _ = official(image)
    client.eval()
    logits_f = client.predict_logits({"image": image})

    output, score = official(image)
    loss_o = F.cross_entropy(output, label) + cfg.TRAINER.COOP.W * score
    optimizer = sgd([learner.ctx])
    optimizer.zero_grad()
    loss_o.backward()
    optimizer.step()
    loss_f = fedprompt_step(client, image, label)
    pairs = {"logits": (logits_o, logits_f), "loss": (loss_o, loss_f),
             "grad ctx": (learner.ctx.grad, client.prompt.ctx.grad[0]),
             "ctx after step": (learner.ctx, client.prompt.ctx[0])}
    return report("KgCoOp", pairs, tol)


def parity_prograd(root: Path, tol: float, seed: int) -> bool:
    clip, module = import_official(root, REPOS["ProGrad"][2])
    update = official_function(root.parent / PROGRAD_DASSL, "prograd_backward_and_update")
    clip_model = tiny_clip(clip, resnet=False)
    backbone = fedprompt_backbone(clip_model)
    cfg = ns(TRAINER=ns(COOP=ns(N_CTX=16, CTX_INIT=True, CSC=False, PREC="fp32", CLASS_TOKEN_POSITION="end")),
             INPUT=ns(SIZE=(32, 32)), DATASET=ns(NAME="Caltech101"), LOSS=ns(T=1.0, LAMBDA=1.0),
             MODEL=ns(BACKBONE=ns(NAME="tiny")))
    module.load_clip_to_cpu = lambda cfg: copy.deepcopy(clip_model)  # the zero-shot teacher's CLIP
    torch.manual_seed(seed)
    with cpu_only():
        official = module.CustomCLIP(cfg, CLASSES, clip_model)
        teacher = module.CLIP(cfg, CLASSES)
    learner = official.prompt_learner
    perturb_([learner.ctx], seed, scale=0.2)
    template = module.CUSTOM_TEMPLATES["Caltech101"]
    client = ProGrad(n_ctx=16, ctx_init=template.replace(" {}.", ""), teacher_prompt=template,
                     weight=1.0).build_client(backbone, CLASSES)
    with torch.no_grad():
        client.prompt.ctx[0].copy_(learner.ctx)
    image, label = images(backbone, 4, seed)

    official.eval()
    with torch.no_grad():
        logits_o = official(image)
    client.eval()
    logits_f = client.predict_logits({"image": image})

    output = official(image)
    with torch.no_grad():
        zs_output = teacher(image)
    xe_loss, kl_loss = module.ProGradLoss(T=cfg.LOSS.T)(output, zs_output.detach(), label)
    g_ce = torch.autograd.grad(xe_loss, learner.ctx, retain_graph=True)[0]
    g_kd = torch.autograd.grad(kl_loss, learner.ctx, retain_graph=True)[0]
    optimizer = sgd([learner.ctx])
    trainer = ns(_models={"prompt_learner": learner}, _optims={"prompt_learner": optimizer},
                 get_model_names=lambda names=None: ["prompt_learner"], detect_anomaly=lambda loss: None,
                 model_zero_grad=lambda names=None: optimizer.zero_grad())
    update(trainer, xe_loss, kl_loss, cfg.LOSS.LAMBDA)  # the official update: both backward passes, the projection
    loss_f = fedprompt_step(client, image, label)
    conflict = bool((g_ce * g_kd).sum() < 0)
    pairs = {"logits": (logits_o, logits_f), "loss CE+KD": (xe_loss + kl_loss, loss_f),
             "grad ctx": (learner.ctx.grad, client.prompt.ctx.grad[0]),
             "ctx after step": (learner.ctx, client.prompt.ctx[0])}
    return report("ProGrad", pairs, tol, f" (gradients {'conflict: projected' if conflict else 'agree: CE only'})")


#: the tiny ResNet's attention pool with its query and key maps scaled up, so that each of its 4 local features
#: attends to different positions: with the random weights as built they are nearly identical (pairwise cosines above
#: 0.99999), the plan is uniform and the check cannot see the transport. Scaled by 20, the logits with the optimal
#: plan differ from those with a uniform plan by 0.16 (seed 0) and 0.33 (seed 1), and fedprompt's PLOT at eps 0.11
#: or 0.09 instead of the official 0.1 fails the check by about 1e-2 (``--plot-eps 0.11``)
SHARPEN = 20.0


def parity_plot(root: Path, tol: float, seed: int, eps: float = 0.1) -> bool:
    clip, module = import_official(root, REPOS["PLOT"][2])
    clip_model = tiny_clip(clip, resnet=True)
    with torch.no_grad():
        clip_model.visual.attnpool.q_proj.weight.mul_(SHARPEN)
        clip_model.visual.attnpool.k_proj.weight.mul_(SHARPEN)
    backbone = fedprompt_backbone(clip_model)
    cfg = ns(TRAINER=ns(PLOT=ns(N=4, N_CTX=4, CTX_INIT="", CSC=False, PREC="fp32", CLASS_TOKEN_POSITION="end")),
             INPUT=ns(SIZE=(64, 64)), DATASET=ns(NAME="Caltech101"), MODEL=ns(BACKBONE=ns(NAME="tiny")))
    torch.manual_seed(seed)
    official = module.CustomCLIP(cfg, CLASSES, clip_model)
    learner = official.prompt_learner
    perturb_([learner.ctx], seed, scale=0.2)
    # fedprompt's per-problem stopping rule run to convergence; the official one stops on mean |r - r_prev| < 0.01
    client = PLOT(n_prompts=4, n_ctx=4, tol=1e-7, max_iter=1000, eps=eps).build_client(backbone, CLASSES)
    with torch.no_grad():
        client.prompt.ctx[0].copy_(learner.ctx)
    image, label = images(backbone, 3, seed)

    official.eval()
    with torch.no_grad():
        logits_o = official(image)
    client.eval()
    logits_f = client.predict_logits({"image": image})
    with torch.no_grad():  # how much the plan matters: the same logits with a uniform plan
        text = client.text_for(torch.zeros(1, dtype=torch.long))[0]
        uniform = ot_logits(client.image_tokens({"image": image}), text, client._logit_scale, "uniform", gamma=1.0)

    learner.train()
    loss_o = F.cross_entropy(official(image), label)
    optimizer = sgd([learner.ctx])
    optimizer.zero_grad()
    loss_o.backward()
    optimizer.step()
    loss_f = fedprompt_step(client, image, label)
    pairs = {"logits": (logits_o, logits_f), "loss": (loss_o, loss_f),
             "grad ctx": (learner.ctx.grad, client.prompt.ctx.grad[0]),
             "ctx after step": (learner.ctx, client.prompt.ctx[0])}
    gap = float((logits_o - uniform).abs().max())
    return report("PLOT", pairs, tol, f" (OT plan against a uniform one: logits differ by {gap:.1e})")


PARITY = {"CoCoOp": parity_cocoop, "KgCoOp": parity_kgcoop, "ProGrad": parity_prograd, "PLOT": parity_plot}


def default_mirror() -> Path:
    return Path(os.environ.get("FEDPROMPT_MIRROR", "/work/.mirror"))


def run_checks(checks: dict, source, methods=None, mirror: Path | None = None, tol: float = 1e-5,
               seeds=(0, 1)) -> dict[str, bool | None]:
    """Run parity ``checks`` (method -> ``check(root, tol, seed)``; ``methods``: all by default) on each method's
    repository, extracted from the mirrors into a temporary folder (``source(method, mirror, folder)`` -> the mirror
    folder name and the root it extracted, or ``None`` when the mirror is absent); ``None`` for a method whose mirror
    is absent."""
    mirror = Path(mirror or default_mirror())
    methods = list(checks) if methods is None else methods
    results: dict[str, bool | None] = {}
    torch.set_num_threads(1)
    for method in methods:
        with tempfile.TemporaryDirectory(prefix=f"parity-{method}-") as tmp:
            repo, root = source(method, mirror, Path(tmp))
            if root is None:
                print(f"{method:8s} skipped: no mirror of the official code at {mirror / repo / 'repo'}")
                results[method] = None
                continue
            results[method] = all(checks[method](root, tol, seed) for seed in seeds)
    return results


def parity_main(description: str, checks: dict, run, argv=None, options: tuple = ()) -> int:
    """The command line of a parity script: ``--mirror``, ``--methods``, ``--tol`` and the script's own ``options``
    (``(flag, default, help)``: a number passed to ``run`` as the keyword named by the flag, e.g. ``--plot-eps`` ->
    ``plot_eps``); exit status 1 on a failure."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--mirror", type=Path, default=default_mirror(),
                        help="folder of the git mirrors (<owner>+<name>/repo); default $FEDPROMPT_MIRROR or /work/.mirror")
    parser.add_argument("--methods", nargs="+", default=list(checks), choices=list(checks))
    parser.add_argument("--tol", type=float, default=1e-5)
    for flag, default, text in options:
        parser.add_argument(flag, type=float, default=default, help=text)
    args = parser.parse_args(argv)
    names = [flag.lstrip("-").replace("-", "_") for flag, _, _ in options]
    results = run(args.methods, args.mirror, args.tol, **{name: getattr(args, name) for name in names})
    return 1 if any(r is False for r in results.values()) else 0


def _extract_repo(method: str, mirror: Path, folder: Path):
    repo, subtree, _ = REPOS[method]
    if not (mirror / repo / "repo").is_dir():
        return repo, None
    root = extract(mirror, repo, subtree, folder)
    if method == "ProGrad":
        extract(mirror, repo, str(Path(PROGRAD_DASSL).parent), folder)
    return repo, root


def run(methods=None, mirror: Path | None = None, tol: float = 1e-5, seeds=(0, 1),
        plot_eps: float = 0.1) -> dict[str, bool | None]:
    """The parity checks; ``None`` for an absent mirror. ``plot_eps``: fedprompt's PLOT eps (the official code's is
    0.1; another value must fail)."""
    checks = {**PARITY, "PLOT": functools.partial(parity_plot, eps=plot_eps)}
    return run_checks(checks, _extract_repo, methods, mirror, tol, seeds)


PLOT_EPS = ("--plot-eps", 0.1, "fedprompt's PLOT eps (the official 0.1; 0.11 must fail: the check sees the transport)")
main = functools.partial(parity_main, __doc__.split("\n\n")[0], PARITY, run, options=(PLOT_EPS,))


if __name__ == "__main__":
    sys.exit(main())
