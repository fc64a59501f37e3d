"""FedTPG's prompt generator: shapes, dependence on the class names, parameter count, gradients, batching."""

from __future__ import annotations

import pytest
import torch

from fedprompt.errors import FedPromptError
from fedprompt.prompts import PromptGenerator


def test_parameter_count_for_vit_b16_text_width():
    gen = PromptGenerator(dim=512)
    sizes = {name: p.numel() for name, p in gen.named_parameters()}
    assert sum(sizes.values()) == 4_206_080
    assert sizes["queries"] == 4 * 512
    assert sizes["norm_queries.weight"] + sizes["norm_queries.bias"] + sizes["norm_context.weight"] \
        + sizes["norm_context.bias"] == 4 * 512
    assert sizes["attn.in_proj_weight"] + sizes["attn.in_proj_bias"] == 3 * 512 * 512 + 3 * 512
    assert sizes["attn.out_proj.weight"] + sizes["attn.out_proj.bias"] == 512 * 512 + 512
    assert sizes["ff.0.weight"] + sizes["ff.0.bias"] == 2 * 512
    assert sizes["ff.1.weight"] + sizes["ff.1.bias"] == 512 * 4096 + 4096  # GEGLU: value and gate, 2 x 4 x 512
    assert sizes["ff.3.weight"] + sizes["ff.3.bias"] == 2048 * 512 + 512
    assert len(sizes) == 15


def test_output_shape_single_and_batched():
    gen = PromptGenerator(dim=64, n_ctx=4, embed_dim=32, seed=0)
    names = torch.randn(3, 7, 32)
    assert gen(names[0]).shape == (4, 64)
    batched = gen(names)
    assert batched.shape == (3, 4, 64)
    for k in range(3):  # several clients in one call = one call per client
        torch.testing.assert_close(batched[k], gen(names[k]), rtol=0, atol=1e-5)


def test_output_depends_on_the_class_names_not_their_order():
    gen = PromptGenerator(dim=64, embed_dim=32, seed=0)
    names = torch.randn(5, 32)
    out = gen(names)
    assert (out - gen(torch.randn(5, 32))).abs().max() > 1e-2
    assert (out - gen(names[:3])).abs().max() > 1e-3  # fewer classes, other context
    torch.testing.assert_close(gen(names[torch.tensor([3, 0, 4, 1, 2])]), out, rtol=0, atol=1e-5)  # a set


def test_padding_mask_gives_ragged_sets_in_one_call():
    gen = PromptGenerator(dim=64, embed_dim=32, seed=1)
    a, b = torch.randn(6, 32), torch.randn(3, 32)
    padded = torch.stack([a, torch.cat([b, torch.randn(3, 32) * 50])])
    mask = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    out = gen(padded, mask)
    torch.testing.assert_close(out[0], gen(a), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], gen(b), rtol=0, atol=1e-5)  # padded rows have no influence
    with pytest.raises(FedPromptError, match="fully masked"):
        gen(padded, torch.tensor([[False] * 6, [True] * 6]))


def test_gradients_reach_every_parameter():
    gen = PromptGenerator(dim=64, embed_dim=32, seed=2)
    names = torch.randn(2, 5, 32)
    (gen(names) * torch.randn(2, 4, 64)).sum().backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_through_the_text_tower(tiny_backbone):
    """Class names -> frozen text features -> context -> prompts "X X X X {name}." -> logits; the loss trains it."""
    backbone = tiny_backbone
    gen = PromptGenerator(dim=backbone.ctx_dim, n_ctx=4, embed_dim=backbone.embed_dim, seed=0)
    names = ["dog", "guitar", "house"]
    with torch.no_grad():
        keys = torch.nn.functional.normalize(backbone.encode_text(names), dim=-1)
    assert keys.shape == (3, backbone.embed_dim)
    ctx = gen(keys)
    text = torch.nn.functional.normalize(backbone.encode_prompts(backbone.prompt_tokens(names, 4), ctx), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(6, backbone.embed_dim), dim=-1)
    loss = torch.nn.functional.cross_entropy(100 * images @ text.T, torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    assert gen.queries.grad.abs().sum() > 0 and gen.ff[1].weight.grad.abs().sum() > 0
    other = gen(torch.nn.functional.normalize(backbone.encode_text(["cat", "piano", "tree"]), dim=-1))
    assert (other - ctx).abs().max() > 1e-4  # other class names, other context


def test_seed_builds_identical_generators_and_leaves_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, second = PromptGenerator(dim=32, seed=7), PromptGenerator(dim=32, seed=7)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))
    third = PromptGenerator(dim=32, seed=8)
    assert not torch.equal(first.queries, third.queries)
    assert 0.01 < float(first.queries.std()) < 0.03  # N(0, 0.02^2)


def test_attention_residual_switch():
    plain, residual = PromptGenerator(dim=32, seed=3), PromptGenerator(dim=32, seed=3, attn_residual=True)
    names = torch.randn(4, 32)
    assert (plain(names) - residual(names)).abs().max() > 1e-4
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in residual.parameters())


def test_bad_arguments_are_clear_errors():
    with pytest.raises(FedPromptError, match="heads=3 must divide dim=32"):
        PromptGenerator(dim=32, heads=3)
    gen = PromptGenerator(dim=32, embed_dim=16)
    with pytest.raises(FedPromptError, match=r"must be \[C, 16\] or \[K, C, 16\], got \[4, 32\]"):
        gen(torch.randn(4, 32))
