"""FedAPT: the key mixture, each client's own key, the per-image evaluation against a direct computation, the
clients' keys from the data, the settings' one-line errors, exact resume, bytes per round and parity with the
released code (K-invariance: tests/test_parallel_clients.py; the Flower runtime: tests/test_flower.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import read_rows, resumed_and_straight, run_parity_script
from fedprompt.data import ByDomain, Dirichlet, Synthetic
from fedprompt.errors import FedPromptError
from fedprompt.methods import FedAPT
from fedprompt.methods.fedapt import domain_keys, key_weights, keyed_context

CLASSES = ["dog", "cat", "house"]


def test_key_weights_standardise_the_scores_over_the_keys():
    scores = torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.5, 0.8]])
    weights = key_weights(scores, 1.0)
    for row, got in zip(scores, weights):
        mean, std = row.mean(), ((row - row.mean()) ** 2).sum().div(2).sqrt()  # unbiased
        torch.testing.assert_close(got, torch.softmax((row - mean) / std, dim=0))
    assert key_weights(scores, 0.01).max(dim=1).values.min() > 0.999  # t = 0.01: one key per image
    ctx, key = torch.randn(2, 3, 4, 5), torch.rand(2, 4, 5)
    torch.testing.assert_close(keyed_context(ctx, key), ctx * (1 + key[:, None]))


def test_keys_are_a_seeded_uniform_draw():
    keys = domain_keys(3, 4, 8, seed=1)
    assert keys.shape == (3, 4, 8) and keys.min() >= 0 and keys.max() < 1
    assert torch.equal(keys, domain_keys(3, 4, 8, seed=1)) and not torch.equal(keys, domain_keys(3, 4, 8, seed=2))


def loaded_client(backbone, method, slots=2):
    torch.manual_seed(0)
    client = method.build_client(backbone, CLASSES, slots=slots)
    for slot in range(slots):
        state = client.slot_state(slot)
        client.load_slot(slot, {**state, "domain": torch.tensor(slot)})
    with torch.no_grad():
        client.prompt.ctx.normal_(0, 0.3)
        client.query.weight.normal_(0, 1.0)
    return client


def test_mixture_evaluation_is_each_images_own_prompt(tiny_backbone):
    """Evaluation with the key mixture: each image's logits are those of a prompt built from its own weights, one
    image at a time (the release's loop), also when the images are encoded in chunks of two."""
    method = FedAPT(n_ctx=2, num_domains=3, temperature=0.5, max_sentences=2 * len(CLASSES))
    client = loaded_client(tiny_backbone, method)
    client.eval()
    images = torch.randn(5, 3, 32, 32)
    batch = {"image": images, "slots": torch.arange(2), "owner": torch.tensor([0, 0, 1, 1, 1]),
             "counts": torch.tensor([2, 3])}
    logits = client.predict_logits(batch)
    raw = tiny_backbone.encode_image(images).float()
    expected = []
    for b in range(5):
        slot = int(batch["owner"][b])
        weights = key_weights((raw[b] @ client.query.weight[slot].t())[None], 0.5)[0]
        ctx = client.prompt.ctx[slot]
        mixed = ctx + ctx * (weights[:, None, None] * client.keys).sum(0)
        text = F.normalize(tiny_backbone.encode_prompts(client.tokens, mixed, class_specific=True).float(), dim=-1)
        expected.append(tiny_backbone.logit_scale * F.normalize(raw[b], dim=-1) @ text.t())
    torch.testing.assert_close(logits, torch.stack(expected), atol=1e-5, rtol=1e-5)
    method.eval_prompt = "own"  # each client with its own key: the training-time prompt
    own = client.predict_logits(batch)
    ctx = client.prompt.ctx[1]
    text = F.normalize(tiny_backbone.encode_prompts(client.tokens, ctx + ctx * client.keys[1],
                                                    class_specific=True).float(), dim=-1)
    torch.testing.assert_close(own[2:], tiny_backbone.logit_scale * F.normalize(raw[2:], dim=-1) @ text.t(),
                               atol=1e-5, rtol=1e-5)


def test_training_loss_is_the_class_and_the_domain_cross_entropy(tiny_backbone):
    method = FedAPT(n_ctx=2, num_domains=3)
    client = loaded_client(tiny_backbone, method)
    client.train()
    images, label = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1])
    batch = {"image": images, "label": label, "slots": torch.arange(2), "owner": torch.tensor([0, 0, 1, 1, 1]),
             "counts": torch.tensor([2, 3])}
    losses = client.training_step(batch)
    raw = tiny_backbone.encode_image(images).float()
    for slot, rows in ((0, slice(0, 2)), (1, slice(2, 5))):
        scores = raw[rows] @ client.query.weight[slot].t()
        expected = F.cross_entropy(scores, torch.full((scores.shape[0],), slot))  # the client's own domain
        torch.testing.assert_close(losses["domain"][slot], expected, atol=1e-5, rtol=1e-5)
    assert client.state_dict()["domain"].tolist() == [0, 1]


