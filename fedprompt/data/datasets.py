"""Federated datasets: a reader (``read``) plus the shared protocol (partition, few-shot sampling).

A config selects one with ``class_path`` (``fedprompt.data.DomainFolders``, ``fedprompt.data.SplitFolders``,
``fedprompt.data.CIFAR``, ``fedprompt.data.Synthetic``) and overrides its arguments with flags such as
``--data.root``. New datasets subclass :class:`FederatedData` and implement :meth:`FederatedData.read`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from fedprompt.data.base import ClientSplit, DatasetSplits, Sample, load_rgb
from fedprompt.data.check import bad_images_message, scan_images
from fedprompt.data.partition import IID, ByDomain, Partitioner, few_shot
from fedprompt.data.protocols import assign_validation, subsample_classes, validation_split
from fedprompt.errors import FedPromptError, warn

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DATA_ENV = "FEDPROMPT_DATA"


@dataclass
class EvalSet:
    """A named evaluation set: ``samples`` classified among ``classnames`` (sample labels index ``classnames``).

    The round loop can score any client state on any set: build (or reuse) a client module on ``classnames``, load
    the state, and measure top-1 accuracy over ``samples``. Sets of one ``split`` form a metric that is the
    unweighted mean over datasets of each set's accuracy (FedTPG's "average over datasets").

    Attributes:
        name: unique ``"<dataset>/<split>"``, e.g. ``"caltech101/base"``.
        classnames: the class list the samples are classified among.
        samples: test samples, labels relative to ``classnames``.
        split: ``"base"`` (all base classes of a dataset), ``"novel"`` (all novel classes), or ``"all"`` (every class
            of the dataset; an unseen dataset's set, or the whole test set when no base/novel split is made).
        dataset: name of the dataset the set comes from.
        seen: ``False`` for a dataset the federation never trains on (unseen-dataset transfer).
    """

    name: str
    classnames: list[str]
    samples: list[Sample]
    split: str
    dataset: str
    seen: bool = True


@dataclass
class FederatedSplits:
    """The result of :meth:`FederatedData.setup`: class names, every client's data and the reader's splits.

    A client with ``classnames=None`` scores the shared list ``classnames``; a client with its own list scores that
    (:meth:`client_classnames` gives the list of either). ``eval_sets`` are the dataset-level evaluation sets
    (:class:`EvalSet`): with ``subsample_classes: base`` a ``base`` and a ``novel`` set per dataset, otherwise one
    set of the dataset's (subsampled) classes; plus, for :class:`~fedprompt.data.Combined`, one ``all`` set per
    unseen dataset.
    """

    classnames: list[str]
    clients: list[ClientSplit]
    source: DatasetSplits
    novel: DatasetSplits | None = None
    """The novel half of a base-to-novel split (``subsample_classes: base``), for Base/Novel/HM evaluation."""
    eval_sets: list[EvalSet] = field(default_factory=list)
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    """``(path, reason)`` of the unreadable image files left out (``on_bad_image: skip``); written by ``fit`` to
    the run directory's ``bad_images.txt``."""

    @property
    def loader(self):
        return self.source.loader

    def client_classnames(self, client_id: int) -> list[str]:
        """The class list client ``client_id`` scores (its own, or the shared one); its sample labels index it."""
        own = self.clients[client_id].classnames
        return self.classnames if own is None else own

    def eval_set(self, name: str) -> EvalSet:
        """The evaluation set called ``name``; an unknown name is an error listing the known ones."""
        for item in self.eval_sets:
            if item.name == name:
                return item
        raise FedPromptError(f"no evaluation set {name!r}; known: {[e.name for e in self.eval_sets]}")


def dataset_eval_sets(source: DatasetSplits, novel: DatasetSplits | None, dataset: str,
                      which: str) -> list[EvalSet]:
    """A dataset's evaluation sets: ``base`` and ``novel`` sets (each half's test images among that half's classes)
    for a base-to-novel split, else one set of the test images among the (``which``-subsampled) classes."""
    if novel is not None:
        return [EvalSet(f"{dataset}/base", list(source.classnames), source.test, "base", dataset),
                EvalSet(f"{dataset}/novel", list(novel.classnames), novel.test, "novel", dataset)]
    return [EvalSet(f"{dataset}/{which}", list(source.classnames), source.test, which, dataset)]


def federate(raw: DatasetSplits, partition: Partitioner, num_shots: int | None, seed: int,
             subsample: str = "all", validation: bool = False, dataset: str | None = None) -> FederatedSplits:
    """The shared protocol on a reader's splits: validation carve-out, base/novel subsampling, partition, few-shot
    sampling, validation assignment and the dataset's evaluation sets (named after ``dataset``, default the
    reader's name). Deterministic for a given ``seed``."""
    dataset = dataset or raw.name or "data"
    if validation:
        raw = validation_split(raw, num_shots, seed)
    source = subsample_classes(raw, subsample)
    novel = subsample_classes(raw, "novel") if subsample == "base" else None
    clients = partition.split(source, seed)
    if num_shots is not None:
        clients = [few_shot(c, num_shots, seed) for c in clients]
    if validation:
        clients = assign_validation(clients, source.val, source.classnames)
    empty = [c.client_id for c in clients if not c.train]
    if empty:
        raise FedPromptError(f"data.partition gives clients {empty} of {dataset} no train samples; use fewer clients "
                             "or another partition.")
    return FederatedSplits(source.classnames, clients, source, novel,
                           dataset_eval_sets(source, novel, dataset, subsample))


class FederatedData:
    """Base class: read a dataset, deal it to clients, sample few shots.

    Args:
        root: dataset folder. ``None`` takes ``$FEDPROMPT_DATA/<dirname>``.
        dirname: folder name under ``$FEDPROMPT_DATA`` when ``root`` is not given.
        partition: how train samples are dealt to clients (default: the dataset's natural one).
        num_shots: keep this many train images per class per client (``None`` keeps all).
        seed: seed of the partition, few-shot sampling and any train/test split the reader makes.
        num_workers: DataLoader worker processes per client loader.
        subsample_classes: ``all`` classes, or the CoOp ``base`` / ``novel`` half (sorted labels; base = first ceil(C/2);
            each half relabelled from 0). With ``base``, clients train on base classes and every evaluation also
            reports ``base_acc``, ``novel_acc``, ``hm`` and ``cm`` (base-to-novel generalisation).
        validation: give each client a validation set of min(num_shots, 4) images per class (from the reader's val
            split, else moved out of train before partitioning); every evaluation then reports ``val_acc``, and
            ``eval.select: val`` selects the round by it (never by test accuracy).
        check_images: open every image file's header while indexing (and check that JPEG/PNG files are not cut
            short), so a bad file stops the run at once, with every bad file named, instead of during encoding.
        on_bad_image: ``error`` (stop, listing every bad file) or ``skip`` (leave them out; they are listed in the
            run directory's ``bad_images.txt``).
        empty_classes: folder readers: a class folder without any image in any split is an ``error`` naming the
            folder, or is dropped with a warning (``drop``).
    """

    default_dirname = ""

    def __init__(self, root: str | None = None, dirname: str | None = None, partition: Partitioner | None = None,
                 num_shots: int | None = None, seed: int = 0, num_workers: int = 0,
                 subsample_classes: Literal["all", "base", "novel"] = "all", validation: bool = False,
                 check_images: bool = True, on_bad_image: Literal["error", "skip"] = "error",
                 empty_classes: Literal["error", "drop"] = "error"):
        if num_shots is not None and num_shots < 1:
            raise FedPromptError(f"--data.num_shots must be >= 1 (or null for every image), got {num_shots}.")
        if num_workers < 0:
            raise FedPromptError(f"--data.num_workers must be >= 0, got {num_workers}.")
        if on_bad_image not in ("error", "skip"):
            raise FedPromptError(f"--data.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}.")
        if empty_classes not in ("error", "drop"):
            raise FedPromptError(f"--data.empty_classes must be 'error' or 'drop', got {empty_classes!r}.")
        self.check_images = check_images
        self.on_bad_image = on_bad_image
        self.empty_classes = empty_classes
        self.root = root
        self.validation = validation
        self.subsample_classes = subsample_classes
        self.dirname = dirname if dirname is not None else self.default_dirname
        self.partition = partition
        self.num_shots = num_shots
        self.seed = seed
        self.num_workers = num_workers

    # ------------------------------------------------------------------------------------------ to implement
    def read(self) -> DatasetSplits:
        """Return class names and train/test samples."""
        raise NotImplementedError

    def default_partition(self) -> Partitioner:
        return IID(10)

    # ------------------------------------------------------------------------------------------------ shared
    def resolve_root(self) -> Path:
        """The dataset folder: ``root``, or ``$FEDPROMPT_DATA/<dirname>``; a missing folder is a clear error."""
        if self.root is None:
            base = os.environ.get(DATA_ENV)
            if not base:
                raise FedPromptError(f"data.root is not set: pass --data.root /path/to/{self.dirname or 'data'} "
                                     f"or set the environment variable {DATA_ENV} to the folder that holds "
                                     f"'{self.dirname}'.")
            root = Path(base) / self.dirname
        else:
            root = Path(os.path.expanduser(self.root))
        if not root.exists():
            raise FedPromptError(f"data.root: the folder {root} does not exist. Pass --data.root with the path of "
                                 f"the dataset (see README.md, 'Data').")
        return root

    def keep_classes_with_images(self, classnames: list[str], counts: dict[str, int],
                                 folders: dict[str, list[Path]]) -> list[str]:
        """Folder readers: the classes that have at least one image (``counts``); a class without any is an error
        naming its folders (``folders``), or is dropped with a warning when ``empty_classes: drop``."""
        empty = [c for c in classnames if not counts.get(c)]
        if not empty:
            return classnames
        where = ", ".join(str(f) for c in empty for f in folders.get(c, [])) or ", ".join(empty)
        if self.empty_classes == "error":
            raise FedPromptError(f"data: class folder(s) without any image in any split: {where}. An empty folder "
                                 "would add a class; remove it, add images, or pass --data.empty_classes drop.")
        warn(f"data: dropped {len(empty)} class(es) without any image ({where}).")
        return [c for c in classnames if c not in empty]

    def _without_bad_images(self, raw: DatasetSplits) -> tuple[DatasetSplits, list[tuple[str, str]]]:
        if not self.check_images or raw.loader is not load_rgb:  # generated or archive-backed samples: no files
            return raw, []
        bad = scan_images(raw.train + raw.val + raw.test)
        if not bad:
            return raw, []
        if self.on_bad_image == "error":
            raise FedPromptError(bad_images_message(bad))
        skip = {path for path, _ in bad}
        warn(f"data: left out {len(bad)} unreadable image file(s) (on_bad_image: skip; listed in the run "
             "directory's bad_images.txt).")
        keep = [[s for s in part if s.path not in skip] for part in (raw.train, raw.val, raw.test)]
        return DatasetSplits(raw.classnames, keep[0], keep[2], val=keep[1], name=raw.name, loader=raw.loader), bad

    def setup(self) -> FederatedSplits:
        """Read, check the image files, partition and few-shot sample; deterministic for a given ``seed``."""
        raw, bad = self._without_bad_images(self.read())
        splits = federate(raw, self.partition or self.default_partition(), self.num_shots, self.seed,
                          self.subsample_classes, self.validation)
        splits.bad_images = bad
        return splits


def missing_dirs(path: Path) -> list[Path]:
    """The folders of ``path`` (itself included) that do not exist yet, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    return missing[::-1]


def make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; returns the folders created, outermost first."""
    missing = missing_dirs(path)
    if missing:
        missing[-1].mkdir(parents=True, exist_ok=True)
    return missing


@contextmanager
def remove_if_left_empty(folders: list[Path]):
    """If the block fails, remove the given folders (made for a download) that hold no file, so a failed download
    leaves nothing behind that looks like a dataset."""
    try:
        yield
    except BaseException:
        for folder in reversed(folders):
            if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
                shutil.rmtree(folder, ignore_errors=True)
        raise


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def stratified_split(samples: list[Sample], test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/test split per (domain, class)."""
    groups = defaultdict(list)
    for s in samples:
        groups[(s.domain, s.label)].append(s)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for key in sorted(groups):
        items = groups[key]
        order = rng.permutation(len(items))
        n_test = int(round(len(items) * test_fraction))
        test.extend(items[i] for i in sorted(order[:n_test]))
        train.extend(items[i] for i in sorted(order[n_test:]))
    return train, test


class DomainFolders(FederatedData):
    """Multi-domain image folders ``root/<domain>/<class>/<image>`` (PACS, DomainNet or Office-Caltech10 as folders).

    Class names are the sorted union of class folders (underscores become spaces in prompts); one client per
    domain by default. Without a given split, each domain's images are split into train/test per class, seeded.

    Args:
        domains: domains to use, in client order (default: every domain folder, sorted).
        test_fraction: fraction of each (domain, class) held out as test images.
    """

    def __init__(self, domains: list[str] | None = None, test_fraction: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.domains = domains
        if not 0 < test_fraction < 1:
            raise FedPromptError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction

    def default_partition(self) -> Partitioner:
        return ByDomain()

    def read(self) -> DatasetSplits:
        root = self.resolve_root()
        available = _class_folders(root)
        domains = self.domains or available
        missing = [d for d in domains if d not in available]
        if missing:
            raise FedPromptError(f"data.domains: {missing} not found in {root}; available domains: {available}")
        classnames = sorted({c for d in domains for c in _class_folders(root / d)})
        if not classnames:
            raise FedPromptError(f"data.root {root}: no class folders under the domains {domains}; expected "
                                 "root/<domain>/<class>/<image>.")
        files = {(d, c): _image_files(root / d / c) for d in domains for c in classnames if (root / d / c).is_dir()}
        counts = {c: sum(len(files.get((d, c), [])) for d in domains) for c in classnames}
        folders = {c: [root / d / c for d in domains if (d, c) in files] for c in classnames}
        classnames = self.keep_classes_with_images(classnames, counts, folders)
        samples = [Sample(str(p), label, domain) for domain in domains for label, name in enumerate(classnames)
                   for p in files.get((domain, name), [])]
        train, test = stratified_split(samples, self.test_fraction, self.seed)
        return DatasetSplits(classnames, train, test, name=root.name)


class SplitFolders(FederatedData):
    """Image folders with a given split: ``root/{train,test}/<class>/<image>`` (the layout of cifar10-mini).

    Class names are the sorted class folders of ``train``; the default partition is :class:`IID` over 10 clients.
    """

    def read(self) -> DatasetSplits:
        root = self.resolve_root()
        for split in ("train", "test"):
            if not (root / split).is_dir():
                raise FedPromptError(f"data.root {root}: missing the '{split}' folder; expected "
                                     "root/train/<class>/<image> and root/test/<class>/<image>.")
        classnames = _class_folders(root / "train")
        files = {(split, c): _image_files(root / split / c) for split in ("train", "test") for c in classnames
                 if (root / split / c).is_dir()}
        counts = {c: len(files.get(("train", c), [])) + len(files.get(("test", c), [])) for c in classnames}
        folders = {c: [root / split / c for split in ("train", "test") if (split, c) in files] for c in classnames}
        classnames = self.keep_classes_with_images(classnames, counts, folders)
        splits = {split: [Sample(str(p), label, "") for label, name in enumerate(classnames)
                          for p in files.get((split, name), [])] for split in ("train", "test")}
        if not splits["train"]:
            raise FedPromptError(f"data.root {root}: no images under {root / 'train'}")
        return DatasetSplits(classnames, splits["train"], splits["test"], name=root.name)


class CIFAR(FederatedData):
    """CIFAR-10 or CIFAR-100 through torchvision (``root`` holds ``cifar-10-batches-py`` / ``cifar-100-python``),
    or as image folders ``root/{train,test}/<class>/<image>`` (e.g. cifar10-mini), read like :class:`SplitFolders`.

    Args:
        name: ``cifar10`` or ``cifar100``.
        download: let torchvision download the archive into ``root`` (needs network).
    """

    def __init__(self, name: str = "cifar10", download: bool = False, **kwargs):
        super().__init__(**kwargs)
        if name not in ("cifar10", "cifar100"):
            raise FedPromptError(f"data.name must be 'cifar10' or 'cifar100', got {name!r}")
        self.name = name
        self.download = download

    def read(self) -> DatasetSplits:
        import torchvision

        if self.root and (Path(self.root) / "train").is_dir():  # image folders root/{train,test}/<class>/*
            return SplitFolders.read(self)
        made = make_dirs(Path(os.path.expanduser(self.root))) if self.download and self.root else []
        root = self.resolve_root()
        cls = torchvision.datasets.CIFAR10 if self.name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            with remove_if_left_empty(made):
                sets = {split: cls(str(root), train=split == "train", download=self.download)
                        for split in ("train", "test")}
        except RuntimeError as err:
            raise FedPromptError(f"data: {self.name} not found under {root} ({err}). Pass --data.download true "
                                 "(needs network) or put the extracted python version of the dataset there.") from None
        except Exception as err:  # network errors from the download
            raise FedPromptError(f"data: could not download {self.name} into {root} ({type(err).__name__}). "
                                 f"Offline, copy the extracted torchvision archive into {root}, or pass --data.root "
                                 "with image folders root/{train,test}/<class>/<image>, and --data.download false.") \
                from None
        classnames = [c.replace("_", " ") for c in sets["train"].classes]
        samples = {split: [Sample(f"{self.name}:{split}:{i}", int(t), "") for i, t in enumerate(ds.targets)]
                   for split, ds in sets.items()}

        def loader(sample: Sample) -> Image.Image:
            _, split, index = sample.path.split(":")
            return sets[split][int(index)][0].convert("RGB")

        loader.cache_key = _folder_key(f"torchvision.{cls.__name__}", Path(root) / cls.base_folder)
        return DatasetSplits(classnames, samples["train"], samples["test"], name=self.name, loader=loader)


def _folder_key(name: str, folder: Path) -> str:
    """Identity of a loader reading the files of ``folder`` (names, sizes, mtimes): keys the decoded-image store."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()) \
        if folder.is_dir() else []
    return json.dumps([name, str(folder.resolve()), files])


SYNTHETIC_NAMES = ["red square", "green circle", "blue triangle", "yellow cross", "purple ring", "orange bar",
                   "white dot", "black line"]


class Synthetic(FederatedData):
    """Generated images (class = a colour and a pattern, plus noise); no files, for smoke runs and tests.

    Args:
        num_classes: number of classes (at most 8).
        train_per_class: train images per class per domain.
        test_per_class: test images per class per domain.
        image_size: side of the generated images.
        num_domains: number of domains (each shifts brightness); >1 gives one client per domain by default.
    """

    def __init__(self, num_classes: int = 4, train_per_class: int = 16, test_per_class: int = 8,
                 image_size: int = 32, num_domains: int = 1, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= num_classes <= len(SYNTHETIC_NAMES):
            raise FedPromptError(f"data.num_classes must be in 1..{len(SYNTHETIC_NAMES)}, got {num_classes}")
        small = {k: v for k, v in dict(train_per_class=train_per_class, test_per_class=test_per_class,
                                       image_size=image_size, num_domains=num_domains).items() if v < 1}
        if small:
            raise FedPromptError("; ".join(f"--data.{k} must be >= 1, got {v}" for k, v in small.items()) + ".")
        self.num_classes = num_classes
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.image_size = image_size
        self.num_domains = num_domains

    def default_partition(self) -> Partitioner:
        return ByDomain() if self.num_domains > 1 else IID(4)

    def read(self) -> DatasetSplits:
        splits = {}
        for split, n in (("train", self.train_per_class), ("test", self.test_per_class)):
            splits[split] = [Sample(f"synthetic:{split}:{d}:{c}:{i}", c, f"domain{d}")
                             for d in range(self.num_domains) for c in range(self.num_classes) for i in range(n)]
        size, seed = self.image_size, self.seed

        def loader(sample: Sample) -> Image.Image:
            _, split, d, c, i = sample.path.split(":")
            d, c, i = int(d), int(c), int(i)
            rng = np.random.default_rng([seed, int(split == "test"), d, c, i])
            colour = np.array([(c * 97) % 256, (c * 57 + 80) % 256, (c * 151 + 30) % 256], dtype=np.float32)
            yy, xx = np.mgrid[:size, :size]
            pattern = (np.sin((xx * np.cos(c) + yy * np.sin(c)) * (c + 1) * 0.4) > 0)[..., None]
            image = colour * (0.5 + 0.5 * pattern) * (0.6 + 0.2 * d) + rng.normal(0, 25, (size, size, 3))
            return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))

        return DatasetSplits(SYNTHETIC_NAMES[: self.num_classes], splits["train"], splits["test"],
                             name="synthetic", loader=loader)
