"""Parity of fedprompt's FedOTP, FedPGP, FedMGP and PromptFolio clients with the official code, on the same random
CLIP weights.

The official repositories (HongxiaLee/FedOTP, TianyuCuiOvO/FedPGP, weihao-bo/FedMGP, PanBikang/PromptFolio) are read
at run time from local git mirrors (``--mirror``, default ``$FEDPROMPT_MIRROR`` or ``/work/.mirror``, holding
``<owner>+<name>/repo``: bare clones, e.g. made by ``git clone --mirror``); nothing of them is copied into
fedprompt. Each repository is extracted into a temporary folder and its own ``clip`` package and trainer file are
imported from there, with stand-ins for the ``Dassl.dassl`` modules the trainer imports (the model classes never
call them).

For each method one random-init OpenAI CLIP is built with the repository's own ``clip.model.CLIP`` (a tiny ViT; for
FedOTP the release's modified ViT that projects every token; for FedMGP its ViT with visual prompt groups),
converted to open_clip (same weights) and wrapped as fedprompt's frozen backbone. The official prompt learner's
tensors (perturbed at random, so that nothing sits at its initial value) are copied into fedprompt's client; then
the same random images go through both:

- the evaluation logits;
- one training step: the release's own ``forward_backward`` (its loss: FedOTP's cross-entropy on the OT logits,
  FedPGP's cross-entropy plus mu x the contrastive term, FedMGP's mean group cross-entropy plus its diversity
  term, PromptFolio's cross-entropy of the theta-mixed features) on a stand-in trainer whose update is one SGD step
  (momentum 0.9, weight decay 5e-4), against fedprompt's ``training_step``, ``backward`` and StackedSGD step: the
  loss, the gradients and the prompt tensors after the step;
- PromptFolio also: the server, the release's ``fed_aggregate_model`` (FedAvg of the global prompts by its Dassl
  ``average_weights``, data-size weighted) and ``fed_download_model`` for three clients against fedprompt's
  aggregator. The release indexes its list of the round's prompts by client id, so in ``np.random.choice``'s order
  each prompt gets another client's weight (printed; fedprompt's weights follow the clients).

FedOTP runs both solvers to convergence (the release stops when the batch's mean |v - v_prev| falls below
``thresh``, fedprompt per problem at ``tol``: a different rule, the same fixed point). FedPGP uses the release's
contrastive positive, the literal "X X ... X {class}." sentence (``literal_x_prompt: true``; fedprompt's default is
the hand-crafted prompt, see ``fedprompt/methods/fedpgp.py``). FedMGP runs 3 text and 2 visual groups (the extra
text group pairs with visual group 0, as the release) and the release's diversity term (``diversity: code``, its l1
distance and sign).

The script prints the largest absolute difference of each and fails (exit status 1) above ``--tol`` (1e-5). A
missing mirror skips its method with a line saying so.

    python benchmarks/parity_official_pfl.py
    python benchmarks/parity_official_pfl.py --mirror /path/to/mirrors --methods FedOTP
    python benchmarks/parity_official_pfl.py --methods PromptFolio --promptfolio-theta 0.41   # must FAIL
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from parity_text_baselines import CLASSES, default_mirror, extract, fedprompt_backbone, fedprompt_step, images, ns, \
    parity_main, perturb_, report, run_checks, sgd  # noqa: E402
from parity_text_baselines import import_official as import_text_baselines_official  # noqa: E402
from fedprompt.methods import FedMGP, FedOTP, FedPGP, PromptFolio  # noqa: E402

#: method -> (mirror folder, trainer file, trainer class name in the release's design_details)
REPOS = {
    "FedOTP": ("HongxiaLee+FedOTP", "trainers/GLP_OT.py", "GLP_OT"),
    "FedPGP": ("TianyuCuiOvO+FedPGP", "trainers/fedpgp.py", "FedPGP"),
    "FedMGP": ("weihao-bo+FedMGP", "trainers/fedmgp.py", "FedMGP"),
    "PromptFolio": ("PanBikang+PromptFolio", "trainers/PromptFolio.py", "PromptFolio"),
}
#: PromptFolio's FedAvg over the global prompts lives in its Dassl trainer (``SimpleTrainer.average_weights``)
DASSL_TRAINER = ("Dassl/dassl/engine/trainer.py", "SimpleTrainer")


# -------------------------------------------------------------------------------------------- the official code
def install_dassl_stubs() -> None:
    """Stand-ins for the ``Dassl.dassl`` modules the trainer files import (their model classes use none)."""
    def unused(*args, **kwargs):
        raise RuntimeError("the parity check never calls Dassl's training loop")

    def compute_accuracy(output, label):
        return [(output.argmax(1) == label).float().mean() * 100]

    modules = {
        "Dassl": {}, "Dassl.dassl": {}, "Dassl.dassl.engine": {},
        "Dassl.dassl.engine.trainer": {"TrainerX": type("TrainerX", (), {})},
        "Dassl.dassl.metrics": {"compute_accuracy": compute_accuracy},
        "Dassl.dassl.utils": {"load_pretrained_weights": unused, "load_checkpoint": unused},
        "Dassl.dassl.optim": {"build_optimizer": unused, "build_lr_scheduler": unused},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def import_official(root: Path, trainer: str):
    """The repository's ``clip`` package and trainer module, with the ``Dassl.dassl`` stand-ins."""
    return import_text_baselines_official(root, trainer, install_dassl_stubs, "Dassl")


