"""Every shipped YAML loads against the command's signature; paper configs without data name the folder they need."""

from pathlib import Path

import pytest
import yaml

from conftest import ROOT

CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
TRANSFER = [c for c in CONFIGS if Path(c).parent.name == "configs" and Path(c).stem.endswith(("_xdataset", "_xdomain"))]
BASELINES = ("cocoop_", "kgcoop_", "prograd_", "plot_", "proda_")
PAPER = [c for c in CONFIGS if Path(c).parent.name == "configs" and Path(c).name.startswith(("fedpgp_",
                                                                                              "promptfolio_",
                                                                                              "fedmgp_",
                                                                                              "pfedmoap_",
                                                                                              "dpfpl_",
                                                                                              "fedpha_",
                                                                                              "fedapt_",
                                                                                              *BASELINES))
         and not Path(c).stem.endswith("_flip") and c not in TRANSFER]  # the FLiP variants use the same data sections


def test_configs_exist():
    names = {Path(c).name for c in CONFIGS}
    for required in ("smoke.yaml", "promptfl_pacs.yaml", "promptfl_cifar10.yaml", "local_coop_pacs.yaml",
                     "zeroshot_pacs.yaml", "fedpgp_caltech101.yaml", "fedpgp_oxford_pets.yaml",
                     "fedpgp_flowers102.yaml", "fedpgp_food101.yaml", "fedpgp_dtd.yaml", "fedpgp_cifar100.yaml",
                     "fedpgp_domainnet.yaml", "fedpgp_office.yaml", "promptfolio_caltech101.yaml",
                     "promptfolio_cifar100.yaml", "promptfolio_domainnet.yaml", "promptfolio_office.yaml",
                     "fedpgp_pacs.yaml", "promptfolio_pacs.yaml", "fedmgp_caltech101.yaml",
                     "fedmgp_oxford_pets.yaml", "fedmgp_flowers102.yaml", "fedmgp_food101.yaml", "fedmgp_dtd.yaml",
                     "fedmgp_domainnet.yaml", "fedmgp_office.yaml", "fedmgp_cifar100.yaml", "fedmgp_pacs.yaml",
                     "pfedmoap_caltech101.yaml", "pfedmoap_oxford_pets.yaml", "pfedmoap_flowers102.yaml",
                     "pfedmoap_food101.yaml", "pfedmoap_dtd.yaml", "pfedmoap_cifar10.yaml", "pfedmoap_cifar100.yaml",
                     "pfedmoap_domainnet.yaml", "pfedmoap_office.yaml", "pfedmoap_pacs.yaml",
                     "dpfpl_caltech101.yaml", "dpfpl_oxford_pets.yaml", "dpfpl_flowers102.yaml", "dpfpl_pacs.yaml"):
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


FEDMGP_METHOD = {"text_groups": 5, "visual_groups": 5, "n_ctx": 2, "visual_tokens": 2, "visual_depth": 1,
                 "ctx_init": "a photo of a", "diversity": "paper", "diversity_weight": 1.0, "inference": "average",
                 "groups_to_send": 2, "temperature": 1.0, "selection": "similarity", "compat": "fixed", "lr": 0.001}


def _fedmgp(name):
    cfg = yaml.safe_load((ROOT / "configs" / f"fedmgp_{name}.yaml").read_text())
    method = cfg["method"]["init_args"]
    assert cfg["method"]["class_path"] == "fedprompt.methods.FedMGP"
    assert {k: method[k] for k in FEDMGP_METHOD} == FEDMGP_METHOD, name
    assert (cfg["train"]["local_epochs"], cfg["train"]["batch_size"]) == (2, 8), name
    assert cfg["eval"].get("select", "last") != "test" and cfg["backbone"]["model"] == "ViT-B-16"
    return cfg


def test_fedmgp_paper_configs_use_the_released_settings():
    """FedMGP's configs/trainers/FedMGP/base2novel_vit_b16.yaml (5 + 5 groups of 2 tokens, s = 2, lr 1e-3, 2 local
    epochs, batch 8) and the federation of its scripts: base-to-novel 10 clients x 10 rounds; DomainNet 30 clients
    (5 per domain, Dir(0.3)), 25 %, 25 rounds; Office 20 clients (5 per domain, Dir(0.3)), 50 %, 25 rounds;
    CIFAR-100 100 clients Dir(0.5), 10 %, 100 rounds."""
    for name in ("caltech101", "oxford_pets", "flowers102", "food101", "dtd"):
        cfg = _fedmgp(name)
        data = cfg["data"]["init_args"]
        assert data["subsample_classes"] == "base" and data["num_shots"] == 16, name
        assert data["partition"]["class_path"] == "fedprompt.data.Pathological"
        assert data["partition"]["init_args"]["num_clients"] == 10
        assert (cfg["federation"]["rounds"], cfg["federation"]["fraction"]) == (10, 1.0)
    for name, domains, fraction in (("domainnet", 6, 0.25), ("office", 4, 0.5)):
        cfg = _fedmgp(name)
        data = cfg["data"]["init_args"]
        part = data["partition"]
        assert part["class_path"] == "fedprompt.data.ByDomain"
        assert (part["init_args"]["clients_per_domain"], part["init_args"]["alpha"]) == (5, 0.3)
        assert len(data["domains"]) == domains and data.get("num_shots") is None
        assert (cfg["federation"]["rounds"], cfg["federation"]["fraction"]) == (25, fraction)
    cfg = _fedmgp("cifar100")
    part = cfg["data"]["init_args"]["partition"]
    assert part["class_path"] == "fedprompt.data.Dirichlet"
    assert (part["init_args"]["num_clients"], part["init_args"]["alpha"]) == (100, 0.5)
    assert (cfg["federation"]["rounds"], cfg["federation"]["fraction"]) == (100, 0.1)


