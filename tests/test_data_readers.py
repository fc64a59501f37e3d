"""Dataset readers on tiny fake trees in each dataset's exact on-disk layout, the restricted unpickler, and the
shipped dataset configs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedprompt.data import coop
from fedprompt.data.coop import (DTD, SUN397, UCF101, Caltech101, EuroSAT, FGVCAircraft, Flowers102, Food101,
                                 OxfordPets, StanfordCars)
from fedprompt.data.reader import FederatedData
from fedprompt.data.fedbn import DomainNet, OfficeCaltech10
from fedprompt.data.partition import ByDomain, Pathological
from fedprompt.data.safe_pickle import safe_load, safe_loads
from fedprompt.errors import FedPromptError

REPO = Path(__file__).resolve().parents[1]


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


# ------------------------------------------------------------------------------------------- CoOp split files
# (reader, image folder, split file, [(class folder, name stored in the split json, expected prompt name)])
JSON_READERS = [
    (Caltech101, "101_ObjectCategories", "split_zhou_Caltech101.json",
     [("yin_yang", "yin_yang", "yin yang"), ("Faces", "face", "face"), ("accordion", "accordion", "accordion")]),
    (OxfordPets, "images", "split_zhou_OxfordPets.json",
     [("", "american_bulldog", "american bulldog"), ("", "abyssinian", "abyssinian"), ("", "pug", "pug")]),
    (Flowers102, "jpg", "split_zhou_OxfordFlowers.json",
     [("", "pink primrose", "pink primrose"), ("", "hard-leaved pocket orchid", "hard-leaved pocket orchid"),
      ("", "canterbury bells", "canterbury bells")]),
    (Food101, "images", "split_zhou_Food101.json",
     [("apple_pie", "apple_pie", "apple pie"), ("baby_back_ribs", "baby_back_ribs", "baby back ribs"),
      ("waffles", "waffles", "waffles")]),
    (DTD, "images", "split_zhou_DescribableTextures.json",
     [("banded", "banded", "banded"), ("zigzagged", "zigzagged", "zigzagged"), ("blotchy", "blotchy", "blotchy")]),
    (StanfordCars, "", "split_zhou_StanfordCars.json",
     [("cars_train", "2012 Tesla Model S", "2012 Tesla Model S"), ("cars_test", "AM General Hummer SUV 2000",
                                                                   "AM General Hummer SUV 2000"),
      ("cars_train", "Acura RL Sedan 2012", "Acura RL Sedan 2012")]),
    (UCF101, "UCF-101-midframes", "split_zhou_UCF101.json",
     [("Apply_Eye_Makeup", "Apply_Eye_Makeup", "Apply Eye Makeup"), ("Archery", "Archery", "Archery"),
      ("YoYo", "Yo_Yo", "Yo Yo")]),
    (SUN397, "SUN397", "split_zhou_SUN397.json",
     [("a/abbey", "abbey", "abbey"), ("b/bus_interior", "bus_interior", "bus interior"),
      ("c/church/outdoor", "outdoor church", "outdoor church")]),
    (EuroSAT, "2750", "split_zhou_EuroSAT.json",
     [("AnnualCrop", "Annual Crop Land", "Annual Crop Land"), ("SeaLake", "SeaLake", "Sea or Lake"),
      ("Forest", "Forest", "Forest")]),
]
SIZES = {"train": 3, "val": 1, "test": 2}  # images per class per split


def make_coop_tree(root: Path, image_dir: str, split_file: str, classes, sizes=SIZES) -> dict:
    split = {}
    seed = 0
    for name, count in sizes.items():
        items = []
        for label, (folder, stored, _) in enumerate(classes):
            for i in range(count):
                rel = f"{folder}/{name}_{label}_{i}.jpg" if folder else f"{name}_{label}_{i}.jpg"
                write_image(root / image_dir / rel, seed)
                seed += 1
                items.append([rel, label, stored])
        split[name] = items
    (root / split_file).write_text(json.dumps(split))
    return split


@pytest.mark.parametrize("reader,image_dir,split_file,classes", JSON_READERS, ids=lambda x: getattr(x, "__name__", ""))
def test_coop_reader(tmp_path, reader, image_dir, split_file, classes):
    root = tmp_path / reader.default_dirname
    split = make_coop_tree(root, image_dir, split_file, classes)
    data = reader(root=str(root)).read()
    assert data.classnames == [expected for _, _, expected in classes]  # label order, cleaned
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 6)
    assert [s.label for s in data.train] == [item[1] for item in split["train"]]
    assert [s.label for s in data.test] == [0, 0, 1, 1, 2, 2]
    assert all(os.path.isfile(s.path) for s in data.train + data.val + data.test)
    image_root = root / image_dir if image_dir else root
    assert data.train[0].path == str(image_root / split["train"][0][0])
    assert isinstance(reader(root=str(root)).default_partition(), Pathological)


def test_coop_reader_through_env_and_setup(tmp_path, monkeypatch):
    make_coop_tree(tmp_path / "dtd", "images", "split_zhou_DescribableTextures.json", JSON_READERS[4][3],
                   sizes={"train": 6, "val": 1, "test": 2})
    monkeypatch.setenv("FEDPROMPT_DATA", str(tmp_path))
    fed = DTD(num_shots=2, partition=Pathological(3)).setup()
    assert [len(c.train) for c in fed.clients] == [2, 2, 2]  # one class each, 2 shots
    assert fed.classnames == ["banded", "zigzagged", "blotchy"]


def test_coop_missing_split_file(tmp_path):
    (tmp_path / "101_ObjectCategories").mkdir()
    with pytest.raises(FedPromptError, match="split_zhou_Caltech101.json") as err:
        Caltech101(root=str(tmp_path)).read()
    assert "DATASETS.md" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"train": [["a.jpg", "0", "x"]], "test": []}), "entry 0 of 'train'"),
    (json.dumps({"train": [["a.jpg", 0]], "test": []}), "entry 0 of 'train'"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]], "test": []}), "named both"),
    (json.dumps({"train": [["a.jpg", 1, "x"]], "test": []}), "0..C-1"),
    (json.dumps({"train": [["a.jpg", 0, "x"]], "test": [["b.jpg", 3, "z"]]}), "never occur"),
])
def test_coop_malformed_split_file(tmp_path, content, match):
    (tmp_path / "images").mkdir()
    (tmp_path / "split_zhou_Food101.json").write_text(content)
    with pytest.raises(FedPromptError, match=match) as err:
        Food101(root=str(tmp_path)).read()
    assert "split_zhou_Food101.json" in str(err.value)


def test_coop_images_do_not_match_split(tmp_path):
    make_coop_tree(tmp_path, "images", "split_zhou_OxfordPets.json", JSON_READERS[1][3])
    os.remove(tmp_path / "images" / "train_0_0.jpg")
    with pytest.raises(FedPromptError, match="train_0_0.jpg"):
        OxfordPets(root=str(tmp_path)).read()
    food = tmp_path / "food-101"  # split file present, images/ folder absent
    food.mkdir()
    (food / "split_zhou_Food101.json").write_text(json.dumps({"train": [["a.jpg", 0, "x"]], "test": []}))
    with pytest.raises(FedPromptError, match=r"image folder .*images not found"):
        Food101(root=str(food)).read()


# ------------------------------------------------------------------------------------------------ FGVC-Aircraft
def make_aircraft(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "variants.txt").write_text("707-320\nA300B4\nF/A-18\n")
    lines = {"train": ["1025794 707-320", "1340192 707-320", "0056978 A300B4", "0061581 F/A-18", "0079876 F/A-18"],
             "val": ["2000001 A300B4"], "test": ["3000001 F/A-18", "3000002 707-320"]}
    for split, rows in lines.items():
        (root / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
        for i, row in enumerate(rows):
            write_image(root / "images" / f"{row.split(' ')[0]}.jpg", i)


def test_fgvc_aircraft(tmp_path):
    make_aircraft(tmp_path)
    data = FGVCAircraft(root=str(tmp_path)).read()
    assert data.classnames == ["707-320", "A300B4", "F/A-18"]
    assert [s.label for s in data.train] == [0, 0, 1, 2, 2]
    assert [s.label for s in data.val] == [1] and [s.label for s in data.test] == [2, 0]
    assert data.train[3].path == str(tmp_path / "images" / "0061581.jpg")


def test_fgvc_aircraft_missing_and_malformed(tmp_path):
    make_aircraft(tmp_path)
    (tmp_path / "images_variant_val.txt").write_text("2000001 Boeing 999\n")
    with pytest.raises(FedPromptError, match=r"images_variant_val.txt, line 1"):
        FGVCAircraft(root=str(tmp_path)).read()
    os.remove(tmp_path / "images_variant_val.txt")
    with pytest.raises(FedPromptError, match="images_variant_val.txt is missing"):
        FGVCAircraft(root=str(tmp_path)).read()


# -------------------------------------------------------------------------------------------- torchvision download
def test_download_links_torchvision_layout(tmp_path, monkeypatch):
    import torchvision

    calls = []

    class FakeEuroSAT:  # writes what torchvision.datasets.EuroSAT extracts: <root>/eurosat/2750/<class>/*.jpg
        def __init__(self, root, download=False, **kwargs):
            calls.append((root, download))
            for label, cls in enumerate(["AnnualCrop", "SeaLake"]):
                for i in range(2):
                    write_image(Path(root) / "eurosat" / "2750" / cls / f"{cls}_{i}.jpg", label * 2 + i)

    monkeypatch.setattr(torchvision.datasets, "EuroSAT", FakeEuroSAT)
    root = tmp_path / "eurosat"
    split = {"train": [["AnnualCrop/AnnualCrop_0.jpg", 0, "Annual Crop Land"],
                       ["SeaLake/SeaLake_0.jpg", 1, "Sea or Lake"]],
             "val": [],
             "test": [["AnnualCrop/AnnualCrop_1.jpg", 0, "Annual Crop Land"], ["SeaLake/SeaLake_1.jpg", 1, "Sea or Lake"]]}
    with pytest.raises(FedPromptError, match="split_zhou_EuroSAT.json"):  # images downloaded, split still missing
        EuroSAT(root=str(root), download=True).read()
    assert (root / "2750").is_symlink() and calls == [(str(root / "torchvision"), True)]
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    data = EuroSAT(root=str(root), download=True).read()
    assert data.classnames == ["Annual Crop Land", "Sea or Lake"] and len(calls) == 1  # no second download
    assert os.path.isfile(data.test[1].path)


def test_download_optional_parts_and_fgvc_files(tmp_path, monkeypatch):
    import torchvision

    class FakeDTD:  # <root>/dtd/dtd/{images,labels}; no imdb folder (an optional part)
        def __init__(self, root, download=False, **kwargs):
            write_image(Path(root) / "dtd" / "dtd" / "images" / "banded" / "banded_0001.jpg")
            (Path(root) / "dtd" / "dtd" / "labels").mkdir(parents=True)

    class FakeAircraft:  # <root>/fgvc-aircraft-2013b/data/{images, *.txt}
        def __init__(self, root, download=False, annotation_level="variant", **kwargs):
            assert annotation_level == "variant"
            make_aircraft(Path(root) / "fgvc-aircraft-2013b" / "data")

    monkeypatch.setattr(torchvision.datasets, "DTD", FakeDTD)
    monkeypatch.setattr(torchvision.datasets, "FGVCAircraft", FakeAircraft)
    with pytest.raises(FedPromptError, match="split_zhou_DescribableTextures.json"):
        DTD(root=str(tmp_path / "dtd"), download=True).read()
    assert (tmp_path / "dtd" / "images").is_dir() and (tmp_path / "dtd" / "labels").is_dir()
    assert not (tmp_path / "dtd" / "imdb").exists()
    data = FGVCAircraft(root=str(tmp_path / "fgvc_aircraft"), download=True).read()
    assert data.classnames == ["707-320", "A300B4", "F/A-18"] and len(data.train) == 5


def test_download_failure_is_clear(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "Caltech101", offline)
    with pytest.raises(FedPromptError, match="could not download.*no network"):
        Caltech101(root=str(tmp_path / "caltech-101"), download=True).read()


# ---------------------------------------------------------------------------------------------------- FedBN pickles
DOMAINNET_CLASSES = ["zebra", "bird", "ice_cream"]  # a subset, in pickle (not sorted) order


def make_domainnet(data_root: Path, sites=("clipart", "real"), prefix="DomainNet/", as_numpy=False, protocol=4):
    """FedBN layout: <data>/DomainNet/<site>_{train,test}.pkl holding (paths relative to <data>, text labels)."""
    folder = data_root / "DomainNet"
    seed = 0
    for site in sites:
        for split, count in (("train", 3), ("test", 1)):
            paths, labels = [], []
            for cls in DOMAINNET_CLASSES:
                for i in range(count):
                    rel = f"{site}/{cls}/{site}_{split}_{cls}_{i}.jpg"
                    write_image(folder / rel, seed)
                    seed += 1
                    paths.append(prefix + rel)
                    labels.append(cls)
            pair = (np.array(paths), np.array(labels)) if as_numpy else (paths, labels)
            (folder / f"{site}_{split}.pkl").write_bytes(pickle.dumps(pair, protocol=protocol))
    return folder


def test_domainnet_pickles(tmp_path):
    root = make_domainnet(tmp_path)
    data = DomainNet(root=str(root), domains=["clipart", "real"]).read()
    # the 10 FedBN classes, sorted, underscores as spaces
    assert data.classnames == ["bird", "feather", "headphones", "ice cream", "teapot", "tiger", "whale", "windmill",
                               "wine glass", "zebra"]
    assert (len(data.train), len(data.test)) == (18, 6)
    assert data.domains == ["clipart", "real"]
    assert [s.label for s in data.train[:9]] == [9, 9, 9, 0, 0, 0, 3, 3, 3]  # zebra, bird, ice_cream
    assert all(os.path.isfile(s.path) for s in data.train + data.test)
    assert data.train[0].path == str(root / "clipart" / "zebra" / "clipart_train_zebra_0.jpg")
    fed = DomainNet(root=str(root), domains=["clipart", "real"]).setup()
    assert [c.name for c in fed.clients] == ["clipart", "real"] and [len(c.train) for c in fed.clients] == [9, 9]


@pytest.mark.parametrize("prefix", ["DomainNet/", "../data/DomainNet/", "", "/old/machine/domainnet_v1/"])
def test_domainnet_pickle_paths_resolved(tmp_path, prefix):
    root = make_domainnet(tmp_path, sites=("sketch",), prefix=prefix, as_numpy=True, protocol=2)
    data = DomainNet(root=str(root), domains=["sketch"]).read()
    assert all(os.path.isfile(s.path) for s in data.train + data.test) and len(data.train) == 9


def test_domainnet_root_may_be_the_data_folder(tmp_path):
    make_domainnet(tmp_path, sites=("quickdraw",))
    data = DomainNet(root=str(tmp_path), domains=["quickdraw"]).read()
    assert len(data.test) == 3


def test_domainnet_images_missing_one_error(tmp_path):
    root = make_domainnet(tmp_path, sites=("clipart",))
    for p in (root / "clipart" / "bird").iterdir():
        p.unlink()
    with pytest.raises(FedPromptError, match=r"clipart_train.pkl: 3 of 9 images not found") as err:
        DomainNet(root=str(root), domains=["clipart"]).read()
    assert "clipart_train.pkl" in str(err.value) and "expected" in str(err.value)


def test_domainnet_missing_and_malformed_pickles(tmp_path):
    root = make_domainnet(tmp_path, sites=("clipart",))
    with pytest.raises(FedPromptError, match="painting_train.pkl is missing"):
        DomainNet(root=str(root), domains=["clipart", "painting"]).read()
    with pytest.raises(FedPromptError, match="not DomainNet sites"):
        DomainNet(root=str(root), domains=["cartoon"])
    (root / "clipart_test.pkl").write_bytes(pickle.dumps(["only paths"]))
    with pytest.raises(FedPromptError, match="clipart_test.pkl: expected a pickled pair"):
        DomainNet(root=str(root), domains=["clipart"]).read()
    (root / "clipart_test.pkl").write_bytes(pickle.dumps((["a.jpg"], ["unicorn"])))
    with pytest.raises(FedPromptError, match=r"clipart_test.pkl: labels \['unicorn'\]"):
        DomainNet(root=str(root), domains=["clipart"]).read()
    (root / "clipart_test.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(FedPromptError, match="clipart_test.pkl: not a readable pickle"):
        DomainNet(root=str(root), domains=["clipart"]).read()


def test_office_pickles_all_sites(tmp_path):
    root = tmp_path / "office_caltech_10"
    for site in ("amazon", "caltech", "dslr", "webcam"):
        for split in ("train", "test"):
            rel = f"{site}/mug/{split}.jpg"
            write_image(root / rel)
            (root / f"{site}_{split}.pkl").write_bytes(pickle.dumps(([f"office_caltech_10/{rel}"], ["mug"])))
    data = OfficeCaltech10(root=str(root)).read()
    assert data.classnames[:3] == ["back pack", "bike", "calculator"] and data.classnames[8] == "mug"
    assert data.domains == ["amazon", "caltech", "dslr", "webcam"] and {s.label for s in data.train} == {8}
    assert isinstance(OfficeCaltech10(root=str(root)).default_partition(), ByDomain)


# ---------------------------------------------------------------------------------------------------- image folders
def test_office_image_folders(tmp_path):
    root = tmp_path / "office_caltech_10"
    seed = 0
    for site in ("amazon", "webcam"):
        for cls in OfficeCaltech10.default_classes + ("ruler",):
            for i in range(4):
                write_image(root / site / cls / f"{i}.jpg", seed)
                seed += 1
    data = OfficeCaltech10(root=str(root), test_fraction=0.25).read()
    assert data.classnames == ["back pack", "bike", "calculator", "headphones", "keyboard", "laptop computer",
                               "monitor", "mouse", "mug", "projector"]  # 'ruler' is not an Office-Caltech10 class
    assert (len(data.train), len(data.test)) == (60, 20) and data.domains == ["amazon", "webcam"]
    every = OfficeCaltech10(root=str(root), all_classes=True).read()
    assert len(every.classnames) == 11 and "ruler" in every.classnames
    with pytest.raises(FedPromptError, match="no images of"):
        OfficeCaltech10(root=str(root), classes=["mug", "stapler"]).read()


def test_fedbn_nothing_there(tmp_path):
    with pytest.raises(FedPromptError, match="clipart_train.pkl"):
        DomainNet(root=str(tmp_path)).read()
    with pytest.raises(FedPromptError, match="layout"):
        DomainNet(root=str(tmp_path), layout="zip")


# ----------------------------------------------------------------------------------------------------- safe pickles
class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_safe_pickle_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps((["a.jpg"], [Exploit(marker)])))
    with pytest.raises(FedPromptError, match=r"evil.pkl.*(posix|os|nt)\.system"):
        safe_load(path)
    assert not marker.exists()
    with pytest.raises(FedPromptError, match="builtins.eval"):
        safe_loads(pickle.dumps(eval), "x.pkl")
    with pytest.raises(FedPromptError, match="evil.pkl"):  # the FedBN reader goes through it too
        from fedprompt.data.fedbn import read_fedbn_pickle
        read_fedbn_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_pickle_accepts_data(protocol):
    values = [(["a/b.jpg", "c.jpg"], ["bird", "zebra"]), np.array(["a/b.jpg", "c"]), np.array([1, 2, 3]),
              np.array(["x", 1], dtype=object), {"k": [1.5, None, True]}, {1, 2}, np.str_("bird"), b"raw"]
    for value in values:
        loaded = safe_loads(pickle.dumps(value, protocol=protocol))
        if isinstance(value, np.ndarray):
            assert loaded.dtype == value.dtype and loaded.tolist() == value.tolist()
        else:
            assert loaded == value


def test_safe_pickle_missing_file(tmp_path):
    with pytest.raises(FedPromptError, match="not found"):
        safe_load(tmp_path / "none.pkl")


# ------------------------------------------------------------------------------------------------------- configs
CONFIGS = sorted((REPO / "configs" / "datasets").glob("*.yaml"))


def test_dataset_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"caltech101", "oxford_pets", "oxford_flowers", "food101", "dtd", "stanford_cars", "fgvc_aircraft",
            "ucf101", "sun397", "eurosat", "domainnet", "office_caltech10", "cifar10", "cifar100"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dataset_config_instantiates(path):
    jsonargparse = pytest.importorskip("jsonargparse")
    text = path.read_text()
    assert text.startswith("#"), "the first line says which paper setting the file reproduces"
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=FederatedData)
    cfg = parser.parse_string(text)
    data = parser.instantiate_classes(cfg).data
    assert isinstance(data, FederatedData)
    assert data.partition is not None and data.dirname


def test_every_reader_has_a_documented_download_choice():
    for reader in coop.COOP_READERS:
        has_download = issubclass(reader, coop.TorchvisionDownload)
        assert has_download == (reader not in (StanfordCars, UCF101))
