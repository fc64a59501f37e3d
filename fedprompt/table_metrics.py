"""What ``fedprompt table`` knows of the evaluation's metrics: their headers, the values an older run folder lacks but
its summary determines, the leave-one-domain-out columns and the reliability diagram.

- **Headers** say which quantity a column shows: the two HMs papers use are ``HM (Base, Novel)`` (``hm``, also
  ``hm_base_novel``) and ``HM (Local, Base, Novel)`` (``hm_local_base_novel``); a fairness key ``<metric>_std`` /
  ``_worst`` / ``_worst10`` is ``<metric's header> std`` / ``worst`` / ``worst 10%``.
- **Older run folders** (written before these metrics) keep their meaning: ``hm`` always was the 2-way Base/Novel HM
  and ``cm`` (Local + that HM) / 2; ``hm_base_novel`` is read from ``hm``, ``hm_local_base_novel`` computed from
  ``local_acc``, ``base_acc`` and ``novel_acc``, and a fairness key from the per-client accuracies the summary lists
  (``client_acc``, ``client_base_acc``, ``client_novel_acc``, ``client_global_acc``).
- **Leave-one-domain-out** (``--columns domains``): one column per held-out domain (``data.target`` of
  :class:`fedprompt.data.LeaveOneDomainOut` runs) of each dataset, then their mean; the metric is ``target_acc``
  unless ``--metric`` says otherwise.
- **Reliability diagram**: the runs' calibration tallies (``calibration`` in ``summary.json``), added over seeds and
  datasets per row, drawn as accuracy against confidence beside the bar charts.
"""

from __future__ import annotations

import math

from fedprompt.errors import FedPromptError

#: headers of the evaluation's metrics (beside those :data:`fedprompt.table.NAMES` holds)
METRIC_NAMES = {
    "hm": "HM (Base, Novel)", "hm_base_novel": "HM (Base, Novel)", "hm_local_base_novel": "HM (Local, Base, Novel)",
    "cm": "CM", "ece": "ECE", "global_ece": "ECE (global)", "base_ece": "ECE (base)", "novel_ece": "ECE (novel)",
    "target_acc": "Target", "target_ece": "ECE (target)", "many_acc": "Many", "medium_acc": "Medium",
    "few_acc": "Few", "global_many_acc": "Many (global)", "global_medium_acc": "Medium (global)",
    "global_few_acc": "Few (global)", "mean": "Mean"}
#: fairness suffixes and their header words
FAIRNESS = {"_worst10": "worst 10%", "_worst": "worst", "_std": "std"}
#: the per-client list of each accuracy in a summary (for the fairness of older run folders)
CLIENT_LISTS = {"local_acc": "client_acc", "own_classes_acc": "client_acc", "base_acc": "client_base_acc",
                "novel_acc": "client_novel_acc", "global_acc": "client_global_acc"}
#: how each HM is defined, for the table's caption
HM_LEGEND = {"hm": "HM (Base, Novel) = 2BN / (B + N)", "hm_base_novel": "HM (Base, Novel) = 2BN / (B + N)",
             "hm_local_base_novel": "HM (Local, Base, Novel) = 3 / (1/L + 1/B + 1/N)",
             "cm": "CM = (Local + HM (Base, Novel)) / 2"}


def metric_name(metric: str, names: dict[str, str]) -> str:
    """The header of ``metric`` (``names``: the table's own headers)."""
    for suffix, words in FAIRNESS.items():
        if metric.endswith(suffix) and metric[: -len(suffix)] in {**names, **METRIC_NAMES}:
            return f"{metric_name(metric[: -len(suffix)], names)} {words}"
    return METRIC_NAMES.get(metric, names.get(metric, metric))


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def derived(summary: dict, metric: str) -> float | None:
    """A metric an older summary lacks but determines (module docstring), else ``None``."""
    from fedprompt.metrics import HM_BASE_NOVEL, HM_LOCAL_BASE_NOVEL, fairness, harmonic_mean

    if metric == HM_BASE_NOVEL:
        return _number(summary.get("hm"))
    if metric == HM_LOCAL_BASE_NOVEL:
        parts = [_number(summary.get(k)) for k in ("local_acc", "base_acc", "novel_acc")]
        return harmonic_mean(*parts) if None not in parts else None
    for suffix in FAIRNESS:
        base = metric[: -len(suffix)] if metric.endswith(suffix) else None
        values = summary.get(CLIENT_LISTS.get(base or "", ""))
        if base and isinstance(values, list) and values:
            numbers = [math.nan if _number(v) is None else float(v) for v in values]
            return fairness(numbers).get(suffix[1:])
    return None


def lodo_target(config: dict) -> str | None:
    """The held-out domain of a leave-one-domain-out run's config, else ``None``."""
    data = config.get("data") or {}
    if str(data.get("class_path", "")).rsplit(".", 1)[-1] != "LeaveOneDomainOut":
        return None
    return str((data.get("init_args") or {}).get("target"))


def domain_columns(results: list, metric: str, column_type) -> list:
    """``--columns domains``: per dataset, one column per held-out domain (in the order the runs give them) and
    their mean."""
    targets: dict[str, list[str]] = {}
    for result in results:
        target = lodo_target(result.config)
        if target is None:
            raise FedPromptError(f"table: --columns domains needs leave-one-domain-out runs (data: "
                                 f"fedprompt.data.LeaveOneDomainOut); {result.paths[0]} is not one.")
        source, _, _ = result.dataset.rpartition("/")
        targets.setdefault(source, [])
        if result.dataset not in targets[source]:
            targets[source].append(result.dataset)
    metric = "target_acc" if metric == "auto" else metric
    cols = []
    for source, datasets in targets.items():
        prefix = f"{source}: " if len(targets) > 1 else ""
        cols += [column_type(source, prefix + d.rpartition("/")[2], d, metric) for d in datasets]
        cols.append(column_type(source, prefix + "Mean", "", "mean"))
    return cols


def row_tallies(results: list) -> dict:
    """Each row's calibration tally (``calibration`` of every seed's summary, added up); rows without any left out."""
    from fedprompt.calibration import add_tallies

    out: dict = {}
    for result in results:
        for summary in result.seeds.values():
            chosen = summary.get("selected") or summary
            tally = chosen.get("calibration") or summary.get("calibration")
            if isinstance(tally, list) and tally:
                out[result.label] = add_tallies([out.get(result.label), tally])
    return out


def draw_reliability(ax, tallies: dict) -> None:
    """The reliability diagram of each row's tally on ``ax``: accuracy against mean confidence per bin, the
    diagonal for perfect calibration, each row's ECE in its legend entry."""
    from fedprompt.calibration import expected_calibration_error, reliability

    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for row, tally in tallies.items():
        diagram = reliability(tally)
        points = [(c, a) for c, a, n in zip(diagram["confidence"], diagram["accuracy"], diagram["count"]) if n > 0]
        ece = 100 * expected_calibration_error(tally)
        ax.plot([c for c, _ in points], [a for _, a in points], marker="o", markersize=3,
                label=f"{row} (ECE {ece:.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability")
    ax.legend(fontsize="small")
