"""Federated prompt-learning methods, one file each. A config selects one with ``class_path``.

:class:`Method`, :class:`TrainedMethod` and :class:`OptimizerArgs` are imported at once (they need neither Lightning nor open_clip); the
method classes and their client modules are imported on first use (PEP 562), so that ``fedprompt --help`` and
argument errors do not wait for Lightning. :func:`import_all` imports every method (the command line does this
before parsing anything but a help request, so that short names such as ``--method FedOTP`` resolve).
"""

from __future__ import annotations

import importlib

from fedprompt.methods.method import Method, OptimizerArgs, TrainedMethod

#: public name -> module that defines it
REGISTRY = {
    "PromptClient": "base", "GlobalLocalClient": "base",
    "CoCoOp": "cocoop", "CoCoOpClient": "cocoop",
    "CoOpClient": "coop", "FedPer": "coop", "FedProx": "coop", "LocalCoOp": "coop", "PromptFL": "coop",
    "DeepPromptClient": "deep", "IVLP": "deep", "IVLPClient": "deep", "MaPLe": "deep", "MaPLeClient": "deep",
    "VPT": "deep", "VPTClient": "deep",
    "DPFPL": "dpfpl", "DPFPLClient": "dpfpl",
    "FedAPT": "fedapt", "FedAPTClient": "fedapt",
    "FedMGP": "fedmgp", "FedMGPAggregator": "fedmgp", "FedMGPClient": "fedmgp",
    "FedCLIP": "fedclip", "FedCLIPClient": "fedclip",
    "FedLoRA": "fedlora", "FedLoRAClient": "fedlora",
    "FedMVP": "fedmvp", "FedMVPClient": "fedmvp",
    "FedOTP": "fedotp", "FedOTPClient": "fedotp",
    "FedPGP": "fedpgp", "FedPGPClient": "fedpgp",
    "FedPHA": "fedpha", "FedPHAClient": "fedpha",
    "FOCoOp": "focoop", "FOCoOpClient": "focoop", "FOCoOpServer": "focoop",
    "FedTPG": "fedtpg", "FedTPGClient": "fedtpg",
    "KgCoOp": "kgcoop", "KgCoOpClient": "kgcoop",
    "PLOT": "plot", "PLOTClient": "plot",
    "ProDA": "proda", "ProDAClient": "proda",
    "ProGrad": "prograd", "ProGradClient": "prograd",
    "PFedMMA": "pfedmma", "PFedMMAClient": "pfedmma",
    "PFedMoAP": "pfedmoap", "PFedMoAPClient": "pfedmoap", "MixtureOfPromptsServer": "pfedmoap",
    "PromptFolio": "promptfolio", "PromptFolioClient": "promptfolio",
    "GPAAggregator": "promptsrc", "PromptSRC": "promptsrc", "PromptSRCClient": "promptsrc",
    "TunedClient": "tuned",
    "ZeroShot": "zeroshot",
}

#: the methods a config can select (short names)
METHODS = tuple(sorted(name for name in REGISTRY
                       if name != "PromptClient" and not name.endswith(("Client", "Aggregator", "Server"))))

__all__ = sorted(["METHODS", "Method", "OptimizerArgs", "REGISTRY", "TrainedMethod", "import_all", *REGISTRY])


def __getattr__(name: str):
    if name in REGISTRY:
        value = getattr(importlib.import_module(f"fedprompt.methods.{REGISTRY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedprompt.methods' has no attribute {name!r}")


def import_all() -> None:
    """Import every method module (so that every :class:`Method` subclass is known by its short name)."""
    for name in REGISTRY:
        __getattr__(name)
