"""Decode-once image store (fedprompt.data.store) and device augmentation (fedprompt.data.augment)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from fedprompt.data import Sample, Synthetic, clip_transforms, load_rgb
from fedprompt.data.augment import (PIL_VERTICAL_FIRST, CropParams, DeviceAugment, normalize, resized_crop,
                                    sample_crop_params, vertical_pass_first)
from fedprompt.data.store import ImageStore, StoreKind, loader_key
from fedprompt.errors import FedPromptError
from conftest import CIFAR10, PACS, require

CLIP_224 = {"size": 224, "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}


def image_files(root: Path, every: int) -> list[Sample]:
    files = sorted(p for p in require(root).rglob("*") if p.suffix.lower() in {".jpg", ".png"})
    return [Sample(str(p), i % 7) for i, p in enumerate(files[::every])]


@pytest.fixture(scope="module")
def pacs() -> list[Sample]:
    return image_files(PACS, 97)  # 29 images over the 4 domains (JPEG and PNG)


@pytest.fixture(scope="module")
def cifar() -> list[Sample]:
    return image_files(CIFAR10, 301)


class Counting:
    """A loader that counts its calls (files via load_rgb, optionally cut to a rectangle)."""

    cache_key = "tests.counting-loader"

    def __init__(self, crop: bool = False):
        self.calls = 0
        self.crop = crop

    def __call__(self, sample: Sample) -> Image.Image:
        self.calls += 1
        image = load_rgb(sample)
        if self.crop and sample.label % 2:  # some portrait, some landscape rectangles
            w, h = image.size
            image = image.crop((0, 0, w, h // 2)) if sample.label % 4 == 1 else image.crop((0, 0, w // 3, h))
        return image


def tensor_of(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


# -------------------------------------------------------------------------------------------------- test kind
@pytest.mark.parametrize("data, preprocess", [("pacs", CLIP_224), ("cifar", CLIP_224), ("pacs", None)])
def test_test_kind_normalised_equals_the_cpu_test_transform(data, preprocess, request, tiny_backbone):
    samples = request.getfixturevalue(data)
    _, test_tf = clip_transforms(preprocess or tiny_backbone.preprocess_cfg, augment=True)
    kind = StoreKind.test(test_tf)
    store = ImageStore.build(samples, load_rgb, kind)
    size = test_tf.transforms[1].size[0]
    assert store.images.shape == (len(samples), 3, size, size) and store.images.dtype == torch.uint8
    assert torch.equal(store.sizes, torch.tensor([[size, size]] * len(samples)))
    images, _ = store.get(store.rows(samples[::-1]))
    reference = torch.stack([test_tf(load_rgb(s)) for s in samples[::-1]])
    assert torch.equal(normalize(images, kind.mean, kind.std), reference)


def test_test_kind_needs_a_clip_test_transform():
    with pytest.raises(FedPromptError, match="ToTensor, Normalize"):
        StoreKind.test(T.Compose([T.Resize(32), T.ToTensor()]))
    with pytest.raises(FedPromptError, match="ToTensor, Normalize"):
        StoreKind.test(lambda image: image)


# ------------------------------------------------------------------------------------------------- train kind
def test_train_kind_shrinks_to_the_store_size_and_pads(pacs):
    loader = Counting(crop=True)
    store = ImageStore.build(pacs, loader, StoreKind.train(store_size=64, max_side=80))
    assert loader.calls == len(pacs)
    for i, sample in enumerate(pacs):
        original = Counting(crop=True)(sample)
        w, h = original.size
        scale = min(1.0, 64 / min(w, h), 80 / max(w, h))
        expected = original.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        sh, sw = store.sizes[i].tolist()
        assert (sw, sh) == expected.size and min(sh, sw) <= 64 and max(sh, sw) <= 80
        assert torch.equal(store.images[i, :, :sh, :sw], tensor_of(expected))
        assert store.images[i, :, sh:, :].abs().sum() == 0 and store.images[i, :, :, sw:].abs().sum() == 0
    assert store.images.shape[2:] == tuple(store.sizes.max(0).values.tolist())
    assert {tuple(s) for s in store.sizes.tolist()} >= {(64, 64)}  # the square ones


def test_train_kind_never_enlarges(pacs, cifar):
    for samples, side in ((pacs, 227), (cifar, 32)):
        store = ImageStore.build(samples, load_rgb, StoreKind.train(store_size=256))
        assert store.images.shape[1:] == (3, side, side)
        assert torch.equal(store.images[0], tensor_of(load_rgb(samples[0])))  # stored as decoded


def test_train_kind_rejects_bad_sizes():
    with pytest.raises(FedPromptError, match="store_size"):
        StoreKind.train(store_size=256, max_side=100)


def test_rows_get_and_unknown_sample(pacs):
    store = ImageStore.build(pacs[:5] + pacs[:2], load_rgb, StoreKind.train(256))  # duplicates stored once
    assert len(store) == 5
    images, sizes = store.get(store.rows([pacs[3], pacs[1]]))
    assert torch.equal(images[0], store.images[3]) and torch.equal(sizes[1], store.sizes[1])
    with pytest.raises(FedPromptError, match="has no image"):
        store.rows([pacs[6]])


def test_decoding_with_workers_gives_the_same_store(pacs):
    plain = ImageStore.build(pacs[:8], load_rgb, StoreKind.train(64))
    workers = ImageStore.build(pacs[:8], load_rgb, StoreKind.train(64), num_workers=2, batch_size=3)
    assert torch.equal(plain.images, workers.images) and torch.equal(plain.sizes, workers.sizes)


# ------------------------------------------------------------------------------------------------ persistence
@pytest.mark.parametrize("mmap", [False, True])
def test_second_build_loads_instead_of_decoding(pacs, tmp_path, mmap):
    loader = Counting(crop=True)
    first = ImageStore.build(pacs, loader, StoreKind.train(96), directory=tmp_path, mmap=mmap)
    assert loader.calls == len(pacs)
    again = ImageStore.build(pacs, loader, StoreKind.train(96), directory=tmp_path, mmap=mmap)
    assert loader.calls == len(pacs)  # no decoding
    assert again.mmapped is mmap and again.key == first.key
    assert torch.equal(again.images, first.images) and torch.equal(again.sizes, first.sizes)
    assert again.paths == first.paths
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".pt", ".u8"]  # no temporary file left
    ImageStore.build(pacs, loader, StoreKind.train(97), directory=tmp_path)  # other parameters: decoded again
    assert loader.calls == 2 * len(pacs)
    ImageStore.build(pacs[:-1], loader, StoreKind.train(96), directory=tmp_path)  # other samples: decoded again
    assert loader.calls == 3 * len(pacs) - 1


def test_a_changed_file_is_decoded_again(pacs, tmp_path):
    files = tmp_path / "images"
    files.mkdir()
    samples = []
    for i, s in enumerate(pacs[:3]):
        target = files / f"{i}{Path(s.path).suffix}"
        target.write_bytes(Path(s.path).read_bytes())
        samples.append(Sample(str(target), s.label))
    loader = Counting()
    ImageStore.build(samples, loader, StoreKind.train(64), directory=tmp_path / "cache")
    stat = os.stat(samples[0].path)
    os.utime(samples[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    ImageStore.build(samples, loader, StoreKind.train(64), directory=tmp_path / "cache")
    assert loader.calls == 6


def test_a_damaged_cache_file_is_rebuilt(pacs, tmp_path):
    loader = Counting()
    first = ImageStore.build(pacs[:4], loader, StoreKind.train(64), directory=tmp_path)
    pixels = next(tmp_path.glob("*.u8"))
    pixels.write_bytes(pixels.read_bytes()[:-10])
    again = ImageStore.build(pacs[:4], loader, StoreKind.train(64), directory=tmp_path)
    assert loader.calls == 8 and torch.equal(again.images, first.images)


def test_synthetic_loader_identity_follows_seed_and_image_size():
    def key(**kwargs):
        return loader_key(Synthetic(**kwargs).read().loader)

    assert key(seed=0, image_size=32) == key(seed=0, image_size=32)
    assert len({key(seed=0, image_size=32), key(seed=1, image_size=32), key(seed=0, image_size=48)}) == 3
    assert loader_key(load_rgb) == loader_key(load_rgb) and "load_rgb" in loader_key(load_rgb)


def test_synthetic_store_is_keyed_by_its_generator(tmp_path):
    stores = {}
    for seed in (0, 1):
        splits = Synthetic(seed=seed, num_classes=2, train_per_class=2, test_per_class=1).read()
        stores[seed] = ImageStore.build(splits.train, splits.loader, StoreKind.train(64), directory=tmp_path)
    assert stores[0].key != stores[1].key and not torch.equal(stores[0].images, stores[1].images)
    assert len(list(tmp_path.glob("*.u8"))) == 2


def test_a_loader_without_identity_is_not_persisted(pacs, tmp_path):
    thing = object()
    loader = lambda sample: (thing, load_rgb(sample))[1]  # noqa: E731  closes over an object
    assert loader_key(loader) is None
    with pytest.warns(UserWarning, match="no stable identity"):
        store = ImageStore.build(pacs[:2], loader, StoreKind.train(64), directory=tmp_path)
    assert len(store) == 2 and not any(tmp_path.iterdir())
    with pytest.raises(FedPromptError, match="mmap=True needs"):
        ImageStore.build(pacs[:2], load_rgb, StoreKind.train(64), mmap=True)


# ----------------------------------------------------------------------------------------- crop parameters
def draws(sizes: torch.Tensor, seed: int) -> CropParams:
    return sample_crop_params(sizes, torch.Generator().manual_seed(seed))


def test_crop_params_respect_torchvision_bounds():
    sizes = torch.tensor([[227, 227], [32, 32], [120, 300], [300, 90], [7, 5]]).repeat(800, 1)
    p = draws(sizes, 0)
    height, width = sizes[:, 0], sizes[:, 1]
    assert ((p.top >= 0) & (p.left >= 0) & (p.top + p.height <= height) & (p.left + p.width <= width)).all()
    assert ((p.height > 0) & (p.width > 0)).all()
    h, w, area = p.height.double(), p.width.double(), (height * width).double()
    fallback = (h == height) & (w == width)  # the central crop of a 4:3-or-squarer image
    inside = ((w - 0.5) * (h - 0.5) <= area) & ((w + 0.5) * (h + 0.5) >= 0.08 * area) \
        & ((w - 0.5) / (h + 0.5) <= 4 / 3) & ((w + 0.5) / (h - 0.5) >= 3 / 4)
    assert (inside | fallback).all()
    assert 0.4 < p.flip.double().mean() < 0.6


@pytest.mark.parametrize("height, width", [(1, 1000), (1000, 1), (2, 200), (201, 2)])
def test_crop_params_fallback_is_torchvision_central_crop(height, width):
    """So thin that no draw fits (8 % of the area needs a side > 2 px at ratio <= 4/3): the central-crop fallback,
    deterministic in torchvision too."""
    expected = T.RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
    p = draws(torch.tensor([[height, width]] * 3), 0)
    for i in range(3):
        assert (p.top[i].item(), p.left[i].item(), p.height[i].item(), p.width[i].item()) == expected


def test_crop_params_distribution_matches_torchvision():
    torch.manual_seed(0)
    n, size = 4000, (227, 180)
    reference = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, *size), [0.08, 1.0], [3 / 4, 4 / 3])
                              for _ in range(n)], dtype=torch.float64)
    p = draws(torch.tensor([size] * n), 1)
    ours = torch.stack([p.top, p.left, p.height, p.width], 1).double()

    def stats(t):
        return torch.stack([(t[:, 2] * t[:, 3]).mean() / math.prod(size), (t[:, 3] / t[:, 2]).log().mean(),
                            t[:, 0].mean() / size[0], t[:, 1].mean() / size[1]])

    torch.testing.assert_close(stats(ours), stats(reference), atol=0.02, rtol=0)


def test_same_generator_seed_same_crops_and_output(pacs):
    store = ImageStore.build(pacs[:6], load_rgb, StoreKind.train(256))
    augment = DeviceAugment(64, CLIP_224["mean"], CLIP_224["std"])
    images, sizes = store.get(torch.arange(6))
    a = augment(images, sizes, torch.Generator().manual_seed(5))
    b = augment(images, sizes, torch.Generator().manual_seed(5))
    c = augment(images, sizes, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.float32 and a.device == images.device


def test_client_batches_do_not_depend_on_their_neighbours(pacs):
    """Lock-step: per-client parameters, one call on the concatenated batch = each client alone."""
    store = ImageStore.build(pacs[:8], load_rgb, StoreKind.train(256))
    augment = DeviceAugment(48, CLIP_224["mean"], CLIP_224["std"])
    images, sizes = store.get(torch.arange(8))
    parts = [augment.sample(sizes[:3], torch.Generator().manual_seed(1)),
             augment.sample(sizes[3:], torch.Generator().manual_seed(2))]
    together = augment.apply(images, CropParams.cat(parts))
    assert torch.equal(together[:3], augment(images[:3], sizes[:3], torch.Generator().manual_seed(1)))
    assert torch.equal(together[3:], augment(images[3:], sizes[3:], torch.Generator().manual_seed(2)))


# ---------------------------------------------------------------------------------------------- resampling
def box_params(boxes, flips) -> CropParams:
    columns = list(zip(*boxes))
    return CropParams(*(torch.tensor(c) for c in columns), torch.tensor(flips))


@pytest.mark.parametrize("size", [224, 96])
def test_resized_crop_equals_torchvision_on_the_same_box(pacs, size):
    """Pillow's antialiased bicubic, rounding and pass order: at most 1/255 off, on a handful of pixels."""
    store = ImageStore.build(pacs, load_rgb, StoreKind.train(256))
    rng = np.random.default_rng(size)
    boxes, flips, references = [], [], []
    for i in range(len(pacs)):
        h_img, w_img = store.sizes[i].tolist()
        pil = Image.fromarray(store.images[i, :, :h_img, :w_img].permute(1, 2, 0).numpy())
        for _ in range(3):
            h, w = int(rng.integers(1, h_img + 1)), int(rng.integers(1, w_img + 1))
            top, left = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
            flip = bool(rng.random() < 0.5)
            crop = TF.resized_crop(pil, top, left, h, w, [size, size], T.InterpolationMode.BICUBIC)
            references.append(tensor_of(TF.hflip(crop) if flip else crop).float())
            boxes.append((top, left, h, w))
            flips.append(flip)
    rows = torch.arange(len(pacs)).repeat_interleave(3)
    params = box_params(boxes, flips)
    if size == 96 and PIL_VERTICAL_FIRST:  # both of Pillow's pass orders in one batch
        assert 0 < vertical_pass_first(params.height, params.width, size).sum() < len(boxes)
    out = resized_crop(store.images[rows], params, size)
    diff = (out - torch.stack(references)).abs()
    assert diff.max() <= 1
    assert (diff > 0).double().mean() < 1e-3


