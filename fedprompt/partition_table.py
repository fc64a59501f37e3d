"""``fedprompt partition`` (:func:`fedprompt.commands.partition`): the client x class table of a config's federated split (no model is loaded)."""

from __future__ import annotations

import json as jsonlib
from fedprompt.run import PartitionArgs, RunArgs
from fedprompt.data import count_table
from fedprompt.errors import FedPromptError


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
    unseen = [e for e in splits.eval_sets if not e.seen]
    if unseen:  # cross-dataset / cross-domain targets (data: Transfer)
        print(f"{'evaluation target':<36}{'classes':>8}{'test':>7}")
        for item in unseen:
            print(f"{item.name[:36]:<36}{len(item.classnames):>8}{len(item.samples):>7}")
