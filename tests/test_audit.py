"""The membership-inference audit (issue 29): the attacks' scores and figures against direct computations, the
split and the shadows' halves, a whole audit of a smoke run (its files, the run's own files unchanged, one line for
every bad setting), and the audit's AUC near 0.5 on prompts that never saw the members and clearly above it on
prompts trained to memorise them (the offline stand-in model; skipped without it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EFFL0, PACS, ROOT, one_line, require, snapshot
from fedprompt.audit import (attack_scores, audit_clients, audit_split, gaussian_fit, logit_confidence,
                             roc_figures, shadow_keep)

SMOKE = str(ROOT / "configs" / "smoke.yaml")


# ------------------------------------------------------------------------------------------------ the figures
def pairwise_auc(scores, members) -> float:
    """The AUC by its definition: P(member score > non-member score) + P(equal) / 2."""
    pos, neg = scores[members], scores[~members]
    greater = (pos[:, None] > neg[None, :]).double().mean()
    equal = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + equal / 2)


def tpr_at(scores, members, fpr: float) -> float:
    """The best TPR over thresholds whose FPR is at most ``fpr`` (by sweeping every threshold)."""
    best = 0.0
    for t in torch.cat([scores.unique(), torch.tensor([math_inf()])]):
        predicted = scores >= t
        if predicted[~members].double().mean() <= fpr + 1e-12:
            best = max(best, float(predicted[members].double().mean()))
    return best


def math_inf() -> float:
    return float("inf")


def test_roc_figures_equal_their_definitions():
    generator = torch.Generator().manual_seed(0)
    members = torch.rand(400, generator=generator) < 0.5
    scores = torch.randn(400, generator=generator, dtype=torch.float64) + members * 1.0
    scores[:20] = scores[20:40]  # ties count half
    got = roc_figures(scores, members)
    assert got["auc"] == pytest.approx(pairwise_auc(scores, members), abs=1e-6)  # torchmetrics: float32
    assert got["tpr_at_0.01_fpr"] == pytest.approx(tpr_at(scores, members, 0.01))
    assert got["tpr_at_0.001_fpr"] == pytest.approx(tpr_at(scores, members, 0.001))
    assert got["members"] == int(members.sum()) and got["non_members"] == int((~members).sum())
    huge = scores * 1e6  # no saturation: ranks, not probabilities
    assert roc_figures(huge, members)["auc"] == got["auc"]
    assert roc_figures(-scores, members)["auc"] == pytest.approx(1 - got["auc"], abs=1e-6)
    assert roc_figures(scores[members], members[members])["auc"] is None


def test_lira_is_the_gaussian_likelihood_ratio_of_in_and_out_shadows():
    from scipy.stats import norm

    generator = torch.Generator().manual_seed(1)
    shadow = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    keep = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [1, 1, 0, 0, 1], [0, 0, 1, 1, 0], [1, 0, 0, 1, 1],
                         [0, 1, 1, 0, 0]], dtype=torch.bool)
    phi = torch.randn(5, generator=generator, dtype=torch.float64)
    loss = torch.rand(5, generator=generator, dtype=torch.float64)
    own = attack_scores(loss, phi, shadow, keep, "per_example")
    for n in range(5):
        ins, outs = shadow[keep[:, n], n].numpy(), shadow[~keep[:, n], n].numpy()
        expected = norm.logpdf(phi[n], ins.mean(), ins.std()) - norm.logpdf(phi[n], outs.mean(), outs.std())
        assert float(own["lira"][n]) == pytest.approx(expected, rel=1e-9)
        assert float(own["lira_offline"][n]) == pytest.approx((phi[n] - outs.mean()) / outs.std(), rel=1e-9)
    assert torch.equal(own["loss"], -loss)
    pooled = attack_scores(loss, phi, shadow, keep, "global")
    residuals = np.concatenate([shadow[keep[:, n], n].numpy() - shadow[keep[:, n], n].numpy().mean()
                                for n in range(5)])
    mean, std = gaussian_fit(shadow, keep, pooled=True)
    assert float(std[0]) == pytest.approx(np.sqrt((residuals ** 2).mean()), rel=1e-12) and len(set(std.tolist())) == 1
    assert set(attack_scores(loss, phi, shadow[:0], keep[:0])) == {"loss"} and pooled["lira"].shape == (5,)


def test_phi_is_the_log_odds_of_the_softmax():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 30.0]])
    labels = torch.tensor([0, 2])
    p = torch.softmax(logits.double(), 1)[torch.arange(2), labels]
    assert torch.allclose(logit_confidence(logits, labels)[:1], torch.log(p / (1 - p))[:1])
    assert float(logit_confidence(logits, labels)[1]) == pytest.approx(30 - np.log(2), rel=1e-12)  # no 1 - p = 0


def test_the_split_and_the_shadows_halves():
    from fedprompt.data import Synthetic

    splits = Synthetic(num_classes=4, train_per_class=4, test_per_class=2, num_domains=2).setup()
    examples = audit_split(splits.clients, seed=3)
    for client in splits.clients:
        mine = [e for e in examples if e.client == client.client_id]
        assert [e.sample for e in mine if e.member] == client.train
        outside = [e.sample for e in mine if not e.member]
        assert len(outside) == min(len(client.train), len(client.test)) and set(outside) <= set(client.test)
    keep = shadow_keep(examples, 6, seed=3)
    assert keep.shape == (6, len(examples)) and (keep.sum(0) == 3).all()
    assert torch.equal(keep, shadow_keep(examples, 6, seed=3)) and not torch.equal(keep, shadow_keep(examples, 6, 4))
    clients = audit_clients(splits, examples, keep)
    n = len(splits.clients)
    assert len(clients) == n * 7 and [c.client_id for c in clients] == list(range(n * 7))
    for s in range(6):
        for k in range(n):
            wanted = [e.sample for i, e in enumerate(examples) if e.client == k and keep[s, i]]
            assert clients[n + s * n + k].train == wanted and clients[n + s * n + k].test == clients[k].test


# ------------------------------------------------------------------------------------------------ a whole audit
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    from fedprompt.__main__ import main

    run = tmp_path_factory.mktemp("audit") / "run"
    main(["fit", "--config", SMOKE, "--log.logger", "none", "--out_dir", str(run)])
    return run


def test_an_audit_writes_its_folder_only_and_says_what_it_found(cli, smoke_run):
    before = snapshot(smoke_run)
    code, out, err = cli("audit", smoke_run, "--shadows", "2", "--fabric.accelerator", "cpu")
    assert code == 0, err
    after = snapshot(smoke_run)
    assert {k: v for k, v in after.items() if not k.startswith("audit/")} == before
    assert {"audit/result.json", "audit/split.json", "audit/scores.pt"} <= set(after)
    result = json.loads((smoke_run / "audit" / "result.json").read_text())
    assert set(result["attacks"]) == {"loss", "lira_offline", "lira"} and result["shadows"] == 2
    overall = result["attacks"]["lira"]["overall"]
    assert 0 <= overall["auc"] <= 1 and set(result["attacks"]["loss"]["clients"]) == set(result["clients"])
    split = json.loads((smoke_run / "audit" / "split.json").read_text())
    scores = torch.load(smoke_run / "audit" / "scores.pt", weights_only=True)
    count = sum(len(c["members"]) + len(c["non_members"]) for c in split["clients"])
    assert scores["shadow_phi"].shape == (2, count) and scores["member"].sum() == overall["members"]
    assert roc_figures(scores["score/lira"], scores["member"])["auc"] == overall["auc"]
    assert "audit of" in out and "lira" in out
    code, _, err = cli("audit", smoke_run, "--shadows", "0")
    assert code == 2 and "audit/result.json exists (an earlier audit); pass --overwrite true" in one_line(err)
    code, _, err = cli("audit", smoke_run, "--shadows", "0", "--overwrite", "true")
    assert code == 0, err
    assert set(json.loads((smoke_run / "audit" / "result.json").read_text())["attacks"]) == {"loss"}


@pytest.mark.parametrize("args, expected", [
    (["--shadows", "1"], "--shadows 1: LiRA needs shadows in which an example is in"),
    (["--shadows", "-2"], "--shadows must be >= 0, got -2"),
    (["--shadows", "2", "--variance", "per_example"], "--variance per_example fits each example's own variance"),
    (["--variance", "median"], "--variance median: invalid value 'median'"),
])
def test_bad_audit_options_are_one_line(cli, smoke_run, args, expected):
    before = snapshot(smoke_run)
    code, _, err = cli("audit", smoke_run, *args)
    assert code == 2 and expected in one_line(err), err
    assert snapshot(smoke_run) == before


def test_an_audit_of_what_is_no_finished_run_is_one_line(cli, tmp_path, smoke_run):
    code, _, err = cli("audit", tmp_path)
    assert code == 2 and f"audit {tmp_path}: no hyperparameters.yaml there" in one_line(err)
    copy = tmp_path / "copy"
    shutil.copytree(smoke_run, copy)
    shutil.rmtree(copy / "checkpoints")
    code, _, err = cli("audit", copy)
    assert code == 2 and "no checkpoints/last.ckpt there" in one_line(err)
    attacked = tmp_path / "attacked"
    code, _, err = cli("fit", "--config", SMOKE, "--log.logger", "none", "--federation.rounds", "1",
                       "--attack.kind", "sign_flip", "--out_dir", attacked)
    assert code == 0, err
    code, _, err = cli("audit", attacked)
    assert code == 2 and "the run had malicious clients (attack.kind sign_flip)" in one_line(err)


# ------------------------------------------------------------------------------------------------ memorisation
def memorising_settings(out: Path) -> dict:
    """Two clients (PACS-mini photo and art painting) with 2 images a class under random labels, class-specific
    contexts trained well past fitting them: prompts that memorise their train images (labels that no image
    feature predicts can only be remembered)."""
    from fedprompt.args import BackboneArgs, EvalArgs, FabricArgs, FederationArgs, LogArgs, TrainArgs
    from fedprompt.methods import PromptFL

    return dict(method=PromptFL(n_ctx=4, csc=True, lr=0.02), data=RandomLabels(
                    root=str(require(PACS)), domains=["photo", "art_painting"], test_fraction=0.3, num_shots=2),
                backbone=BackboneArgs(model="effl0-minilm", pretrained=str(require(EFFL0))),
                federation=FederationArgs(rounds=2), train=TrainArgs(local_steps=40, batch_size=32, augment=False,
                                                                     feature_cache=True),
                eval=EvalArgs(batch_size=64), log=LogArgs(logger="none", progress=False),
                fabric=FabricArgs(accelerator="cpu", devices=1, precision="32-true"), out_dir=str(out), seed=0)


def _random_labels():
    from fedprompt.data import DomainFolders
    from fedprompt.data.base import DatasetSplits, Sample

    class RandomLabels(DomainFolders):
        """PACS-mini with every image's label drawn at random (seeded)."""

        def read(self):
            raw = super().read()
            rng = np.random.default_rng([self.seed, 99])

            def relabel(samples):
                return [Sample(s.path, int(rng.integers(len(raw.classnames))), s.domain) for s in samples]

            return DatasetSplits(raw.classnames, relabel(raw.train), relabel(raw.test), name=raw.name,
                                 loader=raw.loader)

    return RandomLabels


