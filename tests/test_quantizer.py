"""diffusers integration: configs, registration, and every loading form, checked against direct engine calls."""

import copy
import json

import pytest
import torch
from diffusers import DiTPipeline, DiTTransformer2DModel, PipelineQuantizationConfig
from diffusers.quantizers import auto as diffusers_auto
from transformers.quantizers import auto as transformers_auto

import diffusers_ptq
from diffusers_ptq import METHODS, BaselineConfig, HTGConfig, PTQ4DiTConfig, config_from_dict, quantize
from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.config import QuantConfig, saved_method_name
from diffusers_ptq.harness.bundled import BUNDLED_MODEL_DIR, load_pipeline
from diffusers_ptq.modules import QuantLinear

# small calibration: 2 samples, 2 steps
FAST = dict(num_samples=2, num_inference_steps=2)
TRANSFORMER_DIR = BUNDLED_MODEL_DIR / "transformer"


def _bundled_context():
    id2label = json.loads((BUNDLED_MODEL_DIR / "model_index.json").read_text())["id2label"]
    scheduler = json.loads((BUNDLED_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    return id2label, scheduler


def _assert_same_quantized(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    pa = {n: m.processor.scales for n, m in a.named_modules() if hasattr(getattr(m, "processor", None), "scales")}
    pb = {n: m.processor.scales for n, m in b.named_modules() if hasattr(getattr(m, "processor", None), "scales")}
    assert pa.keys() == pb.keys()
    for name in pa:
        assert all(torch.equal(pa[name][k], pb[name][k]) for k in "qkv"), name


# --- configs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, kwargs, words", [
    (PTQ4DiTConfig, dict(weight_bits=5), ["weight_bits", "[8, 4]"]),
    (PTQ4DiTConfig, dict(act_bits=4), ["act_bits", "[8, None]"]),
    (BaselineConfig, dict(act_range="max"), ["act_range", "minmax", "percentile", "mse"]),
    (PTQ4DiTConfig, dict(scheduler="euler"), ["scheduler", "ddim", "ddpm"]),
    (PTQ4DiTConfig, dict(ssc_rows="token"), ["ssc_rows", "sample", "timestep"]),
    (PTQ4DiTConfig, dict(csb_alpha=1.5), ["csb_alpha", "[0, 1]"]),
    (PTQ4DiTConfig, dict(weight_bits=8, weight_group_size=64), ["weight_group_size", "4"]),
    (BaselineConfig, dict(smoothquant_alpha=-1), ["smoothquant_alpha"]),
    (PTQ4DiTConfig, dict(num_samples=0), ["num_samples"]),
    (PTQ4DiTConfig, dict(class_labels=[1, -2]), ["class_labels"]),
    (PTQ4DiTConfig, dict(class_labels="cat"), ["class_labels"]),
    (PTQ4DiTConfig, dict(include="proj_out_1"), ["include"]),
    (PTQ4DiTConfig, dict(smoothquant_alpha=0.5), ["unknown option", "smoothquant_alpha", "csb_alpha"]),
    (HTGConfig, dict(linkage="single"), ["linkage", "ward", "centroid", "average"]),
    (HTGConfig, dict(ema_alpha=1.0), ["ema_alpha"]),
    (HTGConfig, dict(shift=False, scale=False), ["shift", "scale"]),
])
def test_invalid_options_name_the_field_and_allowed_values(cls, kwargs, words):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("cls", list(METHODS.values()))
def test_configs_round_trip_through_json(cls):
    config = cls(weight_bits=4, weight_group_size=16, class_labels=[3, 1], exclude=["proj_out_2"], seed=7)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["quant_method"] == saved_method_name(cls.method)
    again = cls.from_dict(data)
    assert again == config and again.to_dict() == config.to_dict()
    assert config_from_dict(data) == config
    assert again.quant_method.value == cls.method and again.quant_method == cls.method
    assert again != cls(weight_bits=4, weight_group_size=16, class_labels=[3, 1], exclude=["proj_out_2"], seed=8)
    assert cls.method in repr(config)


def test_configs_map_to_engine_settings():
    ptq = PTQ4DiTConfig(weight_bits=4, act_range="mse", **FAST).to_quant_config()
    assert isinstance(ptq, QuantConfig)
    assert (ptq.csb_alpha, ptq.ssc, ptq.weight_bits, ptq.act_range, ptq.num_samples) == (0.5, True, 4, "mse", 2)
    assert PTQ4DiTConfig(ssc=False).to_quant_config().ssc is False
    base = BaselineConfig(smoothquant_alpha=0.5).to_quant_config()
    assert base.csb_alpha is None and base.smoothquant_alpha == 0.5
    assert BaselineConfig().to_quant_config().smoothquant_alpha is None


def test_methods_are_registered_with_diffusers_and_transformers():
    for name, cls in METHODS.items():
        assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[name] is cls
        assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[saved_method_name(name)] is cls
        assert diffusers_auto.AUTO_QUANTIZER_MAPPING[name] is diffusers_ptq.DiffusersPTQQuantizer
        assert transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[name] is cls
    assert {"ptq4dit", "baseline", "htg"} <= set(METHODS)


def test_a_new_method_needs_no_quantizer_change(tiny_transformer):
    @diffusers_ptq.register_method
    class MinMaxW8(BaselineConfig):
        """A new method: a config class with a new name."""
        method = "test-minmax-w8"

    try:
        assert diffusers_auto.AUTO_QUANTIZER_MAPPING["test-minmax-w8"] is diffusers_ptq.DiffusersPTQQuantizer
        config = MinMaxW8(**FAST)
        assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
        quantize(tiny_transformer, config, progress=False)
        assert isinstance(tiny_transformer.proj_out_2, QuantLinear)
    finally:
        for mapping in (diffusers_auto.AUTO_QUANTIZER_MAPPING, diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING,
                        transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING):
            mapping.pop("test-minmax-w8", None)
            mapping.pop(saved_method_name("test-minmax-w8"), None)
        METHODS.pop("test-minmax-w8")


# --- quantize() on loaded models ----------------------------------------------------------------------------------


def test_quantize_transformer_alone_equals_the_engine_with_all_classes_and_default_schedule(tiny_transformer):
    config = PTQ4DiTConfig(weight_bits=4, quantize_attention=True, **FAST)
    reference = copy.deepcopy(tiny_transformer)
    quantize_transformer(reference, config.to_quant_config(), id2label=None, scheduler_config=None, progress=False)
    assert quantize(tiny_transformer, config, progress=False) is tiny_transformer
    _assert_same_quantized(tiny_transformer, reference)
    assert tiny_transformer.is_quantized and tiny_transformer.config.quantization_config is config
    assert isinstance(tiny_transformer.hf_quantizer, diffusers_ptq.DiffusersPTQQuantizer)


def test_class_labels_choose_the_calibration_classes(tiny_transformer):
    config = BaselineConfig(class_labels=[3, 7], **FAST)
    reference = copy.deepcopy(tiny_transformer)
    other = copy.deepcopy(tiny_transformer)
    third = copy.deepcopy(tiny_transformer)
    quantize_transformer(reference, config.to_quant_config(), id2label={3: "3", 7: "7"}, progress=False)
    quantize(tiny_transformer, config, progress=False)
    _assert_same_quantized(tiny_transformer, reference)
    quantize(other, BaselineConfig(**FAST), progress=False)  # classes 0, 1: other statistics
    scale = lambda m: m.transformer_blocks[0].attn1.to_q.input_scale  # noqa: E731
    assert not torch.equal(scale(other), scale(tiny_transformer))
    with pytest.raises(ValueError, match="out of range"):
        quantize(third, BaselineConfig(class_labels=[1000], **FAST))


def test_quantize_refuses_bad_models_and_twice(tiny_transformer):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    with pytest.raises(ValueError, match="DiTTransformer2DModel") as info:
        quantize(vae, PTQ4DiTConfig(**FAST))
    assert "AutoencoderKL" in str(info.value)
    with pytest.raises(ValueError, match="DiTTransformer2DModel"):
        quantize(torch.nn.Linear(4, 4), PTQ4DiTConfig(**FAST))
    with pytest.raises(TypeError, match="PTQ4DiTConfig"):
        quantize(tiny_transformer, QuantConfig())
    quantize(tiny_transformer, BaselineConfig(**FAST), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(tiny_transformer, BaselineConfig(**FAST))
    half = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                 sample_size=4, patch_size=2, num_embeds_ada_norm=10).half()
    with pytest.raises(ValueError, match="float32"):
        quantize(half, BaselineConfig(**FAST))


# --- from_pretrained forms on the bundled model -------------------------------------------------------------------

CONFIG = PTQ4DiTConfig(weight_bits=4, quantize_attention=True, **FAST)


@pytest.fixture(scope="module")
def engine_reference():
    """The bundled transformer quantized by the engine directly, with the pipeline's labels and schedule."""
    id2label, scheduler = _bundled_context()
    transformer = DiTTransformer2DModel.from_pretrained(TRANSFORMER_DIR).eval()
    quantize_transformer(transformer, CONFIG.to_quant_config(), id2label=id2label, scheduler_config=scheduler,
                         progress=False)
    return transformer


def test_transformer_from_pretrained_with_config(engine_reference):
    model = DiTTransformer2DModel.from_pretrained(BUNDLED_MODEL_DIR, subfolder="transformer",
                                                  quantization_config=CONFIG)
    _assert_same_quantized(model, engine_reference)
    assert model.config.quantization_config == CONFIG
    assert model.hf_quantizer.report.calibration_seconds > 0
    assert "save_pretrained" not in vars(model) and "push_to_hub" not in vars(model)  # diffusers' own methods
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" and b.dtype == torch.float32 for n, b in model.named_buffers() if "scale" in n)


def test_transformer_folder_alone_uses_all_classes_and_default_schedule(tmp_path):
    import shutil

    folder = tmp_path / "transformer-only"
    shutil.copytree(TRANSFORMER_DIR, folder)  # no model_index.json / scheduler next to it
    config = BaselineConfig(**FAST)
    reference = DiTTransformer2DModel.from_pretrained(folder).eval()
    quantize_transformer(reference, config.to_quant_config(), progress=False)
    _assert_same_quantized(DiTTransformer2DModel.from_pretrained(folder, quantization_config=config), reference)


@pytest.mark.parametrize("form", ["bare config", "quant_mapping", "quant_backend", "quantize()"])
def test_pipeline_forms_quantize_the_transformer_like_the_engine(form, engine_reference):
    if form == "bare config":
        pipe = DiTPipeline.from_pretrained(BUNDLED_MODEL_DIR, quantization_config=CONFIG)
    elif form == "quant_mapping":
        pipe = DiTPipeline.from_pretrained(
            BUNDLED_MODEL_DIR, quantization_config=PipelineQuantizationConfig(quant_mapping={"transformer": CONFIG}))
    elif form == "quant_backend":
        options = {k: v for k, v in CONFIG.options().items()}
        pipe = DiTPipeline.from_pretrained(BUNDLED_MODEL_DIR, quantization_config=PipelineQuantizationConfig(
            quant_backend="ptq4dit", quant_kwargs=options, components_to_quantize=["transformer"]))
    else:
        pipe = quantize(load_pipeline("bundled"), CONFIG, progress=False)
    _assert_same_quantized(pipe.transformer, engine_reference)
    assert not any(isinstance(m, QuantLinear) for m in pipe.vae.modules())  # the VAE is never touched


def test_pipeline_backend_form_without_components_names_the_fix():
    config = PipelineQuantizationConfig(quant_backend="ptq4dit", quant_kwargs=dict(FAST))
    with pytest.raises(ValueError, match="components_to_quantize") as info:
        DiTPipeline.from_pretrained(BUNDLED_MODEL_DIR, quantization_config=config)
    assert "AutoencoderKL" in str(info.value)


def test_float16_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="torch_dtype") as info:
        DiTTransformer2DModel.from_pretrained(TRANSFORMER_DIR, quantization_config=CONFIG, torch_dtype=torch.float16)
    assert "float32" in str(info.value)
