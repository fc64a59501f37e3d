"""Train augmentation on the device, batched: the CoOp/Dassl recipe of :func:`fedprompt.data.clip_transforms`.

The CPU train transform is ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic)`` on a PIL image,
``RandomHorizontalFlip(0.5)``, ``ToTensor`` and the CLIP ``Normalize``. :class:`DeviceAugment` does the same to a
batch of uint8 images from an :class:`fedprompt.data.store.ImageStore` ("train" kind) in a few tensor operations:

1. :meth:`DeviceAugment.sample` draws the crop boxes and flips from a ``torch.Generator`` the caller passes, with
   the rule of torchvision's ``RandomResizedCrop.get_params`` (up to 10 tries of an area fraction in ``scale`` and a
   log-uniform aspect ratio in ``ratio``, then the central-crop fallback), vectorised over the batch. The values are
   a function of the generator's state and of each image's position in the call only, so a client's augmentation
   does not depend on which other clients share a batch when every client draws from its own generator.
2. :meth:`DeviceAugment.apply` resamples every crop to ``size x size`` in one batched call: two batched matrix
   products with per-image resampling matrices (rows: output pixels, columns: stored pixels, zero outside the
   crop). The matrices hold Pillow's antialiased bicubic coefficients (a = -0.5, kernel widened by the
   downscaling factor, window clipped to the crop and renormalised), quantised to Pillow's 22-bit fixed point, and
   each pass is rounded to uint8 as Pillow rounds it, in Pillow's pass order. So, given the same box, the output
   equals torchvision's CPU ``RandomResizedCrop`` on the PIL image up to float32 summation order (Pillow sums in
   integers): on PACS crops 7-9 values per million differ, by 1/255, none by more (``tests/test_store.py``,
   ``benchmarks/bench_store.py``). The flip reverses the rows of the horizontal matrix (free), and ``/255`` +
   normalisation are the same float32 operations as ``ToTensor`` + ``Normalize``. On CUDA the products run in
   plain fp32 even when the process allows TF32 (TF32 would round the coefficients).

Resampling alternatives measured on the same 96 PACS crop boxes (``benchmarks/bench_store.py``; mean absolute
difference to the CPU pipeline in [0, 255] units at 224 px / 96 px output): ``torchvision.ops.roi_align``
(aligned, adaptive sampling: bilinear with bin averaging) 1.16 / 1.19, ``F.grid_sample`` bicubic (a = -0.75, no
antialiasing) 0.63 / 2.52, ``F.interpolate`` bicubic with ``antialias=True`` (one call per crop) 0.21 / 0.21, these
matrices 0.00001 / 0.00001. On one CPU thread the matrices cost about 2.7x ``F.interpolate`` per crop (84 vs 32 ms
per 32 crops at 224 px) and about the PIL pipeline per image (2.6 vs 2.3 ms with decoding); they exist for the GPU,
where they are a few large kernels with no per-image launch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import PIL
import torch

PIL_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13  # Pillow 13 may run the vertical pass first
PIL_PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images: 32 - 8 - 2 bits
BICUBIC_A = -0.5  # Pillow's bicubic kernel (PyTorch's F.interpolate uses -0.75)


@dataclass
class CropParams:
    """Crop boxes (in stored-image pixels) and flips for a batch: each field is a tensor of shape [n]."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor

    @classmethod
    def cat(cls, parts: list[CropParams]) -> CropParams:
        """The parameters of several batches concatenated in order (e.g. one per client of a lock-step group)."""
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("top", "left", "height", "width", "flip")))

    def to(self, device) -> CropParams:
        """The parameters on ``device`` (host-to-GPU copies from pinned memory, without a sync)."""
        return CropParams(*(to_device(getattr(self, f), device) for f in ("top", "left", "height", "width", "flip")))


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to a GPU through pinned memory, asynchronously (no host sync)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def sample_crop_params(sizes: torch.Tensor, generator: torch.Generator | None = None,
                       scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       flip_p: float = 0.5, tries: int = 10) -> CropParams:
    """Random resized crop boxes and flips for images of the given valid sizes, drawn like torchvision.

    For each image (``sizes[i] = (height, width)``): up to ``tries`` draws of a target area
    ``U(scale) * height * width`` and an aspect ratio ``exp(U(log ratio))``; the first draw whose rounded
    width and height fit is taken, at a uniformly drawn integer position; if none fits, torchvision's fallback (the
    central crop, clipped to the ratio range). All random numbers come from one ``torch.rand`` call on the
    generator's device: image ``i`` uses numbers ``i * (2 * tries + 3)`` onwards, so the result depends only on the
    generator's state and ``sizes``. Returns :class:`CropParams` on the device of ``sizes``.
    """
    device = sizes.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    n = sizes.shape[0]
    u = torch.rand(n, 2 * tries + 3, generator=generator, device=gen_device, dtype=torch.float64).to(device)
    height, width = sizes[:, 0].to(torch.float64), sizes[:, 1].to(torch.float64)
    area = (height * width)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :tries])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, tries:2 * tries])
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, like Python's round
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    found = fits.any(1)
    h_try, w_try = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top_try = torch.floor(u[:, 2 * tries] * (height - h_try + 1)).clamp(max=height - h_try)
    left_try = torch.floor(u[:, 2 * tries + 1] * (width - w_try + 1)).clamp(max=width - w_try)
    h_fb, w_fb = _fallback_size(height, width, ratio)
    hh = torch.where(found, h_try, h_fb)
    ww = torch.where(found, w_try, w_fb)
    top = torch.where(found, top_try, torch.div(height - h_fb, 2, rounding_mode="floor"))
    left = torch.where(found, left_try, torch.div(width - w_fb, 2, rounding_mode="floor"))
    flip = u[:, 2 * tries + 2] < flip_p
    as_int = lambda t: t.to(torch.int64)  # noqa: E731
    return CropParams(as_int(top), as_int(left), as_int(hh), as_int(ww), flip)