def test_each_client_trains_with_the_key_of_its_domain():
    method = FedAPT(n_ctx=2)
    data = Synthetic(num_classes=3, num_domains=3, partition=ByDomain(clients_per_domain=2, alpha=1.0))
    splits = data.setup()
    method.prepare_data(splits, [])
    assert method.key_count == 3
    keys = [int(method.initial_client_state(c.client_id, {})["domain"]) for c in splits.clients]
    domains = splits.source.domains
    assert keys == [domains.index(c.train[0].domain) for c in splits.clients] == [0, 0, 1, 1, 2, 2]
    per_client = FedAPT(n_ctx=2, domain_of="client")
    per_client.prepare_data(splits, [])
    assert per_client.key_count == 6 and int(per_client.initial_client_state(5, {})["domain"]) == 5


def test_data_problems_are_one_line_each():
    mixed = Synthetic(num_classes=3, num_domains=2, partition=Dirichlet(num_clients=2, alpha=1.0, min_size=2))
    with pytest.raises(FedPromptError, match="client 0 .* holds images of 2 domains; use a partition by domain"):
        FedAPT().prepare_data(mixed.setup(), [])
    with pytest.raises(FedPromptError, match="at least 2 domain keys"):
        FedAPT().prepare_data(Synthetic(num_classes=3).setup(), [])
    with pytest.raises(FedPromptError, match="num_domains is 2 but the data has 3 domains"):
        FedAPT(num_domains=2).prepare_data(Synthetic(num_classes=3, num_domains=3).setup(), [])
    for bad, match in [({"n_ctx": 0}, "n_ctx"), ({"temperature": 0.0}, "temperature"),
                       ({"num_domains": 1}, "num_domains"), ({"eval_prompt": "best"}, "eval_prompt")]:
        with pytest.raises(FedPromptError, match=match):
            FedAPT(**bad)


def test_resume_gives_the_uninterrupted_run_and_bytes_count_prompts_and_query(tmp_path):
    """tiny_fit: two domain clients, one sampled after round 1; the domain index stays with its client."""
    cut, full = resumed_and_straight(FedAPT(n_ctx=2, lr=0.5), tmp_path)
    for cid in (0, 1):
        for key, value in full["clients"][cid].items():
            assert torch.equal(cut["clients"][cid][key], value), (cid, key)
        assert int(full["clients"][cid]["domain"]) == cid
    assert set(full["global"]) == {"prompt.ctx", "query.weight"}  # the domain index is never sent
    ctx, query = full["global"]["prompt.ctx"], full["global"]["query.weight"]
    assert ctx.shape[:2] == (4, 2) and query.shape[0] == 2  # 4 classes x 2 tokens; 2 domain keys
    per_client = (ctx.numel() + query.numel()) * 4
    rows = read_rows(tmp_path / "straight")
    assert [r["bytes_up"] for r in rows] == [2 * per_client, per_client, per_client]
    assert "global_acc" in rows[-1]  # one model: every client holds the same prompts and query


def test_official_fedapt_code_gives_the_same_logits_loss_and_sgd_step():
    """benchmarks/parity_official_2025.py: the released client and server models and the release's training step of
    two clients of different domains against ONE lock-step step (within 1e-5); skipped without the mirrors."""
    ran = run_parity_script("parity_official_2025", methods=["FedAPT"])
    assert ran == {"FedAPT": True}
