"""A fedprompt client on a Flower node, free of Flower types: its run settings, its one client (backbone, client
module, data split; trained and scored by fedprompt's own code at K = 1), the client's state across rounds, and the
checks that a node's config matches the server's.

:class:`Node` builds the roles of the federation for one client (:func:`fedprompt.build.build_parts` with
``feed_clients``: the backbone once per process, this client's images only) and runs the clients' side of a round
exactly as ``fedprompt fit`` does: :meth:`fedprompt.federation.clients.ClientPool.train` (local round, upload, the
pool's update steps), :meth:`~fedprompt.federation.clients.ClientPool.receive` (the merge of a download) and
:meth:`fedprompt.federation.evaluator.Evaluator.score`. What a node adds is its memory of the client's state per
round (:class:`ClientRecord`), since it receives the rounds' global states only when the server writes to it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fedprompt.errors import FedPromptError, warn
from fedprompt.federation.checkpoint import save_checkpoint, state_shapes

State = dict[str, torch.Tensor]

#: how many end-of-round states a client keeps (a server resumed from an older checkpoint finds its round there)
KEEP_VERSIONS = 3


# ------------------------------------------------------------------------------------------------ settings
def one_at_a_time(run):
    """The run with ``parallel_clients: 1`` and no progress bars: a Flower node trains its one client (K = 1), as
    ``fedprompt fit --federation.parallel_clients 1`` does."""
    return replace(run, federation=replace(run.federation, parallel_clients=1), log=replace(run.log, progress=False))


def single_fabric(run, accelerator: str | None = None):
    """A one-device Lightning Fabric for a node (the config's accelerator and precision; ``accelerator`` overrides)."""
    import lightning as L

    fabric = L.Fabric(accelerator=accelerator or run.fabric.accelerator, devices=1, num_nodes=1, strategy="auto",
                      precision=run.fabric.precision)
    fabric.launch()
    return fabric


def fingerprint(parts) -> dict:
    """What must agree between a node and the server: the method, its settings, the shared keys, the shape of every
    prompt tensor, the number of clients and their train sizes (the aggregation weights), the seed, the malicious
    clients and what they do."""
    from fedprompt.federation.attacks import attack_fingerprint

    init = parts.initial
    method, server = parts.method, parts.server
    return {"method": method.name, "hparams": method.hparams(), "shapes": state_shapes(init),
            "shared": sorted(server.aggregator.upload(0, init, 1)) if method.communicates else [],
            "num_clients": len(parts.clients), "num_train": [len(c.train) for c in parts.clients],
            "seed": parts.pool.seed, "attack": attack_fingerprint(parts)}


def differences(server: dict, node: dict) -> list[str]:
    """The entries in which a node's :func:`fingerprint` differs from the server's (``key: server vs node``)."""
    out = []
    for key in server:
        if json.dumps(server[key], sort_keys=True) != json.dumps(node.get(key), sort_keys=True):
            if isinstance(server[key], dict) and isinstance(node.get(key), dict):
                subs = sorted(k for k in set(server[key]) | set(node[key]) if server[key].get(k) != node[key].get(k))
                out.append(f"{key} ({', '.join(f'{k}: {server[key].get(k)} vs {node[key].get(k)}' for k in subs)})")
            else:
                out.append(f"{key} ({server[key]} vs {node.get(key)})")
    return out


def run_key(config: dict, out_dir: str) -> str:
    """A short identity of a run (its resolved config and run directory): a node's saved state belongs to one run."""
    text = json.dumps({"config": config, "out_dir": str(out_dir)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_bytes(obj) -> bytes:
    """``torch.save`` of a (nested) dict of tensors and plain values (an aggregator's ``state_dict``); an empty
    dict (a stateless aggregator) is no bytes at all."""
    if isinstance(obj, dict) and not obj:
        return b""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes):
    """The inverse of :func:`to_bytes` (``weights_only``: never unpickles code)."""
    if not data:
        return {}
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------ client state
@dataclass
class ClientRecord:
    """A client's own state across rounds, as fedprompt's loop would hold it for this client.

    ``versions[v]``: its state at the end of round ``v`` (after merging the global state of round ``v``; ``0``: the
    initial prompts), the newest :data:`KEEP_VERSIONS` kept, so a server resumed from an older checkpoint finds its
    round; ``trained``: ``(round, state)`` right after its last local training (merged at the end of that round if
    the server counted it). Local tensors (FedOTP's local prompt, FedPGP's U and V, FedMGP's unsent groups) never
    leave it except with ``report-states``.
    """

    cid: int
    run_key: str
    versions: dict[int, State] = field(default_factory=dict)
    trained: tuple[int, State] | None = None

    def to_dict(self) -> dict:
        return {"cid": self.cid, "run_key": self.run_key, "versions": self.versions,
                "trained": None if self.trained is None else {"round": self.trained[0], "state": self.trained[1]}}

    @classmethod
    def from_dict(cls, data: dict) -> "ClientRecord":
        trained = data.get("trained")
        return cls(int(data["cid"]), str(data["run_key"]), {int(v): s for v, s in data["versions"].items()},
                   None if trained is None else (int(trained["round"]), trained["state"]))

    def save(self, path: Path) -> None:
        """Write the record atomically (a node's state file: it survives a restart of the node)."""
        save_checkpoint(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path) -> "ClientRecord | None":
        if not path.is_file():
            return None
        return cls.from_dict(torch.load(path, map_location="cpu", weights_only=True))

    def keep(self, version: int, state: State) -> None:
        self.versions[version] = state
        for old in sorted(self.versions)[:-KEEP_VERSIONS]:
            del self.versions[old]


def state_file(state_dir: str | None, cid: int) -> Path | None:
    """Where a node keeps client ``cid``'s record (``None`` without a state directory)."""
    return Path(state_dir).expanduser() / f"client-{cid}.pt" if state_dir else None


# ------------------------------------------------------------------------------------------------ one client
class Node:
    """The client ``cid`` of a fedprompt run in this process: the backbone (once per process), the method's client
    module and this client's data only, trained and scored by fedprompt's own code at K = 1.

    Args:
        run: the run settings (a config with the node's flags).
        cid: the client (the node's partition id).
        fabric: the node's Fabric (default: one device of the config's accelerator).
        splits: the run's data, if this process read it already (default: read it here).
    """

    def __init__(self, run, cid: int, fabric=None, splits=None):
        from fedprompt.build import build_parts

        self.run = one_at_a_time(run)
        self.cid = cid
        self.fabric = fabric or single_fabric(self.run)
        self.parts = build_parts(self.fabric, self.run, splits, feed_clients=[cid], quiet=True)
        if not 0 <= cid < len(self.parts.clients):
            raise FedPromptError(f"node-config partition-id={cid}: this config makes {len(self.parts.clients)} "
                                 f"clients (0..{len(self.parts.clients) - 1}); give each node one of those ids.")
        self.initial = {k: v.clone() for k, v in self.parts.pool.states[cid].items()}  # its own initial state
        self.fingerprint = fingerprint(self.parts)

    @property
    def aggregator(self):
        return self.parts.server.aggregator

    @property
    def num_train(self) -> int:
        return len(self.parts.clients[self.cid].train)

    def state_at(self, record: ClientRecord, version: int, received: State, aggregator_state: dict,
                 counted: bool = True, merged: bool = True) -> State:
        """The client's state at the end of round ``version``: kept, or its last state merged with the global state
        of that round (``received``: the server's download; the aggregator's state as the server has it after that
        round's merge, so ``apply`` sees what the single-process run's aggregator would see). ``counted``: whether
        the server used this client's training of that round (a failed or lost reply is not kept); ``merged``:
        whether that round made a new global state (else there is nothing to merge)."""
        if version in record.versions:
            return record.versions[version]
        if version == 0:
            record.keep(0, {k: v.clone() for k, v in self.initial.items()})
            return record.versions[0]
        older = [v for v in record.versions if v < version]
        if record.trained is not None and record.trained[0] == version and counted:
            base = record.trained[1]
        elif older:
            base = record.versions[max(older)]
        else:
            warn(f"client {self.cid}: no saved state before round {version} (no state-dir, or a new node); it "
                 "starts from the initial prompts.")
            base = self.initial
        pool = self.parts.pool
        pool.states[self.cid] = base
        if merged:
            self.aggregator.load_state_dict(aggregator_state)
            pool.receive(self.cid, received)
        record.keep(version, pool.states[self.cid])
        return record.versions[version]

    def train(self, record: ClientRecord, round_idx: int, received: State, aggregator_state: dict,
              counted: bool = True, merged: bool = True):
        """Train the client in ``round_idx`` from its state at the end of the previous round (``counted``,
        ``merged``: that round's, as for :meth:`state_at`); returns its
        :class:`~fedprompt.federation.clients.Report` and its upload (``{}`` on failure)."""
        pool = self.parts.pool
        pool.states[self.cid] = self.state_at(record, round_idx - 1, received, aggregator_state, counted, merged)
        self.aggregator.load_state_dict(aggregator_state)  # upload selects against the server's current state
        result = pool.train([self.cid], round_idx, received)[self.cid]
        if result.report.failure is None:
            record.trained = (round_idx, result.state)
        return result.report, result.upload

    def evaluate(self, state: State) -> dict[str, float]:
        """The client's scores from ``state`` (its own test and validation data, and the evaluation sets it is
        scored on: :meth:`fedprompt.federation.evaluator.Evaluator.score`)."""
        pool = self.parts.pool
        pool.states[self.cid] = state
        mine = self.parts.evaluator.score(pool, [self.cid], lambda cids: [c for c in cids if c == self.cid])
        return mine.get(self.cid, {})
