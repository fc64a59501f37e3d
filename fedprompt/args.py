"""Grouped run settings: the backbone, the federation, local training, evaluation, logging, Fabric and client-level
differential privacy. Attribute
docstrings become the ``--help`` text. A whole run's settings, these groups with the method and the data, are
:class:`fedprompt.run.RunArgs`.

Each dataclass checks the ranges of its numeric fields in ``__post_init__`` (when the command line is parsed,
before any data or model loads): every field out of range is named in one :class:`~fedprompt.errors.FedPromptError`
line. A new field gets its rule by adding one entry to the dataclass's ``__post_init__``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from fedprompt.errors import FedPromptError


def check_ranges(group: str, obj, **rules: tuple) -> None:
    """Raise one :class:`FedPromptError` naming every field of ``obj`` that breaks its rule.

    Each rule is ``field=(low, high)`` with ``low <= value <= high`` (``None``: no bound), or ``field=(low, high,
    "open")`` with ``low < value <= high``. ``None`` values (optional fields left unset) pass.

    Example: ``check_ranges("federation", self, rounds=(1, None), fraction=(0, 1, "open"))``.
    """
    problems = []
    for name, rule in rules.items():
        value = getattr(obj, name)
        if value is None:
            continue
        low, high, *kind = rule
        open_low = kind == ["open"]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = number and not (isinstance(value, float) and math.isnan(value))
        ok = ok and (low is None or (value > low if open_low else value >= low)) and (high is None or value <= high)
        if not ok:
            if high is None:
                wanted = f"> {low}" if open_low else f">= {low}"
            else:
                wanted = f"in ({low}, {high}]" if open_low else f"in [{low}, {high}]"
            problems.append(f"--{group + '.' if group else ''}{name} must be {wanted}, got {value!r}")
    if problems:
        raise FedPromptError("; ".join(problems) + ".")


#: the largest ``seed``: torch's ``manual_seed`` takes at most 2**64 - 1 (and numpy's ``SeedSequence`` nothing
#: negative)
SEED_MAX = 2**64 - 1
#: the largest ``data.seed``: numpy's ``RandomState`` (the official partitions' generator) takes at most 2**32 - 1
DATA_SEED_MAX = 2**32 - 1


def check_seed(flag: str, value, high: int) -> None:
    """``value`` is an integer in ``[0, high]`` (``high``: :data:`SEED_MAX` or :data:`DATA_SEED_MAX`); one line
    naming ``flag`` otherwise."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high
    if not ok:
        limit = "2**64 - 1 (torch's seed range)" if high == SEED_MAX else "2**32 - 1 (numpy's RandomState range)"
        raise FedPromptError(f"{flag} must be an integer from 0 to {limit}, got {value!r}.")


@dataclass
class BackboneArgs:
    """The frozen open_clip backbone shared by every client."""

    model: str = "ViT-B-16"
    """open_clip architecture name (ViT-B-16, ViT-B-32, RN50, fedprompt-tiny, ...) or hf-hub:org/repo."""
    pretrained: Optional[str] = "openai"
    """open_clip pretrained tag (needs network), a local checkpoint file, a local model folder
    (open_clip_config.json + weights), or null for random init."""
    truncate: bool = True
    """Cut prompt batches after the longest sentence (exact; false runs all 77 positions)."""
    cache_dir: Optional[str] = None
    """Download cache for pretrained tags."""


