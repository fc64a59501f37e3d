"""FedTPG: the generator's context depends on the class names, only the generator leaves a client, the reduce
aggregation equals the gather one, resume is exact, and the cross_cls protocol (clients with their own class lists
from several datasets, base/novel sets per dataset, an unseen dataset) runs end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import open_clip
import pytest
import torch
import yaml

from conftest import ROOT, read_rows, without_timings
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import WeightedMean, state_bytes
from fedprompt.methods import FedTPG

SMOKE = str(ROOT / "configs" / "smoke.yaml")
TPG = ["--config", SMOKE, "--method", "FedTPG", "--method.lr", "0.01", "--log.progress", "false"]

COMBINED = """
method: {class_path: fedprompt.methods.FedTPG, init_args: {lr: 0.01}}
data:
  class_path: fedprompt.data.Combined
  init_args:
    subsample_classes: base
    num_shots: 4
    partition: {class_path: fedprompt.data.CrossClass, init_args: {classes_per_client: 2}}
    datasets:
      - {class_path: fedprompt.data.Synthetic, init_args: {num_classes: 8, train_per_class: 6, test_per_class: 3}}
      - {class_path: fedprompt.data.Synthetic, init_args: {num_classes: 6, train_per_class: 6, test_per_class: 3}}
    unseen:
      - {class_path: fedprompt.data.Synthetic, init_args: {num_classes: 5, test_per_class: 2}}
    names: [first, second, unseen]
