"""The domain-generalisation datasets in DomainBed's layout: :class:`PACS`, :class:`VLCS`, :class:`OfficeHome`.

DomainBed (facebookresearch/DomainBed) keeps each dataset as image folders, one folder per domain and inside it one
per class::

    PACS/        art_painting/ cartoon/ photo/ sketch/                  7 classes (dog ... person)
    VLCS/        Caltech101/ LabelMe/ SUN09/ VOC2007/                   5 classes (bird car chair dog person)
    office_home/ Art/ Clipart/ Product/ Real World/ (or Real_World/)    65 classes (Alarm_Clock ... Webcam)

each ``<domain>/<class>/<image>``. ``root`` is the dataset folder, or the folder that holds it (``$FEDPROMPT_DATA``
with the dirname above). The reader checks the layout before any image is opened: every domain it reads must be
there and hold exactly the dataset's classes; a missing domain, a missing class folder or a folder that is not one of
the dataset's classes is one line naming the folder. Each (domain, class) is split into train/test images by
``test_fraction`` (seeded), as :class:`~fedprompt.data.DomainFolders` does; class names are the folder names in
sorted order (underscores read as spaces in prompts); one client per domain by default
(:class:`~fedprompt.data.ByDomain`). DomainNet in DomainBed's layout (``domain_net/<domain>/<class>``, 345 classes)
is :class:`fedprompt.data.DomainNet` with ``layout: folders`` and ``all_classes: true``.

For leave-one-domain-out evaluation wrap a reader in :class:`fedprompt.data.LeaveOneDomainOut`.
"""

from __future__ import annotations

from pathlib import Path

from fedprompt.data.base import DatasetSplits, Sample
from fedprompt.data.folders import DomainFolders, class_folders, image_files, stratified_split
from fedprompt.errors import FedPromptError

#: DomainBed's URL, named in the layout errors
DOMAINBED = "github.com/facebookresearch/DomainBed (domainbed/scripts/download.py)"


def _listed(names, limit: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class DomainBedFolders(DomainFolders):
    """Shared reader of a DomainBed-layout dataset (subclasses name the dataset's domains and classes).

    Args:
        domains: domains to read, in client order (default: every domain of the dataset, in DomainBed's order).
        test_fraction: fraction of each (domain, class) held out as test images.
    """

    sites: tuple[str, ...] = ()
    """The dataset's domains (canonical names, as in ``data.domains`` and the metric keys)."""
    folder_names: dict[str, tuple[str, ...]] = {}
    """Other folder names a domain is found under (Office-Home's ``Real World``)."""
    default_classes: tuple[str, ...] = ()
    """The dataset's class folders."""

    def __init__(self, domains: list[str] | None = None, test_fraction: float = 0.3, **kwargs):
        super().__init__(domains=domains, test_fraction=test_fraction, **kwargs)
        unknown = [d for d in domains or [] if d not in self.sites]
        if unknown:
            raise FedPromptError(f"data.domains: {unknown} are not {type(self).__name__} domains; choose from "
                                 f"{list(self.sites)}.")
        if domains is not None and len(set(domains)) != len(domains):
            raise FedPromptError(f"data.domains lists a domain twice: {domains}.")

    def _layout(self, root: Path) -> str:
        return (f"expected {root}/<domain>/<class>/<image> with the domains {', '.join(self.sites)} and the "
                f"{len(self.default_classes)} classes {_listed(sorted(self.default_classes), 4)} (DomainBed's "
                f"layout, {DOMAINBED})")

    def _site_folder(self, root: Path, site: str) -> Path | None:
        for name in (site, *self.folder_names.get(site, ())):
            if (root / name).is_dir():
                return root / name
        return None

    def _dataset_root(self) -> Path:
        """``root``, or ``root/<dirname>`` when ``root`` is the folder that holds the dataset."""
        root = self.resolve_root()
        nested = root / self.default_dirname
        has_sites = any(self._site_folder(root, s) for s in self.sites)
        if not has_sites and nested.is_dir() and any(self._site_folder(nested, s) for s in self.sites):
            return nested
        return root

    def _check_classes(self, folder: Path) -> None:
        present = set(class_folders(folder))
        missing = sorted(set(self.default_classes) - present)
        extra = sorted(present - set(self.default_classes))
        if missing:
            raise FedPromptError(f"{type(self).__name__}: {folder} lacks the class folder(s) {_listed(missing)}; "
                                 f"every domain holds all {len(self.default_classes)} classes. {self._layout(folder.parent)}.")
        if extra:
            raise FedPromptError(f"{type(self).__name__}: {folder} holds folder(s) that are not "
                                 f"{type(self).__name__} classes: {_listed(extra)}; move them out of the dataset "
                                 f"folder. {self._layout(folder.parent)}.")

    def read(self) -> DatasetSplits:
        root = self._dataset_root()
        domains = list(self.domains or self.sites)
        folders = {d: self._site_folder(root, d) for d in domains}
        missing = [d for d, folder in folders.items() if folder is None]
        if missing:
            raise FedPromptError(f"{type(self).__name__}: no folder for the domain(s) {', '.join(missing)} in {root}; "
                                 f"{self._layout(root)}.")
        for folder in folders.values():
            self._check_classes(folder)
        raw = sorted(self.default_classes)
        files = {(d, c): image_files(folders[d] / c) for d in domains for c in raw}
        counts = {c: sum(len(files[(d, c)]) for d in domains) for c in raw}
        classnames = self.keep_classes_with_images(raw, counts, {c: [folders[d] / c for d in domains] for c in raw})
        samples = [Sample(str(p), label, domain) for domain in domains for label, name in enumerate(classnames)
                   for p in files[(domain, name)]]
        train, test = stratified_split(samples, self.test_fraction, self.seed)
        return DatasetSplits(classnames, train, test, name=self.default_dirname.lower())


class PACS(DomainBedFolders):
    """PACS (Li et al., ICCV 2017) in DomainBed's layout: domains art_painting, cartoon, photo, sketch; 7 classes
    (dog, elephant, giraffe, guitar, horse, house, person). ``root`` defaults to ``$FEDPROMPT_DATA/PACS``."""

    default_dirname = "PACS"
    sites = ("art_painting", "cartoon", "photo", "sketch")
    default_classes = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


class VLCS(DomainBedFolders):
    """VLCS (Fang et al., ICCV 2013) in DomainBed's layout: domains Caltech101, LabelMe, SUN09, VOC2007; 5 classes
    (bird, car, chair, dog, person). ``root`` defaults to ``$FEDPROMPT_DATA/VLCS``."""

    default_dirname = "VLCS"
    sites = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
    default_classes = ("bird", "car", "chair", "dog", "person")


class OfficeHome(DomainBedFolders):
    """Office-Home (Venkateswara et al., CVPR 2017) in DomainBed's layout: domains Art, Clipart, Product, Real_World
    (the folder may be called ``Real World``, as in the download); 65 classes. ``root`` defaults to
    ``$FEDPROMPT_DATA/office_home``."""

    default_dirname = "office_home"
    sites = ("Art", "Clipart", "Product", "Real_World")
    folder_names = {"Real_World": ("Real World", "RealWorld")}
    default_classes = (
        "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar", "Candles",
        "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser", "Exit_Sign", "Fan",
        "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard",
        "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
        "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler",
        "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "Table", "Telephone",
        "ToothBrush", "Toys", "Trash_Can", "TV", "Webcam")
