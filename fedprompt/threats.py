"""Settings of simulated threats and their defences: malicious clients (:class:`AttackArgs`, the ``attack`` group),
robust aggregation (:class:`RobustArgs`, the ``robust`` group) and the membership-inference audit of a finished run
(:class:`AuditArgs`, ``fedprompt audit``'s own options). Attribute docstrings become the ``--help`` text.

Plain Python (no torch): the command line builds its parser and checks the ranges here before anything heavy loads.
The mechanisms are :mod:`fedprompt.federation.attacks`, :mod:`fedprompt.federation.robust` and
:mod:`fedprompt.audit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from fedprompt.args import check_ranges
from fedprompt.errors import FedPromptError

#: the attacks of ``attack.kind`` (``none``: every client is honest)
ATTACK_KINDS = ("none", "label_flip", "backdoor", "scale", "sign_flip")
#: the attacks that change what a malicious client trains on (the others change what it sends)
DATA_ATTACKS = ("label_flip", "backdoor")
#: the rules of ``robust.rule``
ROBUST_RULES = ("none", "median", "trimmed_mean", "krum")


@dataclass
class AttackArgs:
    """Malicious clients (a simulated attack), off unless attack.kind is set. A fraction of the clients, chosen from
    the run seed alone (the same on every process and every Flower node), is malicious in every round it is sampled:
    label_flip trains on labels y -> C - 1 - y; backdoor trains on images with a trigger patch (a black-and-white
    checkerboard at the bottom right of the central square) relabelled as target_class, for a poison_fraction of its
    train images; scale sends its honest update times scale; sign_flip sends minus scale times it. Every attack's
    update is multiplied by scale (backdoor with scale > 1 is model replacement). Rows report benign_acc (the honest
    clients' mean local accuracy) and, for label_flip and backdoor, attack_success_rate (triggered non-target test
    images classified as the target, or test images classified as their flipped label) beside the clean
    accuracies."""

    kind: Literal["none", "label_flip", "backdoor", "scale", "sign_flip"] = "none"
    """none, label_flip, backdoor (data poisoning), scale or sign_flip (update manipulation)."""
    fraction: float = 0.25
    """Fraction of the clients that are malicious: floor(fraction x clients) of them, at least one."""
    scale: float = 1.0
    """The factor lambda applied to a malicious client's update of the shared state (upload minus its state before
    local training): lambda x update (minus lambda x update for sign_flip). Needs a value other than 1 with kind
    scale."""
    target_class: int = 0
    """backdoor: the class the trigger should produce (an index into the class list)."""
    poison_fraction: float = 0.5
    """backdoor: the fraction of a malicious client's train images (of other classes than the target) that carry
    the trigger and the target label."""
    trigger_size: float = 0.1
    """backdoor: the trigger's side as a fraction of the image's shorter side."""

    def __post_init__(self):
        if self.kind not in ATTACK_KINDS:
            raise FedPromptError(f"--attack.kind must be one of {', '.join(ATTACK_KINDS)}, got {self.kind!r}.")
        check_ranges("attack", self, fraction=(0, 1, "open"), scale=(0, None, "open"), target_class=(0, None),
                     poison_fraction=(0, 1, "open"), trigger_size=(0, 0.5, "open"))
        if self.kind == "scale" and self.scale == 1:
            raise FedPromptError("--attack.kind scale sends the honest update times --attack.scale, which is 1: set "
                                 "--attack.scale (e.g. 10) or another attack.kind.")

    @property
    def enabled(self) -> bool:
        """Whether any client is malicious."""
        return self.kind != "none"


@dataclass
class RobustArgs:
    """Robust aggregation, off unless robust.rule or robust.norm_bound is set: the server merges the uploads with a
    rule that tolerates malicious clients instead of the method's mean (Flower's aggregation functions:
    coordinate-wise median, trimmed mean, Krum / multi-Krum), after bounding each update's L2 norm (norm_bound).
    median and trimmed_mean replace a mean of the uploads (unweighted, as Flower's); krum picks the keep uploads
    with the smallest Krum scores and hands only them to the method's own rule, so it works for every rule that sees
    single uploads. Not with secure aggregation (the server sees only the sum), and median, trimmed_mean and krum not
    with client-level DP (its noise is calibrated to the clipped mean)."""

    rule: Literal["none", "median", "trimmed_mean", "krum"] = "none"
    """none (the method's rule), median, trimmed_mean or krum."""
    trim: float = 0.25
    """trimmed_mean: the fraction of the uploads cut at each end, per coordinate (int(trim x uploads) of them)."""
    malicious: int = 1
    """krum: f, the number of malicious uploads per round the rule must tolerate (scores sum the squared distances
    to the n - f - 2 nearest other uploads)."""
    keep: int = 1
    """krum: the uploads kept per round (1: Krum; more: multi-Krum, the method's rule over the kept ones)."""
    norm_bound: Optional[float] = None
    """Bound every upload's update (upload minus the round's global state, flat L2 over the shared tensors) to this
    norm before the rule (Sun et al. 2019's norm bounding); null: no bound."""

    def __post_init__(self):
        if self.rule not in ROBUST_RULES:
            raise FedPromptError(f"--robust.rule must be one of {', '.join(ROBUST_RULES)}, got {self.rule!r}.")
        check_ranges("robust", self, malicious=(0, None), keep=(1, None), norm_bound=(0, None, "open"))
        trim = self.trim
        if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0 <= trim < 0.5:
            raise FedPromptError(f"--robust.trim must be in [0, 0.5), got {trim!r}.")
        if self.rule in ("median", "trimmed_mean"):
            import importlib.util

            if importlib.util.find_spec("flwr") is None:
                raise FedPromptError(f"--robust.rule {self.rule} runs Flower's aggregation functions: pip install "
                                     "'fedprompt[flower]'.")

    @property
    def enabled(self) -> bool:
        """Whether the server's merge differs from the method's own."""
        return self.rule != "none" or self.norm_bound is not None


@dataclass(kw_only=True)
class AuditArgs:
    """``fedprompt audit``'s own options.

    The run settings come from RUN_DIR/hyperparameters.yaml; flags override them (--data.root or
    --backbone.pretrained where the files moved)."""

    run_dir: list[str] = field(default_factory=list)
    """The finished run to audit (a fedprompt fit run directory with checkpoints/last.ckpt)."""
    shadows: int = 8
    """Shadow federations for the likelihood-ratio attack (LiRA), each trained by the run's method on its protocol
    from a random half of every client's audit examples (every example is in exactly half of them); 0: the loss
    attack only."""
    variance: Literal["global", "per_example"] = "global"
    """LiRA's Gaussians: one variance pooled over all examples (global: Carlini et al.'s choice below 64 shadows)
    or each example's own (per_example: needs 4 shadows or more)."""
    audit_seed: int = 0
    """Seed of the non-member sample and of the shadows' halves, sampling and data order."""

    #: option fields given as positional arguments on the command line, with their help
    positional: ClassVar[dict[str, str]] = {"run_dir": "the run directory to audit (fedprompt fit's out_dir)"}

    def __post_init__(self):
        check_ranges("", self, shadows=(0, None), audit_seed=(0, 2**32 - 1))
        if self.variance not in ("global", "per_example"):
            raise FedPromptError(f"--variance must be global or per_example, got {self.variance!r}.")
        if len(self.run_dir) != 1:
            raise FedPromptError(f"fedprompt audit takes one RUN_DIR, got {len(self.run_dir)}: "
                                 f"{' '.join(self.run_dir) or '(none)'}.")
        if self.shadows == 1:
            raise FedPromptError("--shadows 1: LiRA needs shadows in which an example is in and others in which it is "
                                 "out: use 2 or more (0: the loss attack only).")
        if self.variance == "per_example" and 0 < self.shadows < 4:
            raise FedPromptError(f"--variance per_example fits each example's own variance from its in and out "
                                 f"shadows, which needs --shadows 4 or more (got {self.shadows}); use --variance "
                                 "global.")
