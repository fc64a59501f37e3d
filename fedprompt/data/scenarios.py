"""The data side of the evaluation scenarios and of the centralised bound (pure functions of the federated splits).

- :func:`global_sets`: ``eval.mode: global`` / ``dual``: each training dataset's whole test split among its training
  classes, scored with the aggregated prompt (FLiP's ``global``).
- :func:`domain_sets`: ``eval.domains``: that split cut by domain (FLiP's and FedMGP's multi-domain DomainNet: every
  domain's test set).
- :func:`ood_sets`: ``eval.ood``: out-of-distribution images (held-out classes, or another dataset) for OOD
  detection.
- :func:`centralize`: ``federation.central``: every client's training data pooled into one client (the centralised
  upper bound).

The personal view (``eval.mode: personal``, the default) needs nothing here: each client's test set is cut from the
reader's test split by the partitioner with the client's train label proportions (Dirichlet, IID, ByDomain) or is
every test image of its classes (Pathological), so it is disjoint from the client's training images by construction
(FLiP draws its personal sets from the train folder and about k/N_c of them are training images; spec 7.1).
"""

from __future__ import annotations

from dataclasses import replace

from fedprompt.data.base import ClientSplit, EvalSet, FederatedSplits, Sample
from fedprompt.errors import FedPromptError


def global_sets(splits: FederatedSplits) -> list[EvalSet]:
    """One ``<dataset>/global`` set (split ``global``) per training dataset: its whole test split among the classes
    it trains on (the dataset's ``all`` set, or its ``base`` set in a base-to-novel split)."""
    out, done = [], set()
    for item in splits.eval_sets:
        if item.seen and item.dataset not in done:
            done.add(item.dataset)
            out.append(replace(item, name=f"{item.dataset}/global", split="global"))
    return out


def domain_sets(sets: list[EvalSet]) -> list[EvalSet]:
    """Each of ``sets`` cut by the domain of its samples: ``<dataset>/domain/<domain>`` (split ``domain``), for every
    set with at least two domains; none is an error (the data has one domain)."""
    out = []
    for item in sets:
        by_domain: dict[str, list[Sample]] = {}
        for sample in item.samples:
            by_domain.setdefault(sample.domain, []).append(sample)
        if len(by_domain) < 2:
            continue
        out.extend(EvalSet(f"{item.dataset}/domain/{domain}", list(item.classnames), samples, "domain", item.dataset,
                           domain=domain) for domain, samples in by_domain.items())
    if not out:
        raise FedPromptError("eval.domains: the test data has a single domain, so there is no per-domain test set; "
                             "use multi-domain data (DomainNet, Office-Caltech10, PACS as DomainFolders) or set "
                             "eval.domains false.")
    return out


def ood_sets(splits: FederatedSplits, names: list[str]) -> list[EvalSet]:
    """The out-of-distribution sets ``names`` (``eval.ood``), each ``ood/<name>`` (split ``ood``) of OOD images to
    be scored among the federation's classes: ``novel``, the test images of the held-out classes of a base/novel
    split; or an unseen dataset's name (a target of :class:`fedprompt.data.Transfer`), its test images. An unknown
    name is one error listing the known ones."""
    known: dict[str, list[Sample]] = {}
    seen = {e.dataset for e in splits.eval_sets if e.seen}
    novel = [e for e in splits.eval_sets if e.split == "novel" and e.seen]
    if len(novel) == 1 and len(seen) == 1:
        known["novel"] = novel[0].samples
    for item in splits.eval_sets:
        if not item.seen:
            known[item.dataset] = item.samples
    missing = [name for name in names if name not in known]
    if missing:
        hint = ("novel (the held-out classes of a base/novel split: data.subsample_classes base, one training "
                "dataset) or the name of a target of data: Transfer")
        raise FedPromptError(f"eval.ood: no OOD set {', '.join(map(repr, missing))}; known here: "
                             f"{sorted(known) or 'none'}. Name {hint}.")
    return [EvalSet(f"ood/{name}", list(splits.classnames), known[name], "ood", name, seen=False) for name in names]


def _unique(samples: list[Sample]) -> list[Sample]:
    return list(dict.fromkeys(samples))


def centralize(splits: FederatedSplits) -> FederatedSplits:
    """The centralised bound's split: one client (``central``) holding the union of every client's train, validation
    and test samples (each sample once). Clients with their own class lists cannot be pooled: an error."""
    own = [c.client_id for c in splits.clients if c.classnames is not None]
    if own:
        raise FedPromptError("federation.central: the clients have their own class lists (data: Combined or "
                             "partition: CrossClass), so their data cannot be pooled into one client; use a single "
                             "dataset with a shared class list.")
    clients = splits.clients
    pooled = {part: _unique([s for c in clients for s in getattr(c, part)]) for part in ("train", "test", "val")}
    union = ClientSplit(0, pooled["train"], pooled["test"], name="central", val=pooled["val"])
    return replace(splits, clients=[union])
