"""Decode-once image store and device augmentation: build time, memory, augmentation speed, resampler quality.

Prints, for pacs-mini (2,780 images; ``--data``):

1. ``ImageStore.build`` time and memory for the ``test`` kind (224 px) and the ``train`` kind (store_size 256), and
   the time to load each back from its cache folder;
2. ``DeviceAugment`` time per batch of 32 and 192 at 224 px (crops drawn, resampled, flipped, normalised) against
   the torchvision CPU pipeline per image (PIL decode + RandomResizedCrop + flip + ToTensor + Normalize, the train
   transform of ``fedprompt.data.clip_transforms``);
3. resampling options for the same crop boxes on real images: mean and max absolute difference in [0, 255] units
   against torchvision's CPU ``RandomResizedCrop`` (Pillow) given the same box, and time per 32 crops:
   ``roi_align`` (aligned=True, adaptive sampling), ``grid_sample`` bicubic, ``F.interpolate`` bicubic with
   antialias per crop, and the separable Pillow-coefficient matrices of ``fedprompt.data.augment`` (the default).

    python benchmarks/bench_store.py                       # CPU, 1 thread
    python benchmarks/bench_store.py --device cuda          # where a GPU is available
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402

from fedprompt.data import Sample, clip_transforms, load_rgb  # noqa: E402
from fedprompt.data.augment import DeviceAugment, normalize, resized_crop  # noqa: E402
from fedprompt.data.store import ImageStore, StoreKind  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIP = {"size": 224, "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up: this process's CPU time on the CPU (robust
    on a shared machine, where wall time depends on the other users; with --threads 1 it is the work done), wall
    time on a GPU."""
    fn()
    sync(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def samples_of(root: Path) -> list[Sample]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        sys.exit(f"no images under {root}: pass --data")
    return [Sample(str(p), 0) for p in files]


# ------------------------------------------------------------------------------------------------ store
def bench_store(samples, workers: int) -> dict[str, ImageStore]:
    _, test_tf = clip_transforms(CLIP)
    stores = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, kind in (("test", StoreKind.test(test_tf)), ("train", StoreKind.train(256))):
            start, cpu = time.perf_counter(), time.process_time()
            store = ImageStore.build(samples, load_rgb, kind, directory=folder, num_workers=workers, progress=False)
            built, built_cpu = time.perf_counter() - start, time.process_time() - cpu
            start = time.perf_counter()
            ImageStore.build(samples, load_rgb, kind, directory=folder, progress=False)
            loaded = time.perf_counter() - start
            print(f"store {name:5s}: {len(store)} images, buffer {tuple(store.images.shape)}, "
                  f"{store.nbytes / 2**20:.0f} MiB ({store.nbytes / len(store) / 1024:.0f} KiB/image); "
                  f"decode+build {built:.2f} s wall, {built_cpu:.2f} s CPU of this process ({workers} workers, "
                  f"{built_cpu / len(store) * 1e3:.2f} ms CPU/image); load from cache {loaded:.2f} s wall")
            stores[name] = store
    return stores


# ---------------------------------------------------------------------------------------- augmentation
def bench_augment(store: ImageStore, samples, device, repeats: int) -> None:
    augment = DeviceAugment(224, CLIP["mean"], CLIP["std"])
    gen = torch.Generator().manual_seed(0)
    for batch in (32, 192):
        rows = torch.randperm(len(store), generator=gen)[:batch]
        images, sizes = store.get(rows)
        images = images.to(device)

        def run():
            return augment(images, sizes, torch.Generator().manual_seed(1))

        seconds = timed(run, device, repeats)
        print(f"device augment ({device.type}) batch {batch:3d}: {seconds * 1e3:7.1f} ms per batch, "
              f"{seconds / batch * 1e3:.2f} ms/image")
    train_tf, _ = clip_transforms(CLIP)
    picked = samples[:: max(1, len(samples) // 64)][:64]

    def cpu():
        return torch.stack([train_tf(load_rgb(s)) for s in picked])

    seconds = timed(cpu, torch.device("cpu"), max(1, repeats // 2))
    print(f"torchvision CPU pipeline (decode + RRC + flip + ToTensor + Normalize): {seconds / len(picked) * 1e3:.2f} "
          f"ms/image = {seconds / len(picked) * 32 * 1e3:.0f} ms per 32")


# ------------------------------------------------------------------------------------------- resamplers
def reference_crops(store, rows, params, size):
    out = []
    for i, r in enumerate(rows.tolist()):
        h, w = store.sizes[r].tolist()
        pil = Image.fromarray(store.images[r, :, :h, :w].permute(1, 2, 0).numpy())
        crop = TF.resized_crop(pil, int(params.top[i]), int(params.left[i]), int(params.height[i]),
                               int(params.width[i]), [size, size], T.InterpolationMode.BICUBIC)
        if params.flip[i]:
            crop = TF.hflip(crop)
        out.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1).float())
    return torch.stack(out)


def by_roi_align(images, params, size):
    boxes = torch.stack([torch.arange(len(images), dtype=torch.float32, device=images.device),
                         params.left.float(), params.top.float(), (params.left + params.width).float(),
                         (params.top + params.height).float()], 1).to(images.device)
    out = roi_align(images.float(), boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(params.flip.to(images.device)[:, None, None, None], out.flip(-1), out)


def by_grid_sample(images, params, size):
    n, _, in_h, in_w = images.shape
    dev = images.device
    steps = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size
    gx = (params.left.to(dev)[:, None] + steps * params.width.to(dev)[:, None]) * 2 / in_w - 1
    gy = (params.top.to(dev)[:, None] + steps * params.height.to(dev)[:, None]) * 2 / in_h - 1
    gx = torch.where(params.flip.to(dev)[:, None], gx.flip(1), gx)
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], -1)
    return F.grid_sample(images.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)


def by_interpolate(images, params, size):
    out = []
    for i in range(len(images)):
        t, l, h, w = (int(params.top[i]), int(params.left[i]), int(params.height[i]), int(params.width[i]))
        crop = F.interpolate(images[i: i + 1, :, t: t + h, l: l + w].float(), size=(size, size), mode="bicubic",
                             antialias=True, align_corners=False)
        out.append(crop.flip(-1) if params.flip[i] else crop)
    return torch.cat(out)


def by_matrices(images, params, size):
    return resized_crop(images, params, size)


def bench_resamplers(store: ImageStore, device, repeats: int, sizes=(224, 96)) -> None:
    augment = DeviceAugment(224, CLIP["mean"], CLIP["std"])
    rows = torch.randperm(len(store), generator=torch.Generator().manual_seed(2))[:96]
    images, image_sizes = store.get(rows)
    params = augment.sample(image_sizes, torch.Generator().manual_seed(3))
    options = {"roi_align (bilinear, bin average)": by_roi_align, "grid_sample bicubic": by_grid_sample,
               "interpolate bicubic antialias, per crop": by_interpolate,
               "Pillow matrices (fedprompt default)": by_matrices}
    for size in sizes:
        reference = reference_crops(store, rows, params, size)
        print(f"resampling to {size} px: |difference| vs torchvision CPU RandomResizedCrop on the same boxes "
              f"({len(rows)} PACS crops), [0, 255] units; time per 32 crops on {device.type}")
        for name, fn in options.items():
            out = fn(images.to(device), params, size).clamp(0, 255).cpu()
            diff = (out - reference).abs()
            part = type(params)(*(getattr(params, f)[:32] for f in ("top", "left", "height", "width", "flip")))
            batch = images[:32].to(device)
            seconds = timed(lambda: fn(batch, part, size), device, repeats)
            off = (diff > 0.5).float().mean()
            print(f"  {name:42s} mean {diff.mean():8.5f}  max {diff.max():4.0f}  values off by > 0.5: {off * 1e6:8.0f} "
                  f"ppm  {seconds * 1e3:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("FEDPROMPT_SHARED", ROOT.parent / "shared"))
                        / "data" / "pacs-mini")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    samples = samples_of(args.data)
    print(f"{len(samples)} images from {args.data}; torch threads {args.threads}; device {device}")
    stores = bench_store(samples, args.workers)
    bench_augment(stores["train"], samples, device, args.repeats)
    bench_resamplers(stores["train"], device, args.repeats)
    check = normalize(stores["test"].get(torch.arange(8))[0], CLIP["mean"], CLIP["std"])
    _, test_tf = clip_transforms(CLIP)
    exact = torch.equal(check, torch.stack([test_tf(load_rgb(s)) for s in samples[:8]]))
    print(f"test kind normalised == CPU test transform on 8 images: {exact}")


if __name__ == "__main__":
    main()
