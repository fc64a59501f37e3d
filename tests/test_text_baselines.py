"""The field's text-prompt baselines (CoCoOp, KgCoOp, ProGrad, PLOT, ProDA): each method's maths against a direct
reference computation (per-image loop, POT plans, FLiP's dense covariance, the official projection rule), their
switches (compat: flip, chunked text calls), the range checks, and federated runs through the real ``fit`` (what is
sent, bytes per round, resume to the same result)."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from conftest import read_rows, run_parity_script, tiny_fit, without_timings
from fedprompt.backbone import load_backbone
from fedprompt.errors import FedPromptError
from fedprompt.methods import PLOT, CoCoOp, KgCoOp, ProDA, ProGrad
from fedprompt.methods.prograd import project_conflicting
from fedprompt.methods.proda import orthogonality_loss, refined_logits

CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse"]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("fedprompt-tiny", None)


def build(method, backbone, slots=1, seed=0, classes=CLASSES):
    torch.manual_seed(seed)
    return method.build_client(backbone, classes, slots)


def batch_of(backbone, n=4, seed=1, owner=None, slots=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    batch = {"image": torch.randn(n, 3, size, size, generator=g), "label": torch.arange(n) % len(CLASSES)}
    if owner is not None:
        batch.update(owner=torch.tensor(owner), slots=torch.tensor(slots))
    return batch


def features_of(backbone, batch) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(backbone.encode_image(batch["image"]).float(), dim=-1)


def perturb(client, scale=0.05, seed=3):
    """Give every slot of every parameter its own values (slots start equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in client.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------------- CoCoOp
def test_cocoop_state_is_the_context_and_the_meta_net(backbone):
    client = build(CoCoOp(), backbone)
    e, d = backbone.embed_dim, backbone.ctx_dim
    h = max(1, e // 16)
    assert {k: tuple(v.shape) for k, v in client.slot_state(0).items()} == {
        "prompt.ctx": (4, d), "meta_net.linear1.weight": (h, e), "meta_net.linear1.bias": (h,),
        "meta_net.linear2.weight": (d, h), "meta_net.linear2.bias": (d,)}
    # "a photo of a" init: the context is the phrase's token embeddings
    torch.testing.assert_close(client.prompt.ctx[0], backbone.word_embeddings("a photo of a"))
    assert CoCoOp.shared_prefixes == ("prompt.", "meta_net.")


def reference_cocoop_logits(client, backbone, image: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """The official per-image loop: pi_b from the meta-net, C sentences with ctx + pi_b, one encoder call per image."""
    net = client.meta_net
    w1, b1 = net.linear1.weight[slot], net.linear1.bias[slot]
    w2, b2 = net.linear2.weight[slot], net.linear2.bias[slot]
    rows = []
    for x in image:
        bias = w2 @ torch.relu(w1 @ x + b1) + b2
        feats = F.normalize(backbone.encode_prompts(client.tokens, client.prompt.ctx[slot] + bias).float(), dim=-1)
        rows.append(backbone.logit_scale * feats @ x)
    return torch.stack(rows)


def test_cocoop_logits_equal_the_per_image_loop_and_chunks_change_nothing(backbone):
    client = build(CoCoOp(), backbone)
    perturb(client)
    batch = batch_of(backbone, n=5)
    image = features_of(backbone, batch)
    with torch.no_grad():
        expected = reference_cocoop_logits(client, backbone, image)
    client.train()
    logits = client(batch)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    loss = F.cross_entropy(logits, batch["label"])
    grads = torch.autograd.grad(loss, list(client.parameters()))
    chunked = build(CoCoOp(max_sentences=2 * len(CLASSES)), backbone)  # 2 images per text call: 3 calls
    chunked.load_state_dict(client.state_dict())
    chunked.train()
    logits_c = chunked(batch)
    torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-6)
    grads_c = torch.autograd.grad(F.cross_entropy(logits_c, batch["label"]), list(chunked.parameters()))
    for g, gc in zip(grads, grads_c):
        assert g.abs().sum() > 0
        torch.testing.assert_close(gc, g, rtol=1e-5, atol=1e-7)


def test_cocoop_one_text_call_for_every_image_of_every_client(backbone, monkeypatch):
    """Two clients' images in one step: one encoder call on all n x C sentences, each image with its own client's
    context and meta-net (equal to each client alone)."""
    client = build(CoCoOp(), backbone, slots=2)
    perturb(client)
    batch = batch_of(backbone, n=6, owner=[0, 0, 0, 1, 1, 1], slots=[0, 1])
    calls = []
    original = backbone._encode_embeddings
    monkeypatch.setattr(backbone, "_encode_embeddings", lambda x, *a: calls.append(x.shape[0]) or original(x, *a))
    with torch.no_grad():
        logits = client(batch)
    assert calls == [6 * len(CLASSES)]
    image = features_of(backbone, batch)
    with torch.no_grad():
        for slot, rows in ((0, slice(0, 3)), (1, slice(3, 6))):
            torch.testing.assert_close(logits[rows], reference_cocoop_logits(client, backbone, image[rows], slot),
                                       rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- KgCoOp
def test_kgcoop_loss_is_ce_plus_weight_times_one_minus_mean_cosine(backbone):
    method = KgCoOp(hand_prompt="a photo of a {}, a type of pet.")
    assert method.kg_weight == 8.0 and KgCoOp(compat="flip").kg_weight == 1.0
    assert KgCoOp(compat="flip", weight=3.0).kg_weight == 3.0
    client = build(method, backbone)
    perturb(client)
    batch = batch_of(backbone)
    client.train()
    loss = client.training_step(batch)
    text = F.normalize(backbone.encode_prompts(client.tokens, client.prompt.ctx[0]).float(), dim=-1)
    hand = F.normalize(backbone.encode_text([f"a photo of a {c}, a type of pet." for c in CLASSES]).float(), dim=-1)
    logits = backbone.logit_scale * features_of(backbone, batch) @ text.t()
    cos = F.cosine_similarity(text, hand, dim=1, eps=1e-7)
    expected = F.cross_entropy(logits, batch["label"]) + 8.0 * (1.0 - cos.mean())
    torch.testing.assert_close(loss, expected.unsqueeze(0), rtol=1e-5, atol=1e-6)
    # the paper's squared distance is twice the code's term for unit vectors
    squared = build(KgCoOp(hand_prompt=method.hand_prompt, distance="squared_l2", weight=1.0), backbone)
    squared.load_state_dict(client.state_dict())
    term = squared.extra_loss(batch, None, squared.text_features())
    torch.testing.assert_close(term, (2.0 * (1.0 - cos.mean())).unsqueeze(0).detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- ProGrad
def test_prograd_context_init_puts_the_phrase_after_zeros(backbone):
    client = build(ProGrad(n_ctx=6, ctx_init="a photo of a"), backbone)
    ctx = client.prompt.ctx[0]
    assert torch.equal(ctx[:2], torch.zeros(2, backbone.ctx_dim))
    torch.testing.assert_close(ctx[2:], backbone.word_embeddings("a photo of a"))
    with pytest.raises(FedPromptError, match="n_ctx >= the phrase's token count"):
        build(ProGrad(n_ctx=2, ctx_init="a photo of a"), backbone)


def prograd_setup(backbone, compat="paper", weight=1.0):
    client = build(ProGrad(n_ctx=4, ctx_init=None, teacher_prompt="a type of pet, a photo of a {}.", compat=compat,
                           weight=weight), backbone, slots=3)
    perturb(client, scale=0.5)
    batch = batch_of(backbone, n=6, owner=[0, 0, 0, 1, 1, 1], slots=[0, 2])  # slot 1 idle
    return client, batch


def test_prograd_losses_are_ce_and_soft_target_distillation(backbone):
    client, batch = prograd_setup(backbone)
    client.train()
    losses = client.training_step(batch)
    image = features_of(backbone, batch)
    teacher_text = F.normalize(backbone.encode_text([f"a type of pet, a photo of a {c}." for c in CLASSES]).float(),
                               dim=-1)
    for pos, slot, rows in ((0, 0, slice(0, 3)), (1, 2, slice(3, 6))):
        text = F.normalize(backbone.encode_prompts(client.tokens, client.prompt.ctx[slot]).float(), dim=-1)
        z = backbone.logit_scale * image[rows] @ text.t()
        z_zs = backbone.logit_scale * image[rows] @ teacher_text.t()
        kd = (-(F.softmax(z_zs, -1) * F.log_softmax(z, -1)).sum(1)).mean()
        torch.testing.assert_close(losses["ce"][pos], F.cross_entropy(z, batch["label"][rows]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses["kd"][pos], kd, rtol=1e-5, atol=1e-6)


def official_projection(a_grad: torch.Tensor, b_grad: torch.Tensor, lambda_: float) -> torch.Tensor:
    """Dassl.ProGrad's ``prograd_backward_and_update`` rule for one parameter tensor (one client's slice)."""
    b_norm = b_grad / torch.linalg.norm(b_grad)
    a_norm = a_grad / torch.linalg.norm(a_grad)
    if torch.dot(a_norm.flatten(), b_norm.flatten()) < 0:
        return a_grad - lambda_ * torch.dot(a_grad.flatten(), b_norm.flatten()) * b_norm
    return a_grad


@pytest.mark.parametrize("weight", [1.0, 0.8])
def test_prograd_backward_projects_each_client_on_its_own_gradients(backbone, weight):
    client, batch = prograd_setup(backbone, weight=weight)
    client.train()
    losses = client.training_step(batch)
    ctx = client.prompt.ctx
    g_ce = torch.autograd.grad(losses["ce"].sum(), ctx, retain_graph=True)[0]
    g_kd = torch.autograd.grad(losses["kd"].sum(), ctx, retain_graph=True)[0]
    client.backward(losses, lambda t, **kw: t.backward(**kw))
    conflicts = []
    for slot in (0, 2):
        expected = official_projection(g_ce[slot], g_kd[slot], weight)
        torch.testing.assert_close(ctx.grad[slot], expected, rtol=1e-5, atol=1e-8)
        conflicts.append(bool((g_ce[slot] * g_kd[slot]).sum() < 0))
        if conflicts[-1] and weight == 1.0:  # the projected gradient is orthogonal to the distillation gradient
            assert abs(float((ctx.grad[slot] * g_kd[slot]).sum())) <= 1e-5 * g_ce[slot].norm() * g_kd[slot].norm()
    assert conflicts == [False, True]  # one client keeps its CE gradient, the other's is projected
    assert torch.equal(ctx.grad[1], torch.zeros_like(ctx.grad[1]))  # the idle slot
    # both branches of the rule: a conflicting and a non-conflicting client
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    r = torch.tensor([[-1.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(project_conflicting(g, r, 1.0), torch.tensor([[0.5, 0.5], [1.0, 1.0]]))


def test_prograd_flip_adds_the_distillation_loss_without_projection(backbone):
    client, batch = prograd_setup(backbone, compat="flip", weight=0.5)
    client.train()
    losses = client.training_step(batch)
    ctx = client.prompt.ctx
    paper, _ = prograd_setup(backbone)
    paper.train()
    plain = paper.training_step(batch)
    torch.testing.assert_close(losses["kd"], 0.5 * plain["kd"].detach(), rtol=1e-6, atol=1e-7)
    expected = torch.autograd.grad((losses["ce"] + losses["kd"]).sum(), ctx, retain_graph=True)[0]
    client.backward(losses, lambda t, **kw: t.backward(**kw))
    torch.testing.assert_close(ctx.grad, expected)


# ------------------------------------------------------------------------------------------------------ PLOT
def test_plot_plans_and_logits_equal_pot_sinkhorn_per_image_and_class(backbone):
    client = build(PLOT(n_ctx=4, tol=1e-7, max_iter=2000), backbone, slots=2)
    perturb(client, scale=0.3)
    batch = batch_of(backbone, n=4, owner=[0, 0, 1, 1], slots=[0, 1])
    with torch.no_grad():
        logits = client(batch)
        _, tokens = backbone.encode_image_tokens(batch["image"])
        tokens = F.normalize(tokens.double(), dim=-1)
        n_patches = tokens.shape[1]
        for b in range(4):
            slot = batch["owner"][b].item()
            text = F.normalize(backbone.encode_prompts(client.tokens, client.prompt.ctx[slot]).double(), dim=-1)
            for c in range(len(CLASSES)):
                sim = tokens[b] @ text[:, c].t()  # [M, N]
                plan = ot.sinkhorn(np.full(n_patches, 1 / n_patches), np.full(4, 1 / 4), (1 - sim).numpy(), 0.1,
                                   numItermax=5000, stopThr=1e-12)
                expected = backbone.logit_scale * float((torch.from_numpy(plan) * sim).sum())
                assert logits[b, c].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_plot_transport_plans_match_pot_batched(backbone):
    """fedprompt.ot's balanced plans for a batch of PLOT problems [B, C, M, N] equal POT's per problem."""
    from fedprompt.ot import transport_plan

    g = torch.Generator().manual_seed(0)
    sim = torch.rand(3, 5, 16, 4, generator=g) * 0.4 + 0.2
    plan = transport_plan(1 - sim, torch.full((16,), 1 / 16), torch.full((4,), 1 / 4), kind="balanced", eps=0.1,
                          max_iter=1000, tol=1e-7)
    for b in range(3):
        for c in range(5):
            ref = ot.sinkhorn(np.full(16, 1 / 16), np.full(4, 1 / 4), (1 - sim[b, c]).double().numpy(), 0.1,
                              numItermax=5000, stopThr=1e-12)
            np.testing.assert_allclose(plan[b, c].numpy(), ref, atol=1e-6)
    torch.testing.assert_close(plan.sum(-2), torch.full((3, 5, 4), 0.25), atol=1e-6, rtol=0)


def test_plot_with_one_prompt_is_the_mean_patch_cosine_and_flip_defaults_to_it(backbone):
    assert PLOT().prompts == 4 and PLOT(compat="flip").prompts == 1 and PLOT(compat="flip", n_prompts=2).prompts == 2
    client = build(PLOT(n_ctx=4, compat="flip"), backbone)
    assert client.prompt.ctx.shape[1] == 1
    batch = batch_of(backbone)
    with torch.no_grad():
        logits = client(batch)
        _, tokens = backbone.encode_image_tokens(batch["image"])
        text = F.normalize(backbone.encode_prompts(client.tokens, client.prompt.ctx[0, 0]).float(), dim=-1)
        expected = backbone.logit_scale * torch.einsum("bme,ce->bc", F.normalize(tokens, dim=-1), text) / tokens.shape[1]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_plot_global_logit_adds_the_mean_prompt_coop_logit(backbone):
    method = PLOT(n_ctx=4, global_logit=True)
    assert method.image_inputs == ("features", "tokens") and PLOT().image_inputs == ("tokens",)
    client, plain = build(method, backbone), build(PLOT(n_ctx=4), backbone)
    batch = batch_of(backbone)
    with torch.no_grad():
        text = F.normalize(backbone.encode_prompts(client.tokens, client.prompt.ctx[0]).float(), dim=-1)
        pooled = features_of(backbone, batch) @ F.normalize(text.mean(0), dim=-1).t()
        torch.testing.assert_close(client(batch), plain(batch) + backbone.logit_scale * pooled, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ ProDA
def flip_refined_logits(image, text_features, labels, logit_scale):
    """FLiP's ProDACLIP.forward (training branch): text_features [C, S, E] of one client, the dense covariance."""
    n_class, n_prompt = text_features.shape[:2]
    text_mean = text_features.mean(dim=1)
    logits = logit_scale * image @ text_mean.t()
    centred = text_features - text_mean.unsqueeze(1)
    cov = centred.permute(2, 0, 1) @ centred.permute(2, 1, 0) / (n_prompt + 1)
    refined = torch.einsum("bd,dik->bik", image ** 2, cov)
    b = labels.shape[0]
    sigma = (refined[torch.arange(b), labels, labels].unsqueeze(-1) + refined[:, torch.arange(n_class),
                                                                              torch.arange(n_class)]
             - 2 * refined[torch.arange(b), labels, :])
    return logits + 0.5 * logit_scale ** 2 * sigma


def test_proda_refined_logits_equal_flip_dense_covariance():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    feats = F.normalize(torch.randn(6, 3, 5, 8, generator=g, dtype=torch.float64), dim=-1)  # own per image
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    ours = refined_logits(image, feats, labels, 100.0)
    for b in range(6):
        expected = flip_refined_logits(image[b:b + 1], feats[b].transpose(0, 1), labels[b:b + 1], 100.0)
        torch.testing.assert_close(ours[b:b + 1], expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose(ours[torch.arange(6), labels], 100.0 * (image * feats.mean(1)[torch.arange(6), labels]).sum(-1))


def test_proda_orthogonality_loss_is_the_mean_off_diagonal_abs_cosine():
    g = torch.Generator().manual_seed(1)
    u = F.normalize(torch.randn(2, 4, 8, generator=g), dim=-1)
    for a in range(2):
        dis = u[a] @ u[a].t()
        expected = dis[~torch.eye(4, dtype=torch.bool)].abs().mean()
        torch.testing.assert_close(orthogonality_loss(u)[a], expected)


def test_proda_orthogonality_loss_needs_prompts_that_start_apart(backbone):
    """Prompts all started from the same words have identical class-agnostic features: L_so sits at 1 with no
    gradient (why configs/offline/proda_pacs.yaml starts them at random, fedprompt's default)."""
    def l_so(client):
        ctx = client.prompt.ctx[0].detach().clone().requires_grad_(True)
        agnostic = backbone.encode_prompts(client.frozen("agnostic"), ctx.unsqueeze(0))[..., 0, :]
        loss = orthogonality_loss(F.normalize(agnostic.float(), dim=-1))[0]
        return float(loss), float(torch.autograd.grad(loss, ctx)[0].norm())

    torch.manual_seed(0)
    same, same_grad = l_so(ProDA(n_prompts=8, n_ctx=4, ctx_init="a photo of a").build_client(backbone, CLASSES))
    apart, apart_grad = l_so(ProDA(n_prompts=8, n_ctx=4).build_client(backbone, CLASSES))
    assert same == pytest.approx(1.0, abs=1e-5) and same_grad < 1e-5
    assert apart < 0.99 and apart_grad > 1e-3


def test_proda_positions_build_the_front_middle_and_end_sentences(backbone):
    """With every context vector set to the placeholder's embedding, each position's features are those of the
    literal sentence (front "name X X X X.", middle "X X name X X.", end "X X X X name.")."""
    method = ProDA(n_prompts=4, prompt_batch=2, n_ctx=4)
    client = build(method, backbone)
    assert client.positions.tolist() == [0, 1, 2, 2]
    x = backbone.word_embeddings("X")[0]
    ctx = x.expand(1, 3, 4, x.shape[0])
    with torch.no_grad():
        feats = client.encode(ctx, torch.tensor([[0, 1, 2]]))[0]
        for pos, template in enumerate(["{} X X X X.", "X X {} X X.", "X X X X {}."]):
            expected = F.normalize(backbone.encode_text([template.format(c) for c in CLASSES]).float(), dim=-1)
            torch.testing.assert_close(feats[pos], expected, rtol=1e-4, atol=1e-5)


def test_proda_prompt_batches_cycle_through_a_permutation_per_client(backbone):
    method = ProDA(n_prompts=8, prompt_batch=2, n_ctx=4)
    client = build(method, backbone, slots=2)
    client.train()
    client.on_round_start(None)
    seen = {0: [], 1: []}
    ctx = client.prompt.ctx
    for step in range(8):
        with client.stepping(torch.tensor([0, 1]), seeds=[100 + step, 200 + step]):
            chosen = client.draw_batch(client.active(ctx))
        seen[0].append(chosen[0].tolist())
        seen[1].append(chosen[1].tolist())
    for slot in (0, 1):
        for cycle in (0, 1):  # every K / |S| = 4 steps each prompt once
            assert sorted(sum(seen[slot][4 * cycle:4 * cycle + 4], [])) == list(range(8))
    assert seen[0] != seen[1]
    # one client alone draws the same batches as in the pair (its own seeds and counter)
    alone = build(method, backbone, slots=1)
    alone.train()
    alone.on_round_start(None)
    for step in range(8):
        with alone.stepping(torch.tensor([0]), seeds=[200 + step]):
            assert alone.draw_batch(alone.active(alone.prompt.ctx))[0].tolist() == seen[1][step]


def test_proda_training_loss_and_the_mean_classifier(backbone):
    client = build(ProDA(n_prompts=4, prompt_batch=2, n_ctx=4), backbone)
    perturb(client, scale=0.3)
    batch = batch_of(backbone)
    image = features_of(backbone, batch)
    client.eval()
    with torch.no_grad():
        logits = client(batch)
        all_k = client.encode(client.prompt.ctx, client.positions.unsqueeze(0))[0]  # [K, C, E]
    torch.testing.assert_close(logits, backbone.logit_scale * image @ all_k.mean(0).t(), rtol=1e-5, atol=1e-5)
    client.train()
    client.on_round_start(None)
    with client.stepping(torch.tensor([0]), torch.zeros(4, dtype=torch.long), seeds=[7]):
        chosen = client.draw_batch(client.prompt.ctx)
    client.on_round_start(None)
    batch["seeds"] = [7]
    loss = client.training_step(batch)
    feats = all_k[chosen[0]].detach()  # the same prompts, features computed directly
    agnostic = F.normalize(backbone.encode_prompts(client.frozen("agnostic"), client.prompt.ctx[0])[:, 0].float(),
                           dim=-1)
    z = refined_logits(image, feats.expand(4, *feats.shape), batch["label"], backbone.logit_scale)
    expected = F.cross_entropy(z, batch["label"]) + orthogonality_loss(agnostic.unsqueeze(0))[0]
    torch.testing.assert_close(loss, expected.unsqueeze(0).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("limit, calls", [(10, 2), (15, 2), (1, 4)])
def test_proda_mean_classifier_in_chunks_equals_one_call(backbone, monkeypatch, limit, calls):
    """The K x C evaluation sentences split over the K prompts (at most ``EVAL_SENTENCES`` per call; at least one
    prompt per call) give the same mean classifier as one call over all K."""
    import fedprompt.methods.proda as proda
    client = build(ProDA(n_prompts=4, prompt_batch=2, n_ctx=4), backbone, slots=2)
    perturb(client, scale=0.3)
    client.eval()
    with torch.no_grad():
        ctx = client.prompt.ctx  # [2, K, n_ctx, D]: two active clients
        positions = client.positions.expand(2, -1)
        whole = client.encode(ctx, positions).mean(1)
        seen = []
        encode = client.encode
        monkeypatch.setattr(client, "encode", lambda c, p: seen.append(c.shape[1]) or encode(c, p))
        monkeypatch.setattr(proda, "EVAL_SENTENCES", limit * 2)  # per call: limit sentences per client
        chunked = client.mean_classifier(ctx, positions)
    assert len(seen) == calls and sum(seen) == 4
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_proda_flip_is_coop_with_one_end_prompt(backbone):
    method = ProDA(compat="flip", n_ctx=4)
    assert (method.prompts, method.batch_of_prompts) == (1, 1) and (ProDA().prompts, ProDA().batch_of_prompts) == (
        32, 4)
    client = build(method, backbone)
    batch = batch_of(backbone)
    client.train()
    loss = client.training_step({**batch, "seeds": [0]})
    text = F.normalize(backbone.encode_prompts(client.tokens, client.prompt.ctx[0, 0]).float(), dim=-1)
    z = backbone.logit_scale * features_of(backbone, batch) @ text.t()
    torch.testing.assert_close(loss, F.cross_entropy(z, batch["label"]).unsqueeze(0).detach(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("method, kwargs, message", [
    (CoCoOp, {"n_ctx": 0}, "method.n_ctx must be >= 1"),
    (CoCoOp, {"max_sentences": 0}, "method.max_sentences must be >= 1"),
    (CoCoOp, {"n_ctx": None, "ctx_init": None}, "method.n_ctx is null"),
    (KgCoOp, {"weight": -1.0}, "method.weight must be >= 0"),
    (KgCoOp, {"hand_prompt": "a photo"}, "method.hand_prompt must contain"),
    (KgCoOp, {"compat": "fl1p"}, "method.compat must be"),
    (KgCoOp, {"distance": "l1"}, "method.distance must be one of"),
    (ProGrad, {"weight": -0.1}, "method.weight must be >= 0"),
    (ProGrad, {"temperature": 0.0}, "method.temperature must be > 0"),
    (ProGrad, {"teacher_prompt": "{} {}"}, "method.teacher_prompt must contain"),
    (ProGrad, {"n_ctx": 0}, "method.n_ctx must be >= 1"),
    (PLOT, {"n_prompts": 0}, "method.n_prompts must be >= 1"),
    (PLOT, {"eps": 0.0}, "method.eps must be > 0"),
    (PLOT, {"max_iter": 0}, "method.max_iter must be >= 1"),
    (PLOT, {"tol": -1.0}, "method.tol must be >= 0"),
    (ProDA, {"n_prompts": 0}, "method.n_prompts must be >= 1"),
    (ProDA, {"prompt_batch": 0}, "method.prompt_batch must be >= 1"),
    (ProDA, {"n_prompts": 6, "prompt_batch": 4}, "method.prompt_batch must divide"),
    (ProDA, {"so_weight": -1.0}, "method.so_weight must be >= 0"),
])
def test_settings_are_range_checked_with_one_line_naming_them(method, kwargs, message):
    with pytest.raises(FedPromptError, match=message) as err:
        method(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_setting_on_the_command_line_stops_before_anything_loads(cli, tmp_path):
    from conftest import ROOT

    code, _, err = cli("fit", "--config", ROOT / "configs" / "smoke.yaml", "--method", "ProDA",
                       "--method.n_prompts", "6", "--method.prompt_batch", "4", "--out_dir", tmp_path / "run")
    assert code == 2 and "method.prompt_batch must divide the number of prompts K = 6" in err
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------------- federated runs
FEDERATED = {
    "CoCoOp": (CoCoOp(lr=0.05, max_sentences=12), ("prompt.ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                                                   "meta_net.linear2.weight", "meta_net.linear2.bias")),
    "KgCoOp": (KgCoOp(lr=0.05), ("prompt.ctx",)),
    "ProGrad": (ProGrad(n_ctx=4, lr=0.05), ("prompt.ctx",)),
    "PLOT": (PLOT(n_ctx=4, lr=0.05), ("prompt.ctx",)),
    "ProDA": (ProDA(n_prompts=4, prompt_batch=2, n_ctx=4, lr=0.05), ("prompt.ctx",)),
}


def sent_bytes(backbone, name: str) -> int:
    """The bytes one client uploads per round (fp32): every shared tensor."""
    e, d = backbone.embed_dim, backbone.ctx_dim
    h = max(1, e // 16)
    return 4 * {"CoCoOp": 4 * d + h * e + h + d * h + d, "KgCoOp": 4 * d, "ProGrad": 4 * d, "PLOT": 4 * 4 * d,
                "ProDA": 4 * 4 * d}[name]


@pytest.mark.parametrize("name", list(FEDERATED))
def test_federated_runs_share_everything_count_bytes_and_resume_to_the_same_result(backbone, tmp_path, name):
    method, keys = FEDERATED[name]
    full, cut = tmp_path / "full", tmp_path / "cut"
    tiny_fit(method, full, rounds=2)
    rows = read_rows(full)
    assert [r["round"] for r in rows] == [1, 2] and [len(r["clients"]) for r in rows] == [2, 1]
    per_client = sent_bytes(backbone, name)
    for row in rows:
        assert row["bytes_up"] == len(row["clients"]) * per_client
        assert row["bytes_down"] == len(row["clients"]) * per_client
        assert "global_acc" in row and math.isfinite(row["train_loss"])
    last = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(last["global"]) == set(keys)
    for state in last["clients"].values():  # everything is shared: every client holds the global model
        assert set(state) == set(keys)
        for key in keys:
            assert torch.equal(state[key], last["global"][key])
    first = torch.load(full / "checkpoints" / "round-0001.ckpt", weights_only=True)
    assert not torch.equal(first["global"]["prompt.ctx"], last["global"]["prompt.ctx"])  # it trained

    tiny_fit(method, cut, rounds=1)
    tiny_fit(method, cut, rounds=2, resume=cut / "checkpoints" / "last.ckpt")
    assert without_timings(read_rows(cut)) == without_timings(rows)
    resumed = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    for key in keys:
        assert torch.equal(resumed["global"][key], last["global"][key]), key


# ------------------------------------------------------------------------------------ the official model code
def test_official_model_code_gives_the_same_logits_loss_and_sgd_step():
    """benchmarks/parity_text_baselines.py: the official CoCoOp, KgCoOp, ProGrad (with its update rule) and PLOT
    model classes, read from local git mirrors, against fedprompt's clients on the same random CLIP weights and
    images (within 1e-5); skipped when the mirrors are absent (the repositories are never copied into fedprompt)."""
    ran = run_parity_script("parity_text_baselines")
    assert all(ran.values()), ran


def test_plots_parity_check_sees_the_optimal_transport():
    """The check's local features differ enough that fedprompt's PLOT at eps 0.11 (the official 0.1 + 10 %) fails."""
    assert run_parity_script("parity_text_baselines", methods=("PLOT",), plot_eps=0.11) == {"PLOT": False}
