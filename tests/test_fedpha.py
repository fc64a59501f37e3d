"""FedPHA: the SVD projections, the alignment terms, local prompts of per-client lengths in one lock-step step (state
cut and padded, each client's own sentence length, the released pooling under compat), K-invariance, exact resume,
bytes per round, and parity with the released code (the Flower runtime: tests/test_flower.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import EFFL0, ROOT, read_rows, require, resumed_and_straight, run_parity_script
from fedprompt.errors import FedPromptError
from fedprompt.methods import FedPHA
from fedprompt.methods.fedpha import alignment_terms, project_local, svd_cutoff
from test_parallel_clients import assert_same_run, fit

LENGTHS = "[2,4,3,4]"  # the smoke config's 4 clients, three different local lengths
HETEROGENEOUS = ["--method", "FedPHA", "--method.n_ctx_global", "4", "--method.local_lengths", LENGTHS,
                 "--method.lr", "0.5"]


def test_svd_cutoff_is_the_released_integer_part():
    assert [svd_cutoff(k, 0.8) for k in (4, 8, 16)] == [0, 1, 3]  # int(16 * 0.19999999999999996) = 3
    assert svd_cutoff(16, 0.5) == 8 and svd_cutoff(16, 1.0) == 0


def test_projections_remove_the_leading_directions_or_keep_the_trailing_ones():
    torch.manual_seed(0)
    local, glob = torch.randn(2, 5, 32), torch.randn(2, 8, 32)
    _, _, vh = torch.linalg.svd(glob, full_matrices=True)  # vh [2, 32, 32]
    top, trailing = vh[:, :1].transpose(1, 2), vh[:, 1:8].transpose(1, 2)  # r = int(8 * 0.2) = 1
    null_space = project_local(local, glob, 0.8, "null_space")
    full = vh[:, 1:].transpose(1, 2)  # every direction but the leading one: the approximate null space
    torch.testing.assert_close(null_space, local @ full @ full.transpose(1, 2), atol=1e-5, rtol=0)
    assert (null_space @ top).abs().max() < 1e-5  # the leading direction is gone
    minor = project_local(local, glob, 0.8, "minor")
    torch.testing.assert_close(minor, local @ trailing @ trailing.transpose(1, 2), atol=1e-5, rtol=0)
    assert (minor - null_space).abs().max() > 0.1  # the released subspace lies inside G's row space only


def test_alignment_terms_are_the_element_mean_and_the_per_class_margin():
    local = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    projected = torch.tensor([[[0.5, 0.0], [0.0, 1.0]]])
    glob = torch.tensor([[[0.6, 0.8], [0.0, -1.0]]])
    pull, push = alignment_terms(local, projected, glob, alpha=1.0)
    assert pull.tolist() == pytest.approx([0.25 / 4])
    # distances 0.894 (inside the margin: 1 - 0.894) and 2 (outside: 0), mean over the two classes
    assert push.tolist() == pytest.approx([(1 - (0.4 ** 2 + 0.8 ** 2) ** 0.5) / 2])


def test_client_states_hold_their_own_local_length_and_slots_pad_them(tiny_backbone):
    method = FedPHA(n_ctx_global=4, local_lengths=[2, 5, 3])
    client = method.build_client(tiny_backbone, ["dog", "cat"], slots=2)
    assert client.local_prompt.ctx.shape == (2, 5, tiny_backbone.ctx_dim)  # the longest length
    init = client.slot_state(0)
    states = [method.initial_client_state(cid, {k: v.clone() for k, v in init.items()}) for cid in range(3)]
    assert [s["local_prompt.ctx"].shape[0] for s in states] == [2, 5, 3]
    assert torch.equal(states[0]["local_prompt.ctx"], init["local_prompt.ctx"][:2])
    client.load_slot(0, states[1])
    client.load_slot(0, states[0])  # a shorter client in a slot that held a longer one: the rest is zero
    assert torch.equal(client.local_prompt.ctx[0, 2:], torch.zeros(3, tiny_backbone.ctx_dim))
    assert torch.equal(client.slot_state(0)["local_prompt.ctx"], states[0]["local_prompt.ctx"])
    client.load_slot(1, states[2])
    assert client.slot_lengths("local_prompt.ctx") == [2, 3]
    with pytest.raises(FedPromptError, match="local_lengths has 3 entries but the data makes more clients"):
        method.initial_client_state(3, init)


def test_each_client_is_encoded_with_its_own_number_of_context_tokens(tiny_backbone):
    """A client of length 2 in a group with a client of length 4 has the features of a module whose every client has
    2 local tokens; under compat: official the shorter prompt is pooled (4 - 2) tokens after its end-of-text."""
    mixed = FedPHA(n_ctx_global=4, local_lengths=[2, 4]).build_client(tiny_backbone, ["dog", "cat", "house"], 2)
    alone = FedPHA(n_ctx_global=4, n_ctx_local=2).build_client(tiny_backbone, ["dog", "cat", "house"])
    torch.manual_seed(1)
    short, long_ = torch.randn(2, tiny_backbone.ctx_dim), torch.randn(4, tiny_backbone.ctx_dim)
    glob = torch.randn(4, tiny_backbone.ctx_dim)
    mixed.load_slot(0, {"global_prompt.ctx": glob, "local_prompt.ctx": short})
    mixed.load_slot(1, {"global_prompt.ctx": glob, "local_prompt.ctx": long_})
    alone.load_slot(0, {"global_prompt.ctx": glob, "local_prompt.ctx": short})
    mixed.eval(), alone.eval()
    both = mixed.text_for(torch.arange(2))
    torch.testing.assert_close(both[0], alone.text_for(torch.arange(1))[0], atol=1e-6, rtol=0)
    official = FedPHA(n_ctx_global=4, local_lengths=[2, 4], compat="official").build_client(
        tiny_backbone, ["dog", "cat", "house"], 2)
    official.load_state_dict(mixed.state_dict())
    official.load_slot(0, {"global_prompt.ctx": glob, "local_prompt.ctx": short})
    official.load_slot(1, {"global_prompt.ctx": glob, "local_prompt.ctx": long_})
    official.eval()
    shifted = official.text_for(torch.arange(2))
    torch.testing.assert_close(shifted[1], both[1], atol=1e-6, rtol=0)  # the longest prompt: same token
    assert (shifted[0] - both[0]).abs().max() > 1e-3
    assert official.tokens_with(2).pool_index.tolist() == [i + 2 for i in mixed.tokens_with(2).pool_index.tolist()]


def test_settings_are_checked_in_one_line():
    for bad, match in [({"ratio": 1.5}, "method.ratio must be in"), ({"local_lengths": [4, 0]}, "must be >= 1"),
                       ({"local_lengths": []}, "local_lengths is empty"), ({"projection": "full"}, "projection"),
                       ({"alpha": -1.0}, "must be >= 0")]:
        with pytest.raises(FedPromptError, match=match):
            FedPHA(**bad)


def test_compat_official_is_refused_on_a_hugging_face_text_tower():
    from fedprompt.backbone import load_backbone

    backbone = load_backbone("effl0-minilm", str(require(EFFL0)))
    with pytest.raises(FedPromptError, match="method.compat=official reproduces the released pooling position"):
        FedPHA(compat="official").build_client(backbone, ["dog", "cat"])


def test_k_clients_of_different_local_lengths_in_lockstep_equal_one_at_a_time(cli, tmp_path):
    rows_1, ckpt_1 = fit(cli, tmp_path / "k1", *HETEROGENEOUS, "--federation.parallel_clients", "1")
    rows_3, ckpt_3 = fit(cli, tmp_path / "k3", *HETEROGENEOUS, "--federation.parallel_clients", "3")
    rows_auto, ckpt_auto = fit(cli, tmp_path / "auto", *HETEROGENEOUS)
    assert_same_run(rows_1, rows_3, ckpt_1, ckpt_3)
    assert_same_run(rows_1, rows_auto, ckpt_1, ckpt_auto)
    assert rows_1[-1]["train_loss"] != rows_1[0]["train_loss"]  # it trained (auto: the 4 clients in one group)
    assert [ckpt_1["clients"][c]["local_prompt.ctx"].shape[0] for c in range(4)] == [2, 4, 3, 4]
    dim = ckpt_1["global"]["global_prompt.ctx"].shape[-1]
    assert [r["bytes_up"] for r in rows_1] == [4 * 4 * dim * 4, 3 * 4 * dim * 4, 3 * 4 * dim * 4]  # global only


def test_compat_official_lockstep_equals_one_at_a_time(cli, tmp_path):
    flags = [*HETEROGENEOUS, "--method.compat", "official", "--method.projection", "minor",
             "--federation.rounds", "2"]
    rows_1, ckpt_1 = fit(cli, tmp_path / "k1", *flags, "--federation.parallel_clients", "1")
    rows_4, ckpt_4 = fit(cli, tmp_path / "k4", *flags, "--federation.parallel_clients", "4")
    assert_same_run(rows_1, rows_4, ckpt_1, ckpt_4)


def test_resume_gives_the_uninterrupted_run(tmp_path):
    cut, full = resumed_and_straight(FedPHA(n_ctx_global=4, local_lengths=[3, 5], lr=0.5), tmp_path)
    for cid in (0, 1):
        for key, value in full["clients"][cid].items():
            assert torch.equal(cut["clients"][cid][key], value), (cid, key)
    assert full["clients"][1]["local_prompt.ctx"].shape[0] == 5
    assert "global_acc" not in read_rows(tmp_path / "straight")[-1]  # personalised: each client's local prompt


def test_heterogeneous_config_gives_one_length_per_client():
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "fedpha_office31_he.yaml").read_text())
    lengths = config["method"]["init_args"]["local_lengths"]
    partition = config["data"]["init_args"]["partition"]["init_args"]
    assert len(lengths) == len(config["data"]["init_args"]["domains"]) * partition["clients_per_domain"]


def test_official_fedpha_and_fedmvp_code_give_the_same_logits_loss_and_sgd_step():
    """benchmarks/parity_official_2025.py: the released FedPHA (homogeneous and heterogeneous trainers: two clients of
    different local lengths in one lock-step step) and FedMVP model code and training step, read from local git
    mirrors, against fedprompt's clients on the same random CLIP weights and images (within 1e-5); skipped when the
    mirrors are absent."""
    ran = run_parity_script("parity_official_2025", methods=["FedPHA", "FedPHA-HE", "FedMVP", "FedMVP-LoRA"])
    assert all(ran.values()), ran
    assert json.dumps(sorted(ran)) == json.dumps(sorted(k for k in ("FedMVP", "FedMVP-LoRA", "FedPHA", "FedPHA-HE")
                                                        if k in ran))
