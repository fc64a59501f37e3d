"""Federated prompt-learning methods, one file each. A config selects one with ``class_path``."""

from fedprompt.methods.base import Method, OptimizerArgs, PromptClient
from fedprompt.methods.coop import CoOpClient, FedPer, FedProx, LocalCoOp, PromptFL
from fedprompt.methods.zeroshot import ZeroShot

__all__ = ["CoOpClient", "FedPer", "FedProx", "LocalCoOp", "Method", "OptimizerArgs", "PromptClient", "PromptFL",
           "ZeroShot"]
from fedprompt.methods.fedotp import FedOTP, FedOTPClient  # noqa: E402

__all__ += ["FedOTP", "FedOTPClient"]
from fedprompt.methods.fedtpg import FedTPG, FedTPGClient  # noqa: E402

__all__ += ["FedTPG", "FedTPGClient"]
from fedprompt.methods.fedmgp import FedMGP, FedMGPAggregator, FedMGPClient  # noqa: E402

__all__ += ["FedMGP", "FedMGPAggregator", "FedMGPClient"]
