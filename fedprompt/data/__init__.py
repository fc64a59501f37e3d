"""Datasets, partitioners and few-shot sampling shared by every method."""

from fedprompt.data.base import ClientSplit, DatasetSplits, ImageDataset, Sample, load_rgb
from fedprompt.data.datasets import (CIFAR, DATA_ENV, DomainFolders, FederatedData, FederatedSplits, SplitFolders,
                                     Synthetic, stratified_split)
from fedprompt.data.partition import (IID, ByDomain, Dirichlet, Partitioner, Pathological, count_table, few_shot,
                                      split_by_shares)
from fedprompt.data.transforms import clip_transforms

__all__ = ["CIFAR", "DATA_ENV", "IID", "ByDomain", "ClientSplit", "DatasetSplits", "Dirichlet", "DomainFolders",
           "FederatedData", "FederatedSplits", "ImageDataset", "Partitioner", "Pathological", "Sample",
           "SplitFolders", "Synthetic", "clip_transforms", "count_table", "few_shot", "load_rgb", "split_by_shares",
           "stratified_split"]

# CoOp-layout readers, FedBN feature-shift readers, protocols (issue #3)
from fedprompt.data.coop import (DTD, SUN397, UCF101, Caltech101, EuroSAT, FGVCAircraft, Flowers102, Food101,  # noqa: E402
                                 OxfordPets, StanfordCars)
from fedprompt.data.fedbn import DomainNet, OfficeCaltech10  # noqa: E402
from fedprompt.data.partition import Pachinko  # noqa: E402
from fedprompt.data.protocols import (assign_validation, base_novel_split, official_pathological_shots,  # noqa: E402
                                      subsample_classes, validation_split)

__all__ += ["Caltech101", "DTD", "DomainNet", "EuroSAT", "FGVCAircraft", "Flowers102", "Food101", "OfficeCaltech10",
            "OxfordPets", "Pachinko", "StanfordCars", "SUN397", "UCF101", "assign_validation", "base_novel_split",
            "official_pathological_shots", "subsample_classes", "validation_split"]

# multi-dataset federations, per-client class lists and evaluation sets (issue #12)
from fedprompt.data.combined import Combined  # noqa: E402
from fedprompt.data.datasets import EvalSet  # noqa: E402
from fedprompt.data.partition import CrossClass  # noqa: E402

__all__ += ["Combined", "CrossClass", "EvalSet"]
