"""Run a fedprompt config through Flower's simulation engine from Python (the in-process form of ``flwr run`` with
a simulation SuperLink): ``simulate("configs/smoke.yaml", "--out_dir runs/flower-smoke")``.

Every client is a virtual SuperNode (``partition-id`` = its fedprompt client id) whose ClientApp runs in the Ray
backend's actors; the ServerApp runs in this process.
"""

from __future__ import annotations

import os


def simulate(config: str, args: str = "", num_supernodes: int | None = None, cpus_per_client: float = 1.0,
             **settings) -> None:
    """Run ``config`` (with fedprompt flags ``args``) as a Flower app on the simulation engine, one virtual node per
    client; ``settings``: other run-config keys of :class:`fedprompt.flower.options.AppOptions` (underscores or
    hyphens: ``report_states=True``, ``secure_aggregation=True``)."""
    from flwr.simulation import run_simulation

    from fedprompt.flower.client import make_client_app
    from fedprompt.flower.config import num_clients, run_args
    from fedprompt.flower.server import make_server_app

    values = {"config": str(config), "args": args, **{k.replace("_", "-"): v for k, v in settings.items()}}
    nodes = num_supernodes or num_clients(config, args)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
               "init_args": {"include_dashboard": False, "log_to_driver": True}}
    run_simulation(server_app=make_server_app(values, load_run=run_args),
                   client_app=make_client_app(values, load_run=run_args), num_supernodes=nodes, backend_config=backend)


def main(argv: list[str] | None = None) -> None:
    """``python -m fedprompt.flower.simulation CONFIG ["FLAGS"] [--key value ...]``: :func:`simulate` from a shell
    (``--report-states true``, ``--secure-aggregation true``, ... set run-config keys)."""
    import argparse

    from fedprompt.errors import FedPromptError
    from fedprompt.flower.options import AppOptions

    parser = argparse.ArgumentParser(prog="python -m fedprompt.flower.simulation",
                                     description="Run a fedprompt config on Flower's simulation engine.")
    parser.add_argument("config", help="the fedprompt config (YAML)")
    parser.add_argument("args", nargs="?", default="", help="fedprompt flags, one quoted string")
    parser.add_argument("--nodes", type=int, default=None, help="virtual SuperNodes (default: one per client)")
    for name in AppOptions.__dataclass_fields__:
        if name not in ("config", "args"):
            parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None)
    options = vars(parser.parse_args(argv))
    settings = {k: v for k, v in options.items() if k not in ("config", "args", "nodes") and v is not None}
    try:
        AppOptions.from_config({"config": options["config"], **{k.replace("_", "-"): v for k, v in settings.items()}})
        simulate(options["config"], options["args"], options["nodes"], **settings)
    except FedPromptError as err:
        raise SystemExit(f"fedprompt: error: {err}") from None


if __name__ == "__main__":
    main()
