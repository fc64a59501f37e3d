"""``fedprompt sweep``: one fit run per seed, then the mean +- std table over seeds (Markdown and JSON)."""

import json
import math

import pytest
import yaml

from conftest import ROOT, read_rows
from fedprompt.errors import FedPromptError
from fedprompt.sweep import config_differences, markdown_table, seed_table

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def fake_run(folder, **metrics):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"method": "PromptFL", "model_selection": "last round",
                                                     **metrics}))
    return folder


def test_seed_table_mean_and_population_std(tmp_path):
    runs = {1: fake_run(tmp_path / "seed1", local_acc=0.5, global_acc=0.6),
            2: fake_run(tmp_path / "seed2", local_acc=0.7, global_acc=0.6),
            3: fake_run(tmp_path / "seed3", local_acc=0.6, global_acc=0.9, hm=0.1)}  # hm: not in every seed
    table = seed_table(runs)
    local = table["metrics"]["local_acc"]
    assert local["values"] == [0.5, 0.7, 0.6] and math.isclose(local["mean"], 0.6)
    assert math.isclose(local["std"], math.sqrt(((0.1) ** 2 + (0.1) ** 2) / 3))
    assert table["metrics"]["global_acc"]["values"] == [0.6, 0.6, 0.9] and "hm" not in table["metrics"]
    lines = markdown_table(table).splitlines()
    assert lines[0] == "| metric | seed 1 | seed 2 | seed 3 | mean ± std |"
    assert lines[2] == "| local_acc | 50.00 | 70.00 | 60.00 | 60.00 ± 8.16 |"


def test_seed_table_uses_the_selected_round(tmp_path):
    runs = {n: fake_run(tmp_path / f"s{n}", local_acc=0.1, selected={"round": 2, "local_acc": 0.2 * n})
            for n in (1, 2)}
    assert seed_table(runs)["metrics"]["local_acc"]["values"] == [0.2, 0.4]


def test_seed_table_names_an_unfinished_seed(tmp_path):
    with pytest.raises(FedPromptError, match="seed 2 has not finished"):
        seed_table({1: fake_run(tmp_path / "a", local_acc=0.5), 2: tmp_path / "b"})


def test_config_differences_ignore_what_changes_per_seed():
    a = {"seed": 1, "out_dir": "x", "federation": {"rounds": 2, "fraction": 1.0}, "data": {"init_args": {"seed": 1}},
         "method": {"init_args": {"lr": 0.01}}}
    b = {"seed": 2, "out_dir": "y", "federation": {"rounds": 5, "fraction": 1.0}, "data": {"init_args": {"seed": 2}},
         "method": {"init_args": {"lr": 0.02}}}
    assert config_differences(a, b) == ["method.init_args.lr"]


def test_sweep_runs_each_seed_then_continues_and_writes_the_table(cli, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--config", SMOKE, "--federation.rounds", "1", "--seeds", "[1, 2]", "--out_dir", out]
    code, stdout, err = cli(*args)
    assert code == 0, err
    for n in (1, 2):
        config = yaml.safe_load((out / f"seed{n}" / "hyperparameters.yaml").read_text())
        assert config["seed"] == n and config["data"]["init_args"]["seed"] == n
    table = json.loads((out / "seeds.json").read_text())
    accs = [json.loads((out / f"seed{n}" / "summary.json").read_text())["local_acc"] for n in (1, 2)]
    assert table["seeds"] == [1, 2] and table["metrics"]["local_acc"]["values"] == accs
    assert math.isclose(table["metrics"]["local_acc"]["mean"], sum(accs) / 2)
    assert (out / "seeds.md").read_text().strip() == markdown_table(table) and markdown_table(table) in stdout
    # the same command again: both seeds are complete, nothing runs, the same table
    rows = {n: read_rows(out / f"seed{n}") for n in (1, 2)}
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert "seed 1: complete" in stdout and "seed 2: complete" in stdout
    assert json.loads((out / "seeds.json").read_text()) == table
    assert all(read_rows(out / f"seed{n}") == rows[n] for n in (1, 2))
    # another config into the same folder is refused
    code, _, err = cli(*args, "--method.lr", "0.5")
    assert code == 2 and "holds a sweep of another config" in err and "method.init_args.lr" in err


def test_interrupted_sweep_says_how_to_continue(cli, tmp_path, monkeypatch):
    import fedprompt.launchers

    monkeypatch.setattr(fedprompt.launchers, "run_one", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    code, _, err = cli("sweep", "--config", SMOKE, "--out_dir", tmp_path)
    assert code == 130 and "run the same sweep command again" in err and str(tmp_path) in err
    assert (tmp_path / "sweep.yaml").is_file()
