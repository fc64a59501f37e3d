"""The evaluation scenarios: cross-dataset / cross-domain targets (Transfer), global / personal / dual evaluation,
per-domain test sets, the centralised bound and client drop-outs, on the tiny model and generated images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_rows
from fedprompt.args import BackboneArgs, EvalArgs, FabricArgs, FederationArgs, LogArgs, TrainArgs
from fedprompt.data import (Combined, CrossClass, DatasetSplits, Dirichlet, ImageNetA, Sample, Synthetic, Transfer,
                            centralize, count_table)
from fedprompt.data.scenarios import domain_sets, global_sets
from fedprompt.errors import FedPromptError
from fedprompt.federation.sampling import drop_clients
from fedprompt.federation.scenarios import central_train
from fedprompt.methods import FedOTP, LocalCoOp, PromptFL, ZeroShot
from test_imagenet import make_variant

TARGET_WNIDS = ["n02000000", "n04000000"]  # the fake ImageNet-A: 2 of the test_imagenet classes


def source(**kwargs) -> Synthetic:
    return Synthetic(num_classes=4, train_per_class=8, test_per_class=4, image_size=32,
                     partition=kwargs.pop("partition", Dirichlet(4, alpha=1.0, min_size=2)), **kwargs)


def run(out_dir: Path, command: str = "fit", method=None, data=None, rounds: int = 2, **groups) -> dict:
    from fedprompt import commands

    settings = dict(method=method if method is not None else PromptFL(n_ctx=4, lr=0.01),
                    data=data if data is not None else source(),
                    backbone=BackboneArgs(model="fedprompt-tiny", pretrained=None),
                    federation=groups.pop("federation", FederationArgs(rounds=rounds)),
                    train=groups.pop("train", TrainArgs(batch_size=8, augment=False)),
                    eval=groups.pop("eval", EvalArgs(batch_size=64)),
                    log=groups.pop("log", LogArgs(logger="none", progress=False)),
                    fabric=FabricArgs(accelerator="cpu", devices=1, precision="32-true"), out_dir=str(out_dir),
                    seed=0)
    assert not groups, groups
    return getattr(commands, command)(**settings)


def training(rows: list[dict]) -> list[dict]:
    """What a round trained (evaluation and timing keys left out)."""
    return [{k: row[k] for k in ("round", "train_loss", "clients", "bytes_up", "bytes_down")} for row in rows]


# ------------------------------------------------------------------------------------------------- Transfer
def test_transfer_adds_one_set_per_target_with_its_own_class_list(tmp_path):
    target = make_variant(tmp_path / "imagenet-adversarial", "imagenet-a", TARGET_WNIDS)
    data = Transfer(source=source(), targets=[ImageNetA(root=str(target), num_classes=2),
                                              Synthetic(num_classes=3, test_per_class=2, seed=5)])
    splits = data.setup()
    assert len(splits.clients) == 4 and splits.classnames == source().setup().classnames
    sets = [e for e in splits.eval_sets if not e.seen]
    assert [(e.name, e.split, len(e.classnames), len(e.samples)) for e in sets] == [
        ("imagenet-a/all", "all", 2, 4), ("synthetic-domain0/all", "all", 3, 6)]  # a one-domain dataset: + domain
    assert sets[0].classnames == ["great white shark", "teapot"]  # 2-way: the target's own list
    # each sample goes to its own dataset's loader: the generated target (same keys as the source's samples, another
    # seed) to its own, the source's to the source's, ImageNet-A's files to PIL
    pixels = lambda image: np.asarray(image)  # noqa: E731
    target, own = Synthetic(num_classes=3, test_per_class=2, seed=5).read(), source().read()
    first = splits.clients[0].train[0]
    assert np.array_equal(pixels(splits.loader(sets[1].samples[0])), pixels(target.loader(target.test[0])))
    assert np.array_equal(pixels(splits.loader(first)), pixels(own.loader(first)))
    assert not np.array_equal(pixels(own.loader(target.test[0])), pixels(target.loader(target.test[0])))
    assert splits.loader(sets[0].samples[0]).size == (8, 8)


def test_partition_lists_the_targets(capsys):
    from fedprompt.commands import partition

    partition(data=Transfer(source=source(), targets=[Synthetic(num_classes=3, test_per_class=2, seed=5)],
                            names=["gen"]))
    out = capsys.readouterr().out
    assert "4 clients, 4 classes, 32 train / 16 test samples" in out
    assert out.splitlines()[-1].split() == ["gen/all", "3", "6"]


def test_transfer_target_problems_are_one_line_each(tmp_path):
    broken = make_variant(tmp_path / "a" / "imagenet-adversarial", "imagenet-a", TARGET_WNIDS)
    (broken / "classnames.txt").unlink()
    wrong = make_variant(tmp_path / "b" / "imagenet-adversarial", "imagenet-a", TARGET_WNIDS)
    data = Transfer(source=source(), targets=[Synthetic(num_classes=2), ImageNetA(root=str(broken)),
                                              ImageNetA(root=str(wrong))])
    with pytest.raises(FedPromptError) as err:
        data.setup()
    text = str(err.value)
    assert "\n" not in text and text.startswith("2 of 3 targets cannot be read")
    assert "data.targets[1] (ImageNetA): ImageNetA: the class list" in text and "classnames.txt is missing" in text
    assert "data.targets[2] (ImageNetA): ImageNetA: " in text and "has 2 class folders, expected 200" in text
    with pytest.raises(FedPromptError, match=r"cannot be nested"):
        Transfer(source=Combined(datasets=[source()]), targets=[Synthetic()])
    with pytest.raises(FedPromptError, match=r"data.targets is empty"):
        Transfer(source=source(), targets=[])
    with pytest.raises(FedPromptError, match=r"data.names has 1 names for 2 targets"):
        Transfer(source=source(), targets=[Synthetic(), Synthetic()], names=["a"])
    with pytest.raises(FedPromptError, match=r"data.names must be unique"):
        Transfer(source=source(), targets=[Synthetic(), Synthetic()], names=["a", "a"])


def test_transfer_run_reports_every_target_and_their_mean(tmp_path, monkeypatch):
    """Each target scored with its own class list; unseen/<target> and unseen_acc in metrics.jsonl and the summary;
    every evaluation image encoded once per run, and the text side computed once per class list per evaluation."""
    from fedprompt.data.cache import FeatureCache
    from fedprompt.federation.evaluator import Evaluator

    encoded, texts = [], []
    real_encode, real_text = FeatureCache._encode, Evaluator._text
    monkeypatch.setattr(FeatureCache, "_encode", lambda self, s, t: (encoded.extend(x.path for x in s),
                                                                      real_encode(self, s, t))[1])
    monkeypatch.setattr(Evaluator, "_text", staticmethod(lambda fabric, c, slots: (texts.append(tuple(c.classnames)),
                                                                                    real_text(fabric, c, slots))[1]))
    target = make_variant(tmp_path / "imagenet-adversarial", "imagenet-a", TARGET_WNIDS)
    targets = [ImageNetA(root=str(target), num_classes=2), Synthetic(num_classes=3, test_per_class=2, seed=5),
               Synthetic(num_classes=3, test_per_class=2, seed=6)]
    summary = run(tmp_path / "run", data=Transfer(source=source(), targets=targets, names=["in-a", "gen5", "gen6"]),
                  eval=EvalArgs(batch_size=64, mode="dual"),
                  train=TrainArgs(batch_size=8, augment=False, cache_dir=None))
    rows = read_rows(tmp_path / "run")
    for row in rows:
        values = [row["unseen/in-a"], row["unseen/gen5"], row["unseen/gen6"]]
        assert row["unseen_acc"] == pytest.approx(sum(values) / 3)
        assert {"local_acc", "global_acc", "dual_hm"} <= row.keys()
    for key in ("unseen/in-a", "unseen/gen5", "unseen/gen6", "unseen_acc", "global_acc"):
        assert summary[key] == rows[-1][key]
    # 16 source test images + 4 + 6 + 6 target images, each encoded once in the whole run (2 evaluations)
    assert len(encoded) == len(set(encoded)) == 16 + 4 + 6 + 6
    # per evaluation: the clients' own test data, then the source list (global set), ImageNet-A's list, and the
    # 3-class list the two generated targets share: one text pass each
    per_eval = [tuple(source().setup().classnames), tuple(source().setup().classnames),
                ("great white shark", "teapot"), ("red square", "green circle", "blue triangle")]
    assert sorted(texts) == sorted(per_eval * 2)


def test_target_accuracy_equals_the_dataset_scored_on_its_own(tmp_path):
    """Zero-shot CLIP on a target set equals zero-shot CLIP on that dataset as the federation's own data."""
    from fedprompt.data import IID

    target = Synthetic(num_classes=3, test_per_class=4, seed=5)
    transfer = run(tmp_path / "transfer", command="zeroshot", method=ZeroShot(),
                   data=Transfer(source=source(), targets=[target]))
    alone = run(tmp_path / "alone", command="zeroshot", method=ZeroShot(),
                data=Synthetic(num_classes=3, test_per_class=4, seed=5, partition=IID(1)))
    assert transfer["unseen/synthetic-domain0"] == pytest.approx(alone["local_acc"], abs=1e-12)


