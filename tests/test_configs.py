"""Every shipped YAML loads against the command's signature; paper configs without data name the folder they need."""

from pathlib import Path

import pytest
import yaml

from conftest import ROOT

CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
PAPER = [c for c in CONFIGS if Path(c).parent.name == "configs" and Path(c).name.startswith(("fedpgp_",
                                                                                              "promptfolio_"))]


def test_configs_exist():
    names = {Path(c).name for c in CONFIGS}
    for required in ("smoke.yaml", "promptfl_pacs.yaml", "promptfl_cifar10.yaml", "local_coop_pacs.yaml",
                     "zeroshot_pacs.yaml", "fedpgp_caltech101.yaml", "fedpgp_oxford_pets.yaml",
                     "fedpgp_flowers102.yaml", "fedpgp_food101.yaml", "fedpgp_dtd.yaml", "fedpgp_cifar100.yaml",
                     "fedpgp_domainnet.yaml", "fedpgp_office.yaml", "promptfolio_caltech101.yaml",
                     "promptfolio_cifar100.yaml", "promptfolio_domainnet.yaml", "promptfolio_office.yaml",
                     "fedpgp_pacs.yaml", "promptfolio_pacs.yaml"):
        assert required in names, required


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses(cli, config):
    code, out, err = cli("fit", "--config", ROOT / config, "--print_config")
    assert code == 0, err
    assert "data:" in out


@pytest.mark.parametrize("config", PAPER)
def test_paper_config_without_data_names_the_dataset_folder(cli, monkeypatch, config):
    monkeypatch.delenv("FEDPROMPT_DATA", raising=False)
    dirname = yaml.safe_load((ROOT / config).read_text())["data"]["init_args"]["dirname"]
    code, _, err = cli("fit", "--config", ROOT / config)
    assert code == 2
    last = err.strip().splitlines()[-1]  # (earlier in-process tests can leave logging handlers on closed streams)
    assert last.startswith("fedprompt: error: data.root is not set") and "FEDPROMPT_DATA" in last, last
    assert dirname in last, last


def test_base_to_novel_paper_configs_use_the_released_script_settings():
    """FedPGP's scripts/plot_basetonew_base.sh: base classes, pathological split over 10 clients, 25 rounds of 2
    local epochs, batch = shots = 16, constant lr 1e-3, n_ctx 16, bottleneck 8, mu 0.5, tau 0.5."""
    few_shot = [c for c in PAPER if Path(c).stem.split("_", 1)[1] in
                ("caltech101", "oxford_pets", "flowers102", "food101", "dtd") and "fedpgp" in c]
    assert len(few_shot) == 5
    for config in few_shot:
        cfg = yaml.safe_load((ROOT / config).read_text())
        data, method = cfg["data"]["init_args"], cfg["method"]["init_args"]
        assert data["subsample_classes"] == "base" and data["num_shots"] == 16 == cfg["train"]["batch_size"]
        assert data["partition"]["class_path"] == "fedprompt.data.Pathological"
        assert data["partition"]["init_args"]["num_clients"] == 10
        assert (cfg["federation"]["rounds"], cfg["train"]["local_epochs"]) == (25, 2)
        assert (method["lr"], method["lr_schedule"], method["n_ctx"], method["bottleneck"], method["mu"],
                method["tau"]) == (0.001, "constant", 16, 8, 0.5, 0.5)