BASELINE_DATASETS = ("caltech101", "oxford_pets", "flowers102", "food101", "dtd", "domainnet")
#: method -> (class, the paper config's settings, the FLiP config's settings)
BASELINE_METHODS = {
    "cocoop": ("CoCoOp", {"n_ctx": 4, "ctx_init": "a photo of a", "lr": 0.002, "weight_decay": 0.0005},
               {"n_ctx": 4, "ctx_init": None, "lr": 0.002, "weight_decay": 0.0001}),
    "kgcoop": ("KgCoOp", {"n_ctx": 4, "ctx_init": "a photo of a", "weight": 8.0, "compat": "paper"},
               {"n_ctx": 4, "ctx_init": None, "weight": 1.0, "compat": "flip", "weight_decay": 0.0001}),
    "prograd": ("ProGrad", {"n_ctx": 16, "temperature": 1.0, "compat": "paper"},
                {"n_ctx": 4, "ctx_init": None, "weight": 1.0, "compat": "flip", "weight_decay": 0.0001}),
    "plot": ("PLOT", {"n_prompts": 4, "n_ctx": 16, "eps": 0.1, "max_iter": 100, "compat": "paper"},
             {"n_prompts": 1, "n_ctx": 4, "ctx_init": None, "compat": "flip", "weight_decay": 0.0001}),
    "proda": ("ProDA", {"n_prompts": 32, "prompt_batch": 4, "n_ctx": 16, "so_weight": 1.0, "compat": "paper"},
              {"n_prompts": 1, "prompt_batch": 1, "n_ctx": 4, "ctx_init": None, "compat": "flip"}),
}


@pytest.mark.parametrize("method", list(BASELINE_METHODS))
def test_text_baseline_configs_carry_the_papers_and_flips_settings(method):
    """configs/<method>_<dataset>.yaml (the paper's method settings) and <method>_<dataset>_flip.yaml (FLiP's) for
    the CoOp datasets and DomainNet, on FLiP's federated protocol (10 Dirichlet(0.1) clients or 2 per DomainNet
    domain, 8 shots, 1 local epoch, 50 or FLiP's 51 rounds), each with its source in the header."""
    cls, paper, flip = BASELINE_METHODS[method]
    for dataset in BASELINE_DATASETS:
        for variant, expected, rounds in (("", paper, 50), ("_flip", flip, 51)):
            path = ROOT / "configs" / f"{method}_{dataset}{variant}.yaml"
            text = path.read_text()
            cfg = yaml.safe_load(text)
            assert text.startswith("# ") and ("FLiP" in text.splitlines()[0]) == bool(variant), path.name
            assert cfg["method"]["class_path"] == f"fedprompt.methods.{cls}"
            args = cfg["method"]["init_args"]
            assert {k: args[k] for k in expected} == expected, path.name
            data = cfg["data"]["init_args"]
            assert data["num_shots"] == 8 and cfg["train"]["local_epochs"] == 1, path.name
            assert cfg["federation"]["rounds"] == rounds and cfg["eval"]["select"] == "last", path.name
            partition = data["partition"]
            if dataset == "domainnet":
                assert data["all_classes"] and partition["init_args"]["clients_per_domain"] == 2
            else:
                assert partition["class_path"] == "fedprompt.data.Dirichlet"
                assert (partition["init_args"]["num_clients"], partition["init_args"]["alpha"]) == (10, 0.1)
            assert cfg["train"]["batch_size"] == (1 if method == "cocoop" else 16), path.name