# ------------------------------------------------------------------------------------ global / personal / dual
def test_personal_test_sets_are_disjoint_and_follow_the_train_proportions():
    samples = lambda split, n: [Sample(f"{split}/{c}/{i}", c) for c in range(5) for i in range(n)]  # noqa: E731
    data = DatasetSplits([f"c{c}" for c in range(5)], samples("train", 40), samples("test", 20))
    clients = Dirichlet(4, alpha=0.5, min_size=2).split(data, seed=3)
    train, test = count_table(clients, 5), count_table(clients, 5, "test")
    for client in clients:
        assert not {s.path for s in client.train} & {s.path for s in client.test}
    assert np.abs(train / 40 - test / 20).max() <= 2 / 20 + 2 / 40  # the same drawn share of every class
    assert (test.sum(0) == 20).all()  # the clients' test sets together are the whole test split


def test_global_mode_scores_the_aggregated_prompt_on_the_whole_test_split(tmp_path):
    personal = run(tmp_path / "personal")
    global_ = run(tmp_path / "global", eval=EvalArgs(batch_size=64, mode="global"))
    # the same training; a global model on the whole test split = its accuracy over the union of the client tests
    assert training(read_rows(tmp_path / "personal")) == training(read_rows(tmp_path / "global"))
    assert global_["global_acc"] == pytest.approx(personal["global_acc"], abs=1e-6)  # float32 accuracies
    assert "local_acc" not in global_ and "client_acc" not in global_ and "client_global_acc" not in global_


