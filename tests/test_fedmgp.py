"""FedMGP's pure functions and its aggregator: diversity loss, group logits, group selection, slot aggregation,
bytes up, SPMD determinism and resume."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import state_bytes
from fedprompt.methods.fedmgp import (TEXT_KEY, VISUAL_KEY, FedMGPAggregator, combine_group_logits,
                                      diversity_loss, feature_average_logits, group_cross_entropy, group_logits,
                                      group_similarity, init_text_groups, sample_groups, select_groups,
                                      selection_probabilities, selection_seed)

R2 = math.sqrt(0.5)


# ------------------------------------------------------------------------------------------------ diversity
def loop_diversity(text, image, variant, distance):
    """The diversity term written as the official code's loops (per row, per pair), on normalised features."""
    def modality(feats):
        feats = F.normalize(feats, dim=-1)
        groups, rows = feats.shape[0], feats.shape[1]
        total = 0.0
        for n in range(rows):
            pair_sum, pairs = 0.0, 0
            for i in range(groups):
                for j in range(i + 1, groups):
                    a, b = feats[i, n], feats[j, n]
                    cos = float(a @ b / (a.norm() * b.norm()))
                    if variant == "paper":
                        term = cos
                    elif distance == "cos":
                        term = 1.0 - cos
                    elif distance == "l1":
                        term = -float((a - b).abs().mean())
                    else:
                        term = -math.sqrt(float(((a - b) ** 2).sum()) + 1e-8)
                    pair_sum, pairs = pair_sum + term, pairs + 1
            total += pair_sum / pairs
        return total / rows

    parts = [modality(f) for f in (text, image) if f is not None and f.shape[0] > 1]
    combined = sum(parts) / len(parts)
    return abs(combined) if variant == "code" else combined


@pytest.mark.parametrize("variant, distance", [("paper", "l1"), ("code", "cos"), ("code", "l1"), ("code", "l2")])
def test_diversity_loss_matches_direct_computation(variant, distance):
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(4, 5, 8, generator=g), torch.randn(3, 6, 8, generator=g) * 3
    got = diversity_loss(text, image, variant, distance)
    assert got.shape == ()
    assert float(got) == pytest.approx(loop_diversity(text, image, variant, distance), rel=1e-5, abs=1e-6)
    text_only = diversity_loss(text, torch.randn(1, 6, 8), variant, distance)  # one visual group: no visual term
    assert float(text_only) == pytest.approx(loop_diversity(text, None, variant, distance), rel=1e-5, abs=1e-6)


def test_diversity_signs_paper_pushes_apart_code_pulls_together():
    base = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])  # two identical groups, one row
    apart = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert float(diversity_loss(base, None, "paper")) == pytest.approx(1.0)
    assert float(diversity_loss(apart, None, "paper")) == pytest.approx(0.0, abs=1e-7)
    for distance in ("cos", "l1", "l2"):  # the released code: lower when the groups are alike
        alike = float(diversity_loss(base, None, "code", distance))
        assert alike < float(diversity_loss(apart, None, "code", distance))


def test_diversity_loss_leading_client_dimension_and_gradients():
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 3, 4, 8, generator=g).requires_grad_()
    image = torch.randn(2, 3, 5, 8, generator=g)
    batched = diversity_loss(text, image)
    assert batched.shape == (2,)
    for k in range(2):
        torch.testing.assert_close(batched[k], diversity_loss(text[k], image[k]))
    batched.sum().backward()
    assert text.grad.abs().sum() > 0
    assert float(diversity_loss(torch.randn(1, 4, 8), None)) == 0.0


