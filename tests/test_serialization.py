"""Quantized checkpoints: bit-exact save -> reload without calibration, bad checkpoints, atomic writes, Hub upload.

Two ways to save: diffusers' own `model.save_pretrained` / `pipe.save_pretrained` / `push_to_hub` (the quantizer adds
its tensors and metadata through diffusers' `get_state_dict_and_metadata` hook), and `diffusers_ptq.save_pretrained`
/ `diffusers_ptq.push_to_hub` (the same checkpoint, written atomically, with our model card)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import reload_bit_exact, tiny_inputs
from diffusers import DiTPipeline, DiTTransformer2DModel
from safetensors import safe_open

import diffusers_ptq
from diffusers_ptq import BaselineConfig, HTGConfig, PTQ4DiTConfig, quantize
from diffusers_ptq.harness.bundled import load_pipeline
from diffusers_ptq.modules import QuantLinear
from diffusers_ptq.serialization import METADATA_KEY, CheckpointError

FAST = dict(num_samples=2, num_inference_steps=2)
WEIGHTS = "diffusion_pytorch_model.safetensors"



@pytest.fixture
def saved(tiny_transformer, tmp_path):
    quantize(tiny_transformer, PTQ4DiTConfig(weight_bits=8, quantize_attention=True, **FAST), progress=False)
    folder = tmp_path / "w8a8"
    diffusers_ptq.save_pretrained(tiny_transformer, folder)
    return tiny_transformer, folder


@pytest.mark.parametrize("config", [
    PTQ4DiTConfig(weight_bits=8, quantize_attention=True, **FAST),
    PTQ4DiTConfig(weight_bits=4, **FAST),
    BaselineConfig(weight_bits=4, weight_group_size=16, act_range="percentile", **FAST),
    BaselineConfig(weight_bits=8, act_bits=None, exclude=["proj_out_*"], **FAST),
    HTGConfig(weight_bits=4, num_groups=2, **FAST),
    HTGConfig(weight_bits=8, num_groups=2, quantize_attention=True, exclude=["*.norm1.linear"], **FAST),
], ids=["w8a8-attn", "w4a8", "w4a8-g16", "w8a16", "w4a8-htg", "w8a8-htg-float-adaln"])
def test_save_reload_is_bit_exact_without_calibrating(config, tiny_transformer, tmp_path, monkeypatch):
    quantize(tiny_transformer, config, progress=False)
    reloaded = reload_bit_exact(tiny_transformer, tmp_path / "q", monkeypatch)  # no calibration, no unpickling
    for name, module in tiny_transformer.named_modules():
        if isinstance(module, QuantLinear):
            again = reloaded.get_submodule(name)
            assert isinstance(again, QuantLinear)
            assert (again.weight_group_size, again.activation_qtype, again.weight_qtype) == (
                module.weight_group_size, module.activation_qtype, module.weight_qtype)
            assert again.input_scale.dtype == torch.float32
        elif isinstance(module, torch.nn.Linear):
            assert type(reloaded.get_submodule(name)) is torch.nn.Linear
    assert reloaded.config.quantization_config == config
    assert reloaded.is_quantized and reloaded.hf_quantizer.pre_quantized
    carriers = [n for n, m in tiny_transformer.named_modules() if getattr(m, "group_biases", None)]
    assert carriers == [n for n, m in reloaded.named_modules() if getattr(m, "group_biases", None)]
    assert bool(carriers) == isinstance(config, HTGConfig)


def test_checkpoint_layout_and_metadata(saved):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == model.config.quantization_config.to_dict()
    assert config["quantization_config"]["quant_method"].startswith("ptq4dit")
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        metadata = json.loads(f.metadata()[METADATA_KEY])
        keys = set(f.keys())
    to_q = metadata["modules"]["transformer_blocks.0.attn1.to_q"]
    assert to_q == {"kind": "quant_linear", "in_features": 32, "out_features": 32, "bias": True, "weight_bits": 8,
                    "weight_group_size": None, "act_bits": 8, "output_quantization": False}
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(metadata["modules"]) == quantized
    assert set(metadata["processors"]) == {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}
    assert {"transformer_blocks.0.attn1.to_q.weight._data", "transformer_blocks.0.attn1.ptq_processor.q_scale",
            "transformer_blocks.0.attn1.to_q.input_scale"} <= keys
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no temporary folder left
    card = (folder / "README.md").read_text()
    assert "ptq4dit" in card and "W8A8" in card


def test_plain_diffusers_save_pretrained_round_trips_bit_exactly(saved, tmp_path, monkeypatch):
    """ModelMixin.save_pretrained itself (nothing of ours on the instance) writes our checkpoint: the tensors, the
    metadata header and config.json are those of diffusers_ptq.save_pretrained, without the model card."""
    model, ours = saved
    assert "save_pretrained" not in vars(model) and "push_to_hub" not in vars(model)
    reloaded = reload_bit_exact(model, tmp_path / "plain", monkeypatch)  # model.save_pretrained: diffusers' method
    plain = tmp_path / "plain"
    assert sorted(p.name for p in plain.iterdir()) == ["config.json", WEIGHTS]  # diffusers writes no card
    assert sorted(p.name for p in ours.iterdir()) == ["README.md", "config.json", WEIGHTS]
    assert (plain / "config.json").read_text() == (ours / "config.json").read_text()
    first, second = (safetensors.torch.load_file(str(f / WEIGHTS)) for f in (plain, ours))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    headers = []
    for folder in (plain, ours):
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            headers.append(f.metadata())
    assert headers[0] == headers[1] and METADATA_KEY in headers[0]
    assert not (set(vars(reloaded)) & {"save_pretrained", "push_to_hub"})
    assert reloaded.hf_quantizer._model() is reloaded


def test_pipeline_save_reload_gives_identical_images(tmp_path, monkeypatch):
    pipe = quantize(load_pipeline("bundled"), PTQ4DiTConfig(weight_bits=4, **FAST), progress=False)
    run = lambda p: p(class_labels=[1, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0),  # noqa
                      output_type="np").images
    expected = run(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    monkeypatch.setattr("diffusers_ptq.api.calibrate", lambda *a, **k: pytest.fail("calibrated on reload"))
    reloaded = DiTPipeline.from_pretrained(tmp_path / "pipe")
    assert (run(reloaded) == expected).all()
    assert isinstance(reloaded.transformer.proj_out_2, QuantLinear)


def test_loading_without_the_plugin_says_to_import_it(saved):
    _, folder = saved
    code = f"from diffusers import DiTTransformer2DModel; DiTTransformer2DModel.from_pretrained({str(folder)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode != 0
    assert "import diffusers_ptq" in result.stderr.strip().splitlines()[-1]


def _rewrite(folder: Path, edit) -> None:
    path = folder / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(str(path))
    new = edit(tensors, metadata)
    metadata = new if isinstance(new, dict) else metadata
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("edit, words", [
    (lambda t, m: t.pop("transformer_blocks.1.ff.net.2.weight._scale"),
     ["transformer_blocks.1.ff.net.2", "missing", "weight._scale"]),
    (lambda t, m: t.pop("transformer_blocks.0.attn1.ptq_processor.k_scale"), ["attn1", "missing", "k_scale"]),
    (lambda t, m: t.update({"proj_out_1.weight._data": t["proj_out_1.weight._data"][:3]}),
     ["proj_out_1.weight._data", "corrupt"]),
    (lambda t, m: t.update({"proj_out_2.input_scale": torch.tensor(float("nan"))}), ["proj_out_2.input_scale",
                                                                                     "non-finite"]),
    (lambda t, m: t.update({"proj_out_2.weight._scale": -t["proj_out_2.weight._scale"]}), ["non-positive"]),
    (lambda t, m: {"format": "pt"}, ["no 'diffusers_ptq' metadata"]),
    (lambda t, m: {**m, METADATA_KEY: "{not json"}, ["corrupt 'diffusers_ptq' metadata"]),
    (lambda t, m: {**m, METADATA_KEY: json.dumps({**json.loads(m[METADATA_KEY]), "format_version": 99})},
     ["format version 99"]),
])
def test_broken_checkpoints_fail_clearly(saved, edit, words):
    _, folder = saved
    _rewrite(folder, edit)
    with pytest.raises(CheckpointError) as info:
        DiTTransformer2DModel.from_pretrained(folder)
    for word in words:
        assert word in str(info.value)


def test_config_with_a_quantized_checkpoint_warns_and_the_checkpoint_wins(saved, monkeypatch):
    """diffusers' merge_quantization_configs keeps a pre-quantized checkpoint's config and warns; no quantizer hook
    sees the config the user passed, so the checkpoint loads as saved: no calibration, bit-identical outputs."""
    model, folder = saved
    monkeypatch.setattr("diffusers_ptq.api.calibrate", lambda *a, **k: pytest.fail("calibrated"))
    with torch.no_grad():
        expected = model(**tiny_inputs()).sample
    for config in (model.config.quantization_config, BaselineConfig(weight_bits=4)):
        with pytest.warns(UserWarning, match="The `quantization_config` from the model will be used"):
            loaded = DiTTransformer2DModel.from_pretrained(folder, quantization_config=config)
        assert loaded.config.quantization_config == model.config.quantization_config
        assert loaded.hf_quantizer.pre_quantized and loaded.hf_quantizer.quantization_config.weight_bits == 8
        with torch.no_grad():
            assert torch.equal(loaded(**tiny_inputs()).sample, expected)
    with pytest.raises(ValueError, match="torch_dtype"):
        DiTTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float16)


def test_pickle_saves_are_refused(saved, tmp_path):
    """diffusers_ptq.save_pretrained refuses before writing; diffusers' save_pretrained asks the quantizer's hook only
    after it has written config.json, so no weights (no pickle) are written, but config.json is."""
    model, _ = saved
    with pytest.raises(ValueError, match="safetensors only"):
        diffusers_ptq.save_pretrained(model, tmp_path / "ours", safe_serialization=False)
    assert not (tmp_path / "ours").exists()
    with pytest.raises(ValueError, match="safetensors only.*already written config.json"):
        model.save_pretrained(tmp_path / "plain", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["config.json"]


def test_failed_save_leaves_no_half_written_checkpoint(saved, tmp_path, monkeypatch):
    model, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        diffusers_ptq.save_pretrained(model, folder)  # over an existing checkpoint
    with pytest.raises(OSError, match="disk full"):
        diffusers_ptq.save_pretrained(model, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8a8"]  # no temporary folder left behind
    monkeypatch.undo()
    DiTTransformer2DModel.from_pretrained(folder)  # still loads


class FakeHub:
    """Intercepts huggingface_hub.HfApi at its API boundary and records what would be uploaded."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.calls, self.files = [], {}
        monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **k: self.create_repo(api, *a, **k))
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, *a, **k: self.upload_folder(api, *a, **k))
        monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("unexpected create_commit"))
        monkeypatch.setattr("huggingface_hub.repocard.hf_hub_download", self.hf_hub_download)
        # diffusers' own push_to_hub calls huggingface_hub's module-level functions (bound to a default HfApi at
        # import, so the class patches above do not reach them): route them through the same fakes.
        monkeypatch.setattr("diffusers.utils.hub_utils.create_repo", lambda *a, **k: self.create_repo(None, *a, **k))
        monkeypatch.setattr("diffusers.utils.hub_utils.upload_folder", lambda *a, **k: self.upload_folder(None, *a, **k))

    def hf_hub_download(self, repo_id, filename, **kwargs):
        """The fake repository is new: no file to download (diffusers then writes a fresh model card)."""
        from huggingface_hub.errors import EntryNotFoundError

        self.calls.append(("hf_hub_download", repo_id, filename))
        raise EntryNotFoundError(f"{filename} not found in the fake repository {repo_id}")

    def create_repo(self, api, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        root = Path(folder_path)
        self.files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return "https://huggingface.co/fake-commit"


def test_transformer_push_to_hub_uploads_checkpoint_and_card(saved, monkeypatch):
    model, _ = saved
    hub = FakeHub(monkeypatch)
    diffusers_ptq.push_to_hub(model, "me/tiny-w8a8", private=True)
    assert hub.calls[0] == ("create_repo", "me/tiny-w8a8", {"private": True, "exist_ok": True})
    assert hub.calls[1][1] == "me/tiny-w8a8"
    assert set(hub.files) == {"README.md", "config.json", WEIGHTS}
    card = hub.files["README.md"].decode()
    for text in ("ptq4dit", "W8A8", "ddim, 2 steps", "| samples | 2 (seed 0) |", "optimum-quanto", "diffusers-ptq",
                 "Not measured"):
        assert text in card
    assert json.loads(hub.files["config.json"])["quantization_config"]["num_samples"] == 2


def test_diffusers_push_to_hub_uploads_a_loadable_checkpoint_with_its_generic_card(saved, monkeypatch, tmp_path):
    """model.push_to_hub is diffusers' own (PushToHubMixin): our tensors and metadata come through the quantizer's
    hook; the card is diffusers' (no hook lets us write ours there: diffusers_ptq.push_to_hub does)."""
    model, _ = saved
    hub = FakeHub(monkeypatch)
    model.push_to_hub("me/tiny-w8a8-plain")
    assert set(hub.files) == {"README.md", "config.json", WEIGHTS}
    assert "diffusers-ptq" not in hub.files["README.md"].decode()
    for name, data in hub.files.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setattr("diffusers_ptq.api.calibrate", lambda *a, **k: pytest.fail("calibrated on reload"))
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**tiny_inputs()).sample, model(**tiny_inputs()).sample)