def test_dual_mode_of_a_method_with_personal_parts(tmp_path):
    summary = run(tmp_path / "dual", method=FedOTP(n_ctx=4, lr=0.5), eval=EvalArgs(batch_size=64, mode="dual"))
    scored = summary["client_global_acc"]
    assert len(scored) == 4 and summary["global_acc"] == pytest.approx(sum(scored) / 4)
    b, n = summary["local_acc"], summary["global_acc"]
    assert summary["dual_hm"] == pytest.approx(2 * b * n / (b + n))


def test_every_domain_test_set(tmp_path):
    """One client per domain: a global model's accuracy on domain d's test split is client d's accuracy."""
    summary = run(tmp_path / "domains", data=Synthetic(num_classes=4, train_per_class=8, test_per_class=4,
                                                       num_domains=2), eval=EvalArgs(batch_size=64, domains=True))
    assert [summary["domain/domain0"], summary["domain/domain1"]] == summary["client_acc"]
    assert summary["multidomain_acc"] == pytest.approx(sum(summary["client_acc"]) / 2)  # equal test sizes
    assert summary["multidomain_acc"] == pytest.approx(summary["global_acc"])
    with pytest.raises(FedPromptError, match=r"eval.domains: the test data has a single domain"):
        domain_sets(global_sets(source().setup()))


