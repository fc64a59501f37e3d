"""FedMVP: attribute files (one line naming the file, the dataset and the class), the sentences, the logits by class
description, the PromptFormer and where its prompts enter, K-invariance, exact resume, bytes per round, the refusal
on a tower without patch tokens. (Parity with the released code: test_fedpha.py; the Flower runtime:
test_flower.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import EFFL0, PACS, ROOT, require, resumed_and_straight
from fedprompt.data import DomainFolders
from fedprompt.data.synthetic import SYNTHETIC_NAMES
from fedprompt.errors import FedPromptError
from fedprompt.methods import FedMVP
from fedprompt.methods.fedmvp import class_attributes, descriptor_clause
from fedprompt.prompts import PromptFormer
from test_parallel_clients import assert_same_run, fit

ATTRIBUTES = ["a bright colour", "has sharp edges", "often seen on signs", "smooth texture", "used as a marker"]


def write_attributes(path: Path, names=SYNTHETIC_NAMES, uneven: bool = True) -> Path:
    """A generated attribute file: 2 to 4 attributes per class (or 3 each)."""
    table = {name: [f"{a} like a {name}" for a in ATTRIBUTES[: (2 + i % 3 if uneven else 3)]]
             for i, name in enumerate(names)}
    path.write_text(json.dumps(table))
    return path


@pytest.fixture
def attributes(tmp_path) -> Path:
    return write_attributes(tmp_path / "synthetic.json")


def test_attributes_become_the_released_clauses():
    assert descriptor_clause("a long tail") == "which is a long tail"
    assert descriptor_clause("antlers") == "which is antlers"  # any word starting with "a", as released
    assert descriptor_clause("used for play") == "which is used for play"
    assert descriptor_clause("often seen outdoors") == "which often seen outdoors"
    assert descriptor_clause("fur texture") == "which has fur texture"


def test_a_missing_file_or_class_is_one_line_naming_file_dataset_and_class(tmp_path):
    path = tmp_path / "pacs.json"
    path.write_text(json.dumps({"dog": ["fur"], "Alarm Clock": ["a dial"], "cat": []}))
    assert class_attributes(path, ["dog", "alarm_clock"], "pacs") == [["fur"], ["a dial"]]  # spaces, any case
    with pytest.raises(FedPromptError) as err:
        class_attributes(path, ["dog", "giraffe"], "pacs-mini")
    assert str(err.value).count("\n") == 0
    assert f"{path} has no attributes for class 'giraffe' of dataset pacs-mini" in str(err.value)
    with pytest.raises(FedPromptError, match="has no attributes for class 'cat'"):
        class_attributes(path, ["cat"], "pets")  # an empty list is no attributes
    with pytest.raises(FedPromptError, match=f"{tmp_path / 'none.json'} not found"):
        class_attributes(tmp_path / "none.json", ["dog"], "pacs")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(FedPromptError, match="must be a JSON object"):
        class_attributes(tmp_path / "bad.json", ["dog"], "pacs")


def test_a_folder_of_attribute_files_is_read_per_dataset(tmp_path):
    write_attributes(tmp_path / "pacs.json", ["dog", "horse"])
    write_attributes(tmp_path / "caltech101.json", ["dog", "face"])
    method = FedMVP(attributes=str(tmp_path))
    assert method.attribute_file("caltech101") == tmp_path / "caltech101.json"
    assert method.attribute_file("pacs-mini-art_painting") == tmp_path / "pacs.json"  # the release's file name
    assert method.attribute_file("office31") == tmp_path / "office31.json"


def test_the_run_checks_every_class_list_before_writing(cli, tmp_path):
    path = write_attributes(tmp_path / "few.json", SYNTHETIC_NAMES[:3])  # the smoke data has 4 classes
    code, _, err = cli("fit", "--config", ROOT / "configs" / "smoke.yaml", "--method", "FedMVP",
                       "--method.attributes", path, "--out_dir", tmp_path / "run")
    assert code != 0 and not (tmp_path / "run").exists()
    assert f"{path} has no attributes for class 'yellow cross' of dataset synthetic" in err.strip().splitlines()[-1]
    code, _, err = cli("fit", "--config", ROOT / "configs" / "smoke.yaml", "--method", "FedMVP",
                       "--out_dir", tmp_path / "run")
    assert code != 0 and "method.attributes is not set" in err


def test_logits_are_the_mean_over_each_class_attributes(tiny_backbone, attributes):
    classes = SYNTHETIC_NAMES[:4]
    client = FedMVP(attributes=str(attributes)).build_client(tiny_backbone, classes)
    data = client.class_data(classes)
    assert data["counts"].tolist() == [2, 3, 4, 2]
    sentences = [f"a photo of a {name}, {descriptor_clause(a)}" for name in classes
                 for a in json.loads(attributes.read_text())[name]]
    with torch.no_grad():
        expected_desc = F.normalize(tiny_backbone.encode_text(sentences).float(), dim=-1)
    torch.testing.assert_close(data["descriptions"], expected_desc)
    client.eval()
    torch.manual_seed(0)
    image = torch.randn(3, 3, 32, 32)
    logits = client.predict_logits({"image": image})
    with client.stepping_for({"image": image}):  # one client's images
        feats = client.prompted_features(image)
    sims = tiny_backbone.logit_scale * feats @ expected_desc.t()
    expected = torch.stack([sims[:, data["class_of"] == c].mean(1) for c in range(4)], dim=1)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_the_promptformer_prompts_enter_the_image_tower_after_the_patches(tiny_backbone, attributes):
    classes = SYNTHETIC_NAMES[:4]
    client = FedMVP(attributes=str(attributes)).build_client(tiny_backbone, classes)
    torch.manual_seed(1)
    image = torch.randn(2, 3, 32, 32)
    former = PromptFormer(tiny_backbone.visual_width, tiny_backbone.embed_dim)
    former.load_state_dict({k: v[0] for k, v in client.former.state_dict().items()})
    with torch.no_grad():
        patches = tiny_backbone.patch_embeddings(image)
        visual = tiny_backbone.model.visual
        assert torch.equal(visual.ln_pre(patches), visual._embeds(image))  # the tokens before ln_pre
        prompts = former(patches[:, 1:], client.frozen("context"))
        assert prompts.shape == (2, 4, tiny_backbone.visual_width)
        sequence = visual.ln_pre(torch.cat([patches, prompts], dim=1))
        pooled = visual.ln_post(visual.transformer(sequence)[:, 0]) @ visual.proj  # class token of the 21 tokens
        with client.stepping_for({"image": image}):
            ours = client.prompted_features(image)
        torch.testing.assert_close(ours, F.normalize(pooled, dim=-1), atol=1e-5, rtol=0)


def test_settings_are_checked_in_one_line(attributes):
    for bad, match in [({"sentence": "{name}"}, "must hold"), ({"sentence": "{cls} {clause}"}, "may appear"),
                       ({"flip_probability": 2.0}, "flip_probability"), ({"heads": 0}, "must be >= 1"),
                       ({"lora_threshold": float("inf")}, "lora_threshold must be a finite"),
                       ({"lora_threshold": 0.5, "lora_rank": 0}, "lora_rank must be >= 1")]:
        with pytest.raises(FedPromptError, match=match):
            FedMVP(attributes=str(attributes), **bad)


def test_a_tower_without_patch_tokens_is_refused_in_one_line(attributes):
    from fedprompt.backbone import load_backbone

    backbone = load_backbone("effl0-minilm", str(require(EFFL0)))
    with pytest.raises(FedPromptError) as err:
        FedMVP(attributes=str(attributes)).build_client(backbone, ["dog", "cat"])
    assert str(err.value).startswith("backbone.model: FedMVP's PromptFormer reads the patch tokens of a ViT")
    assert "this backbone's image tower is a TimmModel without a token sequence" in str(err.value)


def test_k_clients_in_lockstep_equal_one_at_a_time(cli, tmp_path, attributes):
    flags = ["--method", "FedMVP", "--method.attributes", str(attributes), "--method.lr", "0.05"]
    rows_1, ckpt_1 = fit(cli, tmp_path / "k1", *flags, "--federation.parallel_clients", "1")
    rows_3, ckpt_3 = fit(cli, tmp_path / "k3", *flags, "--federation.parallel_clients", "3")
    rows_auto, ckpt_auto = fit(cli, tmp_path / "auto", *flags)
    assert_same_run(rows_1, rows_3, ckpt_1, ckpt_3)
    assert_same_run(rows_1, rows_auto, ckpt_1, ckpt_auto)
    assert rows_1[-1]["train_loss"] < rows_1[0]["train_loss"]
    size = sum(v.numel() * 4 for v in ckpt_1["global"].values())  # the whole PromptFormer, fp32
    assert [r["bytes_up"] for r in rows_1] == [4 * size, 3 * size, 3 * size] and rows_1[1]["bytes_down"] == 3 * size
    assert "global_acc" in rows_1[-1]  # every client holds the same PromptFormer


def test_lora_switch_is_per_client_and_for_good(tiny_backbone, attributes):
    """A client whose last loss fell below the threshold switches at its next round start and stays switched; only
    it applies the LoRA factors (in training, not in evaluation, as the release); its cross-attention is held, the
    others' LoRA factors are."""
    client = FedMVP(attributes=str(attributes), lora_threshold=0.5).build_client(tiny_backbone, SYNTHETIC_NAMES[:3],
                                                                                slots=3)
    with torch.no_grad():
        client.last_loss.copy_(torch.tensor([0.4, 0.6, float("inf")]))
    client.on_round_start(None)
    assert client.lora_on.tolist() == [1.0, 0.0, 0.0]
    with torch.no_grad():
        client.last_loss.fill_(0.9)
    client.on_round_start(None)
    assert client.lora_on.tolist() == [1.0, 0.0, 0.0]
    groups = client.configure_optimizers().param_groups
    assert [g["held"] for g in groups if "held" in g] == [[True, False, False], [False, True, True]]
    assert len(groups[2]["params"]) == 6 and len(groups[1]["params"]) == 2  # the LoRA factors; the context map
    image = torch.randn(2, 3, 32, 32)

    def features(slot: int, switched: bool) -> torch.Tensor:
        client._lora_slots = [switched] * 3
        with client.stepping_for({"image": image, "slots": torch.tensor([slot]), "members": [slot], "sizes": [2]}):
            return client.prompted_features(image)

    client.train()
    assert not torch.equal(features(0, True), features(0, False))  # LoRA (random factors) moves the prompts
    client.eval()
    assert torch.equal(features(0, True), features(0, False))  # evaluation without LoRA, as the release


