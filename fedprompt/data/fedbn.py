"""DomainNet and Office-Caltech10 as used by FedBN and the federated prompt-learning papers (feature shift).

Two layouts are read (``layout: auto`` picks the first that is present):

- **FedBN pickles** (the papers' split)::

      <root>/clipart_train.pkl  clipart_test.pkl  ...      root = $FEDPROMPT_DATA/DomainNet
      <root>/clipart/bird/clipart_012_000001.jpg  ...      the images

  Each ``<site>_{train,test}.pkl`` holds a pair (image paths, text labels), lists or numpy arrays. FedBN stores the
  paths relative to the folder *above* the dataset folder (``DomainNet/clipart/bird/x.jpg``, opened as
  ``os.path.join('../data', path)``). Each path is looked for as given (absolute), under the parent of ``root``,
  under ``root``, under ``root`` after the dataset folder's name (``../data/DomainNet/clipart/...`` ->
  ``root/clipart/...``) and under ``root`` from the site's name on. If some stay missing, one error lists how many,
  the first one and the layout expected. The pickles are read with :mod:`fedprompt.data.safe_pickle` (no code
  from the file runs). ``root`` may also be the folder that holds ``DomainNet/`` (``office_caltech_10/``).
- **Image folders** ``<root>/<site>/<class>/<image>`` (e.g. the DomainNet download, or office_caltech_10 as
  folders): read with :class:`~fedprompt.data.folders.DomainFolders` rules (a seeded per (site, class) train/test
  split of ``test_fraction``), restricted to the papers' 10 classes unless ``all_classes`` is set.

Class names are always a sorted list (FedOTP builds them as a Python ``set``, whose order changes from process to
process and does not match the labels; see the specs), shown with underscores as spaces. One client per site by
default (:class:`~fedprompt.data.partition.ByDomain`).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from fedprompt.data.base import DatasetSplits, Sample
from fedprompt.data.folders import DomainFolders, image_files, stratified_split
from fedprompt.data.safe_pickle import safe_load
from fedprompt.errors import FedPromptError

LAYOUTS = ("auto", "pickle", "folders")


def _as_str_list(value, path: Path, what: str) -> list:
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise FedPromptError(f"{path}: the {what} must be a 1-d list or array, got shape {value.shape}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise FedPromptError(f"{path}: the {what} must be a list or numpy array, got {type(value).__name__}")
    return list(value)


def read_fedbn_pickle(path: Path) -> tuple[list[str], list[str]]:
    """A FedBN split file: ``(image paths, text labels)``, two equally long lists of strings."""
    content = safe_load(path)
    if isinstance(content, np.ndarray) and content.dtype == object and content.shape[:1] == (2,):
        content = list(content)
    if not isinstance(content, (list, tuple)) or len(content) != 2:
        raise FedPromptError(f"{path}: expected a pickled pair (image paths, text labels), got "
                             f"{type(content).__name__}" + (f" of length {len(content)}"
                                                           if isinstance(content, (list, tuple)) else ""))
    paths = _as_str_list(content[0], path, "image paths")
    labels = _as_str_list(content[1], path, "labels")
    if len(paths) != len(labels):
        raise FedPromptError(f"{path}: {len(paths)} image paths but {len(labels)} labels")
    bad = next((x for x in paths if not isinstance(x, str)), None)
    if bad is not None:
        raise FedPromptError(f"{path}: image paths must be strings, found {bad!r}")
    bad = next((x for x in labels if not isinstance(x, str)), None)
    if bad is not None:
        raise FedPromptError(f"{path}: labels must be class-name strings, found {bad!r}")
    return [str(x) for x in paths], [str(x) for x in labels]


class _FedBNDomains(DomainFolders):
    """Shared reader of the FedBN feature-shift datasets (pickles or image folders).

    Args:
        domains: sites to use, in client order (default: every site of the dataset, in the papers' order).
        test_fraction: image-folder layout only: fraction of each (site, class) held out as test images.
        layout: ``auto`` (the pickles if ``<site>_train.pkl`` exists, else image folders), ``pickle`` or
            ``folders``.
        classes: classes to read (raw names, e.g. ``ice_cream``); ``null`` is the papers' 10 classes.
        all_classes: image-folder layout only: read every class folder (e.g. all 345 DomainNet classes) instead of
            ``classes``.
    """

    sites: tuple[str, ...] = ()
    default_classes: tuple[str, ...] = ()

    def __init__(self, domains: list[str] | None = None, test_fraction: float = 0.3, layout: str = "auto",
                 classes: list[str] | None = None, all_classes: bool = False, **kwargs):
        super().__init__(domains=domains, test_fraction=test_fraction, **kwargs)
        if layout not in LAYOUTS:
            raise FedPromptError(f"data.layout must be one of {list(LAYOUTS)}, got {layout!r}")
        self.layout = layout
        self.classes = list(classes) if classes is not None else list(self.default_classes)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise FedPromptError(f"data.classes must be a non-empty list of distinct class names, got {classes}")
        self.all_classes = all_classes
        if domains is not None:
            unknown = [d for d in domains if d not in self.sites]
            if unknown:
                raise FedPromptError(f"data.domains: {unknown} are not {type(self).__name__} sites; choose from "
                                     f"{list(self.sites)}")

    # -------------------------------------------------------------------------------------------------- layout
    def _dataset_root(self) -> Path:
        root = self.resolve_root()
        nested = root / self.default_dirname
        if not self._looks_like_dataset(root) and self._looks_like_dataset(nested):
            return nested
        return root

    def _has_pickles(self, folder: Path) -> bool:
        return any((folder / f"{site}_train.pkl").is_file() for site in self.sites)

    def _looks_like_dataset(self, folder: Path) -> bool:
        return self._has_pickles(folder) or any((folder / site).is_dir() for site in self.sites)

    def _sites(self) -> list[str]:
        return list(self.domains) if self.domains else list(self.sites)

    def read(self) -> DatasetSplits:
        root = self._dataset_root()
        layout = self.layout
        if layout == "auto":
            layout = "pickle" if self._has_pickles(root) else "folders"
        if layout == "pickle":
            return self._read_pickles(root)
        return self._read_folders(root)

    def _example(self, root: Path) -> str:
        site, cls = self.sites[0], self.default_classes[0]
        return (f"expected {root}/{site}_train.pkl and {root}/{site}_test.pkl (FedBN's split files), with the images "
                f"at {root}/{site}/{cls}/<image> as the pickles name them ('{self.default_dirname}/{site}/{cls}/"
                f"<image>', relative to {root.parent}); or image folders {root}/<site>/<class>/<image> with "
                f"data.layout folders.")

    # ----------------------------------------------------------------------------------------------- pickles
    def _candidates(self, root: Path, stored: str, site: str) -> list[Path]:
        stored_path = PurePosixPath(stored.replace("\\", "/"))
        parts = [p for p in stored_path.parts if p not in (".", "..", "/")]
        out = []
        if stored_path.is_absolute():
            out.append(Path(stored))
        out += [root.parent.joinpath(*parts), root.joinpath(*parts)]
        lowered = [p.lower() for p in parts]
        name = self.default_dirname.lower()
        if name in lowered:
            out.append(root.joinpath(*parts[len(lowered) - 1 - lowered[::-1].index(name) + 1:]))
        if site in parts:
            out.append(root.joinpath(*parts[parts.index(site):]))
        return out

    def _resolve(self, root: Path, stored: list[str], site: str, source: Path) -> list[str]:
        resolved, missing = [], []
        rule = None  # index of the candidate that worked last; tried first
        for path in stored:
            candidates = self._candidates(root, path, site)
            order = ([rule] if rule is not None and rule < len(candidates) else []) + list(range(len(candidates)))
            for i in order:
                if candidates[i].is_file():
                    resolved.append(str(candidates[i]))
                    rule = i
                    break
            else:
                missing.append((path, candidates))
        if missing:
            path, candidates = missing[0]
            tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
            raise FedPromptError(f"{source}: {len(missing)} of {len(stored)} images not found; the first is "
                                 f"{path!r} (looked for {tried}). {self._example(root)}")
        return resolved

    def _read_pickles(self, root: Path) -> DatasetSplits:
        raw = sorted(self.classes)
        label_of = {name: i for i, name in enumerate(raw)}
        splits: dict[str, list[Sample]] = {"train": [], "test": []}
        for site in self._sites():
            for split in ("train", "test"):
                path = root / f"{site}_{split}.pkl"
                if not path.is_file():
                    raise FedPromptError(f"{type(self).__name__}: split file {path} is missing; "
                                         f"{self._example(root)} FedBN's README (github.com/med-air/FedBN) links "
                                         "the pickles.")
                paths, labels = read_fedbn_pickle(path)
                unknown = sorted(set(labels) - set(label_of))
                if unknown:
                    raise FedPromptError(f"{path}: labels {unknown[:5]} are not among the classes {raw}; pass "
                                         "data.classes to read other classes.")
                files = self._resolve(root, paths, site, path)
                splits[split].extend(Sample(f, label_of[y], site) for f, y in zip(files, labels))
        classnames = [c.replace("_", " ") for c in raw]
        return DatasetSplits(classnames, splits["train"], splits["test"], name=self.default_dirname.lower())

    # ----------------------------------------------------------------------------------------------- folders
    def _read_folders(self, root: Path) -> DatasetSplits:
        present = [s for s in self._sites() if (root / s).is_dir()]
        if self.domains:
            missing = [s for s in self.domains if s not in present]
            if missing:
                raise FedPromptError(f"data.domains: {missing} not found in {root}. {self._example(root)}")
        if not present:
            raise FedPromptError(f"{type(self).__name__}: no site folder ({', '.join(self.sites)}) and no "
                                 f"<site>_train.pkl in {root}. {self._example(root)}")
        if self.all_classes:  # every class folder: exactly DomainFolders' reader over the present sites
            saved = self.domains, self.root
            self.domains, self.root = present, str(root)
            try:
                splits = DomainFolders.read(self)
            finally:
                self.domains, self.root = saved
            splits.classnames = [c.replace("_", " ") for c in splits.classnames]
            splits.name = self.default_dirname.lower()
            return splits
        raw = sorted(self.classes)
        samples = []
        for site in present:
            for label, name in enumerate(raw):
                folder = root / site / name
                if folder.is_dir():
                    samples.extend(Sample(str(p), label, site) for p in image_files(folder))
        found = {s.label for s in samples}
        absent = [raw[i] for i in range(len(raw)) if i not in found]
        if absent:
            raise FedPromptError(f"{type(self).__name__}: no images of {absent} under {root}/<site>/<class>/ for the "
                                 f"sites {present}. {self._example(root)}")
        train, test = stratified_split(samples, self.test_fraction, self.seed)
        return DatasetSplits([c.replace("_", " ") for c in raw], train, test, name=self.default_dirname.lower())


class DomainNet(_FedBNDomains):
    """DomainNet, FedBN's 10-class subset, one client per site by default.

    Sites: clipart, infograph, painting, quickdraw, real, sketch; ``root`` defaults to ``$FEDPROMPT_DATA/DomainNet``.

    Classes (sorted): bird, feather, headphones, ice_cream, teapot, tiger, whale, windmill, wine_glass, zebra.
    """

    default_dirname = "DomainNet"
    sites = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    default_classes = ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill",
                       "wine_glass", "zebra")


class OfficeCaltech10(_FedBNDomains):
    """Office-Caltech10, one client per site by default.

    Sites: amazon, caltech, dslr, webcam; ``root`` defaults to ``$FEDPROMPT_DATA/office_caltech_10``.

    Classes (sorted): back_pack, bike, calculator, headphones, keyboard, laptop_computer, monitor, mouse, mug,
    projector.
    """

    default_dirname = "office_caltech_10"
    sites = ("amazon", "caltech", "dslr", "webcam")
    default_classes = ("back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer", "monitor",
                       "mouse", "mug", "projector")
