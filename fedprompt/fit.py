"""``fedprompt fit | zeroshot | evaluate``: build Fabric, launch, wire backbone, data and method, run the rounds.

The commands themselves (:func:`fit`, :func:`zeroshot`, :func:`evaluate`, typed on :class:`fedprompt.run.RunArgs`)
live in :mod:`fedprompt.commands`; each is :func:`setup` (checks the arguments and the checkpoint, builds Fabric
and launches one process per device) followed by :func:`main` on every rank (claims the run directory, reads the data, loads the
backbone once, builds the method's client and aggregator, runs :mod:`fedprompt.federation.loop`, writes the run
directory on rank 0). Everything that can be checked without loading data or a model is checked first.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import fields, is_dataclass, replace
from datetime import datetime
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from fedprompt import rundir
from fedprompt.args import BackboneArgs, TrainArgs
from fedprompt.run import RunArgs
from fedprompt.backbone import load_backbone
from fedprompt.backbone.loading import check_source
from fedprompt.data.cache import FeatureCache
from fedprompt.data.reader import FederatedData
from fedprompt.data.transforms import clip_transforms
from fedprompt.errors import FedPromptError, warn
from fedprompt.federation.checkpoint import check_resume, check_shapes, load_checkpoint, read_jsonl, \
    save_checkpoint, state_shapes, write_json, write_jsonl, write_text
from fedprompt.federation.feed import CachedFeatures, Feed, ImageFiles, StoredImages, sample_lists
from fedprompt.federation.loop import Federation
from fedprompt.loggers import build_logger, log_client_table, logger_run_id, numeric_metrics, save_logger
from fedprompt.methods.method import Method
from fedprompt.paths import missing_dirs, remove_if_left_empty


def __getattr__(name: str):
    """``fedprompt.fit.fit`` / ``zeroshot`` / ``evaluate``: the commands (defined in :mod:`fedprompt.commands`)."""
    if name in ("fit", "zeroshot", "evaluate"):
        import fedprompt.commands

        return getattr(fedprompt.commands, name)
    raise AttributeError(f"module 'fedprompt.fit' has no attribute {name!r}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command; its message names the run directory and the exact command that resumes it."""


def setup(mode: str, run: RunArgs) -> dict:
    """Check the arguments and the checkpoint, build Fabric and run :func:`main` on every process (``mode``: fit,
    zeroshot or evaluate)."""
    run = replace(run)  # settings filled in below (the zero-shot method, the resumed run's folder) stay local
    _check_arguments(mode, run)
    checkpoint = load_checkpoint(run.resume) if run.resume else None
    if checkpoint is not None:
        check_resume(checkpoint, run.resume, run.method.name, run.method.hparams())
        origin = rundir.run_dir_of(run.resume)
        if run.out_dir is None and origin is not None:
            run.out_dir = str(origin)  # a resumed run continues in its own folder
        if mode == "fit" and checkpoint["round"] >= run.federation.rounds:
            complete = _completed_run(run, checkpoint)
            if complete is not None:
                return complete
    import lightning as L  # here, not at import time: the CLI builds its parser without it

    fab = run.fabric
    fabric = L.Fabric(accelerator=fab.accelerator, devices=fab.devices, num_nodes=fab.num_nodes,
                      strategy=fab.strategy, precision=fab.precision)
    fabric.launch()
    return main(fabric, mode, run, checkpoint)


def _check_arguments(mode: str, run: RunArgs) -> None:
    """Checks that need no data and no model (the ranges of numbers are checked by the argument dataclasses)."""
    if mode == "zeroshot" and run.method is None:
        from fedprompt.methods import ZeroShot

        run.method = ZeroShot()
    if run.method is None:
        raise FedPromptError("method is not set: give a config with method.class_path (e.g. "
                             "fedprompt.methods.PromptFL) or --method PromptFL.")
    if run.data is None:
        raise FedPromptError("data is not set: give a config with data.class_path (e.g. fedprompt.data.DomainFolders).")
    if run.eval.select == "val" and not run.data.validation:
        raise FedPromptError("eval.select=val needs a validation set: set data.validation: true.")
    if mode == "evaluate" and not run.resume:
        raise FedPromptError("evaluate needs --resume DIR/checkpoints/last.ckpt (the checkpoint to evaluate).")
    if run.resume and run.overwrite:
        raise FedPromptError("--overwrite true deletes the run that --resume continues: pass only one of them.")
    if mode == "zeroshot" and run.resume:
        raise FedPromptError("zeroshot takes no --resume (it trains nothing); use fedprompt evaluate --resume.")


