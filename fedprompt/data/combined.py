"""Several datasets in one federation (:class:`Combined`), e.g. FedTPG's ``cross_cls`` over the nine CoOp datasets.

Each dataset in ``datasets`` is read by its own reader; the shared protocol (``subsample_classes``, ``partition``,
``num_shots``, ``validation``, ``seed``) is applied to each dataset separately, exactly as a single dataset's
:meth:`~fedprompt.data.FederatedData.setup` applies it; and the clients of all datasets, in dataset order, form the
federation (client ids renumbered from 0). Every client of a combined federation has its own class list
(:attr:`~fedprompt.data.ClientSplit.classnames`): the one its partitioner gave it (:class:`~fedprompt.data.CrossClass`)
or else its dataset's class list; its sample labels index that list. ``FederatedSplits.eval_sets`` holds each
dataset's evaluation sets (``<dataset>/base`` and ``<dataset>/novel`` with ``subsample_classes: base``) and an
``<dataset>/all`` set for each dataset in ``unseen`` (read, never trained on; all its classes).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Literal

from PIL import Image

from fedprompt.data.base import DatasetSplits, Sample, load_rgb
from fedprompt.data.base import EvalSet, FederatedSplits
from fedprompt.data.reader import FederatedData, federate
from fedprompt.data.partition import Partitioner
from fedprompt.errors import FedPromptError

ROUTE_PREFIX = "combined"
ROUTE_SEP = "|"


class RoutedLoader:
    """Image loader of a combined federation: sample paths ``combined<i>|<key>`` go to dataset i's own loader
    (CIFAR through torchvision, synthetic images) with the key as path; every other path goes to ``default`` (image
    files unless given)."""

    def __init__(self, loaders: dict[int, Callable[[Sample], Image.Image]],
                 default: Callable[[Sample], Image.Image] = load_rgb):
        self.loaders = loaders
        self.default = default

    def __call__(self, sample: Sample) -> Image.Image:
        index = route_index(sample.path)
        if index is None:
            return self.default(sample)
        return self.loaders[index](replace(sample, path=sample.path.split(ROUTE_SEP, 1)[1]))

    @property
    def cache_key(self) -> str | None:
        """A stable identity when every routed loader has one (decoded images and features then persist)."""
        from fedprompt.data.store import loader_key

        keys = {str(i): loader_key(loader) for i, loader in sorted(self.loaders.items())}
        keys["default"] = loader_key(self.default)
        return None if None in keys.values() else repr(sorted(keys.items()))


def route_index(path: str) -> int | None:
    """The dataset index of a routed path ``combined<i>|...``, else ``None``."""
    head, sep, _ = path.partition(ROUTE_SEP)
    if sep and head.startswith(ROUTE_PREFIX) and head[len(ROUTE_PREFIX):].isdigit():
        return int(head[len(ROUTE_PREFIX):])
    return None


def _routed(raw: DatasetSplits, index: int) -> DatasetSplits:
    """``raw`` with its sample paths tagged for :class:`RoutedLoader` when it has its own loader."""
    if raw.loader is load_rgb:
        return raw

    def tag(samples: list[Sample]) -> list[Sample]:
        return [replace(s, path=f"{ROUTE_PREFIX}{index}{ROUTE_SEP}{s.path}") for s in samples]

    return replace(raw, train=tag(raw.train), test=tag(raw.test), val=tag(raw.val))


def default_name(raw: DatasetSplits, reader: FederatedData) -> str:
    """A dataset's name in a combined federation: the reader's name, plus the domain when it reads one domain
    (``pacs-mini-photo``)."""
    name = raw.name or type(reader).__name__.lower()
    domains = {s.domain for s in raw.train if s.domain}
    return f"{name}-{domains.pop()}" if len(domains) == 1 else name


def check_given_names(names: list[str] | None, count: int, what: str) -> None:
    """``data.names`` (Combined, Transfer): ``None``, or one distinct name per dataset (``count`` of them, ``what``
    says which: "datasets (datasets then unseen)", "targets")."""
    if names is None:
        return
    if len(names) != count:
        raise FedPromptError(f"data.names has {len(names)} names for {count} {what}; give one name per dataset or "
                             "leave it null.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FedPromptError(f"data.names must be unique, got {names} ({', '.join(map(repr, repeated))} more than "
                             "once); rename them or leave data.names null (repeats then get -2, -3, ...).")


def unique_names(names: list[str]) -> list[str]:
    """``names`` with later repeats suffixed ``-2``, ``-3``, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def merge_splits(parts: list[DatasetSplits], loader: Callable, name: str = "combined") -> DatasetSplits:
    """The union of several datasets' splits: class lists concatenated (names may repeat), each dataset's labels
    shifted by the classes before it."""
    classnames: list[str] = []
    merged: dict[str, list[Sample]] = {"train": [], "test": [], "val": []}
    for part in parts:
        offset = len(classnames)
        classnames.extend(part.classnames)
        for split, samples in merged.items():
            samples.extend(replace(s, label=s.label + offset) for s in getattr(part, split))
    return DatasetSplits(classnames, merged["train"], merged["test"], val=merged["val"], name=name, loader=loader)