def trainer_method(module, path: Path, class_name: str, name: str):
    """The method ``name`` of class ``class_name`` in the trainer file, defined on its own over the module's
    globals (so it can run on a stand-in trainer)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    namespace = dict(vars(module))
                    exec(compile(ast.Module([item], []), str(path), "exec"), namespace)
                    return namespace[name]
    raise LookupError(f"{class_name}.{name} not found in {path}")


def tiny_clip(clip, trainer: str, seed: int = 0, **design_details):
    """A random-init OpenAI CLIP from the repository's ``clip.model.CLIP``: embed 32, text 2 layers x 64 wide,
    vision a 2-layer ViT of width 64 (patch 8, 32 px: 16 patches); ``design_details`` as the release's loader
    passes them (FedMGP: its visual prompt groups)."""
    if hasattr(clip.model, "time"):  # FedMGP's release reseeds torch from the clock for its visual groups
        clip.model.time = types.SimpleNamespace(time=lambda: 0.0)
    torch.manual_seed(seed)
    design = {"trainer": trainer, "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0,
              **design_details}
    model = clip.model.CLIP(32, 32, 2, 64, 8, 77, 49408, 64, 1, 2, design)
    with torch.no_grad():  # a logit scale that makes the softmax sharp enough to matter (exp(3) = 20)
        model.logit_scale.fill_(3.0)
    return model.float().eval()


def evaluation_logits(official, client, image) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' logits in evaluation mode (the release's, fedprompt's)."""
    official.eval()
    with torch.no_grad():
        logits_o = official(image)
    client.eval()
    return logits_o, client.predict_logits({"image": image})


def official_step(module, root: Path, method: str, official, params, image, label, **attrs):
    """The release's ``forward_backward`` on a stand-in trainer whose update is one SGD step; returns the loss."""
    _, trainer_file, trainer_class = REPOS[method]
    return stand_in_step(module, root / trainer_file, trainer_class, official, params, image, label, **attrs)


