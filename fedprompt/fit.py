"""``fedprompt fit | zeroshot | evaluate``: build Fabric, launch, wire backbone, data and method, run the rounds.

The commands themselves (:func:`fit`, :func:`zeroshot`, :func:`evaluate`, typed on :class:`fedprompt.run.RunArgs`)
live in :mod:`fedprompt.commands`; each is :func:`setup` (checks the arguments and the checkpoint, builds Fabric
and launches one process per device) followed by :func:`main` on every rank (claims the run directory, reads the
data, loads the backbone once, builds the method's client and aggregator, runs :mod:`fedprompt.federation.loop`,
writes the run directory on rank 0). Everything that can be checked without loading data or a model is checked first.

The run-directory steps are public, because the Flower server (:mod:`fedprompt.flower.server_app`) writes the same
folder the same way: :func:`resolve_out_dir`, :func:`claimed_run_dir` (the one-writer lock and the claim checks),
:func:`read_data_and_check_weights`, :func:`prepare_run_dir`, then per round :func:`save_round` (metrics row,
logger, :func:`checkpoint_state` into ``checkpoints/last.ckpt``, :class:`BestRoundSelector`) and at the end
:func:`run_summary`.
"""

from __future__ import annotations

import errno
import json
import math
import shlex
import time
from contextlib import contextmanager
from dataclasses import MISSING, fields, is_dataclass, replace
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
from fedprompt.federation.checkpoint import append_jsonl, check_resume, check_shapes, load_checkpoint, read_jsonl, \
    save_checkpoint, state_shapes, write_json, write_jsonl, write_text
from fedprompt.federation.feed import CachedFeatures, Feed, ImageFiles, StoredImages, sample_lists
from fedprompt.federation.loop import Federation
from fedprompt.federation.eval_summaries import is_summary_key
from fedprompt.federation.scenarios import central_train, evaluation_sets, scenario_keys, scenario_line
from fedprompt.loggers import build_logger, check_logger, log_client_table, logger_run_id, numeric_metrics, \
    save_logger
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
        origin = rundir.run_dir_of(run.resume)
        if run.out_dir is None and origin is not None:
            run.out_dir = str(origin)  # a resumed run continues in its own folder
    if run.resolved_config is None:  # a run started from Python: its config, fixed before anything runs
        run.resolved_config = run_config(run)
    if checkpoint is not None:
        check_resume(checkpoint, run.resume, run.method.name, run.method.hparams(),
                     config=run_config(run) if mode == "fit" else None,
                     default_of=lambda key: setting_default(run, key))
        if mode == "fit" and checkpoint["round"] >= run.federation.rounds:
            complete = _completed_run(run, checkpoint)
            if complete is not None:
                return complete
    fabric = _build_fabric(run)
    fabric.launch()
    return main(fabric, mode, run, checkpoint)


def _build_fabric(run: RunArgs):
    """Lightning Fabric from the ``fabric`` settings; settings Lightning refuses are one line naming them."""
    import lightning as L  # here, not at import time: the CLI builds its parser without it

    fab = run.fabric
    try:
        return L.Fabric(accelerator=fab.accelerator, devices=fab.devices, num_nodes=fab.num_nodes,
                        strategy=fab.strategy, precision=fab.precision)
    except Exception as err:  # noqa: BLE001 - Lightning raises ValueError, RuntimeError, MisconfigurationException
        reason = " ".join(str(err).split()) or type(err).__name__
        raise FedPromptError(f"fabric: Lightning cannot run with accelerator {fab.accelerator}, devices "
                             f"{fab.devices}, num_nodes {fab.num_nodes}, strategy {fab.strategy}, precision "
                             f"{fab.precision} ({reason[:300]}); change the --fabric settings.") from None


