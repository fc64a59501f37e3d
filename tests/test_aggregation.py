"""FedAvg, FedProx, FedPer and exact byte accounting."""

import torch

from fedprompt.federation.aggregators import NoCommunication, WeightedMean, state_bytes
from fedprompt.methods import FedPer, FedProx, PromptFL


def test_weighted_mean_is_sample_weighted_fedavg():
    uploads = {0: {"prompt.ctx": torch.full((2, 3), 1.0)}, 3: {"prompt.ctx": torch.full((2, 3), 4.0)}}
    merged = WeightedMean(("prompt.",)).aggregate(uploads, {0: 30, 3: 10}, round_idx=1)
    torch.testing.assert_close(merged["prompt.ctx"], torch.full((2, 3), (30 * 1 + 10 * 4) / 40))
    plain = WeightedMean(("prompt.",), weighted=False).aggregate(uploads, {0: 30, 3: 10}, round_idx=1)
    torch.testing.assert_close(plain["prompt.ctx"], torch.full((2, 3), 2.5))


def test_fedprox_gradient_is_mu_times_distance(tiny_backbone):
    client = FedProx(mu=0.7, n_ctx=4).build_client(tiny_backbone, ["dog", "cat"])
    theta_global = torch.randn_like(client.prompt.ctx)
    client.on_round_start({"prompt.ctx": theta_global})
    with torch.no_grad():
        client.prompt.ctx.add_(0.3)
    loss = client.extra_loss({"slots": torch.tensor([0])}, None, None)  # one loss per active client
    assert loss.shape == (1,)
    (grad,) = torch.autograd.grad(loss.sum(), client.prompt.ctx)
    expected = 0.7 * (client.prompt.ctx.detach() - theta_global)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(loss[0], 0.35 * (client.prompt.ctx.detach() - theta_global).pow(2).sum())


def test_fedper_shares_only_the_first_tokens(tiny_backbone):
    method = FedPer(n_ctx=8)
    agg = method.build_aggregator()
    client = method.build_client(tiny_backbone, ["dog", "cat"])
    state = client.slot_state(0)
    upload = agg.upload(0, state, 1)
    assert upload["prompt.ctx"].shape == (4, tiny_backbone.ctx_dim)
    new = agg.apply(state, {"prompt.ctx": torch.zeros(4, tiny_backbone.ctx_dim)}, 0)
    assert new["prompt.ctx"][:4].abs().sum() == 0
    torch.testing.assert_close(new["prompt.ctx"][4:], state["prompt.ctx"][4:])


def test_byte_accounting_counts_the_shared_tensors(tiny_backbone):
    client = PromptFL(n_ctx=4).build_client(tiny_backbone, ["dog", "cat"])
    upload = PromptFL().build_aggregator().upload(0, client.slot_state(0), 1)
    assert state_bytes(upload) == 4 * tiny_backbone.ctx_dim * 4  # n_ctx x D float32
    assert state_bytes({"a": torch.zeros(10, dtype=torch.bfloat16)}) == 20
    assert NoCommunication().upload(0, client.slot_state(0), 1) == {}