def test_lora_k_clients_in_lockstep_equal_one_at_a_time(cli, tmp_path, attributes):
    """Clients in LoRA mode and clients not in the same lock-step step train as they would alone (the switch at a
    threshold between the clients' first-round losses on the smoke data: 2 of 4 switch)."""
    flags = ["--method", "FedMVP", "--method.attributes", str(attributes), "--method.lr", "0.05",
             "--method.lora_threshold", "1.6"]
    rows_1, ckpt_1 = fit(cli, tmp_path / "k1", *flags, "--federation.parallel_clients", "1")
    rows_auto, ckpt_auto = fit(cli, tmp_path / "auto", *flags)
    assert_same_run(rows_1, rows_auto, ckpt_1, ckpt_auto)
    last = {int(cid): float(state["lora_on"]) for cid, state in ckpt_1["clients"].items()}
    assert {last[int(cid)] for cid in rows_1[-1]["clients"]} == {0.0, 1.0}  # round 3 mixes both modes
    size = sum(v.numel() * 4 for v in ckpt_1["global"].values())  # the PromptFormer and its LoRA factors
    assert rows_1[1]["bytes_up"] == 3 * size and "lora_factors.value.B" in ckpt_1["global"]
    assert "lora_on" not in ckpt_1["global"] and "last_loss" not in ckpt_1["global"]  # the switch is never sent