RandomLabels = _random_labels()


def test_the_audit_finds_memorised_members_and_nothing_in_prompts_that_never_saw_them(tmp_path):
    from fedprompt.backbone import load_backbone
    from fedprompt.commands import audit, fit
    from fedprompt.run import RunArgs
    from fedprompt.threats import AuditArgs

    trained = tmp_path / "trained"
    fit(**memorising_settings(trained))
    found = audit(RunArgs(**memorising_settings(trained)), AuditArgs(run_dir=[str(trained)], shadows=2))
    assert found["accuracy"]["members"] > found["accuracy"]["non_members"] + 0.3
    assert found["attacks"]["loss"]["overall"]["auc"] > 0.85, found["attacks"]["loss"]["overall"]
    assert found["attacks"]["lira"]["overall"]["auc"] > 0.8, found["attacks"]["lira"]["overall"]
    # the same run with its prompts replaced by the initial ones (they never saw any image)
    fresh = tmp_path / "fresh"
    shutil.copytree(trained, fresh, ignore=shutil.ignore_patterns("audit"))
    settings = memorising_settings(fresh)
    checkpoint = torch.load(fresh / "checkpoints" / "last.ckpt", weights_only=True)
    backbone = load_backbone("effl0-minilm", str(EFFL0))
    classnames = sorted(p.name for p in (PACS / "photo").iterdir() if p.is_dir())
    torch.manual_seed(0)
    initial = settings["method"].build_client(backbone, [c.replace("_", " ") for c in classnames], 1).slot_state(0)
    checkpoint["clients"] = {cid: dict(initial) for cid in checkpoint["clients"]}
    torch.save(checkpoint, fresh / "checkpoints" / "last.ckpt")
    null = audit(RunArgs(**settings), AuditArgs(run_dir=[str(fresh)], shadows=0))
    assert abs(null["attacks"]["loss"]["overall"]["auc"] - 0.5) < 0.2, null["attacks"]["loss"]["overall"]
    assert abs(null["accuracy"]["members"] - null["accuracy"]["non_members"]) < 0.25