def test_pfedmoap_paper_configs_use_the_released_settings():
    """pFedMoAP's train.sh and configs/trainers/PFEDMOAP/rn50.yaml: 10 rounds x 5 local epochs, batch 16, RN50,
    prompt lr 0.002 cosine with one warm-up epoch, gating lr 0.01, K_e = min(10, clients), lambda 0.5, scale 10."""
    configs = [c for c in PAPER if Path(c).name.startswith("pfedmoap_")]
    assert len(configs) == 9
    for config in configs:
        cfg = yaml.safe_load((ROOT / config).read_text())
        method = cfg["method"]["init_args"]
        assert (method["lr"], method["lr_schedule"], method["warmup_epochs"], method["gating_lr"]) == \
            (0.002, "cosine", 1, 0.01), config
        assert (method["n_ctx"], method["lmbda"], method["scaling"], method["gating_dim"]) == (16, 0.5, 10.0, 128)
        assert (cfg["federation"]["rounds"], cfg["train"]["local_epochs"], cfg["train"]["batch_size"]) == (10, 5, 16)
        clients = cfg["data"]["init_args"]["partition"]["init_args"].get("num_clients")
        assert method["num_experts"] == min(10, clients or len(cfg["data"]["init_args"]["domains"])), config
        assert cfg["backbone"]["model"] == "RN50"


XDATASET = ["Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101", "FGVCAircraft", "SUN397", "DTD",
            "EuroSAT", "UCF101"]
XDOMAIN = ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]


def test_transfer_configs_train_on_imagenet_and_share_one_protocol():
    """<method>_xdataset.yaml / _xdomain.yaml for the six methods: ImageNet as the source, the ten CoOp datasets or
    the four ImageNet variants as targets; PromptFL, FedOTP, FedPGP and FedMGP share one protocol (one table column
    group), FedTPG runs its released cross_data federation, and FedMVP runs FedTPG's (one column with it)."""
    from fedprompt.table import protocol

    assert len(TRANSFER) == 12
    for kind, targets in (("xdataset", XDATASET), ("xdomain", XDOMAIN)):
        protocols = {}
        for method in ("promptfl", "fedotp", "fedpgp", "fedmgp", "fedtpg", "fedmvp"):
            cfg = yaml.safe_load((ROOT / "configs" / f"{method}_{kind}.yaml").read_text())
            data = cfg["data"]["init_args"]
            assert cfg["data"]["class_path"] == "fedprompt.data.Transfer"
            assert data["source"]["class_path"] == "fedprompt.data.ImageNet"
            assert [t["class_path"].rsplit(".", 1)[1] for t in data["targets"]] == targets
            assert cfg["eval"]["mode"] == "global" and cfg["backbone"]["model"] == "ViT-B-16"
            protocols[method] = protocol(cfg)
        assert protocols["promptfl"] == protocols["fedotp"] == protocols["fedpgp"] == protocols["fedmgp"]
        assert protocols["promptfl"]["data.init_args.source.init_args.num_shots"] == 16
        assert protocols["fedtpg"]["data.init_args.source.init_args.partition.class_path"] == "fedprompt.data.CrossClass"
        assert protocols["fedmvp"] == protocols["fedtpg"]


@pytest.mark.parametrize("config", TRANSFER)
def test_transfer_config_without_data_names_the_source_folder(cli, monkeypatch, config):
    monkeypatch.delenv("FEDPROMPT_DATA", raising=False)
    code, _, err = cli("fit", "--config", ROOT / config)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert "data.source (ImageNet): data.root is not set" in last and "imagenet" in last, last


def test_fedapt_and_focoop_configs_are_the_released_settings():
    """FedAPT: --gctx 24 one client per domain, 16 five clients per domain (Dirichlet 0.5), t 0.01, lr 0.01, 50 rounds,
    batch 256, ViT-B/32; FOCoOp: Dirichlet(0.1) over 10 clients, 8 shots, 10 rounds of 2 epochs, its three prompts,
    DRO and OT on, Texture as the OOD set; PromptFL on FOCoOp's pair shares its data and schedule."""
    for name, n_ctx, per_domain in (("fedapt_domainnet", 24, 1), ("fedapt_domainnet_device", 16, 5),
                                    ("fedapt_office", 24, 1)):
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        method, data = cfg["method"]["init_args"], cfg["data"]["init_args"]
        assert (method["n_ctx"], method["temperature"], method["lr"], method["weight_decay"]) == (n_ctx, 0.01, 0.01,
                                                                                                1e-5)
        assert data["partition"]["init_args"]["clients_per_domain"] == per_domain
        assert (cfg["federation"]["rounds"], cfg["train"]["batch_size"], cfg["backbone"]["model"]) == (50, 256,
                                                                                                     "ViT-B-32")
    loaded = {name: yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
              for name in ("focoop_cifar10", "focoop_cifar100", "promptfl_cifar10_ood")}
    for name, cfg in loaded.items():
        source = cfg["data"]["init_args"]["source"]["init_args"]
        assert (source["num_shots"], source["seed"], source["partition"]["init_args"]) == (8, 21, {"num_clients": 10,
                                                                                                  "alpha": 0.1})
        assert (cfg["federation"]["rounds"], cfg["train"]["local_epochs"], cfg["eval"]["ood"]) == (10, 2, ["dtd"])
    method = loaded["focoop_cifar10"]["method"]["init_args"]
    assert (method["dro"], method["uot"], method["class_specific"], method["num_negatives"]) == (True, True, True, 100)
    assert loaded["focoop_cifar10"]["data"] == {**loaded["promptfl_cifar10_ood"]["data"]}
