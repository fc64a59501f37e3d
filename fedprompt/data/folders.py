"""Image-folder readers: :class:`DomainFolders` (``root/<domain>/<class>/<image>``) and :class:`SplitFolders`
(``root/{train,test}/<class>/<image>``), and the folder listing they share with the other folder readers."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedprompt.data.base import DatasetSplits, Sample
from fedprompt.data.partition import ByDomain, Partitioner
from fedprompt.data.reader import FederatedData
from fedprompt.errors import FedPromptError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def unreadable_folder(folder, err: OSError) -> FedPromptError:
    """The error for a data folder the process cannot list: never skipped, since its images would be missing."""
    return FedPromptError(f"data: cannot read the folder {folder} ({err.strerror or err}); its images would be "
                          "left out. Fix its permissions (e.g. chmod -R u+rX) or move it out of data.root.")


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (any depth; symbolic links to folders below it are not followed), sorted.
    A sub-folder that cannot be read is an error naming it (it is not skipped)."""
    def stop(err: OSError):
        raise unreadable_folder(err.filename or folder, err)

    found = []
    for parent, _, names in os.walk(folder, onerror=stop):
        found += [Path(parent) / name for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file())


def class_folders(folder: Path) -> list[str]:
    """The names of the sub-folders of ``folder`` (the classes, or the domains), sorted; an unreadable folder is an
    error naming it."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir())
    except PermissionError as err:
        raise unreadable_folder(folder, err) from None


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
        available = class_folders(root)
        domains = self.domains or available
        missing = [d for d in domains if d not in available]
        if missing:
            raise FedPromptError(f"data.domains: {missing} not found in {root}; available domains: {available}")
        classnames = sorted({c for d in domains for c in class_folders(root / d)})
        if not classnames:
            raise FedPromptError(f"data.root {root}: no class folders under the domains {domains}; expected "
                                 "root/<domain>/<class>/<image>.")
        files = {(d, c): image_files(root / d / c) for d in domains for c in classnames if (root / d / c).is_dir()}
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
        classnames = class_folders(root / "train")
        files = {(split, c): image_files(root / split / c) for split in ("train", "test") for c in classnames
                 if (root / split / c).is_dir()}
        counts = {c: len(files.get(("train", c), [])) + len(files.get(("test", c), [])) for c in classnames}
        folders = {c: [root / split / c for split in ("train", "test") if (split, c) in files] for c in classnames}
        classnames = self.keep_classes_with_images(classnames, counts, folders)
        splits = {split: [Sample(str(p), label, "") for label, name in enumerate(classnames)
                          for p in files.get((split, name), [])] for split in ("train", "test")}
        if not splits["train"]:
            raise FedPromptError(f"data.root {root}: no images under {root / 'train'}")
        return DatasetSplits(classnames, splits["train"], splits["test"], name=root.name)
