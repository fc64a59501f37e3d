"""Run a fedprompt config file as a Flower app in this process, as ``flwr run`` would run it (the ServerApp and the
ClientApps read the config from the run config; every message through Flower's serialisation, over
:class:`fedprompt.flower.grid.LocalGrid`). For tests, benchmarks and debugging."""

from __future__ import annotations

from fedprompt.flower.grid import LocalGrid, run_grid


def run_local(config: str, args: str = "", num_nodes: int | None = None, node_configs: list[dict] | None = None,
              down_from: dict[int, int] | None = None, **settings) -> LocalGrid:
    """Run a fedprompt config as a Flower app in this process (one node per client unless ``node_configs`` are
    given; ``down_from``: node id -> the round from which it stops answering); ``settings``: other run-config keys
    (underscores or hyphens). Returns the grid (its nodes' contexts hold the clients' states)."""
    from fedprompt.flower.client import make_client_app
    from fedprompt.flower.config import num_clients, run_args
    from fedprompt.flower.server import make_server_app

    values = {"config": str(config), "args": args, **{k.replace("_", "-"): v for k, v in settings.items()}}
    if node_configs is None:
        n = num_nodes or num_clients(config, args)
        node_configs = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    return run_grid(make_server_app(values, load_run=run_args), make_client_app(load_run=run_args), node_configs,
                    values, down_from)
