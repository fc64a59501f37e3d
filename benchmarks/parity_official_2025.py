"""Parity of fedprompt's FedPHA, FedMVP, FedAPT and FOCoOp with the official model code, on the same random CLIP
weights.

The official repositories (CYFang6/FedPHA, mainaksingha01/FedMVP, leondada/FedAPT, PengyangZhou/FOCoOp) are read at
run time from local git mirrors (``--mirror``, default ``$FEDPROMPT_MIRROR`` or ``/work/.mirror``, holding
``<owner>+<name>/repo``: bare clones); nothing of them is copied into fedprompt. Each repository is extracted into a
temporary folder and its own ``clip`` package (FedAPT's and FOCoOp's: KaiyangZhou/CoOp's copy of OpenAI's) and model
files are imported from there.

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
- **FedMVP-LoRA**: the same, with the release's LoRA switch (``federated/client.py:96-101``: ``requires_grad`` of
  the cross-attention and of ``CrossLoRAparams``, ``use_lora``) set by hand: two clients in ONE fedprompt lock-step
  step, client 0 switched and client 1 not, against the release's two steps from the same start (training logits
  from its ``compute_accuracy`` call, losses, the trained parameters' gradients, every parameter after the step).

- **FedAPT** (leondada/FedAPT, ``supervised/PromptModels/clip_queryv2.py``): the release's ``CustomCLIP_client``
  (each client's own domain key) and ``CustomCLIP_server`` (the key mixture per image), and one training step of two
  clients of different domains as ``supervised/prompt-ours.py`` takes it (its class and domain cross-entropies, the
  release's ``make_optimizer`` from ``utils.py``: SGD lr 0.01, momentum 0.9, weight decay 1e-5), against ONE lock-step
  step of fedprompt's module (2 slots). Plumbing: OpenAI's ``clip`` package (the release imports the pip package; the
  copy in KaiyangZhou/CoOp is used), the fp16 casts of the query layer and the keys undone (the comparison is in fp32),
  the keys given explicitly (the release draws them from the global stream). The tiny CLIP has the widths the release
  hard-codes (joint width 512, 224 px images).
- **FOCoOp** (PengyangZhou/FOCoOp, ``src/models/clip_focoop.py``, ``src/algorithms/FOCoOp/``): the OOD words the
  release mines (``clip_for_wordnet_prepare.py``, ``clip_fedlapt.py``) from a small subset of its WordNet lists
  (written over ``src/txtfiles`` in the temporary copy) against fedprompt's mining; the release's ``FOCoOpCLIP``
  (three class-specific prompts, ``dis_aware``) in evaluation; one local step of two clients by the release's own
  ``FOCoOpClient.train`` (bi-level DRO on; its DataLoader replaced by the one batch), each after ``torch.manual_seed``
  of the client's step seed, against ONE lock-step step of fedprompt's module (``compat: official``); then the
  release's ``FOCoOpServer.fit`` (weighted mean and the unbalanced-OT calibration) on those two clients' uploads
  (stand-in clients that return them) against fedprompt's ``FOCoOpServer`` (global torch stream seeded with the
  2-means seed fedprompt derives). Plumbing: OpenAI's ``clip`` package (as above), ``clip.load`` returning the tiny
  CLIP (the release loads ViT-B/16 from the internet to mine words), ``.cuda()`` calls kept on the CPU,
  ``sklearn.metrics`` stand-ins (imported; only its accuracy log calls one), the release's fp16 cast of the
  calibrated global prompt made the identity (fp32 comparison), the loss the release backpropagates recorded at
  ``Tensor.backward``.

The script prints the largest absolute difference of each quantity and fails (exit status 1) above ``--tol``
(1e-5). A missing mirror skips its method with a line saying so.

    python benchmarks/parity_official_2025.py
    python benchmarks/parity_official_2025.py --mirror /path/to/mirrors --methods FedMVP
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from parity_official_pfl import import_official, tiny_clip, trainer_method  # noqa: E402
from parity_text_baselines import CLASSES, cpu_only, extract, fedprompt_backbone, fedprompt_step, images, ns, \
    parity_main, perturb_, report, run_checks, sgd  # noqa: E402
from parity_text_baselines import tiny_clip as tiny_clip_plain  # noqa: E402
from parity_text_baselines import import_official as import_plain  # noqa: E402
from fedprompt.methods import FOCoOp, FedAPT, FedMVP, FedPHA  # noqa: E402
from fedprompt.methods.base import total_loss  # noqa: E402

#: method -> (mirror folder, model file; FedAPT, FOCoOp: the folder their code runs from)
REPOS = {
    "FedAPT": ("leondada+FedAPT", "supervised"),
    "FOCoOp": ("PengyangZhou+FOCoOp", ""),
    "FedPHA": ("CYFang6+FedPHA", "trainers/GL_SVDMSE.py"),
    "FedPHA-HE": ("CYFang6+FedPHA", "trainers/GL_SVDMSE_HE.py"),
    "FedMVP": ("mainaksingha01+FedMVP", "model/FedMVP.py"),
    "FedMVP-LoRA": ("mainaksingha01+FedMVP", "model/FedMVP.py"),
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
    return total_loss(losses).detach()


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


def mvp_release(root: Path, seed: int, folder: Path):
    """The release's module and ``FedMVP`` model on a random CLIP, with the plumbing above, and fedprompt's backbone
    of the same CLIP; the generated ``attributes/pacs.json`` in ``folder`` (the release's working folder)."""
    clip, module = import_plain(root, REPOS["FedMVP"][1], install_mvp_stubs, "model")
    clip_model = mvp_clip(clip, seed)
    attributes = folder / "attributes" / "pacs.json"
    attributes.parent.mkdir()
    attributes.write_text(json.dumps({name: ATTRIBUTES[k % 2: k % 2 + 4] for k, name in enumerate(CLASSES)}))
    torch.manual_seed(seed)
    official = module.FedMVP(ns(MODEL=ns(N_CTX=4)), clip_model, device="cpu")
    official.image_encoder = module.ImageEncoder(clip_model.visual)  # the release's forward uses it
    learner = official.prompt_learner.float()  # the release casts the PromptFormer to fp16
    module.flip_transform = module.transforms.RandomHorizontalFlip(p=1.0)
    perturb_(list(learner.linear.parameters()) + list(learner.crossattn.parameters()), seed, scale=0.05)
    return module, fedprompt_backbone(clip_model), official, attributes


def parity_fedmvp(root: Path, tol: float, seed: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="fedmvp-attributes-") as folder:
        module, backbone, official, attributes = mvp_release(root, seed, Path(folder))
        learner = official.prompt_learner
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


def official_mvp_step(module, root: Path, official, image, label, logits: list | None = None) -> torch.Tensor:
    """The release's ``Client.forward_backward`` (its loss; its training logits appended to ``logits``) and one SGD
    step over the prompt learner, as its ``model_backward_and_update`` (SGD skips what has no gradient)."""
    forward_backward = trainer_method(module, root / "federated" / "client.py", "Client", "forward_backward")
    parse_batch = trainer_method(module, root / "federated" / "client.py", "Client", "parse_batch")
    kept = [] if logits is None else logits
    forward_backward.__globals__["compute_accuracy"] = lambda output, label: [kept.append(output.detach()) or torch.zeros(())]
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


#: fedprompt's LoRA factors (``lora_factors.<role>``: ``A`` [r, width], ``B`` [width, r]) -> the release's
#: (``CrossLoRAparams``: ``A`` [width, r], ``B`` [r, width]; transposed)
MVP_LORA = {"query": ("cross_queryA", "cross_queryB"), "key": ("cross_keyA", "cross_keyB"),
            "value": ("cross_valueA", "cross_valueB")}


def release_params(learner, client) -> dict:
    """fedprompt's parameter (name as in ``client.named_parameters()``) -> the release's as fedprompt lays it out
    (cross-attention, context map, LoRA factors transposed)."""
    attend, feed = learner.crossattn.cross_attend_blocks
    sources = {"context": learner.linear, "norm_queries": attend.norm, "norm_context": attend.norm_context,
               "attn": attend.fn, "ff": feed.net}
    out = {f"former.{name}.{key}": param for name, source in sources.items()
           for key, param in source.named_parameters()}
    lora = dict(learner.cross_loraparams.named_parameters())
    for role, (a, b) in MVP_LORA.items():
        out[f"lora_factors.{role}.A"], out[f"lora_factors.{role}.B"] = lora[a], lora[b]
    mine = dict(client.named_parameters())
    assert set(out) == set(mine), sorted(set(out) ^ set(mine))
    return out


def as_mine(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A release tensor laid out as fedprompt's (the LoRA factors transposed)."""
    return tensor.t() if name.startswith("lora_factors.") else tensor


def release_switch(learner, on: bool) -> None:
    """The release's switch (``federated/client.py:96-101``): with LoRA the cross-attention is frozen and the LoRA
    factors train; without, the other way round (``build_model``)."""
    for param in learner.crossattn.parameters():
        param.requires_grad_(not on)
    for param in learner.cross_loraparams.parameters():
        param.requires_grad_(on)
    learner.use_lora = on


def parity_fedmvp_lora(root: Path, tol: float, seed: int) -> bool:
    """Two clients in ONE lock-step step, client 0 switched to LoRA and client 1 not, against the release's two
    separate steps from the same start: training logits, losses, the trained parameters' gradients, every
    PromptFormer parameter after the step (the held ones unchanged)."""
    with tempfile.TemporaryDirectory(prefix="fedmvp-attributes-") as folder:
        module, backbone, official, attributes = mvp_release(root, seed, Path(folder))
        learner = official.prompt_learner
        start = {k: v.detach().clone() for k, v in learner.state_dict().items()}
        client = FedMVP(attributes=str(attributes), flip_probability=1.0, weight_decay=5e-4,
                        lora_threshold=0.5).build_client(backbone, CLASSES, slots=2)
        theirs = release_params(learner, client)
        mine = dict(client.named_parameters())
        with torch.no_grad():
            for name, param in mine.items():
                param.copy_(as_mine(name, theirs[name].detach()).expand_as(param))
            client.lora_on.copy_(torch.tensor([1.0, 0.0]))  # client 0 switched in an earlier round
        client.on_round_start(None)
        pictures = [images(backbone, 3 + k, seed + 10 * k) for k in range(2)]
        pictures = [(torch.nn.functional.interpolate(x, size=64), y) for x, y in pictures]
        batch = lockstep_batch([x for x, _ in pictures], [y for _, y in pictures])
        client.train()
        with torch.no_grad():
            logits_f = client(batch)
        loss_f = lockstep_step(client, batch)
        after = {name: param.detach() for name, param in mine.items()}
        pairs, cwd = {}, os.getcwd()
        os.chdir(folder)
        try:
            for k, (x, y) in enumerate(pictures):  # the release: one client after the other, each from the start
                learner.load_state_dict(start)
                learner.zero_grad(set_to_none=True)
                release_switch(learner, on=k == 0)
                logits_o = []
                loss_o = official_mvp_step(module, root, official, x, y, logits_o)
                rows = slice(0, 3) if k == 0 else slice(3, 7)
                trained = [n for n, p in theirs.items() if p.grad is not None]
                pairs[f"logits {k}"] = (logits_o[0], logits_f[rows])
                pairs[f"loss {k}"] = (loss_o, loss_f[k])
                pairs[f"grads {k}"] = (torch.cat([as_mine(n, theirs[n].grad).flatten() for n in trained]),
                                       torch.cat([mine[n].grad[k].flatten() for n in trained]))
                pairs[f"params after step {k}"] = (
                    torch.cat([as_mine(n, p.detach()).flatten() for n, p in theirs.items()]),
                    torch.cat([after[n][k].flatten() for n in theirs]))
        finally:
            os.chdir(cwd)
    return report("FedMVP-LoRA", pairs, tol, " (client 0 LoRA, client 1 not, one lock-step step)")


# ------------------------------------------------------------------------------------------- FedAPT, FOCoOp
#: the repository whose copy of OpenAI's ``clip`` package stands in for the pip package FedAPT and FOCoOp import
CLIP_REPO = "KaiyangZhou+CoOp"


def import_files(root: Path, modules: list[str], stubs=None) -> list:
    """``modules`` (dotted names under ``root``) imported fresh with ``root`` on the path, after ``stubs()``."""
    prefixes = tuple({m.split(".")[0] for m in modules} | {"clip"})
    for name in [m for m in sys.modules if m.split(".")[0] in prefixes]:
        del sys.modules[name]
    if stubs is not None:
        stubs()
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():  # the release compares with a literal by identity (server_focoop.py:139)
            warnings.simplefilter("ignore", SyntaxWarning)
            return [importlib.import_module(m) for m in modules]
    finally:
        sys.path.remove(str(root))


def apt_clip(clip, seed: int):
    """A random-init CLIP with the widths the release hard-codes: joint 512, 224 px (patch 32, one vision layer of
    width 64), text one layer of width 64."""
    torch.manual_seed(seed)
    model = clip.model.CLIP(512, 224, 1, 64, 32, 77, 49408, 64, 1, 1)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    return model.float().eval()


def apt_models(queryv2, clip_model, keys: torch.Tensor, temperature: float, seed: int):
    """The release's server model and one client model per domain of :data:`APT_DOMAINS` (fp32, explicit keys)."""
    torch.manual_seed(seed)
    with cpu_only(), contextlib.redirect_stdout(io.StringIO()):
        server = queryv2.CustomCLIP_server(CLASSES, clip_model, 4, len(keys), keys, tempr=temperature)
        clients = [queryv2.CustomCLIP_client(CLASSES, clip_model, 4, len(keys), keys[d]) for d in APT_DOMAINS]
    perturb_([server.prompt_learner.ctx_global], seed, scale=0.2)
    for model in [server, *clients]:
        model.cquery.float()  # the release casts the query layer to fp16
    server.prompt_learner.keys = keys
    for model, d in zip(clients, APT_DOMAINS):
        model.keys = keys[d]
        model.prompt_learner.load_state_dict(server.prompt_learner.state_dict())
        model.cquery.load_state_dict(server.cquery.state_dict())
    return server, clients


#: FedAPT: the two clients' domains (of three keys)
APT_DOMAINS = (0, 2)


def parity_fedapt(root: Path, tol: float, seed: int) -> bool:
    clip, queryv2, utils = import_files(root, ["clip", "PromptModels.clip_queryv2", "utils"])
    clip_model = apt_clip(clip, seed)
    keys = torch.rand(3, 4, clip_model.ln_final.weight.shape[0], generator=torch.Generator().manual_seed(seed))
    server, clients = apt_models(queryv2, clip_model, keys, 0.5, seed)
    method = FedAPT(n_ctx=4, num_domains=3, temperature=0.5)
    mine = method.build_client(fedprompt_backbone(clip_model), CLASSES, slots=len(APT_DOMAINS))
    for k, d in enumerate(APT_DOMAINS):
        mine.load_slot(k, {"prompt.ctx": server.prompt_learner.ctx_global.detach(),
                           "query.weight": server.cquery.weight.detach(), "domain": torch.tensor(d)})
    mine.keys.copy_(keys)
    pictures = [images(mine.backbone, 3 + k, seed + 10 * k) for k in range(len(APT_DOMAINS))]
    batch = lockstep_batch([x for x, _ in pictures], [y for _, y in pictures])
    with torch.no_grad():
        server_logits = torch.cat([server(x) for x, _ in pictures])
        own = [model(x) for model, (x, _) in zip(clients, pictures)]
    mine.eval()
    pairs = {"server logits (key mixture)": (server_logits, mine.predict_logits(batch))}
    method.eval_prompt = "own"
    pairs["client logits (own key)"] = (torch.cat([o[1] for o in own]), mine.predict_logits(batch))
    pairs["domain scores"] = (torch.cat([o[0] for o in own]), apt_scores(mine, batch))
    loss_f = lockstep_step(mine, batch, lr=0.01)
    for k, (model, (x, y)) in enumerate(zip(clients, pictures)):
        loss_o = official_apt_step(utils, model, x, y, APT_DOMAINS[k])
        state = mine.slot_state(k)
        pairs[f"loss client {k}"] = (loss_o, loss_f[k])
        pairs[f"grad ctx {k}"] = (model.prompt_learner.ctx_global.grad, mine.prompt.ctx.grad[k])
        pairs[f"grad query {k}"] = (model.cquery.weight.grad, mine.query.weight.grad[k])
        pairs[f"after step {k}"] = (torch.cat([model.prompt_learner.ctx_global.detach().flatten(),
                                               model.cquery.weight.detach().flatten()]),
                                    torch.cat([state["prompt.ctx"].flatten(), state["query.weight"].flatten()]))
    return report("FedAPT", pairs, tol, f" (domains {APT_DOMAINS} of 3, one lock-step step)")


def apt_scores(client, batch: dict) -> torch.Tensor:
    """fedprompt's domain scores of a lock-step batch (each image through its own client's query layer)."""
    with torch.no_grad(), client.stepping_for(batch):
        return client.domain_scores(client.image_features(batch))


def official_apt_step(utils, model, image, label, domain: int) -> torch.Tensor:
    """One step as ``supervised/prompt-ours.py`` takes it (lines 130-140): the release's ``make_optimizer``, the
    client model's two outputs, CE(classes) + CE(domain scores, the client's domain), backward, step."""
    optimizer = utils.make_optimizer(model.prompt_learner, model.cquery, base_lr=0.01)
    optimizer.zero_grad()
    out_dom, out_cls = model(image, True)
    loss = F.cross_entropy(out_cls, label) + F.cross_entropy(out_dom, label * 0 + domain)
    loss.backward()
    optimizer.step()
    return loss.detach()


#: FOCoOp: OOD prompts (words) and the WordNet files (and lines of each) the parity's word lists are cut from
FOC_NEGATIVES = 6
FOC_WORD_FILES = {"adj.all.txt": 120, "noun.object.txt": 80, "noun.artifact.txt": 80}


def write_word_lists(txtfiles: Path, into: Path) -> None:
    """A small subset of the release's WordNet lists (the first lines of a few files, one spelling per lower-cased
    word, so that no two candidates share a sentence), written to ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    seen = {c.lower() for c in CLASSES}
    for name, lines in FOC_WORD_FILES.items():
        words = []
        for word in (txtfiles / name).read_text().splitlines()[:lines]:
            if word.strip() and word.lower() not in seen:
                seen.add(word.lower())
                words.append(word)
        (into / name).write_text("\n".join(words) + "\n")


def install_foc_stubs() -> None:
    """``sklearn.metrics`` (imported by the release; its accuracy log calls ``accuracy_score``)."""
    metrics = types.ModuleType("sklearn.metrics")
    metrics.accuracy_score = lambda y_true, y_pred: 0.0
    metrics.det_curve = metrics.roc_auc_score = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not used"))
    sys.modules["sklearn"] = types.ModuleType("sklearn")
    sys.modules["sklearn.metrics"] = metrics


def foc_official(root: Path, words: Path, clip_model_of, seed: int):
    """The release's modules, its ``src/txtfiles`` replaced by ``words``, and its ``FOCoOpCLIP`` (its OOD words
    mined by the release with the tiny CLIP) with perturbed prompts."""
    txtfiles = root / "src" / "txtfiles"
    shutil.rmtree(txtfiles)
    shutil.copytree(words, txtfiles)
    clip, model_mod, client_mod, server_mod = import_files(
        root, ["clip", "src.models.clip_focoop", "src.algorithms.FOCoOp.client_focoop",
               "src.algorithms.FOCoOp.server_focoop"], install_foc_stubs)
    clip_model = clip_model_of(clip)
    clip.load = lambda *args, **kwargs: (clip_model, None)  # the release mines with a downloaded ViT-B/16
    args = {"num_ctx": 4, "ctx_init": None, "ctx_position": "end", "class_specific_context": True,
            "dataset": "parity", "frac": foc_defaults(root).frac, "num_prompt": 1, "num_ex_prompt": FOC_NEGATIVES,
            "prompttype": "dis_aware", "device": "cpu"}
    work = root / "work"
    work.mkdir(exist_ok=True)
    shutil.rmtree(root / "data", ignore_errors=True)  # the release's cache of the words mined with another CLIP
    cwd = os.getcwd()
    os.chdir(work)  # the release caches the mined words under ../data/
    try:
        torch.manual_seed(seed)
        with cpu_only(), contextlib.redirect_stdout(io.StringIO()):
            official = model_mod.FOCoOpCLIP(args, CLASSES, clip_model)
    finally:
        os.chdir(cwd)
    learner = official.prompt_learner
    perturb_([learner.ctx_local, learner.ctx_global, learner.ctx_ood], seed, scale=0.2)
    return client_mod, server_mod, clip_model, official


def foc_defaults(root: Path) -> types.SimpleNamespace:
    """The release's command-line defaults (its ``config.py`` parser on no arguments)."""
    spec = importlib.util.spec_from_file_location("official_focoop_config", root / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser.parse_args([])


def foc_client_args(official, cid: int, defaults) -> dict:
    """The client arguments of ``main_fpl.py`` from the release's defaults (one batch; the learning rate of the
    comparison; ``dro`` on, as the paper's method)."""
    return {"cid": cid, "device": "cpu", "epochs": 1, "backbone": official, "learning_rate": 0.002,
            "momentum": defaults.momentum, "weight_decay": defaults.weight_decay, "batch_size": defaults.batch_size,
            "num_workers": 0, "pin_memory": False, "train_id_dataset": [None], "num_prompt": defaults.num_prompt,
            "n_cls": len(CLASSES), "num_ex_prompt": FOC_NEGATIVES, "gamma_1": defaults.gamma_1,
            "gamma_2": defaults.gamma_2, "tau": defaults.tau, "dro": True}


@contextlib.contextmanager
def recorded_backward(into: list):
    """Record every tensor ``backward`` is called on (the loss the release's training loop backpropagates)."""
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        into.append(self.detach().clone())
        return original(self, *args, **kwargs)

    torch.Tensor.backward = backward
    try:
        yield into
    finally:
        torch.Tensor.backward = original


def official_foc_train(root: Path, client_mod, official, cid: int, image, label, seed: int):
    """The release's ``FOCoOpClient.train`` of client ``cid`` on one batch (global stream seeded with ``seed``):
    the client, the loss it backpropagated and its upload."""
    with contextlib.redirect_stdout(io.StringIO()):
        client = client_mod.FOCoOpClient(foc_client_args(official, cid, foc_defaults(root)))
    client.train_id_dataloader = [(image, label)]
    torch.manual_seed(seed)
    with recorded_backward([]) as losses, contextlib.redirect_stdout(io.StringIO()):
        report_ = client.train()
    return client, losses[-1], report_["backbone"]


def parity_focoop(root: Path, tol: float, seed: int) -> bool:
    words = root / "parity-words"
    write_word_lists(root / "src" / "txtfiles", words)
    client_mod, server_mod, clip_model, official = foc_official(root, words, lambda clip: foc_clip(clip, seed), seed)
    method = FOCoOp(negative_words=str(words), n_ctx=4, num_negatives=FOC_NEGATIVES, compat="official")
    mine = method.build_client(fedprompt_backbone(clip_model), CLASSES, slots=2)
    learner = official.prompt_learner
    start = {"local_prompt.ctx": learner.ctx_local, "global_prompt.ctx": learner.ctx_global,
             "ood_prompt.ctx": learner.ctx_ood, "gamma": torch.tensor([10.0, 10.0])}
    for k in range(2):
        mine.load_slot(k, {key: value.detach() for key, value in start.items()})
    pairs = {"OOD words (token ids)": foc_word_tokens(official, method.negative_labels(mine.backbone, CLASSES))}
    pictures = [images(mine.backbone, 3 + k, seed + 10 * k) for k in range(2)]
    batch = {**lockstep_batch([x for x, _ in pictures], [y for _, y in pictures]), "seeds": [seed, seed + 1]}
    official.eval()
    with torch.no_grad():
        logits_o = torch.cat([official(x) for x, _ in pictures])
    mine.eval()
    pairs["logits (C + M columns)"] = (logits_o, mine.predict_logits(batch))
    loss_f = lockstep_step(mine, batch, lr=0.002)
    uploads = {}
    for k, (x, y) in enumerate(pictures):
        client, loss_o, uploads[k] = official_foc_train(root, client_mod, official, k, x, y, batch["seeds"][k])
        trained = client.backbone.prompt_learner
        state = mine.slot_state(k)
        pairs[f"loss client {k} (relative)"] = relative(loss_o, loss_f[k])
        for name, key in (("local", "local_prompt.ctx"), ("global", "global_prompt.ctx"), ("ood", "ood_prompt.ctx")):
            param = getattr(trained, f"ctx_{name}")
            pairs[f"grad {name} {k} (relative)"] = relative(param.grad, mine.get_parameter(key).grad[k])
            pairs[f"{name} after step {k}"] = (param.detach(), state[key])
        gammas = [client.bidro_loss.gamma_1, client.bidro_loss.gamma_2]
        pairs[f"gamma {k}"] = (torch.stack([torch.as_tensor(g).float() for g in gammas]), state["gamma"])
    pairs.update(foc_server_pairs(server_mod, official, method, uploads, seed, foc_defaults(root)))
    return report("FOCoOp", pairs, tol, " (two clients in one lock-step step, then the server's OT calibration)")


def foc_clip(clip, seed: int):
    """The tiny CLIP of the other checks with logit scale e (not e^3): the release's perturbation ascent (four steps
    along normalised gradients) amplifies the fp32 rounding of the text features, and at scale 20 the two codes'
    gradients differ by up to 1.5e-5 of their size (seed 1); at scale e by at most 7e-6 (seeds 0-3)."""
    model = tiny_clip_plain(clip, resnet=False, seed=seed)
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
    return model


def relative(official: torch.Tensor, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both values over the official one's largest magnitude: FOCoOp's perturbed logits make its loss about 10 to
    230 and its gradients up to about 6 on the tiny CLIP, where fp32 rounding alone exceeds 1e-5 in absolute
    terms."""
    scale = official.detach().abs().max().clamp_min(1e-12)
    return official / scale, mine / scale


def foc_word_tokens(official, words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's tokenised OOD sentences and those of fedprompt's mined ``words`` (equal iff the same words in
    the same order)."""
    learner = official.prompt_learner
    sentences = [f"{learner.ood_prompt_prefix} {word}." for word in words]
    return learner.tokenized_prompts[learner.n_cls:].float(), sys.modules["clip"].tokenize(sentences).float()


def foc_server_pairs(server_mod, official, method, uploads: dict, seed: int, defaults) -> dict:
    """The release's ``FOCoOpServer.fit`` on stand-in clients returning ``uploads`` (loader lengths 2 and 3: its
    batch-count weights) against fedprompt's server with the same weights."""
    sizes = {0: 2, 1: 3}

    class Client:  # a stand-in: the release's server only calls these
        def __init__(self, cid):
            self.cid, self.train_id_dataloader = cid, [None] * sizes[cid]
            self.backbone = types.SimpleNamespace(load_state_dict=lambda state, strict=False: None)

        def train(self):
            return {"backbone": uploads[self.cid], "acc": 0.0}

    args = {"join_ratio": 1.0, "checkpoint_path": "", "backbone": official, "device": "cpu", "debug": True,
            "num_workers": 0, "ema": defaults.ema, "num_ex_prompt": FOC_NEGATIVES, "uot": True}
    server = server_mod.FOCoOpServer(args)
    server.clients = [Client(0), Client(1)]
    aggregator = method.build_aggregator()
    aggregator.seed = seed
    torch.manual_seed(aggregator.kmeans_seed(1))
    half = torch.Tensor.half
    torch.Tensor.half = lambda self, *a, **k: self  # the release's fp16 cast of the new global prompts
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            server.fit()
    finally:
        torch.Tensor.half = half
    keys = {"prompt_learner.ctx_global": "global_prompt.ctx", "prompt_learner.ctx_ood": "ood_prompt.ctx"}
    mine = aggregator.aggregate({cid: {keys[k]: v for k, v in upload.items()} for cid, upload in uploads.items()},
                                sizes, 1)
    theirs = server.global_net_state
    return {"server global prompts": (theirs["prompt_learner.ctx_global"], mine["global_prompt.ctx"]),
            "server OOD prompts": (theirs["prompt_learner.ctx_ood"], mine["ood_prompt.ctx"])}


PARITY = {"FedPHA": parity_fedpha, "FedPHA-HE": parity_fedpha_he, "FedMVP": parity_fedmvp,
          "FedMVP-LoRA": parity_fedmvp_lora, "FedAPT": parity_fedapt,
          "FOCoOp": parity_focoop}


def _extract_repo(method: str, mirror: Path, folder: Path):
    repo, subtree = REPOS[method][0], REPOS[method][1]
    if not (mirror / repo / "repo").is_dir():
        return repo, None
    if method not in ("FedAPT", "FOCoOp"):
        return repo, extract(mirror, repo, "", folder)
    if not (mirror / CLIP_REPO / "repo").is_dir():  # they import OpenAI's pip package, not in their repositories
        return CLIP_REPO, None
    root = extract(mirror, repo, subtree, folder)
    extract(mirror, CLIP_REPO, "clip", root)
    return repo, root


#: ``run(methods=None, mirror=None, tol=1e-5, seeds=(0, 1))``: the parity checks; ``None`` for an absent mirror
run = functools.partial(run_checks, PARITY, _extract_repo)
main = functools.partial(parity_main, __doc__.split("\n\n")[0], PARITY, run)


if __name__ == "__main__":
    sys.exit(main())
