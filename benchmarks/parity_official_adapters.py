"""Parity of fedprompt's FedLoRA, FedCLIP and pFedMMA clients with the official code, on the same random CLIP weights.

The official repositories (MaxZanella/CLIP-LoRA, shihaohou/FedPuReL, microsoft/PersonalizedFL ``fedclip/``,
sajjad-ucsb/pFedMMA) are read at run time from local git mirrors (``--mirror``, default ``$FEDPROMPT_MIRROR`` or
``/work/.mirror``, holding ``<owner>+<name>/repo``); nothing of them is copied into fedprompt. Each repository is
extracted into a temporary folder and its own modules are imported from there, unmodified.

- **CLIP-LoRA** (the reference for the LoRA math): the repository's own ``clip.model.CLIP`` (random, a 2-layer ViT and
  a 2-layer text transformer, 2 heads each) with its ``loralib.utils.apply_lora`` (both towers, q k v, every block,
  rank 2, alpha 1: its ``PlainMultiheadAttentionLoRA`` and ``LinearLoRA``); the training step of ``lora.py:94-122``
  written out in fp32 (the text of ``"a photo of a {}."`` through ``encode_text``, ``100 * cos``, cross-entropy, one
  ``torch.optim.AdamW`` step with its weight decay 1e-2), since ``run_lora`` itself needs CUDA, data loaders and a
  GradScaler; the evaluation logits in ``eval()`` mode, where the release merges ``s B A`` into the weights.
- **FedPuReL's LoRA baseline**: its ``trainers/purelLora.py`` ``CustomCLIP`` on its ``clip`` with its ``loralib``
  (vision tower only, rank 8, alpha 16, the fixed "a photo of a {class}." text, CLIP's own logit scale), and its
  ``ClipLora.forward_backward`` on a stand-in trainer whose update is one SGD step (momentum 0.9, weight decay 5e-4).
- **FedCLIP**: ``fedclip/methods/fed_at_clip.py``'s ``train`` (the in-batch contrastive loss and its Adam step, lr
  5e-5, betas 0.9 / 0.98, eps 1e-6, weight decay 0.2, as its main builds it) and ``ClipModelat.initdgatal`` (the
  adapter), on fedprompt's tiny open_clip CLIP (the release loads OpenAI CLIP with ``clip.load``: the ``clip`` module is
  a stand-in whose ``tokenize`` is open_clip's, the same BPE); the evaluation probabilities from its
  ``utils/clip_util.py`` (``get_similarity``: softmax of ``100 * cos``), the tiny model's logit scale set to 100 so
  that both sides use it. The release's ``train`` returns nothing: its loss is read from the tensor it calls
  ``backward`` on.
- **pFedMMA**: its ``trainers/pFedMMA.py`` ``CustomCLIP`` on its modified ``clip.model.CLIP`` (adapters at layers
  1 .. 2, m = 8, scale 0.1 and the release's 0.001), its ``pFedMMA.forward_backward`` with PREC fp32 on a stand-in
  trainer whose update is one SGD step (momentum 0.9, weight decay 5e-4). The CLIP weights are frozen as its
  ``build_model`` does.

What is stubbed (plumbing only): Dassl (``Dassl.dassl.*``: the trainers import it for their training loop; a stand-in
trainer object supplies ``model_backward_and_update``, ``parse_batch_train``'s device and the batch counters), the
``clip`` package for FedCLIP (above), ``.cuda()`` is never reached (everything runs on the CPU in fp32). LoRA dropout
is 0 in every comparison (the masks of two random streams cannot be aligned); fedprompt's dropout is tested on its
own (``tests/test_adapters.py``). The LoRA ``B`` factors and every adapter are perturbed at random so that nothing
sits at its initial value (``B = 0`` would leave ``A`` without a gradient).

Each comparison prints the largest absolute difference of the logits, the loss, the gradients and the parameters
after one step, and fails (exit status 1) above ``--tol`` (1e-5). A missing mirror skips its method with a line.

    python benchmarks/parity_official_adapters.py
    python benchmarks/parity_official_adapters.py --methods CLIP-LoRA FedCLIP
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from parity_official_pfl import evaluation_logits, install_dassl_stubs, stand_in_step  # noqa: E402
from parity_text_baselines import CLASSES, default_mirror, fedprompt_step, images, ns, parity_main, perturb_, \
    report, run_checks  # noqa: E402
from parity_text_baselines import fedprompt_backbone as truncating_backbone  # noqa: E402
from fedprompt.methods import FedCLIP, FedLoRA, PFedMMA  # noqa: E402

#: method -> (mirror folder, the paths of the repository that are extracted: code only, no pictures)
REPOS = {"CLIP-LoRA": ("MaxZanella+CLIP-LoRA", ("clip", "loralib")),
         "FedPuReL-LoRA": ("shihaohou+FedPuReL", ("clip", "loralib", "trainers/purelLora.py")),
         "FedCLIP": ("microsoft+PersonalizedFL", ("fedclip/methods", "fedclip/nets", "fedclip/utils")),
         "pFedMMA": ("sajjad-ucsb+pFedMMA", ("clip", "trainers/pFedMMA.py"))}
#: the logit scale of the CLIP-LoRA and FedCLIP comparisons: the releases use 100 (CLIP-LoRA's fixed value, OpenAI
#: CLIP's own), at which one fp32 rounding step of a logit is already 8e-6, so the comparison would measure that
TAU = 20.0
#: top-level module names the repositories define (cleared before each import)
OFFICIAL_MODULES = ("clip", "loralib", "trainers", "utils", "nets", "methods", "Dassl", "official_")


# -------------------------------------------------------------------------------------------- the official code
def extract_paths(mirror: Path, repo: str, paths: tuple[str, ...], into: Path) -> Path:
    """``paths`` of the mirror's HEAD, extracted into ``into`` (the mirrors may lack large binary files, so only the
    code is taken); returns ``into``."""
    git_dir = mirror / repo / "repo"
    data = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD", *paths], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def fresh_import(root: Path, names: list[str], stubs=None) -> list[types.ModuleType]:
    """The modules ``names`` imported from ``root`` (any earlier repository's modules of the same names dropped),
    after ``stubs()`` installed the stand-ins they import."""
    for name in [m for m in sys.modules if m.split(".")[0] in OFFICIAL_MODULES or m.startswith("official_")]:
        del sys.modules[name]
    if stubs is not None:
        stubs()
    sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(root))


def tiny_openai_clip(clip, seed: int, *design):
    """A random-init OpenAI CLIP from the repository's ``clip.model.CLIP``: embed 32, 32 px images in 16 px patches,
    a 2-layer ViT of width 128 (2 heads), a 2-layer text transformer of width 128 with 2 heads (``design``: the
    further arguments a repository's CLIP takes, e.g. FedPuReL's ``design_details``)."""
    torch.manual_seed(seed)
    model = clip.model.CLIP(32, 32, 2, 128, 16, 77, 49408, 128, 2, 2, *design)
    with torch.no_grad():  # a logit scale that makes the softmax sharp enough to matter (exp(3) = 20)
        model.logit_scale.fill_(3.0)
    return model.float().eval()


def fedprompt_backbone(official):
    """The official model's weights in fedprompt's frozen backbone, running all 77 text positions as the releases do
    (end-of-text truncation is exact in exact arithmetic and tested on its own; in fp32 it moves the rounding of the
    attention sums, by up to 1e-5 in pFedMMA's 1/s-scaled gradients)."""
    backbone = truncating_backbone(official)
    backbone.truncate = False
    return backbone


def quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its prints swallowed (the releases print every block they touch)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def lora_pairs(model, client, towers: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(official parameter, fedprompt slot-0 view) of every LoRA factor: the release's ``<proj>.w_lora_A`` /
    ``w_lora_B`` of each block's attention, fedprompt's ``lora.<tower>_<block>_<target>.A`` / ``.B``."""
    pairs = {}
    for tower in towers:
        blocks = model.transformer.resblocks if tower == "text" else model.visual.transformer.resblocks
        for i, block in enumerate(blocks):
            for target in ("q", "k", "v"):
                proj = getattr(block.attn, f"{target}_proj")
                ours = client.lora[f"{tower}_{i}_{target}"]
                pairs[f"{tower}_{i}_{target}.A"] = (proj.w_lora_A, ours.A)
                pairs[f"{tower}_{i}_{target}.B"] = (proj.w_lora_B, ours.B)
    return pairs


def load_pairs(pairs: dict) -> None:
    """Copy each official tensor into fedprompt's slot 0."""
    with torch.no_grad():
        for theirs, ours in pairs.values():
            ours[0].copy_(theirs.detach().float())


def pair_report(name: str, tol: float, logits, losses, pairs: dict, note: str = "") -> bool:
    """Report logits, loss, every gradient and every parameter after the step (largest difference of each kind)."""
    grads = (torch.cat([t.grad.flatten() for t, _ in pairs.values()]),
             torch.cat([o.grad[0].flatten() for _, o in pairs.values()]))
    after = (torch.cat([t.detach().flatten() for t, _ in pairs.values()]),
             torch.cat([o.detach()[0].flatten() for _, o in pairs.values()]))
    scale = float(grads[0].abs().max())
    return report(name, {"logits": logits, "loss": losses, "grads": grads, "params after step": after}, tol,
                  f"{note}; largest |grad| {scale:.2g}")


# ------------------------------------------------------------------------------------------------- CLIP-LoRA
def no_lora_dropout(model) -> None:
    """The release's LoRA layers built with dropout 0.25 (so that they take their dropout > 0 path, where
    ``s B A drop(x)`` is computed explicitly), then their ``nn.Dropout`` set to ``p = 0`` (no random masks). (Its
    dropout-0 path merges ``s B A`` into the weight for the forward and subtracts it again through ``.data`` before
    the backward, so the gradient reaching the layer's input misses the update: see
    ``docs/methods-adapters.md``.)"""
    for module in model.modules():
        if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout.p = 0.0


def clip_lora_step(clip, model, params, image, label, lr: float) -> torch.Tensor:
    """CLIP-LoRA's training step (``lora.py:94-122``) in fp32: text of ``template[0]`` through ``encode_text``, both
    features normalised, ``tau * cos`` (the release's tau is 100; :data:`TAU` here), cross-entropy, one AdamW step
    (weight decay 1e-2, betas 0.9 / 0.999)."""
    optimizer = torch.optim.AdamW(params, weight_decay=1e-2, betas=(0.9, 0.999), lr=lr)
    model.train()
    texts = clip.tokenize([f"a photo of a {name.replace('_', ' ')}." for name in CLASSES])
    text = model.encode_text(texts)
    text = text / text.norm(dim=-1, keepdim=True)
    feats = model.encode_image(image)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    loss = F.cross_entropy(TAU * feats @ text.t(), label)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def clip_lora_logits(clip, model, image) -> torch.Tensor:
    """CLIP-LoRA's evaluation logits (``eval()``: the release merges ``s B A`` into the weights, in place), at
    :data:`TAU`."""
    model.eval()
    with torch.no_grad():
        text = model.encode_text(clip.tokenize([f"a photo of a {name}." for name in CLASSES]))
        feats = model.encode_image(image)
    return TAU * F.normalize(feats, dim=-1) @ F.normalize(text, dim=-1).t()


def parity_clip_lora(root: Path, tol: float, seed: int) -> bool:
    clip, utils = fresh_import(root, ["clip", "loralib.utils"])
    model = tiny_openai_clip(clip, seed)
    backbone = fedprompt_backbone(model)
    args = ns(encoder="both", position="all", params=["q", "k", "v"], r=2, alpha=1, dropout_rate=0.25,
              backbone="ViT-B/16")
    quiet(utils.apply_lora, args, model)
    no_lora_dropout(model)
    utils.mark_only_lora_as_trainable(model)
    params = utils.get_lora_parameters(model)
    perturb_(params, seed, scale=0.1)
    lr = 2e-4
    client = FedLoRA(rank=2, alpha=1.0, dropout=0.0, logit_scale=TAU, lr=lr).build_client(backbone, CLASSES)
    pairs = lora_pairs(model, client, ("text", "visual"))
    load_pairs(pairs)
    image, label = images(backbone, 4, seed)
    logits_o = clip_lora_logits(clip, model, image)
    client.eval()
    logits_f = client.predict_logits({"image": image})
    loss_o = clip_lora_step(clip, model, params, image, label, lr)
    loss_f = fedprompt_step(client, image, label, lr=lr)
    return pair_report("CLIP-LoRA", tol, (logits_o, logits_f), (loss_o, loss_f), pairs,
                       " (both towers, q k v, r 2, alpha 1, AdamW)")


# ---------------------------------------------------------------------------------------- FedPuReL's baseline
def install_purel_stubs() -> None:
    """:func:`install_dassl_stubs` plus the further Dassl names ``trainers/purelLora.py`` imports (unused)."""
    install_dassl_stubs()

    def unused(*args, **kwargs):
        raise RuntimeError("the parity check never calls Dassl's training loop")

    def any_name(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return unused

    for name in ("Dassl.dassl.utils", "Dassl.dassl.data"):
        sys.modules.setdefault(name, types.ModuleType(name)).__getattr__ = any_name


def parity_fedpurel(root: Path, tol: float, seed: int) -> bool:
    clip, utils, module = fresh_import(root, ["clip", "loralib.utils", "trainers.purelLora"], install_purel_stubs)
    design = {"trainer": "ClipLora", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0}
    model = tiny_openai_clip(clip, seed, design)  # the design_details of purelLora.py's load_clip_to_cpu
    backbone = fedprompt_backbone(model)
    lora = ns(ENCODER_TYPE="vision", POSITION="all", LORA_PARAMS=["q", "k", "v"], RANK=8, ALPHA=16, DROPOUT=0.25)
    quiet(utils.apply_lora, lora, model)
    no_lora_dropout(model)
    cfg = ns(TRAINER=ns(PROMPTFL=ns(CLASS_TOKEN_POSITION="end", PREC="fp32")), INPUT=ns(SIZE=(32, 32)))
    official = quiet(module.CustomCLIP, cfg, CLASSES, model)
    for name, param in official.named_parameters():  # ClipLora.build_model: only LoRA trains
        param.requires_grad_("lora_" in name)
    params = [p for p in official.parameters() if p.requires_grad]
    perturb_(params, seed, scale=0.02)  # (s = 16 / sqrt 8 = 5.7: the update is large already)
    lr = 1e-3
    client = FedLoRA(encoder="vision", rank=8, alpha=16.0, dropout=0.0, optimizer="sgd", lr=lr, momentum=0.9,
                     weight_decay=5e-4).build_client(backbone, CLASSES)
    pairs = lora_pairs(model, client, ("visual",))
    load_pairs(pairs)
    image, label = images(backbone, 4, seed)
    logits_o, logits_f = evaluation_logits(official, client, image)
    loss_o = stand_in_step(module, root / "trainers" / "purelLora.py", "ClipLora", official, params, image, label,
                           lr)
    loss_f = fedprompt_step(client, image, label, lr=lr)
    return pair_report("FedPuReL", tol, (logits_o, logits_f), (loss_o, loss_f), pairs,
                       " (vision, q k v, r 8, alpha 16, SGD)")


# ---------------------------------------------------------------------------------------------------- FedCLIP
def install_clip_stand_in() -> None:
    """The ``clip`` module the FedCLIP release imports (OpenAI's package): ``tokenize`` is open_clip's (the same BPE);
    ``load`` is never called (the parity builds the model itself)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    def load(*args, **kwargs):
        raise RuntimeError("the parity check builds the CLIP model itself")

    module = types.ModuleType("clip")
    module.tokenize = lambda texts, *a, **k: tokenizer(texts if isinstance(texts, list) else [texts])
    module.load = load
    sys.modules["clip"] = module


def fedclip_backbone():
    """fedprompt's tiny open_clip CLIP (random, not the shared cached one) with its logit scale set to 20 (the
    release trains with CLIP's own scale, 100 for OpenAI's weights: at 100 one fp32 rounding step of a logit is 8e-6,
    and the comparison would measure that)."""
    from fedprompt.backbone import Backbone, load_open_clip

    torch.manual_seed(0)
    backbone = Backbone(load_open_clip("fedprompt-tiny", None), truncate=False)
    with torch.no_grad():
        backbone.model.logit_scale.fill_(math.log(TAU))
    return backbone


def fedclip_official(root: Path, backbone, image, text, label, seed: int):
    """The release's modules and the stand-in of its ``ClipModelat`` (the tiny CLIP and its adapter, built by its own
    ``initdgatal`` after ``set_random_seed``-style seeding), the adapter perturbed at random."""
    (models, fed, clip_util) = fresh_import(root / "fedclip", ["nets.models", "methods.fed_at_clip",
                                                               "utils.clip_util"], install_clip_stand_in)
    stand = ns(device="cpu", model=backbone.model, preprocess=None, freezepy=True, imgadpy=True)
    torch.manual_seed(seed)
    models.ClipModelat.initdgatal(stand, [(image, text, label)])
    perturb_(stand.img_adap.parameters(), seed, scale=0.5)
    return fed, clip_util, stand


def captured_backward(run) -> torch.Tensor:
    """Run ``run()`` and return the (detached) tensor it called ``backward`` on: the release's loss."""
    seen = []
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        seen.append(self.detach().clone())
        return original(self, *args, **kwargs)

    torch.Tensor.backward = backward
    try:
        run()
    finally:
        torch.Tensor.backward = original
    return seen[-1]


def parity_fedclip(root: Path, tol: float, seed: int) -> bool:
    backbone = fedclip_backbone()
    image, label = images(backbone, 4, seed)
    texts = [f"a picture of a {name}" for name in CLASSES]
    install_clip_stand_in()
    tokens = sys.modules["clip"].tokenize(texts)
    fed, clip_util, stand = fedclip_official(root, backbone, image, tokens[label], label, seed)
    lr = 5e-5
    client = FedCLIP(lr=lr).build_client(backbone, CLASSES)
    adapter = stand.img_adap
    pairs = {"fc1.weight": (adapter[0].weight, client.adapter["fc1"].weight),
             "fc1.bias": (adapter[0].bias, client.adapter["fc1"].bias),
             "fc2.weight": (adapter[2].weight, client.adapter["fc2"].weight),
             "fc2.bias": (adapter[2].bias, client.adapter["fc2"].bias)}
    load_pairs(pairs)
    with torch.no_grad():  # the release's test(): its adapter on get_image_features, get_similarity's softmax
        feats = clip_util.get_image_features(image, stand.model, None).float()
        feats = adapter(feats) * feats
        text_feats = clip_util.get_text_features_list(texts, stand.model, device="cpu").float()
        probs_o = clip_util.get_similarity(feats, text_feats)
    client.eval()
    probs_f = torch.softmax(client.predict_logits({"image": image}) * (100.0 / TAU), dim=-1)  # get_similarity's 100
    optimizer = torch.optim.Adam(params=[{"params": adapter.parameters()}], lr=lr, betas=(0.9, 0.98), eps=1e-6,
                                 weight_decay=0.2)  # as the release's main (fed_at_clip.py:171-172)
    loss_o = captured_backward(lambda: fed.train(ns(), stand, [(image, tokens[label], label)], optimizer, "cpu"))
    backbone.model.eval()  # the release's totrain() put the (dropout-free) tiny CLIP in train mode
    loss_f = fedprompt_step(client, image, label, lr=lr)
    return pair_report("FedCLIP", tol, (probs_o, probs_f), (loss_o, loss_f), pairs,
                       " (in-batch contrastive loss, Adam; logits compared as softmax(100 cos))")


# ---------------------------------------------------------------------------------------------------- pFedMMA
def mma_pairs(learner, client, layers) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(official, fedprompt) parameters of the adapters: ``text_adapter[i].down[0]`` / ``.up``,
    ``visual_adapter[i]...``, ``shared_adapter[i][0]``, weights and biases."""
    pairs = {}
    for i in layers:
        for tower in ("text", "visual"):
            theirs = getattr(learner, f"{tower}_adapter")[i]
            ours = getattr(client, f"{tower}_adapter")[str(i)]
            for part, layer in (("down", theirs.down[0]), ("up", theirs.up)):
                pairs[f"{tower}.{i}.{part}.weight"] = (layer.weight, ours[part].weight)
                pairs[f"{tower}.{i}.{part}.bias"] = (layer.bias, ours[part].bias)
        pairs[f"shared.{i}.weight"] = (learner.shared_adapter[i][0].weight, client.shared_adapter[str(i)].weight)
        pairs[f"shared.{i}.bias"] = (learner.shared_adapter[i][0].bias, client.shared_adapter[str(i)].bias)
    return pairs


def parity_pfedmma_at(root: Path, tol: float, seed: int, scale: float) -> bool:
    clip, module = fresh_import(root, ["clip.clip", "trainers.pFedMMA"], install_dassl_stubs)
    model = tiny_openai_clip(sys.modules["clip"], seed)
    backbone = fedprompt_backbone(model)
    start, end, dim, lr = 1, 2, 8, 1e-3
    settings = ns(TEXT_CTX_INIT="a photo of a", ADAPTER_START=start, ADAPTER_END=end, ADAPTER_DIM=dim,
                  ADAPTER_SCALE=scale, PREC="fp32")
    cfg = ns(TRAINER=ns(MMADAPTER=settings), INPUT=ns(SIZE=(32, 32)))
    torch.manual_seed(seed)
    official = module.CustomCLIP(cfg, CLASSES, model)
    for name, param in official.named_parameters():  # pFedMMA.build_model: only the adapters train
        param.requires_grad_(any(k in name for k in ("text_adapter", "visual_adapter", "shared_adapter")))
    learner = official.adapter_learner
    params = [p for p in official.parameters() if p.requires_grad]
    perturb_(params, seed, scale=0.05)
    client = PFedMMA(adapter_start=start, adapter_end=end, adapter_dim=dim, adapter_scale=scale, lr=lr,
                     momentum=0.9, weight_decay=5e-4).build_client(backbone, CLASSES)
    pairs = mma_pairs(learner, client, range(start, end + 1))
    load_pairs(pairs)
    image, label = images(backbone, 4, seed)
    # the first evaluation call: the release computes (then caches) its text features
    logits_o, logits_f = evaluation_logits(official, client, image)
    loss_o = stand_in_step(module, root / "trainers" / "pFedMMA.py", "pFedMMA", official, params, image, label, lr,
                           cfg=cfg)
    loss_f = fedprompt_step(client, image, label, lr=lr)
    return pair_report(f"pFedMMA s={scale:g}", tol, (logits_o, logits_f), (loss_o, loss_f), pairs,
                       " (both towers, layers 1-2, m 8, gradient-scale layers, SGD)")


def parity_pfedmma(root: Path, tol: float, seed: int) -> bool:
    return all([parity_pfedmma_at(root, tol, seed, scale) for scale in (0.1, 0.001)])


PARITY = {"CLIP-LoRA": parity_clip_lora, "FedPuReL-LoRA": parity_fedpurel, "FedCLIP": parity_fedclip,
          "pFedMMA": parity_pfedmma}


def _extract_repo(method: str, mirror: Path, folder: Path):
    repo, paths = REPOS[method]
    return repo, extract_paths(mirror, repo, paths, folder) if (mirror / repo / "repo").is_dir() else None


def run(methods=None, mirror: Path | None = None, tol: float = 1e-5, seeds=(0, 1)) -> dict[str, bool | None]:
    """Run the parity checks (:func:`run_checks`); ``None`` for a method whose mirror is absent. The official
    modules are dropped afterwards, so that another script's repository of the same module names imports afresh."""
    try:
        return run_checks(PARITY, _extract_repo, methods, mirror, tol, seeds)
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in OFFICIAL_MODULES]:
            del sys.modules[name]


main = functools.partial(parity_main, __doc__.split("\n\n")[0], PARITY, run)


if __name__ == "__main__":
    sys.exit(main())
