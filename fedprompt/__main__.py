"""The ``fedprompt`` command line: ``fit``, ``evaluate``, ``zeroshot``, ``partition``, ``bench``.

Every command takes ``--config FILE.yaml`` (flat YAML; ``class_path`` selects method and data), flags that override
it (``--data.root``, ``--federation.rounds``, ...) and ``--print_config``.
"""

from __future__ import annotations

import json as jsonlib
import os
import re
import sys
from argparse import ArgumentError
from typing import Optional

import yaml

from fedprompt.args import BackboneArgs, EvalArgs, FabricArgs, FederationArgs, LogArgs, TrainArgs
from fedprompt.data import FederatedData, count_table
from fedprompt.errors import FedPromptError
from fedprompt.methods import Method


def partition(method: Optional[Method] = None, data: Optional[FederatedData] = None,
              backbone: BackboneArgs = BackboneArgs(), federation: FederationArgs = FederationArgs(),
              train: TrainArgs = TrainArgs(), eval: EvalArgs = EvalArgs(), log: LogArgs = LogArgs(),
              fabric: FabricArgs = FabricArgs(), out_dir: Optional[str] = None, resume: Optional[str] = None,
              seed: int = 0, json: bool = False) -> None:
    """Print the client x class table of train samples of a config's federated split (no model is loaded).

    When clients have their own class lists (``data: Combined``, ``partition: CrossClass``) it prints one line per
    client instead (dataset, number of classes, train/test samples, its first class names) and the evaluation sets
    (name, classes, test samples; ``unseen`` for datasets never trained on).

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
        json: print JSON (classnames, clients with names and train/test counts per class) instead of a table;
            with own class lists: ``clients`` (id, name, dataset, classnames, train/test counts per own class) and
            ``eval_sets`` (name, split, dataset, seen, classes, samples).
    """
    if data is None:
        raise FedPromptError("data is not set: give a config with data.class_path or --data DomainFolders.")
    splits = data.setup()
    if any(c.classnames is not None for c in splits.clients):  # own class lists: one line per client, eval sets
        rows = []
        for k, client in enumerate(splits.clients):
            names = splits.client_classnames(k)
            train, test = count_table([client], len(names))[0], count_table([client], len(names), "test")[0]
            rows.append({"id": client.client_id, "name": client.name, "dataset": client.dataset, "classnames": names,
                         "train": train.tolist(), "test": test.tolist()})
        sets = [{"name": e.name, "split": e.split, "dataset": e.dataset, "seen": e.seen, "classes": len(e.classnames),
                 "samples": len(e.samples)} for e in splits.eval_sets]
        if json:
            print(jsonlib.dumps({"clients": rows, "eval_sets": sets}, indent=1))
            return
        print(f"{'client':<28}{'classes':>8}{'train':>7}{'test':>6}  class list")
        for row in rows:
            listed = ", ".join(row["classnames"][:4]) + (", ..." if len(row["classnames"]) > 4 else "")
            print(f"{(str(row['id']) + ' ' + row['name'])[:28]:<28}{len(row['classnames']):>8}{sum(row['train']):>7}"
                  f"{sum(row['test']):>6}  {listed}")
        print(f"{'evaluation set':<36}{'classes':>8}{'test':>7}")
        for item in sets:
            unseen = "" if item["seen"] else "  unseen"
            print(f"{item['name'][:36]:<36}{item['classes']:>8}{item['samples']:>7}{unseen}")
        datasets = len(dict.fromkeys(r["dataset"] for r in rows))
        print(f"{len(rows)} clients with their own class lists from {datasets} dataset(s), "
              f"{sum(sum(r['train']) for r in rows)} train / {sum(sum(r['test']) for r in rows)} test samples, "
              f"{len(sets)} evaluation sets")
        return
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


def commands() -> dict:
    """Subcommand name -> function."""
    from fedprompt.bench import bench
    from fedprompt.fit import evaluate, fit, zeroshot

    return {"fit": fit, "evaluate": evaluate, "zeroshot": zeroshot, "partition": partition, "bench": bench}


def _resolved_config(parser, cfg, name: str) -> dict:
    sub_parser = parser._subcommands_action._name_parser_map[name]
    text = sub_parser.dump(cfg[name], skip_validation=True)
    resolved = yaml.safe_load(text) or {}
    resolved.pop("config", None)
    return resolved


def _subclass_names(base: type) -> list[str]:
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_"):
            found.append(cls.__name__)
    return sorted(set(found))


def _argument_error_message(err: Exception, command: str | None) -> str:
    """One readable line for a jsonargparse error (which names the key and the value at fault)."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    key = re.search(r'Parser key "([^"]+)"', text)
    given = re.search(r"Given value: (.*)", text)
    nested = re.search(r"NestedArg\(key='([^']+)', val='([^']*)'\)", text)
    if key and nested:  # an invalid init argument of a class_path object, e.g. --method.ot dykstra
        detail = next((line for line in lines if "Expected" in line or "not" in line), lines[-1])
        message = f"{key.group(1)}.{nested.group(1)}: invalid value {nested.group(2)!r} ({detail})"
    elif key and given:
        message = f"{key.group(1)}: invalid value {given.group(1).strip()!r}"
        root = key.group(1).split(".")[0]
        known = {"method": Method, "data": FederatedData}.get(root)
        if known is not None and key.group(1) == root:
            message += f"; known {root} classes: {', '.join(_subclass_names(known))} (or a full class_path)"
        else:
            message += f" ({lines[1] if len(lines) > 1 else lines[0]})"
    else:
        message = " ".join(lines[:3])
    return message + f". See: fedprompt {command or ''} --help".rstrip()


def _find_cause(err: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in ``err``'s cause/context chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _no_exit_on_error(parser) -> None:
    parser.exit_on_error = False
    if parser._subcommands_action:
        for sub in parser._subcommands_action._name_parser_map.values():
            _no_exit_on_error(sub)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fedprompt`` console script."""
    from jsonargparse import CLI, capture_parser

    import fedprompt.fit

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    components = commands()
    parser = capture_parser(lambda: CLI(components, args=argv))
    _no_exit_on_error(parser)
    try:
        try:
            cfg = parser.parse_args(argv)
        except ArgumentError as err:
            command = next((a for a in argv if a in components), None)
            raise FedPromptError(_argument_error_message(err, command)) from None
        name = cfg.subcommand
        try:
            init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
        except Exception as err:  # jsonargparse wraps errors raised in __init__ (e.g. a bad method.mu)
            cause = _find_cause(err, FedPromptError)
            if cause is None:
                raise
            raise cause from None
        fedprompt.fit.RESOLVED_CONFIG = _resolved_config(parser, cfg, name)
        kwargs = {k: v for k, v in vars(init[name]).items() if k != "config"}
        components[name](**kwargs)
    except FedPromptError as err:
        print(f"fedprompt: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("fedprompt: interrupted; the last checkpoint is checkpoints/last.ckpt in the run directory.",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
