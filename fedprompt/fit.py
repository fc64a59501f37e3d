"""``fedprompt fit | zeroshot | evaluate``: build Fabric, launch, wire backbone, data and method, run the rounds.

Each command is ``setup`` (CLI-facing; builds Fabric and launches one process per device) followed by
:func:`main` on every rank (loads the backbone once, reads the data, builds the method's client and aggregator,
runs :mod:`fedprompt.federation.loop`, writes the run directory on rank 0).
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import yaml
from tqdm.auto import tqdm

from fedprompt.args import BackboneArgs, EvalArgs, FabricArgs, FederationArgs, LogArgs, TrainArgs
from fedprompt.backbone import load_backbone
from fedprompt.data import FederatedData, clip_transforms
from fedprompt.data.cache import FeatureCache
from fedprompt.errors import FedPromptError
from fedprompt.federation.checkpoint import load_checkpoint, read_jsonl, save_checkpoint, write_json, write_jsonl, \
    write_text
from fedprompt.federation.feed import Feed
from fedprompt.federation.loop import Federation
from fedprompt.loggers import build_logger, log_client_table, logger_run_id, numeric_metrics
from fedprompt.methods import Method, ZeroShot

#: The resolved config of the current CLI call (set by ``fedprompt.__main__``), saved as hyperparameters.yaml.
RESOLVED_CONFIG: dict | None = None

ARGS_DOC = """
    Args:
        method: the federated prompt-learning method (class_path: fedprompt.methods.PromptFL, ...).
        data: the dataset and its federated split (class_path: fedprompt.data.DomainFolders, ...).
        backbone: the frozen open_clip model.
        federation: rounds, client sampling, failure policy.
        train: local training.
        eval: evaluation.
        log: logger, progress bars, checkpoints.
        fabric: devices, nodes, precision.
        out_dir: run directory (default runs/<method>-<time>).
        resume: a checkpoints/last.ckpt to continue from (fit) or to evaluate (evaluate).
        seed: seed of prompt initialisation, client sampling and local data order.
