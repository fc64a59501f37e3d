"""Batches for the lock-step engine: every client's local plan, and the data that fills it.

A client's local round is a :class:`LocalPlan`: the indices of its train samples for each local step (a fresh
permutation per epoch, drawn from the client's own generator) and one augmentation seed per step. Plans depend only
on (run seed, round, client), so a client sees the same batches and the same random crops whichever clients share
its lock-step group, on any number of processes, and after a resume.

A :class:`Feed` turns the plans of a group into one concatenated batch per step (the clients that still have data at
that step, in plan order), and an evaluation list into batches. Where the data comes from is a :class:`Source`, one
for training and one for evaluation, each one of:

- :class:`CachedFeatures`: cached frozen image-tower outputs (:class:`fedprompt.data.cache.FeatureCache`), a gather;
- :class:`StoredImages`: decoded images (:class:`fedprompt.data.store.ImageStore`, every image decoded once per run):
  the test transform's uint8 images, normalised on the device (exactly the CPU transform's tensor), or, with
  ``train.device_augment``, train images cropped, resized, flipped and normalised in one batched call on the device
  (:class:`fedprompt.data.augment.DeviceAugment`; each client's crops from a generator seeded by its own step seed);
- :class:`ImageFiles`: image files through the CPU transforms, with one ``DataLoader`` per run whose worker
  processes persist across clients and rounds (``persistent_workers``, ``pin_memory`` on CUDA): the whole group's
  schedule is handed to it at once, so the workers decode ahead while the device trains. Each augmented sample is
  transformed under its own seed (derived from the step seed and its position), so results do not depend on the
  number of workers.

A source serves steps made of :class:`Part` s (a list name, sample indices and, for train batches, the client's step
seed); batches from a store carry uint8 ``pixels`` (and crop boxes) that :meth:`Feed.finish` turns into the
normalised ``image`` once they are on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from fedprompt.data.augment import CropParams, normalize
from fedprompt.data.base import Sample

_GOLDEN = 0x9E3779B97F4A7C15
_MASK63 = (1 << 63) - 1


@dataclass
class LocalPlan:
    """One client's local round: the train-sample indices of each step and an augmentation seed per step.

    ``epoch_steps`` is the number of steps of one pass over the client's train data (the learning-rate schedule
    counts epochs); ``epochs_before`` is set by the round loop for the official one-scheduler-per-run schedule
    (:class:`fedprompt.methods.OptimizerArgs`): the local epochs of every client trained before this local round.
    """

    cid: int
    batches: list[list[int]]
    seeds: list[int] = field(default_factory=list)
    epoch_steps: int = 0
    epochs_before: int = 0

    @property
    def steps(self) -> int:
        return len(self.batches)


def local_epoch_count(num_samples: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """The passes (started) over a client's train data in one local round of :func:`local_plan`."""
    if max_steps is None:
        return epochs
    per_epoch = max(1, math.ceil(num_samples / batch_size))
    return math.ceil(max_steps / per_epoch)