def _check_arguments(mode: str, run: RunArgs) -> None:
    """Checks that need no data and no model (the ranges of numbers and the names Lightning knows are checked by
    the argument dataclasses): the settings fit together, the accelerator asked for exists on this machine, the
    logger's package is installed."""
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
    check_accelerator(run.fabric.accelerator)
    if mode != "evaluate":
        check_logger(run.log)


def check_accelerator(name: str) -> None:
    """The accelerator asked for is present on this machine (Lightning's own availability test); one line if not."""
    from lightning.fabric.accelerators import ACCELERATOR_REGISTRY, CUDAAccelerator, MPSAccelerator

    if name == "auto":
        return
    if name == "gpu":
        if not (CUDAAccelerator.is_available() or MPSAccelerator.is_available()):
            raise FedPromptError("--fabric.accelerator gpu: this machine has no GPU Lightning can use (neither CUDA "
                                 "nor MPS); pass --fabric.accelerator cpu (or auto).")
        return
    if name in ACCELERATOR_REGISTRY and not ACCELERATOR_REGISTRY.get(name).is_available():
        what = {"cuda": "CUDA device (torch.cuda.is_available() is false)", "mps": "Apple MPS device"}
        raise FedPromptError(f"--fabric.accelerator {name}: this machine has no {what.get(name, name + ' device')}; "
                             "pass --fabric.accelerator cpu (or auto, which takes what there is).")


def setting_default(run: RunArgs, key: str):
    """The default of setting ``key`` (dotted, without ``init_args``) of this run's classes: a dataclass field's
    default or an ``__init__`` parameter's; a value that equals nothing when it cannot be told. Used on resume for
    a setting the checkpoint does not record (added to fedprompt after the run started)."""
    import inspect

    unknown = object()
    *path, name = key.split(".")
    obj = run
    for part in path:
        obj = getattr(obj, part, None)
        if obj is None:
            return unknown
    for field in fields(obj) if is_dataclass(obj) else ():
        if field.name == name:
            if field.default is not MISSING:
                return field.default
            return field.default_factory() if field.default_factory is not MISSING else unknown
    for klass in type(obj).__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and klass is not object:
            param = inspect.signature(init).parameters.get(name)
            if param is not None and param.default is not inspect.Parameter.empty:
                return param.default
    return unknown


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


def resolve_out_dir(fabric, run: RunArgs) -> Path:
    """The run directory: ``--out_dir``, or ``runs/<method>-<date-time>`` chosen on rank 0 (every rank gets the
    same one)."""
    out = run.out_dir
    if out is None:
        out = f"runs/{run.method.name.lower()}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(fabric.broadcast(out, src=0))


@contextmanager
def claimed_run_dir(fabric, mode: str, run: RunArgs, out_dir: Path):
    """Hold ``out_dir`` for this command: rank 0 checks that it can be written, takes its one-writer lock
    (:class:`fedprompt.rundir.RunLock`) and checks that it holds no other run; every rank raises the same one-line
    error. Nothing is deleted here: ``--overwrite`` clears the old run only once the new run's checks passed
    (:func:`_begin_writing`)."""
    lock = rundir.RunLock(out_dir)
    problem = None
    if fabric.global_rank == 0:
        problem = (rundir.not_writable(out_dir) or lock.acquire()
                   or rundir.claim_problem(out_dir, mode, run.resume, run.overwrite))
    problem = fabric.broadcast(problem, src=0)
    try:
        if problem:
            raise FedPromptError(problem)
        yield
    finally:
        lock.release()


def _begin_writing(fabric, mode: str, run: RunArgs, out_dir: Path) -> None:
    """Every check passed and the run writes its first file: with ``--overwrite`` the old run goes now (rank 0)."""
    if fabric.global_rank == 0 and run.overwrite and mode != "evaluate" and rundir.holds_run(out_dir):
        rundir.clear(out_dir)