"""


def _command(mode: str, summary: str):
    def command(method: Optional[Method] = None, data: Optional[FederatedData] = None,
                backbone: BackboneArgs = BackboneArgs(), federation: FederationArgs = FederationArgs(),
                train: TrainArgs = TrainArgs(), eval: EvalArgs = EvalArgs(), log: LogArgs = LogArgs(),
                fabric: FabricArgs = FabricArgs(), out_dir: Optional[str] = None, resume: Optional[str] = None,
                seed: int = 0) -> dict:
        return setup(mode, dict(method=method, data=data, backbone=backbone, federation=federation, train=train,
                                eval=eval, log=log, fabric=fabric, out_dir=out_dir, resume=resume, seed=seed))

    command.__name__ = command.__qualname__ = mode
    command.__doc__ = summary + "\n" + ARGS_DOC
    return command


fit = _command("fit", "Train prompts across federated clients and write the run directory (metrics.jsonl, "
                      "summary.json, checkpoints/last.ckpt).")
zeroshot = _command("zeroshot", "Evaluate zero-shot CLIP (or the given untrained method) on every client's test "
                                "data; prints each client's accuracy and writes summary.json.")
evaluate = _command("evaluate", "Evaluate every client of a checkpoint (--resume DIR/checkpoints/last.ckpt) on its "
                                "own test data; writes eval.json in out_dir.")


def setup(mode: str, cfg: dict) -> dict:
    """Check the arguments, build Fabric and run :func:`main` on every process."""
    if mode == "zeroshot" and cfg["method"] is None:
        cfg["method"] = ZeroShot()
    if cfg["method"] is None:
        raise FedPromptError("method is not set: give a config with method.class_path (e.g. "
                             "fedprompt.methods.PromptFL) or --method PromptFL.")
    if cfg["data"] is None:
        raise FedPromptError("data is not set: give a config with data.class_path (e.g. fedprompt.data.DomainFolders).")
    if cfg["eval"].select == "val" and not getattr(cfg["data"], "validation", False):
        raise FedPromptError("eval.select=val needs a validation set: set data.validation: true.")
    if mode == "evaluate" and not cfg["resume"]:
        raise FedPromptError("evaluate needs --resume DIR/checkpoints/last.ckpt (the checkpoint to evaluate).")
    checkpoint = load_checkpoint(cfg["resume"]) if cfg["resume"] else None
    fab = cfg["fabric"]
    fabric = L.Fabric(accelerator=fab.accelerator, devices=fab.devices, num_nodes=fab.num_nodes,
                      strategy=fab.strategy, precision=fab.precision)
    fabric.launch()
    return main(fabric, mode, cfg, checkpoint)


def _out_dir(fabric, cfg: dict) -> Path:
    out = cfg["out_dir"]
    if out is None:
        out = f"runs/{cfg['method'].name.lower()}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(fabric.broadcast(out, src=0))


def _config_yaml(cfg: dict) -> str:
    if RESOLVED_CONFIG is not None:
        return yaml.safe_dump(RESOLVED_CONFIG, sort_keys=False)

    def plain(obj):
        if hasattr(obj, "__dict__"):
            return {"class_path": f"{type(obj).__module__}.{type(obj).__name__}",
                    "init_args": {k: plain(v) for k, v in vars(obj).items() if not k.startswith("_")}}
        return obj if isinstance(obj, (int, float, str, bool, type(None), list, dict)) else str(obj)

    return yaml.safe_dump({k: plain(v) for k, v in cfg.items()}, sort_keys=False)


def _prepare_run_dir(fabric, out_dir: Path, mode: str, cfg: dict, checkpoint: dict | None) -> None:
    if fabric.global_rank != 0 or mode != "fit":
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "hyperparameters.yaml", _config_yaml(cfg))
    done = checkpoint["round"] if checkpoint else 0
    write_jsonl(out_dir / "metrics.jsonl", [r for r in read_jsonl(out_dir / "metrics.jsonl") if r["round"] <= done])


def build_federation(fabric, cfg: dict, timer=None) -> tuple[Federation, list[str]]:
    """Load the backbone, read and split the data, build the method's client modules, feed and aggregator."""
    data: FederatedData = cfg["data"]
    splits = data.setup()  # before the backbone: a wrong data path fails fast, without a download attempt
    bargs: BackboneArgs = cfg["backbone"]
    torch.manual_seed(cfg["seed"])  # a random-init backbone is the same on every rank and every run
    backbone = fabric.to_device(load_backbone(bargs.model, bargs.pretrained, bargs.truncate, bargs.cache_dir))
    train_args: TrainArgs = cfg["train"]
    train_tf, test_tf = clip_transforms(backbone.preprocess_cfg, train_args.augment)
    method: Method = cfg["method"]
    # evaluation sets beyond each client's own test data: base / novel classes, unseen datasets
    eval_sets = [e for e in splits.eval_sets if e.split in ("base", "novel") or not e.seen]
    extra = {e.name: e.samples for e in eval_sets}
    frozen = method.frozen_image_tower
    cache_train = train_args.feature_cache and not train_args.augment
    cache_eval = cfg["eval"].feature_cache or train_args.feature_cache
    if train_args.feature_cache and not frozen:
        raise FedPromptError(f"train.feature_cache: {method.name} trains prompts inside the image tower, so its "
                             "outputs cannot be cached; set --train.feature_cache false.")
    cache = None
    if frozen and (cache_train or cache_eval):
        cache = FeatureCache(backbone, fabric, method.image_inputs, cfg["eval"].batch_size, splits.loader,
                             data.num_workers)
    feed = Feed(splits.clients, extra, train_tf, test_tf, splits.loader, num_workers=data.num_workers,
                pin_memory=fabric.device.type == "cuda", cache=cache, cache_train=cache_train,
                cache_eval=cache_eval and frozen)
    aggregator = method.build_aggregator()
    if hasattr(aggregator, "seed"):  # aggregators with random choices (FedMGP's group selection) follow the run seed
        aggregator.seed = cfg["seed"]
    fed = Federation(fabric=fabric, method=method, backbone=backbone, classnames=splits.classnames,
                     aggregator=aggregator, clients=splits.clients, feed=feed,
                     federation=cfg["federation"], train=train_args, eval=cfg["eval"], seed=cfg["seed"],
                     progress=cfg["log"].progress and fabric.global_rank == 0, timer=timer)
    if eval_sets:
        _attach_set_evaluation(fed, method, eval_sets)
    fed.initial_states()
    return fed, splits.classnames


