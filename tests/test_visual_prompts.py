"""Visual prompt tokens in the ViT image tower (Backbone.encode_image_prompted) on the tiny random-init ViT."""

import json

import pytest
import torch

from fedprompt.backbone import load_backbone
from fedprompt.errors import FedPromptError
from fedprompt.prompts import VisualPrompts

WIDTH = 64  # fedprompt-tiny: vision width 64, 2 layers, 4 x 4 patches at 32 px, joint space 32


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def prompts(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def reference_single(backbone, images, layer_tokens):
    """A straightforward prompted forward for ONE prompt set [depth, V, width], written out layer by layer."""
    visual = backbone.model.visual
    x = visual._embeds(images)
    n = x.shape[1]
    batch = images.shape[0]
    x = torch.cat([x, visual.ln_pre(layer_tokens[0]).expand(batch, -1, -1)], dim=1)
    for i, block in enumerate(visual.transformer.resblocks):
        if 0 < i < layer_tokens.shape[0]:
            x = torch.cat([x[:, :n], layer_tokens[i].expand(batch, -1, -1)], dim=1)
        x = block(x)
    x = visual.ln_post(x[:, :n])
    return x[:, 0] @ visual.proj  # class token (pool_type 'tok')


def test_zero_tokens_equal_encode_image_exactly(tiny_backbone, images):
    with torch.no_grad():
        plain = tiny_backbone.encode_image(images)
        one = tiny_backbone.encode_image_prompted(images, torch.zeros(1, 0, WIDTH))
        deep = tiny_backbone.encode_image_prompted(images, torch.zeros(1, 2, 0, WIDTH))
        three = tiny_backbone.encode_image_prompted(images, torch.zeros(3, 0, WIDTH))
    assert one.shape == (1, 3, 32)
    assert torch.equal(one[0], plain) and torch.equal(deep[0], plain)
    for g in range(3):
        torch.testing.assert_close(three[g], plain, atol=1e-6, rtol=0)


def test_prompt_tokens_change_the_feature_and_match_a_layer_by_layer_reference(tiny_backbone, images):
    p = prompts(2, 2, WIDTH)
    with torch.no_grad():
        out = tiny_backbone.encode_image_prompted(images, p)
        plain = tiny_backbone.encode_image(images)
        for g in range(2):
            torch.testing.assert_close(out[g], reference_single(tiny_backbone, images, p[g:g + 1]), atol=1e-5,
                                       rtol=1e-5)
    assert (out[0] - plain).abs().max() > 1e-2 and (out[0] - out[1]).abs().max() > 1e-2


def test_one_call_for_g_groups_equals_g_calls(tiny_backbone, images):
    p = prompts(5, 2, WIDTH)
    with torch.no_grad():
        together = tiny_backbone.encode_image_prompted(images, p)
        apart = torch.stack([tiny_backbone.encode_image_prompted(images, p[g:g + 1])[0] for g in range(5)])
    assert together.shape == (5, 3, 32)
    torch.testing.assert_close(together, apart, atol=1e-6, rtol=1e-6)


def test_per_sample_index_equals_a_loop(tiny_backbone, images):
    """Images of two clients in one call: image b uses the prompt sets of its own client (owner[b])."""
    groups = 3
    stacked = prompts(2, groups, 2, WIDTH)  # [K clients, G groups, V, width]
    owner = torch.tensor([1, 0, 1])
    index = tiny_backbone.group_index(owner, groups)
    assert index.tolist() == [[3, 0, 3], [4, 1, 4], [5, 2, 5]]
    with torch.no_grad():
        batched = tiny_backbone.encode_image_prompted(images, stacked.reshape(2 * groups, 2, WIDTH), index)
        one_each = tiny_backbone.encode_image_prompted(images, stacked[:, 0].reshape(2, 2, WIDTH), owner)
        for b in range(3):
            alone = tiny_backbone.encode_image_prompted(images[b:b + 1], stacked[owner[b]])  # [G, 1, E]
            torch.testing.assert_close(batched[:, b], alone[:, 0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(one_each[b], alone[0, 0], atol=1e-6, rtol=1e-6)
    assert batched.shape == (groups, 3, 32) and one_each.shape == (3, 32)


def test_deep_prompts(tiny_backbone, images):
    p = prompts(2, 2, WIDTH)
    deep = prompts(2, 2, 2, WIDTH, seed=3)  # [P, depth = 2 layers, V, width]
    with torch.no_grad():
        shallow = tiny_backbone.encode_image_prompted(images, p)
        depth_one = tiny_backbone.encode_image_prompted(images, p.unsqueeze(1))
        out = tiny_backbone.encode_image_prompted(images, deep)
        swapped = deep.clone()
        swapped[:, 1] = prompts(2, 2, WIDTH, seed=4)
        changed = tiny_backbone.encode_image_prompted(images, swapped)
        for g in range(2):
            torch.testing.assert_close(out[g], reference_single(tiny_backbone, images, deep[g]), atol=1e-5,
                                       rtol=1e-5)
    assert torch.equal(shallow, depth_one)
    assert (out - changed).abs().max() > 1e-3  # the layer-1 tokens matter


def test_gradients_reach_the_tokens_and_the_tower_stays_frozen(tiny_backbone, images):
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    module = VisualPrompts(groups=3, n_tokens=2, width=tiny_backbone.visual_width, depth=2,
                           generator=torch.Generator().manual_seed(0))
    assert module.tokens.shape == (3, 2, 2, WIDTH) and module.depth == 2
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    start = module.tokens.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        features = tiny_backbone.encode_image_prompted(images, module.tokens)
        features.square().sum().backward()
        assert module.tokens.grad is not None and module.tokens.grad[:, 0].abs().sum() > 0
        assert module.tokens.grad[:, 1].abs().sum() > 0
        optimizer.step()
    assert (module.tokens.detach() - start).abs().max() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.parameters())
    after = tiny_backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_prompt_shapes_are_clear_errors(tiny_backbone, images):
    with pytest.raises(FedPromptError, match=r"expected \[P, V, 64\]"):
        tiny_backbone.encode_image_prompted(images, torch.zeros(2, 2, 65))
    with pytest.raises(FedPromptError, match="depth <= 2"):
        tiny_backbone.encode_image_prompted(images, torch.zeros(2, 3, 2, WIDTH))
    with pytest.raises(FedPromptError, match="batch size 3"):
        tiny_backbone.encode_image_prompted(images, torch.zeros(2, 2, WIDTH), torch.zeros(2, 4, dtype=torch.long))


TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}


@pytest.mark.parametrize("vision_cfg, tower", [
    ({"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}, "ModifiedResNet"),
    ({"image_size": 32, "timm_model_name": "test_efficientnet", "timm_model_pretrained": False,
      "timm_pool": "avg", "timm_proj": "linear"}, "TimmModel"),
])
def test_towers_without_tokens_are_refused(tmp_path, vision_cfg, tower):
    from fedprompt.backbone.loading import register_model_config

    name = f"fedprompt-test-{tower.lower()}"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": TEXT_CFG}))
    register_model_config(path)
    torch.manual_seed(0)
    backbone = load_backbone(name, None)
    assert type(backbone.model.visual).__name__ == tower and not backbone.supports_visual_prompts
    with pytest.raises(FedPromptError, match=f"encode_image_prompted.*'{name}' has a {tower} image tower"):
        backbone.encode_image_prompted(torch.randn(1, 3, 32, 32), torch.zeros(1, 2, 8))
    with pytest.raises(FedPromptError, match="visual_width"):
        backbone.visual_width


def test_runs_under_bf16_autocast_with_fp32_token_gradients(tiny_backbone, images):
    tokens = prompts(2, 2, 2, WIDTH).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_backbone.encode_image_prompted(images, tokens)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 32)
    with torch.no_grad():
        exact = tiny_backbone.encode_image_prompted(images, tokens)
    torch.testing.assert_close(out.float(), exact, atol=0.1, rtol=0.05)
    out.float().square().sum().backward()
    assert tokens.grad.dtype == torch.float32 and tokens.grad.abs().sum() > 0