@contextmanager
def _writing(out_dir: Path, saved_round: int | None = None):
    """A failed write (a full disk, a read-only or vanished folder) is one line naming the folder and what was kept
    (``saved_round``: the round checkpoints/last.ckpt holds; ``None`` before training)."""
    try:
        yield
    except OSError as err:
        raise FedPromptError(_write_problem(out_dir, err, saved_round)) from None


def _write_problem(out_dir: Path, err: OSError, saved_round: int | None) -> str:
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (the disk or quota is full)"
    where = f"; {err.filename}" if err.filename else ""
    head = f"cannot write the run directory {out_dir} ({reason}{where})"
    if saved_round is None:
        return f"{head}; nothing of this run was changed. Free space or fix the folder, then run the command again."
    if saved_round == 0:
        return f"{head}; no round was saved yet. Free space or fix the folder, then run the command again."
    return (f"{head}; checkpoints/last.ckpt keeps round {saved_round} and metrics.jsonl its rows. Free space or fix "
            f"the folder, then resume: {rundir.resume_command(out_dir)}")


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


def prepare_run_dir(fabric, out_dir: Path, mode: str, run: RunArgs, checkpoint: dict | None,
                    bad_images: list[tuple[str, str]]) -> list[dict]:
    """Rank 0 of fit, once every check passed: clear the old run (``--overwrite``), write hyperparameters.yaml and
    the list of left-out images, keep the metrics rows up to the checkpoint (a torn last row, cut short by a crash
    or a full disk, is dropped with a warning); returns those rows (empty on the other ranks, which log nothing)."""
    if mode != "fit" or fabric.global_rank != 0:
        return []
    done = checkpoint["round"] if checkpoint else 0
    torn: list[str] = []
    rows = [r for r in read_jsonl(out_dir / "metrics.jsonl", torn) if r["round"] <= done] if checkpoint else []
    if torn:
        warn(f"{out_dir / 'metrics.jsonl'}: dropped its torn last line (a write cut short by a crash or a full disk); "
             f"the run continues from checkpoints/last.ckpt (round {done}) and the CSV log is rebuilt.")
    with _writing(out_dir, done if checkpoint else None):
        _begin_writing(fabric, mode, run, out_dir)
        write_text(out_dir / "hyperparameters.yaml", _config_yaml(run))
        write_jsonl(out_dir / "metrics.jsonl", rows)
        if bad_images:
            write_text(out_dir / "bad_images.txt", "".join(f"{path}\t{why}\n" for path, why in bad_images))
    return rows


def read_data_and_check_weights(run: RunArgs):
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
    splits = splits if splits is not None else read_data_and_check_weights(run)
    aggregator = _build_aggregator(fabric, run, len(splits.clients))  # before the backbone: dp errors fail fast
    bargs: BackboneArgs = run.backbone
    torch.manual_seed(run.seed)  # a random-init backbone is the same on every rank and every run
    backbone = fabric.to_device(load_backbone(bargs.model, bargs.pretrained, bargs.truncate, bargs.cache_dir))
    train_args: TrainArgs = run.train
    if run.federation.central:  # the centralised bound: every client's data pooled into one client
        from fedprompt.data.scenarios import centralize

        train_args = central_train(train_args, run.federation, len(splits.clients))
        splits = centralize(splits)
    backbone.compile_text(train_args.compile)  # the backbone is shared by the runs of a process: set, or reset
    train_tf, test_tf = clip_transforms(backbone.preprocess_cfg, train_args.augment)
    method: Method = run.method
    # evaluation sets beyond each client's own test data: base / novel classes, unseen datasets, global, domains
    eval_sets = evaluation_sets(splits, run.eval)
    method.prepare_data(splits, eval_sets)  # per-dataset side data (FedMVP's attributes), checked before any write
    extra = {e.name: e.samples for e in eval_sets}
    feed = _build_feed(fabric, run, splits, extra, backbone, train_tf, test_tf, feed_clients)
    fed = Federation(fabric=fabric, method=method, backbone=backbone, classnames=splits.classnames,
                     aggregator=aggregator, clients=splits.clients, feed=feed,
                     federation=run.federation, train=train_args, eval=run.eval, seed=run.seed,
                     progress=run.log.progress and fabric.global_rank == 0, timer=timer,
                     class_groups=splits.class_groups)
    if eval_sets:
        _attach_set_evaluation(fed, method, eval_sets)
    fed.initial_states()
    return fed, splits.classnames


