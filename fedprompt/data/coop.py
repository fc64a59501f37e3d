"""Readers for the CoOp few-shot datasets, in the layout of CoOp's ``DATASETS.md``.

Each dataset lives in its own folder (``data.root``, or ``$FEDPROMPT_DATA/<default_dirname>``)::

    caltech-101/     101_ObjectCategories/  split_zhou_Caltech101.json
    oxford_pets/     images/ annotations/   split_zhou_OxfordPets.json
    oxford_flowers/  jpg/ imagelabels.mat cat_to_name.json split_zhou_OxfordFlowers.json
    food-101/        images/ meta/          split_zhou_Food101.json
    dtd/             images/ imdb/ labels/  split_zhou_DescribableTextures.json
    stanford_cars/   cars_train/ cars_test/ devkit/ cars_test_annos_withlabels.mat split_zhou_StanfordCars.json
    fgvc_aircraft/   images/ images_variant_{train,val,test}.txt variants.txt
    ucf101/          UCF-101-midframes/     split_zhou_UCF101.json
    sun397/          SUN397/                split_zhou_SUN397.json
    eurosat/         2750/                  split_zhou_EuroSAT.json

A split file is ``{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}`` with paths relative
to the image folder (for Stanford Cars, to the dataset folder). Class names come from the split file in label
order, as Dassl builds them, with underscores turned into spaces as CoOp's prompt learner does (the split files
already hold CoOp's cleaned names: Caltech101 without BACKGROUND_Google/Faces_easy, EuroSAT's long names, Flowers'
``cat_to_name.json`` names; raw folder names that slipped through are mapped the same way). FGVC-Aircraft has no
split file: ``variants.txt`` gives the classes in order and ``images_variant_{train,val,test}.txt`` the splits.

The papers' default partition is :class:`~fedprompt.data.partition.Pathological` over 10 clients. Where torchvision
can download the images, ``download: true`` fetches them into ``<root>/torchvision`` and links them into the CoOp
layout; CoOp's split files are not on torchvision's servers and must be fetched as ``DATASETS.md`` says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedprompt.data.base import DatasetSplits, Sample
from fedprompt.data.reader import DATA_ENV, FederatedData
from fedprompt.paths import make_dirs, remove_if_left_empty
from fedprompt.data.partition import Partitioner, Pathological
from fedprompt.errors import FedPromptError

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
SPLITS = ("train", "val", "test")


def clean_classname(name: str, name_map: dict[str, str] | None = None) -> str:
    """CoOp's prompt name of a class: a dataset-specific rename (if any), then underscores to spaces."""
    name = (name_map or {}).get(name, name)
    return " ".join(name.replace("_", " ").split())


def read_split_file(path: Path, image_root: Path) -> tuple[dict[int, str], dict[str, list[Sample]]]:
    """Read a CoOp ``split_zhou_*.json``: raw class name of each label and the samples of each split.

    Every entry must be ``[relative path, integer label, class name]``; a label must keep one name; val/test labels
    must occur in train; the train labels must be 0..C-1. Anything else is a :class:`FedPromptError` naming the
    file and the entry.
    """
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as err:
        raise FedPromptError(f"{path}: not valid JSON ({err}); download the split file again ({COOP_DATASETS_MD})."
                             ) from None
    except UnicodeDecodeError:
        raise FedPromptError(f"{path}: not a UTF-8 JSON file; download the split file again ({COOP_DATASETS_MD})."
                             ) from None
    if not isinstance(content, dict) or not all(k in content for k in ("train", "test")):
        raise FedPromptError(f"{path}: expected a JSON object with 'train', 'val' and 'test' lists of "
                             "[path, label, classname]; download the split file again.")
    names: dict[int, str] = {}
    samples: dict[str, list[Sample]] = {}
    for split in SPLITS:
        items = content.get(split, [])
        if not isinstance(items, list):
            raise FedPromptError(f"{path}: '{split}' must be a list of [path, label, classname]")
        out = []
        for i, item in enumerate(items):
            if (not isinstance(item, (list, tuple)) or len(item) != 3 or not isinstance(item[0], str)
                    or isinstance(item[1], bool) or not isinstance(item[1], int) or not isinstance(item[2], str)):
                raise FedPromptError(f"{path}: entry {i} of '{split}' is {item!r}; expected "
                                     "[relative image path, integer label, class name].")
            relpath, label, classname = item
            if label < 0:
                raise FedPromptError(f"{path}: entry {i} of '{split}' has a negative label {label}")
            if names.setdefault(label, classname) != classname:
                raise FedPromptError(f"{path}: label {label} is named both {names[label]!r} and {classname!r} "
                                     f"(entry {i} of '{split}').")
            out.append(Sample(str(image_root / relpath), label, ""))
        samples[split] = out
    train_labels = {s.label for s in samples["train"]}
    if not train_labels:
        raise FedPromptError(f"{path}: the 'train' list is empty")
    if train_labels != set(range(len(train_labels))):
        missing = sorted(set(range(max(train_labels) + 1)) - train_labels)[:10]
        raise FedPromptError(f"{path}: train labels must be 0..C-1; labels {missing} have no train image.")
    for split in ("val", "test"):
        extra = sorted({s.label for s in samples[split]} - train_labels)
        if extra:
            raise FedPromptError(f"{path}: '{split}' has labels {extra[:10]} that never occur in 'train'.")
    return names, samples


