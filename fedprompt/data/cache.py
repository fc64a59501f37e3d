"""Cache of frozen image-tower outputs, in memory and (optionally) on disk between runs.

The image tower is frozen, so for methods without visual prompts its outputs (pooled features; projected patch
tokens for FedOTP) are a function of the transformed image alone. With deterministic transforms (the test transform,
or ``train.augment: false``) each image is encoded once instead of once per step and per evaluation; the cached run
gives the same metrics as the uncached one (the uncached path stays the reference, the cache is a switch:
``train.feature_cache``).

Outputs are kept per transform kind as stacked chunks (one per encoding call or loaded shard) with an index map, so
serving a client's samples is one ``index_select`` per output when they were encoded together
(:meth:`FeatureCache.prepare` all samples of a kind first to get a single chunk).

With a ``directory``, every encoded chunk is also written there as a shard
``<directory>/features/<cache key>/<sample-set digest>.pt`` (``torch.save``; written to a temporary file and
renamed; it records its cache key and a checksum of its content) and a new cache object (or a new process) with the
same key reads the shards (``torch.load(..., weights_only=True, mmap=True)``) instead of encoding, once each shard's
key and checksum are verified (a shard changed in place or damaged is deleted with a warning and encoded again); a
shard that cannot be written (a full disk) leaves the outputs in memory, with a warning. The cache key covers the
backbone's weights
(:func:`weights_fingerprint`: SHA-256 of every parameter and buffer, computed once per backbone object and process),
its name, the outputs cached, Fabric's precision and device type, the transform
(:func:`fedprompt.data.store.transform_key`), the loader's identity (:func:`fedprompt.data.store.loader_key`) and
the libraries and CPU instruction set that compute the features (:func:`kernels`); a shard maps sample identities (path, size and mtime of a file) to rows. A transform or loader without a stable identity
is cached in memory only.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from fedprompt.data.augment import normalize
from fedprompt.data.base import Sample
from fedprompt.data.images import ImageDataset
from fedprompt.data.store import (FORMAT_VERSION, ImageStore, StoreKind, temporary_path, digest, loader_key,
                                  sample_identity, transform_key)
from fedprompt.errors import FedPromptError, warn
from fedprompt.progress import tqdm

#: encodings of at least this many images show their progress (with ``progress``)
PROGRESS_MIN = 256

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kernels(device: str) -> dict:
    """What else decides the bits of an image feature besides the weights and the pixels: the versions of the
    libraries that compute it and, on CPU, the instruction sets its kernels use (torch's, and oneDNN's, which follow
    the CPU's features and ``DNNL_MAX_CPU_ISA``: AVX2 and AVX-512 kernels round differently, by about 1e-5 in the
    stand-in model's features). Part of the cache key, so features cached by another build or on another kind of CPU
    (a shared cache folder, a library upgrade) are encoded again instead of silently changing a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "open_clip_torch", "timm", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    if device == "cpu":
        found["cpu"] = torch.backends.cpu.get_cpu_capability()
        found["cpu_features"] = cpu_features()
        found.update({name: os.environ[name] for name in KERNEL_ENV if os.environ.get(name)})
    return found


#: environment variables that choose the CPU kernels of torch, oneDNN and MKL (and so the last bits of a feature)
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")


def cpu_features() -> str:
    """The vector instruction sets this CPU offers (oneDNN picks its kernels from them: AVX2, AVX-512, AMX, ...),
    as reported by Linux; empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return ""
    return " ".join(sorted(f for f in flags.split(":", 1)[-1].split() if f.startswith(("avx", "amx", "fma"))))


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's parameters and buffers (cached per object).

    The cache assumes the weights do not change in place afterwards (true of the frozen backbone).
    """
    if module in _FINGERPRINTS:
        return _FINGERPRINTS[module]
    hasher = hashlib.sha256()
    tensors = sorted([*module.named_parameters(), *module.named_buffers()], key=lambda item: item[0])
    for name, tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        hasher.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(flat.view(torch.uint8).numpy())
    _FINGERPRINTS[module] = hasher.hexdigest()
    return _FINGERPRINTS[module]


class CachedFeatures(Dataset):
    """Dicts ``{"features" | "tokens", "label", "index"}`` from precomputed tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], labels: list[int]):
        self.tensors = tensors
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {k: v[index] for k, v in self.tensors.items()}
        item.update(label=self.labels[index], index=index)
        return item


def shard_digest(key: str, identities: list[str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a shard's cache key, sample identities and the bytes of its tensors (what a shard records and
    is verified against when loaded)."""
    hasher = hashlib.sha256(digest({"key": key, "identities": identities}).encode())
    for name in sorted(tensors):
        flat = tensors[name].detach().contiguous().reshape(-1)
        hasher.update(f"{name}|{flat.dtype}|{tuple(tensors[name].shape)}|".encode())
        hasher.update(flat.view(torch.uint8).numpy())
    return hasher.hexdigest()


class _Table:
    """Stacked outputs of one (kind, transform): chunks of tensors and identity -> (chunk, row).

    A shard on disk is used only when it records this table's cache ``key``, its file name is the digest of its
    sample identities and its tensors match its checksum (:func:`shard_digest`); any other shard (changed in place,
    damaged, copied from another key) is deleted with a warning and its samples are encoded again."""

    def __init__(self, folder: Path | None, key: str = ""):
        self.folder = folder
        self.key = key
        self.chunks: list[dict[str, torch.Tensor]] = []
        self.where: dict[str, tuple[int, int]] = {}
        if folder is not None and folder.is_dir():
            for shard in sorted(folder.glob("*.pt")):
                self._load(shard)

    def _load(self, shard: Path) -> None:
        try:
            content = torch.load(shard, weights_only=True, mmap=True)
            identities, tensors = content["identities"], content["tensors"]
            good = (content.get("format") == FORMAT_VERSION and content.get("key") == self.key
                    and shard.stem == digest(identities)[:32]
                    and content.get("checksum") == shard_digest(self.key, identities, tensors))
        except Exception:  # noqa: BLE001 - a damaged or foreign shard
            good = False
        if not good:
            warn(f"feature cache: {shard} does not match its key or its content (changed in place, or damaged); it "
                 "is deleted and its images are encoded again.")
            shard.unlink(missing_ok=True)
            return
        self.add(identities, tensors)

    def add(self, identities: list[str], tensors: dict[str, torch.Tensor]) -> None:
        chunk = len(self.chunks)
        self.chunks.append(tensors)
        for row, identity in enumerate(identities):
            self.where[identity] = (chunk, row)

    def save(self, identities: list[str], tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{digest(identities)[:32]}.pt"
        tmp = None
        try:
            tmp = temporary_path(path)
            with open(tmp, "wb") as handle:  # a handle: a full disk is an OSError
                torch.save({"format": FORMAT_VERSION, "key": self.key, "identities": identities,
                            "tensors": tensors, "checksum": shard_digest(self.key, identities, tensors)}, handle)
            os.replace(tmp, path)
        except OSError as err:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            warn(f"feature cache: cannot write {self.folder} ({getattr(err, 'strerror', None) or err}); the "
                 "features stay in memory for this run only.")

    def gather(self, identities: list[str], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The rows of ``identities``: one ``index_select`` per output when they live in one chunk."""
        chunk_ids = torch.tensor([self.where[i][0] for i in identities], dtype=torch.int64)
        rows = torch.tensor([self.where[i][1] for i in identities], dtype=torch.int64)
        first = int(chunk_ids[0]) if len(identities) else 0
        if len(identities) == 0 or bool((chunk_ids == first).all()):
            chunk = self.chunks[first] if self.chunks else None
            return {k: chunk[k].index_select(0, rows) for k in names} if chunk else {}
        out = {}
        for k in names:
            sample = self.chunks[first][k]
            out[k] = torch.empty((len(identities), *sample.shape[1:]), dtype=sample.dtype)
            for c in torch.unique(chunk_ids).tolist():
                mask = chunk_ids == c
                out[k][mask] = self.chunks[c][k].index_select(0, rows[mask])
        return out


class FeatureCache:
    """Encodes each (image, transform kind) once and serves the outputs the method needs.

    Args:
        backbone: the frozen backbone.
        fabric: Lightning Fabric (device placement and autocast).
        inputs: which outputs to cache: ``("features",)`` pooled, ``("tokens",)`` patch tokens, or both.
        batch_size: encoding batch size.
        loader: sample -> PIL image.
        num_workers: DataLoader workers for encoding (when images are decoded here, not taken from ``images``).
        directory: cache folder to persist outputs between runs (e.g. ``default_cache_dir()``); ``None``: memory
            only.
        images: an :class:`~fedprompt.data.store.ImageStore` of the ``test`` kind: samples it holds are encoded
            from its uint8 images (normalised on the device) instead of being decoded again, when the transform
            asked for is the store's (same PIL steps).
        progress: show the progress of encoding (from :data:`PROGRESS_MIN` images on; a bar on a terminal, lines
            in a log: :mod:`fedprompt.progress`).

    ``encoded`` counts the images this object has run through the image tower.
    """

    def __init__(self, backbone, fabric, inputs: tuple[str, ...], batch_size: int, loader, num_workers: int = 0,
                 directory: str | Path | None = None, images: ImageStore | None = None, progress: bool = False):
        self.progress = progress
        self.backbone = backbone
        self.fabric = fabric
        self.inputs = tuple(inputs)
        self.batch_size = batch_size
        self.loader = loader
        self.num_workers = num_workers
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.images = images
        self.encoded = 0
        self._tables: dict[tuple[str, str], _Table] = {}
        self._identities: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------------ keys
    def _identity(self, sample: Sample) -> str:
        identity = self._identities.get(sample.path)
        if identity is None:
            identity = self._identities[sample.path] = sample_identity(sample)
        return identity

    def cache_key(self, transform) -> str | None:
        """The digest outputs under ``transform`` are persisted under (``None``: not persistable)."""
        tkey, lkey = transform_key(transform), loader_key(self.loader)
        if tkey is None or lkey is None:
            return None
        precision = getattr(self.fabric.strategy.precision, "precision", type(self.fabric.strategy.precision).__name__)
        return digest({"format": FORMAT_VERSION, "weights": weights_fingerprint(self.backbone),
                       "model": getattr(self.backbone, "name", type(self.backbone).__name__),
                       "inputs": sorted(self.inputs), "precision": str(precision),
                       "device": self.fabric.device.type, "transform": tkey, "loader": lkey,
                       "kernels": kernels(self.fabric.device.type)})

    def _table(self, transform, kind: str) -> _Table:
        tkey = transform_key(transform) or f"object {id(transform)}"
        table = self._tables.get((kind, tkey))
        if table is None:
            folder, key = None, ""
            if self.directory is not None:
                key = self.cache_key(transform) or ""
                folder = self.directory / "features" / key[:32] if key else None
            table = self._tables[(kind, tkey)] = _Table(folder, key)
        return table

    # ---------------------------------------------------------------------------------------------- encode
    def _store_for(self, transform, samples: list[Sample]):
        """``(mean, std)`` when ``samples`` can be encoded from the image store under ``transform``, else ``None``."""
        if self.images is None or self.images.kind.name != "test":
            return None
        try:
            kind = StoreKind.test(transform)
        except FedPromptError:
            return None
        if kind.key != self.images.kind.key or not self.images.holds(samples):
            return None
        return kind.mean, kind.std

    def _batches(self, samples: list[Sample], transform):
        """Normalised image batches of ``samples``, from the image store or decoded with ``transform``."""
        from_store = self._store_for(transform, samples)
        if from_store is not None:
            rows = self.images.rows(samples)
            for start in range(0, len(samples), self.batch_size):
                images, _ = self.images.get(rows[start: start + self.batch_size])
                yield normalize(self.fabric.to_device(images), *from_store)
            return
        dataset = ImageDataset(samples, transform, self.loader)
        for batch in DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers):
            yield self.fabric.to_device(batch["image"])

    @torch.no_grad()
    def _encode(self, samples: list[Sample], transform) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.inputs}
        bar = tqdm(total=len(samples), desc="encoding images (image tower)", unit="img", leave=False,
                   disable=not (self.progress and len(samples) >= PROGRESS_MIN))
        for images in self._batches(samples, transform):
            with self.fabric.autocast():
                if "tokens" in self.inputs:
                    pooled, tokens = self.backbone.encode_image_tokens(images)
                    out = {"features": pooled, "tokens": tokens}
                else:
                    out = {"features": self.backbone.encode_image(images)}
            for k in self.inputs:
                parts[k].append(out[k].cpu())
            self.encoded += images.shape[0]
            bar.update(images.shape[0])
        bar.close()
        return {k: torch.cat(v) for k, v in parts.items()}

    def prepare(self, samples: list[Sample], transform, kind: str) -> None:
        """Encode the samples not cached yet under ``kind`` (in one chunk, persisted when a directory is set)."""
        table = self._table(transform, kind)
        missing = {}
        for s in samples:
            identity = self._identity(s)
            if identity not in table.where:
                missing.setdefault(identity, s)
        if not missing:
            return
        tensors = self._encode(list(missing.values()), transform)
        identities = list(missing)
        table.add(identities, tensors)
        table.save(identities, tensors)

    def dataset(self, samples: list[Sample], transform, kind: str) -> CachedFeatures:
        """A dataset of cached outputs for ``samples`` under the transform named ``kind`` (encoded on first use)."""
        self.prepare(samples, transform, kind)
        table = self._table(transform, kind)
        tensors = table.gather([self._identity(s) for s in samples], self.inputs)
        return CachedFeatures(tensors, [s.label for s in samples])