def test_pipeline_push_to_hub_puts_the_card_at_the_root(monkeypatch):
    pipe = quantize(load_pipeline("bundled"), BaselineConfig(weight_bits=4, **FAST), progress=False)
    hub = FakeHub(monkeypatch)
    diffusers_ptq.push_to_hub(pipe, "me/dit-mnist-w4a8", metrics={"psnr_db": 31.25, "classifier_accuracy": 0.97})
    assert {"README.md", "model_index.json", "transformer/config.json", f"transformer/{WEIGHTS}",
            "vae/config.json", "scheduler/scheduler_config.json"} <= set(hub.files)
    card = hub.files["README.md"].decode()
    assert "quantized DiTPipeline" in card and "| psnr_db | 31.25 |" in card and "| classifier_accuracy | 0.97 |" in card
    assert "baseline" in card and "W4A8" in card
    with pytest.raises(ValueError, match="not quantized"):
        diffusers_ptq.push_to_hub(load_pipeline("bundled"), "me/float")


def test_design_card_example_runs_as_written(tmp_path, monkeypatch):
    """../shared/DESIGN.md's first example, with the bundled model's folder for the Hub id and a faked Hub. Its
    `pipe.save_pretrained` / `pipe.push_to_hub` are diffusers' own: a loadable checkpoint, diffusers' generic card
    (ours needs diffusers_ptq.push_to_hub, which the example's comment promises: docs/diffusers.md)."""
    from diffusers import DiTPipeline

    import diffusers_ptq  # noqa: F401  registers "ptq4dit" / "htg" with diffusers' quantizer registry
    from diffusers_ptq import HTGConfig
    from diffusers_ptq.harness.bundled import BUNDLED_MODEL_DIR

    pipe = DiTPipeline.from_pretrained(BUNDLED_MODEL_DIR,
                                       quantization_config=HTGConfig(weight_bits=4, act_bits=8, num_inference_steps=100))
    assert any(getattr(m, "group_biases", None) for m in pipe.transformer.modules())
    pipe.save_pretrained(tmp_path / "dit-xl-2-256-w4a8-htg")
    hub = FakeHub(monkeypatch)
    pipe.push_to_hub("me/dit-xl-2-256-w4a8-htg")
    assert f"transformer/{WEIGHTS}" in hub.files and "README.md" in hub.files
    assert "htg" in json.loads(hub.files["transformer/config.json"])["quantization_config"]["quant_method"]
    monkeypatch.setattr("diffusers_ptq.api.calibrate", lambda *a, **k: pytest.fail("calibrated on reload"))
    reloaded = DiTPipeline.from_pretrained(tmp_path / "dit-xl-2-256-w4a8-htg")
    run = lambda p: p(class_labels=[1, 7], num_inference_steps=4, generator=torch.Generator().manual_seed(0),  # noqa
                      output_type="np").images
    assert (run(reloaded) == run(pipe)).all()
