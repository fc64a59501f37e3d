"""The CLI end to end: run directory contract, resume, evaluate, partition, and the error messages."""

import json

import pytest
import torch
import yaml

from conftest import PACS, ROOT, TINY, read_rows, require, without_timings

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def test_smoke_run_writes_the_run_directory(cli, tmp_path):
    code, out, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "run")
    assert code == 0, err
    run = tmp_path / "run"
    rows = read_rows(run)
    assert [r["round"] for r in rows] == [1, 2]
    for key in ("train_loss", "local_acc", "local_acc_std", "clients", "bytes_up", "bytes_down", "round_seconds",
                "global_acc", "client_acc"):
        assert key in rows[0], key
    assert rows[0]["bytes_up"] == 4 * 4 * 64 * 4  # 4 clients x (4 tokens x 64 dims x 4 bytes)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["local_acc"] == rows[-1]["local_acc"] and "last round" in summary["model_selection"]
    config = yaml.safe_load((run / "hyperparameters.yaml").read_text())
    assert config["method"]["class_path"] == "fedprompt.methods.PromptFL" and config["federation"]["rounds"] == 2
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["round"] == 2 and set(ckpt["clients"]) == {0, 1, 2, 3}
    assert set(ckpt["global"]) == {"prompt.ctx"} and "sampler" in ckpt and "rng" in ckpt
    for state in ckpt["clients"].values():  # PromptFL: every client holds the global prompt after aggregation
        torch.testing.assert_close(state["prompt.ctx"], ckpt["global"]["prompt.ctx"])
    assert (run / "csv" / "metrics.csv").is_file()
    assert "local_acc" in out


def test_rounds_flag_overrides_the_config(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path, "--federation.rounds", "3")
    assert code == 0, err
    assert [r["round"] for r in read_rows(tmp_path)] == [1, 2, 3]


def test_resume_gives_the_same_rows_as_an_uninterrupted_run(cli, tmp_path):
    flags = ["--federation.fraction", "0.5", "--train.augment", "true"]  # sampling and augmentation must resume too
    assert cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "full", "--federation.rounds", "4", *flags)[0] == 0
    assert cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "cut", "--federation.rounds", "2", *flags)[0] == 0
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "cut", "--federation.rounds", "4", *flags,
                       "--resume", tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert code == 0, err
    full, cut = without_timings(read_rows(tmp_path / "full")), without_timings(read_rows(tmp_path / "cut"))
    assert [r["round"] for r in cut] == [1, 2, 3, 4]
    assert cut == full
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(a["global"]["prompt.ctx"], b["global"]["prompt.ctx"])


def test_existing_run_is_not_overwritten(cli, tmp_path):
    assert cli("fit", "--config", SMOKE, "--out_dir", tmp_path)[0] == 0
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path)
    assert code == 2 and "already holds a run" in err and "--resume" in err


def test_evaluate_and_zeroshot_commands(cli, tmp_path):
    assert cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "run")[0] == 0
    code, out, err = cli("evaluate", "--config", SMOKE, "--resume", tmp_path / "run" / "checkpoints" / "last.ckpt",
                         "--out_dir", tmp_path / "run")
    assert code == 0, err
    evaluated = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluated["local_acc"] == read_rows(tmp_path / "run")[-1]["local_acc"]
    code, out, err = cli("zeroshot", "--config", SMOKE, "--method", "ZeroShot", "--out_dir", tmp_path / "zs")
    assert code == 0, err
    summary = json.loads((tmp_path / "zs" / "summary.json").read_text())
    assert len(summary["client_acc"]) == 4 and 0 <= summary["local_acc"] <= 1
    assert "client" in out and "local_acc" in out


def test_partition_command_table_and_json(cli):
    code, out, _ = cli("partition", "--config", SMOKE)
    assert code == 0 and "red square" in out and "4 clients, 4 classes" in out
    code, out, _ = cli("partition", "--config", SMOKE, "--json", "true")
    table = json.loads(out)
    assert len(table["clients"]) == 4 and sum(sum(c["train"]) for c in table["clients"]) == 64


def test_print_config_round_trips(cli, tmp_path):
    code, out, _ = cli("fit", "--config", SMOKE, "--print_config")
    assert code == 0
    (tmp_path / "printed.yaml").write_text(out)
    assert yaml.safe_load(out)["backbone"]["model"] == "fedprompt-tiny"
    code, _, err = cli("fit", "--config", tmp_path / "printed.yaml", "--out_dir", tmp_path / "run",
                       "--federation.rounds", "1")
    assert code == 0, err


def test_missing_data_root_is_one_clear_error(cli):
    code, out, err = cli("fit", "--config", str(ROOT / "configs" / "promptfl_pacs.yaml"), *TINY,
                         "--data.root", "/does/not/exist")
    assert code == 2 and "/does/not/exist" in err and "does not exist" in err and "Traceback" not in err


def test_unknown_method_is_one_clear_error(cli):
    code, _, err = cli("fit", "--config", SMOKE, "--method", "NoSuchMethod")
    assert code == 2 and "NoSuchMethod" in err and "Traceback" not in err


def test_unknown_domain_is_one_clear_error(cli):
    require(PACS)
    code, _, err = cli("fit", "--config", str(ROOT / "configs" / "promptfl_pacs.yaml"), *TINY,
                       "--data.root", PACS, "--data.domains", "[photo,watercolor]")
    assert code == 2 and "watercolor" in err and "art_painting" in err


