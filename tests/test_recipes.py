"""YAML recipes: every shipped recipe loads into a valid config; the CLI quantizes with one."""

import json
import re

import pytest
from diffusers import DiTPipeline

from diffusers_ptq import METHODS, PTQ4DiTConfig, load_recipe
from diffusers_ptq.cli import main
from diffusers_ptq.config import RECIPE_DIR, read_recipe
from diffusers_ptq.modules import QuantLinear

RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def test_the_paper_and_bundled_settings_are_all_there():
    names = {p.stem for p in RECIPES}
    for res in (256, 512):
        for steps in (250, 100, 50):
            for bits in (8, 4):
                assert f"dit-xl-2-{res}-w{bits}a8-ptq4dit-{steps}" in names
                assert f"dit-xl-2-{res}-w{bits}a8-htg-{steps}" in names
    assert {"bundled-w8a8-ptq4dit", "bundled-w4a8-ptq4dit", "bundled-w8a8-minmax", "bundled-w4a8-minmax"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_into_the_config_its_name_says(path):
    recipe = read_recipe(path)
    config = load_recipe(path)
    assert type(config) is METHODS[recipe["method"]] and recipe["name"] == path.stem
    bits = re.search(r"w(\d)a(\d+)", path.stem)
    assert (config.weight_bits, config.act_bits) == (int(bits[1]), int(bits[2]))
    steps = re.search(r"-(\d+)$", path.stem)
    if steps:
        assert config.num_inference_steps == int(steps[1]) and config.scheduler == "ddpm"
        assert recipe["model"] == f"facebook/DiT-XL-2-{path.stem.split('-')[3]}"
    assert recipe["requires"] is None  # every method of the recipes is implemented
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_recipe_by_name_with_overrides_and_bad_recipes(tmp_path):
    config = load_recipe("bundled-w4a8-ptq4dit", num_samples=3)
    assert isinstance(config, PTQ4DiTConfig) and config.num_samples == 3 and config.weight_bits == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ptq4dit\nconfig:\n  weight_bits: 3\n")
    with pytest.raises(ValueError, match="weight_bits"):
        load_recipe(bad)
    bad.write_text("method: gptq9\nconfig: {}\n")
    with pytest.raises(ValueError, match="allowed values"):
        load_recipe(bad)
    bad.write_text("method: ptq4dit\nbits: 8\n")
    with pytest.raises(ValueError, match="unknown recipe key"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError, match="bundled-w8a8-ptq4dit"):
        load_recipe("no-such-recipe")


def test_cli_quantize_with_a_recipe(tmp_path):
    out = tmp_path / "q"
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"metrics": {"psnr_db": 30.5}}))
    assert main(["quantize", "--recipe", "bundled-w8a8-minmax", "--model", "bundled", "--output", str(out),
                 "--set", "num_samples=2", "--set", "num_inference_steps=2", "--metrics", str(metrics)]) == 0
    pipe = DiTPipeline.from_pretrained(out)
    config = pipe.transformer.config.quantization_config
    assert config.method == "baseline" and config.num_samples == 2 and config.weight_bits == 8
    assert isinstance(pipe.transformer.proj_out_2, QuantLinear)
    assert "| psnr_db | 30.5 |" in (out / "README.md").read_text()
    assert pipe.labels["seven"] == 7  # id2label kept
    with pytest.raises(SystemExit):
        main(["quantize", "--recipe", "bundled-w8a8-minmax", "--output", str(out), "--set", "num_samples"])