# ---------------------------------------------------------------------------------------- logits and loss
def test_group_logits_pairing_and_prediction_modes():
    g = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(2, 4, 8, generator=g), dim=-1)  # G_v = 2, B = 4
    text = F.normalize(torch.randn(3, 5, 8, generator=g), dim=-1)  # G_t = 3, C = 5
    logits = group_logits(image, text, 100.0)
    assert logits.shape == (3, 4, 5)
    torch.testing.assert_close(logits[0], 100 * image[0] @ text[0].T)
    torch.testing.assert_close(logits[1], 100 * image[1] @ text[1].T)
    torch.testing.assert_close(logits[2], 100 * image[0] @ text[2].T)  # extra text group: visual group 0
    torch.testing.assert_close(combine_group_logits(logits), logits.mean(0))
    torch.testing.assert_close(combine_group_logits(logits, "selected_group", 2), logits[2])
    best = combine_group_logits(logits, "max_logits")
    for b in range(4):
        winner = int(logits[:, b].amax(-1).argmax())
        torch.testing.assert_close(best[b], logits[winner, b])
    torch.testing.assert_close(feature_average_logits(image, text, 100.0),
                               100 * image.mean(0) @ text.mean(0).T)
    labels = torch.tensor([0, 4, 2, 1])
    expected = torch.stack([F.cross_entropy(logits[k], labels) for k in range(3)]).mean()
    torch.testing.assert_close(group_cross_entropy(logits, labels), expected)
    with pytest.raises(FedPromptError, match="inference mode 'vote'"):
        combine_group_logits(logits, "vote")


def test_text_groups_start_from_the_words_plus_small_noise():
    words = torch.randn(2, 64)
    groups = init_text_groups(words, 5, generator=torch.Generator().manual_seed(0))
    assert groups.shape == (5, 2, 64)
    noise = groups - words
    assert 0.008 < float(noise.std()) < 0.012 and not torch.equal(groups[0], groups[1])


# ------------------------------------------------------------------------------------------------ selection
def test_similarity_probabilities_and_sampler_by_hand():
    global_slots = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [s = 2, n_ctx = 1, D = 2]
    client = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[-1.0, 0.0]]])  # cos to the slots: (1, 0), (.71, .71), (-1, 0)
    sim = group_similarity(client, global_slots)
    torch.testing.assert_close(sim, torch.tensor([1.0, R2, 0.0], dtype=torch.float64))
    e = [math.exp(1.0), math.exp(R2), 1.0]
    expected = torch.tensor([v / sum(e) for v in e], dtype=torch.float64)  # 0.47304, 0.35294, 0.17402
    torch.testing.assert_close(selection_probabilities(sim, 1.0), expected)
    assert selection_probabilities(sim, 1.0)[0].item() == pytest.approx(0.473042, abs=1e-6)
    p = torch.tensor([0.5, 0.3, 0.2])
    assert sample_groups(p, 2, [0.6, 0.9]) == [1, 2]  # cdf .5 .8 1 -> 1; then (.5, .2)/.7: cdf .714 1 -> 2
    assert sample_groups(p, 2, [0.1, 0.1]) == [0, 1]
    assert sample_groups(p, 2, [0.95, 0.5]) == [2, 0]  # then (.5, .3)/.8: cdf .625 1 -> 0
    assert sample_groups(p, 3, [0.0, 0.0, 0.0]) == [0, 1, 2]


def test_sampling_frequencies_follow_the_softmax():
    client = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[-1.0, 0.0]]])
    slots = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    p = selection_probabilities(group_similarity(client, slots), 1.0)
    firsts = torch.zeros(3)
    n = 3000
    for seed in range(n):
        picks = select_groups(client, slots, 2, seed)
        assert len(set(picks)) == 2
        firsts[picks[0]] += 1
    torch.testing.assert_close(firsts / n, p.float(), atol=0.03, rtol=0)


def test_selection_modes_and_errors():
    client = torch.randn(5, 2, 4)
    assert select_groups(client, None, 2, 0, mode="fixed") == [0, 1]
    assert len(select_groups(client, None, 5, 0, mode="random")) == 5
    with pytest.raises(FedPromptError, match="groups_to_send=6"):
        select_groups(client, None, 6, 0)
    with pytest.raises(FedPromptError, match="selection 'best'"):
        select_groups(client, None, 2, 0, mode="best")
    with pytest.raises(FedPromptError, match="temperature 0"):
        selection_probabilities(torch.zeros(3), 0)


# ------------------------------------------------------------------------------------------------ aggregator
def hand_states():
    """3 clients, G = 3 groups of one 2-d token each; visual groups are the text groups in the order (2, 0, 1)."""
    text = {0: [[1, 0], [1, 1], [-1, 0]],  # sims to slots (1,0), (0,1): 1, .71, 0 -> picks (0, 1)
            1: [[0, -1], [0, 2], [3, 3]],  # 0, 1, .71 -> (1, 2)
            2: [[2, 1], [-1, -1], [1, 3]]}  # .89, -.71, .95 -> (2, 0)
    states = {}
    for cid, groups in text.items():
        t = torch.tensor(groups, dtype=torch.float32).unsqueeze(1)  # [3, 1, 2]
        states[cid] = {TEXT_KEY: t, VISUAL_KEY: t[[2, 0, 1]].clone()}
    return states