def _attach_set_evaluation(fed: Federation, method: Method, eval_sets: list) -> None:
    """Base-to-novel and unseen-dataset protocols: each client's prompts are scored on other class lists (client
    modules built on those lists), so the prompt state must not depend on the classes."""
    shapes = {k: tuple(v.shape) for k, v in fed.client.state_dict().items()}
    for eval_set in eval_sets:
        other = {k: tuple(v.shape) for k, v in fed.module_for(eval_set.classnames).state_dict().items()}
        if getattr(method, "csc", False) or other != shapes:
            raise FedPromptError(f"data: the evaluation set {eval_set.name} ({len(eval_set.classnames)} classes) is "
                                 "scored with each client's prompts, which must not depend on the classes "
                                 f"({fed.method.name} here has class-specific tensors; use csc: false).")
    fed.eval_sets = list(eval_sets)


def _restore(fed: Federation, checkpoint: dict) -> None:
    clients = checkpoint["clients"]
    if len(clients) != len(fed.clients):
        raise FedPromptError(f"--resume: the checkpoint has {len(clients)} clients but this config makes "
                             f"{len(fed.clients)}; resume with the config of the run (its hyperparameters.yaml).")
    fed.states = {int(cid): state for cid, state in clients.items()}
    fed.global_state = checkpoint["global"]
    fed.aggregator.load_state_dict(checkpoint.get("aggregator", {}))


def _checkpoint(fed: Federation, round_idx: int, cfg: dict, run_id: str | None) -> dict:
    return {"round": round_idx, "global": fed.global_state, "clients": {cid: s for cid, s in fed.states.items()},
            "aggregator": fed.aggregator.state_dict(), "method": fed.method.name,
            "sampler": {"seed": cfg["seed"], "fraction": cfg["federation"].fraction, "next_round": round_idx + 1},
            "rng": {"torch": torch.get_rng_state()}, "logger_run_id": run_id}


def main(fabric, mode: str, cfg: dict, checkpoint: dict | None = None) -> dict:
    """Run one command on this rank; returns the summary (on every rank)."""
    out_dir = _out_dir(fabric, cfg)
    existing = out_dir / "checkpoints" / "last.ckpt"
    if mode == "fit" and checkpoint is None and existing.exists():
        raise FedPromptError(f"out_dir {out_dir} already holds a run ({existing}); pass --resume {existing} to "
                             "continue it or choose another --out_dir.")
    fed, classnames = build_federation(fabric, cfg)
    _prepare_run_dir(fabric, out_dir, mode, cfg, checkpoint)
    if checkpoint is not None:
        _restore(fed, checkpoint)
    if mode == "evaluate" or not fed.method.trains:
        return _evaluate_only(fabric, fed, mode, cfg, out_dir, checkpoint)
    logger = build_logger(cfg["log"], out_dir, checkpoint.get("logger_run_id") if checkpoint else None,
                          RESOLVED_CONFIG) if fabric.global_rank == 0 else None
    start = checkpoint["round"] + 1 if checkpoint else 1
    rounds = cfg["federation"].rounds
    row: dict = {}
    selector = _Selector(cfg["eval"].select, out_dir)
    bar = tqdm(range(start, rounds + 1), desc="rounds", disable=not fed.progress)
    for round_idx in bar:
        tic = time.perf_counter()
        row = fed.run_round(round_idx)
        if round_idx % cfg["eval"].every == 0 or round_idx == rounds:
            row.update(fed.evaluate_all())
        row["round_seconds"] = time.perf_counter() - tic
        if fabric.global_rank == 0:
            _log_round(out_dir, logger, fed, row)
            state = _checkpoint(fed, round_idx, cfg, logger_run_id(logger))  # the W&B id exists once it logged
            save_checkpoint(state, out_dir / "checkpoints" / "last.ckpt")
            selector.update(row, state)
            every = cfg["log"].checkpoint_every
            if every and round_idx % every == 0:
                save_checkpoint(state, out_dir / "checkpoints" / f"round-{round_idx:04d}.ckpt")
        acc = row.get("local_acc", row.get("own_classes_acc"))
        if acc is not None:
            bar.set_postfix(loss=row.get("train_loss"), acc=acc)
    summary = _summary(fed, classnames, row, out_dir, rounds)
    summary.update(selector.summary())
    if fabric.global_rank == 0:
        write_json(out_dir / "summary.json", summary)
        if logger is not None:
            logger.finalize("success")
        _print_clients(fed, row.get("client_acc"), summary)
    fabric.barrier()
    return summary


