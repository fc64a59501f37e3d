"""The ServerApp that ``flwr run`` loads (``fedprompt.flower.server_app:app``): :func:`fedprompt.flower.server.
make_server_app` reading the run config's fedprompt config file."""

from __future__ import annotations

from fedprompt.flower.config import run_args
from fedprompt.flower.server import make_server_app

#: the ServerApp of the Flower app folder ``flower/``
app = make_server_app(load_run=run_args)