def test_resume_gives_the_uninterrupted_run(tmp_path, attributes):
    cut, full = resumed_and_straight(FedMVP(attributes=str(attributes), lr=0.05), tmp_path)
    for key, value in full["global"].items():
        assert torch.equal(cut["global"][key], value), key


def test_resume_with_lora_gives_the_uninterrupted_run(tmp_path, attributes):
    cut, full = resumed_and_straight(FedMVP(attributes=str(attributes), lr=0.05, lora_threshold=1e9), tmp_path)
    for key, value in full["global"].items():
        assert torch.equal(cut["global"][key], value), key
    for cid, state in full["clients"].items():
        for key, value in state.items():
            assert torch.equal(cut["clients"][cid][key], value), (cid, key)
    assert any(float(state["lora_on"]) for state in full["clients"].values())


def test_domain_generalisation_config_reads_each_domain_as_a_dataset(tmp_path):
    """configs/fedmvp_msst_pacs.yaml's data on PACS-mini: one client per source domain (7 classes < 20), each with
    its own class list, and the sketch domain as the unseen target; its attribute file found per dataset."""
    import yaml

    from fedprompt.data import Combined, CrossClass

    require(PACS)
    config = yaml.safe_load((ROOT / "configs" / "fedmvp_msst_pacs.yaml").read_text())["data"]["init_args"]
    sources = [DomainFolders(root=str(PACS), domains=d["init_args"]["domains"]) for d in config["datasets"]]
    target = DomainFolders(root=str(PACS), domains=config["unseen"][0]["init_args"]["domains"])
    splits = Combined(sources, unseen=[target], partition=CrossClass(20), num_shots=8, seed=1).setup()
    assert [c.dataset for c in splits.clients] == ["pacs-mini-art_painting", "pacs-mini-cartoon", "pacs-mini-photo"]
    assert all(len(c.classnames) == 7 for c in splits.clients)
    unseen = [e for e in splits.eval_sets if not e.seen]
    assert [e.dataset for e in unseen] == ["pacs-mini-sketch"]
    write_attributes(tmp_path / "pacs.json", splits.clients[0].classnames)
    method = FedMVP(attributes=str(tmp_path))
    method.prepare_data(splits, splits.eval_sets)
    assert {path for path, _ in method._sources.values()} == {tmp_path / "pacs.json"}


def test_offline_config_on_the_stand_in_stops_with_the_line_it_quotes(cli, tmp_path):
    require(PACS), require(EFFL0)
    config = ROOT / "configs" / "offline" / "fedmvp_pacs.yaml"
    path = write_attributes(tmp_path / "pacs.json", ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"])
    code, _, err = cli("fit", "--config", config, "--backbone.model", "effl0-minilm", "--backbone.pretrained", EFFL0,
                       "--method.attributes", path, "--data.root", PACS, "--out_dir", tmp_path / "run")
    line = err.strip().splitlines()[-1]
    assert code != 0 and not (tmp_path / "run").exists()
    assert line.endswith("backbone.model: FedMVP's PromptFormer reads the patch tokens of a ViT image tower and adds "
                         "visual prompts to its sequence, but this backbone's image tower is a TimmModel without a "
                         "token sequence; use a ViT backbone (ViT-B-16)."), line
    quoted = " ".join(l.lstrip("#").strip() for l in config.read_text().splitlines()[3:5])
    assert quoted in line
