"""pFedMoAP: the gated mixture against a transcription of the official attention and forward, the server's expert
selection, per-client downloads counted in bytes_down, the experts' text features once per download, resume."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, read_rows, without_timings
from fedprompt.federation.aggregators import state_bytes
from fedprompt.methods import PFedMoAP
from fedprompt.methods.pfedmoap import MixtureOfPromptsServer

SMOKE = str(ROOT / "configs" / "smoke.yaml")
TINY_FLAGS = ["--method", "PFedMoAP", "--method.n_ctx", "4", "--method.gating_dim", "8", "--method.gating_heads",
              "2", "--method.num_experts", "3", "--method.lr", "0.05"]


class OfficialAttention(nn.Module):
    """A transcription of the official ``MultiheadAttention`` (pfedmoap.py:429-471): no dropout, score scale
    ``scaling``, heads split as [batch, heads, seq, d_k]."""

    def __init__(self, dim, heads, scaling):
        super().__init__()
        self.heads, self.d_k, self.scaling = heads, dim // heads, scaling
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, x):
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.d_k).transpose(1, 2)

    def forward(self, q, k, v):
        q, k, v = self.split(self.W_q(q)), self.split(self.W_k(k)), self.split(self.W_v(v))
        probs = F.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scaling, dim=-1)
        out = torch.matmul(probs, v)
        b, h, s, d = out.shape
        return self.W_o(out.transpose(1, 2).contiguous().view(b, s, h * d))


def official_logits(image, text, nonlocal_text, gating, stride, lmbda, scale):
    """The official ``CustomCLIP.forward`` (pfedmoap.py:217-237) from normalised features: image [B, E], local text
    [C, E], the experts' normalised pooled text [X, C, g]."""
    def pool(t):
        return t[..., ::stride]

    local = scale * image @ text.t()
    q = pool(image).repeat(text.shape[0], 1, 1)  # [C, B, g]
    k = torch.stack([pool(text)] + list(nonlocal_text)).permute(1, 0, 2)  # [C, E, g]
    new = gating(q, k, k).permute(1, 2, 0)  # [B, g, C]
    return lmbda * local + scale * torch.bmm(pool(image).unsqueeze(1), new).squeeze(1)


def test_mixture_logits_equal_the_official_forward(tiny_backbone):
    method = PFedMoAP(n_ctx=4, gating_dim=8, gating_heads=2, num_experts=4)
    torch.manual_seed(0)
    client = method.build_client(tiny_backbone, ["cat", "dog", "car", "tree", "boat"], slots=2)
    with torch.no_grad():  # slot 1: a client with 2 experts (the third unset), other weights than slot 0
        client.prompt.ctx.normal_(0, 0.02)
        client.gating.weight[1].normal_(0, 0.3)
        client.gating.bias[1].normal_(0, 0.1)
        client.experts.ctx[1, :2].normal_(0, 0.02)
        client.experts.valid[1, :2] = True
    client.eval()
    image = F.normalize(torch.randn(6, tiny_backbone.embed_dim), dim=-1)
    batch = {"features": image, "label": torch.zeros(6, dtype=torch.long),
             "slots": torch.tensor([1]), "owner": torch.zeros(6, dtype=torch.long)}
    ours = client.predict_logits(batch)
    gating = OfficialAttention(8, 2, 10.0)
    with torch.no_grad():
        for i, layer in enumerate((gating.W_q, gating.W_k, gating.W_v, gating.W_o)):
            layer.weight.copy_(client.gating.weight[1, i])
            layer.bias.copy_(client.gating.bias[1, i])
        with client.stepping(torch.tensor([1])):
            text = client.encode_context(client.active(client.prompt.ctx))[0]
            experts = client.encode_context(client.experts.ctx[1, :2])[..., :: client.stride]
    reference = official_logits(image, text, experts, gating, client.stride, 0.5, tiny_backbone.logit_scale)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # a client without experts: the local logits alone
    batch["slots"] = torch.tensor([0])
    with torch.no_grad(), client.stepping(torch.tensor([0])):
        local = tiny_backbone.logit_scale * image @ client.encode_context(client.active(client.prompt.ctx))[0].t()
    torch.testing.assert_close(client.predict_logits(batch), local, rtol=1e-5, atol=1e-5)


def _uploads(values: dict[int, float]) -> dict[int, dict[str, torch.Tensor]]:
    return {cid: {"prompt.ctx": torch.full((2, 3), v)} for cid, v in values.items()}


