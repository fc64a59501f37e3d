"""Core data types: samples, dataset splits, client splits, and the image dataset that reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from fedprompt.errors import FedPromptError


@dataclass(frozen=True)
class Sample:
    """One labelled image: a file path (or a synthetic key), its label index and, for multi-domain data, its domain."""

    path: str
    label: int
    domain: str = ""


def load_rgb(sample: Sample) -> Image.Image:
    """Open an image file as RGB; a missing or corrupt file raises an error naming it."""
    try:
        with Image.open(sample.path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FedPromptError(f"image file not found: {sample.path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise FedPromptError(f"cannot read image {sample.path}: {err}. Remove or replace the file.") from None


@dataclass
class DatasetSplits:
    """What a reader returns: ordered class names and the train/test (and optional validation) samples.

    ``classnames[i]`` is the name of label ``i``; the list order is the prompt order, always fixed (never a set).
    ``loader`` turns a sample into a PIL image (files by default; synthetic data generates images).
    """

    classnames: list[str]
    train: list[Sample]
    test: list[Sample]
    val: list[Sample] = field(default_factory=list)
    name: str = ""
    loader: Callable[[Sample], Image.Image] = load_rgb

    @property
    def domains(self) -> list[str]:
        """Domains in first-seen order of the train samples (``[""]`` for single-domain data)."""
        return list(dict.fromkeys(s.domain for s in self.train))


@dataclass
class ClientSplit:
    """One client's data: its train and test samples, and a readable name (e.g. its domain).

    ``classnames`` is ``None`` for a client that scores the federation's shared class list
    (:attr:`fedprompt.data.FederatedSplits.classnames`), the usual case. A client with its own class list (FedTPG's
    ``cross_cls`` protocol, :class:`fedprompt.data.CrossClass`) has ``classnames`` set, and then the labels of its
    train, val and test samples index into that list, not into the shared one. ``dataset`` names the dataset the
    client was drawn from in a multi-dataset federation (:class:`fedprompt.data.Combined`); ``""`` otherwise.
    """

    client_id: int
    train: list[Sample]
    test: list[Sample]
    name: str = ""
    val: list[Sample] = field(default_factory=list)
    classnames: list[str] | None = None
    dataset: str = ""

    @property
    def num_train(self) -> int:
        return len(self.train)


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
