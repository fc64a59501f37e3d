"""Federated prompt-learning methods, one file each. A config selects one with ``class_path``."""

from fedprompt.methods.base import Method, OptimizerArgs, PromptClient
from fedprompt.methods.coop import CoOpClient, FedPer, FedProx, LocalCoOp, PromptFL
from fedprompt.methods.zeroshot import ZeroShot

__all__ = ["CoOpClient", "FedPer", "FedProx", "LocalCoOp", "Method", "OptimizerArgs", "PromptClient", "PromptFL",
           "ZeroShot"]
from fedprompt.methods.fedotp import FedOTP, FedOTPClient  # noqa: E402

__all__ += ["FedOTP", "FedOTPClient"]
from fedprompt.methods.fedpgp import FedPGP, FedPGPClient  # noqa: E402
from fedprompt.methods.promptfolio import PromptFolio, PromptFolioClient  # noqa: E402

__all__ += ["FedPGP", "FedPGPClient", "PromptFolio", "PromptFolioClient"]
