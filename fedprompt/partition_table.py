"""``fedprompt partition`` (:func:`fedprompt.commands.partition`): the class x client table of a config's federated
split (no model is loaded, and torch is never imported)."""

from __future__ import annotations

import json as jsonlib
from fedprompt.run import PartitionArgs, RunArgs
from fedprompt.data import count_table
from fedprompt.errors import FedPromptError


def print_counts(classnames: list[str], clients: list[str], train, test) -> None:
    """The class x client table of train samples: one row per class with its whole name, one column per client (its
    index; the names follow the table), then each client's train and test totals."""
    label = max(5, *(len(n) for n in classnames))
    width = max(len(str(len(clients) - 1)), len(str(int(max(train.max(), test.sum(1).max(), 0))))) + 2
    print(f"{'class':<{label}}" + "".join(f"{k:>{width}}" for k in range(len(clients))))
    for j, name in enumerate(classnames):
        print(f"{name:<{label}}" + "".join(f"{int(train[k][j]):>{width}}" for k in range(len(clients))))
    for what, counts in (("train", train), ("test", test)):
        print(f"{what:<{label}}" + "".join(f"{int(counts[k].sum()):>{width}}" for k in range(len(clients))))
    print("clients: " + ", ".join(f"{k} {name}" for k, name in enumerate(clients)))


def print_partition(run: RunArgs, options: PartitionArgs) -> None:
    """``fedprompt partition`` (see :func:`fedprompt.commands.partition`)."""
    data, json = run.data, options.json
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
        width = max(28, *(len(f"{row['id']} {row['name']}") + 1 for row in rows))
        print(f"{'client':<{width}}{'classes':>8}{'train':>7}{'test':>6}  class list")
        for row in rows:
            listed = ", ".join(row["classnames"][:4]) + (", ..." if len(row["classnames"]) > 4 else "")
            print(f"{str(row['id']) + ' ' + row['name']:<{width}}{len(row['classnames']):>8}{sum(row['train']):>7}"
                  f"{sum(row['test']):>6}  {listed}")
        width = max(36, *(len(item["name"]) + 1 for item in sets)) if sets else 36
        print(f"{'evaluation set':<{width}}{'classes':>8}{'test':>7}")
        for item in sets:
            unseen = "" if item["seen"] else "  unseen"
            print(f"{item['name']:<{width}}{item['classes']:>8}{item['samples']:>7}{unseen}")
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
    print_counts(splits.classnames, [c.name for c in splits.clients], train_counts, test_counts)
    print(f"{len(splits.clients)} clients, {n_cls} classes, {int(train_counts.sum())} train / "
          f"{int(test_counts.sum())} test samples")
    unseen = [e for e in splits.eval_sets if not e.seen]
    if unseen:  # cross-dataset / cross-domain targets (data: Transfer)
        width = max(36, *(len(item.name) + 1 for item in unseen))
        print(f"{'evaluation target':<{width}}{'classes':>8}{'test':>7}")
        for item in unseen:
            print(f"{item.name:<{width}}{len(item.classnames):>8}{len(item.samples):>7}")
