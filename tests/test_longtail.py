"""Long-tailed federations (FedPuReL's protocol): the exponential class profile, the images each class keeps (the
official code's own function run on the same labels), the many / medium / few-shot groups, and the checks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from conftest import CIFAR10, require
from fedprompt.data import CIFAR, Dirichlet, LongTailed, Sample, SplitFolders, Synthetic
from fedprompt.data.longtail import class_groups, long_tail_counts, long_tail_train
from fedprompt.errors import FedPromptError

MIRROR = Path(os.environ.get("FEDPROMPT_MIRROR", "/work/.mirror")) / "shihaohou+FedPuReL" / "repo"


def test_profile_by_hand():
    # CIFAR-100-LT, IF = 100: 500 images for class 0, 5 for class 99, 500 * 0.01 ** (c / 99) in between
    counts = long_tail_counts(50000, 100, 0.01)
    assert counts[0] == 500 and counts[99] == 5 and counts[50] == int(500 * 0.01 ** (50 / 99))
    assert long_tail_counts(50000, 10, 0.01) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(100, 4, 1.0) == [25, 25, 25, 25]


def official_long_tail():
    """FedPuReL's ``datasets/long_tail.py`` from the mirror, unmodified (skip without the mirror)."""
    if not (MIRROR / "HEAD").exists():
        pytest.skip(f"no mirror of shihaohou/FedPuReL at {MIRROR} (set FEDPROMPT_MIRROR)")
    source = subprocess.run(["git", f"--git-dir={MIRROR}", "show", "HEAD:datasets/long_tail.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("fedpurel_long_tail", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, "FedPuReL/datasets/long_tail.py", "exec"), module.__dict__)
    return module


def test_kept_images_equal_the_official_code(capsys):
    official = official_long_tail()
    labels = [(7 * i + i // 13) % 10 for i in range(2000)]  # 10 classes, unsorted, 200 each
    by_class = [[i for i, y in enumerate(labels) if y == c] for c in range(10)]
    counts, kept = official.train_long_tail(by_class, 10, 0.05, "exp")
    capsys.readouterr()  # the official function prints its counts
    train = [Sample(f"img{i}", y) for i, y in enumerate(labels)]
    mine = long_tail_train(train, 10, 0.05, profile_seed=1)
    assert [s.path for s in mine] == [f"img{i}" for block in kept for i in block]  # the same images, same order
    assert counts == long_tail_counts(2000, 10, 0.05)


def test_groups_and_federation_on_generated_data():
    data = LongTailed(Synthetic(num_classes=6, train_per_class=150, test_per_class=10, image_size=8,
                                partition=Dirichlet(num_clients=3, alpha=1.0, min_size=1)),
                      imbalance_factor=0.1)
    splits = data.setup()
    counts = long_tail_counts(900, 6, 0.1)  # [150, 94, 59, 37, 23, 15]
    per_class = [sum(1 for c in splits.clients for s in c.train if s.label == k) for k in range(6)]
    assert per_class == counts
    assert splits.class_groups == {"many": [0], "medium": [1, 2, 3, 4], "few": [5]}
    assert sum(len(c.test) for c in splits.clients) == 60  # the test split stays balanced and whole
    assert class_groups([101, 100, 21, 20, 0]) == {"many": [0], "medium": [1, 2], "few": [3, 4]}


def test_cifar10_mini_long_tailed():
    root = require(CIFAR10)
    data = LongTailed(CIFAR(root=str(root), partition=Dirichlet(num_clients=5, alpha=1.0, min_size=1)),
                      imbalance_factor=0.1)
    splits = data.setup()
    assert [sum(1 for c in splits.clients for s in c.train if s.label == k) for k in range(10)] == \
        long_tail_counts(2000, 10, 0.1) == [200, 154, 119, 92, 71, 55, 43, 33, 25, 20]
    assert splits.class_groups == {"many": [0, 1, 2], "medium": [3, 4, 5, 6, 7, 8], "few": [9]}
    assert SplitFolders(root=str(root)).read().classnames == splits.classnames


def test_checks():
    with pytest.raises(FedPromptError, match=r"imbalance_factor must be in \(0, 1\]"):
        LongTailed(Synthetic(), imbalance_factor=100)
    with pytest.raises(FedPromptError, match="subsample_classes must be 'all'"):
        LongTailed(Synthetic(subsample_classes="base"))
    with pytest.raises(FedPromptError, match="few_at_most"):
        LongTailed(Synthetic(), many_above=10, few_at_most=10)
    with pytest.raises(FedPromptError, match="cannot be nested"):
        LongTailed(LongTailed(Synthetic()))
