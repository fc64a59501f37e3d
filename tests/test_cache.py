"""FeatureCache: persistent on disk (keyed by weights, transform and samples), stacked tables, images from the store."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import PACS, require

from fedprompt.backbone import load_backbone
from fedprompt.data import Sample, Synthetic, clip_transforms, load_rgb
from fedprompt.data.cache import FeatureCache, weights_fingerprint
from fedprompt.data.store import ImageStore, StoreKind


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    files = sorted(p for p in require(PACS).rglob("*") if p.suffix.lower() in {".jpg", ".png"})
    return [Sample(str(p), i % 7) for i, p in enumerate(files[::139])]  # 20 images, 4 domains


@pytest.fixture(scope="module")
def fabric():
    return L.Fabric(accelerator="cpu", devices=1, precision="32-true")


@pytest.fixture(scope="module")
def test_tf(tiny_backbone):
    return clip_transforms(tiny_backbone.preprocess_cfg, augment=False)[1]


class CountingLoader:
    cache_key = "tests.cache-loader"

    def __init__(self):
        self.calls = 0

    def __call__(self, sample):
        self.calls += 1
        return load_rgb(sample)


def cache(backbone, fabric, directory=None, inputs=("features", "tokens"), **kwargs) -> FeatureCache:
    return FeatureCache(backbone, fabric, inputs, batch_size=8, loader=kwargs.pop("loader", load_rgb),
                        directory=directory, **kwargs)


def direct(backbone, transform, samples):
    images = torch.stack([transform(load_rgb(s)) for s in samples])
    with torch.no_grad():
        return backbone.encode_image_tokens(images)


def test_current_api_gives_the_image_tower_outputs(tiny_backbone, fabric, test_tf, samples):
    c = FeatureCache(tiny_backbone, fabric, ("features", "tokens"), 8, load_rgb, 0)
    data = c.dataset(samples, test_tf, "test")
    pooled, tokens = direct(tiny_backbone, test_tf, samples)
    torch.testing.assert_close(data.tensors["features"], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(data.tensors["tokens"], tokens, atol=1e-5, rtol=1e-5)
    assert data.labels == [s.label for s in samples] and len(data) == len(samples)
    item = data[3]
    assert item["label"] == samples[3].label and item["index"] == 3 and item["tokens"].shape == tokens.shape[1:]
    again = c.dataset(samples[::-1], test_tf, "test")
    assert c.encoded == len(samples)  # served again without encoding
    assert torch.equal(again.tensors["tokens"], data.tensors["tokens"].flip(0))


def test_a_fresh_cache_with_the_same_key_loads_from_disk(tiny_backbone, fabric, test_tf, samples, tmp_path):
    first = cache(tiny_backbone, fabric, tmp_path)
    data = first.dataset(samples, test_tf, "test")
    assert first.encoded == len(samples)
    shards = list((tmp_path / "features").glob("*/*.pt"))
    assert len(shards) == 1 and not list(tmp_path.rglob("*.tmp"))
    second = cache(tiny_backbone, fabric, tmp_path)
    subset = samples[5:15]
    served = second.dataset(subset, test_tf, "test")
    assert second.encoded == 0
    assert torch.equal(served.tensors["tokens"], data.tensors["tokens"][5:15])
    assert torch.equal(served.tensors["features"], data.tensors["features"][5:15])
    # the same transform under the train kind (augment: false) reads the same shards
    assert torch.equal(second.dataset(subset, test_tf, "train").tensors["features"], served.tensors["features"])
    assert second.encoded == 0


def test_other_weights_transform_outputs_or_precision_encode_again(tiny_backbone, fabric, test_tf, samples, tmp_path):
    cache(tiny_backbone, fabric, tmp_path).dataset(samples[:4], test_tf, "test")
    torch.manual_seed(1)
    other = load_backbone("fedprompt-tiny", None)
    assert weights_fingerprint(other) != weights_fingerprint(tiny_backbone)
    torch.manual_seed(0)  # the fixture's seed: the same weights in a new object (as in a new process)
    assert weights_fingerprint(load_backbone("fedprompt-tiny", None)) == weights_fingerprint(tiny_backbone)
    runs = {
        "weights": cache(other, fabric, tmp_path),
        "outputs": cache(tiny_backbone, fabric, tmp_path, inputs=("features",)),
        "precision": cache(tiny_backbone, L.Fabric(accelerator="cpu", devices=1, precision="bf16-mixed"), tmp_path),
    }
    for c in runs.values():
        c.dataset(samples[:4], test_tf, "test")
    other_tf = clip_transforms({**tiny_backbone.preprocess_cfg, "interpolation": "bilinear"}, augment=False)[1]
    runs["transform"] = cache(tiny_backbone, fabric, tmp_path)
    runs["transform"].dataset(samples[:4], other_tf, "test")
    assert {name: c.encoded for name, c in runs.items()} == dict.fromkeys(runs, 4)
    assert len(list((tmp_path / "features").iterdir())) == 5


def test_synthetic_features_are_keyed_by_the_data_seed(tiny_backbone, fabric, test_tf, tmp_path):
    encoded = []
    for seed in (0, 1, 0):
        splits = Synthetic(seed=seed, num_classes=2, train_per_class=2, test_per_class=2).read()
        c = cache(tiny_backbone, fabric, tmp_path, loader=splits.loader)
        c.dataset(splits.test, test_tf, "test")
        encoded.append(c.encoded)
    assert encoded == [4, 4, 0]


def test_gather_across_chunks_and_prepare(tiny_backbone, fabric, test_tf, samples):
    whole = cache(tiny_backbone, fabric).dataset(samples, test_tf, "test").tensors
    c = cache(tiny_backbone, fabric)
    c.prepare(samples[:7], test_tf, "test")
    c.prepare(samples[5:], test_tf, "test")  # only the missing ones are encoded
    assert c.encoded == len(samples)
    mixed = [samples[i] for i in (12, 0, 19, 6, 3)]
    out = c.dataset(mixed, test_tf, "test").tensors
    rows = torch.tensor([12, 0, 19, 6, 3])
    for k in ("features", "tokens"):
        torch.testing.assert_close(out[k], whole[k][rows], atol=1e-6, rtol=1e-6)


def test_images_from_the_store_give_the_same_features_without_decoding(tiny_backbone, fabric, test_tf, samples):
    store = ImageStore.build(samples, load_rgb, StoreKind.test(test_tf))
    loader = CountingLoader()
    from_store = cache(tiny_backbone, fabric, images=store, loader=loader)
    data = from_store.dataset(samples, test_tf, "test")
    assert loader.calls == 0 and from_store.encoded == len(samples)
    decoded = cache(tiny_backbone, fabric).dataset(samples, test_tf, "test")
    for k in ("features", "tokens"):
        assert torch.equal(data.tensors[k], decoded.tensors[k])
    # a transform the store was not built with is decoded as before
    other_tf = clip_transforms({**tiny_backbone.preprocess_cfg, "interpolation": "bilinear"}, augment=False)[1]
    from_store.dataset(samples[:3], other_tf, "test")
    assert loader.calls == 3


def test_the_cache_key_follows_the_libraries_and_cpu_kernels(monkeypatch):
    """Features computed by another torch or on other CPU kernels differ in their last bits (oneDNN's AVX2 and
    AVX-512 kernels: about 1e-5 in the stand-in's features), so they must not be read back as this run's."""
    from importlib.metadata import version

    from fedprompt.data.cache import kernels

    here = kernels("cpu")
    assert here["torch"] == version("torch") and here["cpu"] == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert kernels("cpu") == {**here, "DNNL_MAX_CPU_ISA": "AVX2"}
    assert "cpu" not in kernels("cuda")