def _completed_run(run: RunArgs, checkpoint: dict) -> dict | None:
    """``fit --resume`` of a run that already reached ``federation.rounds``: say so and change nothing; returns its
    summary (``None`` when its summary.json is missing: the run then rewrites it from metrics.jsonl)."""
    if run.out_dir is None or not (Path(run.out_dir) / "summary.json").is_file():
        return None
    out_dir = Path(run.out_dir)
    summary_path = out_dir / "summary.json"
    done, rounds = checkpoint["round"], run.federation.rounds
    more = (f"it has {done} rounds, more than --federation.rounds {rounds}" if done > rounds
            else f"round {done} of {rounds}")
    print(f"fedprompt: the run in {out_dir} is complete ({more}); nothing changed. Raise --federation.rounds to "
          "continue it.", flush=True)
    return json.loads(summary_path.read_text())


def _out_dir(fabric, run: RunArgs) -> Path:
    out = run.out_dir
    if out is None:
        out = f"runs/{run.method.name.lower()}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(fabric.broadcast(out, src=0))


def _claim_run_dir(fabric, mode: str, run: RunArgs, out_dir: Path) -> None:
    """Rank 0 checks that ``out_dir`` can be written and holds no other run (deleting it with ``--overwrite``);
    every rank raises the same one-line error."""
    problem = None
    if fabric.global_rank == 0:
        problem = rundir.claim_problem(out_dir, mode, run.resume, run.overwrite) or rundir.not_writable(out_dir)
        if problem is None and run.overwrite and mode != "evaluate" and rundir.holds_run(out_dir):
            rundir.clear(out_dir)
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise FedPromptError(problem)