def _build_aggregator(fabric, run: RunArgs, num_clients: int):
    """The method's server rule, seeded with the run seed (aggregators with random choices, such as FedMGP's group
    selection, follow it), inside the client-level DP server (DP-FedAvg) when ``run.dp`` is on."""
    aggregator = run.method.build_aggregator()
    if run.dp.enabled:
        from fedprompt.federation.privacy import build_private_aggregator

        aggregator = build_private_aggregator(run.dp, run.method, aggregator, num_clients, run.federation,
                                              quiet=fabric.global_rank != 0)
    aggregator.seed = run.seed
    return aggregator


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


def checkpoint_state(fed: Federation, round_idx: int, run: RunArgs, run_id: str | None) -> dict:
    """What ``checkpoints/last.ckpt`` holds after ``round_idx``: the global and every client's prompt state, the
    aggregator's state, the method and its settings, the config, the sampler's position, the RNG and the logger's
    run id (so ``--resume`` continues the same W&B run)."""
    return {"round": round_idx, "global": fed.global_state, "clients": {cid: s for cid, s in fed.states.items()},
            "aggregator": fed.aggregator.state_dict(), "method": fed.method.name,
            "method_hparams": fed.method.hparams(), "shapes": state_shapes(fed.states[min(fed.states)]),
            "config": run_config(run),
            "sampler": {"seed": run.seed, "fraction": run.federation.fraction, "next_round": round_idx + 1},
            "rng": {"torch": torch.get_rng_state()}, "logger_run_id": run_id}


def main(fabric, mode: str, run: RunArgs, checkpoint: dict | None = None) -> dict:
    """Run one command on this rank; returns the summary (on every rank)."""
    out_dir = resolve_out_dir(fabric, run)
    created = missing_dirs(out_dir) if fabric.global_rank == 0 else []
    try:
        # a run that fails before writing anything leaves no empty folder; the lock goes first
        with remove_if_left_empty(created), claimed_run_dir(fabric, mode, run, out_dir):
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
    """Check everything, then touch anything: the data, the weights, the backbone, the federation and the
    checkpoint's fit are all checked before the first file of the run directory is written (or, with
    ``--overwrite``, deleted)."""
    splits = read_data_and_check_weights(run)
    fed, classnames = build_federation(fabric, run, splits)
    if checkpoint is not None:
        _restore(fed, checkpoint, run.resume)  # checks the prompt shapes and the clients first; memory only
    if mode != "fit" or not fed.method.trains:  # zeroshot never trains, whatever the method
        return _evaluate_only(fabric, fed, mode, run, out_dir, checkpoint, splits.bad_images)
    previous = prepare_run_dir(fabric, out_dir, mode, run, checkpoint, splits.bad_images)
    start = checkpoint["round"] + 1 if checkpoint else 1
    with _writing(out_dir, start - 1):
        logger = build_logger(run.log, out_dir, checkpoint.get("logger_run_id") if checkpoint else None,
                              run_config(run), previous) if fabric.global_rank == 0 else None
    rounds = run.federation.rounds
    row: dict = previous[-1] if previous else {}  # a resumed complete run rewrites its summary from its last row
    selector = BestRoundSelector(run.eval.select, out_dir)
    failures = _FailedRounds(run.federation.max_failed_rounds, previous)
    saved = start - 1  # the round checkpoints/last.ckpt holds
    bar = tqdm(range(start, rounds + 1), desc="rounds", disable=not fed.progress)
    for round_idx in bar:
        tic = time.perf_counter()
        row = fed.run_round(round_idx)
        if round_idx % run.eval.every == 0 or round_idx == rounds:
            row.update(fed.evaluate_all())
        row["round_seconds"] = time.perf_counter() - tic
        problem = None
        if fabric.global_rank == 0:
            problem = save_round(out_dir, logger, fed, row, run, selector, saved,
                                 lambda: checkpoint_state(fed, round_idx, run, logger_run_id(logger)))
            saved = round_idx if problem is None else saved
        if fabric.world_size > 1:
            problem = fabric.broadcast(problem, src=0)  # every rank stops together
        if problem:
            raise FedPromptError(problem)
        failures.update(row, fabric.global_rank == 0)
        acc = row.get("local_acc", row.get("own_classes_acc", row.get("global_acc")))
        if acc is not None:
            bar.set_postfix(loss=row.get("train_loss"), acc=acc)
    summary = run_summary(fed, classnames, row, out_dir, rounds)
    summary.update(selector.summary())
    if fabric.global_rank == 0:
        with _writing(out_dir, saved):
            write_json(out_dir / "summary.json", summary)
            if logger is not None:
                logger.finalize("success")
        _print_clients(fed, row.get("client_acc"), summary)
    fabric.barrier()
    return summary


