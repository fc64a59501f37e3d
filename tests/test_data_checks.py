"""Data faults found while the data is indexed: empty class folders, unreadable images (all named at once, or left
out and listed), a failed download that leaves nothing behind, and CoOp data roots given as the parent folder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PACS, TINY, read_rows, require
from fedprompt.data import DomainFolders, SplitFolders
from fedprompt.data.check import image_problem
from fedprompt.data.coop import Caltech101, FGVCAircraft
from fedprompt.errors import FedPromptError
from test_data_readers import JSON_READERS, make_aircraft, make_coop_tree


def write_jpeg(path: Path, seed: int = 0, size: int = 32) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def make_split_folders(root: Path, classes=("cat", "dog"), per_class=(6, 3)) -> None:
    seed = 0
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            for i in range(n):
                write_jpeg(root / split / c / f"{i}.jpg", seed)
                seed += 1


# ------------------------------------------------------------------------------------------------- empty classes
def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    """The issue's case: an empty photo/zebra folder in PACS made an 8th class and changed the accuracies."""
    root = require(PACS)
    tree = tmp_path / "pacs"
    for domain in ("photo", "sketch"):
        for cls in (p for p in (root / domain).iterdir() if p.is_dir()):
            (tree / domain).mkdir(parents=True, exist_ok=True)
            (tree / domain / cls.name).symlink_to(cls)
    assert len(DomainFolders(root=str(tree)).read().classnames) == 7
    (tree / "photo" / "zebra").mkdir()
    with pytest.raises(FedPromptError) as err:
        DomainFolders(root=str(tree)).read()
    message = str(err.value)
    assert str(tree / "photo" / "zebra") in message and "--data.empty_classes drop" in message
    assert DomainFolders(root=str(tree), empty_classes="drop").read().classnames == \
        DomainFolders(root=str(root), domains=["photo", "sketch"]).read().classnames


def test_empty_class_dropped_on_request_with_a_warning(tmp_path, capsys):
    make_split_folders(tmp_path)
    (tmp_path / "train" / "zebra").mkdir()
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(FedPromptError, match="zebra"):
        SplitFolders(root=str(tmp_path)).read()
    data = SplitFolders(root=str(tmp_path), empty_classes="drop").read()
    assert data.classnames == ["cat", "dog"] and {s.label for s in data.train} == {0, 1}
    assert "fedprompt: warning: data: dropped 1 class(es) without any image" in capsys.readouterr().err


def test_domain_folders_drop_keeps_labels_aligned(tmp_path):
    for domain in ("a", "b"):
        for i, cls in enumerate(("ant", "bee")):
            write_jpeg(tmp_path / domain / cls / "0.jpg", i)
            write_jpeg(tmp_path / domain / cls / "1.jpg", i + 2)
    (tmp_path / "b" / "aardvark").mkdir()  # sorts first: dropping it must shift the labels
    data = DomainFolders(root=str(tmp_path), empty_classes="drop", test_fraction=0.5).read()
    assert data.classnames == ["ant", "bee"]
    assert all(Path(s.path).parent.name == data.classnames[s.label] for s in data.train + data.test)


# ------------------------------------------------------------------------------------------------- bad images
def test_image_problem_reads_headers_and_ends(tmp_path):
    good = write_jpeg(tmp_path / "good.jpg", size=128)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])  # cut inside the image data
    (tmp_path / "cut-header.jpg").write_bytes(good[:200])
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:-12])
    assert image_problem(str(tmp_path / "good.jpg")) is None and image_problem(str(tmp_path / "good.png")) is None
    assert image_problem(str(tmp_path / "empty.jpg")) == "empty file"
    assert image_problem(str(tmp_path / "cut.jpg")) == "truncated JPEG (no end marker)"
    assert image_problem(str(tmp_path / "cut.png")) == "truncated PNG (no end marker)"
    assert image_problem(str(tmp_path / "cut-header.jpg")) == "truncated file (cut inside its header)"
    assert image_problem(str(tmp_path / "text.jpg")) == "not an image PIL can read"
    assert image_problem(str(tmp_path / "missing.jpg")) == "file not found"


