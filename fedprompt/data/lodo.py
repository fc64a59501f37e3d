"""Leave-one-domain-out federated domain generalisation (:class:`LeaveOneDomainOut`): the clients hold every domain
of a multi-domain dataset but one, and the held-out domain is the test target.

This is the protocol of federated domain generalisation on PACS, VLCS, Office-Home and DomainNet (FedCLIP, TRIP,
PLAN, FedOT): each source domain is a client (or several, by a Dirichlet label draw inside the domain:
``ByDomain(clients_per_domain, alpha)``), the federation never sees an image of the target domain, and the score is
the accuracy on the target domain's images. One run holds out one domain; the paper table has one column per
held-out domain and their mean (``fedprompt table --columns domains``).
"""

from __future__ import annotations

from dataclasses import replace

from fedprompt.data.base import DatasetSplits, EvalSet, FederatedSplits
from fedprompt.data.reader import FederatedData, federate
from fedprompt.errors import FedPromptError

#: the split name of the held-out domain's evaluation set
TARGET_SPLIT = "target"


class LeaveOneDomainOut(FederatedData):
    """Train on every domain of ``dataset`` except ``target``; evaluate on all of ``target``'s images.

    The source domains are federated exactly as ``dataset`` would be alone (its partition, default one client per
    domain; its shots, validation and seed; its per-(domain, class) train/test split, whose test part is each
    client's own test data, ``local_acc``). Every image of the target domain, train and test split alike, forms one
    evaluation set (split ``target``, never trained on), scored like a cross-dataset target: each client's prompt (one
    client when all hold the same model) on it. Metrics: ``target_acc`` (the mean over the clients scored) with its
    spread over clients (``target_acc_std``, ``_worst``, ``_worst10``) and ``target_ece``.

    Args:
        dataset: a multi-domain reader (``fedprompt.data.PACS``, ``VLCS``, ``OfficeHome``, ``DomainNet``,
            ``DomainFolders``) with its own ``partition``, ``num_shots``, ``validation`` and ``seed``.
        target: the held-out domain (a domain name of ``dataset``).
        seed: replaces the dataset's ``seed`` when set (``fedprompt sweep`` sets ``data.seed`` per seed).
    """

    def __init__(self, dataset: FederatedData, target: str, seed: int | None = None):
        if seed is not None:
            dataset.seed = seed
        super().__init__(seed=dataset.seed, num_workers=dataset.num_workers, num_shots=dataset.num_shots,
                         subsample_classes=dataset.subsample_classes, validation=dataset.validation)
        from fedprompt.data.combined import Combined
        from fedprompt.data.transfer import Transfer

        if isinstance(dataset, (Combined, Transfer, LeaveOneDomainOut)):
            raise FedPromptError(f"data.dataset: a {type(dataset).__name__} dataset cannot be nested in "
                                 "LeaveOneDomainOut; give a multi-domain reader (PACS, VLCS, OfficeHome, DomainNet).")
        if dataset.subsample_classes != "all":
            raise FedPromptError("data.dataset.subsample_classes must be 'all' with LeaveOneDomainOut: the target "
                                 "domain is scored on the classes the clients train on.")
        if not str(target).strip():
            raise FedPromptError("data.target is empty: name the held-out domain.")
        self.dataset = dataset
        self.target = target

    def read(self) -> DatasetSplits:
        """The whole dataset, every domain (what :meth:`setup` splits into sources and target)."""
        return self.dataset.read()

    def setup(self) -> FederatedSplits:
        """The source domains' federation with the target domain as one evaluation set."""
        raw, bad = self.dataset.read_checked()
        source, held_out = split_off_domain(raw, self.target)
        name = raw.name or "data"
        partition = self.dataset.partition or self.dataset.default_partition()
        splits = federate(source, partition, self.num_shots, self.seed, "all", self.validation, dataset=name)
        target = EvalSet(f"{name}/{TARGET_SPLIT}/{self.target}", list(raw.classnames), held_out, TARGET_SPLIT, name,
                         seen=False, domain=self.target)
        return replace(splits, eval_sets=list(splits.eval_sets) + [target], bad_images=bad)


def split_off_domain(raw: DatasetSplits, target: str) -> tuple[DatasetSplits, list]:
    """``raw`` without the domain ``target`` (train, validation and test), and every sample of ``target``."""
    domains = list(dict.fromkeys(s.domain for s in raw.train + raw.val + raw.test))
    if target not in domains:
        shown = ", ".join(d for d in domains if d) or "none (single-domain data)"
        raise FedPromptError(f"data.target: {target!r} is not a domain of {raw.name or 'the dataset'}; its domains: "
                             f"{shown}.")
    if len(domains) < 2:
        raise FedPromptError(f"data.target: {raw.name or 'the dataset'} has one domain, so holding it out leaves no "
                             "source domain; use multi-domain data.")
    held_out = [s for s in raw.train + raw.val + raw.test if s.domain == target]
    keep = {part: [s for s in getattr(raw, part) if s.domain != target] for part in ("train", "val", "test")}
    return replace(raw, **keep), held_out