def save_round(out_dir: Path, logger, fed: Federation, row: dict, run: RunArgs, selector: BestRoundSelector,
               saved: int, state_of) -> str | None:
    """Rank 0 at the end of a round: the metrics row (file and logger), then ``checkpoints/last.ckpt`` of
    ``state_of()`` (called after the logger logged: a W&B run id exists by then), the best-round selection and the
    every-``log.checkpoint_every`` checkpoint. Returns ``None``, or the one-line problem of a failed write (a full
    disk: the last good checkpoint stays; ``saved`` is the round it holds before this one)."""
    try:
        _log_round(out_dir, logger, fed, row)
        save_logger(logger)
        state = state_of()
        save_checkpoint(state, out_dir / "checkpoints" / "last.ckpt")
    except OSError as err:
        return _write_problem(out_dir, err, saved)
    try:
        selector.update(row, state)
        every = run.log.checkpoint_every
        if every and row["round"] % every == 0:
            save_checkpoint(state, out_dir / "checkpoints" / f"round-{row['round']:04d}.ckpt")
    except OSError as err:
        return _write_problem(out_dir, err, row["round"])
    return None


class _FailedRounds:
    """``federation.on_client_failure: skip``: every round with failed clients is reported on the console, and
    the run stops after ``limit`` consecutive rounds in which every sampled client failed (counted over a resume,
    from the metrics rows)."""

    def __init__(self, limit: int, previous: list[dict]):
        self.limit = limit
        self.streak = 0
        for row in previous:
            self.streak = self.streak + 1 if self.all_failed(row) else 0

    @staticmethod
    def all_failed(row: dict) -> bool:
        failed = row.get("failed_clients") or {}
        return bool(failed) and {str(c) for c in row.get("clients", [])} <= set(failed)

    def update(self, row: dict, report: bool) -> None:
        failed = row.get("failed_clients") or {}
        if not failed:
            self.streak = 0
            return
        round_idx = row["round"]
        shown = "; ".join(f"client {c}: {why}" for c, why in list(failed.items())[:3])
        shown += f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        if not self.all_failed(row):
            self.streak = 0
            if report:
                warn(f"round {round_idx}: {len(failed)} of {len(row.get('clients', []))} sampled clients failed and "
                     f"were left out of the aggregation ({shown}).")
            return
        self.streak += 1
        if self.streak >= self.limit:
            raise FedPromptError(f"round {round_idx}: every sampled client failed, {self.streak} rounds in a row "
                                 f"({shown}); the prompts no longer change, so the run stops "
                                 f"(federation.max_failed_rounds {self.limit}). Lower the learning rate and start a "
                                 "new run, or resume with a higher --federation.max_failed_rounds.")
        if report:
            warn(f"round {round_idx}: every sampled client failed ({shown}); the prompts are unchanged "
                 f"({self.streak} such round(s) in a row; the run stops at federation.max_failed_rounds "
                 f"{self.limit}).")


