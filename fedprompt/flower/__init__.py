"""fedprompt as a Flower app: the same round driver, method code, data partition and numbers, simulated or deployed.

The round itself is fedprompt's (:class:`fedprompt.federation.round.RoundDriver`); this package is its Flower
transport and the thin adapters around it:

- :mod:`fedprompt.flower.transport`: :class:`~fedprompt.flower.transport.FlowerTransport`, a round's states as Flower
  messages (train, deliver and score; the node discovery and its checks);
- :mod:`fedprompt.flower.secure`: the training half of a round through Flower's SecAgg+ (a setting);
- :mod:`fedprompt.flower.server`: the ServerApp (the round driver over the Flower transport, the run folder written
  by :class:`fedprompt.run_folder.RunFolder`); :mod:`fedprompt.flower.server_app` is what ``flwr run`` loads;
- :mod:`fedprompt.flower.client`: the ClientApp (messages to and from a node's client);
  :mod:`fedprompt.flower.client_app` is what ``flwr run`` loads;
- :mod:`fedprompt.flower.node`: a node's client, free of Flower types (its state across rounds, its checks);
- :mod:`fedprompt.flower.grid`: Flower's message path in this process (``fedprompt fit --runtime flower``);
  :mod:`fedprompt.flower.local` runs a config file that way; :mod:`fedprompt.flower.simulation` through Flower's
  simulation engine;
- :mod:`fedprompt.flower.options`, :mod:`fedprompt.flower.config`: the app's run config and node config keys, and
  the fedprompt config file read by the deployed app.

Needs the ``flower`` extra (``pip install -e ".[flower]"``); the app folder ``flower/`` holds the pyproject.toml
that ``flwr run`` reads (see docs/flower.md and docs/runtimes.md).
"""

from __future__ import annotations


def require_flower() -> None:
    """Raise one clear line when Flower is not installed."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        from fedprompt.errors import FedPromptError

        raise FedPromptError('fedprompt.flower needs Flower: pip install -e ".[flower]" (flwr[simulation]).') from None
