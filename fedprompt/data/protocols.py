"""Evaluation protocols shared by every method: base/novel classes, validation shots, the papers' exact shots.

The partitioners themselves (who gets which samples) are in :mod:`fedprompt.data.partition`:
:class:`~fedprompt.data.partition.Pathological` (the papers' few-shot label split),
:class:`~fedprompt.data.partition.Dirichlet` (``noniid-labeldir``) and :class:`~fedprompt.data.partition.Pachinko`
(CIFAR-100 ``noniid-labeldir100``). This module holds the steps around them, each a pure, seeded function of a
:class:`~fedprompt.data.base.DatasetSplits`:

- :func:`base_novel_split` / :func:`subsample_classes`: CoOp's base-to-novel protocol. Labels sorted; base = the
  first ceil(C/2), novel = the rest; each half relabelled from 0 with its own class names. It is applied to the
  reader's splits before partitioning, so a pathological split of the base half deals base classes only.
- :func:`validation_split`: the validation set CoOp samples, min(num_shots, 4) images per class.
- :func:`assign_validation`: hands each client the validation images of the classes (and domains) it trains on.
- :func:`official_pathological_shots`: the exact images the papers' ``generate_federated_fewshot_dataset`` picks
  (one ``random.Random(2023)`` shuffles the classes and then draws the shots), for runs that must match the
  official code image for image.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import replace
from typing import Sequence

from fedprompt.data.base import ClientSplit, DatasetSplits, Sample
from fedprompt.errors import FedPromptError

SUBSAMPLE_CHOICES = ("all", "base", "novel")
MAX_VAL_SHOTS = 4


def _keep_classes(splits: DatasetSplits, labels: list[int], suffix: str) -> DatasetSplits:
    relabel = {old: new for new, old in enumerate(labels)}

    def convert(samples: list[Sample]) -> list[Sample]:
        return [replace(s, label=relabel[s.label]) for s in samples if s.label in relabel]

    return DatasetSplits([splits.classnames[c] for c in labels], convert(splits.train), convert(splits.test),
                         val=convert(splits.val), name=f"{splits.name}-{suffix}" if splits.name else suffix,
                         loader=splits.loader)


def base_novel_split(splits: DatasetSplits) -> tuple[DatasetSplits, DatasetSplits]:
    """CoOp's base-to-novel split (Dassl ``subsample_classes``).

    The labels 0..C-1 (C = ``len(splits.classnames)``) in increasing order: base = the first ceil(C/2), novel =
    the remaining floor(C/2). Each half keeps the train, val and test samples of its classes, relabelled from 0 in
    the same order, and the matching slice of class names. C=7 gives base labels 0-3 and novel labels 4-6 (as 0-2).
    Deterministic; no randomness involved.
    """
    num_classes = len(splits.classnames)
    if num_classes < 2:
        raise FedPromptError(f"data: a base/novel split needs at least 2 classes, {splits.name or 'the dataset'} "
                             f"has {num_classes}.")
    cut = math.ceil(num_classes / 2)
    labels = list(range(num_classes))
    return _keep_classes(splits, labels[:cut], "base"), _keep_classes(splits, labels[cut:], "novel")


def subsample_classes(splits: DatasetSplits, which: str = "all") -> DatasetSplits:
    """``all`` returns ``splits`` unchanged; ``base`` / ``novel`` return that half of :func:`base_novel_split`."""
    if which not in SUBSAMPLE_CHOICES:
        raise FedPromptError(f"data.subsample_classes must be one of {list(SUBSAMPLE_CHOICES)}, got {which!r}")
    if which == "all":
        return splits
    base, novel = base_novel_split(splits)
    return base if which == "base" else novel


def _group(samples: list[Sample], by_domain: bool) -> dict[tuple[str, int], list[int]]:
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[(s.domain if by_domain else "", s.label)].append(i)
    return groups


def validation_split(splits: DatasetSplits, num_shots: int | None, seed: int = 0,
                     carve_from_train: bool = True) -> DatasetSplits:
    """The validation set of CoOp's few-shot protocol: ``min(num_shots, 4)`` images per class.

    - The reader has a validation split (CoOp's split files do): ``num_shots=None`` keeps it whole (CoOp samples
      only in few-shot runs); otherwise ``min(num_shots, 4)`` images of each class are drawn from it without
      replacement (all of them where a class has fewer).
    - No validation split (DomainNet, Office, CIFAR, folders) and ``carve_from_train``: ``min(num_shots, 4)``
      (4 when ``num_shots`` is None) images of each (domain, class) are moved from train to val, so the two stay
      disjoint; without ``carve_from_train`` val stays empty.

    Draws use ``random.Random(seed)``, group by group in (domain, label) order, so the result depends on the seed
    and the reader's sample order only. Returns a new :class:`DatasetSplits`; test is untouched.
    """
    if num_shots is not None and num_shots < 1:
        raise FedPromptError(f"data.num_shots must be >= 1 or null, got {num_shots}")
    per_class = MAX_VAL_SHOTS if num_shots is None else min(num_shots, MAX_VAL_SHOTS)
    rng = random.Random(seed)
    if splits.val:
        if num_shots is None:
            return splits
        groups = _group(splits.val, by_domain=False)
        keep = []
        for key in sorted(groups):
            items = groups[key]
            keep.extend(rng.sample(items, per_class) if len(items) > per_class else items)
        return replace(splits, val=[splits.val[i] for i in sorted(keep)])
    if not carve_from_train:
        return splits
    groups = _group(splits.train, by_domain=True)
    moved: set[int] = set()
    for key in sorted(groups):
        items = groups[key]
        if len(items) < 2:  # never take a class's only train image
            continue
        moved.update(rng.sample(items, min(per_class, len(items) - 1)))
    train = [s for i, s in enumerate(splits.train) if i not in moved]
    val = [splits.train[i] for i in sorted(moved)]
    return replace(splits, train=train, val=val)


def assign_validation(clients: list[ClientSplit], val: list[Sample],
                      classnames: list[str] | None = None) -> list[ClientSplit]:
    """Give each client the validation samples of the labels it trains on (and of its domains, when the samples
    carry domains), for per-client model selection. Clients are returned as new objects; train/test unchanged.

    ``val`` labels index ``classnames`` (the dataset's list). A client with its own class list
    (:attr:`ClientSplit.classnames` set) gets the val samples of its classes, matched by name and relabelled to
    positions in its list; ``classnames`` is then required and its names must be unique.
    """
    out = []
    for client in clients:
        samples = val if client.classnames is None else _to_own_labels(val, classnames, client.classnames)
        labels = {s.label for s in client.train}
        domains = {s.domain for s in client.train}
        mine = [s for s in samples if s.label in labels and (s.domain in domains or not s.domain)]
        out.append(replace(client, val=mine))
    return out


def _to_own_labels(samples: list[Sample], classnames: list[str] | None, own: list[str]) -> list[Sample]:
    """The samples of the classes in ``own``, relabelled from positions in ``classnames`` to positions in ``own``."""
    if classnames is None:
        raise FedPromptError("data.validation: clients with their own class lists need the dataset's class names")
    if len(set(classnames)) != len(classnames):
        raise FedPromptError("data.validation: the dataset has duplicate class names, so validation samples cannot "
                             "be matched to clients' own class lists; make the class names unique.")
    position = {name: i for i, name in enumerate(own)}
    relabel = {label: position[name] for label, name in enumerate(classnames) if name in position}
    return [replace(s, label=relabel[s.label]) for s in samples if s.label in relabel]


def official_pathological_shots(train_labels: Sequence[int], num_clients: int, num_shots: int,
                                class_seed: int = 2023, repeat: bool = False) -> list[list[int]]:
    """The train indices each client gets from the papers' ``generate_federated_fewshot_dataset`` (non-iid,
    ``repeat_rate=0``), reproduced image for image.

    ``train_labels`` are the labels in the reader's order (CoOp split-file order). As in the official code:
    C = max label + 1; ``random.seed(class_seed)`` then ``shuffle(list(range(C)))``; client k owns the block
    ``[k*b, (k+1)*b)`` of the shuffled ids with b = round(C/K), the last client everything from ``(K-1)*b``; then
    client by client, class by class in first-appearance order of the labels, ``random.sample(items, num_shots)``
    from the whole class (``choices`` with ``repeat``, all items when a class has fewer than ``num_shots``), all
    from the same generator that shuffled the classes. ``num_shots < 1`` gives each client every image of its
    classes (the official code then hands every client the whole train set instead).
    """
    if num_clients < 1:
        raise FedPromptError(f"partition.num_clients must be >= 1, got {num_clients}")
    labels = [int(y) for y in train_labels]
    if not labels:
        raise FedPromptError("data: no train samples to deal to clients")
    rng = random.Random(class_seed)
    num_classes = max(labels) + 1
    block = int(round(num_classes / num_clients))
    class_list = list(range(num_classes))
    rng.shuffle(class_list)
    tracker: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        tracker[y].append(i)
    out = []
    for k in range(num_clients):
        owned = set(class_list[k * block:] if k == num_clients - 1 else class_list[k * block:(k + 1) * block])
        picked: list[int] = []
        for label, items in tracker.items():
            if label not in owned:
                continue
            if num_shots < 1:
                picked.extend(items)
            elif len(items) >= num_shots:
                picked.extend(rng.sample(items, num_shots))
            elif repeat:
                picked.extend(rng.choices(items, k=num_shots))
            else:
                picked.extend(items)
        out.append(picked)
    return out
