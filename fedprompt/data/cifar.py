"""CIFAR-10 and CIFAR-100: torchvision's archives, or image folders like cifar10-mini."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from fedprompt.data.base import DatasetSplits, Sample
from fedprompt.data.folders import SplitFolders
from fedprompt.data.reader import FederatedData
from fedprompt.errors import FedPromptError
from fedprompt.paths import make_dirs, remove_if_left_empty


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

        loader.cache_key = folder_key(f"torchvision.{cls.__name__}", Path(root) / cls.base_folder)
        return DatasetSplits(classnames, samples["train"], samples["test"], name=self.name, loader=loader)


def folder_key(name: str, folder: Path) -> str:
    """Identity of a loader reading the files of ``folder`` (names, sizes, mtimes): keys the decoded-image store."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()) \
        if folder.is_dir() else []
    return json.dumps([name, str(folder.resolve()), files])
