"""DP-FPL: per-example gradients against one backward per image, per-example clipping, the noise's standard
deviation and seeds, the factorisation and its gradient rule, the released noise formula, record-level accounting
that counts every step, resume exactness with noise; compat official: the momentum kept across rounds (in the
client state, resumed with it) and the server noise that enters it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, read_rows, without_timings
from fedprompt.methods import DPFPL
from fedprompt.methods.dpfpl import factorize, local_gradient, released_noise_scale

SMOKE = str(ROOT / "configs" / "smoke.yaml")
CLASSES = ["cat", "dog", "car", "tree", "boat"]
COUNTS = [5, 3]  # two active clients with unequal batches


def _client(tiny_backbone, **settings):
    torch.manual_seed(0)
    client = DPFPL(n_ctx=4, rank=2, **settings).build_client(tiny_backbone, CLASSES, slots=3)
    with torch.no_grad():  # different prompts per slot
        client.global_prompt.ctx.normal_(0, 0.05)
        client.local_prompt.ctx.normal_(0, 0.05)
    client.train()
    return client


def _batch(seeds=(11, 22)):
    generator = torch.Generator().manual_seed(0)
    n = sum(COUNTS)
    return {"features": F.normalize(torch.randn(n, 32, generator=generator), dim=-1),
            "label": torch.randint(0, len(CLASSES), (n,), generator=generator),
            "slots": torch.tensor([2, 0]), "owner": torch.tensor([0] * COUNTS[0] + [1] * COUNTS[1]),
            "counts": torch.tensor(COUNTS), "seeds": list(seeds)}


def _gradients(client, batch):
    client.zero_grad(set_to_none=True)
    losses = client.training_step(batch)
    with client.stepping_for(batch):  # as the engine does
        client.backward(losses, lambda t, **kw: t.backward(**kw))
    return client.global_prompt.ctx.grad.clone(), client.local_prompt.ctx.grad.clone()


def _reference_per_example(client, batch):
    """d loss_i / d p for every image, one backward each (p = p_G + p_L of the image's own client)."""
    grads = []
    for i in range(batch["label"].shape[0]):
        slot = batch["slots"][batch["owner"][i]]
        ctx = (client.global_prompt.ctx[slot] + client.local_prompt.ctx[slot]).detach().requires_grad_(True)
        with client.stepping(slot.view(1)):
            text = client.encode_context(ctx.unsqueeze(0))[0]
        logits = client._logit_scale * batch["features"][i] @ text.t()
        loss = F.cross_entropy(logits.unsqueeze(0), batch["label"][i].view(1))
        grads.append(torch.autograd.grad(loss, ctx)[0])
    return torch.stack(grads)


def test_per_example_gradients_equal_one_backward_per_image(tiny_backbone):
    client = _client(tiny_backbone, noise_multiplier=1.0)
    batch = _batch()
    losses = client.training_step(batch)
    saved = client._saved
    with client.stepping_for(batch):
        ours = client.per_example_grads(saved)
    reference = _reference_per_example(client, batch)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())
    client._saved = None
    assert losses.shape == (2,)


def _expected(client, batch, clip):
    """The clipped per-example sums (per client) and the factors, from the one-backward-per-image reference."""
    grads = _reference_per_example(client, batch)
    out = []
    start = 0
    for pos, (slot, count) in enumerate(zip(batch["slots"].tolist(), COUNTS)):
        generator = torch.Generator().manual_seed(batch["seeds"][pos])
        v0 = torch.randn(64, 2, generator=generator)  # the client's own draw, first in its stream
        u, v = factorize(client.local_prompt.ctx[slot].detach().unsqueeze(0), v0.unsqueeze(0))
        u, v = u[0], v[0]
        g = grads[start:start + count]
        norms = (g.pow(2).sum((1, 2)) + (g @ v.t()).pow(2).sum((1, 2)) + (u.t() @ g).pow(2).sum((1, 2))).sqrt()
        factors = (clip / norms).clamp(max=1.0)
        out.append((slot, (g * factors.view(-1, 1, 1)).sum(0), u, v, norms))
        start += count
    return out


def test_clipping_is_per_example_and_flat_over_the_global_and_factor_gradients(tiny_backbone):
    """With negligible noise the global gradient is the mean of the per-example gradients, each scaled to the flat
    norm C over (G_i, G_i v^T, u^T G_i); the local gradient is the released rule of the clipped factor sums."""
    clip = 0.05
    client = _client(tiny_backbone, noise_multiplier=1e-12, clip_norm=clip)
    batch = _batch()
    g_global, g_local = _gradients(client, batch)
    expected = _expected(client, batch, clip)
    assert any(bool((norms > clip).any()) for *_, norms in expected)  # the bound binds for some images
    for (slot, summed, u, v, _), count in zip(expected, COUNTS):
        torch.testing.assert_close(g_global[slot], summed / count, rtol=1e-4, atol=1e-7)
        rule = local_gradient((summed @ v.t() / count)[None], (u.t() @ summed / count)[None], u[None], v[None], 0.1)
        torch.testing.assert_close(g_local[slot], rule[0], rtol=1e-4, atol=1e-7)
    assert torch.equal(g_global[1], torch.zeros_like(g_global[1]))  # an inactive slot gets nothing