def run_config(run: RunArgs) -> dict:
    """The run's configuration as a plain dict (what hyperparameters.yaml holds): the command line's resolved
    config, or, for a run started from Python, one rebuilt from the objects (``class_path`` and ``init_args`` for the
    method and the data)."""
    if run.resolved_config is not None:
        return {**run.resolved_config, "overwrite": False}

    def plain(obj):
        if is_dataclass(obj) and not isinstance(obj, type):
            values = {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
            if isinstance(obj, Method):
                return {"class_path": f"{type(obj).__module__}.{type(obj).__name__}", "init_args": values}
            return values
        if hasattr(obj, "__dict__"):
            return {"class_path": f"{type(obj).__module__}.{type(obj).__name__}",
                    "init_args": {k: plain(v) for k, v in vars(obj).items() if not k.startswith("_")}}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj if isinstance(obj, (int, float, str, bool, type(None), dict)) else str(obj)

    config = {f.name: plain(getattr(run, f.name)) for f in fields(run) if f.name != "resolved_config"}
    return {**config, "overwrite": False}


def _config_yaml(run: RunArgs) -> str:
    return yaml.safe_dump(run_config(run), sort_keys=False)


def _prepare_run_dir(fabric, out_dir: Path, mode: str, run: RunArgs, checkpoint: dict | None,
                     bad_images: list[tuple[str, str]]) -> list[dict]:
    """Rank 0 of fit: write hyperparameters.yaml and the list of left-out images, keep the metrics rows up to the
    checkpoint; returns those rows (empty on the other ranks, which log nothing)."""
    if mode != "fit" or fabric.global_rank != 0:
        return []
    done = checkpoint["round"] if checkpoint else 0
    rows = [r for r in read_jsonl(out_dir / "metrics.jsonl") if r["round"] <= done]
    write_text(out_dir / "hyperparameters.yaml", _config_yaml(run))
    write_jsonl(out_dir / "metrics.jsonl", rows)
    if bad_images:
        write_text(out_dir / "bad_images.txt", "".join(f"{path}\t{why}\n" for path, why in bad_images))
    return rows


def _read_data_and_check_weights(run: RunArgs):
    """Read and split the data and check that the backbone's weights can be had; a problem with both is reported
    in one message (so a first run does not stop on the data and a second on the weights)."""
    bargs: BackboneArgs = run.backbone
    problems, splits = [], None
    try:
        splits = run.data.setup()  # before the backbone: a wrong data path fails fast
    except FedPromptError as err:
        problems.append(str(err))
    try:
        check_source(bargs.model, bargs.pretrained)
    except FedPromptError as err:
        problems.append(str(err))
    if len(problems) == 1:
        raise FedPromptError(problems[0])
    if problems:
        raise FedPromptError(" Also: ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
    return splits


def build_federation(fabric, run: RunArgs, splits=None, timer=None,
                     feed_clients: list[int] | None = None) -> tuple[Federation, list[str]]:
    """Load the backbone, read and split the data (unless ``splits`` are given), build the method's client modules,
    feed and aggregator (``timer``: the round benchmark's section timer; ``feed_clients``: the clients whose images
    this process reads, default all: a deployed node reads only its own client's, a server none)."""
    splits = splits if splits is not None else _read_data_and_check_weights(run)
    bargs: BackboneArgs = run.backbone
    torch.manual_seed(run.seed)  # a random-init backbone is the same on every rank and every run
    backbone = fabric.to_device(load_backbone(bargs.model, bargs.pretrained, bargs.truncate, bargs.cache_dir))
    train_args: TrainArgs = run.train
    backbone.compile_text(train_args.compile)  # the backbone is shared by the runs of a process: set, or reset
    train_tf, test_tf = clip_transforms(backbone.preprocess_cfg, train_args.augment)
    method: Method = run.method
    # evaluation sets beyond each client's own test data: base / novel classes, unseen datasets
    eval_sets = [e for e in splits.eval_sets if e.split in ("base", "novel") or not e.seen]
    extra = {e.name: e.samples for e in eval_sets}
    feed = _build_feed(fabric, run, splits, extra, backbone, train_tf, test_tf, feed_clients)
    aggregator = method.build_aggregator()
    aggregator.seed = run.seed  # aggregators with random choices (FedMGP's group selection) follow the run seed
    fed = Federation(fabric=fabric, method=method, backbone=backbone, classnames=splits.classnames,
                     aggregator=aggregator, clients=splits.clients, feed=feed,
                     federation=run.federation, train=train_args, eval=run.eval, seed=run.seed,
                     progress=run.log.progress and fabric.global_rank == 0, timer=timer)
    if eval_sets:
        _attach_set_evaluation(fed, method, eval_sets)
    fed.initial_states()
    return fed, splits.classnames


def _cache_dir(train_args: TrainArgs) -> Path | None:
    if train_args.cache_dir is None:
        return None
    if train_args.cache_dir == "auto":
        from fedprompt.data.store import default_cache_dir

        return default_cache_dir()
    return Path(train_args.cache_dir).expanduser()


def _store(fabric, samples, loader, kind, directory: Path | None, num_workers: int, progress: bool):
    """An ImageStore of ``samples``, built by rank 0 first when it persists (the other ranks then load it), moved
    to the GPU when it takes under a quarter of the free memory."""
    from fedprompt.data.store import ImageStore

    folder = directory / "images" if directory is not None else None
    store = None
    if folder is None or fabric.global_rank == 0:
        store = ImageStore.build(samples, loader, kind, directory=folder, num_workers=num_workers, progress=progress)
    if folder is not None and fabric.world_size > 1:
        fabric.barrier()
        if store is None:
            store = ImageStore.build(samples, loader, kind, directory=folder, num_workers=num_workers,
                                     progress=False)
    if fabric.device.type == "cuda" and not store.mmapped:
        free, _ = torch.cuda.mem_get_info(fabric.device)
        if store.nbytes < free // 4:
            store = store.to(fabric.device)
    return store


def _build_feed(fabric, run: RunArgs, splits, extra: dict, backbone, train_tf, test_tf,
                feed_clients: list[int] | None = None) -> Feed:
    """The data side of the run: the feature cache where the image tower is frozen, decode-once image stores where
    images go through the tower (exact test-transform store; train store for ``train.device_augment``); only the
    clients of ``feed_clients`` when given (and the extra evaluation sets only when it is not empty)."""
    from fedprompt.data.store import StoreKind, default_store_size

    method: Method = run.method
    train_args: TrainArgs = run.train
    data: FederatedData = run.data
    frozen = method.frozen_image_tower
    if train_args.feature_cache and not frozen:
        raise FedPromptError(f"train.feature_cache: {method.name} trains prompts inside the image tower, so its "
                             "outputs cannot be cached; set --train.feature_cache false.")
    if train_args.feature_cache and train_args.augment and method.trains:
        warn("train.feature_cache: train images are augmented (train.augment: true), so only evaluation is cached; "
             "set --train.augment false to cache the train images too.")
    if train_args.device_augment and not train_args.augment:
        raise FedPromptError("train.device_augment augments on the device: it needs --train.augment true.")
    directory = _cache_dir(train_args)
    progress = run.log.progress and fabric.global_rank == 0
    cache_train = train_args.feature_cache and not train_args.augment
    cache_eval = frozen and run.eval.feature_cache
    clients = [c for c in splits.clients if feed_clients is None or c.client_id in feed_clients]
    extra = extra if clients else {}
    eval_samples = [s for c in clients for s in c.test + c.val] + [s for v in extra.values() for s in v]
    train_samples = [s for c in clients for s in c.train]
    test_needed = ([] if cache_eval else eval_samples) + ([] if cache_train or train_args.augment else train_samples)
    test_store = None
    if test_needed:
        test_store = _store(fabric, test_needed, splits.loader, StoreKind.test(test_tf), directory,
                            data.num_workers, progress)
    train_store = augment = None
    if train_args.device_augment:
        from fedprompt.data.augment import DeviceAugment

        augment = DeviceAugment.from_preprocess(backbone.preprocess_cfg)
        train_store = _store(fabric, train_samples, splits.loader, StoreKind.train(default_store_size(augment.size)),
                             directory, data.num_workers, progress)
    cache = None
    if cache_train or cache_eval:
        cache = FeatureCache(backbone, fabric, method.image_inputs, run.eval.batch_size, splits.loader,
                             data.num_workers, directory=directory)
        if cache_eval and eval_samples:
            cache.prepare(eval_samples, test_tf, "test")  # one chunk, encoded once (or loaded from the cache dir)
    lists = sample_lists(clients, extra)
    transforms = {"train": train_tf, "test": test_tf, "val": test_tf}
    files = ImageFiles(lists, transforms, splits.loader, data.num_workers, pin_memory=fabric.device.type == "cuda")
    cached = CachedFeatures(cache, lists, transforms) if cache is not None else None
    stored = StoredImages(test_store, lists) if test_store is not None else None
    if cache_train:
        train = cached
    elif train_store is not None:
        train = StoredImages(train_store, lists, augment)
    elif stored is not None and train_tf is test_tf:  # deterministic train images: the test-transform store
        train = stored
    else:
        train = files
    return Feed(lists, train, cached if cache_eval else stored or files)


def _attach_set_evaluation(fed: Federation, method: Method, eval_sets: list) -> None:
    """Base-to-novel and unseen-dataset protocols: each client's prompts are scored on other class lists (client
    modules built on those lists), so the prompt state must not depend on the classes."""
    shapes = {k: tuple(v.shape) for k, v in fed.client.state_dict().items()}
    for eval_set in eval_sets:
        other = {k: tuple(v.shape) for k, v in fed.module_for(eval_set.classnames).state_dict().items()}
        if not fed.client.switchable_classes or other != shapes:
            raise FedPromptError(f"data: the evaluation set {eval_set.name} ({len(eval_set.classnames)} classes) is "
                                 "scored with each client's prompts, which must not depend on the classes "
                                 f"({fed.method.name} here has class-specific tensors; use csc: false).")
    fed.eval_sets = list(eval_sets)


def _restore(fed: Federation, checkpoint: dict, path: str) -> None:
    check_shapes(checkpoint, path, state_shapes(fed.states[0]))
    clients = checkpoint["clients"]
    if len(clients) != len(fed.clients):
        raise FedPromptError(f"--resume: the checkpoint has {len(clients)} clients but this config makes "
                             f"{len(fed.clients)}; resume with the config of the run (its hyperparameters.yaml).")
    fed.states = {int(cid): state for cid, state in clients.items()}
    fed.global_state = checkpoint["global"]
    fed.aggregator.load_state_dict(checkpoint.get("aggregator", {}))


def _checkpoint(fed: Federation, round_idx: int, run: RunArgs, run_id: str | None) -> dict:
    return {"round": round_idx, "global": fed.global_state, "clients": {cid: s for cid, s in fed.states.items()},
            "aggregator": fed.aggregator.state_dict(), "method": fed.method.name,
            "method_hparams": fed.method.hparams(), "shapes": state_shapes(fed.states[min(fed.states)]),
            "sampler": {"seed": run.seed, "fraction": run.federation.fraction, "next_round": round_idx + 1},
            "rng": {"torch": torch.get_rng_state()}, "logger_run_id": run_id}


def main(fabric, mode: str, run: RunArgs, checkpoint: dict | None = None) -> dict:
    """Run one command on this rank; returns the summary (on every rank)."""
    out_dir = _out_dir(fabric, run)
    created = missing_dirs(out_dir) if fabric.global_rank == 0 else []
    _claim_run_dir(fabric, mode, run, out_dir)
    try:
        with remove_if_left_empty(created):  # a run that fails before writing anything leaves no empty folder
            return _run(fabric, mode, run, checkpoint, out_dir)
    except KeyboardInterrupt:
        raise Interrupted(_interrupt_message(mode, run, out_dir)) from None


def _interrupt_message(mode: str, run: RunArgs, out_dir: Path) -> str:
    last = out_dir / "checkpoints" / "last.ckpt"
    if mode != "fit":  # zeroshot and evaluate write their files at the end
        return f"interrupted; nothing was written to {out_dir}. Run the same command again."
    if last.is_file():
        done = torch.load(last, map_location="cpu", weights_only=True)["round"]
        return (f"interrupted; {out_dir} holds round {done} of {run.federation.rounds} in checkpoints/last.ckpt. "
                f"Resume with: {rundir.resume_command(out_dir)}")
    config = shlex.quote(str(out_dir / "hyperparameters.yaml"))
    if not (out_dir / "hyperparameters.yaml").is_file():
        return f"interrupted before the run started; nothing was written to {out_dir}."
    return (f"interrupted before the first round was saved; nothing to resume in {out_dir}. Start again with: "
            f"fedprompt fit --config {config} --out_dir {shlex.quote(str(out_dir))}")


def _run(fabric, mode: str, run: RunArgs, checkpoint: dict | None, out_dir: Path) -> dict:
    splits = _read_data_and_check_weights(run)
    fed, classnames = build_federation(fabric, run, splits)
    previous = _prepare_run_dir(fabric, out_dir, mode, run, checkpoint, splits.bad_images)
    if checkpoint is not None:
        _restore(fed, checkpoint, run.resume)
    if mode != "fit" or not fed.method.trains:  # zeroshot never trains, whatever the method
        return _evaluate_only(fabric, fed, mode, run, out_dir, checkpoint)
    logger = build_logger(run.log, out_dir, checkpoint.get("logger_run_id") if checkpoint else None,
                          run_config(run), previous) if fabric.global_rank == 0 else None
    start = checkpoint["round"] + 1 if checkpoint else 1
    rounds = run.federation.rounds
    row: dict = previous[-1] if previous else {}  # a resumed complete run rewrites its summary from its last row
    selector = _Selector(run.eval.select, out_dir)
    bar = tqdm(range(start, rounds + 1), desc="rounds", disable=not fed.progress)
    for round_idx in bar:
        tic = time.perf_counter()
        row = fed.run_round(round_idx)
        if round_idx % run.eval.every == 0 or round_idx == rounds:
            row.update(fed.evaluate_all())
        row["round_seconds"] = time.perf_counter() - tic
        if fabric.global_rank == 0:
            _log_round(out_dir, logger, fed, row)
            save_logger(logger)
            state = _checkpoint(fed, round_idx, run, logger_run_id(logger))  # the W&B id exists once it logged
            save_checkpoint(state, out_dir / "checkpoints" / "last.ckpt")
            selector.update(row, state)
            every = run.log.checkpoint_every
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


def _evaluate_only(fabric, fed: Federation, mode: str, run: RunArgs, out_dir: Path, checkpoint: dict | None) -> dict:
    metrics = fed.evaluate_all()
    done = checkpoint["round"] if checkpoint else 0
    summary = _summary(fed, [], {**metrics, "round": done}, out_dir, done)
    summary.pop("classnames")
    if mode == "evaluate":
        summary["checkpoint"] = str(run.resume)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if mode != "evaluate":
            write_text(out_dir / "hyperparameters.yaml", _config_yaml(run))
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