class CoOpDataset(FederatedData):
    """Base of the CoOp-layout readers: a split file under ``root`` and an image folder it points into.

    Subclasses set ``default_dirname``, ``image_dir`` (relative to ``root``; split paths are relative to it),
    ``split_file`` and, when needed, ``name_map`` (raw class name -> CoOp's name). The default partition is the
    papers' :class:`Pathological` over 10 clients. ``read()`` keeps the split file's val set in ``val``.
    """

    dataset_name = ""
    image_dir = ""
    split_file = ""
    name_map: dict[str, str] = {}

    def default_partition(self) -> Partitioner:
        return Pathological(10)

    # ------------------------------------------------------------------------------------------------ helpers
    def _root(self) -> Path:
        return self.dataset_folder(self.resolve_root())

    def dataset_folder(self, root: Path) -> Path:
        """``root`` itself, or ``root/<default_dirname>`` when ``root`` is the folder that holds the datasets (the
        ``DATA`` folder of CoOp/Dassl, with ``caltech-101/``, ``oxford_pets/``, ...)."""
        nested = root / self.default_dirname
        if not (root / self.split_file).exists() and nested.is_dir():
            return nested
        return root

    def _image_root(self, root: Path) -> Path:
        image_root = root / self.image_dir if self.image_dir else root
        if not image_root.is_dir():
            raise FedPromptError(f"{type(self).__name__}: image folder {image_root} not found; {self._layout_hint()}")
        return image_root

    def _layout_hint(self) -> str:
        return (f"{type(self).__name__} expects the layout of CoOp's DATASETS.md under data.root "
                f"({COOP_DATASETS_MD}).")

    def _check_first_image(self, samples: dict[str, list[Sample]], source: Path) -> None:
        for split in SPLITS:
            if samples.get(split):
                first = samples[split][0].path
                if not os.path.isfile(first):
                    raise FedPromptError(f"{type(self).__name__}: image {first} (first '{split}' entry of {source}) "
                                         f"not found; the images and the split file do not match. "
                                         f"{self._layout_hint()}")

    def _splits(self, classnames: list[str], samples: dict[str, list[Sample]]) -> DatasetSplits:
        return DatasetSplits(classnames, samples["train"], samples["test"], val=samples.get("val", []),
                             name=self.dataset_name or type(self).__name__.lower())

    # ---------------------------------------------------------------------------------------------------- read
    def read(self) -> DatasetSplits:
        root = self._root()
        split_path = root / self.split_file
        if not split_path.is_file():
            raise FedPromptError(
                f"{type(self).__name__}: split file {split_path} is missing. Download {self.split_file} from the "
                f"link in CoOp's DATASETS.md ({COOP_DATASETS_MD}) and put it at {split_path} (next to "
                f"{self.image_dir or 'the image folders'}/).")
        image_root = self._image_root(root)
        raw_names, samples = read_split_file(split_path, image_root)
        train_labels = {s.label for s in samples["train"]}
        classnames = [clean_classname(raw_names[label], self.name_map) for label in range(len(train_labels))]
        self._check_first_image(samples, split_path)
        return self._splits(classnames, samples)


