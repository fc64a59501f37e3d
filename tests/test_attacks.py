"""Malicious clients (issue 29): the seeded choice, each attack against a direct computation on small known inputs
(label flips, the trigger's pixels, poisoned samples, scaled and sign-flipped updates, the rows' success rate),
caches that never serve a clean image for a triggered one, runs that report the attack beside clean accuracy,
exact resume with an attack on, and one line for every bad setting before anything is written (Flower equal to
Fabric with every attack and rule: tests/test_runtimes.py)."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, one_line, read_rows, without_timings
from fedprompt.data import Synthetic
from fedprompt.data.base import Sample
from fedprompt.federation.aggregators import WeightedMean
from fedprompt.federation.attacks import (TRIGGER_MARK, AttackPlan, AttackSet, TriggerLoader, UpdateAttack,
                                          add_trigger, attack_rows, malicious_clients, trigger_box)
from fedprompt.threats import AttackArgs

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def smoke_splits():
    data = Synthetic(num_classes=4, train_per_class=6, test_per_class=3, num_domains=2)
    return data.setup()


def test_the_malicious_clients_are_a_function_of_the_seed_alone():
    assert malicious_clients(10, 0.3, 5) == malicious_clients(10, 0.3, 5)
    assert len(malicious_clients(10, 0.3, 5)) == 3 and len(malicious_clients(4, 0.1, 0)) == 1
    assert len(malicious_clients(4, 1.0, 0)) == 4
    picks = {tuple(malicious_clients(10, 0.3, seed)) for seed in range(20)}
    assert len(picks) > 5  # the seed decides


def test_label_flip_relabels_only_the_malicious_clients_train_images():
    splits = smoke_splits()
    plan = AttackPlan(AttackArgs(kind="label_flip", fraction=0.5), [1], 0)
    poisoned = plan.poison(splits)
    assert [s.label for s in poisoned.clients[1].train] == [3 - s.label for s in splits.clients[1].train]
    assert poisoned.clients[0].train == splits.clients[0].train
    assert poisoned.clients[1].test == splits.clients[1].test
    (flip,) = plan.eval_sets(splits)
    assert isinstance(flip, AttackSet) and [s.label for s in flip.samples] == [3 - s.label for s in splits.source.test]


def test_the_trigger_is_a_checkerboard_at_the_bottom_right_of_the_central_square():
    image = Image.fromarray(np.full((40, 60, 3), 100, dtype=np.uint8))  # 60 wide, 40 high
    left, top, side = trigger_box(60, 40, 0.25)
    assert (left, top, side) == (10 + 40 - 1 - 10, 40 - 1 - 10, 10)  # central square x 10..50, margin 40 // 32
    out = np.array(add_trigger(image, 0.25))
    patch = out[top:top + side, left:left + side, 0]
    cells = np.arange(side) * 3 // side
    assert (patch == ((cells[:, None] + cells[None, :]) % 2 == 0) * 255).all()
    outside = np.ones((40, 60), dtype=bool)
    outside[top:top + side, left:left + side] = False
    assert (out[outside] == 100).all()
    center = np.array(image.crop((10, 0, 50, 40)))  # the centre crop keeps the whole patch
    assert np.array(add_trigger(image, 0.25))[:, 10:50].shape == center.shape and left + side <= 50


def test_backdoor_poisons_a_fraction_of_the_other_classes_images_with_the_trigger_and_the_target():
    splits = smoke_splits()
    args = AttackArgs(kind="backdoor", target_class=2, poison_fraction=0.5, trigger_size=0.2)
    poisoned = AttackPlan(args, [0], 7).poison(splits)
    before, after = splits.clients[0].train, poisoned.clients[0].train
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    candidates = [s for s in before if s.label != 2]
    assert len(changed) == round(0.5 * len(candidates)) and all(before[i].label != 2 for i in changed)
    assert all(after[i].label == 2 and after[i].path.startswith(before[i].path + TRIGGER_MARK) for i in changed)
    loader = poisoned.loader
    assert isinstance(loader, TriggerLoader) and loader.cache_key == TriggerLoader(splits.loader, 0.2).cache_key
    i = changed[0]
    assert np.array_equal(np.array(loader(after[i])), np.array(add_trigger(splits.loader(before[i]), 0.2)))
    assert np.array_equal(np.array(loader(before[i])), np.array(splits.loader(before[i])))
    (backdoor,) = AttackPlan(args, [0], 7).eval_sets(splits)
    assert all(s.label == 2 and TRIGGER_MARK in s.path for s in backdoor.samples)
    assert len(backdoor.samples) == sum(s.label != 2 for s in splits.source.test)


def test_scaled_and_sign_flipped_updates_by_hand():
    before = {"prompt.ctx": torch.tensor([1.0, 2.0]), "local": torch.tensor([0.0])}
    trained = {"prompt.ctx": torch.tensor([2.0, 1.0]), "local": torch.tensor([5.0])}
    pool = SimpleNamespace(states={0: before, 1: before}, aggregator=WeightedMean(("prompt.",)))
    scale = UpdateAttack(pool, [0], "scale", 3.0)
    upload = pool.aggregator.upload(0, trained, 1)
    assert torch.equal(scale(0, upload, trained, 1)["prompt.ctx"], torch.tensor([4.0, -1.0]))  # 1 + 3 (2 - 1) ...
    assert set(scale(0, upload, trained, 1)) == {"prompt.ctx"}  # the method's upload: local keys stay local
    flip = UpdateAttack(pool, [0], "sign_flip", 2.0)
    assert torch.equal(flip(0, upload, trained, 1)["prompt.ctx"], torch.tensor([-1.0, 4.0]))  # 1 - 2 (2 - 1) ...
    assert flip(1, upload, trained, 1) is upload  # an honest client sends its upload as it is


def test_the_rows_success_rate_is_the_honest_clients_accuracy_on_the_attack_set():
    attack_set = AttackSet("attack/backdoor", ["a", "b"], [], "attack", "")
    evaluator = SimpleNamespace(clients=[0, 1, 2], eval_sets=[attack_set], malicious_clients=[1],
                                set_clients=lambda eval_set: [0, 1, 2])
    scores = {0: {"acc:test": 0.5, "acc:set/attack/backdoor": 0.2}, 1: {"acc:test": 0.1, "acc:set/attack/backdoor": 1},
              2: {"acc:test": 0.7, "acc:set/attack/backdoor": math.nan}}
    row = attack_rows(evaluator, scores, {})
    assert row == {"malicious_clients": [1], "benign_acc": pytest.approx(0.6), "attack_success_rate": 0.2}
    assert attack_rows(SimpleNamespace(clients=[0]), scores, {}) == {}


# ------------------------------------------------------------------------------------------------- runs
def fit(cli, out, *flags):
    code, _, err = cli("fit", "--config", SMOKE, "--log.logger", "none", "--out_dir", out, *flags)
    assert code == 0, err
    return out


BACKDOOR = ["--attack.kind", "backdoor", "--attack.fraction", "0.5", "--attack.target_class", "1",
            "--attack.trigger_size", "0.25", "--attack.scale", "2"]


def test_a_backdoor_run_reports_its_success_beside_clean_accuracy_and_caches_serve_it_exactly(cli, tmp_path):
    """The same backdoor run from image files and from the feature cache (train images cached, the triggered ones
    as samples of their own): the same rows."""
    files = read_rows(fit(cli, tmp_path / "files", *BACKDOOR, "--eval.feature_cache", "false"))
    cached = read_rows(fit(cli, tmp_path / "cached", *BACKDOOR, "--train.feature_cache", "true"))
    last = files[-1]
    assert last["malicious_clients"] == malicious_clients(4, 0.5, 0)
    assert 0 <= last["attack_success_rate"] <= 1 and 0 <= last["benign_acc"] <= 1 and "local_acc" in last
    for a, b in zip(without_timings(files), without_timings(cached)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key  # calibration holds sums near 16


def test_a_label_flip_run_reports_the_flipped_predictions(cli, tmp_path):
    rows = read_rows(fit(cli, tmp_path / "run", "--attack.kind", "label_flip", "--attack.fraction", "0.75"))
    assert 0 <= rows[-1]["attack_success_rate"] <= 1 and len(rows[-1]["malicious_clients"]) == 3


def test_an_update_attack_moves_the_global_state_and_resumes_exactly(cli, tmp_path):
    flags = ["--attack.kind", "sign_flip", "--attack.scale", "4", "--federation.rounds", "3"]
    straight = fit(cli, tmp_path / "straight", *flags)
    honest = fit(cli, tmp_path / "honest", "--federation.rounds", "3")
    cut = fit(cli, tmp_path / "cut", *flags[:4], "--federation.rounds", "2")
    code, _, err = cli("fit", "--resume", cut / "checkpoints" / "last.ckpt", "--federation.rounds", "3")
    assert code == 0, err
    assert without_timings(read_rows(cut)) == without_timings(read_rows(straight))
    states = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in (cut, straight, honest)]
    for key in states[1]["global"]:
        assert torch.equal(states[0]["global"][key], states[1]["global"][key])
    assert any(not torch.equal(states[1]["global"][k], states[2]["global"][k]) for k in states[1]["global"])


@pytest.mark.parametrize("flags, expected", [
    (["--attack.kind", "poison"], "--attack.kind poison: invalid value 'poison'"),
    (["--attack.fraction", "0"], "--attack.fraction must be in (0, 1], got 0.0"),
    (["--attack.fraction", "1.5"], "--attack.fraction must be in (0, 1], got 1.5"),
    (["--attack.scale", "0"], "--attack.scale must be > 0, got 0.0"),
    (["--attack.kind", "scale"], "--attack.kind scale sends the honest update times --attack.scale, which is 1"),
    (["--attack.target_class", "-1"], "--attack.target_class must be >= 0, got -1"),
    (["--attack.poison_fraction", "0"], "--attack.poison_fraction must be in (0, 1], got 0.0"),
    (["--attack.trigger_size", "0.6"], "--attack.trigger_size must be in (0, 0.5], got 0.6"),
    (["--attack.kind", "backdoor", "--attack.target_class", "4"], "--attack.target_class 4: the data has 4 classes"),
    (["--attack.kind", "sign_flip", "--method", "LocalCoOp"], "attack: LocalCoOp shares no trained state"),
    (["--attack.kind", "sign_flip", "--federation.central", "true"], "attack: federation.central pools every"),
    (["--robust.rule", "mean"], "--robust.rule mean: invalid value 'mean'"),
    (["--robust.trim", "0.5"], "--robust.trim must be in [0, 0.5), got 0.5"),
    (["--robust.keep", "0"], "--robust.keep must be >= 1, got 0"),
    (["--robust.malicious", "-1"], "--robust.malicious must be >= 0, got -1"),
    (["--robust.norm_bound", "0"], "--robust.norm_bound must be > 0, got 0.0"),
    (["--robust.rule", "krum", "--dp.noise_multiplier", "1", "--dp.clip_norm", "1"],
     "robust.rule krum with client-level DP"),
    (["--robust.rule", "median", "--method", "FedMGP"], "robust.rule median: FedMGP's server rule is not a mean"),
])
def test_bad_attack_and_robust_settings_are_one_line_before_anything_is_written(cli, tmp_path, flags, expected):
    out = tmp_path / "run"
    code, _, err = cli("fit", "--config", SMOKE, "--log.logger", "none", *flags, "--out_dir", out)
    assert code == 2 and expected in one_line(err), err
    assert not out.exists()


def test_fit_help_shows_the_attack_and_robust_groups(cli):
    code, out, _ = cli("fit", "--help")
    text = " ".join(out.split())
    assert code == 0 and "--attack.kind {none,label_flip,backdoor,scale,sign_flip}" in text
    assert "--robust.rule {none,median,trimmed_mean,krum}" in text and "--robust.norm_bound" in text


def test_poisoned_splits_keep_every_clients_size_and_other_lists():
    splits = smoke_splits()
    poisoned = AttackPlan(AttackArgs(kind="backdoor"), [0, 1], 3).poison(splits)
    assert [len(c.train) for c in poisoned.clients] == [len(c.train) for c in splits.clients]
    assert poisoned.classnames == splits.classnames and poisoned.source.test == splits.source.test
    assert replace(poisoned.clients[0], train=splits.clients[0].train) == splits.clients[0]
    assert Sample("x", 0) == Sample("x", 0)
