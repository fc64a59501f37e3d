"""The shipped PACS and CIFAR-10 configs on the real images in ../shared/data, with the tiny architecture."""

import pytest

from conftest import CIFAR10, PACS, ROOT, TINY, read_rows, require


@pytest.mark.parametrize("config, data", [("promptfl_pacs.yaml", PACS), ("promptfl_cifar10.yaml", CIFAR10)])
def test_promptfl_train_loss_falls(cli, tmp_path, config, data):
    require(data)
    code, _, err = cli("fit", "--config", ROOT / "configs" / config, "--data.root", data, *TINY,
                       "--out_dir", tmp_path, "--federation.rounds", "3", "--train.feature_cache", "true",
                       "--train.augment", "false", "--log.progress", "false")
    assert code == 0, err
    losses = [row["train_loss"] for row in read_rows(tmp_path)]
    assert losses[-1] < losses[0], losses
