"""Malicious clients: a seeded choice of clients that poison their data or manipulate their updates.

Built from the ``attack`` settings (:class:`fedprompt.threats.AttackArgs`) by :func:`plan_attack`, for every method
that communicates, in both runtimes:

- **who** is malicious is a pure function of the run seed (:func:`malicious_clients`), so every Fabric rank, the
  Flower server and every Flower node agree without talking, and a resumed run has the same ones;
- **data attacks** change what a malicious client reads (:meth:`AttackPlan.poison`, applied to the data splits
  before any batch, cache or store is built): ``label_flip`` relabels its train images y -> C - 1 - y;
  ``backdoor`` replaces a ``poison_fraction`` of its train images of other classes by the same images with a
  trigger patch (:func:`add_trigger`: a 3 x 3 black-and-white checkerboard at the bottom right of the image's
  central square, so the test transform's centre crop keeps it) labelled ``target_class``. A triggered image is a
  sample of its own (its path carries the trigger and the file's size and time, :func:`triggered`), read by a
  loader that adds the patch (:class:`TriggerLoader`), so the feature cache and the decoded-image stores hold it
  beside the clean image and never serve one for the other;
- **update attacks** change what a malicious client sends (:class:`UpdateAttack`, a
  :data:`fedprompt.federation.clients.UpdateStep` run wherever the client trains): its state becomes
  ``before + lambda (trained - before)`` (``-lambda`` for ``sign_flip``; ``before``: its state before local
  training) and its upload is the method's upload of that state. Every kind scales by ``attack.scale`` (a backdoor
  with ``scale`` > 1 is model replacement, Bagdasaryan et al. 2020); the client keeps its honest state;
- **what the rows report** (:func:`attack_rows`, an entry of :data:`fedprompt.federation.evaluator.ROW_SUMMARIES`):
  ``benign_acc`` (the honest clients' mean local accuracy) and, for ``label_flip`` and ``backdoor``,
  ``attack_success_rate`` over the honest clients' models on an evaluation set of the dataset's test split
  (:class:`AttackSet`): the triggered test images of other classes than the target, labelled as the target
  (the fraction classified as the target), or the test images labelled with their flipped label (the fraction
  classified as it); ``malicious_clients`` names the malicious clients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from fedprompt.data.base import EvalSet, Sample
from fedprompt.errors import FedPromptError
from fedprompt.federation.evaluator import ROW_SUMMARIES

State = dict[str, torch.Tensor]

#: separates the choice of malicious clients from every other stream derived from the run seed
MALICIOUS_STREAM = 0x4D414C49
#: and the choice of poisoned images
POISON_STREAM = 0x504F4953
#: what a triggered sample's path carries after the image's own path
TRIGGER_MARK = "#fedprompt-trigger="
#: the checkerboard's cells per side
TRIGGER_CELLS = 3


# -------------------------------------------------------------------------------------------------- who
def malicious_clients(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The sorted ids of the malicious clients: ``max(1, floor(fraction num_clients))`` of them, drawn without
    replacement from a generator seeded with the run seed alone."""
    count = min(num_clients, max(1, int(fraction * num_clients + 1e-9)))
    rng = np.random.default_rng([seed, MALICIOUS_STREAM])
    return sorted(rng.choice(num_clients, size=count, replace=False).tolist())


# ------------------------------------------------------------------------------------------------ trigger
def trigger_box(width: int, height: int, size: float) -> tuple[int, int, int]:
    """``(left, top, side)`` of the trigger in a ``width`` x ``height`` image: a square of ``size`` times the
    shorter side, at the bottom right of the central square, a margin of 1/32 of that side from its edges."""
    short = min(width, height)
    side = max(1, int(round(size * short)))
    margin = short // 32
    left = (width - short) // 2 + short - margin - side
    top = (height - short) // 2 + short - margin - side
    return max(0, left), max(0, top), side


def add_trigger(image: Image.Image, size: float) -> Image.Image:
    """A copy of ``image`` (RGB) with the trigger: a :data:`TRIGGER_CELLS` x :data:`TRIGGER_CELLS` checkerboard of
    white and black cells (white at the corners) in :func:`trigger_box`."""
    pixels = np.array(image.convert("RGB"))
    left, top, side = trigger_box(image.width, image.height, size)
    rows = np.arange(side) * TRIGGER_CELLS // side
    board = ((rows[:, None] + rows[None, :]) % 2 == 0).astype(np.uint8) * 255
    pixels[top:top + side, left:left + side] = board[..., None]
    return Image.fromarray(pixels)


