"""Checkpoints: atomic saves (:func:`fedprompt.files.atomic_write`; the run files' other writes, strict JSON and
crash-safe appends to ``metrics.jsonl`` are in :mod:`fedprompt.files`), safe loading, and the checks that a
checkpoint fits the config that resumes it.

A checkpoint records the run's resolved config (``config``), the method's name and hyperparameters
(``method_hparams``) and the shape of every client state key (``shapes``). :func:`check_resume` compares the first
three with the config that resumes it before anything is loaded: a resumed run is the same run, so every setting
must be the checkpoint's except those of :data:`RESUME_MAY_CHANGE` (default-deny: a setting not listed there, a new
one included, counts as one that changes results). :func:`check_shapes` compares the shapes with the freshly built
client before any state is restored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fedprompt.config_keys import setting_keys
from fedprompt.errors import FedPromptError, warn
# the run files' checked writes and strict JSON live in fedprompt.files (torch-free); re-exported for the run drivers
from fedprompt.files import append_jsonl, atomic_write, read_jsonl, write_json, write_jsonl, write_text  # noqa: F401


@dataclass(frozen=True)
class MayChange:
    """A setting a resumed run may change (see :data:`RESUME_MAY_CHANGE`)."""

    key: str
    """Dotted config key without ``init_args`` (``federation.rounds``); ``group.*`` names every key of a group."""
    why: str
    """Why changing it cannot change the run's numbers (shown in docs/run-folder.md, "Resume", and in the refusal)."""
    when: Callable[[dict, dict], bool] | None = None
    """Only when this holds of the (flattened) checkpoint config and resumed config; ``None``: always."""

    def matches(self, key: str) -> bool:
        return key == self.key or (self.key.endswith(".*") and key.startswith(self.key[:-1]))


def _same_lockstep_groups(saved: dict, now: dict) -> bool:
    return saved.get("federation.parallel_clients") == 1 and now.get("federation.parallel_clients") == 1


#: The settings a resumed run may change: those that cannot change its numbers. Every other setting, including any
#: setting added to fedprompt later (default-deny), must equal the checkpoint's; a difference stops the resume with
#: one line naming each setting and both values. Deliberately not here (they change numbers, if only by float
#: rounding): ``federation.parallel_clients`` (the lock-step group size: K-invariant only up to rounding), ``runtime``
#: (Flower trains one client at a time, Fabric K with ``auto``),
#: ``fabric.accelerator`` and ``fabric.precision``, ``train.compile``, ``backbone.truncate``, the ``eval`` group
#: (evaluation batch size and cache round differently), ``data.root`` (other data), ``data.check_images`` (with
#: ``on_bad_image: skip`` it decides which images are used).
RESUME_MAY_CHANGE: tuple[MayChange, ...] = (
    MayChange("federation.rounds", "the round to reach: a run continues to more rounds (with fewer it is complete)"),
    MayChange("federation.on_client_failure", "what happens at a failure, not what a round computes: a run stopped "
                                              "by a failure (raise) continues leaving failed clients out (skip)"),
    MayChange("federation.max_failed_rounds", "when a run whose clients all fail stops"),
    MayChange("log.*", "logging, progress bars and extra checkpoint files only"),
    MayChange("out_dir", "a resumed run continues in its own folder (checked on its own)"),
    MayChange("resume", "the checkpoint to continue from"),
    MayChange("overwrite", "never together with resume"),
    MayChange("data.num_workers", "DataLoader worker processes: every sample is augmented under its own seed"),
    MayChange("train.cache_dir", "where decoded images and image features persist (a cache hit gives the same "
                                 "tensors)"),
    MayChange("backbone.cache_dir", "the download cache of pretrained weights"),
    MayChange("fabric.devices", "with federation.parallel_clients 1, any number of processes gives bit-identical "
                                "results", _same_lockstep_groups),
    MayChange("fabric.num_nodes", "as fabric.devices", _same_lockstep_groups),
    MayChange("fabric.strategy", "as fabric.devices", _same_lockstep_groups),
)


_ABSENT = object()


def _shown(value) -> str:
    if value is _ABSENT:
        return "not a setting"
    return json.dumps(value, default=str)


def config_differences(saved: dict, now: dict, default_of: Callable[[str], object] | None = None) -> list[str]:
    """``"key: A in the checkpoint, B now"`` for every setting of the resolved config ``now`` that differs from the
    checkpoint's config ``saved`` and may not change on resume (:data:`RESUME_MAY_CHANGE`).

    A setting the checkpoint does not record (added to fedprompt after the run started) may be at its default
    (``default_of(key)``; a default that cannot be told counts as a difference)."""
    fs, fn = setting_keys(saved), setting_keys(now)
    out = []
    for key in sorted(set(fs) | set(fn)):
        a, b = fs.get(key, _ABSENT), fn.get(key, _ABSENT)
        if a is not _ABSENT and b is not _ABSENT and _equal_numbers(a, b):
            continue
        rule = next((r for r in RESUME_MAY_CHANGE if r.matches(key)), None)
        if rule is not None and (rule.when is None or rule.when(fs, fn)):
            continue
        if a is _ABSENT and default_of is not None and _equal_numbers(default_of(key), b):
            continue
        where = "not recorded in the checkpoint" if a is _ABSENT else f"{_shown(a)} in the checkpoint"
        out.append(f"{key}: {where}, {_shown(b)} now")
    return out


