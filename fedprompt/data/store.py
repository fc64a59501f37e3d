"""Decode once: every image of a run as uint8 tensors, in memory or memory-mapped, persistent between runs.

An :class:`ImageStore` holds the images of a list of :class:`~fedprompt.data.Sample` after one decode each (through
the dataset's ``loader``, sample -> PIL RGB) and one deterministic resize, as one padded uint8 tensor
``[n, 3, H, W]`` plus each image's valid ``(height, width)`` (top-left corner). Two kinds:

- ``test`` (:meth:`StoreKind.test`): the PIL part of the backbone's test transform (resize + centre crop: the steps
  before ``ToTensor``); every image is ``size x size``. :func:`fedprompt.data.augment.normalize` of a stored image
  equals the CPU test transform's tensor exactly (same float32 operations).
- ``train`` (:meth:`StoreKind.train`): each image shrunk (never enlarged; aspect kept, Pillow bicubic) so that its
  shorter side is at most ``store_size`` and its longer side at most ``max_side``; random resized crops are then
  taken on the device (:class:`fedprompt.data.augment.DeviceAugment`). Images no larger than that are stored as
  decoded, so a crop box gives the CPU pipeline's pixels (up to a rare 1/255, see :mod:`fedprompt.data.augment`):
  PACS-mini (227 px) and CIFAR (32 px) at the 224 px default. Larger images lose resolution that the CPU pipeline
  keeps for small crops: that is the one numerical change of device augmentation. The buffer is
  ``[n, 3, max h, max w]`` over the stored images: square data wastes nothing; mixed portrait/landscape 4:3 images
  waste at most 1/4.

Persistence: with a ``directory`` the store is written there (``<kind>-<digest>.u8`` raw pixels and
``<kind>-<digest>.pt`` metadata with the SHA-256 of the pixel file, each written to a temporary file and renamed)
and the next build with the same key loads it instead of decoding, once the pixel file's checksum is verified (a
file changed in place, or damaged, is rebuilt with a warning, never used; verifying reads the file, about a second
per GB). The key (:meth:`ImageStore.key_for`) covers the kind's parameters, the loader's
identity (:func:`loader_key`: for ``fedprompt.data.Synthetic`` its seed and image size) and every sample's identity
(:func:`sample_identity`: path, size and mtime of a file, or the synthetic key). Stores larger than
``mmap_threshold`` bytes (default 4 GiB, or ``mmap=True``) are memory-mapped from that file instead of read into
memory; without a directory a store is always in memory.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from fedprompt.progress import tqdm

from fedprompt.data.augment import to_device
from fedprompt.data.base import Sample
from fedprompt.errors import FedPromptError

CACHE_ENV = "FEDPROMPT_CACHE"
FORMAT_VERSION = 2  # 2: every persisted file records a checksum of its content, verified on load
MMAP_THRESHOLD = 4 << 30
PROGRESS_MIN = 1000  # show a progress bar when decoding at least this many images


def default_cache_dir() -> Path:
    """``$FEDPROMPT_CACHE``, else ``~/.cache/fedprompt``: where decoded images and features persist between runs."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedprompt").expanduser()


# ------------------------------------------------------------------------------------------------- identities
def digest(obj) -> str:
    """SHA-256 hex digest of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sample_identity(sample: Sample) -> str:
    """What makes a sample's pixels: a file's path, size and mtime (ns), or the path string of a generated sample."""
    try:
        stat = os.stat(sample.path)
    except (OSError, ValueError):
        return sample.path
    return f"{sample.path}|{stat.st_size}|{stat.st_mtime_ns}"


_SIMPLE = (int, float, str, bool, type(None))


def _simple(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def loader_key(loader: Callable) -> str | None:
    """A stable identity of a sample -> image loader, or ``None`` when it has none (then nothing is persisted).

    A ``cache_key`` attribute (a string) wins. Otherwise a plain function or closure is named by its module,
    qualified name, a hash of its code, and the values it closes over and its defaults, which must be simple
    (numbers, strings, tuples of them): the :class:`fedprompt.data.Synthetic` loader is keyed by its seed and image
    size this way; :func:`fedprompt.data.load_rgb` by its name.
    """
    key = getattr(loader, "cache_key", None)
    if isinstance(key, str):
        return key
    if not inspect.isfunction(loader):
        return None
    code = loader.__code__
    cells = [c.cell_contents for c in (loader.__closure__ or ())]
    defaults = list(loader.__defaults__ or ())
    if not (_simple(cells) and _simple(defaults)):
        return None
    code_hash = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]
    return json.dumps([loader.__module__, loader.__qualname__, code_hash, dict(zip(code.co_freevars, cells)),
                       defaults], default=str)


def transform_key(transform) -> str | None:
    """A transform's ``repr`` when it is stable (torchvision/open_clip transforms are), else ``None``."""
    text = repr(transform)
    return None if " at 0x" in text else text