def trigger_spec(size: float) -> str:
    return f"checkerboard{TRIGGER_CELLS}:{size:g}"


def triggered(sample: Sample, label: int, size: float) -> Sample:
    """The sample of ``sample``'s image with the trigger, labelled ``label``: its path is the image's, the trigger
    and the file's size and modification time (so a cache entry of it is told apart from the clean image's and is
    invalidated with the file)."""
    from fedprompt.data.store import sample_identity

    stamp = sample_identity(sample)[len(sample.path):]
    return Sample(f"{sample.path}{TRIGGER_MARK}{trigger_spec(size)}{stamp}", label, sample.domain)


class TriggerLoader:
    """The data's loader, adding the trigger to the images of :func:`triggered` samples (others pass unchanged).
    Its cache identity is the data loader's (a triggered sample's identity is its own path)."""

    def __init__(self, loader, size: float):
        self.loader, self.size = loader, size

    @property
    def cache_key(self) -> str | None:
        from fedprompt.data.store import loader_key

        return loader_key(self.loader)

    def __call__(self, sample: Sample) -> Image.Image:
        if TRIGGER_MARK not in sample.path:
            return self.loader(sample)
        path = sample.path.rsplit(TRIGGER_MARK, 1)[0]
        return add_trigger(self.loader(Sample(path, sample.label, sample.domain)), self.size)


# ------------------------------------------------------------------------------------------------ data
def flipped_label(label: int, num_classes: int) -> int:
    return num_classes - 1 - label


def poison_backdoor(samples: list[Sample], args, seed: int, cid: int) -> list[Sample]:
    """``samples`` with ``max(1, round(poison_fraction n))`` of the ``n`` of other classes than the target replaced
    by their triggered images labelled as the target (drawn from the seed and the client)."""
    candidates = [i for i, s in enumerate(samples) if s.label != args.target_class]
    if not candidates:
        return list(samples)
    count = max(1, int(round(args.poison_fraction * len(candidates))))
    rng = np.random.default_rng([seed, POISON_STREAM, cid])
    chosen = set(rng.choice(candidates, size=count, replace=False).tolist())
    return [triggered(s, args.target_class, args.trigger_size) if i in chosen else s for i, s in enumerate(samples)]


@dataclass
class AttackSet(EvalSet):
    """The evaluation set of a targeted attack: its samples carry the attacker's label, so a client's accuracy on
    it is the attack's success rate."""


@dataclass
class AttackPlan:
    """The malicious clients of a run and what they do (see the module docstring)."""

    args: object
    """The ``attack`` settings."""
    malicious: list[int]
    seed: int

    def poison(self, splits):
        """The splits with the malicious clients' train images poisoned (data attacks; the same splits otherwise)."""
        kind = self.args.kind
        if kind not in ("label_flip", "backdoor"):
            return splits
        clients = []
        for client in splits.clients:
            if client.client_id in self.malicious:
                if kind == "label_flip":
                    count = len(splits.classnames)
                    train = [Sample(s.path, flipped_label(s.label, count), s.domain) for s in client.train]
                else:
                    train = poison_backdoor(client.train, self.args, self.seed, client.client_id)
                client = replace(client, train=train)
            clients.append(client)
        source = splits.source
        if kind == "backdoor":
            source = replace(source, loader=TriggerLoader(source.loader, self.args.trigger_size))
        return replace(splits, clients=clients, source=source)

    def eval_sets(self, splits) -> list[AttackSet]:
        """The targeted attack's evaluation set over the dataset's test split (none for update attacks)."""
        kind, count = self.args.kind, len(splits.classnames)
        test = splits.source.test
        if kind == "backdoor":
            target = self.args.target_class
            samples = [triggered(s, target, self.args.trigger_size) for s in test if s.label != target]
        elif kind == "label_flip":
            samples = [Sample(s.path, flipped_label(s.label, count), s.domain) for s in test
                       if flipped_label(s.label, count) != s.label]
        else:
            return []
        dataset = splits.clients[0].dataset if splits.clients else ""
        return [AttackSet(f"attack/{kind}", list(splits.classnames), samples, "attack", dataset)]

    def install(self, pool, evaluator) -> None:
        """The malicious clients' update step on the pool (when they send other than their honest update) and the
        list the rows' summary reads."""
        if self.args.kind in ("scale", "sign_flip") or self.args.scale != 1:
            pool.update_steps.append(UpdateAttack(pool, self.malicious, self.args.kind, self.args.scale))
        evaluator.malicious_clients = list(self.malicious)


