"""The analysis notebook runs on real run directories (its code cells, headless): a fit run and a zero-shot run."""

import json
import os

import pytest

from conftest import ROOT

SMOKE = ROOT / "configs" / "smoke.yaml"


def run_notebook(run, monkeypatch) -> dict:
    """Run the notebook's code cells on the run directory ``run``; returns their namespace."""
    monkeypatch.setenv("FEDPROMPT_RUN", str(run))
    notebook = json.loads((ROOT / "notebooks" / "analyze_run.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec("".join(cell["source"]), namespace)
    return namespace


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
    namespace = run_notebook(run, monkeypatch)
    assert len(namespace["rows"]) == rounds and namespace["summary"]["method"] == method
    assert len(namespace["scored"]) == rounds and 0 <= namespace["scored"][-1]["ece"] <= 1  # the reliability diagram
    assert len(plt.get_fignums()) == 3  # the curves, the per-client spread, calibration
    plt.close("all")
    assert os.environ["FEDPROMPT_RUN"] == str(run)


def test_notebook_cells_have_ids_and_it_reads_null_values(cli, tmp_path, monkeypatch):
    """nbformat 4.5 wants an id on every cell (else nbformat warns MissingIDFieldWarning), and the run files write a
    number that is not finite (an epsilon without noise, a metric of a round nobody could be evaluated in) as null."""
    import warnings

    notebook = json.loads((ROOT / "notebooks" / "analyze_run.ipynb").read_text())
    ids = [cell.get("id") for cell in notebook["cells"]]
    assert all(ids) and len(set(ids)) == len(ids)
    nbformat = pytest.importorskip("nbformat", reason="nbformat validates the notebook")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbformat.validate(nbformat.read(ROOT / "notebooks" / "analyze_run.ipynb", as_version=4))
    matplotlib = pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib (pip install -e .[dev])")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = tmp_path / "runs" / "smoke"
    assert cli("fit", "--config", SMOKE, "--out_dir", run)[0] == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[0].update(train_loss=None, local_acc_std=None, epsilon=None, ece=None, local_acc_worst=None)
    rows[-1]["client_acc"][0] = None
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "local_acc_std": None, "global_acc": None}))
    run_notebook(run, monkeypatch)
    assert len(plt.get_fignums()) == 3
    plt.close("all")
