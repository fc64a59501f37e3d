"""Creating open_clip models: by architecture name plus a pretrained tag, a local checkpoint file or a local model
folder (``open_clip_config.json`` + weights, the layout of open_clip's ``local-dir:``), or an ``hf-hub:`` name.

This module and :mod:`fedprompt.backbone.model` are the only places that touch open_clip. open_clip is imported
when a model is first registered or created, not when this module is imported (the CLI answers ``--help`` without
it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedprompt.errors import FedPromptError
from fedprompt.files import checked_writes, write_text

BUNDLED_CONFIGS = Path(__file__).parent / "configs"
_REGISTERED: set[str] = set()


def _open_clip():
    import open_clip

    return open_clip


def register_bundled_configs() -> None:
    """Register fedprompt's own architecture JSONs (e.g. ``fedprompt-tiny``) with open_clip."""
    for path in sorted(BUNDLED_CONFIGS.glob("*.json")):
        register_model_config(path)


def register_model_config(path: str | os.PathLike) -> str:
    """Register an open_clip architecture JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``); returns its name."""
    path = Path(path)
    if path.stem not in _REGISTERED:
        _open_clip().add_model_config(path)
        _REGISTERED.add(path.stem)
    return path.stem


@dataclass
class LoadedModel:
    """An open_clip model with its tokenizer and preprocessing settings."""

    model: object
    tokenizer: object
    preprocess: dict = field(default_factory=dict)
    name: str = ""
    source: str = ""


def _preprocess_cfg(model) -> dict:
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    cfg.setdefault("size", model.visual.image_size)
    return cfg


def _local_folder_config(folder: Path) -> tuple[str, dict, dict, str | None]:
    """Read a local open_clip model folder; resolve tower paths in its config against the folder."""
    cfg_path = folder / "open_clip_config.json"
    if not cfg_path.is_file():
        raise FedPromptError(
            f"backbone.pretrained: the folder {folder} has no open_clip_config.json. A local model folder must hold "
            "open_clip_config.json (with 'model_cfg') and a weights file such as open_clip_model.safetensors."
        )
    try:
        full = json.loads(cfg_path.read_text())
        model_cfg = full["model_cfg"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise FedPromptError(f"{cfg_path}: not a valid open_clip config ({err!r}); it needs a 'model_cfg' object.")
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = model_cfg.get("text_cfg", {}).get(key)
        if value and not os.path.isabs(value) and (folder / value).exists():
            model_cfg["text_cfg"][key] = str((folder / value).resolve())
    weights = None
    for candidate in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                      "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors"):
        if (folder / candidate).is_file():
            weights = str(folder / candidate)
            break
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
    name = f"fedprompt-local-{folder.name}-{digest}"
    return name, model_cfg, full.get("preprocess_cfg", {}), weights


def _register_dict_config(name: str, model_cfg: dict) -> None:
    if name in _REGISTERED:
        return
    path = Path(tempfile.gettempdir()) / "fedprompt-configs" / f"{name}.json"
    with checked_writes(path, "nothing was written to the run directory; free space in the temporary folder (or set "
                              "TMPDIR to another one), then run the command again."):
        write_text(path, json.dumps(model_cfg))  # atomic: another process may read the same file
    register_model_config(path)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether weights could be downloaded: fail in seconds offline instead of after a minute of retries.

    With ``HF_HUB_OFFLINE=1`` nothing is probed and open_clip's own (cache-only) lookup decides."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download_hint(model: str, pretrained: str) -> str:
    return (
        f"backbone.pretrained: could not download the open_clip weights '{pretrained}' for '{model}' "
        "(no network, or the tag is unknown). Download them on a machine with internet access, e.g. "
        f"python -c \"import open_clip; open_clip.create_model('{model}', pretrained='{pretrained}', "
        "cache_dir='clip-weights')\", copy the .bin/.safetensors file here and pass its path: "
        "--backbone.pretrained /path/to/open_clip_model.safetensors (or a local model folder with "
        "open_clip_config.json)."
    )