def test_server_sends_the_nearest_prompts_and_counts_them():
    server = MixtureOfPromptsServer(num_experts=3, selection="knn")
    server.seed = 0
    assert set(server.download({"prompt.ctx": torch.zeros(2, 3)}, 0)) == {"prompt.ctx"}  # no expert yet
    glob = server.aggregate(_uploads({0: 0.0, 1: 5.0, 2: 0.5, 3: -0.2, 4: 9.0}), {c: 1 for c in range(5)}, 1)
    assert server.experts_for(0) == [3, 2] and server.experts_for(4) == [1, 2]  # nearest first
    assert server.experts_for(7) == []  # never trained: no experts (the official first round of a client)
    sent = server.download(glob, 0)
    torch.testing.assert_close(sent["experts.ctx"], torch.stack([torch.full((2, 3), -0.2), torch.full((2, 3), 0.5)]))
    assert state_bytes(sent) == 3 * 6 * 4  # the global prompt and K_e - 1 = 2 experts
    state = {"prompt.ctx": torch.ones(2, 3), "experts.ctx": torch.zeros(4, 2, 3), "experts.valid":
             torch.zeros(4, dtype=torch.bool)}
    applied = server.apply(state, sent, 0)
    assert torch.equal(applied["prompt.ctx"], torch.ones(2, 3))  # a trained client keeps its own prompt
    assert applied["experts.valid"].tolist() == [True, True, False, False]
    fresh = server.apply(state, server.download(glob, 7), 7)
    assert torch.equal(fresh["prompt.ctx"], glob["prompt.ctx"]) and not fresh["experts.valid"].any()
    restored = MixtureOfPromptsServer(num_experts=3)
    restored.load_state_dict(server.state_dict())
    assert restored.experts_for(0) == [3, 2]


def test_fixed_order_is_the_same_every_round_and_random_is_not():
    fixed, rand = MixtureOfPromptsServer(3, "fixed_order"), MixtureOfPromptsServer(3, "random")
    picks = {"fixed": [], "random": []}
    for round_idx in range(1, 7):
        uploads = _uploads({c: float(torch.rand(())) for c in range(8)})
        for name, server in (("fixed", fixed), ("random", rand)):
            server.aggregate(uploads, {c: 1 for c in range(8)}, round_idx)
            picks[name].append(server.experts_for(0))
    assert len({tuple(p) for p in picks["fixed"]}) == 1 and 0 not in picks["fixed"][0]
    assert len({tuple(p) for p in picks["random"]}) > 1


def test_federated_run_bytes_gating_kept_and_resume(cli, tmp_path):
    """Round 1: every client gets the global prompt only; later rounds the global prompt plus K_e - 1 = 2 experts
    (per sampled client); only the prompt goes up; the gating never leaves a client and trains from a client's
    second round; a resumed run equals the uninterrupted one (the server's pool is in the checkpoint)."""
    flags = [*TINY_FLAGS, "--federation.fraction", "0.5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli("fit", "--config", SMOKE, "--out_dir", full, "--federation.rounds", "3", *flags)[0] == 0
    assert cli("fit", "--config", SMOKE, "--out_dir", cut, "--federation.rounds", "2", *flags)[0] == 0
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", cut, "--federation.rounds", "3", *flags, "--resume",
                       cut / "checkpoints" / "last.ckpt")
    assert code == 0, err
    rows = without_timings(read_rows(full))
    assert without_timings(read_rows(cut)) == rows
    prompt = 4 * 64 * 4  # n_ctx x token width x fp32 of the tiny model
    assert [r["bytes_up"] for r in rows] == [len(r["clients"]) * prompt for r in rows]
    assert rows[0]["bytes_down"] == 4 * prompt and rows[1]["bytes_down"] == len(rows[1]["clients"]) * 3 * prompt
    ckpt = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["global"]) == {"prompt.ctx"}
    assert sorted(ckpt["aggregator"]["latest"]) == [0, 1, 2, 3]
    gatings = [ckpt["clients"][c]["gating.weight"] for c in range(4)]
    assert any(not torch.equal(gatings[0], g) for g in gatings[1:])  # personal gatings
    other = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    for cid in range(4):
        for key, value in ckpt["clients"][cid].items():
            assert torch.equal(value, other["clients"][cid][key]), key


