"""The client-parallel engine: K clients in lock-step give the K = 1 results (every method, unequal client sizes,
client sampling), the stacked optimizer is torch's SGD per client, plans are per client, failures stay with their
client."""

from __future__ import annotations

import json

import pytest
import torch

import fedprompt.data.cache
from conftest import ROOT, read_rows, stacked_against_single, without_timings
from fedprompt.data import Dirichlet, Synthetic
from fedprompt.federation.engine import StackedSGD
from fedprompt.federation.feed import local_plan

SMOKE = str(ROOT / "configs" / "smoke.yaml")
# unequal client sizes (Dirichlet: 15/19/14/16 train images), 3 of 4 clients sampled after round 1
COMMON = ["--config", SMOKE, "--federation.rounds", "3", "--federation.fraction", "0.75", "--log.progress", "false"]
METHODS = {
    "PromptFL": [],
    "FedProx": ["--method.mu", "0.5"],
    "FedPer": ["--method.n_ctx", "4"],
    "LocalCoOp": [],
    "FedOTP": ["--method.n_ctx", "4", "--method.lr", "0.5"],
    "FedMGP": ["--method.n_ctx", "2", "--method.lr", "0.01"],
    "FedTPG": ["--method.lr", "0.01"],
    "FedPGP": ["--method.n_ctx", "4", "--method.bottleneck", "2", "--method.lr", "0.5"],
    # the official one-scheduler-per-run cosine: each client's rates depend on its place in the whole run
    "PromptFolio": ["--method.n_ctx", "4", "--method.lr", "0.1", "--method.lr_scope", "official",
                    "--method.cosine_epochs", "3"],
    # deep prompts in both towers of the tiny ViT (2 layers each); MaPLe through the reduce path
    "VPT": ["--method.visual_depth", "2", "--method.lr", "0.05"],
    "IVLP": ["--method.text_depth", "2", "--method.visual_depth", "2", "--method.lr", "0.05",
             "--method.aggregate", "vision"],
    "MaPLe": ["--method.text_depth", "2", "--method.lr", "0.01"],
    "PromptSRC": ["--method.text_depth", "2", "--method.visual_depth", "2", "--method.lr", "0.05",
                  "--method.gpa_mean", "2"],
    # per-image prompts; 40 sentences per text call: K = 1 and K = 3 / auto cut the images into different chunks
    "CoCoOp": ["--method.lr", "0.05", "--method.max_sentences", "40"],
    "KgCoOp": ["--method.lr", "0.05"],
    # two backward passes, the projection per slot; a random context: with "a photo of a" the student equals the
    # teacher at the start, and the projection would amplify the rounding noise of a zero distillation gradient
    "ProGrad": ["--method.n_ctx", "4", "--method.ctx_init", "null", "--method.lr", "0.5"],
    "PLOT": ["--method.n_ctx", "4", "--method.lr", "0.5"],
    # the prompt mini-batch sampler: a permutation per client from its own seeds, cycled per round
    "ProDA": ["--method.n_prompts", "8", "--method.prompt_batch", "2", "--method.n_ctx", "4", "--method.lr", "0.5"],
    # experts from a client's second round on; with seed 1 and no all-clients first round, round 2 trains
    # clients 0 and 1 (with experts) in one group with client 3 (none yet: its gating is held)
    "PFedMoAP": ["--method.n_ctx", "4", "--method.gating_dim", "8", "--method.gating_heads", "2",
                 "--method.num_experts", "3", "--method.lr", "0.05", "--method.gating_lr", "0.5",
                 "--federation.all_clients_first_round", "false", "--seed", "1"],
    # per-example clipping and noise from each client's own step seed; client 1 has a second step of 3 images
    "DPFPL": ["--method.n_ctx", "4", "--method.rank", "2", "--method.noise_multiplier", "0.5",
              "--method.clip_norm", "0.5", "--method.lr", "0.1"],
    # class-specific prompts, a domain key per client (the smoke data has one domain), the per-image key mixture
    "FedAPT": ["--method.n_ctx", "2", "--method.domain_of", "client", "--method.lr", "0.5"],
    # the bi-level DRO (each client's perturbations from its own step seeds), the multipliers, the OT server; lr
    # 0.05: the ascent along normalised gradients amplifies the rounding of K = 1's product against K > 1's gathered
    # one (at lr 0.5, 4 of 512 OOD-prompt entries differ by up to 1.3e-5 after 3 rounds)
    "FOCoOp": ["--method.n_ctx", "2", "--method.num_negatives", "4", "--method.negative_words",
               str(ROOT / "tests" / "data" / "negative_words"), "--method.lr", "0.05"],
    # LoRA on q, k, v, o and the MLP of both towers, the default dropout 0.25 (each client's masks from its own step
    # seeds), AdamW stacked per client
    "FedLoRA": ["--method.params", "[q,k,v,o,mlp_in,mlp_out]", "--method.lr", "0.01"],
    # the attention adapter on pooled features, Adam, the in-batch contrastive loss per client
    "FedCLIP": ["--method.lr", "0.001"],
    # parallel adapters in both towers (layers 1 .. 2 of the tiny model), only the shared projection averaged
    "PFedMMA": ["--method.adapter_start", "1", "--method.adapter_end", "2", "--method.lr", "0.01"],
}



