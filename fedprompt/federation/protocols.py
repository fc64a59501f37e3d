"""What the federation needs from a method and its client module, as small protocols.

The round loop and the engine run any method through these (the classes in :mod:`fedprompt.methods` implement
them), so ``fedprompt.federation`` never imports ``fedprompt.methods``: methods build on the federation, not the
other way round.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

State = dict[str, torch.Tensor]


class ClientModule(Protocol):
    """A client module holding ``slots`` clients' prompt tensors (``fedprompt.methods.PromptClient``)."""

    slots: int
    classnames: list[str]
    switchable_classes: bool
    timer: Any

    def slot_state(self, slot: int) -> State:
        """One client's state (no client dimension), a detached CPU copy."""

    def load_slot(self, slot: int, state: State) -> None:
        """Put one client's state into ``slot``."""

    def set_classes(self, classnames: list[str]) -> None:
        """Point the module at another class list."""

    def on_round_start(self, global_state: State | None) -> None:
        """Hook before local training."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer over the stacked prompt tensors (``fedprompt.optim.StackedSGD``)."""

    def training_step(self, batch: dict, batch_idx: int = 0) -> torch.Tensor:
        """One loss per active client ``[A]``."""

    def text_for(self, slots: torch.Tensor) -> Any:
        """The text side of the clients in ``slots`` (for an evaluation)."""

    def predict_logits(self, batch: dict, text: Any = None) -> torch.Tensor:
        """Logits ``[n, C]`` for evaluation (or ``[n, C + M]``: a model's own M negative labels after the C classes,
        FOCoOp's OOD prompts; accuracy reads the first C columns)."""


class MethodSpec(Protocol):
    """A method's declared capabilities and builders (``fedprompt.methods.Method``)."""

    name: str
    trains: bool
    communicates: bool
    global_model: bool
    frozen_image_tower: bool
    image_inputs: tuple[str, ...]
    optim: Any
    """The local optimiser settings (``fedprompt.methods.OptimizerArgs``; methods that train)."""
    record_privacy: tuple[float, float] | None
    """Record-level DP noise of every local step: (noise multiplier, delta), or None."""

    def build_client(self, backbone, classnames: list[str], slots: int = 1) -> ClientModule:
        """The method's client module for ``slots`` clients."""

    def build_aggregator(self):
        """The server rule (a :class:`fedprompt.federation.aggregators.Aggregator`)."""

    def hparams(self) -> dict:
        """The method's settings (for logs and the resume check)."""

    def initial_client_state(self, client_id: int, state: State) -> State:
        """Client ``client_id``'s state before its first round, from the server's initialisation."""

    def prepare_data(self, splits, eval_sets: list) -> None:
        """Read and check per-dataset side data once the data is read (before any module is built)."""
