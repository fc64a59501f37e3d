"""Federated datasets: a reader (``read``) plus the shared protocol (partition, few-shot sampling).

A config selects one with ``class_path`` (``fedprompt.data.DomainFolders``, ``fedprompt.data.SplitFolders``,
``fedprompt.data.CIFAR``, ``fedprompt.data.Synthetic``) and overrides its arguments with flags such as
``--data.root``. New datasets subclass :class:`FederatedData` and implement :meth:`FederatedData.read`.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from fedprompt.data.base import ClientSplit, DatasetSplits, Sample
from fedprompt.data.partition import IID, ByDomain, Partitioner, few_shot
from fedprompt.data.protocols import assign_validation, subsample_classes, validation_split
from fedprompt.errors import FedPromptError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DATA_ENV = "FEDPROMPT_DATA"


@dataclass
class FederatedSplits:
    """The result of :meth:`FederatedData.setup`: class names, every client's data and the reader's splits."""

    classnames: list[str]
    clients: list[ClientSplit]
    source: DatasetSplits
    novel: DatasetSplits | None = None
    """The novel half of a base-to-novel split (``subsample_classes: base``), for Base/Novel/HM evaluation."""

    @property
    def loader(self):
        return self.source.loader


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
    """

    default_dirname = ""

    def __init__(self, root: str | None = None, dirname: str | None = None, partition: Partitioner | None = None,
                 num_shots: int | None = None, seed: int = 0, num_workers: int = 0,
                 subsample_classes: Literal["all", "base", "novel"] = "all", validation: bool = False):
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

    def setup(self) -> FederatedSplits:
        """Read, partition and few-shot sample; deterministic for a given ``seed``."""
        raw = self.read()
        if self.validation:
            raw = validation_split(raw, self.num_shots, self.seed)
        source = subsample_classes(raw, self.subsample_classes)
        novel = subsample_classes(raw, "novel") if self.subsample_classes == "base" else None
        partition = self.partition or self.default_partition()
        clients = partition.split(source, self.seed)
        if self.num_shots is not None:
            clients = [few_shot(c, self.num_shots, self.seed) for c in clients]
        if self.validation:
            clients = assign_validation(clients, source.val)
        empty = [c.client_id for c in clients if not c.train]
        if empty:
            raise FedPromptError(f"data.partition gives clients {empty} no train samples; use fewer clients or "
                                 "another partition.")
        return FederatedSplits(source.classnames, clients, source, novel)


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
        samples = []
        for domain in domains:
            for label, name in enumerate(classnames):
                folder = root / domain / name
                if folder.is_dir():
                    samples.extend(Sample(str(p), label, domain) for p in _image_files(folder))
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
        splits = {}
        for split in ("train", "test"):
            splits[split] = [Sample(str(p), label, "") for label, name in enumerate(classnames)
                             for p in _image_files(root / split / name)]
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
        if self.download and self.root:
            os.makedirs(self.root, exist_ok=True)
        root = self.resolve_root()
        cls = torchvision.datasets.CIFAR10 if self.name == "cifar10" else torchvision.datasets.CIFAR100
        try:
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
