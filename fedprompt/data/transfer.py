"""Train on one dataset, evaluate on others (:class:`Transfer`): CoOp's cross-dataset and cross-domain protocols.

The federation is exactly the one ``source.setup()`` gives (its partition, shots, base/novel split, validation);
each dataset in ``targets`` is read for its test images only and becomes an evaluation set of its own class list
(:class:`~fedprompt.data.EvalSet`, ``seen=False``, split ``all``). Every method scores them the way the round loop
scores any evaluation set: each client's prompts (one client when all hold the same model) rebuilt on the target's
class names, so ImageNet-A and -R are scored 200-way and Caltech101 101-way. The metrics rows carry
``unseen/<target>`` for each target and ``unseen_acc``, their mean.

- cross-dataset (CoOp/CoCoOp, FedTPG ``cross_data``): ImageNet -> Caltech101, OxfordPets, StanfordCars,
  Flowers102, Food101, FGVCAircraft, SUN397, DTD, EuroSAT, UCF101;
- cross-domain: ImageNet -> ImageNet-V2, ImageNet-Sketch, ImageNet-A, ImageNet-R.

Each target's test images are checked (headers) like any reader's images; a target that cannot be read (a missing
class list or split file, a wrong folder count) is named with its place in the config, all of them in one message.
"""

from __future__ import annotations

from dataclasses import replace

from fedprompt.data.base import DatasetSplits, EvalSet, FederatedSplits, load_rgb
from fedprompt.data.check import bad_images_message, scan_images
from fedprompt.data.combined import (ROUTE_PREFIX, ROUTE_SEP, RoutedLoader, check_given_names, default_name,
                                     route_index, unique_names)
from fedprompt.data.reader import FederatedData
from fedprompt.errors import FedPromptError, warn


def _tagged(raw: DatasetSplits, index: int, source_loader) -> DatasetSplits:
    """``raw``'s test samples routed to its own loader (:class:`RoutedLoader`), unless it and the source both read
    image files."""
    if raw.loader is load_rgb and source_loader is load_rgb:
        return raw
    test = [replace(s, path=f"{ROUTE_PREFIX}{index}{ROUTE_SEP}{s.path}") for s in raw.test]
    return replace(raw, test=test, train=[], val=[])


class Transfer(FederatedData):
    """Train on ``source`` (its own protocol: partition, shots, seed), evaluate on each of ``targets`` with its own
    class list (cross-dataset and cross-domain generalisation).

    ``FederatedSplits`` are those of ``source.setup()`` plus one ``<target>/all`` evaluation set (``seen: false``)
    per target: every test image of the target among all its classes. Metrics: ``unseen/<target>`` per target and
    ``unseen_acc`` (their mean); the source is scored as usual (``local_acc``; with ``eval.mode: global`` or
    ``dual`` the aggregated prompt on the source's whole test split, ``global_acc``).

    Args:
        source: the training dataset, a ``class_path`` entry (``fedprompt.data.ImageNet``) with its own
            ``num_shots``, ``partition``, ``seed``, ``subsample_classes``, ``validation``.
        targets: the evaluation datasets, each a ``class_path`` entry (``fedprompt.data.Caltech101``,
            ``fedprompt.data.ImageNetA``, ...); only their test images are used.
        names: a name per target (the metric keys ``unseen/<name>``); default each reader's dataset name, made
            unique with ``-2``, ``-3``.
        seed: replaces the source's ``seed`` when set (``fedprompt sweep`` sets ``data.seed`` per seed).
    """

    def __init__(self, source: FederatedData, targets: list[FederatedData], names: list[str] | None = None,
                 seed: int | None = None):
        if seed is not None:
            source.seed = seed
        super().__init__(seed=source.seed, num_workers=source.num_workers, num_shots=source.num_shots,
                         subsample_classes=source.subsample_classes, validation=source.validation)
        from fedprompt.data.combined import Combined

        if not targets:
            raise FedPromptError("data.targets is empty: list at least one dataset to evaluate on (class_path "
                                 "entries).")
        for where, reader in [("data.source", source)] + [(f"data.targets[{i}]", t) for i, t in enumerate(targets)]:
            if isinstance(reader, (Combined, Transfer)):
                raise FedPromptError(f"{where}: a {type(reader).__name__} dataset cannot be nested in Transfer; "
                                     "give a single dataset.")
        check_given_names(names, len(targets), "targets")
        self.source = source
        self.targets = list(targets)
        self.names = names

    def read(self) -> DatasetSplits:
        """The source's splits (what :meth:`setup` federates)."""
        return self.source.read()

    def _read_target(self, index: int) -> tuple[DatasetSplits, list[tuple[str, str]]]:
        """Target ``index``'s test split (its images' headers checked under its own ``on_bad_image``)."""
        reader = self.targets[index]
        raw = reader.read()
        if not raw.test:
            raise FedPromptError(f"{type(reader).__name__} has no test images to evaluate on.")
        if not reader.check_images or raw.loader is not load_rgb:
            return raw, []
        bad = scan_images(raw.test)
        if bad and reader.on_bad_image == "error":
            raise FedPromptError(bad_images_message(bad))
        if bad:
            skip = {path for path, _ in bad}
            warn(f"data.targets[{index}]: left out {len(bad)} unreadable image file(s) (on_bad_image: skip).")
            raw = replace(raw, test=[s for s in raw.test if s.path not in skip])
        return raw, bad

    def setup(self) -> FederatedSplits:
        """The source's federation with one evaluation set per target."""
        try:
            splits = self.source.setup()
        except FedPromptError as err:
            raise FedPromptError(f"data.source ({type(self.source).__name__}): {err}") from None
        raws, bad, problems = [], list(splits.bad_images), []
        for i, reader in enumerate(self.targets):
            try:
                raw, left_out = self._read_target(i)
            except FedPromptError as err:
                problems.append(f"data.targets[{i}] ({type(reader).__name__}): {err}")
                continue
            raws.append((i, raw))
            bad.extend(left_out)
        if problems:
            head = "" if len(problems) == 1 else f"{len(problems)} of {len(self.targets)} targets cannot be read: "
            raise FedPromptError(head + " | ".join(problems))
        names = self.names or unique_names([default_name(raw, self.targets[i]) for i, raw in raws])
        tagged = [(i, _tagged(raw, i + 1, splits.loader)) for i, raw in raws]
        sets = [EvalSet(f"{name}/all", list(raw.classnames), raw.test, "all", name, seen=False)
                for name, (_, raw) in zip(names, tagged)]
        routed = {i + 1: raw.loader for i, raw in tagged if raw.test and route_index(raw.test[0].path) == i + 1}
        source = splits.source
        if routed:
            source = replace(source, loader=RoutedLoader(routed, default=splits.loader))
        return replace(splits, source=source, eval_sets=list(splits.eval_sets) + sets, bad_images=bad)