def _fallback_size(height: torch.Tensor, width: torch.Tensor, ratio) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's central-crop fallback size: the whole image, clipped to the aspect-ratio range."""
    in_ratio = width / height
    lo, hi = min(ratio), max(ratio)
    narrow, wide = in_ratio < lo, in_ratio > hi
    h = torch.where(narrow, torch.round(width / lo), height)
    w = torch.where(wide, torch.round(height * hi), width)
    return h, w


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic kernel (a = -0.5)."""
    a = BICUBIC_A
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def max_taps(length: int, out_size: int) -> int:
    """Pillow's largest resampling window for an axis of ``length`` pixels resized to ``out_size``."""
    return int(math.ceil(2.0 * max(length / out_size, 1.0))) * 2 + 1


def resample_taps(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, taps: int,
                  flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's antialiased bicubic coefficients to resize ``[start, start + length)`` of an axis to ``out_size``.

    Output pixel ``o`` has its centre at ``(o + 0.5) * length / out_size`` in crop coordinates; the kernel is
    widened by ``max(length / out_size, 1)``; its window is clipped to the crop, the weights are renormalised and
    quantised to Pillow's 22-bit fixed point (``Image.resize`` of the cropped image). Returns ``(index, weights)``,
    each ``[n, out_size, taps]``: input pixel indices (absolute, clamped into the axis) and their weights (zero
    beyond the window). Output positions are reversed where ``flip`` is true. Computed in float64, returned in
    float32 (the quantised weights are exact in float32).
    """
    f64 = dict(dtype=torch.float64, device=start.device)
    length_f = length.to(**f64)[:, None, None]
    scale = length_f / out_size
    filter_scale = scale.clamp(min=1.0)
    support = 2.0 * filter_scale
    center = (torch.arange(out_size, **f64)[None, :, None] + 0.5) * scale  # [n, out, 1], crop coordinates
    lo = torch.trunc(center - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length_f)
    x = lo + torch.arange(taps, **f64)  # [n, out, taps], crop coordinates
    weights = _bicubic((x - center + 0.5) * (1.0 / filter_scale)) * (x < hi)
    weights = weights / weights.sum(-1, keepdim=True)
    one = 1 << PIL_PRECISION_BITS
    weights = torch.trunc(weights * one + 0.5 * torch.sign(weights)) / one
    index = (x + start.to(**f64)[:, None, None]).clamp(max=in_size - 1).to(torch.int64)
    if flip is not None:
        index = torch.where(flip[:, None, None], index.flip(1), index)
        weights = torch.where(flip[:, None, None], weights.flip(1), weights)
    return index, weights.to(torch.float32)


def resample_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                    flip: torch.Tensor | None = None, taps: int | None = None) -> torch.Tensor:
    """Per-image matrices [n, out_size, in_size] of :func:`resample_taps` (zero outside each output's window)."""
    taps = taps or max_taps(in_size, out_size)
    index, weights = resample_taps(start, length, in_size, out_size, taps, flip)
    dense = torch.zeros(index.shape[0], out_size, in_size, dtype=torch.float32, device=index.device)
    return dense.scatter_add_(2, index, weights)


def vertical_pass_first(height: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """Pillow's pass order for resizing a ``height x width`` crop to ``size x size``: the vertical pass runs first
    when the height shrinks by more than twice as many pixels as the width (Pillow >= 13; earlier versions always
    run the horizontal pass first)."""
    shrink_h, shrink_w = height - size, width - size
    return (shrink_h > 0) & (shrink_h > 2 * shrink_w) & PIL_VERTICAL_FIRST


def _round_like_pil(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).clamp_(0, 255)


@contextlib.contextmanager
def _full_fp32_matmul(device: torch.device):
    """Plain fp32 matrix products on CUDA, whatever the process set (TF32 would round the 22-bit coefficients)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _two_passes(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vertical_first: bool) -> torch.Tensor:
    with _full_fp32_matmul(images.device):
        return _two_passes_fp32(images, rows, cols, vertical_first)


def _two_passes_fp32(images, rows, cols, vertical_first: bool) -> torch.Tensor:
    x = images.to(torch.float32)
    if vertical_first:
        x = _round_like_pil(torch.matmul(rows[:, None], x))  # [n, 3, size, W]
        return _round_like_pil(torch.matmul(x, cols.transpose(1, 2)[:, None]))
    x = _round_like_pil(torch.matmul(x, cols.transpose(1, 2)[:, None]))  # [n, 3, H, size]
    return _round_like_pil(torch.matmul(rows[:, None], x))


def resized_crop(images: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
    """Crop ``params``' boxes from uint8 images [n, 3, H, W], resize to ``size x size`` and flip: float32 in [0, 255].

    The values are integers (Pillow's uint8 result) stored as float32. One batched matrix product per axis, each
    pass rounded like Pillow (round half up, clamp to [0, 255]), in Pillow's pass order
    (:func:`vertical_pass_first`); a batch that mixes both orders is split in two groups (decided on the host from
    ``params``: keep them on the CPU, where :func:`sample_crop_params` puts them for a CPU generator, to avoid a
    device sync).
    """
    _, _, in_h, in_w = images.shape
    device = images.device
    params = params.to("cpu")
    vfirst = vertical_pass_first(params.height, params.width, size)
    taps_h = max_taps(int(params.height.max()) if len(params.height) else 1, size)
    taps_w = max_taps(int(params.width.max()) if len(params.width) else 1, size)
    params = params.to(device)
    rows = resample_matrix(params.top, params.height, in_h, size, taps=taps_h)  # [n, size, H]
    cols = resample_matrix(params.left, params.width, in_w, size, params.flip, taps_w)  # [n, size, W]
    if bool(vfirst.all()) or not bool(vfirst.any()):
        return _two_passes(images, rows, cols, bool(vfirst[0]) if len(vfirst) else False)
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.float32, device=device)
    for first in (False, True):
        index = to_device(torch.nonzero(vfirst == first)[:, 0], device)
        out[index] = _two_passes(images[index], rows[index], cols[index], first)
    return out


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (or integer-valued float) images -> float32 ``(x / 255 - mean) / std``, as ``ToTensor`` + ``Normalize``.

    The same float32 operations in the same order as torchvision's, so a uint8 image normalised here equals the
    CPU transform's tensor exactly.
    """
    x = images.to(torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


class DeviceAugment:
    """Random resized crop + horizontal flip + CLIP normalisation for batches of stored uint8 images.

    Args:
        size: output side (the model's input size).
        mean, std: normalisation (the backbone's ``preprocess_cfg``).
        scale, ratio: RandomResizedCrop's area-fraction and aspect-ratio ranges.
        flip_p: probability of a horizontal flip.

    ``augment(images, sizes, generator)`` -> float32 [n, 3, size, size] on the images' device, where ``images``
    and ``sizes`` come from ``ImageStore.get`` (valid region = top-left ``sizes[i]`` of each padded image; keep
    ``sizes`` and the generator on the CPU: the crop parameters are drawn there and the device never syncs).
    For a lock-step group, call :meth:`sample` once per client with that client's generator,
    :meth:`CropParams.cat` the results, and :meth:`apply` once on the concatenated images.
    """

    def __init__(self, size: int, mean, std, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5):
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p

    @classmethod
    def from_preprocess(cls, preprocess: dict) -> DeviceAugment:
        """The augmentation of :func:`fedprompt.data.clip_transforms` for a backbone's ``preprocess_cfg``."""
        size = preprocess.get("size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        return cls(size, preprocess.get("mean") or OPENAI_DATASET_MEAN, preprocess.get("std") or OPENAI_DATASET_STD)

    def __repr__(self) -> str:
        return (f"DeviceAugment(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p}, "
                f"mean={self.mean}, std={self.std})")

    def sample(self, sizes: torch.Tensor, generator: torch.Generator | None = None) -> CropParams:
        """Crop boxes and flips for images of valid ``sizes`` [n, 2] (see :func:`sample_crop_params`)."""
        return sample_crop_params(sizes, generator, self.scale, self.ratio, self.flip_p)

    def apply(self, images: torch.Tensor, params: CropParams) -> torch.Tensor:
        """Deterministic part: crop, resize, flip and normalise uint8 ``images`` [n, 3, H, W] with ``params``."""
        return normalize(resized_crop(images, params, self.size), self.mean, self.std)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(images, self.sample(sizes, generator))