class BestRoundSelector:
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
        keys += tuple(scenario_keys(best)) + tuple(k for k in best if is_summary_key(k))
        return {"model_selection": "round with the best mean validation accuracy (checkpoints/best.ckpt)",
                "selected": {k: best[k] for k in keys if k in best}}


def _log_round(out_dir: Path, logger, fed: Federation, row: dict) -> None:
    append_jsonl(out_dir / "metrics.jsonl", row)  # whole or absent, whatever happens
    if logger is not None:
        logger.log_metrics(numeric_metrics(row), step=row["round"])
        if "client_acc" in row:
            log_client_table(logger, row["round"], [c.name for c in fed.clients], row["client_acc"],
                             [len(c.train) for c in fed.clients])


def run_summary(fed: Federation, classnames: list[str], row: dict, out_dir: Path, rounds: int) -> dict:
    """``summary.json`` of a run from its last metrics ``row``: the headline metrics, the clients and their
    sizes, the class names and the run directory."""
    keys = ("local_acc", "local_acc_std", "own_classes_acc", "own_classes_acc_std", "global_acc", "val_acc",
            "base_acc", "novel_acc", "hm", "cm", "unseen_acc", "set_acc", "client_acc",
            "client_base_acc", "client_novel_acc", "train_loss", "epsilon", "record_epsilon", "dp_noise_multiplier"
            ) + tuple(scenario_keys(row)) + tuple(k for k in row if is_summary_key(k))
    return {"method": fed.method.name, "rounds": rounds, "model_selection": "last round (no test-set selection)",
            **{k: row[k] for k in keys if k in row}, "clients": [c.name for c in fed.clients],
            "num_train": [len(c.train) for c in fed.clients], "num_test": [len(c.test) for c in fed.clients],
            "classnames": classnames, "out_dir": str(out_dir)}


def _evaluate_only(fabric, fed: Federation, mode: str, run: RunArgs, out_dir: Path, checkpoint: dict | None,
                   bad_images: list[tuple[str, str]] = ()) -> dict:
    metrics = fed.evaluate_all()
    done = checkpoint["round"] if checkpoint else 0
    summary = run_summary(fed, [], {**metrics, "round": done}, out_dir, done)
    summary.pop("classnames")
    if mode == "evaluate":
        summary["checkpoint"] = str(run.resume)
    if fabric.global_rank == 0:
        with _writing(out_dir):
            _begin_writing(fabric, mode, run, out_dir)
            if mode != "evaluate":
                write_text(out_dir / "hyperparameters.yaml", _config_yaml(run))
                write_jsonl(out_dir / "metrics.jsonl", [{"round": 0, **metrics}])
                if bad_images:
                    write_text(out_dir / "bad_images.txt", "".join(f"{p}\t{why}\n" for p, why in bad_images))
            write_json(out_dir / ("eval.json" if mode == "evaluate" else "summary.json"), summary)
        _print_clients(fed, metrics["client_acc"], summary)
    fabric.barrier()
    return summary


def _print_clients(fed: Federation, client_acc: list[float] | None, summary: dict) -> None:
    if client_acc is None:
        extra = scenario_line(summary)
        if extra:
            print(f"{extra}   -> {summary['out_dir']}")
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
    for key in ("target_acc", "ece"):
        if isinstance(summary.get(key), float):
            line += f"   {key} {summary[key]:.4f}"
    extra = scenario_line({k: v for k, v in summary.items() if k != "global_acc"})
    print(line + (f"   {extra}" if extra else "") + f"   -> {summary['out_dir']}")