def break_images(root: Path) -> list[str]:
    """A zero-byte train image and a truncated test image; returns their paths."""
    empty, cut = root / "train" / "cat" / "0.jpg", root / "test" / "dog" / "1.jpg"
    empty.write_bytes(b"")
    cut.write_bytes(cut.read_bytes()[:200])
    return [str(empty), str(cut)]


def test_every_bad_image_is_reported_at_once(tmp_path):
    make_split_folders(tmp_path)
    bad = break_images(tmp_path)
    with pytest.raises(FedPromptError) as err:
        SplitFolders(root=str(tmp_path)).setup()
    message = str(err.value)
    assert "2 image file(s) cannot be read" in message and "--data.on_bad_image skip" in message
    assert f"{bad[0]} (empty file)" in message and f"{bad[1]} (truncated file" in message


def test_bad_images_skipped_on_request(tmp_path):
    make_split_folders(tmp_path)
    bad = break_images(tmp_path)
    splits = SplitFolders(root=str(tmp_path), on_bad_image="skip", partition=None).setup()
    used = {s.path for c in splits.clients for s in c.train + c.test}
    assert not used & set(bad) and len(used) == 12 + 6 - 2
    assert [path for path, _ in splits.bad_images] == bad


def test_fit_lists_skipped_images_in_the_run_directory(cli, tmp_path):
    make_split_folders(tmp_path / "data")
    bad = break_images(tmp_path / "data")
    config = ["--data", "SplitFolders", "--data.root", tmp_path / "data", "--data.partition", "IID",
              "--data.partition.num_clients", "2", "--method", "PromptFL", "--method.n_ctx", "2", *TINY,
              "--federation.rounds", "1", "--log.progress", "false", "--fabric.accelerator", "cpu"]
    code, _, err = cli("fit", *config, "--out_dir", tmp_path / "a")
    assert code == 2 and "2 image file(s) cannot be read" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("fit", *config, "--out_dir", tmp_path / "b", "--data.on_bad_image", "skip")
    assert code == 0, err
    listed = (tmp_path / "b" / "bad_images.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == bad and len(read_rows(tmp_path / "b")) == 1


# ---------------------------------------------------------------------------------------------- failed downloads
def test_failed_cifar_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    import torchvision

    def offline(root, train=True, download=False):
        Path(root, "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)  # torchvision may make folders
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    from fedprompt.data import CIFAR

    target = tmp_path / "data" / "cifar-10"
    with pytest.raises(FedPromptError, match="could not download"):
        CIFAR(root=str(target), download=True).read()
    assert not (tmp_path / "data").exists()


def test_failed_coop_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "Caltech101",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no network")))
    with pytest.raises(FedPromptError, match="could not download"):
        Caltech101(root=str(tmp_path / "caltech-101"), download=True).read()
    assert not (tmp_path / "caltech-101").exists()


# ---------------------------------------------------------------------------------------------- CoOp data roots
@pytest.mark.parametrize("reader,image_dir,split_file,classes", [JSON_READERS[0], JSON_READERS[4]],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_coop_root_may_be_the_folder_holding_the_datasets(tmp_path, reader, image_dir, split_file, classes):
    make_coop_tree(tmp_path / reader.default_dirname, image_dir, split_file, classes)
    own = reader(root=str(tmp_path / reader.default_dirname)).read()
    parent = reader(root=str(tmp_path)).read()
    assert parent.classnames == own.classnames and parent.train == own.train and parent.test == own.test


def test_fgvc_root_may_be_the_folder_holding_the_datasets(tmp_path):
    make_aircraft(tmp_path / "fgvc_aircraft")
    own = FGVCAircraft(root=str(tmp_path / "fgvc_aircraft")).read()
    assert FGVCAircraft(root=str(tmp_path)).read().train == own.train
