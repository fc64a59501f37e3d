"""Every shipped YAML loads against the command's signature."""

from pathlib import Path

import pytest

from conftest import ROOT

CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {Path(c).name for c in CONFIGS}
    for required in ("smoke.yaml", "promptfl_pacs.yaml", "promptfl_cifar10.yaml", "local_coop_pacs.yaml",
                     "zeroshot_pacs.yaml"):
        assert required in names


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses(cli, config):
    code, out, err = cli("fit", "--config", ROOT / config, "--print_config")
    assert code == 0, err
    assert "data:" in out
