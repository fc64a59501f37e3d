"""The config side of a method: :class:`Method` (what a YAML selects with ``class_path``), the local optimiser
settings :class:`OptimizerArgs`, and :class:`TrainedMethod`, the base of every method that trains prompts.

A method's settings are declared once, as the fields of its dataclass: they are its ``--method.*`` flags (the field
docstrings are their ``--help``), its YAML ``init_args``, and what its client module reads (``client.settings``).
The optimiser settings are one group of fields that every trained method inherits from :class:`OptimizerArgs`, in
the flat form (``--method.lr 0.01``, ``--method.lr_schedule cosine``); ``method.optim`` gives them as one
:class:`OptimizerArgs`.

This module imports neither Lightning nor open_clip, so the command line can build its parser (``--help``, argument
errors) without them; the client modules (:mod:`fedprompt.methods.base`) are imported when a method builds one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, ClassVar, Literal, Optional

from fedprompt.errors import FedPromptError, warn

if TYPE_CHECKING:
    from fedprompt.backbone import Backbone
    from fedprompt.federation.aggregators import Aggregator
    from fedprompt.federation.protocols import ClientModule


#: learning-rate schedules of the local optimiser
LR_SCHEDULES = ("constant", "cosine")
#: what one cosine schedule spans (see :class:`OptimizerArgs`)
LR_SCOPES = ("local", "official", "client")


def dassl_cosine_lr(epoch: int, lr: float, cosine_epochs: float, warmup_epochs: int = 0,
                    warmup_lr: float = 1e-5) -> float:
    """The learning rate of (0-based) epoch ``epoch`` under Dassl's ``cosine`` scheduler with constant warm-up.

    Dassl (``build_lr_scheduler`` with ``LR_SCHEDULER: cosine``, ``WARMUP_TYPE: constant``, ``WARMUP_RECOUNT``
    True) runs ``warmup_epochs`` epochs at ``warmup_lr``, then hands over to ``CosineAnnealingLR(T_max =
    cosine_epochs)`` (``MAX_EPOCH``) started at that hand-over, stepped once per epoch, minimum 0:
    ``lr * (1 + cos(pi * t / cosine_epochs)) / 2`` with ``t = epoch - warmup_epochs``. Past ``cosine_epochs`` the
    torch scheduler keeps following the same cosine (back up to ``lr`` at ``2 * cosine_epochs``), and so does this.
    """
    if epoch < warmup_epochs:
        return warmup_lr
    t = epoch - warmup_epochs
    return lr * (1.0 + math.cos(math.pi * t / cosine_epochs)) / 2.0


@dataclass(kw_only=True, eq=False)
class OptimizerArgs:
    """Local optimiser settings (Dassl defaults: SGD, momentum 0.9, weight decay 5e-4, constant learning rate).

    ``lr_schedule: cosine`` is Dassl's cosine schedule with a constant warm-up (PromptFL's and PromptFolio's
    configs: ``warmup_epochs`` 1 at ``warmup_lr`` 1e-5, then ``CosineAnnealingLR`` over ``MAX_EPOCH`` = the local
    epochs), stepped once per local epoch (:func:`dassl_cosine_lr`). What one schedule spans (``lr_scope``):

    - ``local`` (default): every client's local round is one schedule, restarted each round, as if each client
      had its own fresh trainer (fedprompt also gives each client a fresh optimizer every round). With 5 local
      epochs: 1e-5, lr, 0.905 lr, 0.655 lr, 0.345 lr.
    - ``official``: the released PromptFL / PromptFolio code. ONE Dassl trainer, and so one scheduler, serves every
      client of the run; it is stepped after every local epoch of every client, one client after another, and
      never reset. The warm-up therefore happens once (the first client of round 1), and the schedule position of
      a client's local epoch is the number of local epochs trained before it in the whole run (earlier rounds, and
      clients listed before it in this round's sample). With T_max = the local epochs the cosine cycles every
      2 x local epochs counted over all clients, so clients of one round train with different learning rates
      depending on their place in the order. fedprompt lists a round's clients by increasing id (the released
      code trains them in ``np.random.choice`` order).
    - ``client``: the released FedTPG code. Every client owns one scheduler for the whole run, stepped after each
      of its own local epochs and never reset: the schedule position of a client's local epoch is the number of
      local epochs that client trained in earlier rounds. With ``cosine_epochs`` = the rounds and one local epoch
      (FedTPG's cross_cls: T_max 500) the rate falls from ``lr`` in round 1 to about 0 in the last round.
    """

    lr: float = 0.002
    """Local SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule: constant, or Dassl's cosine with a constant warm-up (stepped once per local epoch)."""
    warmup_epochs: int = 0
    """Cosine only: epochs at warmup_lr before the cosine starts (Dassl's WARMUP_EPOCH)."""
    warmup_lr: float = 1e-5
    """The constant warm-up learning rate (Dassl's WARMUP_CONS_LR)."""
    lr_scope: Literal["local", "official", "client"] = "local"
    """What one cosine schedule spans: each client's local round (local), one schedule for the whole run shared by
    all clients in training order (official: the released PromptFL / PromptFolio trainer), or one per client over
    the run (client: the released FedTPG code)."""
    cosine_epochs: Optional[int] = None
    """The cosine's period parameter T_max in epochs (Dassl's MAX_EPOCH); null: the client's local epochs of the
    round (as in the official configs)."""

    def __post_init__(self):
        check_optimizer(self)

    @property
    def counts_run_epochs(self) -> bool:
        """Whether :meth:`lr_at` needs ``epochs_before`` (a schedule that runs over the whole run)."""
        return self.lr_schedule != "constant" and self.lr_scope != "local"

    def lr_at(self, step: int, total_steps: int, epoch_steps: int = 0, epochs_before: int = 0) -> float:
        """The learning rate of local step ``step`` (0-based) of a client that takes ``total_steps`` this round.

        Args:
            step: the local step.
            total_steps: the client's local steps this round.
            epoch_steps: steps of one pass over the client's train data (0: the whole local round is one epoch).
            epochs_before: local epochs before this local round on the schedule: ``official`` scope, trained by
                any client; ``client`` scope, trained by this client (ignored by the ``local`` scope).
        """
        if self.lr_schedule == "constant":
            return self.lr
        per_epoch = epoch_steps if epoch_steps > 0 else max(total_steps, 1)
        local_epochs = max(1, math.ceil(total_steps / per_epoch))
        epoch = step // per_epoch
        if self.lr_scope != "local":
            epoch += epochs_before
        return dassl_cosine_lr(epoch, self.lr, self.cosine_epochs or local_epochs, self.warmup_epochs,
                               self.warmup_lr)


def check_optimizer(args) -> None:
    """Range-check the optimiser fields of ``args`` (an :class:`OptimizerArgs` or a :class:`TrainedMethod`): one
    :class:`FedPromptError` naming each bad setting."""
    problems = []
    if not args.lr > 0:
        problems.append(f"method.lr must be > 0, got {args.lr}")
    if not 0 <= args.momentum < 1:
        problems.append(f"method.momentum must be in [0, 1), got {args.momentum}")
    if not args.weight_decay >= 0:
        problems.append(f"method.weight_decay must be >= 0, got {args.weight_decay}")
    if problems:
        raise FedPromptError("; ".join(problems) + ".")
    if args.lr_schedule not in LR_SCHEDULES:
        raise FedPromptError(f"method.lr_schedule: unknown schedule {args.lr_schedule!r}; choose one of "
                             f"{', '.join(LR_SCHEDULES)}.")
    if args.lr_scope not in LR_SCOPES:
        raise FedPromptError(f"method.lr_scope: unknown scope {args.lr_scope!r}; choose one of "
                             f"{', '.join(LR_SCOPES)}.")
    if args.warmup_epochs < 0 or args.warmup_lr < 0:
        raise FedPromptError(f"method.warmup_epochs and method.warmup_lr must be >= 0, got "
                             f"{args.warmup_epochs} and {args.warmup_lr}")
    if args.cosine_epochs is not None and args.cosine_epochs < 1:
        raise FedPromptError(f"method.cosine_epochs must be >= 1 (or null: the local epochs), got "
                             f"{args.cosine_epochs}")


@dataclass(kw_only=True, eq=False)
class Method:
    """Base class of a federated prompt-learning method (selected in a config with ``class_path``).

    A method is a dataclass: its fields are its settings, declared once (they are the ``--method.*`` flags, the
    YAML ``init_args`` and what its client reads as ``client.settings``). :meth:`check` range-checks them when the
    method is built, which is when the command line is parsed.

    Class attributes say what the method does (declared capabilities; the round loop reads them, it never probes):
        ``client_class``: its client module (a :class:`fedprompt.methods.PromptClient` subclass);
        ``trains``: whether clients train at all (zero-shot CLIP does not);
        ``communicates``: whether clients talk to a server (local CoOp does not);
        ``global_model``: whether, after aggregation, every client holds the same model (then the accuracy on the
        union of the clients' test data is reported as ``global_acc``);
        ``shared_prefixes``: state-dict key prefixes sent to the server;
        ``image_inputs``: the frozen image outputs the client uses (what the feature cache stores);
        ``frozen_image_tower``: whether the image side is the frozen tower alone, so its outputs can be cached
        (False for methods with visual prompts);
        ``trains_in_turn``: a round's clients train one at a time, each after the previous one's upload reached the
        server (pFedMoAP under ``compat: official``): K = 1 on one process, under ``--runtime fabric`` only.
    """

    client_class: ClassVar[type] = None
    trains: ClassVar[bool] = True
    frozen_image_tower: ClassVar[bool] = True
    communicates: ClassVar[bool] = True
    global_model: ClassVar[bool] = True
    shared_prefixes: ClassVar[tuple[str, ...]] = ()
    #: frozen image-tower outputs the client reads: "features" (pooled) and/or "tokens" (patch tokens)
    image_inputs: ClassVar[tuple[str, ...]] = ("features",)
    #: the client's evaluation logits have columns of its own negative labels after the classes (FOCoOp's OOD
    #: prompts), which OOD detection's NegLabel reads
    own_negative_labels: ClassVar[bool] = False
    trains_in_turn: ClassVar[bool] = False

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Range-check the settings; raise one :class:`FedPromptError` naming the setting (``method.<name>``), its
        value and what it must be. Called when the method is built (at argument parsing)."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def build_client(self, backbone: Backbone, classnames: list[str], slots: int = 1) -> ClientModule:
        """Create this method's client module for ``slots`` clients (prompts initialised from the current torch
        seed, the same initial value in every slot), with the settings :meth:`for_backbone` gives."""
        if self.client_class is None:
            raise NotImplementedError(f"{self.name} declares no client_class")
        return self.client_class(backbone, classnames, self.for_backbone(backbone), slots)

    def derived_settings(self, backbone: Backbone) -> dict[str, tuple]:
        """The settings left null ("the official value where it fits") resolved for ``backbone``: name -> (value
        in use, official value, why they differ). None by default; a method whose official default cannot fit
        every backbone (a depth beyond a small tower's layers, a rank above the prompt's tokens) derives the nearest
        valid value here and keeps the official one wherever it fits."""
        return {}

    def for_backbone(self, backbone: Backbone) -> Method:
        """These settings with :meth:`derived_settings` filled in (``self`` when there are none); a derived value
        that differs from the official one is said once, in one warning line."""
        derived = self.derived_settings(backbone)
        if not derived:
            return self
        changed = {name: f"{name} {value}, not the official {official}: {why}"
                   for name, (value, official, why) in derived.items() if value != official}
        told = self.__dict__.setdefault("_told", set())
        message = (f"method {self.name}: " + "; ".join(changed.values())
                   + f" (set {', '.join('method.' + name for name in changed)} to choose).")
        if changed and message not in told:
            told.add(message)
            warn(message)
        return replace(self, **{name: value for name, (value, _, _) in derived.items()})

    def initial_client_state(self, client_id: int, state: dict) -> dict:
        """Client ``client_id``'s state before its first round, from the server's initialisation ``state`` (a fresh
        copy): ``state`` itself by default; FedPHA cuts each client's local prompt to the client's own length. Runs
        before anything is written, so a problem is one :class:`FedPromptError` line."""
        return state

    def prepare_data(self, splits, eval_sets: list) -> None:
        """Called once the data is read (``splits``: :class:`fedprompt.data.FederatedSplits`; ``eval_sets``: every
        :class:`fedprompt.data.EvalSet` the run scores), before any client module is built or anything is written:
        a method that reads side data per dataset or class list (FedMVP's class attributes) reads and checks it
        here, one :class:`FedPromptError` line for a problem. Nothing by default."""

    def build_aggregator(self) -> Aggregator:
        """The server's merge rule; sample-weighted mean of the shared keys by default."""
        from fedprompt.federation.aggregators import WeightedMean

        return WeightedMean(self.shared_prefixes)

    @property
    def record_privacy(self) -> tuple[float, float] | None:
        """Record-level DP noise added in every local step (DP-FPL): ``(noise multiplier, delta)`` for the loop's
        accountant (``record_epsilon`` in the metrics rows), or ``None`` (the default: no such noise)."""
        return None

    def hparams(self) -> dict:
        """The method's settings as a flat dict (for logs and the resume check)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool, type(None)))}


@dataclass(kw_only=True, eq=False)
class TrainedMethod(Method, OptimizerArgs):
    """Base class of the methods whose clients train prompts: the method's own settings plus the local optimiser's
    (:class:`OptimizerArgs`, the same flat fields for every trained method: ``lr``, ``momentum``, ``weight_decay``,
    ``lr_schedule``, ``warmup_epochs``, ``warmup_lr``, ``lr_scope``, ``cosine_epochs``). A method states its own
    optimiser defaults by declaring the field again (``lr: float = 0.001``)."""

    def __post_init__(self):
        check_optimizer(self)
        super().__post_init__()

    @property
    def optim(self) -> OptimizerArgs:
        """The local optimiser settings as one :class:`OptimizerArgs`."""
        return OptimizerArgs(**{f.name: getattr(self, f.name) for f in fields(OptimizerArgs)})
