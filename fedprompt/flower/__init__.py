"""fedprompt as a Flower app: the same method code, data partition and numbers, simulated or deployed.

- :mod:`fedprompt.flower.client_app`: the ClientApp (``fedprompt.flower.client_app:app``): one fedprompt client per
  node, trained by fedprompt's engine (K = 1), its own state kept in the app's context (and a node state file);
- :mod:`fedprompt.flower.server_app`: the ServerApp (``fedprompt.flower.server_app:app``) and
  :class:`~fedprompt.flower.server_app.FedPromptStrategy`, a Flower strategy around the method's aggregator that
  writes fedprompt's run directory and resumes from it;
- :mod:`fedprompt.flower.secure`: the shared prompts summed with Flower's SecAgg+ (a setting);
- :mod:`fedprompt.flower.options`: the app's run config and node config keys;
- :mod:`fedprompt.flower.simulation`: run a config through Flower's simulation engine from Python.

Needs the ``flower`` extra (``pip install -e ".[flower]"``); the app folder ``flower/`` holds the pyproject.toml
that ``flwr run`` reads (see docs/flower.md).
"""

from __future__ import annotations


def require_flower() -> None:
    """Raise one clear line when Flower is not installed."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        from fedprompt.errors import FedPromptError

        raise FedPromptError('fedprompt.flower needs Flower: pip install -e ".[flower]" (flwr[simulation]).') from None
