"""Core data types: samples, a reader's dataset splits, client splits, evaluation sets and the federated splits.

Nothing here imports torch: the readers and the command line's parser build on these types without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from PIL import Image, UnidentifiedImageError

from fedprompt.errors import FedPromptError


@dataclass(frozen=True)
class Sample:
    """One labelled image: a file path (or a synthetic key), its label index and, for multi-domain data, its domain."""

    path: str
    label: int
    domain: str = ""


def bomb_reason() -> str:
    """Why an image over Pillow's decompression-bomb limit is refused, and the setting that raises the limit."""
    limit = Image.MAX_IMAGE_PIXELS
    return (f"its header claims more than 2 x {limit} pixels, Pillow's decompression-bomb limit "
            "(Image.MAX_IMAGE_PIXELS); if the image is genuine, raise --data.max_image_pixels (null: no limit)")


def load_rgb(sample: Sample) -> Image.Image:
    """Open an image file as RGB; a missing or corrupt file raises an error naming it."""
    try:
        with Image.open(sample.path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FedPromptError(f"image file not found: {sample.path}") from None
    except Image.DecompressionBombError:
        raise FedPromptError(f"cannot read image {sample.path}: {bomb_reason()}.") from None
    except MemoryError:
        raise FedPromptError(f"cannot decode image {sample.path}: {_too_large_to_decode(sample.path)}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise FedPromptError(f"cannot read image {sample.path}: {err}. Remove or replace the file.") from None


def _too_large_to_decode(path: str) -> str:
    """Why a file's decode ran out of memory (its header's size), and what to do."""
    try:
        with Image.open(path) as image:
            size = f"its header claims {image.size[0]} x {image.size[1]} pixels, "
    except Exception:  # noqa: BLE001 - only for the message
        size = ""
    return (f"{size}more than this process can hold in memory. Remove or replace the file (with "
            "--data.max_image_pixels at its default such files are refused while the data is indexed).")


@dataclass
class DatasetSplits:
    """What a reader returns: ordered class names and the train/test (and optional validation) samples.

    ``classnames[i]`` is the name of label ``i``; the list order is the prompt order, always fixed (never a set).
    ``loader`` turns a sample into a PIL image (files by default; synthetic data generates images).
    """

    classnames: list[str]
    train: list[Sample]
    test: list[Sample]
    val: list[Sample] = field(default_factory=list)
    name: str = ""
    loader: Callable[[Sample], Image.Image] = load_rgb

    @property
    def domains(self) -> list[str]:
        """Domains in first-seen order of the train samples (``[""]`` for single-domain data)."""
        return list(dict.fromkeys(s.domain for s in self.train))


@dataclass
class ClientSplit:
    """One client's data: its train and test samples, and a readable name (e.g. its domain).

    ``classnames`` is ``None`` for a client that scores the federation's shared class list
    (:attr:`fedprompt.data.FederatedSplits.classnames`), the usual case. A client with its own class list (FedTPG's
    ``cross_cls`` protocol, :class:`fedprompt.data.CrossClass`) has ``classnames`` set, and then the labels of its
    train, val and test samples index into that list, not into the shared one. ``dataset`` names the dataset the
    client was drawn from in a multi-dataset federation (:class:`fedprompt.data.Combined`); ``""`` otherwise.
    """

    client_id: int
    train: list[Sample]
    test: list[Sample]
    name: str = ""
    val: list[Sample] = field(default_factory=list)
    classnames: list[str] | None = None
    dataset: str = ""

    @property
    def num_train(self) -> int:
        return len(self.train)


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
            of the dataset; an unseen dataset's set, or the whole test set when no base/novel split is made); the
            evaluation scenarios add ``"global"`` (a training dataset's whole test split, ``eval.mode: global`` or
            ``dual``) and ``"domain"`` (one domain of it, ``eval.domains``; see :mod:`fedprompt.data.scenarios`).
        dataset: name of the dataset the set comes from.
        seen: ``False`` for a dataset the federation never trains on (unseen-dataset transfer).
        domain: the domain of a ``"domain"`` set.
    """

    name: str
    classnames: list[str]
    samples: list[Sample]
    split: str
    dataset: str
    seen: bool = True
    domain: str = ""


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
    class_groups: dict[str, list[int]] | None = None
    """Labels of the many / medium / few-shot classes (long-tailed data, :class:`fedprompt.data.LongTailed`): the
    evaluation then reports each group's accuracy."""

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
