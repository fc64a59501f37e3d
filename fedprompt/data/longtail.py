"""Long-tailed federated learning (:class:`LongTailed`): a dataset's train split cut to an exponential class profile,
FedPuReL's protocol (CIFAR-10/100-LT and the LT versions of the CoOp datasets), then federated as usual.

FedPuReL (``datasets/long_tail.py``): with ``n_max`` = the train images / the classes and imbalance factor ``IF``
(0.01 is "IF = 100"), class ``c`` of ``C`` keeps ``int(n_max * IF ** (c / (C - 1)))`` train images (all it has when it
has fewer), drawn class by class in label order from one ``numpy.random.RandomState(1)`` shuffle per class; the test
split stays balanced. The partition is the dataset's (FedPuReL: ``Dirichlet`` with alpha 1.0 over 20 clients, test
images cut with the same proportions). The evaluation then reports Many / Medium / Few-shot accuracy (classes with
more than 100, 21-100, at most 20 train images in the federation; the mean over a group's classes of each class's
accuracy), in the personal view (each client's prompt on its own test images, per-class counts pooled over clients)
and in the global view (``eval.mode: global`` or ``dual``: the prompt on the whole test split).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedprompt.data.base import DatasetSplits, FederatedSplits, Sample
from fedprompt.data.reader import FederatedData, federate
from fedprompt.errors import FedPromptError


#: FedPuReL's thresholds: a class with more than MANY_ABOVE training images is "many", with at most FEW_AT_MOST "few"
MANY_ABOVE, FEW_AT_MOST = 100, 20


def class_groups(train_counts: list[int], many_above: int = MANY_ABOVE, few_at_most: int = FEW_AT_MOST) -> dict:
    """Many / medium / few-shot classes by their training images (FedPuReL: many > 100, medium 21-100, few <= 20):
    ``{"many": [labels], "medium": [...], "few": [...]}``."""
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for label, count in enumerate(train_counts):
        groups["many" if count > many_above else "few" if count <= few_at_most else "medium"].append(label)
    return groups


def long_tail_counts(num_train: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """FedPuReL's exponential profile: ``int(n_max * IF ** (c / (C - 1)))`` images for class ``c``, ``n_max`` =
    ``num_train / num_classes``."""
    if num_classes < 2:
        raise FedPromptError(f"data: a long-tailed profile needs at least 2 classes, got {num_classes}.")
    top = num_train / num_classes
    return [int(top * imbalance_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def long_tail_train(train: list[Sample], num_classes: int, imbalance_factor: float, profile_seed: int) -> list[Sample]:
    """The train samples FedPuReL keeps: class by class in label order, the first ``count`` of the class's samples
    (in reader order) after one ``RandomState(profile_seed).shuffle``; returned in that order."""
    counts = long_tail_counts(len(train), num_classes, imbalance_factor)
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, sample in enumerate(train):
        by_class[sample.label].append(i)
    rng = np.random.RandomState(profile_seed)
    kept: list[int] = []
    for label, count in enumerate(counts):
        indices = by_class[label]
        rng.shuffle(indices)
        kept.extend(indices[:count])
    return [train[i] for i in kept]


class LongTailed(FederatedData):
    """``dataset`` with its train split made long-tailed (module docstring), federated by its own partition.

    Every evaluation row then also holds ``many_acc``, ``medium_acc``, ``few_acc`` (personal view) and, with
    ``eval.mode: global`` or ``dual``, ``global_many_acc``, ``global_medium_acc``, ``global_few_acc``; the groups are
    by the classes' train images in the federation (after ``num_shots``, if set).

    Args:
        dataset: the reader (``fedprompt.data.CIFAR`` with ``name: cifar100``, any CoOp-format reader, image
            folders) with its own ``partition``, ``num_shots``, ``validation`` and ``seed``.
        imbalance_factor: the tail class's images over the head class's (0.01: "IF = 100"; 1: balanced).
        profile_seed: seed of the images each class keeps (1 in FedPuReL's code, whatever its run seed).
        many_above: a class with more train images than this is "many-shot" (100 in FedPuReL).
        few_at_most: a class with at most this many is "few-shot" (20 in FedPuReL); the rest are "medium".
        seed: replaces the dataset's ``seed`` when set (``fedprompt sweep`` sets ``data.seed`` per seed).
    """

    def __init__(self, dataset: FederatedData, imbalance_factor: float = 0.01, profile_seed: int = 1,
                 many_above: int = MANY_ABOVE, few_at_most: int = FEW_AT_MOST, seed: int | None = None):
        if seed is not None:
            dataset.seed = seed
        super().__init__(seed=dataset.seed, num_workers=dataset.num_workers, num_shots=dataset.num_shots,
                         subsample_classes=dataset.subsample_classes, validation=dataset.validation)
        from fedprompt.data.combined import Combined
        from fedprompt.data.lodo import LeaveOneDomainOut
        from fedprompt.data.transfer import Transfer

        if isinstance(dataset, (Combined, Transfer, LeaveOneDomainOut, LongTailed)):
            raise FedPromptError(f"data.dataset: a {type(dataset).__name__} dataset cannot be nested in LongTailed; "
                                 "give a single dataset's reader.")
        if isinstance(imbalance_factor, bool) or not 0 < imbalance_factor <= 1:
            raise FedPromptError(f"data.imbalance_factor must be in (0, 1] (0.01 is IF = 100), got "
                                 f"{imbalance_factor!r}.")
        if dataset.subsample_classes != "all":
            raise FedPromptError("data.dataset.subsample_classes must be 'all' with LongTailed: the long tail runs "
                                 "over the dataset's label order.")
        if not 0 <= few_at_most < many_above:
            raise FedPromptError(f"data.few_at_most ({few_at_most}) must be >= 0 and below data.many_above "
                                 f"({many_above}).")
        self.dataset = dataset
        self.imbalance_factor = imbalance_factor
        self.profile_seed = profile_seed
        self.many_above = many_above
        self.few_at_most = few_at_most

    def read(self) -> DatasetSplits:
        """The dataset with its long-tailed train split (validation and test unchanged)."""
        raw = self.dataset.read()
        return self._long_tailed(raw)

    def _long_tailed(self, raw: DatasetSplits) -> DatasetSplits:
        return replace(raw, train=long_tail_train(raw.train, len(raw.classnames), self.imbalance_factor,
                                                  self.profile_seed), name=raw.name or "data")

    def setup(self) -> FederatedSplits:
        """The long-tailed federation, with the many / medium / few-shot classes in ``class_groups``."""
        raw, bad = self.dataset.read_checked()
        raw = self._long_tailed(raw)
        partition = self.dataset.partition or self.dataset.default_partition()
        splits = federate(raw, partition, self.num_shots, self.seed, "all", self.validation)
        counts = [0] * len(splits.classnames)
        for client in splits.clients:
            for sample in client.train:
                counts[sample.label] += 1
        groups = class_groups(counts, self.many_above, self.few_at_most)
        return replace(splits, bad_images=bad, class_groups=groups)
