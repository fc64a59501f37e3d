"""Batches for the lock-step engine: every client's local plan, and the data that fills it.

A client's local round is a :class:`LocalPlan`: the indices of its train samples for each local step (a fresh
permutation per epoch, drawn from the client's own generator) and one augmentation seed per step. Plans depend only
on (run seed, round, client), so a client sees the same batches and the same random crops whichever clients share
its lock-step group, on any number of processes, and after a resume.

A :class:`Feed` turns the plans of a group into one concatenated batch per step (the clients that still have data at
that step, in plan order), from one of these sources:

- cached frozen image-tower outputs (:class:`fedprompt.data.cache.FeatureCache`): a gather per client;
- decoded images (:class:`fedprompt.data.store.ImageStore`, every image decoded once per run): the test transform's
  uint8 images, normalised on the device (exactly the CPU transform's tensor), or, with ``train.device_augment``,
  train images cropped, resized, flipped and normalised in one batched call on the device
  (:class:`fedprompt.data.augment.DeviceAugment`; each client's crops from a generator seeded by its own step seed);
- image files through the CPU transforms, with one ``DataLoader`` per run whose worker processes persist across
  clients and rounds (``persistent_workers``, ``pin_memory`` on CUDA): the whole group's schedule is handed to it at
  once, so the workers decode ahead while the device trains. Each augmented sample is transformed under its own seed
  (derived from the step seed and its position), so results do not depend on the number of workers.

Batches from a store carry uint8 ``pixels`` (and crop boxes); :meth:`Feed.finish` turns them into the normalised
``image`` once they are on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

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


class _Schedule:
    """A batch sampler whose batches are replaced before each pass (the DataLoader and its workers persist)."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class StepBatch:
    """The concatenated batch of one lock-step step: ``data`` (tensors) and the plans taking part, in order, with
    their sample counts."""

    data: dict
    members: list[int]
    counts: list[int]