def stand_in_step(module, path: Path, class_name: str, model, params, image, label, lr: float = 0.002, **attrs):
    """``class_name.forward_backward`` of the trainer file ``path`` on a stand-in trainer (``attrs``: its other
    attributes) whose update is one SGD step (lr 0.002, momentum 0.9, weight decay 5e-4, as fedprompt_step: Dassl's
    defaults), ``model`` in train mode; returns the loss."""
    forward_backward = trainer_method(module, path, class_name, "forward_backward")
    parse_batch_train = trainer_method(module, path, class_name, "parse_batch_train")
    optimizer = sgd(params, lr=lr)

    def update(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    trainer = ns(model=model, device=torch.device("cpu"), batch_idx=0, num_batches=2, update_lr=lambda: None,
                 model_backward_and_update=update, **attrs)
    trainer.parse_batch_train = lambda batch: parse_batch_train(trainer, batch)
    model.train()
    summary = forward_backward(trainer, {"img": image, "label": label})
    return torch.tensor(summary["loss"])



def global_local_pairs(module, root: Path, method: str, official, client, cfg, batch, seed: int) -> dict:
    """The release's two prompts ``ctx`` [2, n_ctx, D] (index 0 global, 1 local: FedOTP, PromptFolio), perturbed,
    copied into fedprompt's global and local prompt; the evaluation logits and one training step of both on
    ``batch`` (images, labels): the pairs to compare."""
    learner = official.prompt_learner
    perturb_([learner.ctx], seed, scale=0.2)
    with torch.no_grad():
        client.global_prompt.ctx[0].copy_(learner.ctx[0])
        client.local_prompt.ctx[0].copy_(learner.ctx[1])
    image, label = batch
    logits_o, logits_f = evaluation_logits(official, client, image)
    loss_o = official_step(module, root, method, official, [learner.ctx], image, label, cfg=cfg)
    loss_f = fedprompt_step(client, image, label)
    return {"logits": (logits_o, logits_f), "loss": (loss_o, loss_f),
            "grad global": (learner.ctx.grad[0], client.global_prompt.ctx.grad[0]),
            "grad local": (learner.ctx.grad[1], client.local_prompt.ctx.grad[0]),
            "prompts after step": (learner.ctx, torch.stack([client.global_prompt.ctx[0],
                                                             client.local_prompt.ctx[0]]))}


# ---------------------------------------------------------------------------------------------- the methods
def parity_fedotp(root: Path, tol: float, seed: int) -> bool:
    clip, module = import_official(root, REPOS["FedOTP"][1])
    clip_model = tiny_clip(clip, "GLP_OT")
    backbone = fedprompt_backbone(clip_model)
    settings = ns(N_CTX=4, CTX_INIT="", CSC=False, PREC="fp32", CLASS_TOKEN_POSITION="end", N=2, EPS=0.1,
                  THRESH=0.0, OT="COT", TOP_PERCENT=0.8, MAX_ITER=1000)
    cfg = ns(TRAINER=ns(GLP_OT=settings), INPUT=ns(SIZE=(32, 32)), DATASET=ns(NAME="Caltech101"),
             MODEL=ns(BACKBONE=ns(NAME="tiny")))
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the release prints its prompt settings
        official = module.CustomCLIP(cfg, CLASSES, clip_model)
    client = FedOTP(n_ctx=4, ot="unbalanced", gamma=0.8, eps=0.1, max_iter=1000, tol=1e-7).build_client(
        backbone, CLASSES)
    pairs = global_local_pairs(module, root, "FedOTP", official, client, cfg, images(backbone, 3, seed), seed)
    return report("FedOTP", pairs, tol)


def parity_fedpgp(root: Path, tol: float, seed: int) -> bool:
    clip, module = import_official(root, REPOS["FedPGP"][1])
    clip_model = tiny_clip(clip, "FedPGP")
    backbone = fedprompt_backbone(clip_model)
    settings = ns(N_CTX=4, CTX_INIT="", CSC=False, PREC="fp32", CLASS_TOKEN_POSITION="end", N=1, BOTTLENECK=2,
                  mu=0.5, temp=0.5)
    cfg = ns(TRAINER=ns(FEDPGP=settings), INPUT=ns(SIZE=(32, 32)), DATASET=ns(NAME="Caltech101"),
             MODEL=ns(BACKBONE=ns(NAME="tiny")))
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the release prints its prompt settings
        official = module.CustomCLIP(cfg, CLASSES, clip_model)
    learner = official.prompt_learner
    perturb_([learner.U, learner.V, learner.sigma], seed, scale=0.2)
    client = FedPGP(n_ctx=4, bottleneck=2, mu=0.5, tau=0.5, literal_x_prompt=True).build_client(backbone, CLASSES)
    with torch.no_grad():
        client.personal.U[0].copy_(learner.U[0])
        client.personal.V[0].copy_(learner.V[0])
        client.sigma.ctx[0].copy_(learner.sigma[0])
    image, label = images(backbone, 4, seed)

    logits_o, logits_f = evaluation_logits(official, client, image)

    params = [learner.U, learner.V, learner.sigma]
    loss_o = official_step(module, root, "FedPGP", official, params, image, label, cfg=cfg, mu=0.5, temp=0.5)
    loss_f = fedprompt_step(client, image, label)
    pairs = {"logits": (logits_o, logits_f), "loss CE + mu con": (loss_o, loss_f),
             "grad sigma": (learner.sigma.grad[0], client.sigma.ctx.grad[0]),
             "grad U": (learner.U.grad[0], client.personal.U.grad[0]),
             "grad V": (learner.V.grad[0], client.personal.V.grad[0]),
             "U, V, sigma after step": (torch.cat([p[0].flatten() for p in params]),
                                        torch.cat([client.personal.U[0].flatten(), client.personal.V[0].flatten(),
                                                   client.sigma.ctx[0].flatten()]))}
    return report("FedPGP", pairs, tol)


def parity_fedmgp(root: Path, tol: float, seed: int) -> bool:
    text_groups, visual_groups, n_ctx, visual_tokens = 3, 2, 2, 2  # more text groups than visual: the extra pairs
    clip, module = import_official(root, REPOS["FedMGP"][1])
    clip_model = tiny_clip(clip, "FedMGP", vision_depth=1, language_depth=1, vision_ctx=visual_tokens,
                           language_ctx=n_ctx, vision_num_prompts=visual_groups, language_num_prompts=text_groups)
    weights = {k: v for k, v in clip_model.state_dict().items() if k != "visual.VPT"}  # the prompts are not CLIP's
    backbone = fedprompt_backbone(ns(state_dict=lambda: weights))
    settings = ns(N_CTX_TEXT=n_ctx, CTX_INIT="a photo of a", PREC="fp32", NUM_PROMPTS_TEXT=text_groups,
                  NUM_PROMPTS_VISION=visual_groups, PROMPT_DEPTH_TEXT=1, PROMPT_DEPTH_VISION=1,
                  N_CTX_VISION=visual_tokens, USE_DIVERGENT_LOSS=True, DIVERGENT_LOSS_WEIGHT=1.0,
                  DIVERGENT_LOSS_TYPE="l1", INFERENCE_MODE="average")
    cfg = ns(TRAINER=ns(FEDMGP=settings), INPUT=ns(SIZE=(32, 32)), DATASET=ns(NAME="Caltech101"),
             MODEL=ns(BACKBONE=ns(NAME="tiny")))
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the release prints its prompt settings
        official = module.CustomCLIP(cfg, CLASSES, clip_model)
    text, visual = official.prompt_learner.ctx, clip_model.visual.VPT
    perturb_([text, visual], seed, scale=0.2)
    client = FedMGP(text_groups=text_groups, visual_groups=visual_groups, n_ctx=n_ctx, visual_tokens=visual_tokens,
                    ctx_init="a photo of a", diversity="code", distance="l1", diversity_weight=1.0,
                    inference="average").build_client(backbone, CLASSES)
    with torch.no_grad():
        client.text_prompts.ctx[0].copy_(text)
        client.visual_prompts.tokens[0].copy_(visual)
    image, label = images(backbone, 4, seed)

    logits_o, logits_f = evaluation_logits(official, client, image)

    loss_o = official_step(module, root, "FedMGP", official, [text, visual], image, label, cfg=cfg)
    loss_f = fedprompt_step(client, image, label)
    pairs = {"logits": (logits_o, logits_f), "loss CE + diversity": (loss_o, loss_f),
             "grad text": (text.grad, client.text_prompts.ctx.grad[0]),
             "grad visual": (visual.grad, client.visual_prompts.tokens.grad[0]),
             "prompts after step": (torch.cat([text.flatten(), visual.flatten()]),
                                    torch.cat([client.text_prompts.ctx[0].flatten(),
                                               client.visual_prompts.tokens[0].flatten()]))}
    return report("FedMGP", pairs, tol)


def official_aggregation(module, root: Path, prompts: dict[int, torch.Tensor], sizes: dict[int, int],
                         order: list[int]) -> dict[int, torch.Tensor]:
    """The release's ``fed_aggregate_model`` (its FedAvg of the global prompts ``ctx[:1]`` of the clients in
    ``order``, by ``average_weights``) and ``fed_download_model`` (each client's [global; its own local]) on a
    stand-in trainer; returns each client's prompts [2, n_ctx, D] after the download."""
    path, trainer_class = root / REPOS["PromptFolio"][1], REPOS["PromptFolio"][2]
    model = torch.nn.Module()
    model.prompt_learner = torch.nn.Module()
    model.prompt_learner.ctx = torch.nn.Parameter(torch.zeros_like(next(iter(prompts.values()))))
    trainer = ns(cfg=ns(DATASET=ns(USERS=len(sizes))), model=model, global_info=None,
                 fed_train_loader_x_dict={cid: ns(dataset=[None] * n) for cid, n in sizes.items()},
                 local_info={cid: {"prompt_learner.ctx": p.clone()} for cid, p in prompts.items()})
    trainer.average_weights = lambda *args, **kw: trainer_method(module, root / DASSL_TRAINER[0], DASSL_TRAINER[1],
                                                                 "average_weights")(trainer, *args, **kw)
    trainer_method(module, path, trainer_class, "fed_aggregate_model")(trainer, order)
    after = {}
    for cid in prompts:
        with torch.no_grad():
            trainer_method(module, path, trainer_class, "fed_download_model")(trainer, cid)
        after[cid] = model.prompt_learner.ctx.detach().clone()
    return after


def fedprompt_aggregation(method, prompts: dict[int, torch.Tensor], sizes: dict[int, int]) -> dict[int, torch.Tensor]:
    """fedprompt's server on the same prompts: the uploads, the merge and each client's download and merge."""
    server = method.build_aggregator()
    states = {cid: {"global_prompt.ctx": p[0], "local_prompt.ctx": p[1]} for cid, p in prompts.items()}
    merged = server.aggregate({cid: server.upload(cid, st, 1) for cid, st in states.items()}, sizes, 1)
    after = {cid: server.apply(st, server.download(merged, cid), cid) for cid, st in states.items()}
    return {cid: torch.stack([st["global_prompt.ctx"], st["local_prompt.ctx"]]) for cid, st in after.items()}


def parity_promptfolio(root: Path, tol: float, seed: int, theta: float = 0.4) -> bool:
    clip, module = import_official(root, REPOS["PromptFolio"][1])
    clip_model = tiny_clip(clip, "PromptFL")
    backbone = fedprompt_backbone(clip_model)
    cfg = ns(TRAINER=ns(PLOT=ns(N=2, N_CTX=4, CTX_INIT="", PREC="fp32", CLASS_TOKEN_POSITION="end"),
                        PROMPTFL=ns(CSC=False, FRAC=0.4)),
             INPUT=ns(SIZE=(32, 32)), DATASET=ns(NAME="Caltech101"), MODEL=ns(BACKBONE=ns(NAME="tiny")))
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the release prints its prompt settings
        official = module.CustomCLIP(cfg, CLASSES, clip_model)
    method = PromptFolio(n_ctx=4, theta=theta)
    client = method.build_client(backbone, CLASSES)
    pairs = global_local_pairs(module, root, "PromptFolio", official, client, cfg, images(backbone, 4, seed), seed)
    learner = official.prompt_learner
    g = torch.Generator().manual_seed(seed)  # three clients' prompts and data sizes for the server's side
    prompts = {cid: learner.ctx.detach() + 0.1 * torch.randn(learner.ctx.shape, generator=g) for cid in range(3)}
    sizes = {0: 5, 1: 12, 2: 7}
    ours = fedprompt_aggregation(method, prompts, sizes)
    theirs = official_aggregation(module, root, prompts, sizes, [0, 1, 2])
    shuffled = official_aggregation(module, root, prompts, sizes, [2, 0, 1])  # np.random.choice's order
    pairs["after aggregation"] = (torch.stack(list(theirs.values())), torch.stack(list(ours.values())))
    gap = max(float((shuffled[cid] - ours[cid]).abs().max()) for cid in ours)
    return report("PromptFolio", pairs, tol, f" (the release's aggregation with the clients listed 2, 0, 1: "
                                             f"{gap:.1e}, each prompt weighted by another client's data size)")


PARITY = {"FedOTP": parity_fedotp, "FedPGP": parity_fedpgp, "FedMGP": parity_fedmgp,
          "PromptFolio": parity_promptfolio}


def _extract_repo(method: str, mirror: Path, folder: Path):
    repo = REPOS[method][0]
    if not (mirror / repo / "repo").is_dir():
        return repo, None
    return repo, extract(mirror, repo, "", folder)


def run(methods=None, mirror: Path | None = None, tol: float = 1e-5, seeds=(0, 1),
        promptfolio_theta: float = 0.4) -> dict[str, bool | None]:
    """The parity checks; ``None`` for an absent mirror. ``promptfolio_theta``: fedprompt's PromptFolio theta (the
    release's frac_p is 0.4; another value must fail)."""
    checks = {**PARITY, "PromptFolio": functools.partial(parity_promptfolio, theta=promptfolio_theta)}
    return run_checks(checks, _extract_repo, methods, mirror, tol, seeds)


THETA = ("--promptfolio-theta", 0.4, "fedprompt's PromptFolio theta (the release's 0.4; 0.41 must fail)")
main = functools.partial(parity_main, __doc__.split("\n\n")[0], PARITY, run, options=(THETA,))


if __name__ == "__main__":
    sys.exit(main())
