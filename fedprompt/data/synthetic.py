"""Generated images for smoke runs and tests (no files)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fedprompt.data.base import DatasetSplits, Sample
from fedprompt.data.partition import IID, ByDomain, Partitioner
from fedprompt.data.reader import FederatedData
from fedprompt.errors import FedPromptError


SYNTHETIC_NAMES = ["red square", "green circle", "blue triangle", "yellow cross", "purple ring", "orange bar",
                   "white dot", "black line"]


class Synthetic(FederatedData):
    """Generated images (class = a colour and a pattern, plus noise); no files, for smoke runs and tests.

    Args:
        num_classes: number of classes (at most 8).
        train_per_class: train images per class per domain.
        test_per_class: test images per class per domain.
        image_size: side of the generated images.
        num_domains: number of domains (each shifts brightness); >1 gives one client per domain by default.
    """

    def __init__(self, num_classes: int = 4, train_per_class: int = 16, test_per_class: int = 8,
                 image_size: int = 32, num_domains: int = 1, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= num_classes <= len(SYNTHETIC_NAMES):
            raise FedPromptError(f"data.num_classes must be in 1..{len(SYNTHETIC_NAMES)}, got {num_classes}")
        small = {k: v for k, v in dict(train_per_class=train_per_class, test_per_class=test_per_class,
                                       image_size=image_size, num_domains=num_domains).items() if v < 1}
        if small:
            raise FedPromptError("; ".join(f"--data.{k} must be >= 1, got {v}" for k, v in small.items()) + ".")
        self.num_classes = num_classes
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.image_size = image_size
        self.num_domains = num_domains

    def default_partition(self) -> Partitioner:
        return ByDomain() if self.num_domains > 1 else IID(4)

    def read(self) -> DatasetSplits:
        splits = {}
        for split, n in (("train", self.train_per_class), ("test", self.test_per_class)):
            splits[split] = [Sample(f"synthetic:{split}:{d}:{c}:{i}", c, f"domain{d}")
                             for d in range(self.num_domains) for c in range(self.num_classes) for i in range(n)]
        size, seed = self.image_size, self.seed

        def loader(sample: Sample) -> Image.Image:
            _, split, d, c, i = sample.path.split(":")
            d, c, i = int(d), int(c), int(i)
            rng = np.random.default_rng([seed, int(split == "test"), d, c, i])
            colour = np.array([(c * 97) % 256, (c * 57 + 80) % 256, (c * 151 + 30) % 256], dtype=np.float32)
            yy, xx = np.mgrid[:size, :size]
            pattern = (np.sin((xx * np.cos(c) + yy * np.sin(c)) * (c + 1) * 0.4) > 0)[..., None]
            image = colour * (0.5 + 0.5 * pattern) * (0.6 + 0.2 * d) + rng.normal(0, 25, (size, size, 3))
            return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))

        return DatasetSplits(SYNTHETIC_NAMES[: self.num_classes], splits["train"], splits["test"],
                             name="synthetic", loader=loader)
