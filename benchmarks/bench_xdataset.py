"""How long a cross-dataset evaluation of ten targets takes, per method, on the offline stand-in model.

The federation of ``configs/offline/promptfl_xdataset.yaml`` (CIFAR-10-mini, 16 shots, 5 clients) with ten
evaluation targets: the four PACS-mini domains of the config (7 classes, 204-210 test images each) and six generated
datasets (``fedprompt.data.Synthetic``, 3 to 8 classes, 20 test images per class, seeds 1-6): 1,834 target images
among ten class lists. For each method it prints:

- ``build``: building the federation, which encodes every test image of the source and the targets once with the
  frozen image tower (the feature cache; zero after the first method when ``$FEDPROMPT_CACHE`` keeps the features);
- ``targets``: one evaluation of the prompts on the ten targets (each client's text features computed once per
  class list, logits over the cached features), the median of ``--repeats`` after a warm-up;
- ``all``: one whole evaluation (the clients' own test sets, the global set and the ten targets).

No training round runs (the prompts are the methods' initial ones): the evaluation cost does not depend on the values.

    FEDPROMPT_CACHE=/tmp/fp-cache OMP_NUM_THREADS=1 python benchmarks/bench_xdataset.py --shared ../shared
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import yaml  # noqa: E402

METHODS = {  # method -> its settings for the offline model (text side only, as the offline configs)
    "PromptFL": {"n_ctx": 4, "ctx_init": "a photo of a"},
    "FedOTP": {"n_ctx": 4},
    "FedPGP": {"n_ctx": 4, "bottleneck": 2},
    "FedMGP": {"n_ctx": 2, "visual_groups": 0},
    "FedTPG": {"n_ctx": 4},
}


def run_args(shared: Path, method: str):
    """The offline xdataset config with ``shared`` as the data and model folder, ten targets and ``method``."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    from fedprompt.methods.method import Method
    from fedprompt.run import RunArgs

    set_parsing_settings(subclasses_enabled=[Method])

    text = (ROOT / "configs" / "offline" / "promptfl_xdataset.yaml").read_text().replace("../shared", str(shared))
    config = yaml.safe_load(text)
    config["method"] = {"class_path": f"fedprompt.methods.{method}", "init_args": METHODS[method]}
    data = config["data"]["init_args"]
    for seed, classes in zip(range(1, 7), (3, 4, 5, 6, 7, 8)):
        data["targets"].append({"class_path": "fedprompt.data.Synthetic",
                                "init_args": {"num_classes": classes, "train_per_class": 1, "test_per_class": 20,
                                              "image_size": 64, "seed": seed}})
    data["names"] = data["names"] + [f"generated-{seed}" for seed in range(1, 7)]
    config["log"] = {"logger": "none", "progress": False}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RunArgs, nested_key=None, skip={"resolved_config"}, sub_configs=True)
    run = parser.instantiate(parser.parse_object(config))
    from dataclasses import fields

    return RunArgs(**{f.name: run[f.name] for f in fields(RunArgs) if f.name != "resolved_config"})


def timed(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the folder with data/ and models/")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import fedprompt.data
    import fedprompt.methods
    import lightning as L
    import torch

    fedprompt.methods.import_all()
    fedprompt.data.import_readers()
    from fedprompt.build import build_parts

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    print(f"torch threads {torch.get_num_threads()}")
    print(f"{'method':<10}{'build s':>9}{'targets s':>11}{'all s':>8}  unseen_acc (initial prompts)")
    for method in args.methods:
        run = run_args(Path(args.shared), method)
        start = time.perf_counter()
        parts = build_parts(fabric, run)
        driver = parts.fabric_driver(run.federation.rounds, progress=False)
        build = time.perf_counter() - start
        evaluator = parts.evaluator
        targets = [e for e in evaluator.eval_sets if not e.seen]
        assert len(targets) == 10, [e.name for e in evaluator.eval_sets]
        whole = evaluator.eval_sets
        evaluator.eval_sets = targets
        target_seconds = timed(lambda: evaluator.score(parts.pool, [], lambda cids: cids), args.repeats)
        evaluator.eval_sets = whole
        out = {}
        all_seconds = timed(lambda: out.update(driver.evaluate(0)), args.repeats)
        print(f"{method:<10}{build:>9.1f}{target_seconds:>11.2f}{all_seconds:>8.2f}  {out['unseen_acc']:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