def plan_attack(run, splits) -> AttackPlan | None:
    """The run's attack (``None`` when every client is honest), checked against the method and the data: one line
    for what it cannot do, before anything is written."""
    args = run.attack
    if not args.enabled:
        return None
    method = run.method
    if not method.communicates or not method.trains:
        raise FedPromptError(f"attack: {method.name} shares no trained state with a server, so a malicious client "
                             "can harm no one; leave attack.kind at none.")
    if run.federation.central:
        raise FedPromptError("attack: federation.central pools every client into one, so no client is malicious; "
                             "leave attack.kind at none with central.")
    if args.kind in ("label_flip", "backdoor") and any(c.classnames for c in splits.clients):
        raise FedPromptError(f"attack.kind {args.kind}: the clients have their own class lists (FedTPG's cross_cls "
                             "protocol, combined datasets), so labels cannot be flipped or targeted across them; use "
                             "attack.kind scale or sign_flip.")
    if args.kind == "backdoor" and args.target_class >= len(splits.classnames):
        raise FedPromptError(f"--attack.target_class {args.target_class}: the data has {len(splits.classnames)} "
                             f"classes (0..{len(splits.classnames) - 1}).")
    return AttackPlan(args, malicious_clients(len(splits.clients), args.fraction, run.seed), run.seed)


# ----------------------------------------------------------------------------------------------- updates
class UpdateAttack:
    """The malicious clients' upload (a :data:`fedprompt.federation.clients.UpdateStep`): the method's upload of
    ``before + factor (trained - before)``, ``factor`` = ``scale`` (``-scale`` for ``sign_flip``), ``before`` the
    client's state before local training (the pool's, which the transports replace only after the round)."""

    def __init__(self, pool, malicious: list[int], kind: str, scale: float):
        self.pool = pool
        self.malicious = set(malicious)
        self.factor = -float(scale) if kind == "sign_flip" else float(scale)

    def __call__(self, cid: int, upload: State, trained: State, round_idx: int) -> State:
        if cid not in self.malicious:
            return upload
        return self.pool.aggregator.upload(cid, scaled_state(self.pool.states[cid], trained, self.factor), round_idx)


def scaled_state(before: State, trained: State, factor: float) -> State:
    """``before + factor (trained - before)`` per tensor (float64, cast back to each tensor's dtype)."""
    out = {}
    for key, value in trained.items():
        base = before[key].to(torch.float64) if key in before and before[key].shape == value.shape else None
        if base is None:
            out[key] = value
            continue
        out[key] = (base + factor * (value.to(torch.float64) - base)).to(value.dtype)
    return out


def attack_fingerprint(parts) -> dict:
    """What a Flower node and the server must agree on about the attack (empty without one): the malicious clients,
    their update factor and the attack's evaluation sets."""
    malicious = getattr(parts.evaluator, "malicious_clients", None)
    if malicious is None:
        return {}
    factors = [step.factor for step in parts.pool.update_steps if isinstance(step, UpdateAttack)]
    sets = [e.name for e in parts.evaluator.eval_sets if isinstance(e, AttackSet)]
    return {"malicious": list(malicious), "factors": factors, "sets": sets}


# -------------------------------------------------------------------------------------------------- rows
def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def attack_rows(evaluator, scores: dict, row: dict) -> dict:
    """The attack's entries of a row (module docstring); nothing for a run without malicious clients."""
    malicious = getattr(evaluator, "malicious_clients", None)
    if malicious is None:
        return {}
    benign = [cid for cid in range(len(evaluator.clients)) if cid not in malicious]
    out: dict = {"malicious_clients": list(malicious)}
    accuracy = _mean([scores.get(cid, {}).get("acc:test", math.nan) for cid in benign])
    if accuracy is not None:
        out["benign_acc"] = accuracy
    for attack_set in (e for e in evaluator.eval_sets if isinstance(e, AttackSet)):
        scored = evaluator.set_clients(attack_set)
        honest = [cid for cid in scored if cid not in malicious] or scored
        rate = _mean([scores.get(cid, {}).get(f"acc:set/{attack_set.name}", math.nan) for cid in honest])
        if rate is not None:
            out["attack_success_rate"] = rate
    return out


if attack_rows not in ROW_SUMMARIES:
    ROW_SUMMARIES.append(attack_rows)
