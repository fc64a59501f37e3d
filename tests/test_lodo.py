"""Leave-one-domain-out: the DomainBed-layout readers (PACS, VLCS, Office-Home; DomainNet as folders), their layout
checks, and the LeaveOneDomainOut scenario (sources as clients, the held-out domain as the target set)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conftest import PACS, require
from fedprompt.data import ByDomain, DomainNet, LeaveOneDomainOut, OfficeHome, VLCS
from fedprompt.data import PACS as PACSReader
from fedprompt.errors import FedPromptError


def domainbed_folder(root: Path, domains, classes, per_class: int = 2) -> Path:
    """A DomainBed-layout dataset of tiny PNG images: ``root/<domain>/<class>/<i>.png``."""
    for d, domain in enumerate(domains):
        for c, name in enumerate(classes):
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * d, 3 * c % 256, 60 * i)).save(folder / f"{i}.png")
    return root


def test_vlcs_reads_the_domainbed_layout_from_the_folder_above(tmp_path):
    domainbed_folder(tmp_path / "VLCS", VLCS.sites, VLCS.default_classes, per_class=4)
    reader = VLCS(root=str(tmp_path), test_fraction=0.25)  # the folder that holds VLCS/
    raw = reader.read()
    assert raw.classnames == ["bird", "car", "chair", "dog", "person"] and raw.name == "vlcs"
    assert len(raw.train) == 4 * 5 * 3 and len(raw.test) == 4 * 5 * 1
    assert raw.domains == list(VLCS.sites)
    splits = reader.setup()
    assert [c.name for c in splits.clients] == list(VLCS.sites)  # one client per domain by default


def test_office_home_accepts_the_real_world_folder_with_a_space(tmp_path):
    sites = ["Art", "Clipart", "Product", "Real World"]
    domainbed_folder(tmp_path, sites, OfficeHome.default_classes, per_class=1)
    raw = OfficeHome(root=str(tmp_path), domains=["Product", "Real_World"], test_fraction=0.5).read()
    assert len(raw.classnames) == 65 and raw.classnames == sorted(OfficeHome.default_classes)
    assert {s.domain for s in raw.train + raw.test} == {"Product", "Real_World"}


def test_layout_errors_name_the_folder(tmp_path):
    root = domainbed_folder(tmp_path / "VLCS", ["Caltech101", "LabelMe", "SUN09"], VLCS.default_classes)
    with pytest.raises(FedPromptError, match=r"no folder for the domain\(s\) VOC2007 in .*VLCS; expected .*<domain>"):
        VLCS(root=str(root)).read()
    domainbed_folder(root, ["VOC2007"], ["bird", "car", "chair", "dog"])  # no person
    with pytest.raises(FedPromptError, match=r"VOC2007 lacks the class folder\(s\) person"):
        VLCS(root=str(root)).read()
    (root / "VOC2007" / "person").mkdir()
    (root / "LabelMe" / "cat").mkdir()
    with pytest.raises(FedPromptError, match=r"LabelMe holds folder\(s\) that are not VLCS classes: cat"):
        VLCS(root=str(root)).read()
    (root / "LabelMe" / "cat").rmdir()
    assert len(VLCS(root=str(root)).read().classnames) == 5  # an empty (domain, class) folder is allowed
    for domain in ("Caltech101", "LabelMe", "SUN09"):
        for image in (root / domain / "person").iterdir():
            image.unlink()
    with pytest.raises(FedPromptError, match=r"class folder\(s\) without any image in any split: .*person"):
        VLCS(root=str(root)).read()  # a class without any image in any domain is not
    with pytest.raises(FedPromptError, match=r"data.domains: \['photo'\] are not VLCS domains"):
        VLCS(root=str(root), domains=["photo"])


def test_lodo_on_generated_vlcs(tmp_path):
    domainbed_folder(tmp_path, VLCS.sites, VLCS.default_classes, per_class=4)
    data = LeaveOneDomainOut(VLCS(root=str(tmp_path), test_fraction=0.25, seed=3), target="SUN09")
    splits = data.setup()
    assert [c.name for c in splits.clients] == ["Caltech101", "LabelMe", "VOC2007"]
    assert all(s.domain != "SUN09" for c in splits.clients for s in c.train + c.test)
    target = splits.eval_sets[-1]
    assert (target.name, target.split, target.seen, target.domain) == ("vlcs/target/SUN09", "target", False, "SUN09")
    assert len(target.samples) == 5 * 4 and {s.domain for s in target.samples} == {"SUN09"}  # train and test images
    assert target.classnames == splits.classnames
    # Dirichlet within each source domain: two clients per domain
    split = LeaveOneDomainOut(VLCS(root=str(tmp_path), partition=ByDomain(clients_per_domain=2, alpha=1.0,
                                                                           min_size=1)), target="VOC2007").setup()
    assert [c.name for c in split.clients] == ["Caltech101-0", "Caltech101-1", "LabelMe-0", "LabelMe-1", "SUN09-0",
                                               "SUN09-1"]


def test_lodo_errors(tmp_path):
    domainbed_folder(tmp_path, VLCS.sites, VLCS.default_classes)
    with pytest.raises(FedPromptError, match=r"data.target: 'sketch' is not a domain of vlcs; its domains: Caltech101"):
        LeaveOneDomainOut(VLCS(root=str(tmp_path)), target="sketch").setup()
    with pytest.raises(FedPromptError, match="has one domain"):
        LeaveOneDomainOut(VLCS(root=str(tmp_path), domains=["LabelMe"]), target="LabelMe").setup()
    with pytest.raises(FedPromptError, match="subsample_classes must be 'all'"):
        LeaveOneDomainOut(VLCS(root=str(tmp_path), subsample_classes="base"), target="LabelMe")
    with pytest.raises(FedPromptError, match="cannot be nested"):
        LeaveOneDomainOut(LeaveOneDomainOut(VLCS(root=str(tmp_path)), target="LabelMe"), target="SUN09")


def test_domainnet_in_domainbed_layout(tmp_path):
    domainbed_folder(tmp_path / "domain_net", DomainNet.sites, ["aircraft_carrier", "zebra", "bird"], per_class=2)
    data = LeaveOneDomainOut(DomainNet(root=str(tmp_path / "domain_net"), layout="folders", all_classes=True,
                                       test_fraction=0.5), target="quickdraw")
    splits = data.setup()
    assert splits.classnames == ["aircraft carrier", "bird", "zebra"]
    assert [c.name for c in splits.clients] == ["clipart", "infograph", "painting", "real", "sketch"]
    assert len(splits.eval_sets[-1].samples) == 3 * 2


def test_lodo_on_pacs_mini():
    root = require(PACS)
    raw = PACSReader(root=str(root)).read()
    assert raw.classnames == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    splits = LeaveOneDomainOut(PACSReader(root=str(root), num_shots=4), target="sketch").setup()
    assert [c.name for c in splits.clients] == ["art_painting", "cartoon", "photo"]
    sketches = sum(1 for _ in (root / "sketch").rglob("*.png"))
    assert len(splits.eval_sets[-1].samples) == sketches == 680  # every sketch image, train and test split
    assert all(len([s for s in c.train if s.label == 0]) == 4 for c in splits.clients)  # 4 shots per class


def test_partition_command_lists_the_target(cli, tmp_path):
    domainbed_folder(tmp_path, VLCS.sites, VLCS.default_classes, per_class=4)
    code, out, err = cli("partition", "--data", "LeaveOneDomainOut", "--data.dataset", "VLCS",
                         "--data.dataset.root", str(tmp_path), "--data.target", "LabelMe")
    assert code == 0, err
    assert "3 clients, 5 classes" in out and "vlcs/target/LabelMe" in out


def test_one_config_per_held_out_domain_and_method_family():
    import yaml

    from conftest import ROOT

    readers = {"pacs": PACSReader, "vlcs": VLCS, "officehome": OfficeHome, "domainnet": DomainNet}
    for family, method in (("promptfl", "PromptFL"), ("fedotp", "FedOTP"), ("ivlp", "IVLP")):
        for name, reader in readers.items():
            for domain in reader.sites:
                cfg = yaml.safe_load((ROOT / "configs" / "lodo" / f"{family}_{name}_{domain.lower()}.yaml").read_text())
                assert cfg["method"]["class_path"] == f"fedprompt.methods.{method}"
                data = cfg["data"]["init_args"]
                assert data["target"] == domain and data["dataset"]["class_path"].endswith(reader.__name__)
    families = [p for p in (ROOT / "configs" / "lodo").glob("*.yaml") if p.name.split("_")[0] in ("promptfl", "fedotp",
                                                                                                 "ivlp")]
    assert len(families) == 3 * (4 + 4 + 4 + 6)
    for name, reader in readers.items():  # FedCLIP's release protocol: its first domain held out (--test_envs 0)
        if name == "domainnet":
            continue
        cfg = yaml.safe_load((ROOT / "configs" / "lodo" / f"fedclip_{name}_{reader.sites[0].lower()}.yaml").read_text())
        assert cfg["method"]["class_path"] == "fedprompt.methods.FedCLIP"
        assert cfg["data"]["init_args"]["target"] == reader.sites[0]