@dataclass
class FederationArgs:
    """The federated protocol."""

    rounds: int = 10
    """Communication rounds."""
    fraction: float = 1.0
    """Fraction of clients sampled each round (seeded, identical on every rank)."""
    all_clients_first_round: bool = True
    """Every client trains in round 1 (FedOTP/FedPGP do this), whatever the fraction."""
    parallel_clients: Union[int, Literal["auto"]] = "auto"
    """Clients trained together in lock-step on one device (K): their batches share one image-tower call, their
    prompts one text-encoder call, and one optimizer step updates all of them; every client's result equals its
    K = 1 result up to float rounding. auto: every client a process trains in a round (at most 32), halved when
    the device runs out of memory."""
    on_client_failure: Literal["raise", "skip"] = "raise"
    """A client whose training fails or whose loss is not finite stops the run (raise; the last checkpoint is
    kept) or is left out of that round's aggregation, listed in metrics.jsonl as failed_clients and named on the
    console (skip)."""
    max_failed_rounds: int = 3
    """With on_client_failure skip: stop after this many consecutive rounds in which every sampled client failed
    (the prompts no longer change)."""
    drop_rate: float = 0.0
    """Stragglers (FLiP's --client_drop_rate): each round, of the n sampled clients only floor((1 - drop_rate) n)
    report, chosen at random (seeded by the run seed and the round, the same on every rank); the others never
    report: they do not train, keep their state and send nothing. metrics.jsonl lists them as dropped_clients."""
    central: bool = False
    """The centralised upper bound: pool every client's train (and validation, test) data into one client and
    train the same method on it, one client every round: local_epochs passes over the pooled data per round, or,
    with local_steps, local_steps x the clients sampled per round (the federation's steps of a round)."""

    def __post_init__(self):
        check_ranges("federation", self, rounds=(1, None), fraction=(0, 1, "open"), max_failed_rounds=(1, None))
        if self.parallel_clients != "auto":
            check_ranges("federation", self, parallel_clients=(1, None))
        rate = self.drop_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise FedPromptError(f"--federation.drop_rate must be in [0, 1), got {rate!r}.")
        if self.central and rate > 0:
            raise FedPromptError(f"--federation.central trains one client, which floor((1 - drop_rate) x 1) = 0 would "
                                 f"drop every round: use drop_rate 0 with central (got {rate}).")


@dataclass
class TrainArgs:
    """Local training on each client."""

    local_epochs: int = 1
    """Passes over the client's train data per round."""
    local_steps: Optional[int] = None
    """If set, exactly this many optimiser steps per round instead of local_epochs."""
    batch_size: int = 32
    """Train batch size (the few-shot scripts use batch size = number of shots)."""
    augment: bool = True
    """Random resized crop + flip on train images (false: the test transform)."""
    feature_cache: bool = False
    """Encode each train image once with the frozen image tower and reuse the outputs (exact: same metrics as the
    uncached run); needs augment: false. Evaluation caches test images by default (eval.feature_cache)."""
    device_augment: bool = False
    """Decode every train image once into a uint8 store and run the augmentation (random resized crop, flip,
    normalisation) batched on the device instead of on CPU workers. Same crop distribution and, for a given crop
    box, Pillow's pixels; but another random stream, and crops come from images shrunk to a shorter side of
    8/7 x the model size (256 px for 224), so metrics differ from the default CPU path by seed noise."""
    compile: bool = False
    """Run the prompt text path as a compiled graph (torch.compile; CUDA graphs on GPUs, so the text layers' many
    small kernels no longer wait on launches). Same features up to float rounding; the first steps of each batch
    shape compile (seconds to a minute). Not measured on a GPU yet: off by default."""
    cache_dir: Optional[str] = "auto"
    """Where decoded images and image-tower features persist between runs (keyed by the weights, the files and the
    transform), so evaluate, a resumed run and the next run of a sweep skip decoding and encoding. auto:
    $FEDPROMPT_CACHE, else ~/.cache/fedprompt; null: memory only."""

    def __post_init__(self):
        check_ranges("train", self, local_epochs=(1, None), local_steps=(1, None), batch_size=(1, None))


