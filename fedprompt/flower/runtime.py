"""The fedprompt side of the Flower app, free of Flower types: the run settings from the app's config, one client's
node (backbone, client module, data split; training and evaluation with fedprompt's engine at K = 1), the client's
state across rounds, and the checks that a node's config matches the server's.

Everything here is fedprompt's own code put together for one client per process: :func:`fedprompt.fit.
build_federation` builds the backbone (once per process: :func:`fedprompt.backbone.load_backbone` caches it), the
method's client module and the data of one client (``feed_clients``); :meth:`fedprompt.federation.loop.Federation.
train_clients` trains it (``LockstepTrainer`` / ``run_groups`` with ``GroupSize(1)``, batches from
:mod:`fedprompt.federation.feed`) and :meth:`~fedprompt.federation.loop.Federation.evaluate_clients` scores it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fedprompt.errors import FedPromptError, warn
from fedprompt.federation.checkpoint import save_checkpoint, state_shapes

State = dict[str, torch.Tensor]

#: how many end-of-round states a client keeps (a server resumed from an older checkpoint finds its round there)
KEEP_VERSIONS = 3


# ------------------------------------------------------------------------------------------------ settings
def run_args(config: str, args: str = "", node_args: str = "", data_root: str | None = None):
    """The :class:`fedprompt.run.RunArgs` of a fedprompt config file with command-line flags (``args``: the app's,
    ``node_args``: this node's own, applied last; ``data_root``: ``--data.root``), parsed exactly as ``fedprompt fit``
    parses them (one :class:`FedPromptError` line for a bad file, key or value)."""
    from jsonargparse import set_parsing_settings

    import fedprompt.data
    import fedprompt.methods
    from fedprompt.__main__ import instantiate, parse
    from fedprompt.methods.method import Method
    from fedprompt.run import RunArgs

    set_parsing_settings(docstring_parse_attribute_docstrings=True, subclasses_enabled=[Method])
    fedprompt.methods.import_all()
    fedprompt.data.import_readers()
    argv = ["fit", "--config", str(config), *shlex.split(args or ""), *shlex.split(node_args or "")]
    if data_root:
        argv += ["--data.root", str(data_root)]
    _, parser, cfg = parse(argv)
    init, resolved = instantiate(parser, cfg)
    from dataclasses import fields

    return RunArgs(**{f.name: init[f.name] for f in fields(RunArgs) if f.name != "resolved_config"},
                   resolved_config=resolved)


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


def fingerprint(fed) -> dict:
    """What must agree between a node and the server: the method, its settings, the shared keys, the shape of every
    prompt tensor, the number of clients and their train sizes (the aggregation weights), the seed."""
    init = fed.states[min(fed.states)]
    return {"method": fed.method.name, "hparams": fed.method.hparams(), "shapes": state_shapes(init),
            "shared": sorted(fed.aggregator.upload(0, init, 1)) if fed.method.communicates else [],
            "num_clients": len(fed.clients), "num_train": [len(c.train) for c in fed.clients], "seed": fed.seed}


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
    module and this client's data only, trained and evaluated by fedprompt's engine at K = 1.

    Args:
        run: the run settings (a config with the node's flags).
        cid: the client (the node's partition id).
    """

    def __init__(self, run, cid: int, fabric=None):
        from fedprompt.fit import build_federation

        self.run = one_at_a_time(run)
        self.cid = cid
        self.fabric = fabric or single_fabric(self.run)
        self.fed, _ = build_federation(self.fabric, self.run, feed_clients=[cid])
        if not 0 <= cid < len(self.fed.clients):
            raise FedPromptError(f"node-config partition-id={cid}: this config makes {len(self.fed.clients)} clients "
                                 f"(0..{len(self.fed.clients) - 1}); give each node one of those ids.")
        self.initial = {k: v.clone() for k, v in self.fed.states[cid].items()}
        self.fingerprint = fingerprint(self.fed)

    @property
    def aggregator(self):
        return self.fed.aggregator

    @property
    def num_train(self) -> int:
        return len(self.fed.clients[self.cid].train)

    def state_at(self, record: ClientRecord, version: int, received: State, aggregator_state: dict,
                 counted: bool = True) -> State:
        """The client's state at the end of round ``version``: kept, or its last state merged with the global state
        of that round (``received``: the server's download; the aggregator's state as the server has it after that
        round's aggregation, so ``apply`` sees what the single-process loop's aggregator would see). ``counted``:
        whether the server used this client's training of that round (a failed or lost reply is not merged)."""
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
        self.aggregator.load_state_dict(aggregator_state)
        state = self.aggregator.apply(base, received, self.cid)
        record.keep(version, state)
        return state

    def train(self, record: ClientRecord, round_idx: int, received: State, aggregator_state: dict,
              counted: bool = True):
        """Train the client in ``round_idx`` from its state at the end of the previous round (``counted``: whether
        the server used its training of that round); returns its :class:`~fedprompt.federation.engine.GroupResult`
        and its upload (``{}`` on failure)."""
        start = self.state_at(record, round_idx - 1, received, aggregator_state, counted)
        self.aggregator.load_state_dict(aggregator_state)  # upload selects against the server's current state
        self.fed.states[self.cid] = start
        self.fed.global_state = received
        result = self.fed.train_clients([self.cid], round_idx)[self.cid]
        if result.failure is not None:
            return result, {}
        record.trained = (round_idx, result.state)
        return result, self.aggregator.upload(self.cid, result.state, round_idx)

    def evaluate(self, state: State) -> dict:
        """The client's evaluation results from ``state`` (its own test and validation accuracy, and the evaluation
        sets it is scored on): the entries of :meth:`~fedprompt.federation.loop.Federation.evaluate_clients`."""
        self.fed.states[self.cid] = state
        return self.fed.evaluate_clients([self.cid])


def evaluation_to_flat(results: dict) -> dict:
    """A client's evaluation results as flat metrics (``test``, ``val``, ``set/<name>`` accuracies; ``score/<metric>:
    <list>`` lists of floats: the calibration tally and per-class counts, see
    :mod:`fedprompt.federation.eval_summaries`)."""
    from fedprompt.federation.eval_summaries import SCORES

    out: dict = {}
    for key, value in results.items():
        if isinstance(key, tuple) and key[0] == SCORES and len(key) == 3:
            out.update({f"score/{metric}:{key[1]}": [float(v) for v in values] for metric, values in value.items()})
        elif isinstance(key, tuple):
            out[f"set/{key[0]}"] = float(value)
        else:
            out["test"], out["val"] = float(value[0]), float(value[1])
    return out


def evaluation_from_flat(cid: int, flat: dict) -> dict:
    """The inverse of :func:`evaluation_to_flat` for client ``cid``."""
    from fedprompt.federation.eval_summaries import SCORES

    out: dict = {cid: (float(flat.get("test", math.nan)), float(flat.get("val", math.nan)))}
    for key, value in flat.items():
        if key.startswith("set/"):
            out[(key[4:], cid)] = float(value)
        elif key.startswith("score/"):
            metric, name = key[len("score/"):].split(":", 1)
            out.setdefault((SCORES, name, cid), {})[metric] = [float(v) for v in value]
    return out