def test_domain_sets_hold_every_test_image_of_their_domain():
    """Several clients per domain (FLiP's and FedMGP's multi-domain DomainNet): a domain's set is its whole test
    split, not one client's share."""
    from fedprompt.data import ByDomain

    data = Synthetic(num_classes=4, train_per_class=8, test_per_class=4, num_domains=3,
                     partition=ByDomain(clients_per_domain=2, alpha=1.0))
    splits = data.setup()
    assert len(splits.clients) == 6
    sets = domain_sets(global_sets(splits))
    assert [(e.domain, len(e.samples)) for e in sets] == [(f"domain{d}", 16) for d in range(3)]
    for item in sets:
        held = sorted(s.path for c in splits.clients if c.name.startswith(item.domain) for s in c.test)
        assert sorted(s.path for s in item.samples) == held


# ---------------------------------------------------------------------------------------------------- central
def test_central_pools_every_client_into_one(tmp_path):
    splits = source().setup()
    central = centralize(splits)
    assert [c.name for c in central.clients] == ["central"] and central.eval_sets == splits.eval_sets
    for part in ("train", "test"):
        assert sorted(s.path for s in getattr(central.clients[0], part)) == \
            sorted(s.path for c in splits.clients for s in getattr(c, part))
    summary = run(tmp_path / "central", federation=FederationArgs(rounds=2, central=True, fraction=0.5))
    assert summary["clients"] == ["central"] and summary["num_train"] == [32] and summary["num_test"] == [16]
    assert all(row["clients"] == [0] for row in read_rows(tmp_path / "central"))
    own = Combined(datasets=[source()], partition=CrossClass(2))
    with pytest.raises(FedPromptError, match=r"federation.central: the clients have their own class lists"):
        centralize(own.setup())


def test_central_budget():
    train = TrainArgs(local_epochs=2)
    assert central_train(train, FederationArgs(central=True), 10) is train  # the same local epochs per round
    steps = TrainArgs(local_steps=20)
    assert central_train(steps, FederationArgs(fraction=1.0), 10).local_steps == 200
    assert central_train(steps, FederationArgs(fraction=0.25), 10).local_steps == 40  # round(2.5) = 2 clients


# ---------------------------------------------------------------------------------------------------- drop-out
def test_drop_clients_is_seeded():
    sampled = [0, 2, 3, 5, 7, 8, 9, 11, 12, 13]
    first = drop_clients(sampled, 0.3, seed=1, round_idx=4)
    assert first == drop_clients(sampled, 0.3, seed=1, round_idx=4) and len(first) == 3
    assert set(first) <= set(sampled) and first == sorted(first)
    assert any(drop_clients(sampled, 0.3, seed=1, round_idx=r) != first for r in range(5, 9))
    assert len(drop_clients(sampled, 0.9, 0, 1)) == 9  # one of ten reports (FLiP's int() would keep none)
    assert drop_clients(sampled, 0.0, 0, 1) == []
    with pytest.raises(FedPromptError, match=r"--federation.drop_rate must be in \[0, 1\), got 1.0"):
        FederationArgs(drop_rate=1.0)
    with pytest.raises(FedPromptError, match=r"--federation.central trains one client"):
        FederationArgs(central=True, drop_rate=0.1)


def test_dropped_clients_never_train_nor_report(tmp_path):
    log = LogArgs(logger="none", progress=False, checkpoint_every=1)
    run(tmp_path / "local", method=LocalCoOp(n_ctx=4, lr=0.01), rounds=3, log=log,
        federation=FederationArgs(rounds=3, drop_rate=0.5))
    rows = read_rows(tmp_path / "local")
    states = [torch.load(tmp_path / "local" / "checkpoints" / f"round-{r:04d}.ckpt", weights_only=True)["clients"]
              for r in (1, 2, 3)]
    for r in (2, 3):
        dropped = rows[r - 1]["dropped_clients"]
        assert len(dropped) == 2
        for cid in range(4):
            same = torch.equal(states[r - 1][cid]["prompt.ctx"], states[r - 2][cid]["prompt.ctx"])
            assert same == (cid in dropped), (r, cid)
    pfl = run(tmp_path / "pfl", rounds=3, federation=FederationArgs(rounds=3, drop_rate=0.5))
    rows = read_rows(tmp_path / "pfl")
    assert all(row["bytes_up"] == row["bytes_down"] // 2 for row in rows)  # 2 of the 4 sampled clients report
    assert pfl["rounds"] == 3
