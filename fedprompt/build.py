"""Build the parts of a run from its settings: the data (checked together with the backbone's weights), the
frozen backbone, the batches (feature cache, decoded-image stores, image files), the method's server rule (inside
client-level DP when asked), and the roles of the federation: :class:`~fedprompt.federation.sampler.Sampler`,
:class:`~fedprompt.federation.server.Server`, :class:`~fedprompt.federation.clients.ClientPool` and
:class:`~fedprompt.federation.evaluator.Evaluator` (:func:`build_parts`). Every runtime builds them here: ``fedprompt
fit`` on each rank, the Flower server (without images) and every Flower node (its client's images only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedprompt.args import BackboneArgs, TrainArgs
from fedprompt.backbone import load_backbone
from fedprompt.backbone.loading import check_source
from fedprompt.data.cache import FeatureCache
from fedprompt.data.reader import FederatedData
from fedprompt.data.scenarios import ood_sets
from fedprompt.data.transforms import clip_transforms
from fedprompt.errors import FedPromptError, warn
from fedprompt.federation.attacks import plan_attack
from fedprompt.federation.clients import ClientPool
from fedprompt.federation.evaluator import Evaluator
from fedprompt.federation.fabric_transport import FabricTransport
from fedprompt.federation.feed import CachedFeatures, Feed, ImageFiles, StoredImages, sample_lists
from fedprompt.federation.ood_eval import build_detection
from fedprompt.federation.round import RoundDriver
from fedprompt.federation.sampler import Sampler
from fedprompt.federation.scenarios import central_train, evaluation_sets
from fedprompt.federation.privacy import warn_record_privacy
from fedprompt.federation.robust import install_norm_bound
from fedprompt.federation.server import Server
from fedprompt.methods.method import Method
from fedprompt.run import RunArgs


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


@dataclass
class Parts:
    """The roles of a federation on this process, built from a run's settings (:func:`build_parts`)."""

    fabric: object
    method: Method
    classnames: list[str]
    clients: list
    sampler: Sampler
    server: Server
    pool: ClientPool
    evaluator: Evaluator
    feed: Feed
    initial: dict
    """The initial client state (the server's initialisation)."""

    def driver(self, transport, rounds: int, timer=None) -> RoundDriver:
        """The round driver of these roles over ``transport`` (checkpoints record the shapes of client 0's
        initial state)."""
        first = self.pool.states[min(self.pool.states)]
        return RoundDriver(self.sampler, self.server, self.evaluator, transport, rounds, first,
                           group_size=lambda: self.pool.group_size, timer=timer)

    def fabric_driver(self, rounds: int, progress: bool, timer=None) -> RoundDriver:
        """The round driver over the in-process Fabric transport (``fedprompt fit``)."""
        return self.driver(FabricTransport(self.pool, self.server, self.evaluator, progress), rounds, timer)


def build_parts(fabric, run: RunArgs, splits=None, timer=None, feed_clients: list[int] | None = None,
                quiet: bool = False) -> Parts:
    """Load the backbone, read and split the data (unless ``splits`` are given), build the method's client modules,
    feed and server rule, and the roles of the federation (``timer``: the round benchmark's section timer;
    ``feed_clients``: the clients whose images this process reads, default all: a deployed node reads only its own
    client's, a server none; ``quiet``: no warnings about the settings, which another process gives)."""
    splits = splits if splits is not None else read_data_and_check_weights(run)
    attack = plan_attack(run, splits)  # malicious clients (a function of the seed): their data poisoned here
    splits = attack.poison(splits) if attack is not None else splits
    aggregator = _build_aggregator(fabric, run, len(splits.clients), quiet or fabric.global_rank != 0)
    warn_record_privacy(run.method, splits.clients, quiet=quiet or fabric.global_rank != 0)
    train_args: TrainArgs = run.train
    if run.federation.central:  # the centralised bound: every client's data pooled into one client
        from fedprompt.data.scenarios import centralize

        train_args = central_train(train_args, run.federation, len(splits.clients))
        splits = centralize(splits)
    method: Method = run.method
    sizes = [len(c.train) for c in splits.clients]
    sampler = Sampler(aggregator, sizes, run.federation, train_args, getattr(method, "optim", None), run.seed)
    sampler.check_reporting()
    bargs: BackboneArgs = run.backbone
    torch.manual_seed(run.seed)  # a random-init backbone is the same on every rank and every run
    backbone = fabric.to_device(load_backbone(bargs.model, bargs.pretrained, bargs.truncate, bargs.cache_dir))
    backbone.compile_text(train_args.compile)  # the backbone is shared by the runs of a process: set, or reset
    train_tf, test_tf = clip_transforms(backbone.preprocess_cfg, train_args.augment)
    # evaluation sets beyond each client's own test data: base / novel classes, unseen datasets, global, domains
    eval_sets = evaluation_sets(splits, run.eval)
    attack_sets = attack.eval_sets(splits) if attack is not None else []  # the attack's success rate
    ood = ood_sets(splits, run.eval.ood) if run.eval.ood else []  # OOD detection's sets (eval.ood)
    method.prepare_data(splits, eval_sets + attack_sets)  # per-dataset side data (FedMVP's attributes), checked
    extra = {e.name: e.samples for e in eval_sets + attack_sets + ood}
    feed = _build_feed(fabric, run, splits, extra, backbone, train_tf, test_tf, feed_clients)
    pool = ClientPool(fabric, method, backbone, splits.classnames, splits.clients, feed, aggregator, sampler,
                      run.federation.parallel_clients, run.seed, timer)
    if eval_sets:
        _check_set_evaluation(pool, eval_sets)
    detection = build_detection(run.eval, ood, backbone, splits.classnames, pool.client, method)
    evaluator = Evaluator(splits.clients, splits.classnames, run.eval, eval_sets + attack_sets, method.global_model,
                          class_groups=splits.class_groups, detection=detection)
    server = Server(method, aggregator, sizes, run.federation, sampler, train_args)
    install_norm_bound(server)  # robust.norm_bound: a server step over single uploads
    if attack is not None:
        attack.install(pool, evaluator)  # the malicious clients' update step; the rows' attack entries
    initial = pool.initial_state()
    pool.start(initial)
    server.start(initial)
    return Parts(fabric, method, splits.classnames, splits.clients, sampler, server, pool, evaluator, feed, initial)


