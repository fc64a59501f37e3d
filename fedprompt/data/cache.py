"""In-memory cache of frozen image-tower outputs.

The image tower is frozen, so for methods without visual prompts its outputs (pooled features; projected patch
tokens for FedOTP) are a function of the transformed image alone. With deterministic transforms (the test transform,
or ``train.augment: false``) each image is encoded once per run instead of once per step and per evaluation; the
cached run gives the same metrics as the uncached one (the uncached path stays the reference, the cache is a
switch: ``train.feature_cache``).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from fedprompt.data.base import ImageDataset, Sample


class CachedFeatures(Dataset):
    """Dicts ``{"features" | "tokens", "label", "index"}`` from precomputed tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], labels: list[int]):
        self.tensors = tensors
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {k: v[index] for k, v in self.tensors.items()}
        item.update(label=self.labels[index], index=index)
        return item


class FeatureCache:
    """Encodes each (image, transform kind) once and serves the outputs the method needs.

    Args:
        backbone: the frozen backbone.
        fabric: Lightning Fabric (device placement and autocast).
        inputs: which outputs to cache: ``("features",)`` pooled, ``("tokens",)`` patch tokens, or both.
        batch_size: encoding batch size.
        loader: sample -> PIL image.
        num_workers: DataLoader workers for encoding.
    """

    def __init__(self, backbone, fabric, inputs: tuple[str, ...], batch_size: int, loader, num_workers: int = 0):
        self.backbone = backbone
        self.fabric = fabric
        self.inputs = tuple(inputs)
        self.batch_size = batch_size
        self.loader = loader
        self.num_workers = num_workers
        self._store: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, samples: list[Sample], transform, kind: str) -> None:
        dataset = ImageDataset(samples, transform, self.loader)
        offset = 0
        for batch in DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers):
            images = self.fabric.to_device(batch["image"])
            with self.fabric.autocast():
                if "tokens" in self.inputs:
                    pooled, tokens = self.backbone.encode_image_tokens(images)
                    out = {"features": pooled, "tokens": tokens}
                else:
                    out = {"features": self.backbone.encode_image(images)}
            for i in range(images.shape[0]):
                self._store[(samples[offset + i].path, kind)] = {k: out[k][i].cpu() for k in self.inputs}
            offset += images.shape[0]

    def dataset(self, samples: list[Sample], transform, kind: str) -> CachedFeatures:
        """A dataset of cached outputs for ``samples`` under the transform named ``kind`` (encoded on first use)."""
        missing = list({s.path: s for s in samples if (s.path, kind) not in self._store}.values())
        if missing:
            self._encode(missing, transform, kind)
        tensors = {k: torch.stack([self._store[(s.path, kind)][k] for s in samples]) for k in self.inputs}
        return CachedFeatures(tensors, [s.label for s in samples])