def test_undownloadable_pretrained_tag_is_one_clear_error(cli, monkeypatch):
    import open_clip.factory

    monkeypatch.setattr(open_clip.factory, "download_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("network unreachable")))
    code, _, err = cli("fit", "--config", SMOKE, "--backbone.model", "ViT-B-32", "--backbone.pretrained", "openai")
    assert code == 2 and "openai" in err and "--backbone.pretrained /path/to" in err and "Traceback" not in err


def test_non_finite_loss_is_reported_not_dropped(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "a", "--method.lr", "1e30",
                       "--federation.rounds", "3")
    assert code == 2 and "non-finite loss" in err and "client" in err
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "b", "--method.lr", "1e30",
                       "--federation.rounds", "3", "--federation.on_client_failure", "skip")
    assert code == 0, err
    assert any("failed_clients" in row for row in read_rows(tmp_path / "b"))


def test_base_to_novel_protocol_reports_base_novel_hm_cm(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path, "--data.num_classes", "8",
                       "--data.subsample_classes", "base")
    assert code == 0, err
    row = read_rows(tmp_path)[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["classnames"] == ["red square", "green circle", "blue triangle", "yellow cross"]  # base half
    base, novel = row["base_acc"], row["novel_acc"]
    assert row["hm"] == pytest.approx(2 * base * novel / (base + novel) if base and novel else 0.0, rel=1e-12)
    assert abs(row["cm"] - (row["local_acc"] + row["hm"]) / 2) < 1e-12
    assert len(row["client_novel_acc"]) == 4
    # PromptFL: every client holds the global prompt and the clients' test sets cover the base test set
    assert abs(base - row["global_acc"]) < 1e-6
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "csc", "--data.num_classes", "8",
                       "--data.subsample_classes", "base", "--method.csc", "true")
    assert code == 2 and "class-specific" in err


def test_validation_split_and_selection_by_validation(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path, "--federation.rounds", "3",
                       "--data.validation", "true", "--data.num_shots", "8", "--eval.select", "val")
    assert code == 0, err
    rows = read_rows(tmp_path)
    assert all(0 <= r["val_acc"] <= 1 for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    best = max(rows, key=lambda r: r["val_acc"])
    assert summary["selected"]["round"] == best["round"] and summary["selected"]["local_acc"] == best["local_acc"]
    assert torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["round"] == best["round"]
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "b", "--eval.select", "val")
    assert code == 2 and "data.validation" in err


def test_wandb_offline_logs_and_resumes_the_same_run(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = tmp_path / "run"
    assert cli("fit", "--config", SMOKE, "--out_dir", run, "--log.logger", "wandb", "--federation.rounds", "1")[0] == 0
    run_id = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["logger_run_id"]
    assert run_id and run_id != "None"
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", run, "--log.logger", "wandb", "--federation.rounds", "2",
                       "--resume", run / "checkpoints" / "last.ckpt")
    assert code == 0, err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["logger_run_id"] == run_id
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert offline_runs and all(p.name.endswith(run_id) for p in offline_runs)


def test_fedotp_domainnet_without_data_says_what_is_missing(cli, monkeypatch):
    monkeypatch.delenv("FEDPROMPT_DATA", raising=False)
    code, _, err = cli("fit", "--config", ROOT / "configs" / "fedotp_domainnet.yaml")
    assert code == 2
    last = err.strip().splitlines()[-1]  # (earlier in-process tests can leave logging handlers on closed streams)
    assert last.startswith("fedprompt: error: data.root is not set") and "FEDPROMPT_DATA" in last
    assert "DomainNet" in last


def test_bf16_mixed_precision_keeps_prompts_fp32(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path, "--fabric.precision", "bf16-mixed")
    assert code == 0, err
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global"]["prompt.ctx"].dtype == torch.float32
    rows = read_rows(tmp_path)
    assert all(0 <= r["local_acc"] <= 1 for r in rows) and rows[0]["bytes_up"] == 4 * 4 * 64 * 4


def test_bench_command_prints_timings_and_an_exact_difference(cli):
    code, out, err = cli("bench", "--truncation", "true", "--model", "fedprompt-tiny", "--num_classes", "5", "--n_ctx", "4",
                         "--repeats", "1")
    assert code == 0, err
    assert "truncated" in out and "77 tokens" in out
    difference = float(out.strip().splitlines()[-1].split("difference|")[-1])
    assert difference < 1e-4


def test_round_benchmark_prints_a_row_per_round(cli):
    code, out, err = cli("bench", "--config", SMOKE, "--rounds", "2", "--json", "true")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        sections = ("data", "image", "text", "logits", "backward", "optimizer", "evaluation", "communication")
        assert all(row[s] >= 0 for s in sections)
        assert sum(row[s] for s in sections) <= row["seconds"] * 1.05 + 1e-3  # the sections add up to the round
        assert row["train_images"] == 64 and row["images_per_second"] > 0 and row["parallel_clients"] == 4
        assert row["peak_memory_gb"] > 0 and row["gpu_utilisation"] is None  # CPU: no utilisation figure
    code, out, err = cli("bench", "--config", SMOKE, "--rounds", "1")
    assert code == 0 and "img/s" in out and "evalua" in out
