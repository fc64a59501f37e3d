"""FedMGP clients on the tiny ViT: visual prompts train while the tower stays frozen, only s groups of each kind
leave a client, the feature cache is refused (but allowed with text groups only), the released visual-prompt bug is
reproduced by compat: official, and resume is exact."""

from __future__ import annotations

import torch

from conftest import ROOT, read_rows, without_timings
from fedprompt.methods import FedMGP

SMOKE = str(ROOT / "configs" / "smoke.yaml")
MGP = ["--config", SMOKE, "--method", "FedMGP", "--method.n_ctx", "2", "--method.lr", "0.05", "--log.progress", "false"]



def fit(cli, out_dir, *extra):
    code, out, err = cli("fit", *MGP, "--out_dir", out_dir, *extra)
    assert code == 0, err
    return read_rows(out_dir), torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_client_state_groups_and_one_tower_call(tiny_backbone, monkeypatch):
    client = FedMGP().build_client(tiny_backbone, ["dog", "cat", "bird"], slots=2)
    state = client.slot_state(0)
    assert state["text_prompts.ctx"].shape == (5, 2, tiny_backbone.ctx_dim)
    assert state["visual_prompts.tokens"].shape == (5, 2, tiny_backbone.visual_width)
    words = tiny_backbone.word_embeddings("a photo")
    assert (state["text_prompts.ctx"] - words).abs().max() < 0.06  # "a photo" + N(0, 0.01^2) per group
    calls = []
    original = tiny_backbone.encode_image_prompted
    monkeypatch.setattr(tiny_backbone, "encode_image_prompted", lambda *a, **k: calls.append(1) or original(*a, **k))
    size = tiny_backbone.image_size
    batch = {"image": torch.randn(5, 3, size, size), "label": torch.tensor([0, 1, 2, 0, 1]),
             "slots": torch.tensor([0, 1]), "owner": torch.tensor([0, 0, 0, 1, 1])}
    losses = client.training_step(batch)
    assert losses.shape == (2,) and len(calls) == 1  # five groups of two clients: one tower call
    losses.sum().backward()
    assert client.visual_prompts.tokens.grad.abs().sum() > 0 and client.text_prompts.ctx.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.parameters())


def test_visual_prompts_train_and_the_tower_stays_frozen(cli, tmp_path, tiny_backbone):
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    rows, ckpt = fit(cli, tmp_path, "--federation.rounds", "2")
    torch.manual_seed(0)  # the run's seed: its initial prompts
    init = FedMGP().build_client(tiny_backbone, ["a", "b"]).slot_state(0)
    state = ckpt["clients"][0]
    assert not torch.allclose(state["visual_prompts.tokens"], init["visual_prompts.tokens"])
    # bytes up: each of the 4 clients sends s = 2 text groups (2 x D) and 2 visual groups (2 x width), fp32
    per_client = 2 * 2 * tiny_backbone.ctx_dim + 2 * 2 * tiny_backbone.visual_width
    assert rows[0]["bytes_up"] == 4 * per_client * 4 and rows[0]["bytes_down"] == 0
    assert rows[1]["bytes_down"] == 4 * per_client * 4  # the s global slots of each kind to each sampled client
    assert ckpt["global"]["text_prompts.ctx"].shape == (2, 2, tiny_backbone.ctx_dim)
    for key, value in tiny_backbone.state_dict().items():  # the frozen tower is unchanged by training
        assert torch.equal(value, before[key]), key


def test_feature_cache_is_refused_unless_text_only(cli, tmp_path):
    code, _, err = cli("fit", *MGP, "--out_dir", tmp_path / "a", "--train.feature_cache", "true")
    assert code == 2 and "FedMGP" in err and "feature_cache" in err
    rows, ckpt = fit(cli, tmp_path / "b", "--method.visual_groups", "0", "--train.feature_cache", "true",
                     "--federation.rounds", "1")
    assert set(ckpt["clients"][0]) == {"text_prompts.ctx"} and rows[0]["local_acc"] >= 0


def test_official_compat_keeps_the_initial_visual_prompts(cli, tmp_path, tiny_backbone):
    _, ckpt = fit(cli, tmp_path, "--method.compat", "official", "--federation.rounds", "2")
    torch.manual_seed(0)  # the run's seed: its initial prompts
    init = FedMGP().build_client(tiny_backbone, ["a", "b"]).slot_state(0)["visual_prompts.tokens"]
    for state in ckpt["clients"].values():  # trained, uploaded, averaged: and lost, as in the released code
        assert torch.equal(state["visual_prompts.tokens"], init)
    assert "visual_prompts.tokens" in ckpt["global"]  # the aggregated visual slots exist on the server


def test_resume_is_exact(cli, tmp_path):
    fit(cli, tmp_path / "full", "--federation.rounds", "3", "--federation.fraction", "0.5")
    fit(cli, tmp_path / "cut", "--federation.rounds", "2", "--federation.fraction", "0.5")
    rows, ckpt = fit(cli, tmp_path / "cut", "--federation.rounds", "3", "--federation.fraction", "0.5",
                     "--resume", tmp_path / "cut" / "checkpoints" / "last.ckpt")
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    assert without_timings(read_rows(tmp_path / "full")) == without_timings(rows)
    for cid, state in full["clients"].items():
        for key, value in state.items():
            assert torch.equal(value, ckpt["clients"][cid][key]), (cid, key)