def test_experts_are_encoded_once_per_download_not_per_step(monkeypatch):
    """One local round of 5 steps with 2 experts: the encoder sees the experts' prompts once (at the round's start)
    and the local prompt once per step. The spy sits on a backbone of this test's own (an instance attribute), so
    no other test's use of the session backbone can hide the calls from it."""
    from fedprompt.backbone import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone("fedprompt-tiny", None)
    method = PFedMoAP(n_ctx=4, gating_dim=8, gating_heads=2, num_experts=3, lr=0.05, lr_schedule="constant",
                      warmup_epochs=0)
    torch.manual_seed(0)
    client = method.build_client(backbone, ["cat", "dog", "car"], slots=1)
    assert client.backbone is backbone
    with torch.no_grad():
        client.experts.ctx[0].normal_(0, 0.02)
        client.experts.valid[0] = True
    calls = []
    original = backbone.encode_prompts
    monkeypatch.setattr(backbone, "encode_prompts", lambda tokens, ctx, *a, **kw:
                        calls.append(tuple(ctx.shape[:-2])) or original(tokens, ctx, *a, **kw))
    client.on_round_start({"prompt.ctx": torch.zeros(4, 64)})
    optimizer = client.configure_optimizers()
    client.train()
    before = client.gating.weight.detach().clone()
    for _ in range(5):
        batch = {"features": torch.randn(4, 32), "label": torch.tensor([0, 1, 2, 0])}
        loss = client.training_step(batch)
        client.backward(loss, lambda t, **kw: t.backward(**kw))
        optimizer.step()
        optimizer.zero_grad()
    assert calls == [(1, 2)] + [(1,)] * 5  # [slots, experts] once, then [active clients] per step
    assert not torch.equal(before, client.gating.weight)  # the gating trained (own constant lr 0.01)


def test_compat_official_is_one_token_from_the_word_false(tiny_backbone):
    method = PFedMoAP(compat="official", gating_dim=8, gating_heads=2)
    client = method.build_client(tiny_backbone, ["cat", "dog"])
    assert client.prompt.ctx.shape == (1, 1, 64)
    torch.testing.assert_close(client.prompt.ctx[0], tiny_backbone.word_embeddings("false").float())
    assert method.build_aggregator().selection == "fixed_order"


def test_bad_settings_are_one_line(cli, tmp_path):
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path, "--method", "PFedMoAP",
                       "--method.gating_dim", "128")  # 128 > width 32 (left null, it would be derived: 32)
    assert code == 2 and "method.gating_dim" in err.strip().splitlines()[-1], err
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path, "--method", "PFedMoAP",
                       "--method.gating_heads", "3")
    assert code == 2 and "method.gating_heads" in err.strip().splitlines()[-1], err


def test_compat_official_trains_each_round_in_the_release_order(cli, tmp_path, monkeypatch):
    """Under compat official a round's clients train one at a time and each receives, just before its local round,
    its experts from the pool as it is then: the prompts uploaded by the clients before it in the same round, the
    previous rounds' prompts of the others. The pool each client sees is rebuilt here from the uploads in the order
    they were shared; under compat fixed every client of a round sees the pool of the round's start."""
    from fedprompt.federation.clients import ClientPool

    seen, pool, expected = [], {}, []
    train, share = ClientPool.train, MixtureOfPromptsServer.share

    def spy_train(self, cids, round_idx, global_state, on_group=None):
        for cid in cids:
            state = self.states[cid]
            seen.append((round_idx, cid, state["experts.ctx"][state["experts.valid"]].clone()))
            reference = MixtureOfPromptsServer(3, "fixed_order")
            reference.seed, reference.latest = self.aggregator.seed, dict(pool)
            expected.append(torch.stack([pool[j] for j in reference.experts_for(cid)]) if reference.experts_for(cid)
                            else state["experts.ctx"][:0])
        return train(self, cids, round_idx, global_state, on_group)

    def spy_share(self, client_id, upload):
        pool[client_id] = upload[self.key].clone()
        share(self, client_id, upload)

    monkeypatch.setattr(ClientPool, "train", spy_train)
    monkeypatch.setattr(MixtureOfPromptsServer, "share", spy_share)
    code, _, err = cli("fit", "--config", SMOKE, "--out_dir", tmp_path / "run", "--federation.rounds", "3",
                       *TINY_FLAGS, "--method.compat", "official")
    assert code == 0, err
    assert [(r, c) for r, c, _ in seen] == [(r, c) for r in (1, 2, 3) for c in range(4)]  # one at a time, in order
    for (round_idx, cid, got), want in zip(seen, expected):
        assert torch.equal(got, want), (round_idx, cid)
    assert len(seen[5][2]) == 2  # round 2's client 1: experts 0 (retrained in round 2) and another
    rows = read_rows(tmp_path / "run")
    assert [r["parallel_clients"] for r in rows] == [1, 1, 1]


def test_compat_official_order_refuses_what_cannot_run_it(cli, tmp_path):
    """K > 1, several devices and the Flower runtime cannot train one client after another: one line, no folder."""
    base = ["fit", "--config", SMOKE, "--out_dir", tmp_path / "run", *TINY_FLAGS, "--method.compat", "official"]
    for extra, named in ((["--federation.parallel_clients", "2"], "--federation.parallel_clients 1"),
                         (["--runtime", "flower"], "--runtime fabric"),
                         (["--fabric.devices", "2"], "--fabric.devices 1")):
        code, _, err = cli(*base, *extra)
        line = err.strip().splitlines()[-1]
        assert code == 2 and named in line and "one at a time" in line, err
        assert not (tmp_path / "run").exists()
