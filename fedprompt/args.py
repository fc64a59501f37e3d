"""Grouped run settings: the backbone, the federation, local training, evaluation, logging and Fabric. Attribute
docstrings become the ``--help`` text. A whole run's settings, these groups with the method and the data, are
:class:`fedprompt.run.RunArgs`.

Each dataclass checks the ranges of its numeric fields in ``__post_init__`` (when the command line is parsed,
before any data or model loads): every field out of range is named in one :class:`~fedprompt.errors.FedPromptError`
line. A new field gets its rule by adding one entry to the dataclass's ``__post_init__``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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

    def __post_init__(self):
        check_ranges("federation", self, rounds=(1, None), fraction=(0, 1, "open"), max_failed_rounds=(1, None))
        if self.parallel_clients != "auto":
            check_ranges("federation", self, parallel_clients=(1, None))


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

    def __post_init__(self):
        check_ranges("eval", self, every=(1, None), batch_size=(1, None))


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
        if (self.accelerator, str(self.precision)) == ("auto", "32-true"):
            return  # the defaults (valid in every Lightning): a help page imports no Lightning
        accelerators, precisions = lightning_names()
        problems = []
        if self.accelerator not in accelerators:
            problems.append(f"--fabric.accelerator must be one of {', '.join(accelerators)}, got {self.accelerator!r}")
        if str(self.precision) not in precisions:
            problems.append(f"--fabric.precision must be one of {', '.join(precisions)}, got {self.precision!r}")
        if problems:
            raise FedPromptError("; ".join(problems) + ".")