def _equal_numbers(a, b) -> bool:
    """Equal values, with 1 and 1.0 equal (a YAML float written as an integer) but not True and 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def resume_rules_text() -> str:
    """The settings a resumed run may change, in one line (for messages)."""
    return ", ".join(rule.key + (" (with federation.parallel_clients 1)" if rule.when else "")
                     for rule in RESUME_MAY_CHANGE if rule.key not in ("out_dir", "resume", "overwrite"))


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Save a checkpoint dict atomically (loadable with ``torch.load(path, weights_only=True)``)."""
    atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a fedprompt checkpoint with ``weights_only=True``; a missing, damaged or foreign file is one clear
    error (never a suggestion to load it unsafely)."""
    path = Path(path)
    if not path.is_file():
        raise FedPromptError(f"--resume: checkpoint file not found: {path}")
    not_ours = (f"--resume: {path} is not a fedprompt checkpoint (or it is damaged); pass the "
                "checkpoints/last.ckpt of a fedprompt run.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's message suggests weights_only=False: never load a foreign file that way
        raise FedPromptError(not_ours) from None
    if not isinstance(state, dict):
        raise FedPromptError(not_ours)
    for key in ("round", "global", "clients"):
        if key not in state:
            raise FedPromptError(f"--resume: {path} is not a fedprompt checkpoint (no '{key}' entry).")
    return state


def state_shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """``{key: shape}`` of a client state (what a checkpoint records as ``shapes``)."""
    return {key: list(value.shape) for key, value in state.items()}


def check_resume(checkpoint: dict, path: str | os.PathLike, method_name: str, hparams: dict,
                 config: dict | None = None, default_of: Callable[[str], object] | None = None) -> None:
    """Before anything loads: the checkpoint must come from the config's method with the same hyperparameters
    (``n_ctx``, ``csc``, ``lr``, ...) and, when it records its run config, with the same settings as ``config``
    (the resolved config resuming it) except those of :data:`RESUME_MAY_CHANGE`: a resumed run continues the same
    run. One line on a mismatch, naming every differing setting with both values."""
    fix = ("resume with the run's own config (leave out --config: it is read from the run's hyperparameters.yaml), "
           "or start a new run with another --out_dir.")
    saved = checkpoint.get("method")
    if saved is not None and saved != method_name:
        raise FedPromptError(f"--resume: {path} is a {saved} checkpoint but the config's method is {method_name}; "
                             + fix)
    saved_hparams = checkpoint.get("method_hparams")
    if saved_hparams is None:  # a checkpoint from before hyperparameters were recorded: shapes are still checked
        return
    changed = [f"{key}={saved_hparams.get(key)!r} in the checkpoint, {hparams.get(key)!r} in the config"
               for key in sorted(set(saved_hparams) | set(hparams)) if saved_hparams.get(key) != hparams.get(key)]
    if changed:
        raise FedPromptError(f"--resume: {path} was trained with other {method_name} settings (method."
                             + "; method.".join(changed) + "); " + fix)
    if config is None:
        return
    saved_config = checkpoint.get("config")
    if saved_config is None:
        warn(f"--resume: {path} records no run config (it was written by an older fedprompt): only its method "
             "settings and prompt shapes are checked; resume it with the run's own settings.")
        return
    differences = config_differences(saved_config, config, default_of)
    if differences:
        raise FedPromptError(f"--resume: {path} was run with other settings ({'; '.join(differences)}); a resumed "
                             "run continues the same run, so only these may change: " + resume_rules_text()
                             + ". Leave out the differing flags (without --config the run's hyperparameters.yaml is "
                             "read), or start a new run with another --out_dir.")


def check_shapes(checkpoint: dict, path: str | os.PathLike, expected: dict[str, list[int]]) -> None:
    """The checkpoint's client states must have exactly the keys and shapes of the client this config builds
    (e.g. the same n_ctx, backbone width and number of classes). One line on a mismatch."""
    clients = checkpoint["clients"]
    saved = checkpoint.get("shapes") or (state_shapes(next(iter(clients.values()))) if clients else {})
    if saved == expected:
        return
    diff = [f"{key}: {saved.get(key)} in the checkpoint, {expected.get(key)} in this config"
            for key in sorted(set(saved) | set(expected)) if saved.get(key) != expected.get(key)]
    raise FedPromptError(f"--resume: the prompt shapes of {path} do not match this config ({'; '.join(diff)}); "
                         "resume with the run's own config (its hyperparameters.yaml: same backbone, data and "
                         "method).")


def require_client_states(states: dict, runtime: str) -> None:
    """One line when a checkpoint holds no client states (a deployed Flower run whose clients keep their own state
    on their nodes: ``report-states`` off) and ``runtime`` has no other place to get them from."""
    if not states:
        raise FedPromptError(f"--resume: the checkpoint holds no client states (a Flower run whose clients keep "
                             f"their own on their nodes: report-states off), and {runtime} has nowhere to get them "
                             "from; continue it as the deployed Flower app, whose nodes still hold them.")
