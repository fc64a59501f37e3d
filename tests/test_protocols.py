"""Partition protocols (pathological, Dirichlet, pachinko) and the base/novel and validation protocols.

Expected values are derived by hand from the papers' rules (see fedprompt/data/partition.py and protocols.py);
where the rule involves random draws, a literal transcription of the official loop is the reference.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedprompt.data.base import ClientSplit, DatasetSplits, Sample
from fedprompt.data.partition import (CIFAR100_COARSE, Dirichlet, Pachinko, Pathological, count_table, few_shot,
                                      pachinko_split, pathological_class_blocks)
from fedprompt.data.protocols import (assign_validation, base_novel_split, official_pathological_shots,
                                      subsample_classes, validation_split)
from fedprompt.errors import FedPromptError


def make_splits(train_counts, test_counts, val_counts=None, domain="") -> DatasetSplits:
    """Class c gets train_counts[c] train samples (etc.), interleaved by class like a real split file."""
    def build(counts, split):
        out = []
        for i in range(max(counts, default=0)):
            for c, n in enumerate(counts):
                if i < n:
                    out.append(Sample(f"{split}/{c}/{i}", c, domain))
        return out

    names = [f"class{c}" for c in range(len(train_counts))]
    return DatasetSplits(names, build(train_counts, "train"), build(test_counts, "test"),
                         val=build(val_counts or [], "val"), name="toy")


# ------------------------------------------------------------------------------------------------ pathological
def test_pathological_blocks_ten_classes_three_clients():
    # random.Random(2023).shuffle(list(range(10))) == [1, 0, 3, 8, 5, 4, 2, 9, 7, 6]; blocks of round(10/3) = 3,
    # the last client takes the remaining 4.
    assert pathological_class_blocks(10, 3) == [[1, 0, 3], [8, 5, 4], [2, 9, 7, 6]]


def test_pathological_blocks_use_python_round():
    # round(10/4) = round(2.5) = 2 (banker's rounding, as in the papers' int(round(...))): 2, 2, 2 and the rest 4.
    assert pathological_class_blocks(10, 4) == [[1, 0], [3, 8], [5, 4], [2, 9, 7, 6]]
    with pytest.raises(FedPromptError, match="blocks"):
        pathological_class_blocks(10, 12)  # round(10/12) = 1 -> the last two clients would get nothing


def test_pathological_split_and_few_shot_counts():
    # class c has c + 3 train images and 2 test images
    data = make_splits([c + 3 for c in range(10)], [2] * 10)
    clients = Pathological(3).split(data, seed=0)
    train = count_table(clients, 10)
    # client 0 owns {1, 0, 3}: 4 + 3 + 6 = 13; client 1 {8, 5, 4}: 11 + 8 + 7 = 26; client 2 {2, 9, 7, 6}: 36
    assert train.sum(1).tolist() == [13, 26, 36]
    assert train[0].tolist() == [3, 4, 0, 6, 0, 0, 0, 0, 0, 0]
    assert count_table(clients, 10, "test").sum(1).tolist() == [6, 6, 8]  # every test image of its classes
    assert count_table(clients, 10, "test")[2].tolist() == [0, 0, 2, 0, 0, 0, 2, 2, 0, 2]
    # 4 shots per class from the owner's whole class pool (class 0 has only 3)
    shots = [few_shot(c, 4, seed=0) for c in clients]
    assert count_table(shots, 10).sum(1).tolist() == [11, 12, 16]
    assert count_table(shots, 10)[0].tolist() == [3, 4, 0, 4, 0, 0, 0, 0, 0, 0]


def test_official_pathological_shots_counts_and_picks():
    data = make_splits([c + 3 for c in range(10)], [2] * 10)
    labels = [s.label for s in data.train]
    picks = official_pathological_shots(labels, num_clients=3, num_shots=4)
    assert [len(p) for p in picks] == [11, 12, 16]
    assert [sorted({labels[i] for i in p}) for p in picks] == [[0, 1, 3], [4, 5, 8], [2, 6, 7, 9]]
    # the official code, literally: global random seeded with 2023, shuffle, then sample client by client
    state = random.getstate()
    try:
        random.seed(2023)
        class_list = list(range(10))
        random.shuffle(class_list)
        tracker = {}
        for i, y in enumerate(labels):
            tracker.setdefault(y, []).append(i)
        expected = []
        for idx in range(3):
            mine = class_list[idx * 3:10] if idx == 2 else class_list[idx * 3:(idx + 1) * 3]
            out = []
            for label, items in tracker.items():
                if label in mine:
                    out.extend(random.sample(items, 4) if len(items) >= 4 else items)
            expected.append(out)
    finally:
        random.setstate(state)
    assert picks == expected


# ---------------------------------------------------------------------------------------------------- Dirichlet
def official_labeldir(y_train, y_test, n_parties, beta, num_classes, seed):
    """FedOTP utils/datasplit.py, partition == 'noniid-labeldir', transcribed (before its final shuffles)."""
    np.random.seed(seed)
    min_size, n_train = 0, y_train.shape[0]
    while min_size < 10:
        batch_train = [[] for _ in range(n_parties)]
        batch_test = [[] for _ in range(n_parties)]
        for k in range(num_classes):
            train_k, test_k = np.where(y_train == k)[0], np.where(y_test == k)[0]
            np.random.shuffle(train_k)
            np.random.shuffle(test_k)
            p = np.random.dirichlet(np.repeat(beta, n_parties))
            p = np.array([q * (len(b) < n_train / n_parties) for q, b in zip(p, batch_train)])
            p = p / p.sum()
            cut_train = (np.cumsum(p) * len(train_k)).astype(int)[:-1]
            cut_test = (np.cumsum(p) * len(test_k)).astype(int)[:-1]
            batch_train = [b + x.tolist() for b, x in zip(batch_train, np.split(train_k, cut_train))]
            batch_test = [b + x.tolist() for b, x in zip(batch_test, np.split(test_k, cut_test))]
            min_size = min(min(len(b) for b in batch_train), min(len(b) for b in batch_test))
    return [sorted(b) for b in batch_train], [sorted(b) for b in batch_test]


def test_dirichlet_matches_the_papers_code():
    data = make_splits([50] * 10, [25] * 10)
    clients = Dirichlet(num_clients=5, alpha=0.5, min_size=10).split(data, seed=0)
    # totals of the official draw for np.random.seed(0) (computed once with the transcription above)
    assert [len(c.train) for c in clients] == [113, 73, 102, 102, 110]
    assert [len(c.test) for c in clients] == [55, 36, 51, 51, 57]
    y_train = np.array([s.label for s in data.train])
    y_test = np.array([s.label for s in data.test])
    ref_train, ref_test = official_labeldir(y_train, y_test, 5, 0.5, 10, seed=0)
    index_train = {s.path: i for i, s in enumerate(data.train)}
    index_test = {s.path: i for i, s in enumerate(data.test)}
    assert [sorted(index_train[s.path] for s in c.train) for c in clients] == ref_train
    assert [sorted(index_test[s.path] for s in c.test) for c in clients] == ref_test


@pytest.mark.parametrize("seed", [1, 2])
def test_dirichlet_test_follows_train_proportions(seed):
    data = make_splits([40] * 6, [20] * 6)
    clients = Dirichlet(num_clients=4, alpha=0.3, min_size=5).split(data, seed=seed)
    train, test = count_table(clients, 6), count_table(clients, 6, "test")
    assert train.sum() == 240 and test.sum() == 120  # every sample dealt exactly once
    assert (train.sum(1) >= 5).all() and (test.sum(1) >= 5).all()
    # both are cuts of the same cumulative proportions: floor(P*40)/40 and floor(P*20)/20 differ by < 2/40 + 2/20
    assert np.abs(train / 40 - test / 20).max() < 0.15
    paths = [s.path for c in clients for s in c.train]
    assert len(paths) == len(set(paths))


def test_dirichlet_single_client_and_options():
    data = make_splits([12] * 3, [4] * 3)
    (only,) = Dirichlet(num_clients=1, alpha=0.5, min_size=1).split(data, seed=0)
    assert len(only.train) == 36 and len(only.test) == 12
    old = Dirichlet(num_clients=3, alpha=0.5, min_size=2, test_split="train_share").split(data, seed=0)
    assert sum(len(c.test) for c in old) == 12
    with pytest.raises(FedPromptError, match="test_split"):
        Dirichlet(test_split="nope")
    with pytest.raises(FedPromptError, match="test samples"):
        Dirichlet(num_clients=4, min_size=10).split(make_splits([50] * 2, [10] * 2), seed=0)


# ----------------------------------------------------------------------------------------------------- Pachinko
def test_pachinko_sizes_and_index_bookkeeping():
    # a CIFAR-100-shaped toy: 100 classes, 4 train + 2 test images each -> a pool of 600, 10 clients of 60
    data = make_splits([4] * 100, [2] * 100)
    clients = Pachinko(num_clients=10, alpha=0.3).split(data, seed=12345)
    assert [len(c.train) + len(c.test) for c in clients] == [60] * 10
    train_paths = [s.path for c in clients for s in c.train]
    test_paths = [s.path for c in clients for s in c.test]
    assert len(set(train_paths)) == len(train_paths) and len(set(test_paths)) == len(test_paths)
    assert all(p.startswith("train/") for p in train_paths) and all(p.startswith("test/") for p in test_paths)
    assert len(train_paths) + len(test_paths) == 600  # 600 // 10 * 10: the whole pool is dealt
    for c in clients:  # labels survive the split back into train/test
        assert all(int(s.path.split("/")[1]) == s.label for s in c.train + c.test)


def test_pachinko_complete_and_disjoint_with_custom_coarse_table():
    data = make_splits([7, 7, 7, 7], [3, 3, 3, 3])  # pool of 40, coarse classes {0, 1} -> {0}, {2, 3} -> {1}
    clients = Pachinko(num_clients=4, alpha=0.5, fine_alpha=1.0, coarse_labels=[0, 0, 1, 1]).split(data, seed=3)
    assert [len(c.train) + len(c.test) for c in clients] == [10] * 4
    assert sum(len(c.train) for c in clients) == 28 and sum(len(c.test) for c in clients) == 12
    assert len({s.path for c in clients for s in c.train + c.test}) == 40
    with pytest.raises(FedPromptError, match="coarse"):
        Pachinko(num_clients=2).split(data, seed=0)  # CIFAR-100's table needs 100 classes


def official_pachinko(y, n_parties, beta, seed, alpha=10):
    """FedOTP utils/datasplit.py, partition == 'noniid-labeldir100', transcribed (before its client shuffle)."""
    coarse_labels = np.array(CIFAR100_COARSE)
    rng = random.Random(seed)
    np.random.seed(seed)
    selected = rng.sample(list(range(len(y))), len(y))
    by_fine = {k: [] for k in range(100)}
    by_coarse = {k: [] for k in range(20)}
    for idx in selected:
        by_fine[y[idx]].append(idx)
        by_coarse[coarse_labels[y[idx]]].append(idx)
    available = list(range(20))
    fine_by_coarse = {k: [] for k in range(20)}
    for fine, coarse in enumerate(coarse_labels):
        fine_by_coarse[coarse].append(fine)
    out = [[] for _ in range(n_parties)]
    for client in range(n_parties):
        cw = np.random.dirichlet(alpha=beta * np.ones(len(fine_by_coarse)))
        fw = {c: np.random.dirichlet(alpha=alpha * np.ones(len(f))) for c, f in fine_by_coarse.items()}
        for _ in range(len(y) // n_parties):
            ci = int(np.argmax(np.random.multinomial(1, cw)))
            coarse = available[ci]
            fi = int(np.argmax(np.random.multinomial(1, fw[coarse])))
            fine = fine_by_coarse[coarse][fi]
            sample = int(rng.choice(list(by_fine[fine])))
            out[client].append(sample)
            by_fine[fine].remove(sample)
            by_coarse[coarse].remove(sample)
            if not by_fine[fine]:
                fine_by_coarse[coarse].remove(fine)
                fw[coarse] = np.delete(fw[coarse], fi) / np.delete(fw[coarse], fi).sum()
                if not by_coarse[coarse]:
                    fine_by_coarse.pop(coarse)
                    available.remove(coarse)
                    cw = np.delete(cw, ci) / np.delete(cw, ci).sum()
    return out


def test_pachinko_matches_the_papers_code():
    y = np.repeat(np.arange(100), 6)  # small enough that fine and coarse classes run out during the draw
    np.random.default_rng(1).shuffle(y)
    mine = pachinko_split(y, np.array(CIFAR100_COARSE), 100, 0.3, 10.0, seed=12345)
    assert [m.tolist() for m in mine] == official_pachinko(y, 100, 0.3, seed=12345)


# --------------------------------------------------------------------------------------------------- base/novel
def test_base_novel_split_seven_classes():
    data = make_splits([3] * 7, [2] * 7, val_counts=[1] * 7)
    base, novel = base_novel_split(data)
    assert base.classnames == ["class0", "class1", "class2", "class3"]
    assert novel.classnames == ["class4", "class5", "class6"]
    assert sorted({s.label for s in base.train}) == [0, 1, 2, 3]
    assert sorted({s.label for s in novel.train}) == [0, 1, 2]
    assert (len(base.train), len(base.test), len(base.val)) == (12, 8, 4)
    assert (len(novel.train), len(novel.test), len(novel.val)) == (9, 6, 3)
    # novel label 0 is old class 4, with its samples
    assert {s.path for s in novel.test if s.label == 0} == {s.path for s in data.test if s.label == 4}
    assert subsample_classes(data, "all") is data
    assert subsample_classes(data, "novel").classnames == novel.classnames
    with pytest.raises(FedPromptError, match="subsample_classes"):
        subsample_classes(data, "new")
    with pytest.raises(FedPromptError, match="at least 2"):
        base_novel_split(make_splits([3], [1]))


def test_pathological_on_base_classes():
    base, _ = base_novel_split(make_splits([5] * 20, [2] * 20))  # 10 base classes
    clients = Pathological(3).split(base, seed=0)
    assert [sorted({s.label for s in c.train}) for c in clients] == [[0, 1, 3], [4, 5, 8], [2, 6, 7, 9]]


# --------------------------------------------------------------------------------------------------- validation
def test_validation_split_from_val_set():
    data = make_splits([10] * 3, [2] * 3, val_counts=[6, 6, 3])
    for shots, per_class in ((1, [1, 1, 1]), (2, [2, 2, 2]), (16, [4, 4, 3])):
        out = validation_split(data, shots, seed=0)
        assert np.bincount([s.label for s in out.val]).tolist() == per_class
        assert out.train == data.train and out.test == data.test
    assert validation_split(data, None).val == data.val
    assert validation_split(data, 2, seed=1).val == validation_split(data, 2, seed=1).val


def test_validation_split_carved_from_train():
    data = make_splits([10, 10, 1], [2] * 3)
    out = validation_split(data, 8, seed=0)
    assert np.bincount([s.label for s in out.val], minlength=3).tolist() == [4, 4, 0]  # a lone image stays in train
    assert len(out.train) == 21 - 8
    assert not {s.path for s in out.val} & {s.path for s in out.train}
    assert validation_split(data, 8, carve_from_train=False).val == []
    with pytest.raises(FedPromptError, match="num_shots"):
        validation_split(data, 0)


def test_assign_validation():
    data = validation_split(make_splits([10] * 4, [2] * 4, val_counts=[2] * 4), 2, seed=0)
    clients = [ClientSplit(0, [s for s in data.train if s.label < 2], []),
               ClientSplit(1, [s for s in data.train if s.label >= 2], [])]
    out = assign_validation(clients, data.val)
    assert sorted({s.label for s in out[0].val}) == [0, 1] and len(out[1].val) == 4
