"""Per-client modules inside the frozen towers (issue 26): LoRA and block adapters routed per client, and the
methods built on them (FedLoRA, FedCLIP, pFedMMA): each client's rows see only its own weights, the per-client
dropout and Adam, where the modules apply and where they are refused, bytes, exact resume, client-level DP, Flower,
the table, and parity with the official code."""

from __future__ import annotations

import json
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import EFFL0, ROOT, read_rows, require, run_parity_script, stacked_against_single, tiny_fit, \
    without_timings
from fedprompt.backbone import load_backbone
from fedprompt.backbone.adapters import SlotDropout, StackedLinear, StackedLoRA, routed_linear, scale_gradient
from fedprompt.backbone.tuning import TowerTuning, lora_attention
from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import state_bytes
from fedprompt.methods import FedCLIP, FedLoRA, PFedMMA
from fedprompt.optim import StackedAdam

SMOKE = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--log.progress", "false"]
CLASSES = ["dog", "elephant", "giraffe", "guitar"]
#: the three methods on the tiny model (2 blocks per tower), as the K-invariance test runs them
TINY = {"FedLoRA": dict(lr=0.01), "FedCLIP": dict(lr=0.001),
        "PFedMMA": dict(adapter_start=1, adapter_end=2, lr=0.01)}


def flags(name: str) -> list[str]:
    """``--method NAME`` and its :data:`TINY` settings as command-line flags."""
    return ["--method", name, *[a for k, v in TINY[name].items() for a in (f"--method.{k}", str(v))]]


def build(name: str, **settings):
    return {"FedLoRA": FedLoRA, "FedCLIP": FedCLIP, "PFedMMA": PFedMMA}[name](**{**TINY[name], **settings})


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("fedprompt-tiny", None)


# ------------------------------------------------------------------------------------------------ the modules
def test_routed_linear_gives_each_row_its_own_slot():
    torch.manual_seed(0)
    layer = StackedLinear(6, 5, slots=3)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x, index = torch.randn(4, 7, 6), torch.tensor([2, 0, 0, 1])
    out = layer(x, index)
    for n, slot in enumerate(index.tolist()):
        torch.testing.assert_close(out[n], F.linear(x[n], layer.weight[slot], layer.bias[slot]))
    out[3].sum().backward()  # row 3 belongs to slot 1: only slot 1 gets a gradient
    assert layer.weight.grad[1].abs().sum() > 0 and not layer.weight.grad[[0, 2]].any()
    torch.testing.assert_close(routed_linear(x, layer.weight, index)[0], x[0] @ layer.weight[2].t())


def test_lora_update_is_s_times_b_a_x_and_starts_at_zero():
    torch.manual_seed(0)
    lora = StackedLoRA(8, 6, rank=2, alpha=1.0, slots=2)
    x, index = torch.randn(3, 4, 8), torch.tensor([0, 1, 1])
    assert lora.scale == pytest.approx(1 / math.sqrt(2)) and torch.equal(lora.delta(x, index), torch.zeros(3, 4, 6))
    with torch.no_grad():
        lora.B.normal_()
    delta = lora.delta(x, index)
    for n, slot in enumerate(index.tolist()):
        torch.testing.assert_close(delta[n], x[n] @ (lora.B[slot] @ lora.A[slot]).t() / math.sqrt(2))
    assert StackedLoRA(8, 6, rank=4, alpha=2.0, scaling="linear").scale == 0.5
    assert StackedLoRA(8, 6, rank=4, scale=1.0, init="normal").B.abs().sum() > 0  # FedMVP-style: B != 0, s = 1


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.randn(3, requires_grad=True)
    y = scale_gradient(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 0.25))


def test_slot_dropout_masks_depend_only_on_the_client():
    x = torch.ones(5, 100, 8)
    both = SlotDropout(0.25, [11, 22], [2, 3], torch.device("cpu"))(x)
    alone = SlotDropout(0.25, [22], [3], torch.device("cpu"))(x[2:])
    assert torch.equal(both[2:], alone)  # client 1's masks: the same with or without client 0
    kept = (both != 0).float().mean().item()
    assert 0.7 < kept < 0.8 and torch.allclose(both[both != 0], torch.tensor(1 / 0.75))
    with pytest.raises(ValueError):
        SlotDropout(0.25, [1], [2], torch.device("cpu"))(x)