def on_one_device(run: RunArgs) -> bool:
    """The run's Fabric settings ask for one device on one node (``devices`` 1 or auto)."""
    return str(run.fabric.devices) in ("1", "auto") and run.fabric.num_nodes == 1


def one_client_per_step(run: RunArgs) -> bool:
    """``federation.parallel_clients`` allows K = 1 (1, or auto, which the caller then sets to 1)."""
    return run.federation.parallel_clients in ("auto", 1)


def check_round_order(run: RunArgs, runtime: str) -> None:
    """A method whose round trains its clients one at a time (``trains_in_turn``: pFedMoAP under ``compat:
    official``) runs under ``--runtime fabric`` with K = 1 on one device; one line for anything else, before the
    run starts."""
    method = run.method
    if method is None or not method.trains_in_turn:
        return
    why = f"{method.name} with method.compat official trains a round's clients one at a time, in the release's order"
    if runtime != "fabric":
        raise FedPromptError(f"{why}; the Flower runtime sends each round's downloads at once: run it with "
                             "--runtime fabric, or use method.compat fixed.")
    fab, parallel = run.fabric, run.federation.parallel_clients
    if not on_one_device(run):
        raise FedPromptError(f"{why}; it runs on one device: pass --fabric.devices 1 --fabric.num_nodes 1 (not "
                             f"{fab.devices} x {fab.num_nodes}), or use method.compat fixed.")
    if not one_client_per_step(run):
        raise FedPromptError(f"{why}: pass --federation.parallel_clients 1 (or auto), not {parallel}, or use "
                             "method.compat fixed.")


def _build_aggregator(fabric, run: RunArgs, num_clients: int, quiet: bool):
    """The method's server rule, seeded with the run seed (aggregators with random choices, such as FedMGP's group
    selection, follow it), inside the client-level DP server (DP-FedAvg) when ``run.dp`` is on, inside the robust
    server (median, trimmed mean, Krum, norm bounding) when ``run.robust`` is on."""
    aggregator = run.method.build_aggregator()
    if run.dp.enabled:
        from fedprompt.federation.privacy import build_private_aggregator

        aggregator = build_private_aggregator(run.dp, run.method, aggregator, num_clients, run.federation,
                                              quiet=quiet)
    if run.robust.enabled:
        from fedprompt.federation.robust import build_robust_aggregator

        aggregator = build_robust_aggregator(run.robust, run.method, aggregator, num_clients, run.federation,
                                             run.dp.enabled, quiet=quiet)
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
        raise FedPromptError(f"train.feature_cache: {method.name} trains parameters inside the image tower, so its "
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
                             data.num_workers, directory=directory, progress=progress)
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


def _check_set_evaluation(pool: ClientPool, eval_sets: list) -> None:
    """Base-to-novel and unseen-dataset protocols: each client's prompts are scored on other class lists (client
    modules built on those lists), so the prompt state must not depend on the classes."""
    shapes = {k: tuple(v.shape) for k, v in pool.client.state_dict().items()}
    for eval_set in eval_sets:
        if list(eval_set.classnames) == list(pool.classnames):
            continue  # the federation's own class list (the global and per-domain sets)
        other = {k: tuple(v.shape) for k, v in pool.module_for(eval_set.classnames).state_dict().items()}
        if not pool.client.switchable_classes or other != shapes:
            raise FedPromptError(f"data: the evaluation set {eval_set.name} ({len(eval_set.classnames)} classes) is "
                                 "scored with each client's prompts, which must not depend on the classes "
                                 f"({pool.method.name} here has class-specific tensors; use csc: false).")