class _Selector:
    """Tracks the round with the best mean validation accuracy (``eval.select: val``)."""

    def __init__(self, rule: str, out_dir: Path):
        self.rule = rule
        self.out_dir = out_dir

    def update(self, row: dict, state: dict) -> None:
        if self.rule != "val" or row.get("val_acc") is None:
            return
        rows = [r for r in read_jsonl(self.out_dir / "metrics.jsonl") if r.get("val_acc") is not None]
        if max(rows, key=lambda r: r["val_acc"])["round"] == row["round"]:  # a new best (ties keep the first)
            save_checkpoint(state, self.out_dir / "checkpoints" / "best.ckpt")

    def summary(self) -> dict:
        if self.rule != "val":
            return {}
        rows = [r for r in read_jsonl(self.out_dir / "metrics.jsonl") if r.get("val_acc") is not None]
        if not rows:
            return {}
        best = max(rows, key=lambda r: r["val_acc"])  # the first round with the best validation accuracy
        keys = ("round", "val_acc", "local_acc", "local_acc_std", "own_classes_acc", "global_acc", "base_acc",
                "novel_acc", "hm", "cm", "unseen_acc")
        return {"model_selection": "round with the best mean validation accuracy (checkpoints/best.ckpt)",
                "selected": {k: best[k] for k in keys if k in best}}


def _log_round(out_dir: Path, logger, fed: Federation, row: dict) -> None:
    with open(out_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    if logger is not None:
        logger.log_metrics(numeric_metrics(row), step=row["round"])
        if "client_acc" in row:
            log_client_table(logger, row["round"], [c.name for c in fed.clients], row["client_acc"],
                             [len(c.train) for c in fed.clients])


def _summary(fed: Federation, classnames: list[str], row: dict, out_dir: Path, rounds: int) -> dict:
    keys = ("local_acc", "local_acc_std", "own_classes_acc", "own_classes_acc_std", "global_acc", "val_acc",
            "base_acc", "novel_acc", "hm", "cm", "unseen_acc", "set_acc", "client_acc",
            "client_base_acc", "client_novel_acc", "train_loss")
    return {"method": fed.method.name, "rounds": rounds, "model_selection": "last round (no test-set selection)",
            **{k: row[k] for k in keys if k in row}, "clients": [c.name for c in fed.clients],
            "num_train": [len(c.train) for c in fed.clients], "num_test": [len(c.test) for c in fed.clients],
            "classnames": classnames, "out_dir": str(out_dir)}


def _evaluate_only(fabric, fed: Federation, mode: str, cfg: dict, out_dir: Path, checkpoint: dict | None) -> dict:
    metrics = fed.evaluate_all()
    done = checkpoint["round"] if checkpoint else 0
    summary = _summary(fed, [], {**metrics, "round": done}, out_dir, done)
    summary.pop("classnames")
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if mode != "evaluate":
            write_text(out_dir / "hyperparameters.yaml", _config_yaml(cfg))
            write_jsonl(out_dir / "metrics.jsonl", [{"round": 0, **metrics}])
        write_json(out_dir / ("eval.json" if mode == "evaluate" else "summary.json"), summary)
        _print_clients(fed, metrics["client_acc"], summary)
    fabric.barrier()
    return summary


def _print_clients(fed: Federation, client_acc: list[float] | None, summary: dict) -> None:
    if client_acc is None:
        return
    print(f"{'client':>6}  {'name':<16} {'train':>6} {'test':>6}  acc")
    for cid, (client, acc) in enumerate(zip(fed.clients, client_acc)):
        acc_text = "n/a" if math.isnan(acc) else f"{acc:.4f}"
        print(f"{cid:>6}  {client.name:<16} {len(client.train):>6} {len(client.test):>6}  {acc_text}")
    local = "local_acc" if "local_acc" in summary else "own_classes_acc"
    line = f"{local} {summary[local]:.4f} +- {summary[local + '_std']:.4f}"
    if "global_acc" in summary:
        line += f"   global_acc {summary['global_acc']:.4f}"
    if "hm" in summary:
        line += (f"   base {summary['base_acc']:.4f} novel {summary['novel_acc']:.4f} hm {summary['hm']:.4f} "
                 f"cm {summary['cm']:.4f}")
    print(line + f"   -> {summary['out_dir']}")