backbone: {model: fedprompt-tiny, pretrained: null}
federation: {rounds: 2}
train: {batch_size: 8, augment: false}
fabric: {accelerator: cpu}
log: {progress: false}
"""



def test_generated_context_depends_on_the_class_names(tiny_backbone):
    client = FedTPG().build_client(tiny_backbone, ["dog", "cat", "bird"], slots=2)
    ctx = client.context()
    assert ctx.shape == (2, 4, tiny_backbone.ctx_dim)
    torch.testing.assert_close(ctx[0], ctx[1])  # every slot starts from the same generator
    client.set_classes(["car", "truck", "boat"])
    assert not torch.allclose(client.context()[0], ctx[0])
    assert client.text_features().shape == (2, 3, tiny_backbone.embed_dim)
    state = client.slot_state(0)
    assert all(key.startswith("generator.") for key in state) and "generator.queries" in state


def test_schedule_arguments_reach_the_optimiser_and_default_to_cross_cls():
    """The released cross_cls optimiser: SGD lr 0.003, momentum 0.9, weight decay 1e-5, CosineAnnealingLR(500)
    without warm-up, one scheduler per client."""
    assert vars(FedTPG().optim) == {"lr": 0.003, "momentum": 0.9, "weight_decay": 1e-5, "lr_schedule": "cosine",
                                    "warmup_epochs": 0, "warmup_lr": 1e-5, "lr_scope": "client",
                                    "cosine_epochs": 500}
    method = FedTPG(lr=0.01, lr_schedule="constant", warmup_epochs=2, warmup_lr=1e-4, lr_scope="local",
                    cosine_epochs=None)
    assert vars(method.optim) == {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5, "lr_schedule": "constant",
                                  "warmup_epochs": 2, "warmup_lr": 1e-4, "lr_scope": "local", "cosine_epochs": None}
    assert method.hparams()["lr_schedule"] == "constant"
    assert FedTPG().optim.lr_at(0, 1, 0, epochs_before=250) == pytest.approx(0.0015)  # round 251 of 500
    with pytest.raises(FedPromptError, match="lr_scope"):
        FedTPG(lr_scope="global")


def test_cross_cls_config_uses_the_released_settings():
    cfg = yaml.safe_load((ROOT / "configs" / "fedtpg_cross_cls.yaml").read_text())
    method = cfg["method"]["init_args"]
    assert cfg["method"]["class_path"] == "fedprompt.methods.FedTPG"
    assert (method["n_ctx"], method["lr"], method["momentum"], method["weight_decay"], method["weighted"]) == \
        (4, 0.003, 0.9, 1e-5, False)
    assert (method["lr_schedule"], method["warmup_epochs"], method["lr_scope"], method["cosine_epochs"]) == \
        ("cosine", 0, "client", 500)
    assert (cfg["federation"]["rounds"], cfg["federation"]["fraction"], cfg["train"]["local_epochs"],
            cfg["train"]["batch_size"], cfg["seed"], cfg["data"]["init_args"]["seed"]) == (500, 1.0, 1, 200, 43, 43)


def test_vit_b16_upload_is_4206080_floats_per_client():
    """What one client sends per round at ViT-B/16's widths (text width 512, joint space 512, from open_clip's own
    config): the whole generator, 4,206,080 fp32 values = 16,824,320 bytes; the 30 cross_cls clients send 30 times
    that (``bytes_up`` of a round sums the uploads)."""
    config = open_clip.get_model_config("ViT-B-16")
    widths = SimpleNamespace(ctx_dim=config["text_cfg"]["width"], embed_dim=config["embed_dim"],
                             logit_scale=torch.tensor(100.0))
    assert (widths.ctx_dim, widths.embed_dim) == (512, 512)
    method = FedTPG()
    client = method.build_client(widths, ["dog", "cat"], slots=1)
    upload = method.build_aggregator().upload(0, client.slot_state(0), 1)
    assert set(upload) == set(client.slot_state(0))
    assert sum(v.numel() for v in upload.values()) == 4_206_080
    assert state_bytes(upload) == 4_206_080 * 4 == 16_824_320
    assert 30 * state_bytes(upload) == 504_729_600


def test_only_the_generator_leaves_a_client_and_is_averaged(cli, tmp_path):
    code, _, err = cli("fit", *TPG, "--out_dir", tmp_path, "--federation.rounds", "2")
    assert code == 0, err
    rows = read_rows(tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    size = sum(v.numel() * 4 for v in ckpt["global"].values())
    assert rows[0]["bytes_up"] == 4 * size and rows[0]["bytes_down"] == 4 * size  # 4 clients, the whole generator
    for state in ckpt["clients"].values():  # every client holds the averaged generator
        for key, value in state.items():
            assert torch.equal(value, ckpt["global"][key])
    assert rows[-1]["local_acc"] >= 0 and "global_acc" in rows[-1]


def test_reduce_aggregation_equals_gathering_every_upload(cli, tmp_path, monkeypatch):
    code, _, err = cli("fit", *TPG, "--out_dir", tmp_path / "reduce", "--federation.fraction", "0.75",
                       "--federation.rounds", "3")
    assert code == 0, err
    monkeypatch.setattr(FedTPG, "build_aggregator", lambda self: WeightedMean(self.shared_prefixes, weighted=False))
    code, _, err = cli("fit", *TPG, "--out_dir", tmp_path / "gather", "--federation.fraction", "0.75",
                       "--federation.rounds", "3")
    assert code == 0, err
    a = torch.load(tmp_path / "reduce" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "gather" / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in a["global"].items():
        torch.testing.assert_close(value, b["global"][key], rtol=1e-6, atol=1e-7)
    rows_a, rows_b = without_timings(read_rows(tmp_path / "reduce")), without_timings(read_rows(tmp_path / "gather"))
    assert [r["bytes_up"] for r in rows_a] == [r["bytes_up"] for r in rows_b]
    assert [r["client_acc"] for r in rows_a] == [r["client_acc"] for r in rows_b]


def test_resume_is_exact(cli, tmp_path):
    assert cli("fit", *TPG, "--out_dir", tmp_path / "full", "--federation.rounds", "3")[0] == 0
    assert cli("fit", *TPG, "--out_dir", tmp_path / "cut", "--federation.rounds", "2")[0] == 0
    code, _, err = cli("fit", *TPG, "--out_dir", tmp_path / "cut", "--federation.rounds", "3", "--resume",
                       tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert code == 0, err
    assert without_timings(read_rows(tmp_path / "full")) == without_timings(read_rows(tmp_path / "cut"))


def test_cross_class_protocol_across_datasets(cli, tmp_path):
    config = tmp_path / "combined.yaml"
    config.write_text(COMBINED)
    code, out, err = cli("fit", "--config", config, "--out_dir", tmp_path / "run")
    assert code == 0, err
    row = read_rows(tmp_path / "run")[-1]
    # clients are scored among their own classes: its own name, never local_acc or global_acc
    assert "own_classes_acc" in row and "local_acc" not in row and "global_acc" not in row
    assert {"base_acc", "novel_acc", "hm", "cm", "unseen_acc"} <= row.keys()
    assert set(row["set_acc"]) == {"first/base", "first/novel", "second/base", "second/novel", "unseen/all"}
    assert row["base_acc"] == pytest.approx((row["set_acc"]["first/base"] + row["set_acc"]["second/base"]) / 2)
    assert row["unseen_acc"] == row["set_acc"]["unseen/all"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["clients"]) == 4  # base classes 4 of 8 -> 2 clients of 2; 3 of 6 -> round(1.5) = 2: 2 + 1
    assert "own_classes_acc" in out