def test_noise_std_is_z_clip_over_the_batch_and_follows_each_clients_seed(tiny_backbone):
    z, clip = 1.5, 0.2
    client = _client(tiny_backbone, noise_multiplier=z, clip_norm=clip)
    residuals = []
    for draw in range(12):
        batch = _batch(seeds=(100 + draw, 200 + draw))
        g_global, _ = _gradients(client, batch)
        for (slot, summed, *_), count in zip(_expected(client, batch, clip), COUNTS):
            residuals.append((g_global[slot] * count - summed).flatten())
    noise = torch.cat(residuals)  # 12 draws x 2 clients x 4 x 64 entries
    assert noise.std().item() == pytest.approx(z * clip, rel=0.04)
    assert abs(noise.mean().item()) < 0.01
    a, _ = _gradients(client, _batch(seeds=(1, 2)))
    b, _ = _gradients(client, _batch(seeds=(1, 2)))
    c, _ = _gradients(client, _batch(seeds=(1, 3)))
    assert torch.equal(a, b)  # the same seeds: the same noise (resume-exact)
    assert torch.equal(a[2], c[2]) and not torch.equal(a[0], c[0])  # each client's noise is its own seed's


def test_factorisation_is_orthonormal_and_reconstructs_the_local_prompt():
    torch.manual_seed(0)
    local = torch.randn(3, 16, 512) * 0.02
    u, v = factorize(local, torch.randn(3, 512, 8))
    eye = torch.eye(8).expand(3, 8, 8)
    torch.testing.assert_close(u.transpose(1, 2) @ u, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(v @ v.transpose(1, 2), eye, atol=1e-5, rtol=0)
    singular = torch.linalg.svdvals(u @ v)  # r unit singular values, the rest 0
    torch.testing.assert_close(singular[:, :8], torch.ones(3, 8), atol=1e-5, rtol=0)
    assert singular[:, 8:].abs().max() < 1e-5
    residual = local - u @ v
    torch.testing.assert_close(u @ v + residual, local)  # p_G + u v + res = p_G + p_L
    grad = torch.randn(3, 16, 512)
    rule = local_gradient(grad @ v.transpose(1, 2), u.transpose(1, 2) @ grad, u, v, 0.1)
    pu, pv = u @ u.transpose(1, 2), v.transpose(1, 2) @ v
    torch.testing.assert_close(rule, (grad @ pv + pu @ grad + pu @ grad @ pv) / 10, rtol=1e-4, atol=1e-6)


def test_released_noise_formula_values():
    """specs section 4.3: epsilon 0.4, C 10, B 32, T 100, delta 1e-5: sigma 84.8, per-entry std 26.5."""
    s = released_noise_scale(0.4, 100, 1e-5, 10.0, 32)
    assert s == pytest.approx(26.5, abs=0.05) and s * 32 / 10 == pytest.approx(84.8, abs=0.05)
    assert released_noise_scale(0.0, 100, 1e-5, 10.0, 32) == 0.0


FLAGS = ["--method", "DPFPL", "--method.n_ctx", "4", "--method.rank", "2", "--method.noise_multiplier", "0.7",
         "--method.clip_norm", "0.5", "--method.lr", "0.1", "--federation.fraction", "0.5", "--train.batch_size", "4"]


def test_record_epsilon_counts_every_step_and_a_noisy_run_resumes_exactly(cli, tmp_path):
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli("fit", "--config", SMOKE, "--out_dir", full, "--federation.rounds", "3", *FLAGS)[0] == 0
    assert cli("fit", "--config", SMOKE, "--out_dir", cut, "--federation.rounds", "2", *FLAGS)[0] == 0
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", cut, "--federation.rounds", "3", *FLAGS, "--resume",
                       cut / "checkpoints" / "last.ckpt")
    assert code == 0, err
    rows = without_timings(read_rows(full))
    assert without_timings(read_rows(cut)) == rows
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    for cid in a["clients"]:
        assert torch.equal(a["clients"][cid]["local_prompt.ctx"], b["clients"][cid]["local_prompt.ctx"])
    # the smoke split has 15/19/14/16 train images: ceil(n / 4) steps per round, at q = 4 / n
    sizes = [15, 19, 14, 16]
    trained = {cid: sum(cid in r["clients"] for r in rows) for cid in range(4)}
    worst = max(RdpAccountant().compose(SelfComposedDpEvent(PoissonSampledDpEvent(4 / n, GaussianDpEvent(0.7)),
                                                            trained[cid] * math.ceil(n / 4))).get_epsilon(1e-5)
                for cid, n in enumerate(sizes))
    assert rows[-1]["record_epsilon"] == pytest.approx(worst)
    assert rows[0]["record_epsilon"] < rows[-1]["record_epsilon"]
    assert "epsilon" not in rows[-1]  # no client-level DP unless the dp group is set