SLOTS = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])


def run_round(agg, states, round_idx, senders=None):
    senders = sorted(states) if senders is None else senders
    uploads = {cid: agg.upload(cid, states[cid], round_idx) for cid in senders}
    global_state = agg.aggregate(uploads, {cid: 1 for cid in senders}, round_idx)
    new = {cid: agg.apply(states[cid], agg.download(global_state, cid), cid) for cid in states}
    return uploads, global_state, new


def test_hand_computed_round():
    """Round 2 against fixed global slots; T = 0.001 makes the sampling follow the similarity order."""
    agg = FedMGPAggregator(groups_to_send=2, temperature=1e-3, seed=7)
    agg.load_state_dict({"global_prompts": {TEXT_KEY: SLOTS, VISUAL_KEY: SLOTS}, "last_round": 1})
    states = hand_states()
    assert agg.selection(0, states[0], 2) == {TEXT_KEY: [0, 1], VISUAL_KEY: [1, 2]}
    assert agg.selection(1, states[1], 2) == {TEXT_KEY: [1, 2], VISUAL_KEY: [2, 0]}
    assert agg.selection(2, states[2], 2) == {TEXT_KEY: [2, 0], VISUAL_KEY: [0, 1]}
    uploads, global_state, new = run_round(agg, states, 2)
    torch.testing.assert_close(uploads[1][TEXT_KEY], torch.tensor([[[0.0, 2.0]], [[3.0, 3.0]]]))
    slot0, slot1 = [2 / 3, 5 / 3], [2.0, 5 / 3]  # means of (1,0) (0,2) (1,3) and of (1,1) (3,3) (2,1)
    expected_slots = torch.tensor([[slot0], [slot1]])
    torch.testing.assert_close(global_state[TEXT_KEY], expected_slots)
    torch.testing.assert_close(global_state[VISUAL_KEY], expected_slots)
    expected_text = {0: [slot0, slot1, [-1, 0]], 1: [[0, -1], slot0, slot1], 2: [slot1, [-1, -1], slot0]}
    expected_visual = {0: [[-1, 0], slot0, slot1], 1: [slot1, [0, -1], slot0],
                       2: [slot0, slot1, [-1, -1]]}
    for cid in range(3):
        torch.testing.assert_close(new[cid][TEXT_KEY], torch.tensor(expected_text[cid]).unsqueeze(1))
        torch.testing.assert_close(new[cid][VISUAL_KEY], torch.tensor(expected_visual[cid]).unsqueeze(1))
    assert agg.state_dict()["last_round"] == 2
    torch.testing.assert_close(agg.state_dict()["global_prompts"][TEXT_KEY], expected_slots)


def test_first_round_is_uniform_and_shared_by_text_and_visual():
    agg = FedMGPAggregator(seed=3)
    states = {cid: {TEXT_KEY: torch.randn(5, 2, 4), VISUAL_KEY: torch.randn(5, 2, 6)} for cid in range(300)}
    pairs = set()
    for cid, state in states.items():
        chosen = agg.selection(cid, state, 1)
        assert chosen[TEXT_KEY] == chosen[VISUAL_KEY] and len(set(chosen[TEXT_KEY])) == 2
        assert chosen == FedMGPAggregator(seed=3).selection(cid, state, 1)  # deterministic
        pairs.add(tuple(chosen[TEXT_KEY]))
    assert len(pairs) == 20  # every ordered pair of 5 groups occurs
    assert agg.upload(-1, states[0], 0) == {}  # the loop's initial upload of the server's initialisation
    assert selection_seed(3, 1, 2) != selection_seed(3, 2, 1)


