"""Parity of fedprompt's FedPHA and FedMVP clients with the official model code, on the same random CLIP weights.

The official repositories (CYFang6/FedPHA, mainaksingha01/FedMVP) are read at run time from local git mirrors
(``--mirror``, default ``$FEDPROMPT_MIRROR`` or ``/work/.mirror``, holding ``<owner>+<name>/repo``: bare clones);
nothing of them is copied into fedprompt. Each repository is extracted into a temporary folder and its own ``clip``
package and model file are imported from there.

- **FedPHA** (``trainers/GL_SVDMSE.py``, homogeneous: 8 global and 8 local tokens) and **FedPHA-HE**
  (``trainers/GL_SVDMSE_HE.py``, two clients with local prompts of 3 and 10 tokens and an 8-token global prompt):
  the release's ``CustomCLIP`` and ``forward_backward`` on a stand-in trainer (stand-ins for the ``Dassl.dassl``
  modules the trainer imports; PREC fp32). fedprompt runs FedPHA with the released subspace (``projection:
  minor``) and, for HE, the released pooling (``compat: official``); the two HE clients train in ONE lock-step
  step of fedprompt's module (2 slots, different local lengths), the release trains them one after the other from
  the same starting prompts. Compared: evaluation logits (local prompts), each client's loss, the gradients of the
  global and local prompts, the prompts after one SGD step.
- **FedMVP** (``model/FedMVP.py``): the release's ``FedMVP`` model and ``Client.forward_backward``. The release does
  not run as published, so the script supplies plumbing only: an empty ``model.prompt_net`` (imported but not in
  the repository) and ``einops`` (imported, unused), the missing ``image_encoder`` attribute set to the release's
  own ``ImageEncoder`` over the CLIP visual tower (the forward calls it; ``__init__`` never creates it), the
  PromptFormer cast back to fp32 after the release casts it to fp16 (the comparison is in fp32), the random flip
  of the consistency term fixed to "flip" (``flip_transform``; fedprompt: ``flip_probability: 1``), and an
  ``attributes/pacs.json`` with generated attributes in a temporary working folder (the release reads it from
  there; the JSON's class order is the class list's, so the release's JSON-ordered logit columns line up). The
  tiny CLIP has the widths the release hard-codes (vision width 768, joint width 512; one layer each).

The script prints the largest absolute difference of each quantity and fails (exit status 1) above ``--tol``
(1e-5). A missing mirror skips its method with a line saying so.

    python benchmarks/parity_official_2025.py
    python benchmarks/parity_official_2025.py --mirror /path/to/mirrors --methods FedMVP
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from parity_official_pfl import import_official, tiny_clip, trainer_method  # noqa: E402
from parity_text_baselines import CLASSES, extract, fedprompt_backbone, fedprompt_step, images, ns, \
    parity_main, perturb_, report, run_checks, sgd  # noqa: E402
from parity_text_baselines import import_official as import_plain  # noqa: E402
from fedprompt.methods import FedMVP, FedPHA  # noqa: E402

#: method -> (mirror folder, model file)
REPOS = {
    "FedPHA": ("CYFang6+FedPHA", "trainers/GL_SVDMSE.py"),
    "FedPHA-HE": ("CYFang6+FedPHA", "trainers/GL_SVDMSE_HE.py"),
    "FedMVP": ("mainaksingha01+FedMVP", "model/FedMVP.py"),
}
#: FedPHA-HE: the global prompt's and the two clients' local prompts' lengths
HE_GLOBAL, HE_LOCAL = 8, (3, 10)


# -------------------------------------------------------------------------------------------------- FedPHA
def official_pha_step(module, path: Path, trainer_class: str, official, params, image, label, settings, **kwargs):
    """The release's ``forward_backward`` on a stand-in trainer whose update is one SGD step; returns the loss."""
    forward_backward = trainer_method(module, path, trainer_class, "forward_backward")
    parse_batch_train = trainer_method(module, path, trainer_class, "parse_batch_train")
    optimizer = sgd(params)

    def update(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    cfg = ns(TRAINER=ns(**{trainer_class: settings}))
    trainer = ns(model=official, device=torch.device("cpu"), batch_idx=0, num_batches=2, update_lr=lambda: None,
                 model_backward_and_update=update, cfg=cfg, alpha=settings.alpha)
    trainer.parse_batch_train = lambda batch: parse_batch_train(trainer, batch)
    official.train()
    return torch.tensor(forward_backward(trainer, 0, {"img": image, "label": label}, **kwargs)["loss"])


def pha_settings(**extra):
    return ns(CTX_INIT="", CSC=False, PREC="fp32", CLASS_TOKEN_POSITION="end", N=1, ratio=0.8, alpha=1.0,
              lambda_orthogonal=1, **extra)


def pha_official(root: Path, trainer: str, settings, seed: int, **dataset):
    clip, module = import_official(root, REPOS["FedPHA-HE" if trainer.endswith("HE") else "FedPHA"][1])
    clip_model = tiny_clip(clip, trainer)
    cfg = ns(TRAINER=ns(**{trainer: settings}), INPUT=ns(SIZE=(32, 32)), DATASET=ns(NAME="Caltech101", **dataset),
             MODEL=ns(BACKBONE=ns(NAME="tiny")))
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the release prints its prompt settings
        official = module.CustomCLIP(cfg, CLASSES, clip_model)
    return module, clip_model, official


def parity_fedpha(root: Path, tol: float, seed: int) -> bool:
    settings = pha_settings(N_CTX=8)
    module, clip_model, official = pha_official(root, "GL_SVDMSE", settings, seed)
    learner = official.prompt_learner
    perturb_([learner.ctx_global, learner.ctx_local], seed, scale=0.2)
    client = FedPHA(n_ctx_global=8, n_ctx_local=8, projection="minor").build_client(fedprompt_backbone(clip_model),
                                                                                  CLASSES)
    with torch.no_grad():
        client.global_prompt.ctx[0].copy_(learner.ctx_global[0])
        client.local_prompt.ctx[0].copy_(learner.ctx_local[0])
    image, label = images(client.backbone, 4, seed)
    official.eval()
    with torch.no_grad():
        logits_o = official(image)
    client.eval()
    logits_f = client.predict_logits({"image": image})
    params = [learner.ctx_global, learner.ctx_local]
    loss_o = official_pha_step(module, root / REPOS["FedPHA"][1], "GL_SVDMSE", official, params, image, label,
                               settings)
    loss_f = fedprompt_step(client, image, label)
    pairs = {"logits": (logits_o, logits_f), "loss": (loss_o, loss_f),
             "grad global": (learner.ctx_global.grad[0], client.global_prompt.ctx.grad[0]),
             "grad local": (learner.ctx_local.grad[0], client.local_prompt.ctx.grad[0]),
             "prompts after step": (torch.cat([p.flatten() for p in params]),
                                    torch.cat([client.global_prompt.ctx[0].flatten(),
                                               client.local_prompt.ctx[0].flatten()]))}
    return report("FedPHA", pairs, tol)


def lockstep_batch(images_per_client: list[torch.Tensor], labels: list[torch.Tensor]) -> dict:
    """One lock-step batch of several clients (slot k = client k), as the engine builds it."""
    sizes = [len(x) for x in images_per_client]
    owner = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    return {"image": torch.cat(images_per_client), "label": torch.cat(labels), "slots": torch.arange(len(sizes)),
            "owner": owner, "counts": torch.tensor(sizes), "members": list(range(len(sizes))), "sizes": sizes}


def lockstep_step(client, batch: dict, lr: float = 0.002) -> torch.Tensor:
    """fedprompt's training step of every client of ``batch`` together: the per-client losses ``[A]``, one backward
    and one StackedSGD step."""
    client.train()
    optimizer = client.configure_optimizers()
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = client.training_step(batch)
    with client.stepping_for(batch):
        client.backward(losses, lambda t, **kw: t.backward(**kw))
    optimizer.step()
    return sum(losses.values()).detach()


def parity_fedpha_he(root: Path, tol: float, seed: int) -> bool:
    settings = pha_settings(N_CTX_GLOBAL=HE_GLOBAL)
    module, clip_model, official = pha_official(root, "GL_SVDMSE_HE", settings, seed, USERS=len(HE_LOCAL),
                                                USER_PROMPT_LENGTHS=list(HE_LOCAL))
    learner = official.prompt_learner
    perturb_([learner.ctx_global, *learner.ctx_local_list], seed, scale=0.2)
    start = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    client = FedPHA(n_ctx_global=HE_GLOBAL, local_lengths=list(HE_LOCAL), projection="minor",
                    compat="official").build_client(fedprompt_backbone(clip_model), CLASSES, slots=len(HE_LOCAL))
    for k, local in enumerate(learner.ctx_local_list):
        client.load_slot(k, {"global_prompt.ctx": learner.ctx_global.detach(), "local_prompt.ctx": local.detach()})
    pictures = [images(client.backbone, 3 + k, seed + 10 * k) for k in range(len(HE_LOCAL))]
    batch = lockstep_batch([x for x, _ in pictures], [y for _, y in pictures])
    official.eval()
    with torch.no_grad():
        logits_o = torch.cat([official(x, k) for k, (x, _) in enumerate(pictures)])
    client.eval()
    logits_f = client.predict_logits(batch)
    loss_f = lockstep_step(client, batch)
    pairs = {"logits": (logits_o, logits_f)}
    for k, (x, y) in enumerate(pictures):  # the release: one client after the other, each from the same start
        learner.load_state_dict(start)
        params = [learner.ctx_global, learner.ctx_local_list[k]]
        loss_o = official_pha_step(module, root / REPOS["FedPHA-HE"][1], "GL_SVDMSE_HE", official, params, x, y,
                                   settings, idx=k)
        state = client.slot_state(k)
        pairs[f"loss client {k}"] = (loss_o, loss_f[k])
        pairs[f"grad global {k}"] = (learner.ctx_global.grad, client.global_prompt.ctx.grad[k])
        pairs[f"grad local {k}"] = (learner.ctx_local_list[k].grad, client.local_prompt.ctx.grad[k][:HE_LOCAL[k]])
        pairs[f"prompts after step {k}"] = (torch.cat([p.detach().flatten() for p in params]),
                                            torch.cat([v.flatten() for v in state.values()]))
    return report("FedPHA-HE", pairs, tol, f" (local lengths {HE_LOCAL}, global {HE_GLOBAL}, one lock-step step)")


# -------------------------------------------------------------------------------------------------- FedMVP
ATTRIBUTES = ["fur texture and colour", "a long tail", "has four legs", "often seen outdoors", "used for play",
              "round shape"]


def install_mvp_stubs() -> None:
    """Plumbing the release imports but does not ship or use: ``model.prompt_net`` and ``einops``."""
    sys.modules["model.prompt_net"] = types.ModuleType("model.prompt_net")
    if "einops" not in sys.modules:
        try:
            import einops  # noqa: F401
        except ImportError:
            sys.modules["einops"] = types.SimpleNamespace(repeat=None)


def mvp_clip(clip, seed: int):
    """A random-init CLIP from the release's ``clip.model.CLIP`` with the widths its PromptFormer hard-codes: joint
    512, vision one layer of width 768 (patch 16 at 64 px: 16 patches), text one layer of width 64."""
    torch.manual_seed(seed)
    model = clip.model.CLIP(512, 64, 1, 768, 16, 77, 49408, 64, 1, 1)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    return model.float().eval()


def copy_former(learner, former) -> None:
    """The release's PromptFormer tensors into fedprompt's (slot 0)."""
    attend, feed = learner.crossattn.cross_attend_blocks
    pairs = {"context": learner.linear, "norm_queries": attend.norm, "norm_context": attend.norm_context,
             "attn": attend.fn, "ff": feed.net}
    with torch.no_grad():
        for name, source in pairs.items():
            for key, value in source.state_dict().items():
                former.get_parameter(f"{name}.{key}")[0].copy_(value)


def former_pairs(learner, former, what) -> dict:
    attend, feed = learner.crossattn.cross_attend_blocks
    sources = {"context": learner.linear, "norm_queries": attend.norm, "norm_context": attend.norm_context,
               "attn": attend.fn, "ff": feed.net}
    theirs, ours = [], []
    for name, source in sources.items():
        for key, param in source.named_parameters():
            mine = former.get_parameter(f"{name}.{key}")
            theirs.append((param.grad if what == "grad" else param).flatten())
            ours.append((mine.grad[0] if what == "grad" else mine[0]).flatten())
    return torch.cat(theirs), torch.cat(ours)


def parity_fedmvp(root: Path, tol: float, seed: int) -> bool:
    clip, module = import_plain(root, REPOS["FedMVP"][1], install_mvp_stubs, "model")
    clip_model = mvp_clip(clip, seed)
    backbone = fedprompt_backbone(clip_model)
    with tempfile.TemporaryDirectory(prefix="fedmvp-attributes-") as folder:
        attributes = Path(folder) / "attributes" / "pacs.json"
        attributes.parent.mkdir()
        attributes.write_text(json.dumps({name: ATTRIBUTES[k % 2: k % 2 + 4] for k, name in enumerate(CLASSES)}))
        torch.manual_seed(seed)
        official = module.FedMVP(ns(MODEL=ns(N_CTX=4)), clip_model, device="cpu")
        official.image_encoder = module.ImageEncoder(clip_model.visual)  # the release's forward uses it
        learner = official.prompt_learner.float()  # the release casts the PromptFormer to fp16
        module.flip_transform = module.transforms.RandomHorizontalFlip(p=1.0)
        perturb_(list(learner.linear.parameters()) + list(learner.crossattn.parameters()), seed, scale=0.05)
        client = FedMVP(attributes=str(attributes), flip_probability=1.0, weight_decay=5e-4).build_client(
            backbone, CLASSES)
        copy_former(learner, client.former)
        image, label = images(backbone, 4, seed)
        image = torch.nn.functional.interpolate(image, size=64)
        cwd = os.getcwd()
        os.chdir(folder)  # the release reads attributes/<dataset>.json from the working folder
        try:
            official.eval()
            with torch.no_grad():
                logits_o = official(image, CLASSES, "PACS_photo")[0]
            loss_o = official_mvp_step(module, root, official, image, label)
        finally:
            os.chdir(cwd)
        client.eval()
        logits_f = client.predict_logits({"image": image})
        loss_f = fedprompt_step(client, image, label)
    pairs = {"logits": (logits_o, logits_f), "loss CE + alpha consistency": (loss_o, loss_f),
             "grad PromptFormer": former_pairs(learner, client.former, "grad"),
             "PromptFormer after step": former_pairs(learner, client.former, "value")}
    return report("FedMVP", pairs, tol)


def official_mvp_step(module, root: Path, official, image, label) -> torch.Tensor:
    """The release's ``Client.forward_backward`` (its loss) and one SGD step over the prompt learner, as its
    ``model_backward_and_update``."""
    forward_backward = trainer_method(module, root / "federated" / "client.py", "Client", "forward_backward")
    parse_batch = trainer_method(module, root / "federated" / "client.py", "Client", "parse_batch")
    forward_backward.__globals__["compute_accuracy"] = lambda output, label: [torch.zeros(())]  # plumbing
    trainer = ns(model=official, device=torch.device("cpu"), cfg=ns(TRAIN=ns(ALPHA=10)))
    trainer.parse_batch = lambda batch: parse_batch(trainer, batch)
    params = [p for p in official.prompt_learner.parameters() if p.requires_grad]
    optimizer = sgd(params)
    official.train()
    loss, _ = forward_backward(trainer, {"img": image, "label": label, "cname": None}, "PACS_photo", CLASSES)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


PARITY = {"FedPHA": parity_fedpha, "FedPHA-HE": parity_fedpha_he, "FedMVP": parity_fedmvp}


def _extract_repo(method: str, mirror: Path, folder: Path):
    repo = REPOS[method][0]
    return repo, extract(mirror, repo, "", folder) if (mirror / repo / "repo").is_dir() else None


#: ``run(methods=None, mirror=None, tol=1e-5, seeds=(0, 1))``: the parity checks; ``None`` for an absent mirror
run = functools.partial(run_checks, PARITY, _extract_repo)
main = functools.partial(parity_main, __doc__.split("\n\n")[0], PARITY, run)


if __name__ == "__main__":
    sys.exit(main())
