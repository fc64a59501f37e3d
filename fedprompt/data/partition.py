"""Deterministic, seeded partitioners that deal a dataset's samples to clients.

Each partitioner maps the train samples to clients and then gives each client test samples that match its train
distribution. Every partitioner is a small class so a config selects it with ``class_path`` and its arguments:

- :class:`IID`: uniform random split.
- :class:`Dirichlet`: label shift, the papers' ``noniid-labeldir``: per class Dir(alpha) proportions over clients
  (clients already over n/K get no more), redrawn until every client has ``min_size`` train and test samples; the
  test images of each class are cut with the same drawn proportions (``test_split="proportions"``), so a client's
  test distribution matches its train distribution. ``test_split="train_share"`` is fedprompt 0.1's rule (test
  images split by each client's realised share of the class's train images).
- :class:`Pachinko`: CIFAR-100 ``noniid-labeldir100`` (FedOTP): train+test pooled, per client Dir(alpha) over the
  coarse classes and Dir(fine_alpha) over the fine classes inside each coarse class, n/K samples per client, split
  back into train/test by original index.
- :class:`Pathological`: label shift by classes. ``classes_per_client=None`` is the papers' rule (class ids shuffled
  with ``random.seed(class_seed)``, contiguous blocks of round(C/K) classes, the last client takes the rest);
  an integer k gives each client k classes (each class's images split among its holders). A client's test set is
  every test image of its classes.
- :class:`CrossClass`: FedTPG's ``cross_cls``: a dataset's classes dealt in blocks of ``classes_per_client``; each
  client gets its own class list (:attr:`~fedprompt.data.base.ClientSplit.classnames`), labels relative to it.
- :class:`ByDomain`: one client per domain, or each domain split into ``clients_per_domain`` clients, iid or by a
  Dirichlet label draw inside the domain.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace

import numpy as np

from fedprompt.data.base import ClientSplit, DatasetSplits, Sample
from fedprompt.errors import FedPromptError


def _labels(samples: list[Sample]) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.int64)


def split_by_shares(indices: np.ndarray, shares: np.ndarray) -> list[np.ndarray]:
    """Split ``indices`` into ``len(shares)`` consecutive parts proportional to ``shares`` (largest remainder)."""
    total = shares.sum()
    if total <= 0 or len(indices) == 0:
        return [indices[:0] for _ in shares]
    exact = shares / total * len(indices)
    counts = np.floor(exact).astype(int)
    remainder = len(indices) - counts.sum()
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return np.split(indices, np.cumsum(counts)[:-1])


def proportional_test_split(train_parts: list[np.ndarray], train_labels: np.ndarray, test_labels: np.ndarray,
                            num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Give each client test images of each class in proportion to its share of that class's train images."""
    counts = np.zeros((len(train_parts), num_classes))
    for k, part in enumerate(train_parts):
        np.add.at(counts[k], train_labels[part], 1)
    parts: list[list[np.ndarray]] = [[] for _ in train_parts]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(test_labels == c))
        for k, piece in enumerate(split_by_shares(idx, counts[:, c])):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=np.int64) for p in parts]