def test_bytes_up_are_s_groups_vit_b16():
    agg = FedMGPAggregator(groups_to_send=2)
    state = {TEXT_KEY: torch.zeros(5, 2, 512), VISUAL_KEY: torch.zeros(5, 2, 768)}
    upload = agg.upload(0, state, 1)
    assert upload[TEXT_KEY].shape == (2, 2, 512) and upload[VISUAL_KEY].shape == (2, 2, 768)
    assert sum(t.numel() for t in upload.values()) == 5120  # the paper's "5.1k" communicated parameters
    assert state_bytes(upload) == 5120 * 4
    text_only = agg.upload(0, {TEXT_KEY: torch.zeros(5, 2, 512), VISUAL_KEY: torch.zeros(0, 2, 768)}, 1)
    assert list(text_only) == [TEXT_KEY] and state_bytes(text_only) == 2 * 2 * 512 * 4


def local_training(states, round_idx):
    """Stand-in for local training: a deterministic perturbation per (client, round)."""
    out = {}
    for cid, state in states.items():
        g = torch.Generator().manual_seed(1000 * round_idx + cid)
        out[cid] = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    return out


def simulate(agg, states, rounds, sampled):
    for round_idx in rounds:
        trained = local_training({cid: states[cid] for cid in sampled(round_idx)}, round_idx)
        states = {**states, **trained}
        _, _, states = run_round(agg, states, round_idx, senders=sorted(trained))
    return states


def initial_states():
    g = torch.Generator().manual_seed(0)
    return {cid: {TEXT_KEY: torch.randn(3, 2, 4, generator=g), VISUAL_KEY: torch.randn(3, 2, 6, generator=g)}
            for cid in range(4)}


def sampled(round_idx):
    return [0, 1, 2, 3] if round_idx == 1 else [(round_idx + i) % 4 for i in range(2)]


def test_unsampled_clients_receive_nothing():
    agg = FedMGPAggregator(seed=1)
    states = initial_states()
    _, _, new = run_round(agg, states, 1, senders=[0, 2])
    for cid in (1, 3):
        assert all(torch.equal(new[cid][k], states[cid][k]) for k in states[cid])
    for cid in (0, 2):
        chosen = agg._select(cid, states[cid], 1, {})
        rest = [g for g in range(3) if g not in chosen[TEXT_KEY]]
        assert torch.equal(new[cid][TEXT_KEY][rest], states[cid][TEXT_KEY][rest])
        assert not torch.equal(new[cid][TEXT_KEY], states[cid][TEXT_KEY])


def test_every_rank_gets_the_same_result_without_running_upload():
    """SPMD: rank A trains and uploads; rank B only sees the gathered uploads and post-training states."""
    rank_a, rank_b = FedMGPAggregator(seed=5), FedMGPAggregator(seed=5)
    states_a = states_b = initial_states()
    for round_idx in (1, 2, 3):
        trained = local_training(states_a, round_idx)
        uploads = {cid: rank_a.upload(cid, trained[cid], round_idx) for cid in trained}
        out = []
        for agg in (rank_a, rank_b):
            global_state = agg.aggregate(uploads, {}, round_idx)
            out.append({cid: agg.apply(trained[cid], agg.download(global_state, cid), cid) for cid in trained})
        states_a, states_b = out
        for cid in trained:
            assert all(torch.equal(states_a[cid][k], states_b[cid][k]) for k in states_a[cid])


def test_resume_continues_identically():
    straight = simulate(FedMGPAggregator(seed=11, temperature=0.5), initial_states(), range(1, 6), sampled)
    first = FedMGPAggregator(seed=11, temperature=0.5)
    states = simulate(first, initial_states(), range(1, 4), sampled)
    buffer = io.BytesIO()
    torch.save({"aggregator": first.state_dict(), "clients": states}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = FedMGPAggregator(seed=11, temperature=0.5)
    resumed.load_state_dict(checkpoint["aggregator"])
    states = simulate(resumed, checkpoint["clients"], range(4, 6), sampled)
    for cid in straight:
        assert all(torch.equal(straight[cid][k], states[cid][k]) for k in straight[cid])
    forgetful = simulate(FedMGPAggregator(seed=11, temperature=0.5), checkpoint["clients"], range(4, 6), sampled)
    assert any(not torch.equal(straight[cid][k], forgetful[cid][k]) for cid in straight for k in straight[cid])
    with pytest.raises(FedPromptError, match="no FedMGP aggregator state"):
        FedMGPAggregator().load_state_dict({})