class TorchvisionDownload(CoOpDataset):
    """A CoOp reader whose images torchvision can download.

    Args:
        download: if the image folder is missing, download the images with torchvision into
            ``<root>/torchvision`` (needs network) and link them into the CoOp layout. The split file is not part
            of that download; get it from CoOp's DATASETS.md.
    """

    #: torchvision dataset class, its extra constructor arguments, and {CoOp name under root: path under
    #: ``<root>/torchvision``} of what to link once downloaded.
    torchvision_class = ""
    torchvision_kwargs: dict = {}
    torchvision_links: dict[str, str] = {}

    def __init__(self, download: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.download = download

    def _root(self) -> Path:
        if not self.download:
            return self.dataset_folder(self.resolve_root())
        if self.root is not None:
            root = self.dataset_folder(Path(os.path.expanduser(self.root)))
        elif os.environ.get(DATA_ENV):
            root = Path(os.environ[DATA_ENV]) / self.dirname
        else:
            return self.resolve_root()  # raises the "data.root is not set" error
        made = make_dirs(root)
        if not all((root / name).exists() for name in self.required_parts()):
            with remove_if_left_empty(made + [root / "torchvision"]):
                self.download_images(root)
        return root

    def required_parts(self) -> tuple[str, ...]:
        """What must exist under ``root`` to read the dataset (besides the split file); missing -> download."""
        return (self.image_dir,)

    def download_images(self, root: Path) -> None:
        """Download with ``torchvision.datasets.<torchvision_class>`` into ``root/torchvision`` and link the parts
        CoOp's layout names (``torchvision_links``) into ``root``."""
        import torchvision

        target = root / "torchvision"
        cls = getattr(torchvision.datasets, self.torchvision_class)
        try:
            cls(str(target), download=True, **self.torchvision_kwargs)
        except Exception as err:  # network errors, checksum errors, moved URLs
            raise FedPromptError(f"{type(self).__name__}: torchvision could not download the images into {target}: "
                                 f"{err}. Download them by hand as CoOp's DATASETS.md says ({COOP_DATASETS_MD}) "
                                 f"and pass --data.root.") from None
        for name, source in self.torchvision_links.items():
            src, dst = target / source, root / name
            if dst.exists():
                continue
            if not src.exists():
                if name not in self.required_parts():
                    continue  # an extra part (e.g. annotations) this torchvision version does not ship
                raise FedPromptError(f"{type(self).__name__}: the torchvision download has no {src}; arrange "
                                     f"{root} as CoOp's DATASETS.md says ({COOP_DATASETS_MD}).")
            try:
                dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
            except OSError as err:
                raise FedPromptError(f"{type(self).__name__}: cannot link {dst} -> {src} ({err}); move {src} to "
                                     f"{dst} by hand.") from None


class Caltech101(TorchvisionDownload):
    """Caltech-101 (100 classes in CoOp's split: BACKGROUND_Google and Faces_easy are dropped).

    Layout: ``caltech-101/{101_ObjectCategories/<class>/*.jpg, split_zhou_Caltech101.json}``.
    """

    default_dirname = "caltech-101"
    dataset_name = "caltech101"
    image_dir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    name_map = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
    torchvision_class = "Caltech101"
    torchvision_links = {"101_ObjectCategories": "caltech101/101_ObjectCategories"}


class OxfordPets(TorchvisionDownload):
    """Oxford-IIIT Pets (37 breeds). Layout: ``oxford_pets/{images, annotations, split_zhou_OxfordPets.json}``."""

    default_dirname = "oxford_pets"
    dataset_name = "oxford_pets"
    image_dir = "images"
    split_file = "split_zhou_OxfordPets.json"
    torchvision_class = "OxfordIIITPet"
    torchvision_links = {"images": "oxford-iiit-pet/images", "annotations": "oxford-iiit-pet/annotations"}


class Flowers102(TorchvisionDownload):
    """Oxford Flowers-102 (names from ``cat_to_name.json``, as stored in the split file).

    Layout: ``oxford_flowers/{jpg, imagelabels.mat, cat_to_name.json, split_zhou_OxfordFlowers.json}``.
    """

    default_dirname = "oxford_flowers"
    dataset_name = "oxford_flowers"
    image_dir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    torchvision_class = "Flowers102"
    torchvision_links = {"jpg": "flowers-102/jpg", "imagelabels.mat": "flowers-102/imagelabels.mat"}


class Food101(TorchvisionDownload):
    """Food-101. Layout: ``food-101/{images/<class>/*.jpg, meta, split_zhou_Food101.json}``."""

    default_dirname = "food-101"
    dataset_name = "food101"
    image_dir = "images"
    split_file = "split_zhou_Food101.json"
    torchvision_class = "Food101"
    torchvision_links = {"images": "food-101/images", "meta": "food-101/meta"}


class DTD(TorchvisionDownload):
    """Describable Textures (47 classes).

    Layout: ``dtd/{images, imdb, labels, split_zhou_DescribableTextures.json}``.
    """

    default_dirname = "dtd"
    dataset_name = "dtd"
    image_dir = "images"
    split_file = "split_zhou_DescribableTextures.json"
    torchvision_class = "DTD"
    torchvision_links = {"images": "dtd/dtd/images", "imdb": "dtd/dtd/imdb", "labels": "dtd/dtd/labels"}


class StanfordCars(CoOpDataset):
    """Stanford Cars (196 classes); split paths are relative to the dataset folder (``cars_train/00001.jpg``).

    Layout: ``stanford_cars/{cars_train, cars_test, devkit, cars_test_annos_withlabels.mat,
    split_zhou_StanfordCars.json}``. torchvision's download of this dataset no longer works, so there is no
    ``download`` option.
    """

    default_dirname = "stanford_cars"
    dataset_name = "stanford_cars"
    image_dir = ""
    split_file = "split_zhou_StanfordCars.json"


class UCF101(CoOpDataset):
    """UCF-101 middle frames (101 actions, e.g. ``Apply_Eye_Makeup`` -> "Apply Eye Makeup").

    Layout: ``ucf101/{UCF-101-midframes/<action>/*.jpg, split_zhou_UCF101.json}``. The mid-frames are CoOp's own
    extraction (link in DATASETS.md); torchvision has only the videos, so there is no ``download`` option.
    """

    default_dirname = "ucf101"
    dataset_name = "ucf101"
    image_dir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"


class SUN397(TorchvisionDownload):
    """SUN397 (397 scenes). Layout: ``sun397/{SUN397/<letter>/<scene>/*.jpg, split_zhou_SUN397.json}``."""

    default_dirname = "sun397"
    dataset_name = "sun397"
    image_dir = "SUN397"
    split_file = "split_zhou_SUN397.json"
    torchvision_class = "SUN397"
    torchvision_links = {"SUN397": "SUN397"}


class EuroSAT(TorchvisionDownload):
    """EuroSAT RGB (10 land-cover classes under CoOp's long names, e.g. ``AnnualCrop`` -> "Annual Crop Land").

    Layout: ``eurosat/{2750/<class>/*.jpg, split_zhou_EuroSAT.json}``.
    """

    default_dirname = "eurosat"
    dataset_name = "eurosat"
    image_dir = "2750"
    split_file = "split_zhou_EuroSAT.json"
    name_map = {"AnnualCrop": "Annual Crop Land", "Forest": "Forest",
                "HerbaceousVegetation": "Herbaceous Vegetation Land", "Highway": "Highway or Road",
                "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
                "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
                "SeaLake": "Sea or Lake"}
    torchvision_class = "EuroSAT"
    torchvision_links = {"2750": "eurosat/2750"}


class FGVCAircraft(TorchvisionDownload):
    """FGVC-Aircraft (100 variants, e.g. "707-320"), read from the dataset's own text files (no split json).

    Layout: ``fgvc_aircraft/{images/<id>.jpg, variants.txt, images_variant_{train,val,test}.txt}`` (the ``data``
    folder of ``fgvc-aircraft-2013b``). Classes are the lines of ``variants.txt`` in order; each split line is
    ``<image id> <variant name>``.
    """

    default_dirname = "fgvc_aircraft"
    dataset_name = "fgvc_aircraft"
    image_dir = "images"
    split_file = "variants.txt"
    torchvision_class = "FGVCAircraft"
    torchvision_kwargs = {"annotation_level": "variant"}
    _files = ("variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt")
    torchvision_links = {"images": "fgvc-aircraft-2013b/data/images",
                         **{f: f"fgvc-aircraft-2013b/data/{f}" for f in _files}}

    def required_parts(self) -> tuple[str, ...]:
        return (self.image_dir, *self._files)

    def _lines(self, path: Path) -> list[tuple[int, str]]:
        if not path.is_file():
            raise FedPromptError(f"FGVCAircraft: {path} is missing; it comes with the dataset archive "
                                 f"(fgvc-aircraft-2013b/data/{path.name}, see CoOp's DATASETS.md, "
                                 f"{COOP_DATASETS_MD}) and goes into {path.parent}.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise FedPromptError(f"{path}: not a UTF-8 text file; download the dataset again.") from None
        return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]

    def read(self) -> DatasetSplits:
        root = self._root()
        variants = [name for _, name in self._lines(root / "variants.txt")]
        if not variants:
            raise FedPromptError(f"{root / 'variants.txt'}: no variant names; expected one name per line.")
        if len(set(variants)) != len(variants):
            raise FedPromptError(f"{root / 'variants.txt'}: a variant name occurs twice.")
        label_of = {name: i for i, name in enumerate(variants)}
        image_root = self._image_root(root)
        samples: dict[str, list[Sample]] = {}
        for split in SPLITS:
            path = root / f"images_variant_{split}.txt"
            out = []
            for number, line in self._lines(path):
                image_id, _, variant = line.partition(" ")
                if not variant or variant not in label_of:
                    raise FedPromptError(f"{path}, line {number}: {line!r}; expected '<image id> <variant>' with a "
                                         f"variant from variants.txt.")
                out.append(Sample(str(image_root / f"{image_id}.jpg"), label_of[variant], ""))
            samples[split] = out
        if not samples["train"]:
            raise FedPromptError(f"{root / 'images_variant_train.txt'}: no train images")
        self._check_first_image(samples, root / "images_variant_train.txt")
        return self._splits(variants, samples)


COOP_READERS = (Caltech101, OxfordPets, Flowers102, Food101, DTD, StanfordCars, FGVCAircraft, UCF101, SUN397,
                EuroSAT)