@pytest.mark.parametrize("decoupled", [False, True])
def test_stacked_adam_is_torch_adam_per_slot(decoupled):
    """Slot 1 stops after 2 steps, slot 2 after 3: their moments and step counts stay put."""
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    _, stacked, singles = stacked_against_single(
        lambda params: StackedAdam(params, lr=0.1, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, decoupled=decoupled),
        lambda params, lr: kind(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2))
    for k in range(3):
        torch.testing.assert_close(stacked[k], singles[k], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------- the towers
def test_an_empty_tuning_is_the_frozen_tower(backbone):
    images = torch.randn(3, 3, 32, 32)
    tokens = backbone.prompt_tokens(CLASSES, 0, template="a photo of a {name}.")
    empty = torch.zeros(2, 0, backbone.ctx_dim)
    zero = TowerTuning(lora={(0, "q"): lambda h: torch.zeros_like(h)})
    with torch.no_grad():
        assert torch.equal(backbone.encode_image_tuned(images, TowerTuning()), backbone.encode_image(images))
        torch.testing.assert_close(backbone.encode_image_tuned(images, zero), backbone.encode_image(images))
        torch.testing.assert_close(backbone.encode_prompts(tokens, empty, tuning=zero),
                                   backbone.encode_prompts(tokens, empty))


def test_lora_attention_is_the_blocks_attention(backbone):
    block = backbone.model.visual.transformer.resblocks[0]
    h = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(lora_attention(block.attn, h, None, {}), block.attention(q_x=h), atol=1e-6,
                                   rtol=1e-5)


def lora_tuning(loras: dict, index: torch.Tensor) -> TowerTuning:
    return TowerTuning(lora={key: partial(m.delta, index=index) for key, m in loras.items()},
                       after={1: partial(lambda y, index: 0.1 * torch.tanh(y) * (index + 1).view(-1, 1, 1),
                                         index=index)})


def test_two_clients_in_one_pass_equal_each_alone(backbone):
    """Image rows of two clients (and their text sentences) in one tuned pass: each equals its client's pass alone."""
    torch.manual_seed(1)
    loras = {(0, "q"): StackedLoRA(64, 64, 2, slots=2), (1, "mlp_in"): StackedLoRA(64, 256, 2, slots=2),
             (1, "o"): StackedLoRA(64, 64, 2, slots=2)}
    for lora in loras.values():
        with torch.no_grad():
            lora.B.normal_()
    images = torch.randn(4, 3, 32, 32)
    index = torch.tensor([0, 0, 1, 1])
    tokens = backbone.prompt_tokens(CLASSES, 0, template="a photo of a {name}.")
    with torch.no_grad():
        together = backbone.encode_image_tuned(images, lora_tuning(loras, index))
        text = backbone.encode_prompts(tokens, torch.zeros(2, 0, 64),
                                       tuning=lora_tuning(loras, torch.arange(2).repeat_interleave(len(CLASSES))))
        for k in range(2):
            alone = backbone.encode_image_tuned(images[2 * k:2 * k + 2], lora_tuning(loras, torch.tensor([k, k])))
            torch.testing.assert_close(together[2 * k:2 * k + 2], alone, rtol=1e-5, atol=1e-6)
            text_alone = backbone.encode_prompts(tokens, torch.zeros(1, 0, 64), tuning=lora_tuning(
                loras, torch.full((len(CLASSES),), k)))
            torch.testing.assert_close(text[k], text_alone[0], rtol=1e-5, atol=1e-6)
        assert (together[:2] - backbone.encode_image(images[:2])).abs().max() > 1e-3  # the modules act


def test_tuning_refuses_unknown_blocks_and_targets(backbone):
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(FedPromptError, match="has 2 blocks"):
        backbone.encode_image_tuned(images, TowerTuning(after={5: lambda y: y}))
    with pytest.raises(FedPromptError, match="unknown LoRA target"):
        backbone.encode_image_tuned(images, TowerTuning(lora={(0, "qkv"): lambda h: h}))


# ---------------------------------------------------------------------------------------------- the methods
def test_settings_are_checked_in_one_line():
    for make, match in ((lambda: FedLoRA(position="middle"), "method.position='middle'"),
                        (lambda: FedLoRA(params=["q", "x"]), "method.params"),
                        (lambda: FedLoRA(dropout=1.0), "method.rank=2, method.dropout=1.0"),
                        (lambda: PFedMMA(adapter_start=0), "input-level adapter"),
                        (lambda: FedCLIP(loss="hinge"), "method.loss='hinge'"),
                        (lambda: FedCLIP(optimizer="lamb"), "method.optimizer='lamb'")):
        with pytest.raises(FedPromptError, match=match):
            make()


def test_blocks_past_the_tower_are_refused(backbone):
    with pytest.raises(FedPromptError, match=r"method.blocks=\[0, 3\] names blocks outside 0 .. 1"):
        FedLoRA(blocks=[0, 3]).build_client(backbone, CLASSES)
    with pytest.raises(FedPromptError, match="method.adapter_end=12 is past the 2 layers"):
        PFedMMA(adapter_end=12).build_client(backbone, CLASSES)


def test_pfedmma_layers_left_null_fit_the_backbone(backbone, capsys):
    """Null layers: the release's 5 .. 12 where the towers have 12 layers, else the last layer (said in one line)."""
    assert PFedMMA().adapter_start is None and PFedMMA().hparams()["adapter_end"] is None  # the config keeps null
    fitted = PFedMMA().for_backbone(backbone)
    assert (fitted.adapter_start, fitted.adapter_end) == (2, 2)
    err = capsys.readouterr().err
    assert "adapter_end 2, not the official 12: the text tower of" in err
    assert "adapter_start 2, not the official 5" in err
    assert set(PFedMMA().build_client(backbone, CLASSES).shared_adapter) == {"2"}
    capsys.readouterr()
    vit = SimpleNamespace(tunable_layers=lambda tower: 12, name="ViT-B-16")
    fitted = PFedMMA().for_backbone(vit)
    assert (fitted.adapter_start, fitted.adapter_end) == (5, 12) and capsys.readouterr().err == ""
    assert PFedMMA(adapter_end=3).for_backbone(vit).adapter_start == 3


def test_what_trains_where_decides_the_feature_cache():
    assert not FedLoRA().frozen_image_tower and not FedLoRA(encoder="vision").frozen_image_tower
    assert FedLoRA(encoder="text").frozen_image_tower and FedCLIP().frozen_image_tower
    assert not PFedMMA().frozen_image_tower and PFedMMA(towers="text").frozen_image_tower


def test_the_image_tower_cache_is_refused_where_the_tower_trains(cli, tmp_path):
    code, _, err = cli("fit", *SMOKE, "--method", "FedLoRA", "--train.feature_cache", "true", "--out_dir",
                       tmp_path / "run")
    assert code == 2 and "train.feature_cache: FedLoRA trains parameters inside the image tower" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    code, _, err = cli("fit", *SMOKE, "--method", "FedLoRA", "--method.encoder", "text", "--train.feature_cache",
                       "true", "--federation.rounds", "1", "--out_dir", tmp_path / "text")
    assert code == 0, err


def test_state_keys_and_bytes(cli, tmp_path, backbone):
    """What each method sends: FedLoRA every factor, FedCLIP the adapter, pFedMMA the shared projection only."""
    lora = FedLoRA(**TINY["FedLoRA"]).build_client(backbone, CLASSES)
    assert set(lora.slot_state(0)) == {f"lora.{t}_{b}_{p}.{f}" for t in ("text", "visual") for b in (0, 1)
                                       for p in "qkv" for f in "AB"}
    mma = PFedMMA(**TINY["PFedMMA"]).build_client(backbone, CLASSES)
    shared = {k for k in mma.slot_state(0) if k.startswith("shared_adapter.")}
    assert shared == {f"shared_adapter.{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    per_client = {"FedLoRA": 2 * 2 * 3 * (2 * 64 * 2), "FedCLIP": 2 * (32 * 32 + 32),
                  "PFedMMA": 2 * (32 * 32 + 32)}  # values (fp32) per client and direction
    for name, values in per_client.items():
        code, _, err = cli("fit", *SMOKE, *flags(name), "--federation.rounds", "2", "--federation.fraction",
                           "0.75", "--out_dir", tmp_path / name)
        assert code == 0, err
        rows = read_rows(tmp_path / name)
        assert [r["bytes_up"] for r in rows] == [4 * values * 4, 3 * values * 4], name
        assert [r["bytes_down"] for r in rows] == [4 * values * 4, 3 * values * 4], name


def test_pfedmma_shares_only_the_cross_modal_projection(cli, tmp_path):
    code, _, err = cli("fit", *SMOKE, "--method", "PFedMMA", "--method.adapter_start", "1",
                       "--method.adapter_end", "2", "--method.lr", "0.05", "--out_dir", tmp_path / "run")
    assert code == 0, err
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    clients = ckpt["clients"]
    for key, value in clients[0].items():
        same = all(torch.equal(value, clients[c][key]) for c in clients)
        assert same == key.startswith("shared_adapter."), key
    assert set(ckpt["global"]) == {k for k in clients[0] if k.startswith("shared_adapter.")}


def test_fedclip_skips_a_single_image_step(backbone):
    """The release skips a batch of one image (no optimiser step): a client with one image in a step is held."""
    torch.manual_seed(0)
    client = FedCLIP(lr=0.01).build_client(backbone, CLASSES, slots=2)
    before = {k: v.detach().clone() for k, v in client.state_dict().items()}
    optimizer = client.configure_optimizers()
    feats = torch.randn(4, 32)
    batch = {"features": feats, "label": torch.tensor([0, 1, 2, 3]), "slots": torch.tensor([0, 1]),
             "owner": torch.tensor([0, 0, 0, 1]), "counts": torch.tensor([3, 1]), "members": [0, 1],
             "sizes": [3, 1]}
    client.train()
    losses = client.training_step(batch)
    assert losses[1] == 0
    client.backward(losses, lambda t, **kw: t.backward(**kw))
    optimizer.step()
    after = client.state_dict()
    for key in before:
        assert not torch.equal(after[key][0], before[key][0]) and torch.equal(after[key][1], before[key][1]), key


@pytest.mark.parametrize("method", list(TINY))
def test_resume_is_exact(tmp_path, method):
    tiny_fit(build(method), tmp_path / "full", rounds=3)
    tiny_fit(build(method), tmp_path / "cut", rounds=2)
    tiny_fit(build(method), tmp_path / "cut", rounds=3, resume=tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert without_timings(read_rows(tmp_path / "full")) == without_timings(read_rows(tmp_path / "cut"))


def test_client_level_dp_on_lora_updates(cli, tmp_path):
    """DP-FedAvg clips each client's LoRA update (A and B together) and noises their mean; epsilon is reported."""
    flags = ["--method", "FedLoRA", "--method.lr", "0.01", "--federation.rounds", "2"]
    code, _, err = cli("fit", *SMOKE, *flags, "--out_dir", tmp_path / "plain")
    assert code == 0, err
    code, _, err = cli("fit", *SMOKE, *flags, "--dp.noise_multiplier", "1.0", "--dp.clip_norm", "0.01",
                       "--out_dir", tmp_path / "dp")
    assert code == 0, err
    rows = read_rows(tmp_path / "dp")
    assert all(r["epsilon"] > 0 for r in rows) and rows[1]["epsilon"] > rows[0]["epsilon"]
    plain = torch.load(tmp_path / "plain" / "checkpoints" / "last.ckpt", weights_only=True)["global"]
    noised = torch.load(tmp_path / "dp" / "checkpoints" / "last.ckpt", weights_only=True)["global"]
    assert plain.keys() == noised.keys() and all(k.startswith("lora.") for k in noised)
    assert any(not torch.allclose(plain[k], noised[k]) for k in plain)


def test_flower_runtime_equals_fit(tmp_path):
    """FedLoRA through Flower's in-process message path equals fit --federation.parallel_clients 1 (rows and every
    client's factors), dropout included."""
    pytest.importorskip("flwr", reason="Flower is not installed (pip install -e \".[flower]\")")
    from fedprompt.__main__ import main
    from fedprompt.flower.local import run_local

    smoke = str(ROOT / "configs" / "smoke.yaml")
    args = "--federation.rounds 2 --federation.fraction 0.75 --log.progress false --log.logger none " \
           "--method FedLoRA --method.lr 0.01"
    run_local(smoke, f"{args} --out_dir {tmp_path / 'flower'}", report_states=True)
    main(["fit", "--config", smoke, *args.split(), "--federation.parallel_clients", "1", "--out_dir",
          str(tmp_path / "fit")])
    assert without_timings(read_rows(tmp_path / "flower")) == without_timings(read_rows(tmp_path / "fit"))
    got = torch.load(tmp_path / "flower" / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(tmp_path / "fit" / "checkpoints" / "last.ckpt", weights_only=True)
    for cid, state in expected["clients"].items():
        for key, value in state.items():
            assert torch.equal(got["clients"][cid][key], value), (cid, key)


def test_table_lists_the_new_methods_next_to_promptfl(cli, tmp_path):
    for method in ("PromptFL", "FedLoRA", "FedCLIP", "PFedMMA"):
        method_flags = ["--method", method] if method == "PromptFL" else flags(method)
        code, _, err = cli("fit", *SMOKE, *method_flags, "--federation.rounds", "1", "--out_dir",
                           tmp_path / method, "--log.logger", "none")
        assert code == 0, err
    runs = [tmp_path / m for m in ("PromptFL", "FedLoRA", "FedCLIP", "PFedMMA")]
    code, out, err = cli("table", *runs, "--out", tmp_path / "t", "--columns", "metrics", "--metrics", "[local_acc]")
    assert code == 0, err
    for method in ("PromptFL", "FedLoRA", "FedCLIP", "PFedMMA"):
        acc = json.loads((tmp_path / method / "summary.json").read_text())["local_acc"]
        (line,) = [row for row in out.splitlines() if row.startswith(f"| {method} |")]
        assert f"{100 * acc:.2f}" in line, (method, line)  # (the best of the column is in bold)


# ---------------------------------------------------------------------------------- the offline stand-in model
@pytest.fixture(scope="module")
def effl0():
    require(EFFL0)
    return load_backbone("effl0-minilm", str(EFFL0))


def test_stand_in_text_tower_takes_lora_and_adapters(effl0):
    """BERT text tower (mean pooling): LoRA through hooks on its own linear layers, each sentence with its client's
    factors; zero updates leave it exact."""
    tokens = effl0.prompt_tokens(CLASSES, 0, template="a photo of a {name}.")
    empty = torch.zeros(2, 0, effl0.ctx_dim)
    width = effl0.tower_width("text")
    assert effl0.tunable_layers("text") == 6 and width == 384 and effl0.lora_features("text", "mlp_in") == (384, 1536)
    torch.manual_seed(0)
    lora = StackedLoRA(width, width, 2, slots=2)
    with torch.no_grad():
        lora.B.normal_(std=0.1)
        base = effl0.encode_prompts(tokens, empty)
        zero = TowerTuning(lora={(0, "v"): lambda h: torch.zeros_like(h)},
                           parallel={2: lambda x, norm: torch.zeros_like(norm(x))})
        torch.testing.assert_close(effl0.encode_prompts(tokens, empty, tuning=zero), base)
        index = torch.tensor([0, 1]).repeat_interleave(len(CLASSES))
        tuned = effl0.encode_prompts(tokens, empty, tuning=TowerTuning(lora={(3, "q"): partial(lora.delta,
                                                                                               index=index)}))
        alone = effl0.encode_prompts(tokens, empty[:1], tuning=TowerTuning(lora={(3, "q"): partial(
            lora.delta, index=torch.ones(len(CLASSES), dtype=torch.long))}))
    torch.testing.assert_close(tuned[1], alone[0], rtol=1e-5, atol=1e-6)
    assert (tuned[0] - base[0]).abs().max() > 1e-4


def test_stand_in_image_tower_refuses_block_modules_in_one_line(effl0):
    assert effl0.tunable_layers("visual") == 0
    with pytest.raises(FedPromptError, match=r"^method.encoder='both': LoRA and block adapters enter the visual "
                                             r"tower's transformer blocks, but '.*' has a TimmModel visual tower "
                                             r"without such blocks; use method.encoder: text \(adapters on"):
        FedLoRA().build_client(effl0, CLASSES)
    with pytest.raises(FedPromptError, match=r"^method.towers='both': .* TimmModel visual tower .* use "
                                             r"method.towers: text"):
        PFedMMA(adapter_start=1, adapter_end=6).build_client(effl0, CLASSES)
    FedLoRA(encoder="text").build_client(effl0, CLASSES)  # the text half applies
    FedCLIP().build_client(effl0, CLASSES)  # adapters on pooled features need no blocks
    PFedMMA(towers="text", adapter_start=1, adapter_end=6).build_client(effl0, CLASSES)


# --------------------------------------------------------------------------------------------- official code
def test_parity_with_the_official_code():
    """benchmarks/parity_official_adapters.py: CLIP-LoRA's LoRA layers and step, FedPuReL's LoRA baseline, FedCLIP's
    train() and pFedMMA's model and forward_backward, read from local git mirrors, against fedprompt's clients on the
    same random weights and images (logits, loss, gradients, parameters after one step within 1e-5); skipped when the
    mirrors are absent."""
    ran = run_parity_script("parity_official_adapters")
    assert all(ran.values()), ran
