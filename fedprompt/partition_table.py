"""``fedprompt partition``: the client x class table of a config's federated split (no model is loaded)."""

from __future__ import annotations

import json as jsonlib
from typing import Optional

from fedprompt.args import BackboneArgs, EvalArgs, FabricArgs, FederationArgs, LogArgs, TrainArgs
from fedprompt.data import FederatedData, count_table
from fedprompt.errors import FedPromptError
from fedprompt.methods import Method


def partition(method: Optional[Method] = None, data: Optional[FederatedData] = None,
              backbone: BackboneArgs = BackboneArgs(), federation: FederationArgs = FederationArgs(),
              train: TrainArgs = TrainArgs(), eval: EvalArgs = EvalArgs(), log: LogArgs = LogArgs(),
              fabric: FabricArgs = FabricArgs(), out_dir: Optional[str] = None, resume: Optional[str] = None,
              seed: int = 0, overwrite: bool = False, json: bool = False) -> None:
    """Print the client x class table of train samples of a config's federated split (no model is loaded).

    Args:
        method: ignored (so a full run config can be given).
        data: the dataset and its federated split.
        backbone: ignored.
        federation: ignored.
        train: ignored.
        eval: ignored.
        log: ignored.
        fabric: ignored.
        out_dir: ignored.
        resume: ignored.
        seed: ignored (data.seed seeds the split).
        overwrite: ignored.
        json: print JSON (classnames, clients with names and train/test counts per class) instead of a table.
    """
    if data is None:
        raise FedPromptError("data is not set: give a config with data.class_path or --data DomainFolders.")
    splits = data.setup()
    n_cls = len(splits.classnames)
    train_counts, test_counts = count_table(splits.clients, n_cls), count_table(splits.clients, n_cls, "test")
    if json:
        print(jsonlib.dumps({"classnames": splits.classnames, "clients": [
            {"id": c.client_id, "name": c.name, "train": train_counts[k].tolist(), "test": test_counts[k].tolist()}
            for k, c in enumerate(splits.clients)]}, indent=1))
        return
    width = min(10, max(5, *(len(n) for n in splits.classnames)))
    short = [n[:width] for n in splits.classnames]
    print(f"{'client':<16}" + "".join(f"{s:>{width + 1}}" for s in short) + f"{'train':>8}{'test':>7}")
    for k, client in enumerate(splits.clients):
        print(f"{(str(k) + ' ' + client.name)[:16]:<16}" + "".join(f"{v:>{width + 1}}" for v in train_counts[k])
              + f"{train_counts[k].sum():>8}{test_counts[k].sum():>7}")
    print(f"{len(splits.clients)} clients, {n_cls} classes, {int(train_counts.sum())} train / "
          f"{int(test_counts.sum())} test samples")