class Combined(FederatedData):
    """Several datasets as one federation; clients come from all of them (a general multi-dataset option).

    Each dataset in ``datasets`` only reads its data (its ``read()``, with its own ``root``, ``dirname``, ``seed``
    for any train/test split it makes, domains, ...). The protocol arguments of ``Combined`` apply to every dataset
    separately: the CoOp base/novel split of each dataset's classes, then ``partition`` (a dataset's own
    ``partition``, or its default, when ``partition`` is null), ``num_shots`` and validation, all seeded with
    ``seed``; the datasets' own ``num_shots``, ``subsample_classes`` and ``validation`` must stay unset. A
    dataset's clients are exactly those its own ``setup()`` would give under the same protocol; they are numbered
    after the clients of the datasets before it, named ``<dataset>/<name>``, carry ``dataset``, and always have a
    class list of their own (their partitioner's, else their dataset's).

    ``FederatedSplits`` of a combined federation: ``clients`` as above; ``eval_sets`` with each dataset's sets
    (:func:`~fedprompt.data.reader.dataset_eval_sets`) and an ``all`` set (every class, every test image) per
    ``unseen`` dataset; ``source`` / ``novel`` the union of the datasets' (subsampled) splits, class lists
    concatenated (labels shifted; for information and image loading only: client labels index client lists);
    ``classnames`` that concatenated list.

    Args:
        datasets: the training datasets, each a ``class_path`` entry (``fedprompt.data.Caltech101``, ...).
        unseen: datasets never trained on, evaluated on all their classes (the unseen-dataset transfer).
        names: a name per dataset (``datasets`` then ``unseen``) for clients and evaluation sets; default the
            reader's name (plus its domain when it reads one domain), made unique with ``-2``, ``-3``.
        partition: the partition applied to each dataset (e.g. :class:`~fedprompt.data.CrossClass` for FedTPG's
            ``cross_cls``); null uses each dataset's own.
        num_shots: train images per class per client (``None`` keeps all).
        seed: seed of every dataset's partition, few-shot sampling and validation draw.
        num_workers: DataLoader worker processes per client loader.
        subsample_classes: ``all``, or each dataset's CoOp ``base`` / ``novel`` half (``base``: clients train on base
            classes and each dataset gets a ``base`` and a ``novel`` evaluation set).
        validation: a validation set per client, as for a single dataset.
    """

    def __init__(self, datasets: list[FederatedData], unseen: list[FederatedData] | None = None,
                 names: list[str] | None = None, partition: Partitioner | None = None, num_shots: int | None = None,
                 seed: int = 0, num_workers: int = 0, subsample_classes: Literal["all", "base", "novel"] = "all",
                 validation: bool = False):
        super().__init__(partition=partition, num_shots=num_shots, seed=seed, num_workers=num_workers,
                         subsample_classes=subsample_classes, validation=validation)
        if not datasets:
            raise FedPromptError("data.datasets is empty: list at least one dataset (class_path entries).")
        self.datasets = list(datasets)
        self.unseen = list(unseen or [])
        readers = self.datasets + self.unseen
        for i, reader in enumerate(readers):
            where = f"data.datasets[{i}]" if i < len(self.datasets) else f"data.unseen[{i - len(self.datasets)}]"
            if isinstance(reader, Combined):
                raise FedPromptError(f"{where}: a Combined dataset cannot be nested; list its datasets instead.")
            for key, default in (("num_shots", None), ("subsample_classes", "all"), ("validation", False)):
                if getattr(reader, key) != default:
                    raise FedPromptError(f"{where}.{key} is set to {getattr(reader, key)!r}; Combined applies its own "
                                         f"{key} to every dataset: set data.{key} instead and remove this one.")
        check_given_names(names, len(readers), "datasets (datasets then unseen)")
        self.names = names

    def read(self) -> DatasetSplits:
        """The union of the training datasets' splits (all classes; labels shifted, class lists concatenated)."""
        raws = [_routed(self._read_one(i), i) for i in range(len(self.datasets))]
        return merge_splits(raws, RoutedLoader(self._loaders(raws)))

    def _where(self, index: int) -> str:
        reader = (self.datasets + self.unseen)[index]
        n = len(self.datasets)
        key = f"data.datasets[{index}]" if index < n else f"data.unseen[{index - n}]"
        return f"{key} ({type(reader).__name__})"

    def _read_one(self, index: int) -> DatasetSplits:
        """Dataset ``index`` (``datasets`` then ``unseen``) read; its errors name its place in the config."""
        reader = (self.datasets + self.unseen)[index]
        try:
            raw, bad = reader.read_checked()
            self._bad_images.extend(bad)
            return raw
        except FedPromptError as err:
            raise FedPromptError(f"{self._where(index)}: {err}") from None

    def _read_all(self) -> tuple[list[DatasetSplits], list[str]]:
        readers = self.datasets + self.unseen
        raws = [_routed(self._read_one(i), i) for i in range(len(readers))]
        names = self.names or unique_names([default_name(raw, r) for raw, r in zip(raws, readers)])
        return raws, names

    @staticmethod
    def _loaders(raws: list[DatasetSplits]) -> dict[int, Callable]:
        return {i: raw.loader for i, raw in enumerate(raws) if raw.loader is not load_rgb}

    def setup(self) -> FederatedSplits:
        """Read every dataset, apply the protocol to each, and join their clients and evaluation sets."""
        self._bad_images: list[tuple[str, str]] = []
        raws, names = self._read_all()
        loader = RoutedLoader(self._loaders(raws))
        clients, parts, eval_sets = [], [], []
        for i, (reader, raw, name) in enumerate(zip(self.datasets, raws, names)):
            partition = self.partition or reader.partition or reader.default_partition()
            part = federate(raw, partition, self.num_shots, self.seed, self.subsample_classes, self.validation, name)
            for client in part.clients:
                clients.append(replace(client, client_id=len(clients), dataset=name,
                                       name=f"{name}/{client.name}" if client.name else name,
                                       classnames=list(client.classnames if client.classnames is not None
                                                       else part.classnames)))
            parts.append(part)
            eval_sets.extend(part.eval_sets)
        for raw, name in zip(raws[len(self.datasets):], names[len(self.datasets):]):
            eval_sets.append(EvalSet(f"{name}/all", list(raw.classnames), raw.test, "all", name, seen=False))
        source = merge_splits([p.source for p in parts], loader)
        novel = None
        if self.subsample_classes == "base":
            novel = merge_splits([p.novel for p in parts], loader, "combined-novel")
        return FederatedSplits(source.classnames, clients, source, novel, eval_sets, list(self._bad_images))
