"""The torch dataset over samples: each image loaded and transformed (used to encode images, e.g. by the feature
cache)."""

from __future__ import annotations

from typing import Callable

import torch

from fedprompt.data.base import Sample, load_rgb


class ImageDataset(torch.utils.data.Dataset):
    """Samples -> dicts ``{"image", "label", "index"}`` with a transform applied to each image."""

    def __init__(self, samples: list[Sample], transform: Callable | None, loader: Callable = load_rgb):
        self.samples = samples
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = self.loader(sample)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": sample.label, "index": index}
