"""One round, two transports: ``fedprompt fit --runtime flower`` (a Flower app in this process, every message through
Flower's serialisation) equals ``--runtime fabric --federation.parallel_clients 1`` bit for bit (every metrics row
but its timings, every client's state, the global state, the rule's state, the summary), for the methods whose
server or client side differs most, client-level DP, drop-outs and the dual evaluation; a Flower run killed after a
round resumes to the same bits; rounds in which no sampled client reported are told and stop the run the same way
in both runtimes; settings a runtime cannot honour are one line before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install -e \".[flower]\")")

import fedprompt.run_folder  # noqa: E402 - after the skip
from conftest import ROOT, read_rows  # noqa: E402

SMOKE = str(ROOT / "configs" / "smoke.yaml")
COMMON = ["--config", SMOKE, "--federation.rounds", "2", "--federation.fraction", "0.75", "--log.logger", "none"]
CASES = {
    "PromptFL": ["--method", "PromptFL"],
    "FedOTP": ["--method", "FedOTP", "--method.n_ctx", "4", "--method.lr", "0.5"],
    "FedPGP": ["--method", "FedPGP", "--method.n_ctx", "4", "--method.bottleneck", "2", "--method.lr", "0.5"],
    "FedMGP": ["--method", "FedMGP", "--method.n_ctx", "2", "--method.lr", "0.01"],  # the selection: client apply
    "FedTPG": ["--method", "FedTPG", "--method.lr", "0.01"],  # the reduce path
    "PFedMoAP": ["--method", "PFedMoAP", "--method.n_ctx", "4", "--method.gating_dim", "8", "--method.gating_heads",
                 "2", "--method.num_experts", "3", "--method.lr", "0.05", "--federation.rounds", "3"],  # per-client
    "DPFPL": ["--method", "DPFPL", "--method.n_ctx", "4", "--method.rank", "2", "--method.noise_multiplier", "0.7",
              "--method.clip_norm", "0.5", "--method.lr", "0.1", "--train.batch_size", "4"],  # record_epsilon
    "PromptFL-client-dp": ["--method", "PromptFL", "--dp.noise_multiplier", "1", "--dp.clip_norm", "1",
                           "--dp.delta", "0.01", "--federation.rounds", "3"],
    "PromptFL-drop": ["--method", "PromptFL", "--federation.drop_rate", "0.5", "--federation.rounds", "3"],
    "FedOTP-dual": ["--method", "FedOTP", "--method.n_ctx", "4", "--method.lr", "0.5", "--eval.mode", "dual"],
    "PromptFL-central": ["--method", "PromptFL", "--federation.central", "true"],
    # malicious clients and robust rules (issue 29): every attack kind and every rule once
    "PromptFL-backdoor-median-bound": ["--method", "PromptFL", "--attack.kind", "backdoor", "--attack.fraction", "0.5",
                                       "--attack.target_class", "1", "--attack.trigger_size", "0.25",
                                       "--attack.scale", "2", "--robust.rule", "median", "--robust.norm_bound", "0.5"],
    "PromptFL-label-flip-trimmed-mean": ["--method", "PromptFL", "--attack.kind", "label_flip", "--robust.rule",
                                         "trimmed_mean", "--robust.trim", "0.34"],
    "FedMGP-scale-krum": ["--method", "FedMGP", "--method.n_ctx", "2", "--method.lr", "0.01", "--attack.kind", "scale",
                          "--attack.scale", "3", "--robust.rule", "krum", "--robust.malicious", "0",
                          "--robust.keep", "2"],  # Krum in front of a selection rule
    "FedTPG-sign-flip-krum-bound": ["--method", "FedTPG", "--method.lr", "0.01", "--attack.kind", "sign_flip",
                                    "--attack.scale", "2", "--robust.rule", "krum", "--robust.malicious", "0",
                                    "--robust.keep", "2", "--robust.norm_bound", "0.05"],  # a reduce rule, gathered
    "PromptFL-client-dp-bound-sign-flip": ["--method", "PromptFL", "--dp.noise_multiplier", "1", "--dp.clip_norm", "1",
                                           "--dp.delta", "0.01", "--robust.norm_bound", "0.02", "--attack.kind",
                                           "sign_flip"],
    # kept multipliers, the OT server (FOCoOp); OOD detection's per-client AUROC / FPR95 in both runtimes' rows
    "FOCoOp": ["--method", "FOCoOp", "--method.n_ctx", "2", "--method.num_negatives", "4", "--method.negative_words",
               str(ROOT / "tests" / "data" / "negative_words"), "--method.lr", "0.05"],
    "PromptFL-ood": ["--method", "PromptFL", "--data.subsample_classes", "base", "--data.num_classes", "6",
                     "--eval.ood", "[novel]", "--eval.ood_scores", "[msp,energy,mcm,neglabel]", "--eval.ood_negatives",
                     str(ROOT / "tests" / "data" / "negative_words"), "--eval.ood_negative_count", "8"],
    # issue 26: LoRA in both towers (dropout, AdamW), FedCLIP's adapter, pFedMMA's shared projection (private parts)
    "FedLoRA": ["--method", "FedLoRA", "--method.lr", "0.01"],
    "FedCLIP": ["--method", "FedCLIP", "--method.lr", "0.001"],
    "PFedMMA": ["--method", "PFedMMA", "--method.adapter_start", "1", "--method.adapter_end", "2",
                "--method.lr", "0.01"],
    # issue 27: FedMVP's per-client switch to LoRA (kept in the client state, never sent; 2 of 4 clients switch)
    "FedMVP-LoRA": ["--method", "FedMVP", "--method.attributes", str(ROOT / "tests" / "data" /
                                                                     "synthetic_attributes.json"),
                    "--method.lr", "0.05", "--method.lora_threshold", "1.6", "--federation.rounds", "3"],
}


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]


def same(a, b) -> bool:
    """Bit-equal values: tensors (dtype, shape, every bit), NaN equals NaN, containers entry by entry."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def fit(cli, out: Path, *flags) -> Path:
    code, _, err = cli("fit", *COMMON, *flags, "--out_dir", out)
    assert code == 0, err
    return out