@dataclass
class EvalArgs:
    """Evaluation of every client after each evaluated round."""

    every: int = 1
    """Evaluate every N rounds (the last round is always evaluated)."""
    batch_size: int = 128
    """Evaluation batch size."""
    feature_cache: bool = True
    """Encode each test/validation image once per run with the frozen image tower (the test transform is
    deterministic, so this is exact); methods whose image tower holds trained prompts (FedMGP) always run it."""
    select: Literal["last", "val"] = "last"
    """Model selection for summary.json: the last round, or the round with the best mean validation accuracy
    (needs data.validation: true; also keeps checkpoints/best.ckpt). Test accuracy is never used to select."""
    mode: Literal["personal", "global", "dual"] = "personal"
    """personal: each client's prompt on its own test set (cut from the test split with its train label
    proportions: disjoint from its training images), local_acc = the mean over clients. global: the aggregated
    prompt on each training dataset's whole test split (global_acc; methods with personal parts: each client's
    prompt on it, averaged over clients). dual: both, and dual_hm, their harmonic mean."""
    domains: bool = False
    """Also score on each domain's whole test split (multi-domain data such as DomainNet), like the global view:
    domain/<name> per domain and multidomain_acc, their test-size-weighted mean."""
    ood: list[str] = field(default_factory=list)
    """OOD detection, for every method: the out-of-distribution sets, each client's own test images being
    in-distribution. novel: the held-out classes of a base/novel split (data.subsample_classes base); or the name of
    a target of data: Transfer (a dataset read for its test images). A set named here is an OOD set only (no novel
    or unseen accuracy). Rows: ood/<set>/<score>/auroc and /fpr95 (mean over clients), client_ood/... per client."""
    ood_scores: list[Literal["msp", "energy", "mcm", "neglabel"]] = field(
        default_factory=lambda: ["msp", "energy", "mcm"])
    """OOD scores: maximum softmax probability, energy (logsumexp of the logits), MCM (maximum softmax of the
    cosine similarities), NegLabel (the softmax mass of the classes among them and negative labels: the method's own
    (FOCoOp) or eval.ood_negatives words through the method's prompts)."""
    ood_negatives: Optional[str] = None
    """NegLabel's negative labels for methods without their own: WordNet word lists (a folder of adj*.txt /
    noun*.txt files, e.g. FOCoOp's or NegLabel's txtfiles), mined against the class names."""
    ood_negative_count: int = 1000
    """How many negative labels NegLabel mines from eval.ood_negatives (the least similar to the classes)."""
    ood_all_columns: bool = False
    """msp, energy and mcm over every logit column, a method's own negative labels included (FOCoOp's released
    evaluation); false: over the classes only."""

    def __post_init__(self):
        check_ranges("eval", self, every=(1, None), batch_size=(1, None), ood_negative_count=(1, None))
        if len(set(self.ood)) != len(self.ood):
            raise FedPromptError(f"eval.ood names a set twice: {self.ood}")


