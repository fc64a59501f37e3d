"""Per-client class lists, FedTPG's cross_cls partition, multi-dataset federations (Combined) and evaluation sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CIFAR10, PACS, ROOT, require
from fedprompt.data import (IID, ClientSplit, Combined, CrossClass, DatasetSplits, Dirichlet,
                            DomainFolders, EvalSet, FederatedData, Pathological, Sample, SplitFolders, Synthetic,
                            few_shot)
from fedprompt.data.coop import (DTD, SUN397, UCF101, Caltech101, EuroSAT, FGVCAircraft, Flowers102, Food101,
                                 OxfordPets, StanfordCars)
from fedprompt.data.partition import class_blocks
from fedprompt.errors import FedPromptError

# base-class counts (ceil(C/2)) of FedTPG's nine datasets, in its order, and the clients its code makes of them
NINE = [(Caltech101, 100), (Flowers102, 102), (FGVCAircraft, 100), (UCF101, 101), (OxfordPets, 37), (Food101, 101),
        (DTD, 47), (StanfordCars, 196), (SUN397, 397)]
OFFICIAL_CLIENTS = [2, 3, 2, 3, 1, 3, 1, 5, 10]  # 30 in all ("total number of clients:30" in the released log)


def make_splits(num_classes=10, train_per_class=12, test_per_class=4, val_per_class=0):
    def samples(split, n):
        return [Sample(f"{split}/{c}/{i}", c) for c in range(num_classes) for i in range(n)]

    return DatasetSplits([f"class{c}" for c in range(num_classes)], samples("tr", train_per_class),
                         samples("te", test_per_class), val=samples("va", val_per_class), name="toy")


def original_class(sample: Sample) -> str:
    return f"class{sample.path.split('/')[1]}"


# ----------------------------------------------------------------------------------------------- ClientSplit
def test_existing_partitioners_keep_the_shared_class_list():
    data = make_splits()
    for partition in (IID(3), Dirichlet(3, alpha=1.0, min_size=2), Pathological(3)):
        clients = partition.split(data, seed=0)
        assert all(c.classnames is None and c.dataset == "" for c in clients)
    client = ClientSplit(0, data.train, data.test, classnames=["a"], dataset="d")
    kept = few_shot(client, 2, seed=0)
    assert kept.classnames == ["a"] and kept.dataset == "d" and len(kept.train) == 20


# ------------------------------------------------------------------------------------------------ CrossClass
def test_class_blocks_follow_the_official_rule():
    counts = [len(class_blocks((c + 1) // 2, 20)) for _, c in NINE]
    assert counts == OFFICIAL_CLIENTS and sum(counts) == 30
    assert [len(b) for b in class_blocks(50, 20)] == [20, 30]  # round(2.5) = 2: the last client takes the rest
    assert [len(b) for b in class_blocks(51, 20)] == [20, 20, 11]
    assert [len(b) for b in class_blocks(98, 20)] == [20, 20, 20, 20, 18]
    assert [len(b) for b in class_blocks(199, 20)] == [20] * 9 + [19]
    assert class_blocks(5, 20) == [[0, 1, 2, 3, 4]]  # fewer classes than a block: one client
    assert class_blocks(6, 2) == [[0, 1], [2, 3], [4, 5]]  # label order without a seed


def test_class_blocks_shuffled_with_a_seed():
    first, again, other = class_blocks(40, 20, 7), class_blocks(40, 20, 7), class_blocks(40, 20, 8)
    assert first == again and first != other and first != class_blocks(40, 20)
    assert sorted(c for block in first for c in block) == list(range(40))
    assert all(block == sorted(block) for block in first)


@pytest.mark.parametrize("class_seed", [None, 3])
def test_cross_class_clients_score_their_own_classes(class_seed):
    data = make_splits(num_classes=10)
    clients = CrossClass(classes_per_client=4, class_seed=class_seed).split(data, seed=0)
    assert [len(c.classnames) for c in clients] == [4, 6]  # round(10/4) = 2 clients, the last takes 6
    assert sorted(n for c in clients for n in c.classnames) == sorted(data.classnames)
    for client in clients:
        assert {s.label for s in client.train} == set(range(len(client.classnames)))
        for sample in client.train + client.test:  # the relative label names the sample's original class
            assert client.classnames[sample.label] == original_class(sample)
        assert len(client.train) == 12 * len(client.classnames)  # every train image of its classes
        assert len(client.test) == 4 * len(client.classnames)  # every test image of its classes
    if class_seed is None:
        assert clients[0].classnames == ["class0", "class1", "class2", "class3"]


def test_cross_class_validation_is_relabelled_by_name():
    fed = _toy_reader(make_splits(num_classes=6, val_per_class=2), partition=CrossClass(3, class_seed=1),
                      num_shots=4, validation=True).setup()
    for client in fed.clients:
        assert len(client.val) == 2 * 3 and len(client.train) == 4 * 3
        assert all(client.classnames[s.label] == original_class(s) for s in client.val)
        assert {s.label for s in client.val} == {0, 1, 2}


class _toy_reader(FederatedData):
    """A reader returning fixed splits (no files)."""

    def __init__(self, splits: DatasetSplits, **kwargs):
        super().__init__(check_images=False, **kwargs)  # fake paths: nothing opens them
        self.splits = splits

    def read(self) -> DatasetSplits:
        return self.splits


# ---------------------------------------------------------------------------------------- Combined, fake trees
def _tiny_jpeg() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (120, 30, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


TINY_JPEG = _tiny_jpeg()


def touch(path: Path) -> None:
    """A small valid image file (the readers check that every image opens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(TINY_JPEG)


def make_coop(root: Path, reader, num_classes: int, per_class: dict[str, int]) -> None:
    """A fake CoOp tree for ``reader`` with ``num_classes`` classes (tiny valid JPEG files)."""
    if reader is FGVCAircraft:
        root.mkdir(parents=True, exist_ok=True)
        (root / "variants.txt").write_text("".join(f"variant {c}\n" for c in range(num_classes)))
        for split in ("train", "val", "test"):
            rows = [f"{split}{c}x{i} variant {c}" for c in range(num_classes) for i in range(per_class.get(split, 0))]
            (root / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
            for row in rows:
                touch(root / "images" / f"{row.split(' ')[0]}.jpg")
        return
    split = {}
    for name in ("train", "val", "test"):
        items = [[f"c{c}/{name}{i}.jpg", c, f"{reader.__name__} class {c}"]
                 for c in range(num_classes) for i in range(per_class.get(name, 0))]
        for rel, _, _ in items:
            touch(root / reader.image_dir / rel)
        split[name] = items
    (root / reader.split_file).write_text(json.dumps(split))


@pytest.fixture
def two_fake_datasets(tmp_path):
    make_coop(tmp_path / "dtd", DTD, 9, {"train": 10, "val": 2, "test": 3})
    make_coop(tmp_path / "food-101", Food101, 6, {"train": 10, "val": 2, "test": 3})
    make_coop(tmp_path / "oxford_pets", OxfordPets, 4, {"train": 2, "test": 5})
    return tmp_path


def cross_cls(data_root: Path, seed=0, **kwargs) -> Combined:
    kwargs = {"partition": CrossClass(2), "num_shots": 3, "subsample_classes": "base", "seed": seed, **kwargs}
    return Combined([DTD(root=str(data_root / "dtd")), Food101(root=str(data_root / "food-101"))],
                    unseen=[OxfordPets(root=str(data_root / "oxford_pets"))], **kwargs)


def test_combined_clients_come_from_every_dataset(two_fake_datasets):
    fed = cross_cls(two_fake_datasets).setup()
    # dtd: 9 classes -> 5 base -> round(2.5) = 2 clients (2 + 3 classes); food101: 6 -> 3 base -> 2 clients (2 + 1)
    assert [(c.dataset, len(c.classnames)) for c in fed.clients] == [("dtd", 2), ("dtd", 3), ("food101", 2),
                                                                     ("food101", 1)]
    assert [c.client_id for c in fed.clients] == [0, 1, 2, 3]
    assert [c.name for c in fed.clients] == ["dtd/client0", "dtd/client1", "food101/client0", "food101/client1"]
    assert fed.clients[1].classnames == ["DTD class 2", "DTD class 3", "DTD class 4"]
    for k, client in enumerate(fed.clients):
        assert fed.client_classnames(k) is client.classnames
        assert len(client.train) == 3 * len(client.classnames)  # 3 shots per class
        assert len(client.test) == 3 * len(client.classnames)  # every test image of its classes
        for sample in client.train + client.test:  # labels relative to its list; the path names the true class
            assert sample.path.split("/")[-2] == f"c{client.classnames[sample.label].split()[-1]}"
    assert fed.classnames == [f"DTD class {c}" for c in range(5)] + [f"Food101 class {c}" for c in range(3)]


def test_combined_evaluation_sets(two_fake_datasets):
    fed = cross_cls(two_fake_datasets).setup()
    assert [(e.name, e.split, e.dataset, e.seen) for e in fed.eval_sets] == [
        ("dtd/base", "base", "dtd", True), ("dtd/novel", "novel", "dtd", True),
        ("food101/base", "base", "food101", True), ("food101/novel", "novel", "food101", True),
        ("oxford_pets/all", "all", "oxford_pets", False)]
    base, novel, unseen = fed.eval_set("dtd/base"), fed.eval_set("dtd/novel"), fed.eval_set("oxford_pets/all")
    assert base.classnames == [f"DTD class {c}" for c in range(5)] and len(base.samples) == 5 * 3
    assert novel.classnames == [f"DTD class {c}" for c in range(5, 9)] and len(novel.samples) == 4 * 3
    assert unseen.classnames == [f"OxfordPets class {c}" for c in range(4)] and len(unseen.samples) == 4 * 5
    for item in fed.eval_sets:
        assert all(s.path.split("/")[-2] == f"c{item.classnames[s.label].split()[-1]}" for s in item.samples)
    # Base of a dataset = the union of its clients' test images (each client sees a slice of the base classes)
    dtd_tests = {s.path for c in fed.clients if c.dataset == "dtd" for s in c.test}
    assert dtd_tests == {s.path for s in base.samples}
    with pytest.raises(FedPromptError, match="no evaluation set 'dtd/new'"):
        fed.eval_set("dtd/new")


def test_combined_is_deterministic_and_seeded(two_fake_datasets):
    def shots(fed):
        return [[s.path for s in c.train] for c in fed.clients]

    first, again = cross_cls(two_fake_datasets, seed=1).setup(), cross_cls(two_fake_datasets, seed=1).setup()
    other = cross_cls(two_fake_datasets, seed=2).setup()
    assert shots(first) == shots(again) and shots(first) != shots(other)
    assert [c.classnames for c in first.clients] == [c.classnames for c in other.clients]  # class_seed=None
    shuffled = cross_cls(two_fake_datasets, seed=1, partition=CrossClass(2, class_seed=1)).setup()
    assert [c.classnames for c in shuffled.clients][:2] == [["DTD class 2", "DTD class 3"],
                                                            ["DTD class 0", "DTD class 1", "DTD class 4"]]


def test_combined_dataset_gives_the_clients_of_its_own_setup(two_fake_datasets):
    alone = DTD(root=str(two_fake_datasets / "dtd"), partition=CrossClass(2), num_shots=3, seed=4,
                subsample_classes="base").setup()
    combined = cross_cls(two_fake_datasets, seed=4).setup()
    dtd = [c for c in combined.clients if c.dataset == "dtd"]
    assert [(c.train, c.test, c.classnames) for c in dtd] == [(c.train, c.test, c.classnames) for c in alone.clients]
    assert [e.name for e in alone.eval_sets] == ["dtd/base", "dtd/novel"]
    assert alone.eval_sets[0].samples == combined.eval_set("dtd/base").samples


def test_combined_with_each_datasets_own_partition(two_fake_datasets):
    fed = Combined([DTD(root=str(two_fake_datasets / "dtd"), partition=Pathological(3)),
                    Food101(root=str(two_fake_datasets / "food-101"), partition=IID(2))], num_shots=2).setup()
    assert [c.dataset for c in fed.clients] == ["dtd"] * 3 + ["food101"] * 2
    # without CrossClass each client scores its dataset's whole list, labels as in the dataset
    assert all(c.classnames == [f"DTD class {k}" for k in range(9)] for c in fed.clients[:3])
    assert all(c.classnames == [f"Food101 class {k}" for k in range(6)] for c in fed.clients[3:])
    assert [e.name for e in fed.eval_sets] == ["dtd/all", "food101/all"]
    assert len(fed.eval_set("food101/all").samples) == 6 * 3


def test_combined_validation(two_fake_datasets):
    fed = cross_cls(two_fake_datasets, validation=True).setup()
    for client in fed.clients:
        assert len(client.val) == 2 * len(client.classnames)  # min(3 shots, 4) -> all 2 val images of a class
        assert all(s.path.split("/")[-2] == f"c{client.classnames[s.label].split()[-1]}" for s in client.val)


def test_combined_bad_input_is_one_clear_error(two_fake_datasets, tmp_path):
    dtd = DTD(root=str(two_fake_datasets / "dtd"))
    with pytest.raises(FedPromptError, match=r"data.datasets\[1\].num_shots is set to 8; .* set data.num_shots"):
        Combined([dtd, Food101(root=str(two_fake_datasets / "food-101"), num_shots=8)])
    with pytest.raises(FedPromptError, match="data.datasets is empty"):
        Combined([])
    with pytest.raises(FedPromptError, match="data.names has 1 names for 2 datasets"):
        Combined([dtd], unseen=[dtd], names=["a"])
    with pytest.raises(FedPromptError, match=r"data.names must be unique, got \['a', 'a'\] \('a' more than once\)"):
        Combined([dtd], unseen=[dtd], names=["a", "a"])
    with pytest.raises(FedPromptError, match="cannot be nested"):
        Combined([Combined([dtd])])
    with pytest.raises(FedPromptError, match=r"data.unseen\[0\] \(UCF101\): .*does not exist"):
        Combined([dtd], unseen=[UCF101(root=str(tmp_path / "nowhere"))]).setup()


# ------------------------------------------------------------------------------------ Combined, image loading
def test_combined_loader_routes_generated_images(tmp_path):
    Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "a.png")
    synthetic = Synthetic(num_classes=3, train_per_class=2, test_per_class=1, image_size=16, seed=5)
    fed = Combined([synthetic, Synthetic(num_classes=2, train_per_class=2, test_per_class=1, seed=6)],
                   partition=IID(1)).setup()
    assert [e.name for e in fed.eval_sets] == ["synthetic-domain0/all", "synthetic-domain0-2/all"]
    own = synthetic.read()
    first = fed.clients[0].train[0]
    assert first.path.startswith("combined0|")
    routed = np.asarray(fed.loader(first))
    direct = np.asarray(own.loader(Sample(first.path.split("|", 1)[1], first.label)))
    assert routed.shape == (16, 16, 3) and np.array_equal(routed, direct)
    second = np.asarray(fed.loader(fed.clients[1].train[0]))  # dataset 1: its own seed, its own images
    assert not np.array_equal(second, np.asarray(own.loader(Sample(fed.clients[1].train[0].path.split("|")[1], 0))))
    assert np.asarray(fed.loader(Sample(str(tmp_path / "a.png"), 0))).tolist()[0][0] == [10, 20, 30]


# -------------------------------------------------------------------------------------- Combined, real images
def test_combined_pacs_domains_and_cifar10_mini():
    pacs, cifar = require(PACS), require(CIFAR10)
    domains = ["photo", "sketch"]
    data = Combined([DomainFolders(root=str(pacs), domains=[d]) for d in domains] + [SplitFolders(root=str(cifar))],
                    unseen=[DomainFolders(root=str(pacs), domains=["cartoon"])], partition=CrossClass(2),
                    num_shots=8, subsample_classes="base", seed=0)
    fed = data.setup()
    assert [c.dataset for c in fed.clients] == ["pacs-mini-photo"] * 2 + ["pacs-mini-sketch"] * 2 + ["cifar10-mini"] * 2
    assert [c.classnames for c in fed.clients] == [["dog", "elephant"], ["giraffe", "guitar"]] * 2 + [
        ["airplane", "automobile"], ["bird", "cat", "deer"]]  # pacs base: 4 of 7 classes; cifar base: 5 of 10
    assert [len(c.train) for c in fed.clients] == [16, 16, 16, 16, 16, 24]  # 8 shots per class
    assert [len(c.test) for c in fed.clients][-2:] == [200, 300]  # cifar10-mini: 100 test images per class
    for client in fed.clients:
        assert all(Path(s.path).parent.name == client.classnames[s.label] for s in client.train + client.test)
        assert all(s.domain in ("", client.dataset.removeprefix("pacs-mini-")) for s in client.train)
    assert [(e.name, len(e.classnames), len(e.samples)) for e in fed.eval_sets] == [
        ("pacs-mini-photo/base", 4, 120), ("pacs-mini-photo/novel", 3, 90),
        ("pacs-mini-sketch/base", 4, 120), ("pacs-mini-sketch/novel", 3, 84),
        ("cifar10-mini/base", 5, 500), ("cifar10-mini/novel", 5, 500), ("pacs-mini-cartoon/all", 7, 210)]
    photo = DomainFolders(root=str(pacs), domains=["photo"]).read()
    base = fed.eval_set("pacs-mini-photo/base")
    assert {s.path for s in base.samples} == {s.path for s in photo.test if s.label < 4}
    assert all(Path(s.path).parent.name == base.classnames[s.label] for s in base.samples)
    assert fed.loader(fed.clients[-1].train[0]).size == (32, 32)
    again = data.setup()
    assert [c.train for c in again.clients] == [c.train for c in fed.clients]


# ---------------------------------------------------------------------------------------- CLI and the config
def test_partition_command_prints_own_class_lists(cli, two_fake_datasets, tmp_path):
    config = tmp_path / "cross.yaml"
    config.write_text(f"""
data:
  class_path: fedprompt.data.Combined
  init_args:
    subsample_classes: base
    num_shots: 3
    partition: {{class_path: fedprompt.data.CrossClass, init_args: {{classes_per_client: 2}}}}
    datasets:
      - {{class_path: fedprompt.data.DTD, init_args: {{root: {two_fake_datasets / 'dtd'}}}}}
      - {{class_path: fedprompt.data.Food101, init_args: {{root: {two_fake_datasets / 'food-101'}}}}}
    unseen:
      - {{class_path: fedprompt.data.OxfordPets, init_args: {{root: {two_fake_datasets / 'oxford_pets'}}}}}
""")
    code, out, err = cli("partition", "--config", config)
    assert code == 0, err
    assert "1 dtd/client1" in out and "DTD class 2, DTD class 3, DTD class 4" in out
    assert "oxford_pets/all" in out and "unseen" in out
    assert "4 clients with their own class lists from 2 dataset(s), 24 train / 24 test samples, 5 evaluation sets" in out
    code, out, _ = cli("partition", "--config", config, "--json", "true")
    table = json.loads(out)
    assert [c["classnames"] for c in table["clients"]][3] == ["Food101 class 2"]
    assert table["clients"][1]["train"] == [3, 3, 3] and table["clients"][1]["test"] == [3, 3, 3]
    assert table["eval_sets"][4] == {"name": "oxford_pets/all", "split": "all", "dataset": "oxford_pets",
                                     "seen": False, "classes": 4, "samples": 20}


def test_fedtpg_cross_cls_config_gives_the_official_clients(cli, tmp_path, monkeypatch):
    for reader, classes in NINE + [(EuroSAT, 10)]:
        make_coop(tmp_path / reader.default_dirname, reader, classes, {"train": 1, "test": 1})
    monkeypatch.setenv("FEDPROMPT_DATA", str(tmp_path))
    code, out, err = cli("partition", "--config", ROOT / "configs" / "fedtpg_cross_cls.yaml", "--json", "true")
    assert code == 0, err
    table = json.loads(out)
    datasets = [c["dataset"] for c in table["clients"]]
    names = ["caltech101", "oxford_flowers", "fgvc_aircraft", "ucf101", "oxford_pets", "food101", "dtd",
             "stanford_cars", "sun397"]
    assert [datasets.count(n) for n in names] == OFFICIAL_CLIENTS and len(datasets) == 30
    sizes = [len(c["classnames"]) for c in table["clients"]]
    assert sizes[:5] == [20, 30, 20, 20, 11] and sizes[-10:] == [20] * 9 + [19]
    assert [e["name"] for e in table["eval_sets"]][-3:] == ["sun397/base", "sun397/novel", "eurosat/all"]
    assert [(e["classes"], e["seen"]) for e in table["eval_sets"]][-3:] == [(199, True), (198, True), (10, False)]


def test_fedtpg_cross_cls_config_prints_and_names_missing_data(cli, monkeypatch):
    code, out, err = cli("fit", "--config", ROOT / "configs" / "fedtpg_cross_cls.yaml", "--print_config")
    assert code == 0, err
    assert "fedprompt.data.CrossClass" in out and "fedprompt.data.EuroSAT" in out
    assert "class_path: fedprompt.methods.FedTPG" in out and "lr_scope: client" in out
    monkeypatch.delenv("FEDPROMPT_DATA", raising=False)
    for command in ("partition", "fit"):
        code, _, err = cli(command, "--config", ROOT / "configs" / "fedtpg_cross_cls.yaml")
        assert code == 2, command
        assert "data.datasets[0] (Caltech101): data.root is not set" in err and "FEDPROMPT_DATA" in err, command
        assert "Traceback" not in err


def test_eval_set_is_a_plain_record():
    item = EvalSet("x/base", ["a", "b"], [Sample("p", 1)], "base", "x")
    assert item.seen and item.classnames[item.samples[0].label] == "b"