OFFICIAL = ["--method", "DPFPL", "--method.n_ctx", "4", "--method.rank", "2", "--method.compat", "official",
            "--method.official_noise", "0.4", "--method.lr", "0.001", "--train.local_steps", "1"]


def test_compat_official_runs_with_the_released_clipping_and_server_noise_and_resumes_exactly(cli, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", full, "--federation.rounds", "3", *OFFICIAL)
    assert code == 0, err
    rows = read_rows(full)
    assert "record_epsilon" not in rows[-1]  # batch-level clipping: no record-level guarantee to report
    ckpt = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    method = DPFPL(n_ctx=4, rank=2, compat="official", official_noise=0.4, lr=0.001)
    server = method.build_aggregator()  # xi ~ N(0, (s / K)^2) per entry of the gradient (K: the clients)
    assert server.std_times_clients == pytest.approx(26.5, rel=0.01) and server.lr == 0.001
    noise = ckpt["global"]["noise.global_prompt.ctx"]
    assert noise.std().item() == pytest.approx(26.5 / len(rows[-1]["clients"]), rel=0.3)
    for state in ckpt["clients"].values():  # each client's momentum outlives its optimizer
        assert set(state) == {"global_prompt.ctx", "local_prompt.ctx", "momentum.global_prompt",
                              "momentum.local_prompt"}
        assert state["momentum.local_prompt"].abs().sum() > 0
    # the momentum is part of the client state: a cut run resumes to the same rows and states
    assert cli("fit", "--config", SMOKE, "--out_dir", cut, "--federation.rounds", "2", *OFFICIAL)[0] == 0
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", cut, "--federation.rounds", "3", *OFFICIAL,
                       "--resume", cut / "checkpoints" / "last.ckpt")
    assert code == 0, err
    assert without_timings(read_rows(cut)) == without_timings(rows)
    resumed = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    for cid, state in ckpt["clients"].items():
        for key, value in state.items():
            assert torch.equal(resumed["clients"][cid][key], value), (cid, key)


def test_compat_official_keeps_each_clients_momentum_across_rounds(tiny_backbone):
    """One optimizer per round (as the engine builds them) steps as one torch SGD kept over the rounds."""
    client = _client(tiny_backbone, compat="official", lr=0.1)
    reference = [p.detach().clone().requires_grad_(True) for p in (client.global_prompt.ctx, client.local_prompt.ctx)]
    sgd = torch.optim.SGD(reference, lr=0.1, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):  # three rounds of one step each
        optimizer = client.configure_optimizers()
        grads = [torch.randn(p.shape, generator=generator) for p in reference]
        for p, r, g in zip((client.global_prompt.ctx, client.local_prompt.ctx), reference, grads):
            p.grad, r.grad = g.clone(), g.clone()
        optimizer.set_slots([True] * 3, torch.full((3,), 0.1, dtype=torch.float64))
        optimizer.step()
        sgd.step()
    torch.testing.assert_close(client.global_prompt.ctx.detach(), reference[0].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(client.local_prompt.ctx.detach(), reference[1].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(client.momentum.local_prompt, sgd.state[reference[1]]["momentum_buffer"])
    assert "momentum.global_prompt" not in _client(tiny_backbone).state_dict()  # fixed: a fresh optimizer


def test_released_noise_enters_every_clients_momentum():
    server = DPFPL(n_ctx=4, rank=2, compat="official", lr=0.01).build_aggregator()
    uploads = {cid: {"global_prompt.ctx": torch.full((4, 8), float(cid))} for cid in range(3)}
    merged = server.aggregate(uploads, {cid: 1 for cid in range(3)}, round_idx=2)
    xi = merged["noise.global_prompt.ctx"]
    assert xi.std().item() == pytest.approx(server.std_times_clients / 3, rel=0.3)
    torch.testing.assert_close(merged["global_prompt.ctx"], torch.ones(4, 8) - 0.01 * xi)
    state = {"global_prompt.ctx": torch.zeros(4, 8), "local_prompt.ctx": torch.zeros(4, 8),
             "momentum.global_prompt": torch.ones(4, 8), "momentum.local_prompt": torch.ones(4, 8)}
    new = server.apply(state, server.download(merged, 0), 0)
    assert set(new) == set(state)
    torch.testing.assert_close(new["momentum.global_prompt"], 1 + xi)
    assert torch.equal(new["momentum.local_prompt"], state["momentum.local_prompt"])
