"""FOCoOp: the negative words, the perturbation ascent, the robust log-sum-exp and the multipliers, the compat
switches, the server's 2-means and OT calibration against POT, the three prompts' state, exact resume, bytes per
round and parity with the released code (K-invariance: tests/test_parallel_clients.py; the Flower runtime:
tests/test_flower.py)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT, read_rows, resumed_and_straight, run_parity_script
from fedprompt.errors import FedPromptError
from fedprompt.methods import FOCoOp
from fedprompt.methods.focoop import ascend, calibrate, robust_total, two_means, uot_plan
from fedprompt.ood import read_word_lists, select_negative_labels

WORDS = str(ROOT / "tests" / "data" / "negative_words")
CLASSES = ["dog", "cat", "house"]


def method(**extra) -> FOCoOp:
    return FOCoOp(negative_words=WORDS, n_ctx=2, num_negatives=4, **extra)


def test_word_lists_and_the_least_similar_words(tmp_path):
    adjectives, nouns = read_word_lists(WORDS)
    assert len(adjectives) == 20 and len(nouns) == 30 and adjectives[0] == "quiet"
    (tmp_path / "adj.a.txt").write_text("red\nbig\nbig\n")
    (tmp_path / "noun.a.txt").write_text("red\nbox\n\ncup\n")
    assert read_word_lists(tmp_path) == (["big"], ["red", "box", "cup"])  # repeats once; an adjective noun: noun
    with pytest.raises(FedPromptError, match="negative word lists not found"):
        read_word_lists(tmp_path / "none")
    # 2 classes; score = the similarity at index int(2 * 0.95) = 1 of each word's sorted row (its larger one)
    adj_sim = torch.tensor([[0.9, 0.1], [0.2, 0.3]])  # scores 0.9, 0.3
    noun_sim = torch.tensor([[0.5, 0.6], [0.0, 0.1], [0.4, -1.0]])  # scores 0.6, 0.1, 0.4
    # 3 of 5 words: int(3 * 2 / 5) = 1 adjective, 2 nouns, each part in increasing score
    assert select_negative_labels(adj_sim, noun_sim, ["a1", "a2"], ["n1", "n2", "n3"], 3) == ["a2", "n2", "n3"]


def test_client_mines_its_ood_words_once_per_class_list(tiny_backbone):
    m = method()
    client = m.build_client(tiny_backbone, CLASSES, slots=2)
    words = m.negative_labels(tiny_backbone, CLASSES)
    assert len(words) == 4 and not set(words) & set(CLASSES)
    assert m.negative_labels(tiny_backbone, CLASSES) is words
    client.eval()
    text = client.text_for(torch.arange(2))
    assert text.shape == (2, len(CLASSES) + 4, tiny_backbone.embed_dim)
    state = client.slot_state(0)
    assert set(state) == {"local_prompt.ctx", "global_prompt.ctx", "ood_prompt.ctx", "gamma"}
    assert torch.equal(state["local_prompt.ctx"], state["global_prompt.ctx"])  # the global prompt starts as a copy
    assert state["ood_prompt.ctx"].shape == (4, 2, tiny_backbone.ctx_dim) and state["gamma"].tolist() == [10, 10]


def test_ascent_takes_row_normalised_steps_and_stops_a_client_when_it_settles():
    direction = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]])  # client 1's objective does not depend on the noise

    def objective(noise):
        return (noise * direction).sum(dim=(1, 2)) + torch.tensor([0.0, 1.0])

    start = torch.zeros(2, 1, 2)
    moved = ascend(start, objective, steps=4, step_size=1.0)
    torch.testing.assert_close(moved[0], 4 * torch.tensor([[0.6, 0.8]]), atol=1e-6, rtol=0)
    assert torch.equal(moved[1], torch.zeros(1, 2))  # a zero gradient moves nothing; it stops after two steps


def test_robust_total_is_each_clients_log_sum_exp_and_its_limit():
    values = torch.tensor([1.0, 3.0, 2.0, 5.0, 0.5])
    got = robust_total(values, torch.tensor([0.5, 2.0]), [2, 3], official=False)
    torch.testing.assert_close(got, torch.stack([0.5 * torch.logsumexp(values[:2] / 0.5, 0),
                                                 2.0 * torch.logsumexp(values[2:] / 2.0, 0)]))
    limit = robust_total(values, torch.tensor([0.0, 2.0]), [2, 3], official=False)
    assert limit[0] == 3.0  # gamma_2 = 0: the maximum
    assert math.isnan(robust_total(values, torch.tensor([0.0, 2.0]), [2, 3], official=True)[0])  # as released


def test_multipliers_move_by_the_radius_of_each_clients_perturbations(tiny_backbone):
    m = method(beta=0.5)
    client = m.build_client(tiny_backbone, CLASSES, slots=2)
    client.train()
    batch = {"image": torch.randn(5, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0, 1]), "slots": torch.arange(2),
             "owner": torch.tensor([0, 0, 1, 1, 1]), "counts": torch.tensor([2, 3]), "seeds": [3, 4]}
    with client.stepping_for(batch):
        text = client.text_features()
        image = client.image_features(batch)
        delta, eps = client.perturbations(text[:, :3], text[:, 3:], image, batch["label"])
    losses = client.training_step(batch)
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    radius = torch.stack([delta.abs().mean(dim=(1, 2)), eps.abs().mean(dim=(1, 2))], dim=1)
    torch.testing.assert_close(client.gamma, (10 - 0.5 * (10 - radius)).clamp(0, 10), atol=1e-6, rtol=0)
    # the release's OOD ascent holds back the ID perturbation's norm (a constant): eps moves further
    official = method(beta=0.5, compat="official").build_client(tiny_backbone, CLASSES, slots=2)
    official.load_state_dict(client.state_dict())
    official.gamma.fill_(10.0)
    client.gamma.fill_(10.0)
    with official.stepping_for(batch), client.stepping_for(batch):
        _, eps_official = official.perturbations(text[:, :3], text[:, 3:], image, batch["label"])
    assert (eps_official - eps).abs().max() > 1e-4


def test_two_means_splits_masses_and_names_the_larger_group_one():
    values = torch.tensor([0.9, 0.11, 0.1, 0.95, 0.12])
    assert two_means(values, torch.Generator().manual_seed(0)).tolist() == [1, 0, 0, 1, 0]


def test_calibration_carries_seemingly_ood_prompts_and_keeps_the_lowest_mass_ones():
    """The server's step against POT computed here: the plan, the masses, the carried global prompts, the new OOD
    prompts (the lowest-mass rows)."""
    import ot

    torch.manual_seed(0)
    global_ctx = torch.randn(3, 2, 4)
    ood = torch.cat([global_ctx + 0.01 * torch.randn(3, 2, 4), 5 + torch.randn(5, 2, 4)])  # 3 near, 5 far rows
    generator = torch.Generator().manual_seed(1)
    new_global, new_ood = calibrate(global_ctx, ood, count=4, ema=0.5, reg_m=0.1, generator=generator)
    rows, targets = ood.reshape(8, -1), global_ctx.reshape(3, -1)
    cost = ot.dist(rows, targets)
    plan = ot.unbalanced.mm_unbalanced(torch.full((8,), 1 / 8), torch.full((3,), 1 / 3), cost / cost.max(), 0.1,
                                       div="kl")
    torch.testing.assert_close(uot_plan(rows, targets, 0.1), plan)
    mass = plan.sum(1)
    assert mass[:3].min() > mass[3:].max()  # the rows near the global prompts carry the mass
    carried = (plan[:3].t() @ rows[:3]).reshape(3, 2, 4)
    torch.testing.assert_close(new_global, 0.5 * global_ctx + 0.5 * carried)
    torch.testing.assert_close(new_ood, ood[mass.argsort()[:4]])


def test_settings_are_checked_in_one_line(tmp_path):
    for bad, match in [({"negative_words": ""}, "negative_words is not set"),
                       ({"negative_words": WORDS, "class_specific": False}, "uot needs method.class_specific"),
                       ({"negative_words": WORDS, "frac": 1.5}, "frac and method.ema"),
                       ({"negative_words": WORDS, "dro_steps": 0}, "dro_steps")]:
        with pytest.raises(FedPromptError, match=match):
            FOCoOp(**bad)
    (tmp_path / "noun.few.txt").write_text("cup\nbox\n")
    from fedprompt.data import Synthetic

    with pytest.raises(FedPromptError, match="holds 2 words, too few for method.num_negatives 100"):
        FOCoOp(negative_words=str(tmp_path)).prepare_data(Synthetic(num_classes=3).setup(), [])


def test_resume_gives_the_uninterrupted_run_and_bytes_count_the_two_sent_prompts(tmp_path):
    cut, full = resumed_and_straight(method(lr=0.5), tmp_path)
    for cid in (0, 1):
        for key, value in full["clients"][cid].items():
            assert torch.equal(cut["clients"][cid][key], value), (cid, key)
        assert full["clients"][cid]["gamma"].max() < 10  # the multipliers moved and are kept per client
    assert set(full["global"]) == {"global_prompt.ctx", "ood_prompt.ctx"}
    per_client = sum(v.numel() for v in full["global"].values()) * 4
    rows = read_rows(tmp_path / "straight")
    assert [r["bytes_up"] for r in rows] == [2 * per_client, per_client, per_client]
    assert "global_acc" not in rows[-1]  # personal: each client's local prompt


def test_official_focoop_code_gives_the_same_words_logits_loss_sgd_step_and_server():
    """benchmarks/parity_official_2025.py: the released word mining, model, client step (two clients, DRO on) and
    server (mean and OT calibration) against fedprompt's (within 1e-5); skipped without the mirrors."""
    ran = run_parity_script("parity_official_2025", methods=["FOCoOp"])
    assert ran == {"FOCoOp": True}