def outcome(run: Path) -> dict:
    """What a run computed: its rows (no timings), its summary (no folder), and its last checkpoint's states."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("out_dir")
    return {"rows": without_timings(read_rows(run)), "summary": summary, "global": checkpoint["global"],
            "clients": checkpoint["clients"], "aggregator": checkpoint["aggregator"], "round": checkpoint["round"]}


def assert_same_run(got: dict, expected: dict) -> None:
    assert len(got["rows"]) == len(expected["rows"])
    for a, b in zip(got["rows"], expected["rows"]):
        assert list(a) == list(b), (a, b)  # the same keys in the same order
        for key in b:
            assert same(a[key], b[key]), (b["round"], key, a[key], b[key])
    for key in ("summary", "global", "clients", "aggregator", "round"):
        assert same(got[key], expected[key]), key


@pytest.mark.parametrize("case", list(CASES))
def test_flower_runtime_equals_fabric_one_client_at_a_time(cli, tmp_path, case):
    flags = CASES[case]
    flower = outcome(fit(cli, tmp_path / "flower", *flags, "--runtime", "flower"))
    fabric = outcome(fit(cli, tmp_path / "fabric", *flags, "--federation.parallel_clients", "1"))
    assert_same_run(flower, fabric)
    assert len(fabric["clients"]) == (1 if case.endswith("central") else 4)
    rows = flower["rows"]
    assert all(row["parallel_clients"] == 1 for row in rows)
    if case == "PromptFL-client-dp":
        assert all(row["epsilon"] > 0 for row in rows) and rows[-1]["epsilon"] > rows[0]["epsilon"]
    if case == "DPFPL":
        assert all(row["record_epsilon"] > 0 for row in rows)
    if case == "PromptFL-drop":
        assert all(len(row["dropped_clients"]) for row in rows)
    if case == "FedOTP-dual":
        assert {"local_acc", "global_acc", "dual_hm"} <= rows[-1].keys()
    if "--attack.kind" in flags:
        assert rows[-1]["malicious_clients"] and "benign_acc" in rows[-1]
        assert ("attack_success_rate" in rows[-1]) == any(kind in case for kind in ("backdoor", "label-flip"))
    if "krum" in case:
        assert all(len(row["robust_kept"]) == 2 for row in rows)
    if "bound" in case:
        assert all("robust_bounded" in row for row in rows) and any(row["robust_bounded"] for row in rows)
    if case == "PromptFL-ood":
        assert len(rows[-1]["client_ood/novel/neglabel/auroc"]) == 4 and "ood/novel/neglabel/auroc" in flower["summary"]


def test_flower_runtime_killed_after_a_round_resumes_to_the_same_bits(cli, tmp_path, monkeypatch):
    """Ctrl-C right after round 2's checkpoint of a Flower run: the printed command resumes it (its config says
    --runtime flower; every node is new and gets its client's state from the checkpoint), and the finished run
    equals an uninterrupted one, FedOTP's local prompts included."""
    flags = [*CASES["FedOTP"], "--runtime", "flower", "--federation.rounds", "3"]
    straight = outcome(fit(cli, tmp_path / "straight", *flags))
    run = tmp_path / "cut"
    save = fedprompt.run_folder.save_checkpoint

    def save_then_interrupt(state, path):
        save(state, path)
        if state["round"] == 2 and path.name == "last.ckpt":
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(fedprompt.run_folder, "save_checkpoint", save_then_interrupt)
        code, _, err = cli("fit", *COMMON, *flags, "--out_dir", run)
    assert code == 130 and "round 2 of 3" in err
    command = err.strip().splitlines()[-1].split("Resume with: fedprompt ")[1].split()
    code, _, err = cli(*command)
    assert code == 0, err
    assert_same_run(outcome(run), straight)
    config = (run / "hyperparameters.yaml").read_text()
    assert "runtime: flower" in config


