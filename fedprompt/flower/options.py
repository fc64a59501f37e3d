"""The Flower app's settings: the run config (``[tool.flwr.app.config]`` in the app's pyproject.toml, overridden by
``flwr run --run-config "key=value ..."``) that the ServerApp and every ClientApp read.

=============================== ======================================================================================
key                             meaning
=============================== ======================================================================================
``config``                      the fedprompt config (YAML), as for ``fedprompt fit --config``; every node reads it
``args``                        fedprompt flags applied on top of it on every side (``"--federation.rounds 2
                                --out_dir runs/x"``; ``--resume DIR/checkpoints/last.ckpt`` continues a run)
``secure-aggregation``          sum the shared prompts with Flower's SecAgg+ (``SecAggPlusWorkflow`` +
                                ``secaggplus_mod``): the server sees only the weighted mean, within the quantisation
                                error (weighted-mean aggregators only)
``secagg-clipping-range``       SecAgg+ clips every shared value to [-c, c] before quantising (8.0)
``secagg-quantization-range``   SecAgg+ integer range Q (2**22): the error bound scales with 2c/Q
``secagg-num-shares``           SecAgg+ key shares per client (a fraction of the sampled clients; 1.0: all)
``secagg-reconstruction-threshold`` shares needed to recover a dropped client's mask (fraction of the shares; 0.6)
``report-states``               clients also send their whole state (local tensors included) after each round, so
                                checkpoints/last.ckpt holds every client's state as ``fedprompt fit`` writes it
                                (off: local state never leaves a node; the checkpoint's ``clients`` is empty)
``timeout``                     seconds the server waits for the replies of one message round (3600)
=============================== ======================================================================================

Each SuperNode's node config: ``partition-id`` (the client it holds, 0-based; required), ``data-root`` (its
``--data.root``), ``state-dir`` (where it keeps its client's state across restarts), ``args`` (its own fedprompt
flags, e.g. ``--backbone.pretrained /models/clip.safetensors``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedprompt.errors import FedPromptError


@dataclass(frozen=True)
class AppOptions:
    """The app's run config, typed (see the module docstring)."""

    config: str
    args: str = ""
    secure_aggregation: bool = False
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 2 ** 22
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.6
    report_states: bool = False
    timeout: float = 3600.0

    @classmethod
    def from_config(cls, run_config: dict, settings: dict | None = None) -> "AppOptions":
        """From Flower's run config (hyphenated keys; ``settings`` fill in missing ones)."""
        values = {**(settings or {}), **dict(run_config)}
        known = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise FedPromptError(f"run config: unknown key(s) {', '.join(unknown)}; the fedprompt app takes "
                                 f"{', '.join(sorted(known))} (fedprompt settings go in 'args').")
        if not values.get("config"):
            raise FedPromptError("run config: 'config' is not set: give the fedprompt config file, e.g. "
                                 "flwr run . --run-config \"config='configs/smoke.yaml'\".")
        typed = {}
        for key, value in values.items():
            name = known[key]
            kind = cls.__dataclass_fields__[name].type
            try:
                if kind == "bool":
                    if isinstance(value, str):
                        if value.lower() not in ("true", "false"):
                            raise ValueError(value)
                        value = value.lower() == "true"
                    typed[name] = bool(value)
                elif kind == "float":
                    typed[name] = float(value)
                elif kind == "int":
                    typed[name] = int(value)
                else:
                    typed[name] = str(value)
            except ValueError:
                raise FedPromptError(f"run config: {key}={value!r} is not a {kind}.") from None
        return cls(**typed)