def local_steps_per_round(num_samples: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """The batches of one local round of :func:`local_plan` (the same every round)."""
    if max_steps is not None:
        return max_steps
    return epochs * max(1, math.ceil(num_samples / batch_size))


def local_plan(cid: int, num_samples: int, batch_size: int, epochs: int, max_steps: int | None,
               seed: int) -> LocalPlan:
    """The batches of a client's local round: ``epochs`` passes over its ``num_samples`` train samples in a fresh
    random order each (the last batch of a pass may be smaller), or exactly ``max_steps`` batches when set (passes
    repeat as needed). Drawn from a generator seeded with ``seed`` only."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    epoch = 0
    while (epoch < epochs) if max_steps is None else (len(batches) < max_steps):
        order = torch.randperm(num_samples, generator=generator).tolist()
        for start in range(0, num_samples, batch_size):
            if max_steps is not None and len(batches) >= max_steps:
                break
            batches.append(order[start:start + batch_size])
        epoch += 1
    seeds = torch.randint(0, _MASK63, (len(batches),), generator=generator).tolist()
    return LocalPlan(cid, batches, seeds, epoch_steps=math.ceil(num_samples / batch_size))


def sample_seed(step_seed: int, position: int) -> int:
    """The augmentation seed of the ``position``-th sample of a client's batch."""
    return (step_seed + (position + 1) * _GOLDEN) & _MASK63


class SampleTable(Dataset):
    """Every sample list this process may load, addressed by ``(list name, index, seed)``.

    ``seed`` ``None`` applies the deterministic transform of the list; otherwise the list's (random) transform runs
    under ``torch.manual_seed(seed)`` inside ``fork_rng``, so it neither reads nor moves the global random state.
    """

    def __init__(self, lists: dict[str, list[Sample]], transforms: dict[str, Callable], loader: Callable):
        self.lists = lists
        self.transforms = transforms
        self.loader = loader

    def __len__(self) -> int:
        return sum(len(v) for v in self.lists.values())

    def __getitem__(self, key: tuple[str, int, int | None]) -> dict:
        name, index, seed = key
        sample = self.lists[name][index]
        image = self.loader(sample)
        transform = self.transforms[name.split(":")[0]]
        if seed is None:
            image = transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = transform(image)
        return {"image": image, "label": sample.label}


@dataclass
class Part:
    """One client's share of a step (or one evaluation batch): samples ``indices`` of list ``name``
    (``train:<cid>``, ``test:<cid>``, ...) and, for train batches, the client's step seed (augmentation)."""

    name: str
    indices: list[int]
    seed: int | None = None


class Source(Protocol):
    """Where batches come from: :meth:`stream` serves one batch (a dict of tensors, ``label`` included) per step,
    each step a list of :class:`Part` s concatenated in order; :meth:`finish` completes a batch of this source on the
    device (others pass unchanged); :meth:`close` releases workers."""

    def stream(self, steps: list[list[Part]]) -> Iterator[dict]: ...

    def finish(self, batch: dict) -> dict: ...

    def close(self) -> None: ...


def _concat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class CachedFeatures:
    """Batches of cached frozen image-tower outputs (``features`` / ``tokens``), gathered per part.

    Args:
        cache: the :class:`fedprompt.data.cache.FeatureCache`.
        lists: every sample list by name.
        transforms: the CPU transform of each list kind (``train``, ``test``, ``val``): part of the cache key.
    """

    def __init__(self, cache, lists: dict[str, list[Sample]], transforms: dict[str, Callable]):
        self.cache, self.lists, self.transforms = cache, lists, transforms

    def _cached(self, name: str):
        kind = name.split(":")[0]
        return self.cache.dataset(self.lists[name], self.transforms[kind], "train" if kind == "train" else "test")

    def _gather(self, part: Part) -> dict:
        cached = self._cached(part.name)
        index = torch.as_tensor(part.indices, dtype=torch.long)
        out = {k: v[index] for k, v in cached.tensors.items()}
        out["label"] = torch.as_tensor([cached.labels[i] for i in part.indices], dtype=torch.long)
        return out

    def stream(self, steps: list[list[Part]]) -> Iterator[dict]:
        for parts in steps:
            yield _concat([self._gather(p) for p in parts])

    def finish(self, batch: dict) -> dict:
        return batch

    def close(self) -> None:
        pass


class StoredImages:
    """Batches of decoded uint8 images from an :class:`fedprompt.data.store.ImageStore`: the test transform's
    images (normalised by :meth:`finish`), or, with ``augment``, train images with each part's crop boxes and flips
    drawn from a generator seeded with its step seed (applied on the device by :meth:`finish`).

    Args:
        store: the image store.
        lists: every sample list by name.
        augment: the :class:`fedprompt.data.augment.DeviceAugment` of a train store, or ``None``.
    """

    def __init__(self, store, lists: dict[str, list[Sample]], augment=None):
        self.store, self.lists, self.augment = store, lists, augment
        self._rows: dict[str, torch.Tensor] = {}

    def _store_rows(self, name: str) -> torch.Tensor:
        if name not in self._rows:
            self._rows[name] = self.store.rows(self.lists[name])
        return self._rows[name]

    def _get(self, part: Part) -> dict:
        rows = self._store_rows(part.name)[torch.as_tensor(part.indices, dtype=torch.long)]
        pixels, sizes = self.store.get(rows)
        out = {"pixels": pixels, "label": torch.as_tensor([self.lists[part.name][i].label for i in part.indices])}
        if self.augment is not None:
            params = self.augment.sample(sizes, torch.Generator().manual_seed(part.seed))
            out["crop"] = torch.stack([params.top, params.left, params.height, params.width,
                                       params.flip.to(params.top.dtype)], dim=1)
        return out

    def stream(self, steps: list[list[Part]]) -> Iterator[dict]:
        for parts in steps:
            yield _concat([self._get(p) for p in parts])

    def finish(self, batch: dict) -> dict:
        """The normalised (and, for a train store, augmented) ``image`` from a batch's ``pixels``."""
        if "pixels" not in batch or ("crop" in batch) != (self.augment is not None):
            return batch
        batch = dict(batch)
        pixels = batch.pop("pixels")
        if self.augment is not None:
            top, left, height, width, flip = batch.pop("crop").unbind(1)
            batch["image"] = self.augment.apply(pixels, CropParams(top, left, height, width, flip.bool()))
        else:
            batch["image"] = normalize(pixels, self.store.kind.mean, self.store.kind.std)
        return batch

    def close(self) -> None:
        pass


class _Schedule:
    """A batch sampler whose batches are replaced before each pass (the DataLoader and its workers persist)."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageFiles:
    """Batches of image files through the CPU transforms, from one persistent ``DataLoader`` (see the module
    docstring); a train part's samples are each transformed under their own seed (:func:`sample_seed`).

    Args:
        lists: every sample list by name.
        transforms: the CPU transform of each list kind (``train``, ``test``, ``val``).
        loader: sample -> PIL image.
        num_workers: DataLoader worker processes (persistent across clients and rounds).
        pin_memory: pin host batches (CUDA).
    """

    def __init__(self, lists: dict[str, list[Sample]], transforms: dict[str, Callable], loader: Callable,
                 num_workers: int = 0, pin_memory: bool = False):
        self.table = SampleTable(lists, transforms, loader)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._schedule = _Schedule()
        self._loader: DataLoader | None = None

    @staticmethod
    def _keys(part: Part) -> list[tuple]:
        if part.seed is None:
            return [(part.name, i, None) for i in part.indices]
        return [(part.name, i, sample_seed(part.seed, pos)) for pos, i in enumerate(part.indices)]

    def stream(self, steps: list[list[Part]]) -> Iterator[dict]:
        if self._loader is None:
            self._loader = DataLoader(self.table, batch_sampler=self._schedule, num_workers=self.num_workers,
                                      persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory)
        self._schedule.batches = [[key for part in parts for key in self._keys(part)] for parts in steps]
        yield from self._loader

    def finish(self, batch: dict) -> dict:
        return batch

    def close(self) -> None:
        self._loader = None


@dataclass
class StepBatch:
    """The concatenated batch of one lock-step step: ``data`` (tensors) and the plans taking part, in order, with
    their sample counts."""

    data: dict
    members: list[int]
    counts: list[int]


def sample_lists(clients, extra: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
    """Every sample list of this process by name: ``train:<cid>``, ``test:<cid>``, ``val:<cid>`` of each client and
    ``test:<name>`` of each extra evaluation list (e.g. ``base``, ``novel``)."""
    lists: dict[str, list[Sample]] = {}
    for split in clients:
        lists[f"train:{split.client_id}"] = split.train
        lists[f"test:{split.client_id}"] = split.test
        lists[f"val:{split.client_id}"] = split.val
    for name, samples in extra.items():
        lists[f"test:{name}"] = samples
    return lists


class Feed:
    """Serves train and evaluation batches of every client of this process.

    Args:
        lists: every sample list by name (:func:`sample_lists`).
        train: the source of train batches.
        evaluation: the source of evaluation batches (may be the same object).
    """

    def __init__(self, lists: dict[str, list[Sample]], train: Source, evaluation: Source):
        self.lists, self.train, self.evaluation = lists, train, evaluation

    def finish(self, batch: dict) -> dict:
        """A batch on the device, completed by its source (decoded ``pixels`` -> normalised, augmented ``image``);
        other batches pass unchanged."""
        return self.evaluation.finish(self.train.finish(batch))

    def train_steps(self, plans: list[LocalPlan]) -> Iterator[StepBatch]:
        """One :class:`StepBatch` per lock-step step of ``plans`` (clients drop out when their plan ends)."""
        layout, steps = [], []
        for step in range(max(plan.steps for plan in plans)):
            members = [j for j, plan in enumerate(plans) if step < plan.steps]
            layout.append((members, [len(plans[j].batches[step]) for j in members]))
            steps.append([Part(f"train:{plans[j].cid}", plans[j].batches[step], plans[j].seeds[step])
                          for j in members])
        for (members, counts), data in zip(layout, self.train.stream(steps)):
            yield StepBatch(data, members, counts)

    def eval_batches(self, name: str, batch_size: int) -> Iterator[dict]:
        """Batches of the evaluation list ``name`` (``test:<cid>``, ``val:<cid>``, ``test:base``, ...), in order."""
        samples = self.lists[name]
        spans = [list(range(start, min(start + batch_size, len(samples))))
                 for start in range(0, len(samples), batch_size)]
        yield from self.evaluation.stream([[Part(name, span)] for span in spans])

    def close(self) -> None:
        """Stop the persistent DataLoader workers."""
        self.train.close()
        self.evaluation.close()
