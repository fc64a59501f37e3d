"""Dotted keys of a resolved config (a nested mapping as jsonargparse and ``hyperparameters.yaml`` hold it).

Two views, each used where it fits:

- :func:`setting_keys`: the keys a user types (``data.seed``, ``method.lr``): ``init_args`` levels are left out
  and a ``class_path`` is the value of its key (``data: fedprompt.data.Synthetic``). Resume checks and the CLI's
  config checks compare settings this way.
- :func:`raw_keys`: every leaf as stored (``data.init_args.seed``), lists of mappings indexed
  (``data.init_args.targets.0.class_path``). ``fedprompt table`` and ``fedprompt sweep`` compare runs this way.

Plain Python only: the CLI imports this before anything heavy.
"""

from __future__ import annotations


def setting_keys(tree, prefix: str = "") -> dict:
    """``{dotted key: value}`` without ``init_args`` levels, a ``class_path`` as the value of its key, lists and
    empty mappings as values (``{"data": {"class_path": "X", "init_args": {"seed": 0}}}`` ->
    ``{"data": "X", "data.seed": 0}``)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    out = {}
    for key, value in tree.items():
        if key == "init_args":
            out.update(setting_keys(value, prefix))
        elif key == "class_path":
            out[prefix.rstrip(".")] = value
        elif isinstance(value, dict) and value:
            out.update(setting_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def raw_keys(tree, prefix: str = "") -> dict:
    """``{dotted key: value}`` of every leaf as stored, ``init_args`` included and lists of mappings indexed
    (``{"data": {"init_args": {"targets": [{"class_path": "X"}]}}}`` -> ``{"data.init_args.targets.0.class_path":
    "X"}``); an empty mapping has no leaf."""
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(raw_keys(value, f"{prefix}{key}."))
    elif isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        for i, value in enumerate(tree):
            out.update(raw_keys(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = tree
    return out