# ------------------------------------------------------------------------------------------------------ kinds
class ShrinkToFit:
    """PIL image -> the same image shrunk (never enlarged) to shorter side <= ``short`` and longer side <= ``long``."""

    def __init__(self, short: int, long: int):
        self.short, self.long = int(short), int(long)

    def __repr__(self) -> str:
        return f"ShrinkToFit(short={self.short}, long={self.long}, interpolation=bicubic)"

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = min(1.0, self.short / min(width, height), self.long / max(width, height))
        if scale >= 1.0:
            return image
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return image.resize(size, Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class StoreKind:
    """How a decoded image is prepared before it is stored: ``prepare`` (PIL -> PIL) and its stable ``key``.

    ``mean``/``std`` are the normalisation of the ``test`` kind's transform (``None`` for ``train``).
    """

    name: str
    prepare: Callable[[Image.Image], Image.Image]
    key: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def test(cls, transform) -> StoreKind:
        """The ``test`` kind of a CLIP test transform ``Compose([<PIL steps>, ToTensor, Normalize])``.

        The stored image is the output of the PIL steps (for open_clip: ``Resize(size, bicubic)``, ``CenterCrop``,
        RGB conversion); ``mean``/``std`` come from the ``Normalize`` step.
        """
        steps = list(getattr(transform, "transforms", []))
        names = [type(s).__name__ for s in steps]
        cut = next((i for i, n in enumerate(names) if n in _TO_TENSOR), None)
        if cut is None or names[cut + 1:] != ["Normalize"]:
            raise FedPromptError(f"ImageStore test kind: expected Compose([... PIL steps, ToTensor, Normalize]), got "
                                 f"{transform!r}; pass the test transform of fedprompt.data.clip_transforms.")
        prepare = type(transform)(steps[:cut])
        key = transform_key(prepare)
        if key is None:
            raise FedPromptError(f"ImageStore test kind: the transform {prepare!r} has no stable repr to key the "
                                 "store; give its steps a __repr__.")
        normalize = steps[-1]
        return cls("test", prepare, key, tuple(float(m) for m in normalize.mean),
                   tuple(float(s) for s in normalize.std))

    @classmethod
    def train(cls, store_size: int = 256, max_side: int | None = None) -> StoreKind:
        """The ``train`` kind: images shrunk to shorter side <= ``store_size``, longer side <= ``max_side``.

        ``max_side`` defaults to ``ceil(store_size * 4 / 3)`` (342 for 256): 4:3 images keep the full
        ``store_size`` on their short side; longer panoramas are shrunk further so one odd image cannot blow up the
        padded buffer. :func:`default_store_size` gives ``store_size`` for a model input size.
        """
        max_side = int(max_side if max_side is not None else math.ceil(store_size * 4 / 3))
        if store_size < 1 or max_side < store_size:
            raise FedPromptError(f"ImageStore train kind: need 1 <= store_size <= max_side, got "
                                 f"store_size={store_size}, max_side={max_side}.")
        prepare = ShrinkToFit(store_size, max_side)
        return cls("train", prepare, repr(prepare))


_TO_TENSOR = {"ToTensor", "MaybeToTensor"}


def default_store_size(model_size: int) -> int:
    """Shorter side of stored train images for a model input size: ``ceil(size * 8 / 7)`` (256 for 224)."""
    return int(math.ceil(model_size * 8 / 7))




# ------------------------------------------------------------------------------------------------ decoding
class _Decode(Dataset):
    """Samples -> ``(index, uint8 [3, h, w])`` after ``loader`` and ``prepare`` (DataLoader workers run this)."""

    def __init__(self, samples: list[Sample], loader: Callable, prepare: Callable):
        self.samples, self.loader, self.prepare = samples, loader, prepare

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image = self.prepare(self.loader(self.samples[index]))
        if image.mode != "RGB":
            image = image.convert("RGB")
        return index, torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _as_list(batch):
    return batch


def _decode(samples: list[Sample], loader: Callable, prepare: Callable, num_workers: int, batch_size: int,
            progress: bool, sink: Callable[[int, torch.Tensor], None]) -> None:
    """Decode every sample once, calling ``sink(index, uint8 image)`` in sample order."""
    data = DataLoader(_Decode(samples, loader, prepare), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=_as_list)
    show = progress and len(samples) >= PROGRESS_MIN
    with tqdm(total=len(samples), desc="decoding images", disable=not show, leave=False) as bar:
        for batch in data:
            for index, image in batch:
                sink(index, image)
            bar.update(len(batch))


def temporary_path(path: Path) -> Path:
    """A new empty temporary file beside ``path`` (written, then renamed onto ``path``: an atomic write)."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(handle)
    return Path(name)


# ---------------------------------------------------------------------------------------------------- store
class ImageStore:
    """Decoded uint8 images of a list of samples (see the module docstring); build with :meth:`build`.

    Attributes:
        images: uint8 ``[n, 3, H, W]`` (image ``i`` in the top-left ``sizes[i]`` corner, zeros elsewhere).
        sizes: int64 ``[n, 2]`` on the CPU, each image's ``(height, width)``.
        paths: the sample path of each row (rows follow the order of the samples given to :meth:`build`,
            duplicates of a path kept once).
        kind: the :class:`StoreKind`.
        key: the digest the store is persisted under.
        mmapped: whether ``images`` is memory-mapped from the cache file.
    """

    def __init__(self, images: torch.Tensor, sizes: torch.Tensor, paths: list[str], kind: StoreKind, key: str,
                 mmapped: bool = False):
        self.images, self.sizes, self.paths, self.kind, self.key, self.mmapped = \
            images, sizes, paths, kind, key, mmapped
        self._rows = {p: i for i, p in enumerate(paths)}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        """Bytes of the pixel buffer."""
        return self.images.numel() * self.images.element_size()

    def __repr__(self) -> str:
        where = "memory-mapped" if self.mmapped else str(self.images.device)
        return (f"ImageStore({self.kind.name}, {len(self)} images, buffer {tuple(self.images.shape)}, "
                f"{self.nbytes / 2**20:.1f} MiB, {where})")

    # ----------------------------------------------------------------------------------------------- access
    def rows(self, samples: list[Sample]) -> torch.Tensor:
        """Row indices (int64, on the CPU) of ``samples`` (by path)."""
        try:
            rows = [self._rows[s.path] for s in samples]
        except KeyError as err:
            raise FedPromptError(f"ImageStore ({self.kind.name}) has no image {err.args[0]}: build the store from "
                                 "every sample it must serve.") from None
        return torch.tensor(rows, dtype=torch.int64)

    def holds(self, samples: list[Sample]) -> bool:
        """Whether every sample's path has a row in this store."""
        return all(s.path in self._rows for s in samples)

    def get(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 images [n, 3, H, W], sizes [n, 2])`` of ``rows``: one gather of the images on the store's device;
        the sizes always come from the CPU (crop parameters are drawn there without a device sync)."""
        images = self.images.index_select(0, to_device(rows, self.images.device))
        return images, self.sizes.index_select(0, rows.to("cpu"))

    def to(self, device) -> ImageStore:
        """This store with its images on ``device`` (e.g. the GPU, where it fits: gathers then stay there)."""
        return ImageStore(self.images.to(device), self.sizes, self.paths, self.kind, self.key)

    # ------------------------------------------------------------------------------------------------ build
    @staticmethod
    def key_for(samples: list[Sample], loader: Callable, kind: StoreKind) -> str | None:
        """The persistence key of a store, or ``None`` when the loader has no stable identity."""
        lkey = loader_key(loader)
        if lkey is None:
            return None
        identities = [sample_identity(s) for s in _unique(samples)]
        return digest({"format": FORMAT_VERSION, "kind": kind.name, "prepare": kind.key, "loader": lkey,
                       "samples": identities})

    @classmethod
    def build(cls, samples: list[Sample], loader: Callable, kind: StoreKind, *, directory: str | Path | None = None,
              mmap: bool | None = None, mmap_threshold: int = MMAP_THRESHOLD, num_workers: int = 0,
              batch_size: int = 32, progress: bool = True) -> ImageStore:
        """Decode ``samples`` once (or load them from ``directory``) into a store of ``kind``.

        Args:
            samples: the samples (a path seen twice is stored once).
            loader: sample -> PIL image (``DatasetSplits.loader``).
            kind: :meth:`StoreKind.test` or :meth:`StoreKind.train`.
            directory: cache folder (e.g. ``default_cache_dir() / "images"``); ``None`` keeps the store in memory
                only.
            mmap: memory-map the store from its cache file (``None``: when it is larger than ``mmap_threshold``
                bytes, estimated before decoding; needs ``directory``).
            num_workers: DataLoader worker processes for decoding.
            batch_size: images per worker task.
            progress: show a progress bar (from 1000 images on).
        """
        unique = _unique(samples)
        key = cls.key_for(unique, loader, kind) if directory is not None else None
        if directory is not None and key is None:
            warnings.warn(f"ImageStore: the loader {loader!r} has no stable identity (give it a cache_key "
                          "attribute); the store is not persisted.", stacklevel=2)
        if mmap is None:
            mmap = directory is not None and key is not None and _estimate_bytes(unique, kind) > mmap_threshold
        if mmap and (directory is None or key is None):
            raise FedPromptError("ImageStore: mmap=True needs a cache directory and a loader with a stable identity.")
        if key is not None:
            base = Path(directory).expanduser() / f"{kind.name}-{key[:32]}"
            found = _load(base, key, kind, mmap)
            if found is not None:
                return found
        try:
            images, sizes, shape = _decode_packed(unique, loader, kind, num_workers, batch_size, progress,
                                                  base if mmap else None)
        except OSError as err:  # the memory-mapped store is decoded into the cache folder
            raise FedPromptError(f"image store: cannot write {directory} ({err.strerror or err}); free space there, "
                                 "or pass another --train.cache_dir.") from None
        paths = [s.path for s in unique]
        if key is None:
            return cls(images, sizes, paths, kind, "")
        try:
            checksum = _write_pixels(base.with_suffix(".u8"), images) if not mmap \
                else content_digest(base.with_suffix(".u8"))
            _write_meta(base, key, shape, sizes, paths, checksum)
        except OSError as err:
            if mmap:
                raise FedPromptError(f"image store: cannot write {directory} ({err.strerror or err}); free space "
                                     "there, or pass another --train.cache_dir.") from None
            from fedprompt.errors import warn

            warn(f"image store: cannot write {directory} ({err.strerror or err}); the decoded images stay in memory "
                 "for this run only.")
            return cls(images, sizes, paths, kind, "")
        return _load(base, key, kind, mmap) if mmap else cls(images, sizes, paths, kind, key)


def _unique(samples: list[Sample]) -> list[Sample]:
    return list({s.path: s for s in samples}.values())


def _estimate_bytes(samples: list[Sample], kind: StoreKind) -> int:
    side = getattr(kind.prepare, "short", None)
    if side is None:
        side = next((getattr(s, "size", None) for s in getattr(kind.prepare, "transforms", [])
                     if type(s).__name__ == "CenterCrop"), (224, 224))
        side = side[0] if isinstance(side, (tuple, list)) else side
    return len(samples) * 3 * int(side) ** 2


def _decode_packed(samples, loader, kind, num_workers, batch_size, progress, mmap_base: Path | None):
    """Decode into a ragged list (in memory) or a ragged temporary file (memory-mapped case), then pack.

    Returns ``(images or None when written to the mmap file, sizes, buffer shape)``.
    """
    shapes: list[tuple[int, int]] = []
    if mmap_base is None:
        ragged: list[torch.Tensor] = []

        def keep(index, image):
            ragged.append(image)
            shapes.append(tuple(image.shape[1:]))

        _decode(samples, loader, kind.prepare, num_workers, batch_size, progress, keep)
        images = _pack_buffer(shapes)
        for i, image in enumerate(ragged):
            images[i, :, : image.shape[1], : image.shape[2]] = image
            ragged[i] = None
        return images, torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2), tuple(images.shape)
    mmap_base.parent.mkdir(parents=True, exist_ok=True)
    ragged_path = temporary_path(mmap_base.with_suffix(".ragged"))
    try:
        with open(ragged_path, "wb") as out:
            def write(index, image):
                out.write(image.numpy().tobytes())
                shapes.append(tuple(image.shape[1:]))

            _decode(samples, loader, kind.prepare, num_workers, batch_size, progress, write)
        final = mmap_base.with_suffix(".u8")
        tmp = temporary_path(final)
        height, width = (max(s[i] for s in shapes) for i in (0, 1)) if shapes else (1, 1)
        packed = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(shapes), 3, height, width))
        source = np.memmap(ragged_path, dtype=np.uint8, mode="r")
        offset = 0
        for i, (h, w) in enumerate(shapes):
            packed[i, :, :h, :w] = source[offset: offset + 3 * h * w].reshape(3, h, w)
            offset += 3 * h * w
        packed.flush()
        del packed, source
        os.replace(tmp, final)
    finally:
        ragged_path.unlink(missing_ok=True)
    return None, torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2), (len(shapes), 3, height, width)


def _pack_buffer(shapes: list[tuple[int, int]]) -> torch.Tensor:
    height = max((s[0] for s in shapes), default=1)
    width = max((s[1] for s in shapes), default=1)
    return torch.zeros(len(shapes), 3, height, width, dtype=torch.uint8)


def content_digest(data) -> str:
    """SHA-256 of a buffer (bytes, a memoryview, a numpy array) or of a file's bytes (a path; read in chunks)."""
    hasher = hashlib.sha256()
    if isinstance(data, (str, Path)):
        with open(data, "rb") as source:
            for chunk in iter(lambda: source.read(1 << 24), b""):
                hasher.update(chunk)
    else:
        hasher.update(data)
    return hasher.hexdigest()


def _replace_with(path: Path, write) -> None:
    """Write a temporary file beside ``path`` with ``write(handle)``, then rename it onto ``path``; on failure the
    temporary file goes and the error (``OSError``: a full disk) is raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as out:
            write(out)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_pixels(path: Path, images: torch.Tensor) -> str:
    """Write the pixel buffer; returns its checksum."""
    buffer = memoryview(images.contiguous().numpy()).cast("B")
    _replace_with(path, lambda out: out.write(buffer))
    return content_digest(buffer)


def _write_meta(base: Path, key: str, shape, sizes: torch.Tensor, paths: list[str], checksum: str) -> None:
    meta = {"format": FORMAT_VERSION, "key": key, "shape": list(shape), "sizes": sizes, "paths": paths,
            "checksum": checksum}
    _replace_with(base.with_suffix(".pt"), lambda out: torch.save(meta, out))  # a handle: OSError on a full disk


def _rejected(path: Path, why: str) -> None:
    """A persisted cache file that does not match its key: say so and delete it (it is rebuilt)."""
    from fedprompt.errors import warn

    warn(f"cache: {path} {why}; it is rebuilt.")
    path.unlink(missing_ok=True)


def _load(base: Path, key: str, kind: StoreKind, mmap: bool) -> ImageStore | None:
    """The persisted store under ``base`` if its metadata and pixel file match ``key``, else ``None``."""
    meta_path, pixels = base.with_suffix(".pt"), base.with_suffix(".u8")
    if not (meta_path.exists() and pixels.exists()):
        return None
    try:
        meta = torch.load(meta_path, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
        _rejected(meta_path, "cannot be read")
        return None
    shape = tuple(meta.get("shape", ()))
    if meta.get("key") != key or len(shape) != 4:
        _rejected(meta_path, "does not belong to its key")
        return None
    if pixels.stat().st_size != math.prod(shape):
        _rejected(pixels, "has another size than its metadata says")
        return None
    count = math.prod(shape)
    if mmap:
        checksum = content_digest(pixels)
        images = torch.from_file(str(pixels), shared=False, size=count, dtype=torch.uint8).view(shape)
    else:
        images = torch.empty(shape, dtype=torch.uint8)
        buffer = memoryview(images.numpy()).cast("B")
        with open(pixels, "rb") as source:
            source.readinto(buffer)
        checksum = content_digest(buffer)
    if checksum != meta.get("checksum"):
        _rejected(pixels, "does not match its checksum (changed in place, or damaged)")
        return None
    return ImageStore(images, meta["sizes"], list(meta["paths"]), kind, key, mmapped=mmap)
