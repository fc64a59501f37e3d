"""The example of docs/writing_a_method.md (examples/personal_temperature.py) runs on the smoke config through the
command line, any K gives the K = 1 run, only the shared context is sent and the temperatures stay personal."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT, read_rows, without_timings

sys.path.insert(0, str(ROOT))  # `examples` is importable from the project root, as in the docs' command

EXAMPLE = "examples.personal_temperature.PersonalTemperature"
FLAGS = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--method", EXAMPLE, "--method.lr", "0.05",
         "--federation.rounds", "3", "--federation.fraction", "0.75", "--log.progress", "false"]


def run(cli, out_dir, *extra):
    code, _, err = cli("fit", *FLAGS, "--out_dir", out_dir, *extra)
    assert code == 0, err
    return without_timings(read_rows(out_dir)), torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_the_example_is_short():
    lines = (ROOT / "examples" / "personal_temperature.py").read_text().splitlines()
    assert len(lines) < 60


def test_example_method_k1_equals_k3(cli, tmp_path):
    rows_1, ckpt_1 = run(cli, tmp_path / "k1", "--federation.parallel_clients", "1")
    rows_3, ckpt_3 = run(cli, tmp_path / "k3", "--federation.parallel_clients", "3")
    assert len(rows_1) == len(rows_3) == 3
    rounded = ("train_loss", "ece", "client_ece", "calibration")  # from the confidences: equal to float rounding
    for a, b in zip(rows_1, rows_3):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        for key in rounded[1:]:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert {k: v for k, v in a.items() if k not in rounded} == {k: v for k, v in b.items() if k not in rounded}
    for cid, state in ckpt_1["clients"].items():
        for key, value in state.items():
            torch.testing.assert_close(ckpt_3["clients"][cid][key], value, rtol=1e-4, atol=1e-5)
    assert set(ckpt_1["global"]) == {"prompt.ctx"}  # only the context goes to the server
    ctx, scales = ckpt_1["global"]["prompt.ctx"], [s["log_scale"] for s in ckpt_1["clients"].values()]
    assert rows_1[0]["bytes_up"] == 4 * ctx.numel() * ctx.element_size()  # 4 clients in round 1
    assert len({float(s) for s in scales}) > 1  # the temperatures trained, each its own
    assert rows_1[-1]["train_loss"] < rows_1[0]["train_loss"]
