"""Deep and multi-modal prompts (issue 17): deep text prompts in the backbone, VPT, IVLP, MaPLe and PromptSRC
(their tensors, what they share, their losses, GPA, bad input, resume)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, read_rows, tiny_fit, without_timings
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import WeightedMean, state_bytes
from fedprompt.methods import IVLP, VPT, MaPLe, PromptSRC
from fedprompt.methods.deep import fp16_rounded, split_init_phrase
from fedprompt.methods.promptsrc import (GPA_KEYS, IMAGENET_TEMPLATES, GPAAggregator, gaussian_log_weight, scl_kl,
                                         template_ensemble)
from fedprompt.prompts import Coupling, couple

SMOKE = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--log.progress", "false"]
NAMES = ["dog", "cat", "sports car"]


# ------------------------------------------------------------------------------------ deep text prompts
def test_depth_one_is_the_shallow_path_exactly(tiny_backbone):
    tokens = tiny_backbone.prompt_tokens(NAMES, 2)
    ctx = torch.randn(3, 2, 2, tiny_backbone.ctx_dim)
    shallow = tiny_backbone.encode_prompts(tokens, ctx)
    assert torch.equal(tiny_backbone.encode_prompts(tokens, ctx, deep=torch.randn(3, 2, 0, 2, 64)), shallow)
    assert torch.equal(tiny_backbone.encode_prompts(tokens, ctx, deep=None), shallow)


def test_deep_prompts_replace_the_context_rows_before_each_layer(tiny_backbone):
    """Reference: open_clip's own transformer on all 77 positions, with a pre-hook on layer 1 that replaces the
    context rows; the deep path (truncated to the longest sentence) gives the same features."""
    b = tiny_backbone
    tokens = b.prompt_tokens(NAMES, 2)
    b.truncate = False
    try:
        full = b.prompt_tokens(NAMES, 2)
    finally:
        b.truncate = True
    assert tokens.embeddings.shape[1] < full.embeddings.shape[1] == 77
    ctx, deep = torch.randn(2, 2, b.ctx_dim), torch.randn(2, 1, 2, b.ctx_dim)

    def hook(module, args, kwargs):
        x = args[0]
        fresh = deep[:, 0].repeat_interleave(len(NAMES), 0)  # [2 * C, n_ctx, D]
        return (torch.cat([x[:, :1], fresh, x[:, 3:]], dim=1),), kwargs

    handle = b.model.transformer.resblocks[1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        reference = b.encode_prompts(full, ctx)
    finally:
        handle.remove()
    got = b.encode_prompts(tokens, ctx, deep=deep)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, b.encode_prompts(tokens, ctx), atol=1e-3)  # the deep prompts matter


def test_several_clients_in_one_call_equal_each_alone(tiny_backbone):
    tokens = tiny_backbone.prompt_tokens(NAMES, 3)
    ctx, deep = torch.randn(4, 3, 64), torch.randn(4, 1, 3, 64)
    together = tiny_backbone.encode_prompts(tokens, ctx, deep=deep)
    for k in range(4):
        torch.testing.assert_close(together[k], tiny_backbone.encode_prompts(tokens, ctx[k], deep=deep[k]),
                                   rtol=1e-5, atol=1e-6)


def test_deep_prompt_shape_and_depth_errors(tiny_backbone):
    tokens = tiny_backbone.prompt_tokens(NAMES, 2)
    with pytest.raises(FedPromptError, match="J <= 2"):
        tiny_backbone.encode_prompts(tokens, torch.zeros(2, 64), deep=torch.zeros(2, 2, 64))  # J = 3 > 2 layers
    with pytest.raises(FedPromptError, match="deep prompts of shape"):
        tiny_backbone.encode_prompts(tokens, torch.zeros(2, 64), deep=torch.zeros(1, 3, 64))


# -------------------------------------------------------------------------------------------- MaPLe
def test_coupling_is_one_linear_map_per_client_and_layer():
    torch.manual_seed(0)
    coupling = Coupling(3, 8, 5, slots=2)
    assert coupling.weight.shape == (2, 3, 5, 8) and coupling.bias.shape == (2, 3, 5)
    assert torch.equal(coupling.weight[0, 1], coupling.weight[0, 2])  # the deep maps start as copies of one Linear
    assert not torch.equal(coupling.weight[0, 0], coupling.weight[0, 1])
    with torch.no_grad():
        coupling.weight.add_(torch.randn_like(coupling.weight))
    prompts = torch.randn(2, 3, 4, 8)
    out = couple(prompts, coupling.weight, coupling.bias)
    for a in range(2):
        for j in range(3):
            torch.testing.assert_close(out[a, j], F.linear(prompts[a, j], coupling.weight[a, j], coupling.bias[a, j]))


def widths(text_layers=12, visual_layers=12, vit=True):
    """A stand-in backbone with ViT-B/16's widths (open_clip's own config) for counting tensors."""
    config = open_clip.get_model_config("ViT-B-16")
    return SimpleNamespace(ctx_dim=config["text_cfg"]["width"], visual_width=config["vision_cfg"]["width"],
                           text_layers=text_layers, visual_layers=visual_layers, supports_visual_prompts=vit,
                           supports_deep_text_prompts=True, logit_scale=100.0, name="ViT-B-16",
                           model=SimpleNamespace(visual=SimpleNamespace() if vit else torch.nn.Identity()))


def values(method) -> int:
    state = method.build_client(widths(), NAMES).slot_state(0)
    upload = method.build_aggregator().upload(0, state, 1)
    assert set(upload) == set(state)  # everything is shared (the paper-sensible default)
    return sum(v.numel() for v in upload.values())


def test_vit_b16_sizes_of_the_released_configs():
    """specs/baselines-multimodal.md section 1.1 (ViT-B/16, text width 512, vision width 768)."""
    maple = MaPLe(n_ctx=2, text_depth=9, ctx_init=None)
    assert values(maple) == 3_555_072 == 1024 + 8192 + 9 * (512 * 768 + 768)
    state = maple.build_client(widths(), NAMES).slot_state(0)
    assert state_bytes(state) == 3_555_072 * 4  # bytes_up per client per round in fp32
    assert maple.build_aggregator().reduce  # merged by the all-reduce path, never gathered
    assert values(VPT(visual_tokens=8, visual_depth=12)) == 73_728
    assert values(IVLP(n_ctx=2, visual_tokens=2, text_depth=12, visual_depth=12, ctx_init=None)) == 30_720
    assert values(IVLP(n_ctx=4, visual_tokens=4, text_depth=9, visual_depth=9, ctx_init=None)) == 46_080
    assert values(IVLP(n_ctx=2, visual_tokens=2, text_depth=1, visual_depth=1, ctx_init=None)) == 2_560  # FedMGP's
    assert values(VPT(visual_tokens=4, visual_depth=1)) == 3_072  # FedMGP's shallow VPT


def test_ivlp_aggregate_modes_keep_the_other_modality_local():
    states = {cid: {"text_prompts.ctx": torch.full((2, 2, 4), float(cid)),
                    "visual_prompts.tokens": torch.full((1, 2, 3), 10.0 + cid)} for cid in range(2)}
    for mode, shared in (("all", {"text_prompts.ctx", "visual_prompts.tokens"}), ("vision", {"visual_prompts.tokens"}),
                         ("language", {"text_prompts.ctx"})):
        method = IVLP(aggregate=mode)
        agg = method.build_aggregator()
        uploads = {cid: agg.upload(cid, s, 1) for cid, s in states.items()}
        assert all(set(u) == shared for u in uploads.values())
        merged = agg.aggregate(uploads, {0: 1, 1: 3}, 1)
        new = agg.apply(states[0], agg.download(merged, 0), 0)
        for key in states[0]:
            expected = 0.25 * states[0][key] + 0.75 * states[1][key] if key in shared else states[0][key]
            torch.testing.assert_close(new[key], expected)
        assert method.global_model == (mode == "all")


def test_the_image_loss_reaches_maples_text_prompts(tiny_backbone):
    client = MaPLe(n_ctx=2, text_depth=2).build_client(tiny_backbone, NAMES, slots=2)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0]),
             "slots": torch.tensor([0, 1]), "owner": torch.tensor([0, 0, 1, 1])}
    client.training_step(batch).sum().backward()
    assert client.text_prompts.ctx.grad[:, 1].abs().sum() > 0  # the deep text prompt of layer 1
    assert client.coupling.weight.grad.abs().sum() > 0
    # with the text side frozen out, the deep text prompt still learns through its coupled visual prompt
    client.zero_grad()
    with client.stepping(batch["slots"], batch["owner"]):
        image = client.image_features(batch)
    image.sum().backward()
    assert client.text_prompts.ctx.grad.abs().sum() > 0 and client.coupling.bias.grad.abs().sum() > 0


def test_init_phrase_and_kept_words(tiny_backbone):
    words, rest = split_init_phrase(tiny_backbone, "a photo of a", 2)
    torch.testing.assert_close(words, tiny_backbone.word_embeddings("a photo")[:2].cpu())
    assert rest == "of a"
    assert split_init_phrase(tiny_backbone, "a photo of a", 4)[1] == ""
    client = MaPLe(n_ctx=2, text_depth=2).build_client(tiny_backbone, NAMES)
    assert client.prompt_template == "{ctx} of a {name}."  # [SOS] p1 p2 of a {class}. [EOS] (the released code)
    torch.testing.assert_close(client.text_prompts.ctx[0, 0], words)
    assert client.text_prompts.ctx[0, 1].std() < 0.05  # deeper layers: N(0, 0.02^2)
    assert MaPLe(n_ctx=2, text_depth=2, keep_init_words=False).build_client(
        tiny_backbone, NAMES).prompt_template == "{ctx} {name}."
    with pytest.raises(FedPromptError, match="fewer than n_ctx=6"):
        MaPLe(n_ctx=6, text_depth=1).build_client(tiny_backbone, NAMES)


def test_official_compat_rounds_inserted_prompts_to_fp16(tiny_backbone):
    value = torch.tensor([0.0123456789])
    assert fp16_rounded(value).dtype == torch.float32 and fp16_rounded(value) == value.half().float()
    images = torch.randn(2, 3, 32, 32)
    feats = {}
    for compat in ("fixed", "official"):
        torch.manual_seed(0)
        client = IVLP(text_depth=2, visual_depth=2, compat=compat).build_client(tiny_backbone, NAMES)
        client.eval()
        feats[compat] = client.predict_logits({"image": images})
    assert not torch.equal(feats["fixed"], feats["official"])
    torch.testing.assert_close(feats["fixed"], feats["official"], rtol=1e-2, atol=1e-2)


def _official_step(method, backbone, images, labels):
    """One official-compat training step of a fresh client (the same initial prompts every call)."""
    torch.manual_seed(0)
    client = method.build_client(backbone, NAMES)
    client.train()
    losses = client.training_step({"image": images, "label": labels})
    client.backward(losses, lambda t, **kw: t.backward(**kw))
    return client


@pytest.mark.parametrize("method", [VPT(visual_tokens=2, visual_depth=2, compat="official", lr=0.01),
                                    PromptSRC(text_depth=2, visual_depth=2, compat="official", lr=0.01)],
                         ids=["VPT", "PromptSRC"])
def test_official_compat_rounds_each_images_and_classes_gradient_before_the_sum(tiny_backbone, monkeypatch, method):
    """The released .half() comes after .expand: every image's (visual prompts) and every class's (deep text prompts)
    gradient is rounded to fp16, then summed in fp32. Recorded here with the rounded copies made leaves."""
    torch.manual_seed(5)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    client = _official_step(method, tiny_backbone, images, labels)
    copies = []

    def leaf(tensor):
        copies.append(tensor.detach().half().to(tensor.dtype).requires_grad_(True))
        return copies[-1]

    monkeypatch.setattr("fedprompt.methods.deep.fp16_rounded", leaf)
    _official_step(method, tiny_backbone, images, labels)
    *text, image = copies  # PromptSRC: the deep text prompts [1, C, J - 1, n, D]; every method: the images' copies
    per_copy = image.grad.half().float().sum(0)
    torch.testing.assert_close(client.visual_prompts.tokens.grad[0, 0], per_copy, rtol=1e-5, atol=1e-9)
    once = image.grad.sum(0).half().float()  # rounding the sum instead differs by fp16 steps
    assert (client.visual_prompts.tokens.grad[0, 0] - once).abs().max() > 10 * (
        client.visual_prompts.tokens.grad[0, 0] - per_copy).abs().max()
    if text:
        per_class = text[0].grad[0].half().float().sum(0)  # [J - 1, n, D]
        torch.testing.assert_close(client.text_prompts.ctx.grad[0, 1:], per_class, rtol=1e-5, atol=1e-9)
        assert text[0].shape[1] == len(NAMES)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method, flags, message", [
    ("MaPLe", ["--method.n_ctx", "0"], "method.n_ctx=0"),
    ("IVLP", ["--method.visual_tokens", "0"], "method.visual_tokens=0"),
    ("VPT", ["--method.visual_depth", "0"], "method.visual_depth=0"),
    ("PromptSRC", ["--method.compat", "flip"], "needs method.gpa_rounds"),
    ("MaPLe", ["--method.text_depth", "3"], "method.text_depth=3 is larger than the 2 layers"),
    ("IVLP", ["--method.text_depth", "1", "--method.visual_depth", "5"], "method.visual_depth=5 is larger than"),
])
def test_bad_settings_are_one_line(cli, tmp_path, method, flags, message):
    code, _, err = cli("fit", *SMOKE, "--method", method, *flags, "--out_dir", tmp_path)
    assert code != 0 and message in err
    assert "Traceback" not in err


def test_visual_prompts_need_a_vit_tower():
    for method in (VPT(visual_depth=1), IVLP(text_depth=1, visual_depth=1), MaPLe(text_depth=1, ctx_init=None)):
        with pytest.raises(FedPromptError, match="needs a ViT"):
            method.build_client(widths(vit=False), NAMES)
    with pytest.raises(FedPromptError, match="larger than the 12 layers of the text tower"):
        IVLP(text_depth=13, ctx_init=None).build_client(widths(), NAMES)
    hf_text = widths()
    hf_text.supports_deep_text_prompts = False  # a Hugging Face text tower (the offline stand-in's MiniLM)
    with pytest.raises(FedPromptError, match="Hugging Face text tower; use text_depth: 1"):
        MaPLe(text_depth=2, ctx_init=None).build_client(hf_text, NAMES)
    assert MaPLe(text_depth=1, ctx_init=None).build_client(hf_text, NAMES).text_prompts.ctx.shape == (1, 1, 2, 512)


# ---------------------------------------------------------------------------------------------- PromptSRC
def test_template_ensemble_averages_unnormalised_features(tiny_backbone):
    templates = IMAGENET_TEMPLATES[:3]
    assert len(IMAGENET_TEMPLATES) == 60 and IMAGENET_TEMPLATES[0] == "a photo of a {}."
    with torch.no_grad():
        reference = torch.stack([tiny_backbone.encode_text([t.format(n) for n in NAMES]) for t in templates]).mean(0)
    torch.testing.assert_close(template_ensemble(tiny_backbone, NAMES, templates), F.normalize(reference, dim=-1),
                               rtol=1e-5, atol=1e-5)


def test_promptsrc_loss_terms_by_hand(tiny_backbone):
    torch.manual_seed(0)
    client = PromptSRC(text_depth=2, visual_depth=2, n_ctx=4).build_client(tiny_backbone, NAMES, slots=2)
    client.train()
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 1, 0])
    owner = torch.tensor([0, 0, 0, 1, 1])
    terms = client.training_step({"image": images, "label": labels, "slots": torch.tensor([0, 1]), "owner": owner})
    assert set(terms) == {"ce", "text", "image", "kl"}
    with torch.no_grad(), client.stepping(torch.tensor([1]), torch.zeros(2, dtype=torch.long)):
        text = client.text_features()[0]
        image = client.image_features({"image": images[3:]})[0]
    teacher = template_ensemble(tiny_backbone, NAMES)
    frozen = F.normalize(tiny_backbone.encode_image(images[3:]), dim=-1)
    logits, zero_shot = client._logit_scale * image @ text.t(), client._logit_scale * frozen @ teacher.t()
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zero_shot, 1), reduction="sum", log_target=True)
    expected = {"ce": F.cross_entropy(logits, labels[3:]), "text": 25 * F.l1_loss(text, teacher),
                "image": 10 * F.l1_loss(image, frozen), "kl": kl / logits.numel()}
    for name, value in expected.items():
        torch.testing.assert_close(terms[name][1], value, rtol=1e-5, atol=1e-6)
    assert torch.allclose(scl_kl(zero_shot, zero_shot), torch.zeros(2), atol=1e-7)


def gpa_round(agg, round_idx, value):
    uploads = {0: {"text_prompts.ctx": torch.full((2,), value), "visual_prompts.tokens": torch.full((1,), value)}}
    return agg.aggregate(uploads, {0: 1}, round_idx)


def test_gpa_is_the_gaussian_weighted_average_of_the_global_prompts():
    agg = GPAAggregator(GPA_KEYS, mean=3.0, std=1.0)
    thetas = [1.0, 2.0, 4.0, 8.0, 16.0]
    for r, theta in enumerate(thetas, start=1):
        out = gpa_round(agg, r, theta)
        weights = [math.exp(gaussian_log_weight(s, 3.0, 1.0)) for s in range(1, r + 1)]
        expected = sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
        assert out["text_prompts.ctx"][0].item() == theta  # the broadcast prompt is the plain FedAvg
        assert out["gpa.text"][0].item() == pytest.approx(expected, rel=1e-6)
        assert out["gpa.visual"][0].item() == pytest.approx(expected, rel=1e-6)
    far = GPAAggregator(GPA_KEYS, mean=500.0, std=1.0)  # weights of 1e-100000: renormalised in log space
    assert gpa_round(far, 1, 1.0)["gpa.text"][0] == 1.0
    assert gpa_round(far, 2, 3.0)["gpa.text"][0].item() == pytest.approx(3.0)
    assert set(agg.upload(0, {"text_prompts.ctx": torch.ones(1), "gpa.text": torch.ones(1)}, 1)) == \
        {"text_prompts.ctx"}


def test_flip_compat_broadcasts_the_unnormalised_sum():
    """FLiP: weights N(i; 15, 1) for its rounds i = 0 .. R-1 normalised over all R; the running weighted sum is what
    the clients get back, so with R = 30 the first rounds broadcast about zero."""
    agg = GPAAggregator(GPA_KEYS, mean=15.0, std=1.0, flip_rounds=30)
    g = torch.tensor([math.exp(-0.5 * (i - 15) ** 2) for i in range(30)], dtype=torch.float64)
    g = g / g.sum()
    total = 0.0
    for r in range(1, 21):
        out = gpa_round(agg, r, 1.0)
        total += float(g[r - 1])
        assert out["text_prompts.ctx"][0].item() == pytest.approx(total, rel=1e-6, abs=1e-30)
        assert torch.equal(out["text_prompts.ctx"], out["gpa.text"])
    assert float(g[:10].sum()) < 1e-8  # rounds 1-10 broadcast less than 1e-8 of the averaged prompt


def test_promptsrc_evaluates_the_copy_and_trains_the_live_prompts(cli, tmp_path):
    flags = ["--method", "PromptSRC", "--method.text_depth", "2", "--method.visual_depth", "2", "--method.lr",
             "0.05", "--method.gpa_mean", "1", "--method.gpa_std", "0.5", "--federation.rounds", "3"]
    code, _, err = cli("fit", *SMOKE, *flags, "--out_dir", tmp_path / "gpa")
    assert code == 0, err
    ckpt = torch.load(tmp_path / "gpa" / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["clients"][0]
    assert {"gpa.text", "gpa.visual"} <= set(state) and not torch.equal(state["gpa.text"], state["text_prompts.ctx"])
    rows = read_rows(tmp_path / "gpa")
    live = sum(v.numel() * 4 for k, v in ckpt["global"].items() if not k.startswith("gpa."))
    assert rows[0]["bytes_up"] == rows[0]["bytes_down"] == 4 * live  # round 1: the initial live prompts
    assert rows[1]["bytes_down"] == 4 * 2 * live  # the live prompts and their evaluation copy
    code, _, err = cli("fit", *SMOKE, *flags, "--method.gpa", "false", "--out_dir", tmp_path / "live")
    assert code == 0, err
    a, b = read_rows(tmp_path / "gpa"), read_rows(tmp_path / "live")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # the copy never reaches training
    assert a[0]["client_acc"] == b[0]["client_acc"]  # round 1: the copy is the round's global prompt


# --------------------------------------------------------------------------------------- resume and bytes
@pytest.mark.parametrize("method", [MaPLe(n_ctx=2, text_depth=2, lr=0.01),
                                    PromptSRC(text_depth=2, visual_depth=2, lr=0.01, gpa_mean=2, gpa_std=1)],
                         ids=["MaPLe", "PromptSRC"])
def test_resume_is_exact(tmp_path, method):
    tiny_fit(method, tmp_path / "full", rounds=3)
    tiny_fit(method, tmp_path / "cut", rounds=2)
    tiny_fit(method, tmp_path / "cut", rounds=3, resume=tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert without_timings(read_rows(tmp_path / "full")) == without_timings(read_rows(tmp_path / "cut"))


def test_maple_bytes_and_reduce_path_equal_gathering(cli, tmp_path, monkeypatch):
    flags = ["--method", "MaPLe", "--method.text_depth", "2", "--method.lr", "0.01", "--federation.rounds", "2",
             "--federation.fraction", "0.75"]
    code, _, err = cli("fit", *SMOKE, *flags, "--out_dir", tmp_path / "reduce")
    assert code == 0, err
    monkeypatch.setattr(MaPLe, "build_aggregator", lambda self: WeightedMean(self.shared_prefixes))
    code, _, err = cli("fit", *SMOKE, *flags, "--out_dir", tmp_path / "gather")
    assert code == 0, err
    a = torch.load(tmp_path / "reduce" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "gather" / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in a["global"].items():
        torch.testing.assert_close(value, b["global"][key], rtol=1e-6, atol=1e-7)
    rows = read_rows(tmp_path / "reduce")
    size = state_bytes(a["global"])  # text prompts [2, 4, 64] + coupling [2, 64, 64] + [2, 64], fp32
    assert size == (2 * 4 * 64 + 2 * 64 * 64 + 2 * 64) * 4
    assert [r["bytes_up"] for r in rows] == [4 * size, 3 * size]
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in read_rows(tmp_path / "gather")]
