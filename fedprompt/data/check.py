"""A quick scan of every image file while the data is indexed, so a bad file stops a run before any encoding.

Each file is opened and its header parsed with PIL (no pixel decode), and JPEG and PNG files must end with their
end marker (``FF D9`` / the ``IEND`` chunk) within their last bytes: a file cut short by a broken download or copy
fails here in well under a millisecond instead of after minutes of image encoding. Every bad file is reported at
once.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

from fedprompt.data.base import Sample, bomb_reason

#: how many bytes at the end of a file are searched for the end marker (some writers pad after it)
TAIL_BYTES = 4096
#: scans of more images than this show a progress bar
PROGRESS_FROM = 2000
#: scans of more images than this run in one process per core (at most 16): the header parse is Python code, so
#: threads share one core (ImageNet's 1.33 M files: docs/data.md, "ImageNet and its variants")
PROCESSES_FROM = 20000


def _tail_problem(path: str, fmt: str | None) -> str | None:
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt or "")
    if marker is None:
        return None
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - TAIL_BYTES))
        tail = handle.read()
    if marker not in tail:
        return f"truncated {fmt} (no end marker)"
    return None


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (``None`` where it cannot be told)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def too_large(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` pixels cannot be decoded here (Pillow holds 4 bytes a pixel for RGB),
    or ``None``: only asked when ``data.max_image_pixels`` is null (no decompression-bomb limit)."""
    memory = memory_bytes()
    needed = 4 * width * height
    if memory is None or needed <= memory:
        return None
    return (f"its header claims {width} x {height} pixels, {needed / 2**30:.0f} GiB once decoded, more than this "
            f"machine's {memory / 2**30:.0f} GiB of memory (data.max_image_pixels is null: no decompression-bomb "
            "limit)")


def image_problem(path: str) -> str | None:
    """Why the image file at ``path`` cannot be used (``None`` if its header reads and it is not cut short)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as image:
            fmt = image.format
            width, height = image.size
        if width <= 0 or height <= 0:
            return f"image size {width}x{height}"
        if Image.MAX_IMAGE_PIXELS is None and too_large(width, height):
            return too_large(width, height)
        return _tail_problem(path, fmt)
    except FileNotFoundError:
        return "file not found"
    except PermissionError:
        return "permission denied: the process cannot read the file"
    except Image.DecompressionBombError:
        return bomb_reason()
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError for some broken headers
        if "truncated" in str(err).lower():
            return "truncated file (cut inside its header)"
        return f"{type(err).__name__}: {err}"


def scan_images(samples: list[Sample], threads: int = 8) -> list[tuple[str, str]]:
    """``(path, reason)`` of every sample whose image file is bad, in sample order (each path once).

    Headers are read in ``threads`` threads, or, for more than :data:`PROCESSES_FROM` files, in one process per
    core; more than :data:`PROGRESS_FROM` files show a progress bar on a terminal and, when done, one line with the
    time the check took.
    """
    from fedprompt.progress import tqdm

    paths = list(dict.fromkeys(s.path for s in samples))
    start = time.perf_counter()
    cores = min(os.cpu_count() or 1, 16)
    if len(paths) > PROCESSES_FROM and cores > 1:
        pool, chunk = ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")), 512
    else:
        pool, chunk = ThreadPoolExecutor(max_workers=threads), 64
    with pool:
        results = tqdm(pool.map(image_problem, paths, chunksize=chunk), total=len(paths), desc="checking images",
                       unit="img", disable=None if len(paths) > PROGRESS_FROM else True, leave=False)
        problems = list(results)
    if len(paths) > PROGRESS_FROM:
        seconds = time.perf_counter() - start
        print(f"fedprompt: checked the headers of {len(paths):,} image files in {seconds:.1f} s "
              f"({len(paths) / max(seconds, 1e-9):,.0f} files/s; --data.check_images false skips this check)",
              file=sys.stderr, flush=True)
    return [(path, why) for path, why in zip(paths, problems) if why is not None]


def bad_images_message(bad: list[tuple[str, str]], limit: int = 20) -> str:
    """One line listing the bad files (the first ``limit``; the count of the rest)."""
    shown = "; ".join(f"{path} ({why})" for path, why in bad[:limit])
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return (f"data: {len(bad)} image file(s) cannot be read: {shown}{more}. Remove or replace them, or pass "
            "--data.on_bad_image skip to leave them out (they are then listed in the run directory's "
            "bad_images.txt).")
