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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedprompt.errors import FedPromptError

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
    tmp = Path(tempfile.gettempdir()) / "fedprompt-configs"
    tmp.mkdir(exist_ok=True)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(model_cfg))
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
        return
    if pretrained and not os.path.isfile(pretrained) and ("/" in pretrained or pretrained.endswith(
            (".bin", ".pt", ".pth", ".safetensors"))):
        raise FedPromptError(f"backbone.pretrained: no such file or folder: {pretrained}")
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


def _create(name: str, pretrained: str | None, cache_dir: str | None, source: str, **kwargs):
    try:
        with _quiet_logs():
            return _open_clip().create_model(name, pretrained=pretrained, cache_dir=cache_dir, **kwargs)
    except FedPromptError:
        raise
    except Exception as err:  # open_clip raises RuntimeError/OSError/HTTP errors for downloads
        text = f"{type(err).__name__}: {err}"
        if name.startswith("hf-hub:"):
            raise FedPromptError(
                f"backbone.model: could not fetch '{name}' from the Hugging Face Hub ({text[:200]}). Offline, "
                "download the repository elsewhere and pass the folder as --backbone.pretrained /path/to/folder."
            ) from err
        if pretrained and not os.path.exists(pretrained):
            raise FedPromptError(_download_hint(name, pretrained) + f" [{text[:200]}]") from err
        raise FedPromptError(f"backbone: could not load '{name}' with weights from {source}: {text[:300]}") from err
