"""Federated prompt-learning methods, one file each. A config selects one with ``class_path``."""

from fedprompt.methods.base import Method, OptimizerArgs, PromptClient
from fedprompt.methods.coop import CoOpClient, FedPer, FedProx, LocalCoOp, PromptFL
from fedprompt.methods.fedmgp import FedMGP, FedMGPAggregator, FedMGPClient
from fedprompt.methods.fedotp import FedOTP, FedOTPClient
from fedprompt.methods.fedpgp import FedPGP, FedPGPClient
from fedprompt.methods.fedtpg import FedTPG, FedTPGClient
from fedprompt.methods.promptfolio import PromptFolio, PromptFolioClient
from fedprompt.methods.zeroshot import ZeroShot

__all__ = ["CoOpClient", "FedMGP", "FedMGPAggregator", "FedMGPClient", "FedOTP", "FedOTPClient", "FedPGP",
           "FedPGPClient", "FedPer", "FedProx", "FedTPG", "FedTPGClient", "LocalCoOp", "Method", "OptimizerArgs",
           "PromptClient", "PromptFL", "PromptFolio", "PromptFolioClient", "ZeroShot"]