def test_evaluate_and_zeroshot_under_flower_equal_fabric(cli, tmp_path):
    """``evaluate`` of a checkpoint (every node gets its client's state from it) and ``zeroshot``: the same files."""
    run = fit(cli, tmp_path / "run", *CASES["FedOTP"], "--federation.parallel_clients", "1")
    evaluations = {}
    for runtime in ("fabric", "flower"):
        code, _, err = cli("evaluate", "--resume", run / "checkpoints" / "last.ckpt", "--runtime", runtime)
        assert code == 0, err
        evaluations[runtime] = json.loads((run / "eval.json").read_text())
    assert same(evaluations["flower"], evaluations["fabric"]) and "client_acc" in evaluations["fabric"]
    summaries = {}
    for runtime in ("fabric", "flower"):
        out = tmp_path / f"zeroshot-{runtime}"
        code, _, err = cli("zeroshot", "--config", SMOKE, "--log.logger", "none", "--runtime", runtime,
                           "--federation.parallel_clients", "1", "--out_dir", out)  # Flower's order: one at a time
        assert code == 0, err
        summaries[runtime] = {k: v for k, v in json.loads((out / "summary.json").read_text()).items()
                              if k != "out_dir"}
        summaries[runtime]["rows"] = read_rows(out)
    assert same(summaries["flower"], summaries["fabric"])


def test_runtime_may_not_change_on_resume(cli, tmp_path):
    run = fit(cli, tmp_path / "run", "--federation.rounds", "1")
    code, _, err = cli("fit", "--resume", run / "checkpoints" / "last.ckpt", "--federation.rounds", "2",
                       "--runtime", "flower")
    assert code == 2 and 'runtime: "fabric" in the checkpoint, "flower" now' in err


@pytest.mark.parametrize("flags, expected", [
    (["--runtime", "nope"], "runtime"),
    (["--runtime", "flower", "--fabric.devices", "2"], "--runtime flower runs in one process on one device"),
    (["--runtime", "flower", "--federation.parallel_clients", "4"],
     "--federation.parallel_clients 4: under --runtime flower each client trains alone"),
    (["--federation.drop_rate", "0.99"], "federation.drop_rate: 0.99 keeps floor((1 - 0.99) x 4) = 0"),
    (["--federation.drop_rate", "0.99", "--runtime", "flower"], "federation.drop_rate: 0.99 keeps"),
])
def test_settings_a_run_cannot_honour_are_one_line_before_anything(cli, tmp_path, flags, expected):
    out = tmp_path / "run"
    code, _, err = cli("fit", *COMMON, *flags, "--out_dir", out)
    lines = err.strip().splitlines()
    assert code == 2 and expected in lines[-1] and "Traceback" not in err, err
    assert not out.exists()


def test_runtime_is_in_fit_help_and_bench_refuses_flower(cli):
    code, out, _ = cli("fit", "--help")
    assert code == 0 and "--runtime {fabric,flower}" in out and "Flower app in this process" in " ".join(out.split())
    code, _, err = cli("bench", "--config", SMOKE, "--runtime", "flower", "--rounds", "1")
    assert code == 2 and "bench times the rounds of the Fabric runtime" in err