@dataclass
class LogArgs:
    """Logging, progress bars and checkpoints."""

    logger: Literal["csv", "wandb", "tensorboard", "none"] = "csv"
    """Experiment logger (metrics.jsonl is always written)."""
    project: str = "fedprompt"
    """W&B project."""
    run_name: Optional[str] = None
    """Run name (default: the out_dir folder name)."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """W&B mode (the WANDB_MODE environment variable wins when set)."""
    progress: bool = True
    """Progress bars for rounds and clients."""
    checkpoint_every: int = 0
    """Also keep checkpoints/round-XXXX.ckpt every N rounds (0: only last.ckpt, written every round)."""

    def __post_init__(self):
        check_ranges("log", self, checkpoint_every=(0, None))


#: accelerator and precision names every Lightning 2 release accepts (others are looked up in Lightning itself)
COMMON_ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
COMMON_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64", "bf16", "16")


def lightning_names() -> tuple[list[str], list[str]]:
    """The accelerator and precision names Lightning Fabric accepts: ``auto``, ``gpu`` and its accelerator registry;
    the values of its precision type (``32-true``, ``bf16-mixed``, ..., and the short forms ``32``, ``bf16``)."""
    import typing

    from lightning.fabric import connector
    from lightning.fabric.accelerators import ACCELERATOR_REGISTRY

    accelerators = ["auto", "gpu", *sorted(ACCELERATOR_REGISTRY.available_accelerators())]
    precisions = []
    for literal in typing.get_args(connector._PRECISION_INPUT):  # Lightning's own list of precision values
        precisions += [str(value) for value in typing.get_args(literal)]
    return accelerators, list(dict.fromkeys(precisions))


@dataclass
class FabricArgs:
    """Lightning Fabric: devices, nodes, precision."""

    accelerator: str = "auto"
    """cpu, cuda, gpu, mps, auto (any name of Lightning's accelerator registry)."""
    devices: Union[int, str] = 1
    """Processes per node (one per GPU), or 'auto'."""
    num_nodes: int = 1
    """Nodes (SLURM / torchrun launch)."""
    strategy: str = "auto"
    """auto, ddp (clients spread over processes; gloo on CPU, NCCL on GPU)."""
    precision: str = "32-true"
    """32-true, bf16-mixed (prompts stay fp32) or 16-mixed (any precision Lightning Fabric accepts)."""

    def __post_init__(self):
        check_ranges("fabric", self, num_nodes=(1, None))
        if isinstance(self.devices, int) and not isinstance(self.devices, bool) and self.devices != -1:
            check_ranges("fabric", self, devices=(1, None))  # -1 and strings ('auto', '0,1') are Lightning's
        if self.accelerator in COMMON_ACCELERATORS and str(self.precision) in COMMON_PRECISIONS:
            return  # names every Lightning 2 knows: a help page or a config check imports no Lightning
        accelerators, precisions = lightning_names()
        problems = []
        if self.accelerator not in accelerators:
            problems.append(f"--fabric.accelerator must be one of {', '.join(accelerators)}, got {self.accelerator!r}")
        if str(self.precision) not in precisions:
            problems.append(f"--fabric.precision must be one of {', '.join(precisions)}, got {self.precision!r}")
        if problems:
            raise FedPromptError("; ".join(problems) + ".")


def require_dp_accounting(setting: str) -> None:
    """One :class:`FedPromptError` line naming ``setting`` when the dp-accounting package is not installed."""
    import importlib.util

    if importlib.util.find_spec("dp_accounting") is None:
        raise FedPromptError(f"{setting}: differential privacy needs the dp-accounting package (its RDP accountant): "
                             "pip install 'fedprompt[dp]'.")


@dataclass
class DPArgs:
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018), off unless dp.noise_multiplier or
    dp.target_epsilon is set: each sampled client's update of the shared tensors is clipped to dp.clip_norm (flat L2
    over all of them), the server takes their uniform sum over the expected number of clients and adds Gaussian
    noise of standard deviation noise_multiplier x clip_norm / that number, and dp-accounting's RDP accountant
    reports epsilon at dp.delta after every round (metrics.jsonl key epsilon). With federation.fraction < 1 the
    clients of a round are drawn by Poisson sampling (each with probability fraction), as the bound assumes."""

    noise_multiplier: Optional[float] = None
    """z: the noise standard deviation over the clipping norm (null: calibrated from target_epsilon)."""
    clip_norm: Optional[float] = None
    """S: the L2 bound of each client's update of the shared tensors (the initial bound with adaptive_clipping)."""
    delta: float = 1e-5
    """The delta of the (epsilon, delta) guarantee (take it below 1 / number of clients)."""
    target_epsilon: Optional[float] = None
    """Calibrate noise_multiplier so that epsilon after federation.rounds rounds is this (instead of giving z)."""
    adaptive_clipping: bool = False
    """Adapt clip_norm each round to the target_quantile of the update norms (Andrew et al. 2021: the noised
    fraction of unclipped updates, geometric step); part of the noise budget goes to that count."""
    target_quantile: float = 0.5
    """Adaptive clipping: the fraction of updates meant to stay unclipped (gamma)."""
    clip_lr: float = 0.2
    """Adaptive clipping: the geometric step size eta (C <- C exp(-eta (unclipped fraction - gamma)))."""
    count_stddev: Optional[float] = None
    """Adaptive clipping: the noise standard deviation of the unclipped count (null: expected clients / 20)."""
    sampling: Literal["poisson", "fixed"] = "poisson"
    """How the clients of a round are drawn when federation.fraction < 1: poisson (each client independently; the
    add/remove-one bound) or fixed (the usual fixed-size sample without replacement; the replace-one bound)."""

    def __post_init__(self):
        check_ranges("dp", self, noise_multiplier=(0, None), clip_norm=(0, None, "open"),
                     target_epsilon=(0, None, "open"), target_quantile=(0, 1), clip_lr=(0, None),
                     count_stddev=(0, None, "open"))
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise FedPromptError(f"--dp.delta must be in (0, 1), got {self.delta!r}.")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise FedPromptError("--dp.noise_multiplier and --dp.target_epsilon both set: give one (the noise, or "
                                 "the epsilon to calibrate it from).")
        if self.enabled:
            require_dp_accounting("--dp")

    @property
    def enabled(self) -> bool:
        """Whether client-level DP is on (a noise multiplier or a target epsilon is set)."""
        return self.noise_multiplier is not None or self.target_epsilon is not None