class Partitioner:
    """Base: deals ``DatasetSplits`` to clients. Subclasses implement :meth:`split`."""

    def __init__(self, num_clients: int = 10):
        if num_clients < 1:
            raise FedPromptError(f"partition.num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients

    def split(self, data: DatasetSplits, seed: int) -> list[ClientSplit]:
        raise NotImplementedError

    def _clients(self, data: DatasetSplits, train_parts, test_parts, names=None) -> list[ClientSplit]:
        return [ClientSplit(k, [data.train[i] for i in tr], [data.test[i] for i in te],
                            name=names[k] if names else f"client{k}")
                for k, (tr, te) in enumerate(zip(train_parts, test_parts))]

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class IID(Partitioner):
    """Uniform random split of the train set; test images split in the same class proportions."""

    def split(self, data: DatasetSplits, seed: int) -> list[ClientSplit]:
        rng = np.random.default_rng(seed)
        train_labels, test_labels = _labels(data.train), _labels(data.test)
        parts = [np.sort(p) for p in np.array_split(rng.permutation(len(data.train)), self.num_clients)]
        tests = proportional_test_split(parts, train_labels, test_labels, len(data.classnames), rng)
        return self._clients(data, parts, tests)


def dirichlet_label_split(labels: np.ndarray, num_clients: int, alpha: float, min_size: int,
                          rng: np.random.Generator, max_tries: int = 1000) -> list[np.ndarray]:
    """``noniid-labeldir`` on one set of labels: per class Dir(alpha) proportions (clients over n/K get no more),
    redrawn until each client has min_size. Used inside a domain by :class:`ByDomain` and by
    ``Dirichlet(test_split="train_share")``; :func:`dirichlet_label_split_paired` is the papers' train+test rule."""
    n = len(labels)
    if n < num_clients * min_size:
        raise FedPromptError(f"partition: {n} samples cannot give {num_clients} clients at least {min_size} each; "
                             "lower partition.min_size or num_clients.")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * np.array([len(part) < n / num_clients for part in parts])
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for part, piece in zip(parts, np.split(idx, cuts)):
                part.extend(piece.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise FedPromptError(f"partition: no Dirichlet(alpha={alpha}) draw gave every one of {num_clients} clients "
                         f"{min_size} samples in {max_tries} tries; raise alpha or lower min_size.")


def dirichlet_label_split_paired(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, alpha: float,
                                 min_size: int, rng: np.random.RandomState, max_tries: int = 1000,
                                 num_classes: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The papers' ``noniid-labeldir`` (FedOTP ``utils/datasplit.py``), train and test together.

    For each class c = 0..C-1 (C = ``num_classes``, default max label + 1): shuffle the class's train indices,
    shuffle its test indices, draw p ~ Dir(alpha * 1_K), zero the clients that already hold >= N_train / K train samples, renormalise, and cut the
    train indices at ``floor(cumsum(p) * n_train_c)`` and the test indices at ``floor(cumsum(p) * n_test_c)``.
    The whole draw is repeated until every client has ``min_size`` train samples and (when there is a test set)
    ``min_size`` test samples. With a ``numpy.random.RandomState`` the calls are the official code's calls in its
    order (shuffle, shuffle, dirichlet), so ``RandomState(s)`` gives what the official code gives after
    ``np.random.seed(s)``. Returns sorted index arrays (the official code then shuffles each client's list; order
    does not matter here).
    """
    n_train = len(train_labels)
    if n_train < num_clients * min_size:
        raise FedPromptError(f"partition: {n_train} train samples cannot give {num_clients} clients at least "
                             f"{min_size} each; lower partition.min_size or num_clients.")
    check_test = len(test_labels) > 0
    if check_test and len(test_labels) < num_clients * min_size:
        raise FedPromptError(f"partition: {len(test_labels)} test samples cannot give {num_clients} clients at least "
                             f"{min_size} each (the papers' rule requires it of test too); lower partition.min_size "
                             "or num_clients.")
    if num_classes is None:
        num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    classes = range(num_classes)
    for _ in range(max_tries):
        train_parts: list[list[int]] = [[] for _ in range(num_clients)]
        test_parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            train_idx = np.flatnonzero(train_labels == c)
            test_idx = np.flatnonzero(test_labels == c)
            rng.shuffle(train_idx)
            rng.shuffle(test_idx)
            p = rng.dirichlet(np.repeat(alpha, num_clients))
            p = np.array([q * (len(part) < n_train / num_clients) for q, part in zip(p, train_parts)])
            p = p / p.sum()
            train_cuts = (np.cumsum(p) * len(train_idx)).astype(int)[:-1]
            test_cuts = (np.cumsum(p) * len(test_idx)).astype(int)[:-1]
            for part, piece in zip(train_parts, np.split(train_idx, train_cuts)):
                part.extend(piece.tolist())
            for part, piece in zip(test_parts, np.split(test_idx, test_cuts)):
                part.extend(piece.tolist())
        smallest = min(len(p) for p in train_parts)
        if check_test:
            smallest = min(smallest, min(len(p) for p in test_parts))
        if smallest >= min_size:
            return ([np.sort(np.array(p, dtype=np.int64)) for p in train_parts],
                    [np.sort(np.array(p, dtype=np.int64)) for p in test_parts])
    raise FedPromptError(f"partition: no Dirichlet(alpha={alpha}) draw gave every one of {num_clients} clients "
                         f"{min_size} train and test samples in {max_tries} tries; raise alpha or lower min_size.")


class Dirichlet(Partitioner):
    """Label shift, the papers' ``noniid-labeldir``: per class Dir(alpha) proportions over clients.

    Clients already holding n/K train samples get no more of later classes; the draw is repeated until every
    client has ``min_size`` train (and test) samples. Seeded with ``numpy.random.RandomState(seed)``; the calls
    are those of the official code in its order, see :func:`dirichlet_label_split_paired`.

    Args:
        num_clients: number of clients.
        alpha: Dirichlet concentration (smaller = more skewed; 0.5 and 0.3 in the papers).
        min_size: minimum train (and test) samples per client (10 in the papers).
        test_split: ``proportions`` (the papers): each class's test images are cut with the same drawn proportions
            as its train images, and ``min_size`` applies to test too. ``train_share`` (fedprompt 0.1): the train
            split alone is drawn (``min_size`` on train only) and each class's test images are split by the
            clients' realised share of that class's train images (largest remainder).
    """

    def __init__(self, num_clients: int = 10, alpha: float = 0.5, min_size: int = 10,
                 test_split: str = "proportions"):
        super().__init__(num_clients)
        if alpha <= 0:
            raise FedPromptError(f"partition.alpha must be > 0, got {alpha}")
        if test_split not in ("proportions", "train_share"):
            raise FedPromptError(f"partition.test_split must be 'proportions' or 'train_share', got {test_split!r}")
        self.alpha = alpha
        self.min_size = min_size
        self.test_split = test_split

    def split(self, data: DatasetSplits, seed: int) -> list[ClientSplit]:
        train_labels, test_labels = _labels(data.train), _labels(data.test)
        if self.test_split == "proportions":
            parts, tests = dirichlet_label_split_paired(train_labels, test_labels, self.num_clients, self.alpha,
                                                        self.min_size, np.random.RandomState(seed),
                                                        num_classes=len(data.classnames))
        else:  # fedprompt 0.1, draw for draw
            rng = np.random.default_rng(seed)
            parts = dirichlet_label_split(train_labels, self.num_clients, self.alpha, self.min_size, rng)
            tests = proportional_test_split(parts, train_labels, test_labels, len(data.classnames), rng)
        return self._clients(data, parts, tests)


# CIFAR-100 coarse (superclass) label of each fine label, fine labels in torchvision's order (alphabetical
# ``fine_label_names``); the python pickle's ``coarse_labels`` field gives the same mapping.
CIFAR100_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3,
    3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10,
    16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19,
    2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)


def _renormalize_without(weights: np.ndarray, index: int) -> np.ndarray:
    weights = np.delete(weights, index)
    return weights / weights.sum()


def pachinko_split(labels: np.ndarray, coarse_of: np.ndarray, num_clients: int, alpha: float, fine_alpha: float,
                   seed: int) -> list[np.ndarray]:
    """The two-level pachinko draw of FedOTP's ``noniid-labeldir100`` over a pool of samples.

    ``random.Random(seed)`` permutes the pool (``sample(range(n), n)``) and picks samples; ``RandomState(seed)``
    draws the Dirichlet weights and the multinomial choices, in the official code's order. Each client, in turn:
    Dir(alpha) over the coarse classes that still have samples, Dir(fine_alpha) over the remaining fine classes of
    each of them, then n // K times: a coarse class ~ its weights, a fine class ~ its weights, a sample of that
    fine class uniformly without replacement; an exhausted fine (coarse) class is dropped and the weights of the
    rest renormalised. Returns each client's pool indices in draw order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    coarse_of = np.asarray(coarse_of, dtype=np.int64)
    n = len(labels)
    py_rng = random.Random(seed)
    np_rng = np.random.RandomState(seed)
    order = py_rng.sample(range(n), n)
    num_fine = len(coarse_of)
    num_coarse = int(coarse_of.max()) + 1
    by_fine: dict[int, list[int]] = {f: [] for f in range(num_fine)}
    coarse_left = np.zeros(num_coarse, dtype=np.int64)
    for idx in order:
        by_fine[int(labels[idx])].append(idx)
        coarse_left[coarse_of[labels[idx]]] += 1
    fine_by_coarse: dict[int, list[int]] = {c: [] for c in range(num_coarse)}
    for fine, coarse in enumerate(coarse_of.tolist()):
        fine_by_coarse[coarse].append(fine)
    for coarse in range(num_coarse):  # a coarse class without samples can never be drawn
        fine_by_coarse[coarse] = [f for f in fine_by_coarse[coarse] if by_fine[f]]
        if not fine_by_coarse[coarse]:
            del fine_by_coarse[coarse]
    available = list(fine_by_coarse)
    per_client = n // num_clients
    clients: list[np.ndarray] = []
    for _ in range(num_clients):
        coarse_weights = np_rng.dirichlet(alpha * np.ones(len(fine_by_coarse)))
        fine_weights = {c: np_rng.dirichlet(fine_alpha * np.ones(len(fines))) for c, fines in fine_by_coarse.items()}
        picked = []
        for _ in range(per_client):
            coarse_pos = int(np.argmax(np_rng.multinomial(1, coarse_weights)))
            coarse = available[coarse_pos]
            fine_pos = int(np.argmax(np_rng.multinomial(1, fine_weights[coarse])))
            fine = fine_by_coarse[coarse][fine_pos]
            pool = by_fine[fine]
            sample = py_rng.choice(pool)
            pool.remove(sample)
            coarse_left[coarse] -= 1
            picked.append(sample)
            if not pool:
                fine_by_coarse[coarse].remove(fine)
                fine_weights[coarse] = _renormalize_without(fine_weights[coarse], fine_pos)
                if coarse_left[coarse] == 0:
                    del fine_by_coarse[coarse]
                    available.remove(coarse)
                    coarse_weights = _renormalize_without(coarse_weights, coarse_pos)
        clients.append(np.array(picked, dtype=np.int64))
    return clients


class Pachinko(Partitioner):
    """CIFAR-100 ``noniid-labeldir100`` (FedOTP's CIFAR-100 protocol), a two-level pachinko Dirichlet draw.

    Train and test samples are pooled (train first). Each client receives n // K pool samples drawn by
    :func:`pachinko_split`: Dir(alpha) over the coarse classes, Dir(fine_alpha) over the fine classes of each
    coarse class, sampling without replacement. The pool indices are then split back: a client's train set is its
    samples that came from the train split, its test set those from the test split. The client order is shuffled
    with ``random.Random(seed)`` (the official code shuffles it with the unseeded global ``random``). Samples left
    over (n mod K, and whatever the draw never reaches) belong to no client.

    Args:
        num_clients: number of clients (100 in FedOTP's CIFAR-100 script).
        alpha: concentration of the per-client Dirichlet over coarse classes (the script's beta, 0.3).
        fine_alpha: concentration of the Dirichlet over the fine classes inside a coarse class (10 in the code).
        coarse_labels: coarse class of each fine label; ``None`` takes CIFAR-100's 20 superclasses (the dataset
            must then have 100 classes in torchvision's order).
        seed: seed of the draw; ``None`` uses the data seed. The official code always uses 12345.
    """

    def __init__(self, num_clients: int = 100, alpha: float = 0.3, fine_alpha: float = 10.0,
                 coarse_labels: list[int] | None = None, seed: int | None = None):
        super().__init__(num_clients)
        if alpha <= 0 or fine_alpha <= 0:
            raise FedPromptError(f"partition.alpha and partition.fine_alpha must be > 0, got {alpha}, {fine_alpha}")
        self.alpha = alpha
        self.fine_alpha = fine_alpha
        self.coarse_labels = coarse_labels
        self.seed = seed

    def coarse_table(self, num_classes: int) -> np.ndarray:
        table = np.asarray(self.coarse_labels if self.coarse_labels is not None else CIFAR100_COARSE, dtype=np.int64)
        if len(table) != num_classes:
            what = "partition.coarse_labels" if self.coarse_labels is not None else "the CIFAR-100 coarse table"
            raise FedPromptError(f"partition: {what} has {len(table)} entries but the dataset has {num_classes} "
                                 "classes; pass partition.coarse_labels with one coarse id per class.")
        if table.min() < 0:
            raise FedPromptError("partition.coarse_labels must be >= 0")
        return table

    def split(self, data: DatasetSplits, seed: int) -> list[ClientSplit]:
        seed = self.seed if self.seed is not None else seed
        coarse = self.coarse_table(len(data.classnames))
        labels = np.concatenate([_labels(data.train), _labels(data.test)])
        if len(labels) < self.num_clients:
            raise FedPromptError(f"partition: {len(labels)} samples cannot be dealt to {self.num_clients} clients.")
        clients = pachinko_split(labels, coarse, self.num_clients, self.alpha, self.fine_alpha, seed)
        random.Random(seed).shuffle(clients)
        n_train = len(data.train)
        train_parts = [np.sort(c[c < n_train]) for c in clients]
        test_parts = [np.sort(c[c >= n_train] - n_train) for c in clients]
        return self._clients(data, train_parts, test_parts)


def pathological_class_blocks(num_classes: int, num_clients: int, class_seed: int = 2023) -> list[list[int]]:
    """The papers' class assignment: ids shuffled with ``random.seed(class_seed)``, blocks of round(C/K) classes,
    the last client takes the rest."""
    ids = list(range(num_classes))
    random.Random(class_seed).shuffle(ids)
    block = int(round(num_classes / num_clients))
    if block * (num_clients - 1) >= num_classes:
        raise FedPromptError(f"partition: {num_classes} classes cannot be dealt in blocks of {block} to "
                             f"{num_clients} clients; use fewer clients.")
    blocks = [ids[k * block:(k + 1) * block] for k in range(num_clients - 1)]
    return blocks + [ids[(num_clients - 1) * block:]]


class Pathological(Partitioner):
    """Label shift by classes: each client sees only some classes; its test set is every test image of them.

    With ``classes_per_client=None`` this is the papers' ``generate_federated_fewshot_dataset`` (FedOTP, FedPGP,
    FedMGP): a client owns every train image of its classes, so the few-shot step that follows
    (:func:`few_shot`) samples ``num_shots`` images of each class from that class's whole train pool, as the
    papers do; the classifier still scores all classes. (The papers draw those shots with the same
    ``random.Random(2023)`` that shuffled the classes; :func:`fedprompt.data.protocols.official_pathological_shots`
    reproduces their exact picks.)

    Args:
        num_clients: number of clients.
        classes_per_client: ``None`` for the papers' disjoint contiguous blocks; k for k classes per client
            (classes dealt round-robin from a seeded shuffle; a class's train images split among its holders).
        class_seed: seed of the class shuffle (2023 in the papers' code).
    """

    def __init__(self, num_clients: int = 10, classes_per_client: int | None = None, class_seed: int = 2023):
        super().__init__(num_clients)
        self.classes_per_client = classes_per_client
        self.class_seed = class_seed

    def client_classes(self, num_classes: int) -> list[list[int]]:
        """Class ids of each client."""
        if self.classes_per_client is None:
            return pathological_class_blocks(num_classes, self.num_clients, self.class_seed)
        k = self.classes_per_client
        if not 1 <= k <= num_classes:
            raise FedPromptError(f"partition.classes_per_client must be in 1..{num_classes}, got {k}")
        order = np.random.default_rng(self.class_seed).permutation(num_classes)
        flat = np.resize(order, self.num_clients * k)
        return [sorted(set(flat[i * k:(i + 1) * k].tolist())) for i in range(self.num_clients)]

    def split(self, data: DatasetSplits, seed: int) -> list[ClientSplit]:
        rng = np.random.default_rng(seed)
        train_labels, test_labels = _labels(data.train), _labels(data.test)
        owned = self.client_classes(len(data.classnames))
        holders = defaultdict(list)
        for k, classes in enumerate(owned):
            for c in classes:
                holders[c].append(k)
        parts: list[list[np.ndarray]] = [[] for _ in owned]
        for c, ks in holders.items():
            idx = rng.permutation(np.flatnonzero(train_labels == c))
            for k, piece in zip(ks, np.array_split(idx, len(ks))):
                parts[k].append(piece)
        train_parts = [np.sort(np.concatenate(p)) if p else np.array([], dtype=np.int64) for p in parts]
        test_parts = [np.flatnonzero(np.isin(test_labels, classes)) for classes in owned]
        return self._clients(data, train_parts, test_parts)


def class_blocks(num_classes: int, classes_per_client: int, class_seed: int | None = None) -> list[list[int]]:
    """FedTPG's class assignment of one dataset: ``n = max(1, round(C / k))`` clients (Python's round, half to
    even, as numpy's ``around`` in the official code); client j takes the classes at positions ``[j*k, (j+1)*k)``
    of the class order, the last client everything from ``(n-1)*k``. The order is the label order (the official
    code), or a ``random.Random(class_seed).shuffle`` of it. Each block is returned in increasing label order."""
    if classes_per_client < 1:
        raise FedPromptError(f"partition.classes_per_client must be >= 1, got {classes_per_client}")
    order = list(range(num_classes))
    if class_seed is not None:
        random.Random(class_seed).shuffle(order)
    k = classes_per_client
    n = max(1, round(num_classes / k))
    blocks = [order[j * k:(j + 1) * k] for j in range(n - 1)] + [order[(n - 1) * k:]]
    return [sorted(block) for block in blocks]


def own_classes_client(client_id: int, data: DatasetSplits, classes: list[int], name: str) -> ClientSplit:
    """A client holding every train and test sample of ``classes`` (label ids of ``data``), with its own class list
    (their names, in the given order) and the samples relabelled to positions in it."""
    relabel = {c: i for i, c in enumerate(classes)}

    def own(samples: list[Sample]) -> list[Sample]:
        return [replace(s, label=relabel[s.label]) for s in samples if s.label in relabel]

    return ClientSplit(client_id, own(data.train), own(data.test), name=name,
                       classnames=[data.classnames[c] for c in classes])


class CrossClass(Partitioner):
    """FedTPG's ``cross_cls`` protocol on one dataset: its classes dealt to clients ``classes_per_client`` at a time,
    each client scoring only its own classes.

    Client j of a dataset with C classes (after ``subsample_classes``; FedTPG uses the CoOp base half) owns the block
    of :func:`class_blocks`: ``n = max(1, round(C / classes_per_client))`` clients, blocks of ``classes_per_client``
    classes, the last client takes the rest (the official code's rule, so a block can be larger or smaller than
    ``classes_per_client``: 50 classes give 20 + 30, 51 give 20 + 20 + 11, 19 give one client of 19). A client's train
    set is every train image of its classes (the few-shot step then keeps ``num_shots`` per class), its test set
    every test image of its classes, and its class list (:attr:`ClientSplit.classnames`) the names of its classes in
    label order; its sample labels index into that list. With :class:`fedprompt.data.Combined` the rule is applied
    to each dataset separately.

    Args:
        classes_per_client: classes per client (20 in FedTPG).
        class_seed: ``None`` deals the classes in label order, as the official code does (``np.arange``, no
            shuffle); an integer shuffles the class order first with ``random.Random(class_seed)``.
    """

    def __init__(self, classes_per_client: int = 20, class_seed: int | None = None):
        super().__init__(1)
        if classes_per_client < 1:
            raise FedPromptError(f"partition.classes_per_client must be >= 1, got {classes_per_client}")
        self.classes_per_client = classes_per_client
        self.class_seed = class_seed

    def client_classes(self, num_classes: int) -> list[list[int]]:
        """Class ids of each client."""
        return class_blocks(num_classes, self.classes_per_client, self.class_seed)

    def split(self, data: DatasetSplits, seed: int) -> list[ClientSplit]:
        blocks = self.client_classes(len(data.classnames))
        return [own_classes_client(k, data, block, f"client{k}") for k, block in enumerate(blocks)]


class ByDomain(Partitioner):
    """Feature shift: one client per domain, or ``clients_per_domain`` clients per domain.

    Args:
        clients_per_domain: clients each domain is split into.
        alpha: ``None`` splits a domain iid among its clients; a value splits it by a Dirichlet(alpha) label draw.
        min_size: minimum train samples per client for the Dirichlet draw.
    """

    def __init__(self, clients_per_domain: int = 1, alpha: float | None = None, min_size: int = 2):
        super().__init__(1)
        if clients_per_domain < 1:
            raise FedPromptError(f"partition.clients_per_domain must be >= 1, got {clients_per_domain}")
        self.clients_per_domain = clients_per_domain
        self.alpha = alpha
        self.min_size = min_size

    def split(self, data: DatasetSplits, seed: int) -> list[ClientSplit]:
        rng = np.random.default_rng(seed)
        domains = data.domains
        train_dom = np.array([s.domain for s in data.train])
        test_dom = np.array([s.domain for s in data.test])
        train_labels, test_labels = _labels(data.train), _labels(data.test)
        train_parts, test_parts, names = [], [], []
        for domain in domains:
            tr, te = np.flatnonzero(train_dom == domain), np.flatnonzero(test_dom == domain)
            k = self.clients_per_domain
            if k == 1:
                local = [np.arange(len(tr))]
            elif self.alpha is None:
                local = [np.sort(p) for p in np.array_split(rng.permutation(len(tr)), k)]
            else:
                local = dirichlet_label_split(train_labels[tr], k, self.alpha, self.min_size, rng)
            local_test = proportional_test_split(local, train_labels[tr], test_labels[te], len(data.classnames), rng)
            for j, (a, b) in enumerate(zip(local, local_test)):
                train_parts.append(tr[a])
                test_parts.append(te[b])
                names.append(domain if k == 1 else f"{domain}-{j}")
        self.num_clients = len(names)
        return self._clients(data, train_parts, test_parts, names)


def few_shot(client: ClientSplit, num_shots: int, seed: int) -> ClientSplit:
    """Keep at most ``num_shots`` train images per class (seeded per client); the test set is unchanged."""
    rng = np.random.default_rng([seed, client.client_id])
    by_class = defaultdict(list)
    for i, sample in enumerate(client.train):
        by_class[sample.label].append(i)
    keep = []
    for label in sorted(by_class):
        idx = by_class[label]
        keep.extend(sorted(rng.choice(idx, size=min(num_shots, len(idx)), replace=False).tolist()))
    return replace(client, train=[client.train[i] for i in sorted(keep)])


def count_table(clients: list[ClientSplit], num_classes: int, split: str = "train") -> np.ndarray:
    """Client x class count matrix of the train (or test) samples."""
    table = np.zeros((len(clients), num_classes), dtype=np.int64)
    for k, client in enumerate(clients):
        for sample in getattr(client, split):
            table[k, sample.label] += 1
    return table