class Feed:
    """Serves train and evaluation batches of every client of this process.

    Args:
        clients: every client's data (``fedprompt.data.ClientSplit``), indexed by client id.
        extra: further evaluation lists by name (e.g. ``{"base": [...], "novel": [...]}``).
        train_transform, test_transform: the CPU transforms (PIL image -> tensor).
        loader: sample -> PIL image.
        num_workers: DataLoader worker processes (persistent across clients and rounds).
        pin_memory: pin host batches (CUDA).
        cache: a :class:`fedprompt.data.cache.FeatureCache`, or ``None``.
        cache_train: serve train batches from the cache (needs deterministic train transforms).
        cache_eval: serve evaluation batches from the cache.
        test_store: an ImageStore of the test kind: evaluation batches (and train batches when the train transform
            is the test transform) come from it instead of the files.
        train_store: an ImageStore of the train kind, with ``augment``: train batches augmented on the device.
        augment: the :class:`fedprompt.data.augment.DeviceAugment` of ``train_store``.
    """

    def __init__(self, clients, extra: dict[str, list[Sample]], train_transform, test_transform, loader,
                 num_workers: int = 0, pin_memory: bool = False, cache=None, cache_train: bool = False,
                 cache_eval: bool = False, test_store=None, train_store=None, augment=None):
        lists: dict[str, list[Sample]] = {}
        for split in clients:
            lists[f"train:{split.client_id}"] = split.train
            lists[f"test:{split.client_id}"] = split.test
            lists[f"val:{split.client_id}"] = split.val
        for name, samples in extra.items():
            lists[f"test:{name}"] = samples
        self.lists = lists
        self.table = SampleTable(lists, {"train": train_transform, "test": test_transform, "val": test_transform},
                                 loader)
        self.test_transform, self.train_transform = test_transform, train_transform
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.cache = cache
        self.cache_train = cache is not None and cache_train
        self.cache_eval = cache is not None and cache_eval
        self._schedule = _Schedule()
        self._loader: DataLoader | None = None
        self.test_store = test_store
        self.train_store = train_store if augment is not None else None
        self.augment = augment
        self.train_from_test_store = test_store is not None and train_transform is test_transform
        self._rows: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------ files
    def _files(self, batches: list[list]) -> Iterator[dict]:
        if self._loader is None:
            self._loader = DataLoader(self.table, batch_sampler=self._schedule, num_workers=self.num_workers,
                                      persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory)
        self._schedule.batches = batches
        yield from self._loader

    # ------------------------------------------------------------------------------------------------ cache
    def _cached(self, name: str):
        kind = name.split(":")[0]
        transform = self.train_transform if kind == "train" else self.test_transform
        return self.cache.dataset(self.lists[name], transform, "train" if kind == "train" else "test")

    @staticmethod
    def _gather(cached, indices: list[int]) -> dict:
        index = torch.as_tensor(indices, dtype=torch.long)
        out = {k: v[index] for k, v in cached.tensors.items()}
        out["label"] = torch.as_tensor([cached.labels[i] for i in indices], dtype=torch.long)
        return out

    # ------------------------------------------------------------------------------------------------ store
    def _store_rows(self, store, name: str) -> torch.Tensor:
        key = f"{store.kind.name}|{name}"
        if key not in self._rows:
            self._rows[key] = store.rows(self.lists[name])
        return self._rows[key]

    def _from_store(self, store, name: str, indices: list[int], crop_seed: int | None = None) -> dict:
        """The stored uint8 ``pixels`` and labels of samples ``indices`` of list ``name``; with ``crop_seed``, also
        their ``crop`` boxes and flips, drawn from a generator seeded with it (the client's step seed)."""
        rows = self._store_rows(store, name)[torch.as_tensor(indices, dtype=torch.long)]
        pixels, sizes = store.get(rows)
        part = {"pixels": pixels, "label": torch.as_tensor([self.lists[name][i].label for i in indices])}
        if crop_seed is not None:
            params = self.augment.sample(sizes, torch.Generator().manual_seed(crop_seed))
            part["crop"] = torch.stack([params.top, params.left, params.height, params.width,
                                        params.flip.to(params.top.dtype)], dim=1)
        return part

    def finish(self, batch: dict) -> dict:
        """A batch on the device, with decoded ``pixels`` turned into the normalised (and, for train batches from
        the train store, augmented) ``image``; other batches pass unchanged."""
        if "pixels" not in batch:
            return batch
        batch = dict(batch)
        pixels = batch.pop("pixels")
        crop = batch.pop("crop", None)
        if crop is not None:
            top, left, height, width, flip = crop.unbind(1)
            batch["image"] = self.augment.apply(pixels, CropParams(top, left, height, width, flip.bool()))
        else:
            kind = self.test_store.kind
            batch["image"] = normalize(pixels, kind.mean, kind.std)
        return batch

    # ------------------------------------------------------------------------------------------------ train
    def train_steps(self, plans: list[LocalPlan]) -> Iterator[StepBatch]:
        """One :class:`StepBatch` per lock-step step of ``plans`` (clients drop out when their plan ends)."""
        steps = max(plan.steps for plan in plans)
        layout = []
        for step in range(steps):
            members = [j for j, plan in enumerate(plans) if step < plan.steps]
            layout.append((members, [len(plans[j].batches[step]) for j in members]))
        if self.cache_train:
            cached = {plan.cid: self._cached(f"train:{plan.cid}") for plan in plans}
            for step, (members, counts) in enumerate(layout):
                parts = [self._gather(cached[plans[j].cid], plans[j].batches[step]) for j in members]
                yield StepBatch({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, members, counts)
            return
        store = self.train_store or (self.test_store if self.train_from_test_store else None)
        if store is not None:
            for step, (members, counts) in enumerate(layout):
                parts = [self._from_store(store, f"train:{plans[j].cid}", plans[j].batches[step],
                                          plans[j].seeds[step] if self.train_store is not None else None)
                         for j in members]
                yield StepBatch({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, members, counts)
            return
        batches = []
        for step, (members, _) in enumerate(layout):
            keys = []
            for j in members:
                plan = plans[j]
                keys += [(f"train:{plan.cid}", i, sample_seed(plan.seeds[step], pos))
                         for pos, i in enumerate(plan.batches[step])]
            batches.append(keys)
        for (members, counts), data in zip(layout, self._files(batches)):
            yield StepBatch(data, members, counts)

    # ------------------------------------------------------------------------------------------------- eval
    def eval_batches(self, name: str, batch_size: int) -> Iterator[dict]:
        """Batches of the evaluation list ``name`` (``test:<cid>``, ``val:<cid>``, ``test:base``, ...), in order."""
        samples = self.lists[name]
        spans = [list(range(start, min(start + batch_size, len(samples))))
                 for start in range(0, len(samples), batch_size)]
        if self.cache_eval:
            cached = self._cached(name)
            for span in spans:
                yield self._gather(cached, span)
            return
        if self.test_store is not None:
            for span in spans:
                yield self._from_store(self.test_store, name, span)
            return
        yield from self._files([[(name, i, None) for i in span] for span in spans])

    def close(self) -> None:
        """Stop the persistent DataLoader workers."""
        self._loader = None
