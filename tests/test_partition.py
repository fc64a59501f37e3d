"""Partitioners: counts, determinism, minimum size, disjointness, few-shot sampling."""

import numpy as np
import pytest

from fedprompt.data import (IID, ByDomain, DatasetSplits, Dirichlet, Pathological, Sample, count_table, few_shot)
from fedprompt.errors import FedPromptError


def make_splits(num_classes=10, train_per_class=30, test_per_class=10, domains=("",)):
    train = [Sample(f"{d}/tr/{c}/{i}", c, d) for d in domains for c in range(num_classes) for i in range(train_per_class)]
    test = [Sample(f"{d}/te/{c}/{i}", c, d) for d in domains for c in range(num_classes) for i in range(test_per_class)]
    return DatasetSplits([f"class{c}" for c in range(num_classes)], train, test)


def paths(samples):
    return {s.path for s in samples}


@pytest.mark.parametrize("partition", [IID(5), Dirichlet(5, alpha=0.5, min_size=10), Pathological(5),
                                       Pathological(4, classes_per_client=3)])
def test_train_samples_dealt_exactly_once(partition):
    data = make_splits()
    clients = partition.split(data, seed=3)
    assert len(clients) == partition.num_clients
    all_train = [s.path for c in clients for s in c.train]
    assert len(all_train) == len(set(all_train)) == len(data.train)  # disjoint and complete


@pytest.mark.parametrize("partition", [IID(5), Dirichlet(5, alpha=0.3, min_size=10),
                                       Pathological(4, classes_per_client=3), ByDomain(2)])
def test_partitions_are_deterministic_and_seed_dependent(partition):
    data = make_splits(domains=("a", "b")) if isinstance(partition, ByDomain) else make_splits()
    first = [paths(c.train) for c in partition.split(data, seed=1)]
    again = [paths(c.train) for c in partition.split(data, seed=1)]
    other = [paths(c.train) for c in partition.split(data, seed=2)]
    assert first == again
    assert first != other


def test_dirichlet_min_size_and_skew():
    data = make_splits(num_classes=10, train_per_class=40, test_per_class=40)
    clients = Dirichlet(8, alpha=0.1, min_size=15).split(data, seed=0)
    table = count_table(clients, 10)
    assert table.sum() == 400 and (table.sum(1) >= 15).all()
    assert (table == 0).sum() > 20  # alpha 0.1 leaves most client-class cells empty
    with pytest.raises(FedPromptError, match="min_size"):
        Dirichlet(8, alpha=0.5, min_size=100).split(data, seed=0)


def test_dirichlet_test_split_follows_train_proportions():
    data = make_splits(num_classes=4, train_per_class=100, test_per_class=100)
    clients = Dirichlet(3, alpha=0.5, min_size=10).split(data, seed=5)
    train, test = count_table(clients, 4), count_table(clients, 4, "test")
    assert test.sum() == 400
    assert np.abs(train - test).max() <= 2  # same per-class proportions (equal class sizes here)


def test_pathological_blocks_disjoint_and_test_covers_own_classes():
    data = make_splits(num_classes=10)
    part = Pathological(3)
    blocks = part.client_classes(10)
    assert [len(b) for b in blocks] == [3, 3, 4]  # round(10/3) = 3, the last client takes the rest
    assert sorted(sum(blocks, [])) == list(range(10))
    clients = part.split(data, seed=0)
    assert [paths(c.train) for c in part.split(data, seed=9)] == [paths(c.train) for c in clients]  # fixed classes
    for client, classes in zip(clients, blocks):
        assert {s.label for s in client.train} == set(classes)
        assert len(client.test) == 10 * len(classes)  # every test image of its classes


def test_pathological_k_classes_per_client():
    clients = Pathological(6, classes_per_client=2).split(make_splits(num_classes=6), seed=0)
    assert all(len({s.label for s in c.train}) == 2 for c in clients)


def test_by_domain_one_client_per_domain_and_dirichlet_inside():
    data = make_splits(num_classes=5, domains=("art", "photo", "sketch"))
    clients = ByDomain().split(data, seed=0)
    assert [c.name for c in clients] == ["art", "photo", "sketch"]
    assert all({s.domain for s in c.train} == {c.name} == {s.domain for s in c.test} for c in clients)
    split = ByDomain(clients_per_domain=3, alpha=0.5, min_size=5).split(data, seed=0)
    assert len(split) == 9 and [c.name for c in split][:3] == ["art-0", "art-1", "art-2"]
    assert sum(len(c.train) for c in split) == len(data.train)


def test_few_shot_sampling():
    data = make_splits(num_classes=4, train_per_class=20)
    client = IID(1).split(data, seed=0)[0]
    shot = few_shot(client, 3, seed=0)
    assert count_table([shot], 4).tolist() == [[3, 3, 3, 3]]
    assert paths(shot.train) == paths(few_shot(client, 3, seed=0).train)
    assert paths(shot.train) != paths(few_shot(client, 3, seed=1).train)
    assert shot.test == client.test
