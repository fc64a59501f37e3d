"""The data side of the engine: decode-once stores give the CPU transform's tensors, device augmentation is per
client (any K gives the K = 1 run), and decoded images and features persist between runs."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT, read_rows, without_timings
from fedprompt.backbone import Backbone
from fedprompt.data import Synthetic, clip_transforms
from fedprompt.data.store import ImageStore, StoreKind
from fedprompt.federation.feed import Feed, ImageFiles, StoredImages, sample_lists

SMOKE = str(ROOT / "configs" / "smoke.yaml")



def test_store_batches_equal_the_cpu_transform(tiny_backbone: Backbone):
    splits = Synthetic(num_classes=3, train_per_class=4, test_per_class=5, image_size=40).setup()
    _, test_tf = clip_transforms(tiny_backbone.preprocess_cfg, augment=False)
    samples = [s for c in splits.clients for s in c.test + c.train]
    store = ImageStore.build(samples, splits.loader, StoreKind.test(test_tf), progress=False)
    lists = sample_lists(splits.clients, {})
    from_files = ImageFiles(lists, {"train": test_tf, "test": test_tf, "val": test_tf}, splits.loader)
    from_store = StoredImages(store, lists)
    files, stored = Feed(lists, from_files, from_files), Feed(lists, from_store, from_store)
    for name in ("test:0", "train:1"):
        a = list(files.eval_batches(name, 4))
        b = [stored.finish(batch) for batch in stored.eval_batches(name, 4)]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def fit(cli, out_dir, *extra):
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", out_dir, "--log.progress", "false", *extra)
    assert code == 0, err
    return without_timings(read_rows(out_dir)), torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_device_augmentation_is_per_client(cli, tmp_path):
    flags = ["--train.augment", "true", "--train.device_augment", "true", "--federation.fraction", "0.75",
             "--federation.rounds", "3"]
    rows_1, ckpt_1 = fit(cli, tmp_path / "k1", *flags, "--federation.parallel_clients", "1")
    rows_4, ckpt_4 = fit(cli, tmp_path / "k4", *flags, "--federation.parallel_clients", "4")
    assert [r["client_acc"] for r in rows_1] == [r["client_acc"] for r in rows_4]
    for a, b in zip(rows_1, rows_4):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    torch.testing.assert_close(ckpt_4["global"]["prompt.ctx"], ckpt_1["global"]["prompt.ctx"], rtol=1e-4, atol=1e-5)
    plain, _ = fit(cli, tmp_path / "cpu", "--train.augment", "true", "--federation.fraction", "0.75",
                   "--federation.rounds", "3")
    assert plain[0]["train_loss"] != rows_1[0]["train_loss"]  # another random stream than the CPU path


def test_second_run_reads_features_from_the_cache_dir(cli, tmp_path, monkeypatch):
    flags = ["--train.cache_dir", tmp_path / "cache", "--train.feature_cache", "true"]
    first, _ = fit(cli, tmp_path / "a", *flags)
    calls = []
    original = Backbone.encode_image

    def counting(self, images):
        calls.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(Backbone, "encode_image", counting)
    second, _ = fit(cli, tmp_path / "b", *flags)
    assert calls == []  # every train and test feature came from the cache folder
    assert [r["client_acc"] for r in first] == [r["client_acc"] for r in second]
    third, _ = fit(cli, tmp_path / "c", "--train.cache_dir", "null", "--train.feature_cache", "true")
    assert sum(calls) > 0 and [r["client_acc"] for r in third] == [r["client_acc"] for r in first]


def test_feature_cache_with_augmentation_warns_and_device_augment_needs_augment(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path, "--train.augment", "true",
                       "--train.feature_cache", "true", "--federation.rounds", "1")
    assert code == 0 and "only evaluation is cached" in err
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "b", "--train.device_augment", "true")
    assert code == 2 and "augment true" in err
