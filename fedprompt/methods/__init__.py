"""Federated prompt-learning methods, one file each. A config selects one with ``class_path``.

:class:`Method` and :class:`OptimizerArgs` are imported at once (they need neither Lightning nor open_clip); the
method classes and their client modules are imported on first use (PEP 562), so that ``fedprompt --help`` and
argument errors do not wait for Lightning. :func:`import_all` imports every method (the command line does this
before parsing anything but a help request, so that short names such as ``--method FedOTP`` resolve).
"""

from __future__ import annotations

import importlib

from fedprompt.methods.method import Method, OptimizerArgs

#: public name -> module that defines it
_WHERE = {
    "PromptClient": "base",
    "CoOpClient": "coop", "FedPer": "coop", "FedProx": "coop", "LocalCoOp": "coop", "PromptFL": "coop",
    "FedMGP": "fedmgp", "FedMGPAggregator": "fedmgp", "FedMGPClient": "fedmgp",
    "FedOTP": "fedotp", "FedOTPClient": "fedotp",
    "FedPGP": "fedpgp", "FedPGPClient": "fedpgp",
    "FedTPG": "fedtpg", "FedTPGClient": "fedtpg",
    "PromptFolio": "promptfolio", "PromptFolioClient": "promptfolio",
    "ZeroShot": "zeroshot",
}

__all__ = sorted(["Method", "OptimizerArgs", "import_all", *_WHERE])


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"fedprompt.methods.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedprompt.methods' has no attribute {name!r}")


def import_all() -> None:
    """Import every method module (so that every :class:`Method` subclass is known by its short name)."""
    for name in _WHERE:
        __getattr__(name)
