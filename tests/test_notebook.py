"""The analysis notebook runs on a real run directory (its code cells, headless)."""

import json
import os

import pytest

from conftest import ROOT


def test_analysis_notebook_runs_on_a_run_directory(cli, tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib (pip install -e .[dev])")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = tmp_path / "runs" / "smoke"
    assert cli("fit", "--config", ROOT / "configs" / "smoke.yaml", "--out_dir", run)[0] == 0
    monkeypatch.setenv("FEDPROMPT_RUN", str(run))
    notebook = json.loads((ROOT / "notebooks" / "analyze_run.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec("".join(cell["source"]), namespace)
    assert len(namespace["rows"]) == 2 and namespace["summary"]["method"] == "PromptFL"
    assert len(plt.get_fignums()) == 2
    plt.close("all")
    assert os.environ["FEDPROMPT_RUN"] == str(run)
