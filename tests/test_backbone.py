"""The prompt text path, truncation, image tokens, and backbone loading errors."""

import pytest
import torch

from fedprompt.backbone import Backbone, load_backbone
from fedprompt.backbone.loading import LoadedModel
from fedprompt.errors import FedPromptError

NAMES = ["dog", "golden retriever", "house", "a very long class name with many words"]


def full_length(backbone):
    loaded = LoadedModel(backbone.model, backbone.tokenizer, backbone.preprocess_cfg, backbone.name)
    return Backbone(loaded, truncate=False)


def test_word_context_reproduces_encode_text(tiny_backbone):
    ctx = tiny_backbone.word_embeddings("a photo of a")
    assert ctx.shape == (4, tiny_backbone.ctx_dim)
    features = tiny_backbone.encode_prompts(tiny_backbone.prompt_tokens(NAMES, 4), ctx)
    reference = tiny_backbone.encode_text([f"a photo of a {n}." for n in NAMES])
    torch.testing.assert_close(features, reference, atol=2e-5, rtol=1e-5)


def test_truncated_path_equals_77_token_path_with_gradients(tiny_backbone):
    full = full_length(tiny_backbone)
    short_tokens, long_tokens = tiny_backbone.prompt_tokens(NAMES, 8), full.prompt_tokens(NAMES, 8)
    assert short_tokens.embeddings.shape[1] < 20 and long_tokens.embeddings.shape[1] == 77
    ctx = (torch.randn(3, 8, tiny_backbone.ctx_dim) * 0.02).requires_grad_()
    a = tiny_backbone.encode_prompts(short_tokens, ctx)
    (grad_a,) = torch.autograd.grad(a.square().sum(), ctx)
    b = full.encode_prompts(long_tokens, ctx)
    (grad_b,) = torch.autograd.grad(b.square().sum(), ctx)
    assert a.shape == (3, len(NAMES), 32)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-3 * float(grad_b.abs().max()), rtol=1e-3)


def test_class_specific_context_and_prompt_batching(tiny_backbone):
    tokens = tiny_backbone.prompt_tokens(NAMES, 2)
    csc = torch.randn(len(NAMES), 2, tiny_backbone.ctx_dim)
    out = tiny_backbone.encode_prompts(tokens, csc, class_specific=True)
    assert out.shape == (len(NAMES), 32)
    for c in range(len(NAMES)):  # class c only sees its own context
        single = tiny_backbone.encode_prompts(tiny_backbone.prompt_tokens(NAMES[c:c + 1], 2), csc[c])
        torch.testing.assert_close(out[c], single[0], atol=1e-5, rtol=1e-5)
    stacked = torch.randn(2, 5, 2, tiny_backbone.ctx_dim)
    batched = tiny_backbone.encode_prompts(tokens, stacked)
    torch.testing.assert_close(batched[1, 3], tiny_backbone.encode_prompts(tokens, stacked[1, 3]), atol=1e-5,
                               rtol=1e-5)


def test_patch_tokens_shapes_and_pooled_feature(tiny_backbone):
    images = torch.randn(3, 3, 32, 32)
    pooled, tokens = tiny_backbone.encode_image_tokens(images)
    assert pooled.shape == (3, 32) and tokens.shape == (3, 16, 32)  # (32 / 8)^2 patches, joint space 32
    torch.testing.assert_close(pooled, tiny_backbone.encode_image(images), atol=1e-5, rtol=1e-5)


def test_template_must_start_with_context(tiny_backbone):
    with pytest.raises(FedPromptError, match="must begin"):
        tiny_backbone.prompt_tokens(["dog"], 2, template="a {name} {ctx}.")


def test_backbone_is_frozen_and_not_a_client_submodule(tiny_backbone):
    from fedprompt.methods import PromptFL

    client = PromptFL(n_ctx=4).build_client(tiny_backbone, ["dog", "cat"])
    assert list(client.state_dict()) == ["prompt.ctx"]
    assert all(not p.requires_grad for p in tiny_backbone.parameters())
    client.train()
    assert not tiny_backbone.model.training


def test_undownloadable_tag_names_the_problem(monkeypatch):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(FedPromptError) as err:
        load_backbone("ViT-B-32", "openai")
    message = str(err.value)
    assert "openai" in message and "--backbone.pretrained /path/to" in message


def test_unknown_architecture_and_missing_file():
    with pytest.raises(FedPromptError, match="unknown open_clip architecture 'ViT-Q-99'"):
        load_backbone("ViT-Q-99", None)
    with pytest.raises(FedPromptError, match="no such file"):
        load_backbone("fedprompt-tiny", "/does/not/exist.safetensors")


def test_resnet_attention_pool_tokens_include_the_pooled_feature():
    torch.manual_seed(0)
    backbone = load_backbone("RN50", None)  # FedOTP's few-shot backbone; random init, no download
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pooled, tokens = backbone.encode_image_tokens(images)
        reference = backbone.encode_image(images)
    assert tokens.shape == (1, 49, 1024)  # 7 x 7 positions through the attention pool
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=1e-5)


def test_compiled_text_path_equals_the_eager_one(tiny_backbone):
    """train.compile: the prompt text path through torch.compile (here the aot_eager backend: it traces and runs
    the captured graph, forward and backward, without generating code) gives the eager features and gradients."""
    tokens = tiny_backbone.prompt_tokens(["dog", "cat", "bird"], 4)
    ctx = (torch.randn(2, 4, tiny_backbone.ctx_dim) * 0.02).requires_grad_()
    eager = tiny_backbone.encode_prompts(tokens, ctx)
    (grad_eager,) = torch.autograd.grad(eager.sum(), ctx)
    tiny_backbone.compile_text(True, backend="aot_eager")
    try:
        compiled = tiny_backbone.encode_prompts(tokens, ctx)
        (grad_compiled,) = torch.autograd.grad(compiled.sum(), ctx)
    finally:
        tiny_backbone.compile_text(False)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-6)
    assert tiny_backbone._compiled_text is None