def fit(cli, out_dir, *extra) -> tuple[list[dict], dict]:
    code, _, err = cli("fit", *COMMON, "--out_dir", out_dir, *extra)
    assert code == 0, err
    return without_timings(read_rows(out_dir)), torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_run(rows_a, rows_b, ckpt_a, ckpt_b):
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b):
        assert a.keys() == b.keys()
        for key in a:
            if key == "train_loss":
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
            elif "ece" in key or "calibration" in key:  # from the confidences: equal to float rounding
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key  # as the states
            else:
                assert b[key] == a[key], key  # accuracies, sampled clients, bytes: identical
    for cid, state in ckpt_a["clients"].items():
        for key, value in state.items():
            torch.testing.assert_close(ckpt_b["clients"][cid][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_k_clients_in_lockstep_equal_one_at_a_time(cli, tmp_path, method):
    flags = ["--method", method, *METHODS[method]]
    rows_1, ckpt_1 = fit(cli, tmp_path / "k1", *flags, "--federation.parallel_clients", "1")
    rows_3, ckpt_3 = fit(cli, tmp_path / "k3", *flags, "--federation.parallel_clients", "3")
    rows_auto, ckpt_auto = fit(cli, tmp_path / "auto", *flags)  # auto: all 4 clients together
    assert_same_run(rows_1, rows_3, ckpt_1, ckpt_3)
    assert_same_run(rows_1, rows_auto, ckpt_1, ckpt_auto)
    first = 3 if "--federation.all_clients_first_round" in flags else 4
    assert [len(r["clients"]) for r in rows_1] == [first, 3, 3]
    assert rows_1[-1]["train_loss"] != rows_1[0]["train_loss"]  # it trained


def test_lockstep_with_augmentation_equals_one_at_a_time(cli, tmp_path):
    flags = ["--train.augment", "true", "--federation.rounds", "2"]
    rows_1, ckpt_1 = fit(cli, tmp_path / "k1", *flags, "--federation.parallel_clients", "1")
    rows_4, ckpt_4 = fit(cli, tmp_path / "k4", *flags, "--federation.parallel_clients", "4")
    assert_same_run(rows_1, rows_4, ckpt_1, ckpt_4)


def test_a_failing_client_leaves_the_others_unchanged(cli, tmp_path, monkeypatch):
    """Client 2's cached features are NaN: it is reported failed; the other clients of its group train as alone."""
    original = fedprompt.data.cache.FeatureCache.dataset

    def poisoned(self, samples, transform, kind):
        cached = original(self, samples, transform, kind)
        if kind == "train" and samples and all(s.path in poisoned.paths for s in samples):
            cached.tensors = {k: torch.full_like(v, float("nan")) for k, v in cached.tensors.items()}
        return cached

    data = Synthetic(num_classes=4, train_per_class=16, test_per_class=8, image_size=32,
                     partition=Dirichlet(num_clients=4, alpha=1.0, min_size=4))  # configs/smoke.yaml's split
    poisoned.paths = {s.path for s in data.setup().clients[2].train}
    monkeypatch.setattr(fedprompt.data.cache.FeatureCache, "dataset", poisoned)
    flags = ["--train.feature_cache", "true", "--federation.on_client_failure", "skip", "--federation.fraction", "1"]
    rows_1, ckpt_1 = fit(cli, tmp_path / "k1", *flags, "--federation.parallel_clients", "1")
    rows_4, ckpt_4 = fit(cli, tmp_path / "k4", *flags, "--federation.parallel_clients", "4")
    assert rows_1[0]["failed_clients"].keys() == {"2"} and "non-finite loss" in rows_1[0]["failed_clients"]["2"]
    assert_same_run(rows_1, rows_4, ckpt_1, ckpt_4)
    assert torch.isfinite(ckpt_4["global"]["prompt.ctx"]).all()


# ----------------------------------------------------------------------------------------------- the optimizer
def test_stacked_sgd_is_torch_sgd_per_slot_and_skips_inactive_slots():
    start, stacked, singles = stacked_against_single(
        lambda params: StackedSGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4))
    for k in range(3):
        torch.testing.assert_close(stacked[k], singles[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(stacked[1], start[1])


# ------------------------------------------------------------------------------------------------------- plans
def test_local_plan_epochs_steps_and_determinism():
    plan = local_plan(cid=3, num_samples=10, batch_size=4, epochs=2, max_steps=None, seed=7)
    assert [len(b) for b in plan.batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(plan.batches[:3], [])) == list(range(10))  # each epoch is a permutation
    assert plan.batches[:3] != plan.batches[3:]
    assert local_plan(3, 10, 4, 2, None, 7).batches == plan.batches and len(set(plan.seeds)) == 6
    steps = local_plan(3, 10, 4, 1, max_steps=5, seed=7)
    assert [len(b) for b in steps.batches] == [4, 4, 2, 4, 4] and steps.batches[:3] == plan.batches[:3]


def test_parallel_clients_flag_is_recorded(cli, tmp_path):
    code, _, err = cli("fit", *COMMON, "--out_dir", tmp_path, "--federation.rounds", "1",
                       "--federation.parallel_clients", "2")
    assert code == 0, err
    import yaml

    assert yaml.safe_load((tmp_path / "hyperparameters.yaml").read_text())["federation"]["parallel_clients"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 1