def load_open_clip(model: str, pretrained: str | None = None, cache_dir: str | None = None) -> LoadedModel:
    """Create a frozen-ready open_clip model and its tokenizer.

    Args:
        model: an open_clip architecture name (``ViT-B-16``, ``RN50``, ``fedprompt-tiny`` ...) or ``hf-hub:org/repo``.
            Ignored when ``pretrained`` is a local model folder (the folder's config defines the architecture).
        pretrained: ``None`` (random init), an open_clip tag (``openai``, ``laion2b_s34b_b79k``; needs network),
            a checkpoint file (``.bin``/``.pt``/``.safetensors``) or a local model folder.
        cache_dir: where open_clip caches downloaded weights.
    """
    open_clip = _open_clip()
    check_source(model, pretrained)
    if pretrained and os.path.isdir(pretrained):
        name, model_cfg, preprocess, weights = _local_folder_config(Path(pretrained))
        _register_dict_config(name, model_cfg)
        net = _create(name, weights, cache_dir, source=pretrained, pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(name)
        pre = {**_preprocess_cfg(net), **preprocess}
        return LoadedModel(net, tokenizer, pre, name=name, source=pretrained)
    net = _create(model, pretrained, cache_dir, source=pretrained or "random init")
    tokenizer = open_clip.get_tokenizer(model)
    return LoadedModel(net, tokenizer, _preprocess_cfg(net), name=model, source=pretrained or "random init")


def check_source(model: str, pretrained: str | None) -> None:
    """Check, without creating the model, that the weights can be had: a local folder has its config and a weights
    file, a local file exists, the architecture is known, and a pretrained tag is downloadable (the Hugging Face
    Hub answers). Raises one :class:`FedPromptError` saying what to pass instead."""
    register_bundled_configs()
    if pretrained and os.path.isdir(pretrained):
        weights = _local_folder_config(Path(pretrained))[3]
        if weights is None:
            raise FedPromptError(f"backbone.pretrained: the folder {pretrained} has no weights file "
                                 "(open_clip_model.safetensors or open_clip_pytorch_model.bin).")
        weight_shapes(weights)
        return
    if pretrained and not os.path.isfile(pretrained) and ("/" in pretrained or pretrained.endswith(
            (".bin", ".pt", ".pth", ".safetensors"))):
        raise FedPromptError(f"backbone.pretrained: no such file or folder: {pretrained}")
    if pretrained and os.path.isfile(pretrained):
        weight_shapes(pretrained)  # a file of tensors, readable without running code
    known = _open_clip().list_models()
    if not model.startswith("hf-hub:") and model.replace("/", "-") not in known:
        raise FedPromptError(
            f"backbone.model: unknown open_clip architecture '{model}'. Known names include "
            f"{', '.join(known[:8])}, ... (see open_clip.list_models()); or pass a local model "
            "folder as backbone.pretrained."
        )
    if pretrained and not os.path.exists(pretrained) and not _hub_reachable():
        raise FedPromptError(_download_hint(model, pretrained) + " [the Hugging Face Hub is not reachable]")


@contextmanager
def _quiet_logs():
    """open_clip and huggingface_hub log every failed download attempt; fedprompt reports one clear error."""
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ------------------------------------------------------------------------------------------------ weight files
_NOT_WEIGHTS = ("pass an open_clip weights file (.safetensors, or a .bin/.pt/.pth state dict of tensors) or a local "
                "model folder (open_clip_config.json + weights).")
#: globals of a PyTorch checkpoint's pickle that are not "other objects" (torch's tensor rebuilding, OrderedDict)
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the state dict in a local weights file, read without running code: the safetensors
    header, or ``torch.load(weights_only=True, mmap=True)`` (tensors are mapped, not read). A file that is not a
    checkpoint, or whose pickle names other objects than tensors (loading it could run code), is one
    :class:`FedPromptError` line naming the file, and never advice to load it unsafely."""
    import pickle
    import zipfile

    import torch

    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception:  # noqa: BLE001 - safetensors raises its own error types for a damaged header
            raise FedPromptError(f"backbone.pretrained {path} is not a safetensors file (or it is damaged); "
                                 + _NOT_WEIGHTS) from None
    if path.endswith((".npz", ".npy")):  # big_vision (SigLIP) weights: numpy arrays, read by open_clip itself
        return {}
    is_zip = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # torch's notes on old pickle protocols: the file is judged below
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError:
        others = _pickle_globals(path, is_zip)
        if others:
            raise FedPromptError(f"backbone.pretrained {path} holds Python objects other than tensors ({', '.join(others)}): "
                                 "loading it could run code from the file, so fedprompt does not; "
                                 + _NOT_WEIGHTS) from None
        raise FedPromptError(f"backbone.pretrained {path} is not a PyTorch checkpoint (or it is damaged); "
                             + _NOT_WEIGHTS) from None
    except Exception:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ... for a file that is not one
        raise FedPromptError(f"backbone.pretrained {path} is not a PyTorch checkpoint (or it is damaged); "
                             + _NOT_WEIGHTS) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)} \
        if isinstance(state, dict) else {}
    if not shapes:
        raise FedPromptError(f"backbone.pretrained {path} holds no state dict of tensors; " + _NOT_WEIGHTS)
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in shapes.items()}


def _pickle_globals(path: str, is_zip: bool, limit: int = 3) -> list[str]:
    """The objects other than tensors that the pickle of a checkpoint names (read with ``pickletools``, which never
    runs it); empty when the file is not a readable pickle."""
    import pickletools
    import zipfile

    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(name)
        else:
            data = Path(path).read_bytes()
        found, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - not a pickle (random bytes, a damaged archive)
        return []
    others = [g for g in dict.fromkeys(found) if not g.startswith(_TENSOR_GLOBALS)]
    return others[:limit] + ([f"{len(others) - limit} more"] if len(others) > limit else [])


def describe_architecture(shapes: dict[str, tuple[int, ...]]) -> str:
    """A few words on the architecture a state dict is for: the ViT towers' width, depth and patch size and the
    joint embedding size where its keys show them, else its number of tensors and parameters."""
    import math

    def layers(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

    parts = []
    conv = shapes.get("visual.conv1.weight")
    if conv is not None and len(conv) == 4:
        parts.append(f"ViT image tower of width {conv[0]}, {layers('visual.transformer.resblocks.')} layers, patch "
                     f"{conv[-1]}")
    token = shapes.get("token_embedding.weight")
    if token is not None and len(token) == 2:
        parts.append(f"text tower of width {token[1]}, {layers('transformer.resblocks.')} layers")
    projection = shapes.get("text_projection")
    if projection is not None and len(projection) == 2:
        parts.append(f"embedding size {projection[1]}")
    count = sum(math.prod(s) for s in shapes.values())
    return ", ".join(parts) or f"{len(shapes)} tensors, {count / 1e6:.1f}M parameters"


def _architecture_problem(name: str, weights: str) -> str | None:
    """One line when the weights file holds another architecture than ``name`` (keys or shapes differ), naming
    both; ``None`` when they fit (the failure was something else) or cannot be compared."""
    try:
        have = weight_shapes(weights)
        with _quiet_logs():
            model = _open_clip().create_model(name, pretrained=None)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception:  # noqa: BLE001 - then the original error is reported
        return None
    other = [k for k in want if k in have and have[k] != want[k]]
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    if not (other or missing or unexpected):
        return None
    details = []
    if other:
        details.append(f"{len(other)} tensors of another shape (e.g. {other[0]}: {list(have[other[0]])} in the file, "
                       f"{list(want[other[0]])} in {name})")
    if missing:
        details.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} not in {name} (e.g. {unexpected[0]})")
    shown = name if not name.startswith("fedprompt-local-") else "the folder's architecture"
    return (f"backbone.pretrained {weights} holds the weights of another architecture than {shown}: "
            f"{describe_architecture(have)} in the file, {describe_architecture(want)} in {shown} "
            f"({'; '.join(details)}). Pass the file's architecture as --backbone.model (or a local model folder "
            "whose open_clip_config.json describes it).")


def _create(name: str, pretrained: str | None, cache_dir: str | None, source: str, **kwargs):
    try:
        with _quiet_logs():
            return _open_clip().create_model(name, pretrained=pretrained, cache_dir=cache_dir, **kwargs)
    except FedPromptError:
        raise
    except Exception as err:  # open_clip raises RuntimeError/OSError/HTTP errors for downloads
        if pretrained and os.path.isfile(pretrained):
            problem = _architecture_problem(name, pretrained)
            if problem is not None:
                raise FedPromptError(problem) from None
            first = " ".join(str(err).split("\n")[0].split())[:200]
            if "weights_only" in first:  # torch's advice to load unsafely: never passed on
                first = ""
            raise FedPromptError(f"backbone: could not load '{name}' with the weights in {pretrained} "
                                 f"({type(err).__name__}{': ' + first if first else ''}); " + _NOT_WEIGHTS) from None
        text = f"{type(err).__name__}: {err}"
        if name.startswith("hf-hub:"):
            raise FedPromptError(
                f"backbone.model: could not fetch '{name}' from the Hugging Face Hub ({text[:200]}). Offline, "
                "download the repository elsewhere and pass the folder as --backbone.pretrained /path/to/folder."
            ) from err
        if pretrained and not os.path.exists(pretrained):
            raise FedPromptError(_download_hint(name, pretrained) + f" [{text[:200]}]") from err
        raise FedPromptError(f"backbone: could not load '{name}' with weights from {source}: {text[:300]}") from err
