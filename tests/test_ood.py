"""OOD detection as an evaluation of every method (fedprompt.ood, eval.ood): the scores and the metrics against direct
computations, the OOD sets of the data, the rows of a run against the scores recomputed from its checkpoint,
NegLabel's negative labels (mined, or FOCoOp's own columns) and the refusals (the Flower runtime's rows:
tests/test_flower.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ROOT, read_rows
from fedprompt.data import Dirichlet, Synthetic, Transfer
from fedprompt.data.scenarios import ood_sets
from fedprompt.errors import FedPromptError
from fedprompt.federation.scenarios import evaluation_sets
from fedprompt.ood import auroc, detection_metrics, energy, fpr_at_tpr, mcm, msp, neglabel, ood_scores

SMOKE = str(ROOT / "configs" / "smoke.yaml")
WORDS = str(ROOT / "tests" / "data" / "negative_words")
NOVEL = ["--data.subsample_classes", "base", "--data.num_classes", "6", "--eval.ood", "[novel]"]


def test_scores_are_their_formulas():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    exp = logits.exp()
    torch.testing.assert_close(msp(logits), (exp / exp.sum(1, keepdim=True)).max(1).values)
    torch.testing.assert_close(energy(logits), exp.sum(1).log())
    cos = (logits / 20.0).exp()
    torch.testing.assert_close(mcm(logits, 20.0), (cos / cos.sum(1, keepdim=True)).max(1).values)
    negatives = torch.tensor([[1.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(neglabel(logits, negatives), exp.sum(1) / (exp.sum(1) + negatives.exp().sum(1)))
    # a model's own negative columns (after C = 3) serve NegLabel; msp over the classes unless all_columns
    both = torch.cat([logits, negatives], dim=1)
    got = ood_scores(both, 3, ("msp", "neglabel"), 20.0)
    torch.testing.assert_close(got["neglabel"], neglabel(logits, negatives))
    torch.testing.assert_close(got["msp"], msp(logits))
    torch.testing.assert_close(ood_scores(both, 3, ("msp",), 20.0, all_columns=True)["msp"], msp(both))
    with pytest.raises(FedPromptError, match="neglabel needs negative labels"):
        ood_scores(logits, 3, ("neglabel",), 20.0)


def mann_whitney(inside: list[float], outside: list[float]) -> float:
    """P(an in-distribution score > an OOD score) + P(tie) / 2, over every pair."""
    pairs = [(a > b) + 0.5 * (a == b) for a in inside for b in outside]
    return sum(pairs) / len(pairs)


def test_auroc_is_the_pairwise_rank_statistic_and_fpr95_the_share_above_the_threshold():
    torch.manual_seed(0)
    inside, outside = torch.randn(40) + 1.0, torch.randn(30)
    inside[:3] = outside[:3]  # ties across the two sets
    assert auroc(inside, outside) == pytest.approx(mann_whitney(inside.tolist(), outside.tolist()), abs=1e-6)
    # by hand: the threshold is the largest value that keeps >= 95 % of the 40 ID scores: the 38th largest, ties in
    threshold = inside.sort(descending=True).values[37]
    assert (inside >= threshold).float().mean() >= 0.95
    assert fpr_at_tpr(inside, outside) == pytest.approx(float((outside >= threshold).float().mean()), abs=1e-6)
    # large scores (energies of ~100) keep their order: no sigmoid squashes them
    assert auroc(inside + 100, outside + 100) == pytest.approx(auroc(inside, outside), abs=1e-6)
    perfect = detection_metrics(torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0]))
    assert perfect == {"auroc": 1.0, "fpr95": 0.0}
    assert math.isnan(detection_metrics(torch.tensor([1.0]), torch.tensor([]))["auroc"])


def test_ood_sets_are_held_out_classes_or_a_transfer_target():
    class Args:
        ood = ["novel"]
        mode = "personal"
        domains = False

    splits = Synthetic(num_classes=6, subsample_classes="base").setup()
    (novel,) = ood_sets(splits, ["novel"])
    assert novel.name == "ood/novel" and novel.split == "ood" and novel.classnames == splits.classnames
    assert {s.label for s in novel.samples} == {0, 1, 2} and len(novel.samples) == 3 * 8  # the novel half's tests
    assert [e.name for e in evaluation_sets(splits, Args)] == ["synthetic/base"]  # no novel accuracy then
    transfer = Transfer(Synthetic(num_classes=3), [Synthetic(num_classes=8, seed=5)], names=["other"]).setup()
    (other,) = ood_sets(transfer, ["other"])
    assert other.name == "ood/other" and len(other.samples) == 8 * 8
    Args.ood = ["other"]
    assert [e.name for e in evaluation_sets(transfer, Args)] == []  # an OOD set only: no unseen accuracy
    Args.ood = []
    assert [e.name for e in evaluation_sets(transfer, Args)] == ["other/all"]
    with pytest.raises(FedPromptError, match=r"no OOD set 'dtd'; known here: \['other'\]"):
        ood_sets(transfer, ["dtd"])


def test_rows_are_the_scores_of_each_clients_model_recomputed_from_the_checkpoint(cli, tmp_path, tiny_backbone):
    """A PromptFL run with the novel classes as OOD set: client 1's AUROC and FPR95 in the last row equal those
    computed here from its final prompt, its own test images and the novel images (the direct computation)."""
    from fedprompt.data.transforms import clip_transforms
    from fedprompt.methods import PromptFL

    code, _, err = cli("fit", "--config", SMOKE, *NOVEL, "--out_dir", tmp_path / "run", "--log.progress", "false")
    assert code == 0, err
    row = read_rows(tmp_path / "run")[-1]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["clients"][1]
    splits = Synthetic(num_classes=6, subsample_classes="base", train_per_class=16, test_per_class=8, image_size=32,
                       partition=Dirichlet(num_clients=4, alpha=1.0, min_size=4)).setup()  # the smoke config's
    _, test_tf = clip_transforms(tiny_backbone.preprocess_cfg, False)
    torch.manual_seed(0)
    client = PromptFL(n_ctx=4).build_client(tiny_backbone, splits.classnames)
    client.load_slot(0, state)
    client.eval()

    def scores(samples):
        images = torch.stack([test_tf(splits.loader(s)) for s in samples])
        logits = client.predict_logits({"image": images})
        return ood_scores(logits, len(splits.classnames), ("msp", "energy", "mcm"), tiny_backbone.logit_scale)

    inside, outside = scores(splits.clients[1].test), scores(ood_sets(splits, ["novel"])[0].samples)
    for score in ("msp", "energy", "mcm"):
        expected = mann_whitney(inside[score].tolist(), outside[score].tolist())
        assert row[f"client_ood/novel/{score}/auroc"][1] == pytest.approx(expected, abs=1e-5), score
        threshold = inside[score].sort(descending=True).values[math.ceil(0.95 * len(inside[score])) - 1]
        fpr = float((outside[score] >= threshold).float().mean())
        assert row[f"client_ood/novel/{score}/fpr95"][1] == pytest.approx(fpr, abs=1e-5), score
        values = row[f"client_ood/novel/{score}/auroc"]
        assert row[f"ood/novel/{score}/auroc"] == pytest.approx(sum(values) / len(values))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ood/novel/energy/auroc"] == row["ood/novel/energy/auroc"]


def test_neglabel_with_mined_negatives_and_with_focoops_own_columns(cli, tmp_path):
    flags = ["--config", SMOKE, *NOVEL, "--federation.rounds", "1", "--log.progress", "false",
             "--eval.ood_scores", "[msp,neglabel]"]
    code, _, err = cli("fit", *flags, "--eval.ood_negatives", WORDS, "--eval.ood_negative_count", "8",
                       "--out_dir", tmp_path / "mined")
    assert code == 0, err
    row = read_rows(tmp_path / "mined")[-1]
    assert 0 <= row["ood/novel/neglabel/auroc"] <= 1 and len(row["client_ood/novel/neglabel/fpr95"]) == 4
    code, _, err = cli("fit", *flags, "--method", "FOCoOp", "--method.n_ctx", "2", "--method.num_negatives", "4",
                       "--method.negative_words", WORDS, "--out_dir", tmp_path / "focoop")
    assert code == 0, err  # class-specific prompts: the held-out classes are an OOD set only, never a class list
    row = read_rows(tmp_path / "focoop")[-1]
    assert 0 <= row["ood/novel/neglabel/auroc"] <= 1 and "novel_acc" not in row


def test_ood_refusals_are_one_line_before_anything_is_written(cli, tmp_path, tiny_backbone):
    flags = ["--config", SMOKE, "--federation.rounds", "1", "--log.progress", "false"]
    cases = [([*NOVEL, "--eval.ood_scores", "[neglabel]"], "neglabel needs negative labels; PromptFL has none"),
             (["--eval.ood", "[novel]"], "no OOD set 'novel'"),
             (["--eval.ood", "[novel,novel]"], "eval.ood names a set twice")]
    for i, (extra, message) in enumerate(cases):
        code, _, err = cli("fit", *flags, *extra, "--out_dir", tmp_path / str(i))
        assert code != 0 and message in err, err
        assert not (tmp_path / str(i) / "metrics.jsonl").exists()
    from fedprompt.args import EvalArgs
    from fedprompt.federation.ood_eval import build_detection
    from fedprompt.methods import FedAPT

    apt = FedAPT(n_ctx=2, num_domains=2)
    client = apt.build_client(tiny_backbone, ["dog", "cat"])
    args = EvalArgs(ood=["x"], ood_scores=["neglabel"], ood_negatives=WORDS)
    with pytest.raises(FedPromptError, match="FedAPT here has class-specific prompts; drop neglabel"):
        build_detection(args, ["a set"], tiny_backbone, ["dog", "cat"], client, apt)
