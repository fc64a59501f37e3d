"""Datasets, partitioners and few-shot sampling shared by every method.

The package exports its public names lazily (PEP 562): importing it, or one of its light modules (the core types in
:mod:`fedprompt.data.base`, the reader base class in :mod:`fedprompt.data.reader`), does not import torch, so the
command line builds its parser quickly. Modules by concept:

- :mod:`~fedprompt.data.base`: samples, dataset splits, client splits, evaluation sets, federated splits;
- :mod:`~fedprompt.data.reader`: :class:`FederatedData` (the reader base class) and the shared protocol;
- readers: :mod:`~fedprompt.data.folders` (``DomainFolders``, ``SplitFolders``), :mod:`~fedprompt.data.cifar`,
  :mod:`~fedprompt.data.synthetic`, :mod:`~fedprompt.data.coop` (the CoOp-format datasets),
  :mod:`~fedprompt.data.fedbn` (DomainNet, Office-Caltech10), :mod:`~fedprompt.data.domainbed` (PACS, VLCS,
  Office-Home in DomainBed's layout), :mod:`~fedprompt.data.imagenet` (ImageNet and its variants),
  :mod:`~fedprompt.data.combined` (several datasets), :mod:`~fedprompt.data.transfer` (train on one dataset, evaluate
  on others), :mod:`~fedprompt.data.lodo` (leave one domain out), :mod:`~fedprompt.data.longtail` (long-tailed
  train splits);
- :mod:`~fedprompt.data.scenarios`: the evaluation scenarios' sets (global, per domain) and the centralised split;
- :mod:`~fedprompt.data.partition` (client partitions, few-shot sampling), :mod:`~fedprompt.data.protocols`
  (base/novel, validation);
- images: :mod:`~fedprompt.data.check` (header checks), :mod:`~fedprompt.data.transforms`,
  :mod:`~fedprompt.data.images` (the torch dataset), :mod:`~fedprompt.data.store` (decoded images),
  :mod:`~fedprompt.data.cache` (image-tower features), :mod:`~fedprompt.data.augment` (device augmentation).
"""

from __future__ import annotations

import importlib

#: public name -> module that defines it
EXPORTS = {
    "ClientSplit": "base", "DatasetSplits": "base", "EvalSet": "base", "FederatedSplits": "base", "Sample": "base",
    "load_rgb": "base",
    "ImageDataset": "images",
    "DATA_ENV": "reader", "FederatedData": "reader",
    "DomainFolders": "folders", "SplitFolders": "folders", "stratified_split": "folders",
    "CIFAR": "cifar", "Synthetic": "synthetic",
    "IID": "partition", "ByDomain": "partition", "CrossClass": "partition", "Dirichlet": "partition",
    "Pachinko": "partition", "Partitioner": "partition", "Pathological": "partition", "count_table": "partition",
    "few_shot": "partition", "split_by_shares": "partition",
    "assign_validation": "protocols", "base_novel_split": "protocols", "official_pathological_shots": "protocols",
    "subsample_classes": "protocols", "validation_split": "protocols",
    "clip_transforms": "transforms",
    "Caltech101": "coop", "DTD": "coop", "EuroSAT": "coop", "FGVCAircraft": "coop", "Flowers102": "coop",
    "Food101": "coop", "OxfordPets": "coop", "StanfordCars": "coop", "SUN397": "coop", "UCF101": "coop",
    "DomainNet": "fedbn", "OfficeCaltech10": "fedbn",
    "PACS": "domainbed", "VLCS": "domainbed", "OfficeHome": "domainbed",
    "LeaveOneDomainOut": "lodo", "LongTailed": "longtail",
    "Combined": "combined", "Transfer": "transfer",
    "ImageNet": "imagenet", "ImageNetA": "imagenet", "ImageNetR": "imagenet", "ImageNetSketch": "imagenet",
    "ImageNetV2": "imagenet",
    "centralize": "scenarios", "domain_sets": "scenarios", "global_sets": "scenarios",
}

__all__ = sorted(EXPORTS)


def __getattr__(name: str):
    if name in EXPORTS:
        value = getattr(importlib.import_module(f"fedprompt.data.{EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedprompt.data' has no attribute {name!r}")


#: modules of the package that import torch (the torch dataset and the caches); the readers, partitioners and
#: protocols do not, so the command line imports them before it checks anything
TORCH_MODULES = ("images", "store", "cache", "augment")


def import_readers() -> None:
    """Import every reader and partitioner (so that short names such as ``--data Caltech101`` resolve), and
    nothing that loads torch."""
    for name, module in EXPORTS.items():
        if module not in TORCH_MODULES:
            __getattr__(name)
