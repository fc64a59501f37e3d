"""The reader base class and the shared protocol: a :class:`FederatedData` reads a dataset (``read``) and
:func:`federate` deals it to clients (validation carve-out, base/novel subsampling, partition, few-shot sampling).

A config selects a reader with ``class_path`` (``fedprompt.data.DomainFolders``, ``fedprompt.data.SplitFolders``,
``fedprompt.data.CIFAR``, ``fedprompt.data.Synthetic``, the CoOp-format readers, ...) and overrides its arguments
with flags such as ``--data.root``. New datasets subclass :class:`FederatedData` and implement
:meth:`FederatedData.read`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from PIL import Image

from fedprompt.args import DATA_SEED_MAX, check_seed
from fedprompt.data.base import DatasetSplits, EvalSet, FederatedSplits, load_rgb
from fedprompt.data.check import bad_images_message, scan_images
from fedprompt.data.partition import IID, Partitioner, few_shot
from fedprompt.data.protocols import assign_validation, subsample_classes, validation_split
from fedprompt.errors import FedPromptError, warn

DATA_ENV = "FEDPROMPT_DATA"
#: Pillow's own decompression-bomb limit (the default of ``data.max_image_pixels``)
PILLOW_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


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
        warn_few_shots(clients, source.classnames, num_shots, dataset)
        clients = [few_shot(c, num_shots, seed) for c in clients]
    if validation:
        clients = assign_validation(clients, source.val, source.classnames)
    empty = [c.client_id for c in clients if not c.train]
    if empty:
        raise FedPromptError(f"data.partition gives clients {empty} of {dataset} no train samples; use fewer clients "
                             "or another partition.")
    return FederatedSplits(source.classnames, clients, source, novel,
                           dataset_eval_sets(source, novel, dataset, subsample))


def warn_few_shots(clients, classnames: list[str], num_shots: int, dataset: str, limit: int = 8) -> None:
    """One warning naming the classes that have fewer than ``num_shots`` train images on a client (all of theirs
    are kept), or saying that ``num_shots`` keeps every image."""
    short, most = [], (0, "", "")
    for client in clients:
        names = client.classnames or classnames
        counts: dict[int, int] = {}
        for sample in client.train:
            counts[sample.label] = counts.get(sample.label, 0) + 1
        who = client.name or f"client {client.client_id}"
        for label, count in sorted(counts.items()):
            most = max(most, (count, who, names[label]))
            if count < num_shots:
                short.append(f"{who}/{names[label]} {count}")
    if not short:
        return
    if most[0] < num_shots:
        warn(f"data.num_shots {num_shots} keeps every train image of {dataset}: no class of any client has that many "
             f"(the most is {most[0]}, {most[1]}/{most[2]}).")
        return
    shown = ", ".join(short[:limit]) + (f" and {len(short) - limit} more" if len(short) > limit else "")
    warn(f"data.num_shots {num_shots}: {len(short)} (client, class) pair(s) of {dataset} have fewer train images, so "
         f"all of theirs are kept: {shown}.")


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
        max_image_pixels: Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, its default): an image
            whose header claims more than twice this many pixels is refused while indexing, as a bad image; raise
            it for genuine large images (``null``: no limit).
    """

    default_dirname = ""

    def __init__(self, root: str | None = None, dirname: str | None = None, partition: Partitioner | None = None,
                 num_shots: int | None = None, seed: int = 0, num_workers: int = 0,
                 subsample_classes: Literal["all", "base", "novel"] = "all", validation: bool = False,
                 check_images: bool = True, on_bad_image: Literal["error", "skip"] = "error",
                 empty_classes: Literal["error", "drop"] = "error",
                 max_image_pixels: int | None = PILLOW_MAX_IMAGE_PIXELS):
        if num_shots is not None and num_shots < 1:
            raise FedPromptError(f"--data.num_shots must be >= 1 (or null for every image), got {num_shots}.")
        if num_workers < 0:
            raise FedPromptError(f"--data.num_workers must be >= 0, got {num_workers}.")
        check_seed("--data.seed", seed, DATA_SEED_MAX)
        if max_image_pixels is not None and max_image_pixels < 1:
            raise FedPromptError(f"--data.max_image_pixels must be >= 1 (or null for no limit), got {max_image_pixels}.")
        self.max_image_pixels = max_image_pixels
        if root is not None and not str(root).strip():
            raise FedPromptError("--data.root is empty; pass the dataset folder (or leave it out to use "
                                 f"${DATA_ENV}).")
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
                                 f"the dataset (see docs/data.md).")
        if not root.is_dir():
            raise FedPromptError(f"data.root: {root} is a file, not a folder. Pass --data.root with the folder of "
                                 "the dataset (see docs/data.md).")
        if not os.access(root, os.R_OK | os.X_OK):
            raise FedPromptError(f"data.root: the folder {root} cannot be read (permission denied); fix its "
                                 "permissions or pass another --data.root.")
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

    def read_checked(self) -> tuple[DatasetSplits, list[tuple[str, str]]]:
        """:meth:`read`, then check the image files (``check_images``): the splits without the bad files it may
        leave out (``on_bad_image: skip``) and those files as ``(path, reason)``."""
        return self._without_bad_images(self.read())

    def _without_bad_images(self, raw: DatasetSplits) -> tuple[DatasetSplits, list[tuple[str, str]]]:
        Image.MAX_IMAGE_PIXELS = self.max_image_pixels  # Pillow's limit, in this process and its data workers
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
        raw, bad = self.read_checked()
        splits = federate(raw, self.partition or self.default_partition(), self.num_shots, self.seed,
                          self.subsample_classes, self.validation)
        splits.bad_images = bad
        return splits
