"""ImageNet and its variants on small fake trees in CoOp's layout (a few classes, generated images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedprompt.data import ImageNet, ImageNetA, ImageNetR, ImageNetSketch, ImageNetV2, Pathological
from fedprompt.data.imagenet import index_folders, read_classnames
from fedprompt.errors import FedPromptError

# classnames.txt in CoOp's format, deliberately not in wnid order
CLASSES = {"n03000000": "zebra crossing", "n01000000": "goldfish", "n02000000": "great white shark",
           "n04000000": "teapot"}
WNIDS = sorted(CLASSES)


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def write_classnames(folder: Path, classes: dict[str, str] = CLASSES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in classes.items()))


def make_imagenet(root: Path, wnids=WNIDS, train=3, val=2) -> Path:
    """imagenet/images/{train,val}/<wnid>/*.JPEG + classnames.txt."""
    seed = 0
    for split, count in (("train", train), ("val", val)):
        for wnid in wnids:
            for i in range(count):
                write_image(root / "images" / split / wnid / f"{wnid}_{i}.JPEG", seed)
                seed += 1
    write_classnames(root)
    return root


def make_variant(root: Path, image_dir: str, folders: list[str], per_class=2, suffix=".jpg") -> Path:
    for k, folder in enumerate(folders):
        for i in range(per_class):
            write_image(root / image_dir / folder / f"{i}{suffix}", 100 * k + i)
    write_classnames(root)
    return root


# --------------------------------------------------------------------------------------------------- ImageNet
def test_imagenet_reads_coop_layout(tmp_path, capsys):
    root = make_imagenet(tmp_path / "imagenet")
    data = ImageNet(root=str(root), num_classes=4).read()
    assert data.classnames == ["goldfish", "great white shark", "zebra crossing", "teapot"]  # sorted wnids
    assert (len(data.train), len(data.test), len(data.val)) == (12, 8, 0)  # val is the test set
    assert [s.label for s in data.test] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert data.train[0].path == str(root / "images" / "train" / "n01000000" / "n01000000_0.JPEG")
    assert data.test[-1].path.endswith("val/n04000000/n04000000_1.JPEG")
    assert "ImageNet: listed 12 train and 8 val images of 4 classes in" in capsys.readouterr().err
    assert isinstance(ImageNet(root=str(root)).default_partition(), Pathological)


def test_imagenet_setup_few_shot_and_data_folder_root(tmp_path):
    make_imagenet(tmp_path / "imagenet", train=4)
    # root may be the folder that holds imagenet/ (CoOp's DATA folder)
    fed = ImageNet(root=str(tmp_path), num_classes=4, num_shots=2, partition=Pathological(2)).setup()
    assert [len(c.train) for c in fed.clients] == [4, 4]  # 2 classes x 2 shots each
    assert fed.eval_sets[0].name == "imagenet/all" and len(fed.eval_sets[0].samples) == 8


def test_imagenet_wrong_class_count(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    with pytest.raises(FedPromptError, match=r"has 4 class folders, expected 1000.*--data.num_classes 4"):
        ImageNet(root=str(root)).read()
    assert len(ImageNet(root=str(root), num_classes=None).read().classnames) == 4


def test_imagenet_missing_class_list(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    (root / "classnames.txt").unlink()
    with pytest.raises(FedPromptError, match=r"class list .*imagenet/classnames.txt is missing") as err:
        ImageNet(root=str(root), num_classes=4).read()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text,match", [
    ("n01000000\n", "has no class name"),
    ("n01000000 goldfish\nn01000000 carp\n", "occurs twice"),
    ("\n\n", "no classes"),
])
def test_malformed_class_list(tmp_path, text, match):
    (tmp_path / "classnames.txt").write_text(text)
    with pytest.raises(FedPromptError, match=match):
        read_classnames(tmp_path / "classnames.txt", "ImageNet")


def test_imagenet_folder_problems(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    write_image(root / "images" / "train" / "n09999999" / "x.JPEG", 7)  # a wnid not in classnames.txt
    with pytest.raises(FedPromptError, match=r"1 class folder\(s\) of .*train are not in .*classnames.txt: n09999999"):
        ImageNet(root=str(root), num_classes=None).read()
    other = make_imagenet(tmp_path / "other" / "imagenet")
    write_image(other / "images" / "val" / "n05000000" / "x.JPEG", 7)
    with pytest.raises(FedPromptError, match=r"n05000000; val and train must hold the same classes"):
        ImageNet(root=str(other), num_classes=None).read()


def test_imagenet_val_not_in_class_folders(tmp_path):
    root = make_imagenet(tmp_path / "imagenet", val=0)
    for i in range(3):
        write_image(root / "images" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", i)
    with pytest.raises(FedPromptError, match=r"holds 3 images but no class folders; sort them into <wnid>/ folders"):
        ImageNet(root=str(root), num_classes=4).read()


def test_imagenet_empty_class_is_an_error_or_dropped(tmp_path, capsys):
    root = make_imagenet(tmp_path / "imagenet")
    for split in ("train", "val"):
        for path in (root / "images" / split / "n02000000").iterdir():
            path.unlink()
    with pytest.raises(FedPromptError, match=r"without any image in any split: .*train/n02000000"):
        ImageNet(root=str(root), num_classes=4).read()
    data = ImageNet(root=str(root), num_classes=4, empty_classes="drop").read()
    assert data.classnames == ["goldfish", "zebra crossing", "teapot"] and {s.label for s in data.test} == {0, 1, 2}
    assert "dropped 1 class(es)" in capsys.readouterr().err


def test_imagenet_bad_files_named_in_one_message(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    cut = root / "images" / "train" / "n01000000" / "n01000000_1.JPEG"
    cut.write_bytes(cut.read_bytes()[:40])  # cut short inside its header
    (root / "images" / "val" / "n04000000" / "n04000000_0.JPEG").write_bytes(b"")
    with pytest.raises(FedPromptError, match=r"2 image file\(s\) cannot be read") as err:
        ImageNet(root=str(root), num_classes=4).setup()
    assert "n01000000_1.JPEG" in str(err.value) and "n04000000_0.JPEG (empty file)" in str(err.value)


def test_listing_opens_no_image(tmp_path, monkeypatch):
    """The folder listing takes file types from the directory entries: no image is opened by PIL."""
    root = make_imagenet(tmp_path / "imagenet")
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("an image was opened while listing"))
    classes, loose = index_folders(root / "images" / "train")
    assert sorted(classes) == WNIDS and loose == 0 and all(len(v) == 3 for v in classes.values())
    assert len(ImageNet(root=str(root), num_classes=4).read().train) == 12


# --------------------------------------------------------------------------------------------------- variants
def test_imagenet_v2_folder_i_is_the_ith_sorted_wnid(tmp_path):
    root = make_variant(tmp_path / "imagenetv2", "imagenetv2-matched-frequency-format-val", ["0", "1", "2", "3"],
                        suffix=".jpeg")
    data = ImageNetV2(root=str(root), num_classes=4).read()
    assert data.classnames == imagenet_classnames() and not data.train
    assert [s.label for s in data.test] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert data.test[2].path.endswith("imagenetv2-matched-frequency-format-val/1/0.jpeg")


def imagenet_classnames() -> list[str]:
    return [CLASSES[w] for w in WNIDS]


def test_imagenet_v2_checks(tmp_path):
    root = make_variant(tmp_path / "a" / "imagenetv2", "imagenetv2-matched-frequency-format-val", ["0", "1", "2"])
    with pytest.raises(FedPromptError, match=r"has 3 class folders, expected 1000"):
        ImageNetV2(root=str(root)).read()
    with pytest.raises(FedPromptError, match=r"classnames.txt has 4 classes but .* has 3 class folders"):
        ImageNetV2(root=str(root), num_classes=3).read()
    odd = make_variant(tmp_path / "b" / "imagenetv2", "imagenetv2-matched-frequency-format-val",
                       ["0", "1", "2", "n04000000"])
    with pytest.raises(FedPromptError, match=r"must be named 0..3 .*found n04000000"):
        ImageNetV2(root=str(odd), num_classes=4).read()


def test_imagenet_sketch(tmp_path):
    root = make_variant(tmp_path / "imagenet-sketch", "images", WNIDS, per_class=1, suffix=".JPEG")
    data = ImageNetSketch(root=str(root), num_classes=4).read()
    assert data.classnames == imagenet_classnames() and len(data.test) == 4 and data.name == "imagenet-sketch"


@pytest.mark.parametrize("reader,dirname,image_dir", [(ImageNetA, "imagenet-adversarial", "imagenet-a"),
                                                      (ImageNetR, "imagenet-rendition", "imagenet-r")])
def test_imagenet_a_and_r_use_their_own_class_list(tmp_path, reader, dirname, image_dir):
    """The 200-class subsets are scored among their own classes: here 2 of the 4 ImageNet classes."""
    root = make_variant(tmp_path / dirname, image_dir, ["n04000000", "n02000000"])
    (root / image_dir / "README.txt").write_text("ignored")
    data = reader(root=str(root), num_classes=2).read()
    assert data.classnames == ["great white shark", "teapot"]  # sorted wnids: the 2-way list, not ImageNet's
    assert [s.label for s in data.test] == [0, 0, 1, 1]
    with pytest.raises(FedPromptError, match=r"has 2 class folders, expected 200"):
        reader(root=str(root)).read()
    assert reader(root=str(tmp_path), num_classes=2).read().classnames == data.classnames  # the DATA folder as root


def test_variant_folder_not_in_class_list_and_missing_list(tmp_path):
    root = make_variant(tmp_path / "imagenet-rendition", "imagenet-r", ["n04000000", "n07777777"])
    with pytest.raises(FedPromptError, match=r"not in .*classnames.txt: n07777777"):
        ImageNetR(root=str(root), num_classes=2).read()
    (root / "classnames.txt").unlink()
    with pytest.raises(FedPromptError, match=r"ImageNetR: the class list .*classnames.txt is missing"):
        ImageNetR(root=str(root), num_classes=2).read()


def test_variants_are_test_only(tmp_path):
    root = make_variant(tmp_path / "imagenet-adversarial", "imagenet-a", ["n04000000"])
    with pytest.raises(FedPromptError, match=r"ImageNetA is a test-only dataset.*fedprompt.data.Transfer"):
        ImageNetA(root=str(root), num_classes=1).setup()
    empty = tmp_path / "empty"
    write_classnames(empty)
    with pytest.raises(FedPromptError, match=r"image folder .*empty/imagenet-a is missing"):
        ImageNetA(root=str(empty), num_classes=1).read()
