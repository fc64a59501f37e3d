"""Every method runs on the smoke config with its defaults (``--method fedprompt.methods.X`` alone; FedMVP also needs
its class attributes and FOCoOp its word lists, data files; FedAPT one key per client), deriving the nearest valid value, in one warning line, where an official default
cannot fit the tiny backbone; the official values stay wherever they fit (ViT-B/16 widths and depths). Method files
never index by slot or sample owner."""

from __future__ import annotations

import re
from types import SimpleNamespace

import open_clip
import pytest

from conftest import ROOT, read_rows
from fedprompt.methods import DPFPL, IVLP, METHODS, VPT, MaPLe, PFedMoAP, PromptSRC

SMOKE = str(ROOT / "configs" / "smoke.yaml")

#: what each method derives on the smoke config (the tiny backbone: 2 + 2 layers, joint width 32; n_ctx 4)
DERIVED = {
    "DPFPL": ["rank 4, not the official 8: the local prompt has 4 tokens"],
    "PFedMoAP": ["gating_dim 32, not the official 128: the joint width of 'fedprompt-tiny' is 32"],
    "IVLP": ["text_depth 2, not the official 12", "visual_depth 2, not the official 12"],
    "MaPLe": ["text_depth 2, not the official 9"],
    "PromptSRC": ["text_depth 2, not the official 9", "visual_depth 2, not the official 9"],
    "VPT": ["visual_depth 2, not the official 12: the image tower of 'fedprompt-tiny' has 2 layers"],
    "PFedMMA": ["adapter_end 2, not the official 12: the text tower of 'fedprompt-tiny' has 2 layers",
                "adapter_start 2, not the official 5"],
}


#: inputs a method cannot default (data files), not settings; FOCoOp's test word lists hold 50 words, too few for
#: the release's 100 negative labels mined from WordNet's thousands, so the count comes with the file; FedAPT needs
#: two domain keys at least, which the one-domain smoke data gives only as one key per client
REQUIRED = {"FedAPT": ["--method.domain_of", "client"],
            "FedMVP": ["--method.attributes", str(ROOT / "tests" / "data" / "synthetic_attributes.json")],
            "FOCoOp": ["--method.negative_words", str(ROOT / "tests" / "data" / "negative_words"),
                       "--method.num_negatives", "16"]}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_the_smoke_config_with_its_defaults(cli, tmp_path, name):
    code, _, err = cli("fit", "--config", SMOKE, "--method", f"fedprompt.methods.{name}", *REQUIRED.get(name, []),
                       "--out_dir", tmp_path)
    assert code == 0, err
    rows = read_rows(tmp_path)
    assert rows and (name == "ZeroShot" or rows[-1]["round"] == 2)  # the smoke config's 2 rounds
    said = [line for line in err.splitlines() if line.startswith(f"fedprompt: warning: method {name}:")]
    assert len(said) == (1 if name in DERIVED else 0), err  # said once, although a module is built per class list
    for part in DERIVED.get(name, []):
        assert part in said[0]


def vit_b16(text_layers=12, hf_text=False):
    """A stand-in backbone with ViT-B/16's widths and layers (open_clip's own config)."""
    config = open_clip.get_model_config("ViT-B-16")
    return SimpleNamespace(ctx_dim=config["text_cfg"]["width"], visual_width=config["vision_cfg"]["width"],
                           embed_dim=config["embed_dim"], text_layers=text_layers, visual_layers=12,
                           supports_visual_prompts=True, supports_deep_text_prompts=not hf_text, name="ViT-B-16")


def test_the_official_values_stay_where_they_fit(capsys):
    backbone = vit_b16()
    fitted = {name: method.for_backbone(backbone) for name, method in
              {"VPT": VPT(), "IVLP": IVLP(), "MaPLe": MaPLe(), "PromptSRC": PromptSRC(), "DPFPL": DPFPL(),
               "PFedMoAP": PFedMoAP()}.items()}
    assert fitted["VPT"].visual_depth == 12
    assert (fitted["IVLP"].text_depth, fitted["IVLP"].visual_depth) == (12, 12)
    assert fitted["MaPLe"].text_depth == 9
    assert (fitted["PromptSRC"].text_depth, fitted["PromptSRC"].visual_depth) == (9, 9)
    assert fitted["DPFPL"].rank == 8 and fitted["PFedMoAP"].gating_dim == 128
    assert capsys.readouterr().err == ""  # nothing derived, nothing said
    assert MaPLe().text_depth is None and MaPLe().hparams()["text_depth"] is None  # the config keeps null


def test_derived_values_on_other_backbones(capsys):
    method = MaPLe()
    assert method.for_backbone(vit_b16(hf_text=True)).text_depth == 1  # input-layer prompts only
    method.for_backbone(vit_b16(hf_text=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedprompt: warning: method MaPLe: text_depth 1, not the official 9: the Hugging Face text tower "
                   "of 'ViT-B-16' takes input-layer prompts only (set method.text_depth to choose)."]
    assert IVLP().for_backbone(vit_b16(text_layers=6)).text_depth == 6
    assert IVLP(text_depth=3).for_backbone(vit_b16(text_layers=6)).text_depth == 3  # a set value is never changed
    assert DPFPL(n_ctx=2).for_backbone(vit_b16()).rank == 2
    assert PFedMoAP(gating_heads=4).for_backbone(SimpleNamespace(embed_dim=1024, name="RN50")).gating_dim == 128
    assert PFedMoAP().for_backbone(SimpleNamespace(embed_dim=384, name="effl0")).gating_dim == 128  # stride 3
    assert PFedMoAP().for_backbone(SimpleNamespace(embed_dim=48, name="w48")).gating_dim == 48


def test_method_files_never_index_by_slot_or_owner():
    """docs/writing_a_method.md: a method file never indexes by slot or owner (the base class's helpers do)."""
    pattern = re.compile(r"step\.(slots|owner|counts)\b")
    offenders = [f"{path.name}:{n}" for path in sorted((ROOT / "fedprompt" / "methods").glob("*.py"))
                 if path.name not in ("base.py", "method.py", "__init__.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
