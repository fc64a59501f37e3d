"""``fedprompt table``: the paper table (Markdown, CSV, figure) from run directories and sweep folders."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from fedprompt.errors import FedPromptError
from fedprompt.run import TableArgs
from fedprompt.table import make_table


def config(method="PromptFL", reader="fedprompt.data.DomainFolders", root="/data/pacs-mini", shots=16, seed=0,
           mode="personal", lr=0.01, central=False, **data) -> dict:
    return {"method": {"class_path": f"fedprompt.methods.{method}", "init_args": {"n_ctx": 4, "lr": lr}},
            "data": {"class_path": reader, "init_args": {"root": root, "num_shots": shots, "seed": seed, **data}},
            "backbone": {"model": "ViT-B-16", "pretrained": "openai"},
            "federation": {"rounds": 10, "central": central}, "train": {"batch_size": 16},
            "eval": {"mode": mode, "every": 1}, "log": {"logger": "csv"}, "seed": seed, "out_dir": "x"}


def fake_run(folder: Path, cfg: dict, **metrics) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hyperparameters.yaml").write_text(yaml.safe_dump(cfg))
    name = cfg["method"]["class_path"].rsplit(".", 1)[-1]
    (folder / "summary.json").write_text(json.dumps({"method": name, "rounds": 10, **metrics}))
    return folder


def fake_sweep(folder: Path, cfg: dict, per_seed: dict[int, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "seeds.json").write_text(json.dumps({"seeds": list(per_seed)}))
    for n, metrics in per_seed.items():
        fake_run(folder / f"seed{n}", {**cfg, "seed": n}, **metrics)
    return folder


def table(tmp_path, *runs, **options) -> dict:
    return make_table(TableArgs(runs=[str(r) for r in runs], out=str(tmp_path / "out" / "table"), **options))


def read_csv(tmp_path) -> list[dict]:
    with open(tmp_path / "out" / "table.csv") as handle:
        return list(csv.DictReader(handle))


def test_datasets_columns_mean_std_over_seeds_and_best(tmp_path, capsys):
    pfl = fake_sweep(tmp_path / "pfl-pacs", config(), {1: {"local_acc": 0.50}, 2: {"local_acc": 0.70}})
    otp = fake_sweep(tmp_path / "otp-pacs", config("FedOTP"), {1: {"local_acc": 0.80}, 2: {"local_acc": 0.60},
                                                               3: {"local_acc": 0.70}})
    # two separate runs that differ only in their seed are the seeds of one cell
    pfl_office = [fake_run(tmp_path / f"pfl-office-{n}", config(root="/data/office", seed=n), local_acc=v)
                  for n, v in ((1, 0.90), (2, 0.80))]
    otp_office = fake_run(tmp_path / "otp-office", config("FedOTP", root="/data/office"), local_acc=0.95)
    out = table(tmp_path, pfl, otp, *pfl_office, otp_office)
    assert out["rows"] == ["PromptFL", "FedOTP"] and out["columns"] == ["pacs-mini", "office", "Average"]
    cell = out["cells"]["FedOTP"]["pacs-mini"]
    assert cell["mean"] == pytest.approx(0.70) and cell["std"] == pytest.approx(math.sqrt(2 / 300))
    assert cell["best"] and not out["cells"]["PromptFL"]["pacs-mini"]["best"]  # 0.70 vs 0.60
    assert out["cells"]["PromptFL"]["office"]["values"] == [0.90, 0.80]
    assert out["cells"]["PromptFL"]["Average"]["mean"] == pytest.approx((0.60 + 0.85) / 2)
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| method | pacs-mini | office | Average |" in text
    assert "| FedOTP | **70.00 ± 8.16** | **95.00** | **82.50** |" in text  # one seed: no ± part
    assert "| PromptFL | 60.00 ± 10.00 | 85.00 ± 5.00 | 72.50 |" in text
    assert text.strip() in capsys.readouterr().out
    rows = read_csv(tmp_path)
    first = rows[0]
    assert (first["method"], first["column"], first["metric"], first["seeds"], first["best"]) == \
        ("PromptFL", "pacs-mini", "local_acc", "2", "false")
    assert float(first["mean"]) == pytest.approx(0.60) and first["values"] == "0.500000 0.700000"
    assert (tmp_path / "out" / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_columns_local_base_novel_hm(tmp_path):
    b2n = dict(subsample_classes="base")
    a = fake_run(tmp_path / "a", config(**b2n), local_acc=0.9, base_acc=0.8, novel_acc=0.6, hm=0.685, cm=0.7)
    b = fake_run(tmp_path / "b", config("FedPGP", **b2n), local_acc=0.95, base_acc=0.7, novel_acc=0.7, hm=0.7)
    out = table(tmp_path, a, b, columns="metrics")
    hm = "HM (Base, Novel)"  # the header says which HM: hm is the 2-way base/novel one
    assert out["columns"] == ["Local", "Base", "Novel", hm]
    best = {col: [row for row in out["rows"] if out["cells"][row][col]["best"]] for col in out["columns"]}
    assert best == {"Local": ["FedPGP"], "Base": ["PromptFL"], "Novel": ["FedPGP"], hm: ["FedPGP"]}
    assert "HM (Base, Novel) = 2BN / (B + N)." in (tmp_path / "out" / "table.md").read_text()
    out = table(tmp_path, a, b, columns="metrics", metrics=["cm", "hm"])
    assert out["columns"] == ["CM", hm] and out["cells"]["FedPGP"]["CM"]["mean"] is None  # shown as –
    assert "| FedPGP | – | **70.00** |" in (tmp_path / "out" / "table.md").read_text()
    # these run folders predate the two named HMs: hm_base_novel is their hm, the 3-way HM is computed
    out = table(tmp_path, a, b, columns="metrics", metrics=["hm_base_novel", "hm_local_base_novel"])
    assert out["columns"] == [hm, "HM (Local, Base, Novel)"]
    assert out["cells"]["PromptFL"][hm]["mean"] == 0.685
    assert math.isclose(out["cells"]["PromptFL"]["HM (Local, Base, Novel)"]["mean"], 3 / (1 / 0.9 + 1 / 0.8 + 1 / 0.6))
    assert "HM (Local, Base, Novel) = 3 / (1/L + 1/B + 1/N)" in (tmp_path / "out" / "table.md").read_text()


def test_targets_columns(tmp_path):
    transfer = lambda method: {**config(method), "data": {  # noqa: E731
        "class_path": "fedprompt.data.Transfer",
        "init_args": {"source": {"class_path": "fedprompt.data.ImageNet", "init_args": {"root": None, "num_shots": 16}},
                      "targets": [{"class_path": "fedprompt.data.Caltech101"}, {"class_path": "fedprompt.data.DTD"}]}}}
    metrics = lambda g, c, d: {"global_acc": g, "unseen/caltech101": c, "unseen/dtd": d,  # noqa: E731
                               "unseen_acc": (c + d) / 2}
    a = fake_run(tmp_path / "a", transfer("PromptFL"), **metrics(0.70, 0.90, 0.40))
    b = fake_run(tmp_path / "b", transfer("FedTPG"), **metrics(0.69, 0.93, 0.45))
    out = table(tmp_path, a, b, columns="targets")
    assert out["columns"] == ["Global", "caltech101", "dtd", "Mean"]
    assert out["cells"]["FedTPG"]["Mean"]["mean"] == pytest.approx(0.69) and out["cells"]["FedTPG"]["Mean"]["best"]
    assert out["cells"]["PromptFL"]["Global"]["best"]
    with pytest.raises(FedPromptError, match=r"--columns targets needs cross-dataset or cross-domain runs"):
        table(tmp_path, fake_run(tmp_path / "c", config(), local_acc=0.5), columns="targets")


def test_mixed_protocols_in_one_column_are_refused(tmp_path):
    a = fake_run(tmp_path / "a", config(), local_acc=0.5)
    b = fake_run(tmp_path / "b", config("FedOTP", shots=8, mode="dual"), local_acc=0.6)
    with pytest.raises(FedPromptError) as err:
        table(tmp_path, a, b)
    text = str(err.value)
    assert "\n" not in text and text.startswith("table: the column pacs-mini mixes protocols")
    assert str(a) in text and str(b) in text and "data.init_args.num_shots (16 vs 8)" in text
    assert "eval.mode ('personal' vs 'dual')" in text
    # a different root path, learning rate or round budget is not another protocol
    c = fake_run(tmp_path / "c", {**config("FedOTP", root="/other/machine/pacs-mini", lr=0.5),
                                  "federation": {"rounds": 25}}, local_acc=0.6)
    assert table(tmp_path, a, c)["rows"] == ["PromptFL", "FedOTP"]


def test_variants_of_one_method_need_labels(tmp_path):
    a = fake_run(tmp_path / "a", config(), local_acc=0.5)
    b = fake_run(tmp_path / "b", config(lr=0.1), local_acc=0.6)
    with pytest.raises(FedPromptError, match=r"both PromptFL on pacs-mini but differ in method.init_args.lr; give "
                                             r"each variant its own row with --labels"):
        table(tmp_path, a, b)
    out = table(tmp_path, a, b, labels={str(b): "PromptFL (lr 0.1)"})
    assert out["rows"] == ["PromptFL", "PromptFL (lr 0.1)"]
    central = fake_run(tmp_path / "central", config(central=True), local_acc=0.7)
    assert table(tmp_path, a, central)["rows"] == ["PromptFL", "PromptFL (central)"]
    with pytest.raises(FedPromptError, match=r"with seed 0; give each seed once"):
        table(tmp_path, a, fake_run(tmp_path / "again", config(), local_acc=0.5))


def test_bad_run_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedPromptError, match=r"empty is neither a fedprompt run directory"):
        table(tmp_path, tmp_path / "empty")
    sweep = fake_sweep(tmp_path / "sweep", config(), {1: {"local_acc": 0.5}, 2: {"local_acc": 0.6}})
    (sweep / "seed2" / "summary.json").unlink()
    with pytest.raises(FedPromptError, match=r"seed2/summary.json is missing; seed 2 of the sweep has not finished"):
        table(tmp_path, sweep)
    with pytest.raises(FedPromptError, match=r"no metric of local_acc, own_classes_acc, global_acc is in every run"):
        table(tmp_path, fake_run(tmp_path / "b2n", config(), hm=0.5))


def test_unreadable_json_and_yaml_are_one_line_errors(tmp_path):
    run = fake_run(tmp_path / "run", config(), local_acc=0.5)
    (run / "summary.json").write_text('{"local_acc": 0.5')  # cut off mid-write
    with pytest.raises(FedPromptError, match=r"run/summary.json is not valid JSON \(.*\); rerun the run"):
        table(tmp_path, run)
    (run / "summary.json").write_text("[0.5]")
    with pytest.raises(FedPromptError, match=r"run/summary.json holds a list, not a mapping"):
        table(tmp_path, run)
    sweep = fake_sweep(tmp_path / "sweep", config(), {1: {"local_acc": 0.5}})
    (sweep / "seeds.json").write_bytes(b"\xff\xfe")
    with pytest.raises(FedPromptError, match=r"sweep/seeds.json is not valid JSON"):
        table(tmp_path, sweep)
    other = fake_run(tmp_path / "other", config(), local_acc=0.5)
    (other / "hyperparameters.yaml").write_text("method: [unclosed\n")
    with pytest.raises(FedPromptError) as err:
        table(tmp_path, other)
    assert "other/hyperparameters.yaml: YAML syntax error at line 2, column 1" in str(err.value) and "\n" not in str(err.value)


def test_without_matplotlib_the_table_is_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = table(tmp_path, fake_run(tmp_path / "a", config(), local_acc=0.5))
    assert [Path(f).suffix for f in out["files"]] == [".md", ".csv"]
    assert "pip install 'fedprompt[plot]'" in capsys.readouterr().err


def test_table_command_on_small_runs(cli, tmp_path):
    """Two real (tiny) runs through the command line: the row values are the runs' summaries."""
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    for method in ("PromptFL", "LocalCoOp"):
        code, _, err = cli("fit", "--config", smoke, "--method", method, "--federation.rounds", "1",
                           "--out_dir", tmp_path / method, "--log.logger", "none")
        assert code == 0, err
    code, out, err = cli("table", tmp_path / "PromptFL", tmp_path / "LocalCoOp", "--out", tmp_path / "t",
                         "--columns", "metrics", "--metrics", "[local_acc, global_acc]")
    assert code == 0, err
    summaries = {m: json.loads((tmp_path / m / "summary.json").read_text()) for m in ("PromptFL", "LocalCoOp")}
    assert f"| PromptFL | " in out and f"{100 * summaries['LocalCoOp']['local_acc']:.2f}" in out
    assert "| LocalCoOp | " in out and " – |" in out  # local CoOp has no global model
    assert (tmp_path / "t.md").is_file() and (tmp_path / "t.csv").is_file() and (tmp_path / "t.png").is_file()
    code, _, err = cli("table", "--out", tmp_path / "t")
    assert code == 2 and "runs" in err


def test_ood_columns_mark_the_lowest_fpr_and_the_highest_auroc(tmp_path):
    """OOD detection's keys (eval.ood) in the table: the best AUROC is the highest, the best FPR95 the lowest."""
    keys = ["ood/dtd/energy/auroc", "ood/dtd/energy/fpr95"]
    a = fake_run(tmp_path / "a", config(), **{keys[0]: 0.9, keys[1]: 0.3})
    b = fake_run(tmp_path / "b", config("FOCoOp"), **{keys[0]: 0.8, keys[1]: 0.2})
    out = table(tmp_path, a, b, columns="metrics", metrics=keys)
    best = {col: [row for row in out["rows"] if out["cells"][row][col]["best"]] for col in out["columns"]}
    assert best == {keys[0]: ["PromptFL"], keys[1]: ["FOCoOp"]}