def test_full_image_box_reproduces_the_plain_resize(pacs):
    store = ImageStore.build(pacs[:6], load_rgb, StoreKind.train(256))
    n = len(store)
    params = CropParams(torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64), store.sizes[:, 0],
                        store.sizes[:, 1], torch.zeros(n, dtype=torch.bool))
    out = resized_crop(store.images, params, 64)
    resized = torch.stack([tensor_of(load_rgb(s).resize((64, 64), Image.Resampling.BICUBIC)) for s in pacs[:6]])
    diff = (out - resized.float()).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3
    flipped = resized_crop(store.images, CropParams(params.top, params.left, params.height, params.width,
                                                    torch.ones(n, dtype=torch.bool)), 64)
    assert torch.equal(flipped, out.flip(-1))


def test_device_augment_is_crop_then_cpu_normalisation(pacs, tiny_backbone):
    store = ImageStore.build(pacs[:4], load_rgb, StoreKind.train(256))
    augment = DeviceAugment.from_preprocess(tiny_backbone.preprocess_cfg)
    assert augment.size == 32 and augment.mean == tuple(tiny_backbone.preprocess_cfg["mean"])
    images, sizes = store.get(torch.arange(4))
    params = augment.sample(sizes, torch.Generator().manual_seed(0))
    out = augment.apply(images, params)
    crops = resized_crop(images, params, 32).to(torch.uint8)
    cpu = T.Compose([T.ToTensor(), T.Normalize(augment.mean, augment.std)])
    expected = torch.stack([cpu(Image.fromarray(c.permute(1, 2, 0).numpy())) for c in crops])
    assert torch.equal(out, expected)


def test_torchvision_cifar_loader_is_keyed_by_its_files(tmp_path, monkeypatch):
    import torchvision

    from fedprompt.data import CIFAR

    class FakeCIFAR10:
        """Stands in for torchvision's reader (no download, no archive): two images per split."""

        base_folder = "cifar-10-batches-py"
        classes = ["airplane", "automobile"]

        def __init__(self, root, train, download):
            self.targets = [0, 1]

        def __getitem__(self, index):
            return Image.new("RGB", (32, 32), (index * 100, 0, 0)), self.targets[index]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "data_batch_1").write_bytes(b"x" * 10)
    first = loader_key(CIFAR(root=str(tmp_path)).read().loader)
    assert first == loader_key(CIFAR(root=str(tmp_path)).read().loader) and "data_batch_1" in first
    (batches / "data_batch_1").write_bytes(b"y" * 11)
    assert loader_key(CIFAR(root=str(tmp_path)).read().loader) != first
