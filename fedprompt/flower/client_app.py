"""The ClientApp that ``flwr run`` loads (``fedprompt.flower.client_app:app``): :func:`fedprompt.flower.client.
make_client_app` reading the run config's fedprompt config file (with each node's own flags and data root)."""

from __future__ import annotations

from fedprompt.flower.client import make_client_app
from fedprompt.flower.config import run_args

#: the ClientApp of the Flower app folder ``flower/``
app = make_client_app(load_run=run_args)
