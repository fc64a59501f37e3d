"""A run's settings, defined once and taken by every command, and the commands' own options.

:class:`RunArgs` is what every command takes (``fit``, ``zeroshot``, ``evaluate``, ``bench``, ``sweep``,
``partition``): the method, the data, and the groups of :mod:`fedprompt.args` (:class:`~fedprompt.args.BackboneArgs`,
:class:`~fedprompt.args.FederationArgs`, :class:`~fedprompt.args.TrainArgs`, :class:`~fedprompt.args.EvalArgs`,
:class:`~fedprompt.args.LogArgs`, :class:`~fedprompt.args.FabricArgs`, :class:`~fedprompt.args.DPArgs`, and
:class:`~fedprompt.threats.AttackArgs`, :class:`~fedprompt.threats.RobustArgs`), plus
``out_dir``, ``resume``, ``seed`` and ``overwrite``. On the command line its fields are flat (``--method``,
``--backbone.model``, ``--seed``); a command's own options are a dataclass of their own (:class:`BenchArgs`,
:class:`SweepArgs`, :class:`PartitionArgs`, :class:`TableArgs`; ``fedprompt table`` reads finished runs and takes no
run settings).
Attribute docstrings become the ``--help`` text.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import ClassVar, Literal, Optional

from fedprompt.args import DATA_SEED_MAX, SEED_MAX, BackboneArgs, DPArgs, EvalArgs, FabricArgs, FederationArgs, \
    LogArgs, TrainArgs, check_ranges, check_seed
from fedprompt.data.reader import FederatedData
from fedprompt.errors import FedPromptError
from fedprompt.methods.method import Method
from fedprompt.threats import AttackArgs, AuditArgs, RobustArgs


#: the runtimes of a run (``--runtime``)
RUNTIMES = ("fabric", "flower")


@dataclass(kw_only=True)
class RunArgs:
    """A run: what every command takes (a run config: ``--config FILE`` and flags that override it)."""

    method: Optional[Method] = None
    """The federated prompt-learning method: a class_path (fedprompt.methods.PromptFL, ...) or its short name."""
    data: Optional[FederatedData] = None
    """The dataset and its federated split (class_path: fedprompt.data.DomainFolders, ...)."""
    backbone: BackboneArgs = field(default_factory=BackboneArgs)
    federation: FederationArgs = field(default_factory=FederationArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    log: LogArgs = field(default_factory=LogArgs)
    fabric: FabricArgs = field(default_factory=FabricArgs)
    dp: DPArgs = field(default_factory=DPArgs)
    """Client-level differential privacy (DP-FedAvg with an RDP accountant); off unless dp.noise_multiplier or
    dp.target_epsilon is set."""
    attack: AttackArgs = field(default_factory=AttackArgs)
    """Malicious clients (label flipping, a backdoor, scaled or sign-flipped updates); off unless attack.kind is
    set."""
    robust: RobustArgs = field(default_factory=RobustArgs)
    """Robust aggregation (median, trimmed mean, Krum, norm bounding); off unless robust.rule or robust.norm_bound
    is set."""
    runtime: Literal["fabric", "flower"] = "fabric"
    """How a round's states travel: fabric (this process and Lightning Fabric's collectives, one process per device,
    K clients in lock-step) or flower (a Flower app in this process: the ServerApp and one ClientApp node per client,
    every message through Flower's serialisation; one device, K = 1; needs the flower extra). Both run the same round
    and write the same run folder: flower equals fabric with --federation.parallel_clients 1."""
    out_dir: Optional[str] = None
    """Run directory (default runs/<method>-<time>; with --resume, the checkpoint's run directory). A folder that
    holds another run is refused (see overwrite)."""
    resume: Optional[str] = None
    """A DIR/checkpoints/last.ckpt to continue from (fit) or to evaluate (evaluate). Without --config the run's own
    DIR/hyperparameters.yaml is read."""
    seed: int = 0
    """Seed of prompt initialisation, client sampling and local data order."""
    overwrite: bool = False
    """Delete the run files of out_dir (hyperparameters.yaml, metrics.jsonl, summary.json, checkpoints/, logs) and
    start a new run there, instead of refusing to write into it (fit, zeroshot); the old run is deleted only once
    the new run's checks (config, data, weights) passed."""
    resolved_config: Optional[dict] = None
    """The resolved configuration as the command line parsed it (written as hyperparameters.yaml); not a flag. When
    a command is called from Python without it, one is rebuilt from the objects."""

    def __post_init__(self):
        check_seed("--seed", self.seed, SEED_MAX)
        if self.runtime not in RUNTIMES:
            raise FedPromptError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}.")
        for name in ("out_dir", "resume"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise FedPromptError(f"--{name} is empty; pass a path (or leave --{name} out).")


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
    for item in fields(obj) if is_dataclass(obj) else ():
        if item.name == name:
            if item.default is not MISSING:
                return item.default
            return item.default_factory() if item.default_factory is not MISSING else unknown
    for klass in type(obj).__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and klass is not object:
            param = inspect.signature(init).parameters.get(name)
            if param is not None and param.default is not inspect.Parameter.empty:
                return param.default
    return unknown


@dataclass(kw_only=True)
class BenchArgs:
    """``fedprompt bench``'s own options."""

    rounds: int = 3
    """Rounds to time (federation.rounds is replaced by this)."""
    json: bool = False
    """Print the per-round rows as JSON (for scripts) instead of the table."""
    profile: bool = True
    """Also profile one warm local round (the torch profiler on the host): aten ops and host syncs per step and
    per client-step."""
    truncation: bool = False
    """Run the text-truncation benchmark instead (uses model, num_classes, n_ctx, repeats; no config needed)."""
    model: str = "ViT-B-32"
    """Truncation benchmark: open_clip architecture (random init: no download)."""
    num_classes: int = 50
    """Truncation benchmark: class prompts encoded together."""
    n_ctx: int = 16
    """Truncation benchmark: context tokens."""
    repeats: int = 3
    """Truncation benchmark: timed repetitions (after one warm-up)."""
    threads: Optional[int] = None
    """Torch CPU threads (default: torch's choice)."""

    def __post_init__(self):
        check_ranges("", self, rounds=(1, None), num_classes=(1, None), n_ctx=(1, None), repeats=(1, None),
                     threads=(1, None))


@dataclass(kw_only=True)
class SweepArgs:
    """``fedprompt sweep``'s own options."""

    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """The seeds; each sets seed and, unless same_data, data.seed (new partition and few-shot samples per seed, as
    the papers' seeds do)."""
    same_data: bool = False
    """Keep the config's data.seed for every seed (only prompt initialisation, client sampling and data order
    change)."""
    configs: Optional[list[str]] = None
    """A grid: fit configs, each a cell (crossed with --methods and --datasets); the sweep's flags apply to each.
    Instead of --config."""
    methods: Optional[list[str]] = None
    """A grid: methods (short names or class paths), each replacing the config's method (settings it shares, such as
    lr and n_ctx, are kept)."""
    datasets: Optional[list[str]] = None
    """A grid: data configs (YAML files with a data section, e.g. configs/datasets/dtd.yaml), each replacing the
    config's data."""
    launcher: Literal["local", "slurm", "submitit-local"] = "local"
    """local: the runs as child processes of this command, --processes at a time; slurm: one SLURM job per run
    through submitit (the slurm extra); submitit-local: the same jobs on this machine (submitit's local executor)."""
    processes: int = 1
    """local: runs at once (one per GPU: the k-th process sees GPU k when there are that many)."""
    slurm: Optional[dict] = None
    """slurm: submitit's executor parameters, e.g. {"slurm_partition": "gpu", "timeout_min": 600, "gpus_per_node": 1,
    "cpus_per_task": 8}."""
    wait: bool = True
    """slurm / submitit-local: wait for the jobs, then write the tables (false: submit and return; the same command
    later writes them)."""
    command_line: Optional[list[str]] = None
    """Not a flag: the command line that started the sweep (set by the CLI), whose run flags a grid applies to each
    of --configs."""

    #: fields that are not command-line flags
    not_flags: ClassVar[tuple[str, ...]] = ("command_line",)

    def __post_init__(self):
        for n in self.seeds:  # each is also a data.seed
            check_seed("--seeds", n, DATA_SEED_MAX)
        check_ranges("", self, processes=(1, None))
        for name in ("configs", "methods", "datasets"):
            values = getattr(self, name)
            if values is not None and (not values or len(set(values)) != len(values)):
                raise FedPromptError(f"--{name} must be a non-empty list without repeats, got {values}.")


@dataclass(kw_only=True)
class PartitionArgs:
    """``fedprompt partition``'s own options."""

    json: bool = False
    """Print JSON (classnames, clients with names and train/test counts per class) instead of a table; with own
    class lists: clients (id, name, dataset, classnames, train/test counts per own class) and eval_sets (name,
    split, dataset, seen, classes, samples)."""


@dataclass(kw_only=True)
class TableArgs:
    """``fedprompt table``'s options (it takes no run settings: it reads finished run directories)."""

    runs: list[str] = field(default_factory=list)
    """Run directories (fedprompt fit) or sweep folders (fedprompt sweep); positional on the command line."""
    columns: Literal["datasets", "metrics", "targets", "domains"] = "datasets"
    """datasets: one metric per dataset (and their average); metrics: --metrics per dataset (Local / Base / Novel
    / HM (Base, Novel) by default); targets: the source's accuracy, each cross-dataset / cross-domain target and their
    mean; domains: leave-one-domain-out runs, one column per held-out domain and their mean."""
    metric: str = "auto"
    """The metric of --columns datasets or domains, or the source's of --columns targets (a summary.json key:
    local_acc, global_acc, ece, local_acc_worst10, ...); auto: local_acc, own_classes_acc or global_acc (targets:
    global_acc first; domains: target_acc)."""
    metrics: Optional[list[str]] = None
    """The metrics of --columns metrics (default local_acc, base_acc, novel_acc, hm: those the runs have). Also:
    hm_local_base_novel (3-way HM), cm, ece, many_acc / medium_acc / few_acc, and any accuracy's spread over
    clients: <metric>_std, <metric>_worst, <metric>_worst10."""
    labels: Optional[dict[str, str]] = None
    """Row labels by run directory (default: the method's name, '(central)' added for federation.central)."""
    out: str = "table"
    """Output path without extension: OUT.md, OUT.csv and OUT.png are written."""
    figure: bool = True
    """Also draw OUT.png (one bar chart per column group; needs matplotlib: pip install 'fedprompt[plot]')."""

    #: option fields given as positional arguments on the command line, with their help
    positional: ClassVar[dict[str, str]] = {"runs": "run directories (fedprompt fit) or sweep folders (fedprompt "
                                                     "sweep)"}
    #: the command takes no run settings (method, data, ...)
    takes_run: ClassVar[bool] = False


#: each command's own options class (``None``: the run settings alone), paired with the command functions in
#: :data:`fedprompt.commands.COMMANDS`
COMMAND_OPTIONS: dict[str, type | None] = {"fit": None, "evaluate": None, "zeroshot": None, "sweep": SweepArgs,
                                           "partition": PartitionArgs, "bench": BenchArgs, "table": TableArgs,
                                           "audit": AuditArgs}
