"""FedPGP: logits from sigma + U V, the contrastive term against a direct computation, the hand-crafted prompt
(cached; the released code's literal X sentence as a switch), one text-encoder call a step, and federated runs
through the real ``fit`` (only sigma leaves a client, U and V are kept, resume, base-to-novel)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, read_rows, tiny_fit, without_timings
from fedprompt.backbone import load_backbone
from fedprompt.data import Synthetic, clip_transforms
from fedprompt.errors import FedPromptError
from fedprompt.methods import FedPGP, FedPGPClient

CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse"]
SMOKE = str(ROOT / "configs" / "smoke.yaml")



@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("fedprompt-tiny", None)


def make_client(backbone, seed=0, classes=CLASSES, **kwargs) -> FedPGPClient:
    torch.manual_seed(seed)
    return FedPGP(**{"n_ctx": 4, "bottleneck": 2, **kwargs}).build_client(backbone, classes)


def make_batch(backbone, n=4, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    return {"image": torch.randn(n, 3, size, size, generator=g), "label": torch.arange(n) % len(CLASSES)}


def enlarge_personal(client, scale=10.0):
    """U V at init is ~1e-3 of sigma; make it matter so that sigma-only and sigma + UV differ clearly."""
    with torch.no_grad():
        client.personal.U.mul_(scale)
        client.personal.V.mul_(scale)


def features(backbone, client, ctx: torch.Tensor) -> torch.Tensor:
    """L2-normalised text features [C, E] of one context [n_ctx, D] (the plain prompt path)."""
    return F.normalize(backbone.encode_prompts(client.tokens, ctx).float(), dim=-1)


# ------------------------------------------------------------------------------------------------- the forward
def test_state_is_sigma_and_the_low_rank_factors(backbone):
    client = make_client(backbone, n_ctx=4, bottleneck=3)
    state = client.slot_state(0)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "sigma.ctx": (4, backbone.ctx_dim), "personal.U": (4, 3), "personal.V": (3, backbone.ctx_dim)}
    for key, value in state.items():
        assert 0.01 < float(value.std()) < 0.03, key  # N(0, 0.02^2)
    assert FedPGP().shared_prefixes == ("sigma.",) and FedPGP().global_model is False


def test_logits_use_sigma_plus_uv(backbone):
    client = make_client(backbone)
    enlarge_personal(client)
    batch = make_batch(backbone)
    client.eval()
    with torch.no_grad():
        logits = client(batch)
        image = F.normalize(backbone.encode_image(batch["image"]).float(), dim=-1)
        sigma, u, v = client.sigma.ctx[0], client.personal.U[0], client.personal.V[0]
        expected = backbone.logit_scale * image @ features(backbone, client, sigma + u @ v).t()
        sigma_only = backbone.logit_scale * image @ features(backbone, client, sigma).t()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits - sigma_only).abs().max() > 1e-3  # the personal term is in the classifier
    client.train()
    torch.testing.assert_close(client(batch), expected, rtol=1e-5, atol=1e-5)  # the same logits in training


def test_contrastive_term_equals_a_direct_computation(backbone):
    mu, tau = 0.7, 0.3
    client = make_client(backbone, mu=mu, tau=tau)
    enlarge_personal(client)
    client.train()
    batch = make_batch(backbone)
    loss = client.training_step(batch)
    assert loss.shape == (1,)
    with torch.no_grad():
        sigma, u, v = client.sigma.ctx[0], client.personal.U[0], client.personal.V[0]
        f_clip = F.normalize(backbone.encode_text([f"a photo of a {c}." for c in CLASSES]).float(), dim=-1)
        f_sigma = features(backbone, client, sigma)
        f_personal = features(backbone, client, sigma + u @ v)
        positive = F.cosine_similarity(f_clip, f_sigma, dim=-1)
        negative = F.cosine_similarity(f_sigma, f_personal, dim=-1)
        con = F.cross_entropy(torch.stack([positive, negative], 1) / tau, torch.zeros(len(CLASSES), dtype=torch.long))
        image = F.normalize(backbone.encode_image(batch["image"]).float(), dim=-1)
        ce = F.cross_entropy(backbone.logit_scale * image @ f_personal.t(), batch["label"])
    assert float(con) > 0.05  # a term of real size (not a degenerate log 2)
    assert float(loss[0]) == pytest.approx(float(ce + mu * con), rel=1e-5)
    # mu = 0: cross-entropy alone
    plain = make_client(backbone, mu=0.0, tau=tau)
    enlarge_personal(plain)
    plain.train()
    assert float(plain.training_step(batch)[0]) == pytest.approx(float(ce), rel=1e-5)


def test_gradients_reach_sigma_u_and_v(backbone):
    client = make_client(backbone)
    enlarge_personal(client)
    client.train()
    client.training_step(make_batch(backbone)).sum().backward()
    for name, param in client.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_one_encoder_call_per_step_and_the_hand_prompt_encoded_once(backbone, monkeypatch):
    client = make_client(backbone)
    client.train()
    prompt_calls, text_calls = [], []
    encode_prompts, encode_text = backbone.encode_prompts, backbone.encode_text
    monkeypatch.setattr(backbone, "encode_prompts",
                        lambda tokens, ctx, **kw: prompt_calls.append(tuple(ctx.shape)) or encode_prompts(tokens, ctx,
                                                                                                          **kw))
    monkeypatch.setattr(backbone, "encode_text", lambda texts: text_calls.append(list(texts)) or encode_text(texts))
    batch = make_batch(backbone)
    for _ in range(3):
        client.training_step(batch)
    assert prompt_calls == [(1, 2, 4, backbone.ctx_dim)] * 3  # sigma + UV and sigma together
    assert text_calls == [[f"a photo of a {c}." for c in CLASSES]]  # the constant: once per client module
    client.eval()
    client.predict_logits(batch)
    assert prompt_calls[-1] == (1, 2, 4, backbone.ctx_dim)  # the same text side (one shape) in evaluation
    assert len(text_calls) == 1


def test_literal_x_prompt_switch(backbone):
    client = make_client(backbone, literal_x_prompt=True)
    assert client.hand_prompt == "X X X X {}."
    expected = F.normalize(backbone.encode_text([f"X X X X {c}." for c in CLASSES]).float(), dim=-1)
    torch.testing.assert_close(client.hand_features(torch.device("cpu")), expected, rtol=0, atol=0)
    default = make_client(backbone).hand_features(torch.device("cpu"))
    assert (default - expected).abs().max() > 1e-3
    # the CLIP hand prompt is configurable; class-name underscores become spaces
    custom = make_client(backbone, classes=["ice_cream"], hand_prompt="a sketch of a {}.")
    torch.testing.assert_close(custom.hand_features(torch.device("cpu")),
                               F.normalize(backbone.encode_text(["a sketch of a ice cream."]).float(), dim=-1))


def test_method_arguments_are_checked(cli, tmp_path):
    for kwargs, word in (({"bottleneck": 0}, "bottleneck"), ({"mu": -1}, "mu"), ({"tau": 0}, "tau"),
                         ({"hand_prompt": "a photo"}, "hand_prompt"), ({"n_ctx": 0}, "n_ctx")):
        with pytest.raises(FedPromptError, match=word):
            FedPGP(**kwargs)
    hp = FedPGP().hparams()
    assert (hp["n_ctx"], hp["bottleneck"], hp["mu"], hp["tau"], hp["lr"], hp["lr_schedule"]) == \
        (16, 8, 0.5, 0.5, 0.001, "constant")
    code, _, err = cli("fit", "--config", SMOKE, "--method", "FedPGP", "--method.tau", "0", "--out_dir", tmp_path)
    assert code == 2 and "tau" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- federated runs
def _fit(out_dir: Path, rounds: int, resume: Path | None = None) -> dict:
    return tiny_fit(FedPGP(n_ctx=4, bottleneck=2, lr=0.5), out_dir, rounds, resume)


def test_only_sigma_leaves_a_client_u_and_v_are_kept_and_resume_is_exact(backbone, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _fit(full, rounds=3)
    rows = read_rows(full)
    assert rows[0]["clients"] == [0, 1] and len(rows[1]["clients"]) == 1 and len(rows[2]["clients"]) == 1
    sigma_bytes = 4 * backbone.ctx_dim * 4  # n_ctx x D x fp32
    for row in rows:
        assert row["bytes_up"] == len(row["clients"]) * sigma_bytes
        assert "global_acc" not in row and len(row["client_acc"]) == 2
    ckpts = {r: torch.load(full / "checkpoints" / f"round-{r:04d}.ckpt", weights_only=True) for r in (1, 2, 3)}
    for ckpt in ckpts.values():
        assert set(ckpt["global"]) == {"sigma.ctx"}
        for state in ckpt["clients"].values():
            assert set(state) == {"sigma.ctx", "personal.U", "personal.V"}
            assert torch.equal(state["sigma.ctx"], ckpt["global"]["sigma.ctx"])
        assert not torch.equal(ckpt["clients"][0]["personal.V"], ckpt["clients"][1]["personal.V"])
    for r in (2, 3):  # the client left out keeps U and V (and receives the new sigma)
        (trained,) = rows[r - 1]["clients"]
        idle = 1 - trained
        before, after = ckpts[r - 1]["clients"], ckpts[r]["clients"]
        for key in ("personal.U", "personal.V"):
            assert torch.equal(after[idle][key], before[idle][key])
            assert not torch.equal(after[trained][key], before[trained][key])
        assert not torch.equal(after[idle]["sigma.ctx"], before[idle]["sigma.ctx"])
    _fit(cut, rounds=2)
    _fit(cut, rounds=3, resume=cut / "checkpoints" / "last.ckpt")
    assert without_timings(read_rows(cut)) == without_timings(rows)
    last = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    for cid in (0, 1):
        for key, value in last["clients"][cid].items():
            assert torch.equal(resumed["clients"][cid][key], value), (cid, key)


def test_base_to_novel_scores_novel_classes_with_each_clients_sigma_plus_uv(cli, tmp_path):
    """Local / Base / Novel / HM through the shared evaluation; the novel accuracy of every client is recomputed
    here from its checkpointed sigma, U, V on the novel class names."""
    code, _, err = cli("fit", "--config", SMOKE, "--method", "FedPGP", "--method.n_ctx", "4", "--method.bottleneck",
                       "2", "--method.lr", "0.5", "--data.num_classes", "8", "--data.subsample_classes", "base",
                       "--out_dir", tmp_path)
    assert code == 0, err
    row = read_rows(tmp_path)[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("local_acc", "base_acc", "novel_acc", "hm", "cm"):
        assert 0.0 <= summary[key] <= 1.0 and summary[key] == row[key], key
    base, novel = row["base_acc"], row["novel_acc"]
    assert row["hm"] == pytest.approx(2 * base * novel / (base + novel), rel=1e-12)
    assert row["cm"] == pytest.approx((row["local_acc"] + row["hm"]) / 2, rel=1e-12)

    splits = Synthetic(num_classes=8, train_per_class=16, test_per_class=8, image_size=32,
                       subsample_classes="base").setup()
    torch.manual_seed(0)  # fit's seed: the same random-init backbone
    tiny = load_backbone("fedprompt-tiny", None)
    _, test_tf = clip_transforms(tiny.preprocess_cfg, augment=False)
    images = torch.stack([test_tf(splits.loader(s)) for s in splits.novel.test])
    labels = torch.tensor([s.label for s in splits.novel.test])
    client = FedPGP(n_ctx=4, bottleneck=2).build_client(tiny, splits.novel.classnames)
    client.eval()
    states = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["clients"]
    assert splits.novel.classnames == ["purple ring", "orange bar", "white dot", "black line"]
    for cid, reported in enumerate(row["client_novel_acc"]):
        client.load_slot(0, states[cid])
        with torch.no_grad():
            accuracy = float((client.predict_logits({"image": images}).argmax(1) == labels).float().mean())
        assert accuracy == pytest.approx(reported, abs=1e-6), cid


def test_low_rank_term_stays_fp32_under_bf16_autocast(backbone):
    client = make_client(backbone)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        uv = client.personal()
    assert uv.dtype == torch.float32
    torch.testing.assert_close(uv, torch.bmm(client.personal.U, client.personal.V), rtol=0, atol=0)
