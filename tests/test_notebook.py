"""The analysis notebook runs on real run directories (its code cells, headless): a fit run and a zero-shot run."""

import json
import os

import pytest

from conftest import ROOT

SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.mark.parametrize("command,rounds,method", [
    (["fit"], 2, "PromptFL"),
    (["zeroshot"], 1, "ZeroShot"),  # one row (round 0), no loss or communication
])
def test_analysis_notebook_runs_on_a_run_directory(cli, tmp_path, monkeypatch, command, rounds, method):
    matplotlib = pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib (pip install -e .[dev])")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = tmp_path / "runs" / "smoke"
    extra = ["--method", "ZeroShot"] if command == ["zeroshot"] else []
    assert cli(*command, "--config", SMOKE, *extra, "--out_dir", run)[0] == 0
    monkeypatch.setenv("FEDPROMPT_RUN", str(run))
    notebook = json.loads((ROOT / "notebooks" / "analyze_run.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec("".join(cell["source"]), namespace)
    assert len(namespace["rows"]) == rounds and namespace["summary"]["method"] == method
    assert len(namespace["scored"]) == rounds and 0 <= namespace["scored"][-1]["ece"] <= 1  # the reliability diagram
    assert len(plt.get_fignums()) == 3  # the curves, the per-client spread, calibration
    plt.close("all")
    assert os.environ["FEDPROMPT_RUN"] == str(run)
