"""YAML recipes: shipped as package data and found through importlib.resources; every one loads into a valid
config; the recipes named for a paper carry that paper's settings; the CLI quantizes with one."""

import copy
import json
import re
import shutil
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from diffusers import DiTPipeline

import diffusers_ptq
from diffusers_ptq import METHODS, PTQ4DiTConfig, load_recipe, quantize
from diffusers_ptq import config as config_module
from diffusers_ptq.cli import main
from diffusers_ptq.config import (
    RECIPE_DIR,
    read_recipe,
    recipe_dir,
    recipe_names,
    resolve_recipe,
)
from diffusers_ptq.modules import QuantLinear

NAMES = recipe_names()
PACKAGE_RECIPES = resources.files("diffusers_ptq") / "recipes"
PTQ4DIT_PAPER = [n for n in NAMES if re.fullmatch(r"dit-xl-2-(256|512)-w[48]a8-ptq4dit-(250|100|50)", n)]
HTG_PAPER = [n for n in NAMES if re.fullmatch(r"dit-xl-2-(256|512)-w[48]a8-htg-(250|100|50)", n)]
QDIT_PAPER = [n for n in NAMES if re.fullmatch(r"qdit-dit-xl-2-(256|512)-w4a8", n)]
TEXT_TO_IMAGE_MODELS = {"sd35-medium-": "stabilityai/stable-diffusion-3.5-medium",
                        "sd35-large-": "stabilityai/stable-diffusion-3.5-large",
                        "flux1-dev-": "black-forest-labs/FLUX.1-dev", "flux1-schnell-": "black-forest-labs/FLUX.1-schnell",
                        "pixart-alpha-512-": "PixArt-alpha/PixArt-XL-2-512x512",
                        "pixart-sigma-1024-": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"}
TEXT_TO_IMAGE = [n for n in NAMES if n.startswith(tuple(TEXT_TO_IMAGE_MODELS))]


def test_recipes_come_from_the_package_not_the_source_tree(tmp_path, monkeypatch):
    assert NAMES and RECIPE_DIR == PACKAGE_RECIPES == recipe_dir()
    on_disk = sorted(p.name[:-5] for p in PACKAGE_RECIPES.iterdir() if p.name.endswith(".yaml"))
    assert NAMES == on_disk
    package_folder = Path(diffusers_ptq.__file__).resolve().parent
    monkeypatch.chdir(tmp_path)  # a name resolves whatever the working directory
    for name in ("bundled-w8a8-ptq4dit", "dit-xl-2-256-w4a8-htg-100"):
        path = resolve_recipe(name)
        assert path == PACKAGE_RECIPES / f"{name}.yaml"
        assert Path(str(path)).resolve().parent == package_folder / "recipes"
        assert read_recipe(f"{name}.yaml")["path"] == read_recipe(name)["path"] == str(path)
    # the old README example: a "recipes/NAME.yaml" path that does not exist here still names a shipped recipe
    assert read_recipe("recipes/bundled-w8a8-ptq4dit.yaml")["name"] == "bundled-w8a8-ptq4dit"


def test_recipes_load_from_a_zip(tmp_path, monkeypatch):
    """importlib.resources hands back a zip member for a zipped package: no filesystem Path is assumed."""
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for entry in PACKAGE_RECIPES.iterdir():
            zf.writestr(f"diffusers_ptq/recipes/{entry.name}", entry.read_bytes())
    zipped = zipfile.Path(archive, "diffusers_ptq/recipes/")
    monkeypatch.setattr(config_module, "recipe_dir", lambda: zipped)
    monkeypatch.chdir(tmp_path)
    assert recipe_names() == NAMES
    recipe = read_recipe("dit-xl-2-256-w4a8-htg-100")
    assert "pkg.zip" in recipe["path"] and recipe["name"] == "dit-xl-2-256-w4a8-htg-100"
    assert load_recipe("bundled-w4a8-ptq4dit", num_samples=3).num_samples == 3
    with pytest.raises(FileNotFoundError, match="dit-xl-2-512-w8a8-ptq4dit-250"):
        load_recipe("no-such-recipe")


def test_pyproject_ships_every_recipe_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["diffusers_ptq"]
    folder = pyproject.parent / "diffusers_ptq" / "recipes"
    shipped = {p for pattern in patterns for p in (pyproject.parent / "diffusers_ptq").glob(pattern) if p.is_file()}
    assert {p for p in folder.iterdir() if p.suffix == ".yaml" or p.name == "README.md"} <= shipped
    assert not (pyproject.parent / "recipes").exists()  # one copy only: the package's


def test_the_paper_and_bundled_settings_are_all_there():
    names = set(NAMES)
    for res in (256, 512):
        for steps in (250, 100, 50):
            for bits in (8, 4):
                assert f"dit-xl-2-{res}-w{bits}a8-ptq4dit-{steps}" in names
                assert f"dit-xl-2-{res}-w{bits}a8-htg-{steps}" in names
    assert {"bundled-w8a8-ptq4dit", "bundled-w4a8-ptq4dit", "bundled-w8a8-minmax", "bundled-w4a8-minmax"} <= names
    assert {"qdit-dit-xl-2-256-w4a8", "qdit-dit-xl-2-512-w4a8"} <= names
    # every recipe for a real model is named for a paper (or for one of the text-to-image models) and checked below
    real = {n for n in NAMES if recipe_model(n) != "bundled"}
    assert real == set(PTQ4DIT_PAPER) | set(HTG_PAPER) | set(QDIT_PAPER) | set(TEXT_TO_IMAGE)


def recipe_model(name):
    return read_recipe(name)["model"]


@pytest.mark.parametrize("name", NAMES)
def test_recipe_loads_into_the_config_its_name_says(name):
    recipe = read_recipe(name)
    config = load_recipe(name)
    assert type(config) is METHODS[recipe["method"]] and recipe["name"] == name
    assert recipe["description"]
    bits = re.search(r"w(\d)a(\d+)", name)
    assert (config.weight_bits, config.act_bits) == (int(bits[1]), int(bits[2]))
    steps = re.search(r"-(\d+)$", name)
    if steps:
        assert config.num_inference_steps == int(steps[1]) and config.scheduler == "ddpm"
    res = re.search(r"dit-xl-2-(256|512)", name)
    family = next((m for prefix, m in TEXT_TO_IMAGE_MODELS.items() if name.startswith(prefix)), None)
    assert recipe["model"] == (f"facebook/DiT-XL-2-{res[1]}" if res else family or "bundled")
    assert recipe["requires"] is None  # every method of the recipes is implemented
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config
    config.to_quant_config()  # the engine's settings validate too


def _common_paper_settings(config):
    engine = config.to_quant_config()
    assert engine.scheduler == "ddpm" and engine.guidance_scale == 1.5
    assert engine.weight_group_size is None and not engine.weight_group_sizes  # per output channel
    assert engine.include is None and engine.exclude == []  # None: the model family's default Linears
    return engine


@pytest.mark.parametrize("name", PTQ4DIT_PAPER)
def test_ptq4dit_recipes_use_the_official_code_settings(name):
    """adreamwu/PTQ4DiT quant_sample.py: CSB + SSC, MSE ranges, --sm_abit 8, --recon with 20k iterations."""
    engine = _common_paper_settings(load_recipe(name))
    assert engine.csb_alpha == 0.5 and engine.ssc and engine.ssc_rows == "sample"
    assert engine.act_range == "mse" and not engine.act_dynamic
    assert engine.quantize_attention
    assert engine.weight_rounding == "reconstruct" and engine.reconstruct_iters == 20000
    assert engine.reconstruct_batch == 32 and engine.reconstruct_lr == pytest.approx(1e-3)
    assert engine.reconstruct_samples == 1600
    assert engine.num_samples == 32


@pytest.mark.parametrize("name", HTG_PAPER)
def test_htg_recipes_use_the_paper_settings(name):
    """HTG Sec. 5.1: G = floor(T/10), EMA 0.99, Q-Diffusion-style ranges, attention matmuls at 8 bits, 32 samples."""
    engine = _common_paper_settings(load_recipe(name))
    assert engine.htg_shift and engine.htg_scale and engine.htg_groups is None  # None: floor(T/10)
    assert engine.htg_ema == 0.99 and engine.htg_scaling == "printed"
    assert engine.act_range == "mse" and not engine.act_dynamic
    assert engine.quantize_attention
    assert engine.weight_rounding == "nearest"  # "runs out-of-the-box without re-training or fine-tuning"
    assert engine.num_samples == 32
    assert engine.smoothquant_alpha is None and engine.csb_alpha is None


@pytest.mark.parametrize("name", QDIT_PAPER)
def test_qdit_recipes_use_the_paper_settings(name):
    config = load_recipe(name)
    engine = config.to_quant_config()
    assert engine.scheduler == "ddpm" and engine.guidance_scale == 1.5 and engine.num_inference_steps == 50
    assert engine.weight_bits == 4 and engine.act_dynamic and engine.group_search_bits == 4.5


def test_text_to_image_recipes_cover_each_model_at_w8a8_and_w4a8():
    """SD3.5 Medium/Large, FLUX.1 dev/schnell (issue #19), PixArt-α 512 and PixArt-Σ 1024 (issue #20), W8A8 and W4A8,
    with the family's sampling."""
    assert len(TEXT_TO_IMAGE) == 12
    for name in TEXT_TO_IMAGE:
        config = load_recipe(name)
        pixart = name.startswith("pixart")
        assert config.scheduler == ("dpm_solver" if pixart else "flow_match_euler")
        assert config.calibration_resolution == (512 if "alpha-512" in name else 1024)
        assert config.weight_rounding == ("gptq" if "w4a8" in name else "nearest")
        assert (config.num_inference_steps, config.guidance_scale) == (4, 0.0) if "schnell" in name else \
            config.guidance_scale > 1
        if pixart:  # the PixArt pipelines' defaults; dynamic per-token activations (docs/results/README.md)
            assert (config.num_inference_steps, config.guidance_scale) == (20, 4.5)
        assert config.act_dynamic == pixart


def test_readme_lists_every_recipe_with_the_paper_fid():
    readme = (PACKAGE_RECIPES / "README.md").read_text(encoding="utf-8")
    rows = {m[1]: m[0] for m in re.finditer(r"^\| `([a-z0-9-]+)` \|.*$", readme, re.MULTILINE)}
    assert set(NAMES) <= set(rows), f"no row in diffusers_ptq/recipes/README.md: {sorted(set(NAMES) - set(rows))}"
    assert "6.73 (5.02)" in rows["dit-xl-2-256-w4a8-htg-100"] and "7.75 (5.02)" in rows["dit-xl-2-256-w4a8-ptq4dit-100"]
    assert "17.60 (9.06)" in rows["dit-xl-2-512-w4a8-htg-100"] and "21.59" in rows["qdit-dit-xl-2-512-w4a8"]


@pytest.mark.parametrize("name", ["dit-xl-2-256-w4a8-ptq4dit-50", "dit-xl-2-256-w8a8-htg-50"])
def test_paper_recipes_run_on_the_bundled_model(bundled_pipe, name):
    """The papers' settings are ones the engine runs (budgets cut down: 2 samples, 3 steps, 2 iterations)."""
    pipe = copy.deepcopy(bundled_pipe)
    config = load_recipe(name, num_samples=2, num_inference_steps=3, batch_size=4, reconstruct_iters=2,
                         reconstruct_samples=8, reconstruct_batch=4)
    quantize(pipe, config, progress=False)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_q, QuantLinear)


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
    with pytest.raises(FileNotFoundError, match="bundled-w8a8-ptq4dit") as error:
        load_recipe("no-such-recipe")
    assert all(name in str(error.value) for name in NAMES)  # the error lists every known name
    copied = tmp_path / "mine.yaml"  # a recipe file outside the package, by path
    shutil.copy(str(PACKAGE_RECIPES / "bundled-w8a8-minmax.yaml"), copied)
    assert read_recipe(copied)["path"] == str(copied)


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