def test_audit_argument_errors_happen_without_importing_torch(smoke_run):
    """A typo in an audit's options or flags costs no torch import (the run's config is checked too)."""
    import subprocess
    import sys

    from test_faults_cli import NO_TORCH

    cases = {"option type": (["audit", str(smoke_run), "--shadows", "two"], "--shadows two: invalid value 'two'"),
             "run setting": (["audit", str(smoke_run), "--attack.kind", "poison"], "--attack.kind poison"),
             "no run": (["audit", str(smoke_run / "nope")], "no hyperparameters.yaml there")}
    out = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(cases)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    results = json.loads(out.stdout.split("RESULTS ", 1)[1])
    errors = [line for line in out.stderr.splitlines() if line.startswith("fedprompt: error: ")]
    assert len(errors) == len(cases), out.stderr[-3000:]
    for (name, (_, text)), line in zip(cases.items(), errors):
        assert results[name] == [2, []] and text in line, (name, results[name], line)


def test_an_audit_of_a_flower_run_equals_the_audit_of_the_same_run_under_fabric(cli, tmp_path):
    """The audit reads the run's checkpoint and trains its shadows in this process, whatever the run's runtime: a
    run made with --runtime flower and the same run made by Fabric one client at a time give the same audit."""
    pytest.importorskip("flwr", reason="Flower is not installed")
    found = {}
    for runtime, flags in (("flower", ["--runtime", "flower"]), ("fabric", ["--federation.parallel_clients", "1"])):
        run = tmp_path / runtime
        code, _, err = cli("fit", "--config", SMOKE, "--log.logger", "none", "--out_dir", run, *flags)
        assert code == 0, err
        code, _, err = cli("audit", run, "--shadows", "2", "--federation.parallel_clients", "1")
        assert code == 0, err
        found[runtime] = json.loads((run / "audit" / "result.json").read_text())
        found[runtime].pop("run")
    assert found["flower"] == found["fabric"]