@pytest.mark.parametrize("runtime", ["fabric", "flower"])
def test_rounds_without_a_reporting_client_are_told_and_stop_the_run(cli, tmp_path, runtime):
    """Round 1 trains everyone (1 of 4 reports with drop_rate 0.6); later rounds sample 2 and keep none of them:
    one line per such round, and the run stops at federation.max_failed_rounds, the same in both runtimes."""
    flags = ["--federation.fraction", "0.5", "--federation.drop_rate", "0.6", "--federation.rounds", "6",
             "--federation.max_failed_rounds", "2", "--runtime", runtime]
    out = tmp_path / runtime
    code, _, err = cli("fit", *COMMON, *flags, "--out_dir", out)
    assert code == 2
    assert "round 2: no sampled client reported (2 of 2 dropped out (federation.drop_rate)); no client trained" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedprompt: error: round 3: no sampled client reported, 2 rounds in a row")
    assert "Lower --federation.drop_rate" in last
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[1]["train_loss"] is None
    assert not (out / "summary.json").exists()


def test_a_failed_training_stops_both_runtimes_with_the_same_line(cli, tmp_path):
    lines = {}
    for runtime in ("fabric", "flower"):
        code, _, err = cli("fit", *COMMON, "--method.lr", "1e30", "--runtime", runtime, "--federation.parallel_clients",
                           "1", "--out_dir", tmp_path / runtime)
        assert code == 2
        lines[runtime] = err.strip().splitlines()[-1]
    assert lines["flower"] == lines["fabric"]
    assert "round 1: client " in lines["fabric"] and "non-finite loss" in lines["fabric"]
    assert "--federation.on_client_failure skip" in lines["fabric"]


def test_every_flower_node_gone_is_told_and_stops_the_run(tmp_path, capfd):
    """Every node stops answering from round 2: each round says that every sampled client failed and that no
    client could be scored, and the run stops after federation.max_failed_rounds such rounds, as fit does when
    every client fails (no summary with NaN accuracies)."""
    from fedprompt.errors import FedPromptError
    from fedprompt.flower.local import run_local

    out = tmp_path / "run"
    args = (f"--federation.rounds 6 --federation.max_failed_rounds 2 --log.logger none --log.progress false "
            f"--out_dir {out}")
    with pytest.raises(FedPromptError, match="round 3: every sampled client failed, 2 rounds in a row"):
        run_local(SMOKE, args, down_from={node: 2 for node in range(1, 5)}, timeout=5)
    err = capfd.readouterr().err
    assert "round 2: every sampled client failed (client 0: no reply within 5 s" in err
    assert "round 2: 4 of 4 clients could not be scored" in err
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[1]["unscored_clients"] == [0, 1, 2, 3]
    assert "failed_clients" not in rows[0] and not (out / "summary.json").exists()


@pytest.mark.parametrize("flags, rule", [(CASES["PFedMoAP"], "MixtureOfPromptsServer"),
                                         (CASES["DPFPL"] + ["--method.compat", "official"], "ReleasedNoiseServer"),
                                         (CASES["PromptFL"] + ["--robust.norm_bound", "1"], "RobustAggregator"),
                                         (CASES["PromptFL"] + ["--robust.rule", "median"], "RobustAggregator")])
def test_secure_aggregation_refuses_rules_that_need_more_than_the_sum(tmp_path, capfd, flags, rule):
    """SecAgg+ gives the server the weighted mean only: a rule that keeps the uploads or adds to the mean would
    silently lose that, so it is refused in one line before any round."""
    from fedprompt.errors import FedPromptError
    from fedprompt.flower.local import run_local

    with pytest.raises(FedPromptError, match=f"secure-aggregation: .*\\({rule}\\) needs every client's upload"):
        run_local(SMOKE, " ".join([*flags, "--log.logger", "none", "--out_dir", str(tmp_path / "run")]),
                  secure_aggregation=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_checkpoint_without_client_states_is_refused_where_no_node_holds_them(cli, tmp_path):
    """A deployed Flower run without report-states keeps the client states on its nodes: evaluating or continuing
    its checkpoint with fresh clients (Fabric, or Flower's in-process nodes) would start them from the initial
    prompts, so both say so in one line."""
    from fedprompt.flower.local import run_local

    run = tmp_path / "run"
    run_local(SMOKE, f"--federation.rounds 1 --log.logger none --log.progress false --out_dir {run}")
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["clients"] == {}
    for runtime in ("fabric", "flower"):
        code, _, err = cli("evaluate", "--resume", last, "--runtime", runtime)
        assert code == 2 and "holds no client states" in err and f"and --runtime {runtime} has nowhere" in err
        assert not (run / "eval.json").exists()
