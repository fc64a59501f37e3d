"""Per-round overhead of running a config as a Flower app, against ``fedprompt fit`` (same rounds, CPU).

Runs ``fedprompt fit --federation.parallel_clients 1`` in a subprocess, then the same config through Flower's
simulation engine (:func:`fedprompt.flower.simulation.simulate`, Ray backend, one virtual SuperNode per client) and
through Flower's in-process message path (:func:`fedprompt.flower.local.run_local`), each in a fresh subprocess, and
prints per run: the wall time of the process, round 1 (which includes building every client's backbone, data and
caches) and the mean of the later rounds (``round_seconds`` of metrics.jsonl), and the later rounds' overhead over
fit. Also checks that the metrics rows agree.

    python benchmarks/bench_flower.py                                   # configs/smoke.yaml
    python benchmarks/bench_flower.py --config configs/offline/fedotp_pacs.yaml \\
        --args "--backbone.pretrained ../shared/models/effl0-minilm --data.root ../shared/data/pacs-mini"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _run(code: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed:\n{code}\n{done.stderr[-3000:]}")
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--args", default="", help="fedprompt flags for every run")
    parser.add_argument("--rounds", type=int, default=None, help="--federation.rounds (default: the config's)")
    parser.add_argument("--skip-simulation", action="store_true", help="only fit and the in-process path")
    options = parser.parse_args()
    flags = f"{options.args} --federation.parallel_clients 1 --log.progress false --log.logger none"
    if options.rounds:
        flags += f" --federation.rounds {options.rounds}"
    out = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    runs = {
        "fit": f"from fedprompt.__main__ import main; main(['fit', '--config', {options.config!r}, "
               f"*{flags.split()!r}, '--out_dir', {str(out / 'fit')!r}])",
        "flower in-process": f"from fedprompt.flower.local import run_local; run_local({options.config!r}, "
                             f"{flags + ' --out_dir ' + str(out / 'local')!r})",
    }
    if not options.skip_simulation:
        runs["flower simulation"] = (f"from fedprompt.flower.simulation import simulate; simulate({options.config!r}, "
                                     f"{flags + ' --out_dir ' + str(out / 'sim')!r})")
    folders = {"fit": "fit", "flower in-process": "local", "flower simulation": "sim"}
    results = {}
    for name, code in runs.items():
        wall = _run(code)
        rows = _rows(out / folders[name])
        later = [r["round_seconds"] for r in rows[1:]]
        results[name] = (wall, rows[0]["round_seconds"], sum(later) / len(later) if later else float("nan"), rows)
    base = results["fit"][2]
    print(f"{options.config} {options.args}".strip())
    print(f"{'run':<20} {'process s':>10} {'round 1 s':>10} {'later rounds s':>15} {'overhead s/round':>17}  rows")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rs]  # noqa: E731
    for name, (wall, first, later, rows) in results.items():
        equal = "equal" if strip(rows) == strip(results["fit"][3]) else "DIFFER"
        print(f"{name:<20} {wall:>10.1f} {first:>10.2f} {later:>15.2f} {later - base:>17.2f}  {equal}")


if __name__ == "__main__":
    main()
