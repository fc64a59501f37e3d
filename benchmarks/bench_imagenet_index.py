"""How long indexing ImageNet takes: the folder listing, the header check and the federated split, on a fake tree.

Writes a fake ImageNet in CoOp's layout (``imagenet/images/{train,val}/<wnid>/*.JPEG`` and ``classnames.txt``) whose
files are one small valid JPEG each (a 16 x 16 image of a few hundred bytes: a real header and end marker), then
times, with ``--data.check_images`` on:

1. ``ImageNet.read()``: listing the class folders with ``os.scandir`` (no file opened);
2. the header check of every file (``fedprompt.data.check.scan_images``: PIL parses each header, the end marker is
   looked for in the last 4 KiB), one process per core;
3. the federated split of what was read (``fedprompt.data.reader.federate``, as ``setup()`` runs it): the
   pathological split over 10 clients and 16 shots per class;

and scales each to ImageNet's 1,281,167 train + 50,000 val files (the three steps are linear in the number of files).
The files are fresh in the page cache here; on a cold disk the header check is bounded by the disk's random reads.

    python benchmarks/bench_imagenet_index.py                        # 100 classes x 1000 train + 50 val files
    python benchmarks/bench_imagenet_index.py --classes 1000 --train 1281   # the full 1.33 M files (~0.6 GB)
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from PIL import Image  # noqa: E402

from fedprompt.data import ImageNet, Pathological  # noqa: E402
from fedprompt.data.check import scan_images  # noqa: E402
from fedprompt.data.reader import federate  # noqa: E402

IMAGENET_FILES = 1_281_167 + 50_000


def tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(buffer, format="JPEG", quality=50)
    return buffer.getvalue()


def write_tree(root: Path, classes: int, train: int, val: int) -> int:
    data = tiny_jpeg()
    wnids = [f"n{i:08d}" for i in range(classes)]
    for split, count in (("train", train), ("val", val)):
        for wnid in wnids:
            folder = root / "images" / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{wnid}_{i}.JPEG").write_bytes(data)
    (root / "classnames.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    return classes * (train + val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--train", type=int, default=1000, help="train files per class")
    parser.add_argument("--val", type=int, default=50, help="val files per class")
    parser.add_argument("--dir", default=None, help="where to write the fake tree (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "imagenet"
        start = time.perf_counter()
        files = write_tree(root, args.classes, args.train, args.val)
        print(f"wrote {files:,} files ({len(tiny_jpeg())} bytes each) in {time.perf_counter() - start:.1f} s")
        reader = ImageNet(root=str(root), num_classes=args.classes)
        start = time.perf_counter()
        raw = reader.read()
        listing = time.perf_counter() - start
        start = time.perf_counter()
        bad = scan_images(raw.train + raw.test)
        check = time.perf_counter() - start
        assert not bad, bad[:3]
        start = time.perf_counter()
        splits = federate(raw, Pathological(10), 16, seed=0)
        split = time.perf_counter() - start
        scale = IMAGENET_FILES / files
        print(f"{'step':<34}{'seconds':>9}{'files/s':>11}{'ImageNet (1.33 M files), s':>28}")
        processes = min(os.cpu_count() or 1, 16)
        steps = (("list folders (ImageNet.read)", listing), (f"check headers ({processes} processes)", check),
                 ("split + 16 shots (federate)", split))
        for name, seconds in steps:
            print(f"{name:<34}{seconds:>9.2f}{files / max(seconds, 1e-9):>11,.0f}{seconds * scale:>28.1f}")
        kept = sum(len(c.train) for c in splits.clients)
        print(f"{len(splits.clients)} clients, {kept:,} train images kept (16 shots x {args.classes} classes)")


if __name__ == "__main__":
    main()
