"""ImageNet and its four test-only variants, in the layout of CoOp's ``DATASETS.md``.

Each dataset lives in its own folder (``data.root``, or ``$FEDPROMPT_DATA/<dirname>``; ``root`` may also be the
folder that holds them all)::

    imagenet/              images/train/<wnid>/*.JPEG  images/val/<wnid>/*.JPEG  classnames.txt
    imagenetv2/            imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg  classnames.txt
    imagenet-sketch/       images/<wnid>/*.JPEG  classnames.txt
    imagenet-adversarial/  imagenet-a/<wnid>/*.jpg (200 classes; README.txt ignored)  classnames.txt
    imagenet-rendition/    imagenet-r/<wnid>/*.jpg (200 classes; README.txt ignored)  classnames.txt

``classnames.txt`` is CoOp's file (one ``<wnid> <class name>`` line per class, CLIP's names), copied next to each
variant. Labels follow the sorted wnids, as CoOp's loaders do: ImageNet's 1000 train folders; ImageNet-Sketch's
1000 folders; the 200 folders of ImageNet-A and ImageNet-R, which are scored with their own 200-way class list (the
names of those 200 wnids). ImageNetV2's folder ``i`` holds ImageNet class ``i``, the i-th wnid in sorted order (CoOp
takes the i-th line of classnames.txt, the same class when the file is sorted by wnid, as CoOp's is). ImageNet's
``val`` folder (50,000 images in class folders) is the test set, as in CoOp; it has no validation split of its own
(``data.validation: true`` moves min(shots, 4) images per class out of train).

The folders are listed with ``os.scandir`` (no image is opened while listing); the file checks that follow read only
each file's header and last bytes (:mod:`fedprompt.data.check`). Both steps print how long they took on ImageNet's
1.28 M train files (see docs/data.md, "ImageNet and its variants", for the measured times).
Checks: a missing ``classnames.txt``, a class folder whose wnid is not in it, a folder count other than the dataset's
(1000 or 200; ``num_classes: null`` accepts any, e.g. for a subset), ImageNetV2 folders other than ``0..n-1``, loose
images in ImageNet's ``val`` root (not sorted into class folders), and a class folder without images are each one
:class:`~fedprompt.errors.FedPromptError` naming the folder or file.

The variants have no train images: they are evaluation targets of :class:`fedprompt.data.Transfer` (cross-domain:
train on ImageNet, evaluate on ImageNet-V2, -Sketch, -A and -R, each with its own class list).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from fedprompt.data.base import DatasetSplits, Sample
from fedprompt.data.folders import IMAGE_SUFFIXES
from fedprompt.data.partition import Partitioner, Pathological
from fedprompt.data.reader import FederatedData
from fedprompt.errors import FedPromptError

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
CLASSNAMES = "classnames.txt"


def note(message: str) -> None:
    """One ``fedprompt: ...`` progress line on stderr."""
    print(f"fedprompt: {message}", file=sys.stderr, flush=True)


def read_classnames(path: Path, reader: str) -> dict[str, str]:
    """CoOp's ``classnames.txt``: ``{wnid: class name}`` in file order (one ``<wnid> <name ...>`` line per class)."""
    if not path.is_file():
        raise FedPromptError(f"{reader}: the class list {path} is missing; copy CoOp's classnames.txt (one "
                             f"'<wnid> <class name>' line per ImageNet class, {COOP_DATASETS_MD}) to {path}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FedPromptError(f"{path}: not a UTF-8 text file; download CoOp's classnames.txt again.") from None
    names: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        name = " ".join(name.split())
        if not name:
            raise FedPromptError(f"{path}, line {number}: {line.strip()!r} has no class name; expected "
                                 "'<wnid> <class name>'.")
        if wnid in names:
            raise FedPromptError(f"{path}, line {number}: the wnid {wnid} occurs twice.")
        names[wnid] = name
    if not names:
        raise FedPromptError(f"{path}: no classes; expected one '<wnid> <class name>' line per class.")
    return names


def index_folders(folder: Path) -> tuple[dict[str, list[str]], int]:
    """``({class folder name: sorted image paths}, number of image files directly in folder)``, listed with
    ``os.scandir`` (file types from the directory entries: no file is opened or stat-ed on most file systems).
    Hidden entries and files that are not images (README.txt) are skipped."""
    classes: dict[str, list[str]] = {}
    loose = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                with os.scandir(entry.path) as files:
                    classes[entry.name] = sorted(
                        f.path for f in files if not f.name.startswith(".") and f.is_file()
                        and os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                loose += 1
    return classes, loose


class _ImageNetFolders(FederatedData):
    """Shared reader of the ImageNet family: the dataset folder, ``classnames.txt``, folder listing and checks.

    Subclasses set ``default_dirname`` (CoOp's folder name), ``image_dir`` (the class folders' parent, relative to
    the dataset folder) and ``dataset_name``.
    """

    default_dirname = ""
    image_dir = ""
    dataset_name = ""
    expected_classes = 1000

    def __init__(self, num_classes: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if num_classes is not None and num_classes < 1:
            raise FedPromptError(f"--data.num_classes must be >= 1 (or null for any number), got {num_classes}.")
        self.num_classes = num_classes

    @property
    def reader(self) -> str:
        return type(self).__name__

    def _root(self) -> Path:
        """The dataset folder: ``root``, or ``root/<default_dirname>`` when ``root`` holds the datasets."""
        root = self.resolve_root()
        nested = root / self.default_dirname
        if not (root / CLASSNAMES).exists() and nested.is_dir():
            return nested
        return root

    def _folder(self, path: Path) -> Path:
        if not path.is_dir():
            raise FedPromptError(f"{self.reader}: the image folder {path} is missing; {self.reader} expects "
                                 f"{self.default_dirname}/{self.image_dir}/<class folder>/<image> and "
                                 f"{self.default_dirname}/{CLASSNAMES} under data.root, as CoOp's DATASETS.md "
                                 f"says ({COOP_DATASETS_MD}).")
        return path

    def _check_count(self, folder: Path, found: int) -> None:
        expected = self.num_classes
        if expected is not None and found != expected:
            raise FedPromptError(f"{self.reader}: {folder} has {found} class folders, expected {expected}; the "
                                 f"download is incomplete or another dataset. Pass --data.num_classes {found} (or "
                                 "null) to read it anyway.")

    def _check_known(self, wnids: list[str], names: dict[str, str], folder: Path, path: Path) -> None:
        unknown = [w for w in wnids if w not in names]
        if unknown:
            raise FedPromptError(f"{self.reader}: {len(unknown)} class folder(s) of {folder} are not in {path}: "
                                 f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}; use CoOp's "
                                 f"classnames.txt ({COOP_DATASETS_MD}).")

    def _samples(self, labels: list[str], files: dict[str, list[str]]) -> list[Sample]:
        return [Sample(path, label, "") for label, key in enumerate(labels) for path in files.get(key, [])]


class ImageNet(_ImageNetFolders):
    """ImageNet (ILSVRC-2012) in CoOp's layout: ``imagenet/images/{train,val}/<wnid>/`` and ``classnames.txt``.

    Labels are the sorted train wnids; class names come from ``classnames.txt``; ``val`` (class folders) is the
    test set. The default partition is the papers' :class:`~fedprompt.data.Pathological` over 10 clients (each
    client owns 100 classes; with ``num_shots: 16`` the clients together hold CoOp's 16-shot ImageNet).

    Args:
        num_classes: the number of train class folders expected (1000); null accepts any (a subset).
    """

    default_dirname = "imagenet"
    image_dir = "images"
    dataset_name = "imagenet"

    def __init__(self, num_classes: Optional[int] = 1000, **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)

    def default_partition(self) -> Partitioner:
        return Pathological(10)

    def read(self) -> DatasetSplits:
        root = self._root()
        names = read_classnames(root / CLASSNAMES, self.reader)
        train_dir = self._folder(root / self.image_dir / "train")
        val_dir = self._folder(root / self.image_dir / "val")
        start = time.perf_counter()
        train, _ = index_folders(train_dir)
        val, loose = index_folders(val_dir)
        seconds = time.perf_counter() - start
        wnids = sorted(train)
        self._check_count(train_dir, len(wnids))
        self._check_known(wnids, names, train_dir, root / CLASSNAMES)
        if loose and not val:
            raise FedPromptError(f"{self.reader}: {val_dir} holds {loose} images but no class folders; sort them into "
                                 f"<wnid>/ folders (CoOp's DATASETS.md: the val images must be in class folders, "
                                 f"{COOP_DATASETS_MD}).")
        extra = sorted(set(val) - set(train))
        if extra:
            raise FedPromptError(f"{self.reader}: {len(extra)} class folder(s) of {val_dir} have no train folder in "
                                 f"{train_dir}: {', '.join(extra[:10])}; val and train must hold the same classes.")
        counts = {w: len(train[w]) + len(val.get(w, [])) for w in wnids}
        folders = {w: [train_dir / w] + ([val_dir / w] if w in val else []) for w in wnids}
        wnids = self.keep_classes_with_images(wnids, counts, folders)
        train_samples, test_samples = self._samples(wnids, train), self._samples(wnids, val)
        note(f"{self.reader}: listed {len(train_samples):,} train and {len(test_samples):,} val images of "
             f"{len(wnids)} classes in {seconds:.1f} s (no image opened)")
        return DatasetSplits([names[w] for w in wnids], train_samples, test_samples, name=self.dataset_name)


class _TestOnly(_ImageNetFolders):
    """A test-only ImageNet variant: every image is a test image; evaluated as a target of
    :class:`fedprompt.data.Transfer`, never trained on."""

    def setup(self):
        raise FedPromptError(f"{self.reader} is a test-only dataset (it has no train images): evaluate on it as a "
                             "target of fedprompt.data.Transfer (data.targets; see configs/*_xdomain.yaml).")

    def _listing(self) -> tuple[Path, dict[str, str], dict[str, list[str]], float]:
        root = self._root()
        names = read_classnames(root / CLASSNAMES, self.reader)
        folder = self._folder(root / self.image_dir)
        start = time.perf_counter()
        files, _ = index_folders(folder)
        return folder, names, files, time.perf_counter() - start

    def _finish(self, folder: Path, classnames: list[str], keys: list[str], files: dict[str, list[str]],
                seconds: float) -> DatasetSplits:
        counts = {k: len(files.get(k, [])) for k in keys}
        kept = self.keep_classes_with_images(keys, counts, {k: [folder / k] for k in keys})
        name_of = dict(zip(keys, classnames))
        test = self._samples(kept, files)
        note(f"{self.reader}: listed {len(test):,} test images of {len(kept)} classes in {seconds:.1f} s")
        return DatasetSplits([name_of[k] for k in kept], [], test, name=self.dataset_name)

    def read(self) -> DatasetSplits:
        folder, names, files, seconds = self._listing()
        wnids = sorted(files)
        self._check_count(folder, len(wnids))
        self._check_known(wnids, names, folder, folder.parent / CLASSNAMES)
        return self._finish(folder, [names[w] for w in wnids], wnids, files, seconds)


class ImageNetV2(_TestOnly):
    """ImageNetV2 (matched frequency), test only: ``imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/``
    and ``classnames.txt``. Folder ``i`` holds ImageNet class ``i`` (the i-th wnid of classnames.txt in sorted
    order); 1000 classes, ImageNet's class list.

    Args:
        num_classes: the number of class folders expected (1000, named 0..999); null accepts any n (folders 0..n-1,
            classnames.txt with n wnids).
    """

    default_dirname = "imagenetv2"
    image_dir = "imagenetv2-matched-frequency-format-val"
    dataset_name = "imagenetv2"

    def __init__(self, num_classes: Optional[int] = 1000, **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)

    def read(self) -> DatasetSplits:
        folder, names, files, seconds = self._listing()
        self._check_count(folder, len(files))
        expected = [str(i) for i in range(len(files))]
        if sorted(files, key=lambda k: (len(k), k)) != expected:
            odd = sorted(set(files) - set(expected))[:10]
            raise FedPromptError(f"{self.reader}: the class folders of {folder} must be named 0..{len(files) - 1} "
                                 f"(ImageNet's class indices); found {', '.join(odd)}.")
        wnids = sorted(names)
        if len(wnids) != len(files):
            raise FedPromptError(f"{self.reader}: {folder.parent / CLASSNAMES} has {len(wnids)} classes but {folder} "
                                 f"has {len(files)} class folders; folder i is the i-th wnid in sorted order, so the "
                                 "class list must be ImageNet's (copy imagenet/classnames.txt).")
        return self._finish(folder, [names[w] for w in wnids], expected, files, seconds)


class ImageNetSketch(_TestOnly):
    """ImageNet-Sketch, test only: ``imagenet-sketch/images/<wnid>/`` and ``classnames.txt``; 1000 classes (the
    sorted wnids), ImageNet's class list.

    Args:
        num_classes: the number of class folders expected (1000); null accepts any.
    """

    default_dirname = "imagenet-sketch"
    image_dir = "images"
    dataset_name = "imagenet-sketch"

    def __init__(self, num_classes: Optional[int] = 1000, **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)


class ImageNetA(_TestOnly):
    """ImageNet-A (natural adversarial examples), test only: ``imagenet-adversarial/imagenet-a/<wnid>/`` (200
    classes) and ``classnames.txt``. Scored with its own 200-way class list (the sorted 200 wnids' names), never
    ImageNet's 1000-way one.

    Args:
        num_classes: the number of class folders expected (200); null accepts any.
    """

    default_dirname = "imagenet-adversarial"
    image_dir = "imagenet-a"
    dataset_name = "imagenet-a"

    def __init__(self, num_classes: Optional[int] = 200, **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)


class ImageNetR(_TestOnly):
    """ImageNet-R (renditions), test only: ``imagenet-rendition/imagenet-r/<wnid>/`` (200 classes) and
    ``classnames.txt``. Scored with its own 200-way class list (the sorted 200 wnids' names).

    Args:
        num_classes: the number of class folders expected (200); null accepts any.
    """

    default_dirname = "imagenet-rendition"
    image_dir = "imagenet-r"
    dataset_name = "imagenet-r"

    def __init__(self, num_classes: Optional[int] = 200, **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)


IMAGENET_VARIANTS = (ImageNetV2, ImageNetSketch, ImageNetA, ImageNetR)
