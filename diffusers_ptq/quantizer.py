"""The diffusers glue: one `DiffusersQuantizer` for every method config, registered on `import diffusers_ptq`.

- A float checkpoint loaded with a config is calibrated and quantized after its weights are loaded
  (`_process_model_after_weight_loading` -> `diffusers_ptq.api.quantize_transformer`).
- A checkpoint saved by this plugin (config.json has our `quantization_config`) is rebuilt from its quantized
  tensors without calibrating (`serialization.rebuild_quantized_modules`).
- `quantize(pipe_or_transformer, config)` does the first for an already-loaded model.

Only diffusers' documented `DiffusersQuantizer` hooks are used (diffusers/quantizers/base.py); no diffusers method is
replaced, on the class or on an instance. Saving: `model.save_pretrained` / `pipe.save_pretrained` are diffusers' own;
the quantizer adds the quantized tensors and the metadata through `get_state_dict_and_metadata`. The atomic
whole-folder save with a model card is `diffusers_ptq.save_pretrained` (hub.py): diffusers has no hook after a save.

Calibration context when loading from a folder: what the model family's adapter reads in the pipeline folder
(`ModelAdapter.folder_context` of the folder holding `model_index.json` next to a `transformer` subfolder: DiT's
`id2label`; SD3/FLUX's text encoders, which encode the calibration prompts and are freed), with the config's
`class_labels` first; the noise schedule from `../scheduler/scheduler_config.json` when present, else the model
family's training schedule (`ModelAdapter.default_noise_schedule`). The scheduler class is the config's `scheduler`
(None: the family's, `ModelAdapter.calibration_defaults`).
"""

from __future__ import annotations

import copy
import json
import weakref
from pathlib import Path

import torch
from diffusers.quantizers import auto as diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer

from diffusers_ptq import serialization
from diffusers_ptq.config import METHODS, PIPELINE_COMPONENT, DiffusersPTQConfig, register_config, saved_method_name
from diffusers_ptq.models import adapter_for


def check_supported_model(model):
    """The model's adapter (diffusers_ptq.models); a ValueError naming the supported models if it has none."""
    return adapter_for(model)


def pipeline_folder(checkpoint_files) -> Path | None:
    """The pipeline folder (with model_index.json) a transformer subfolder's checkpoint belongs to, or None."""
    if not checkpoint_files:
        return None
    root = Path(checkpoint_files[0]).resolve().parent.parent
    return root if (root / "model_index.json").is_file() else None


def folder_context(adapter, checkpoint_files) -> tuple[dict, dict | None]:
    """(calibration context, scheduler config) of the pipeline folder a transformer subfolder belongs to: what the
    model's adapter reads there (`ModelAdapter.folder_context`: id2label, text encoders, ...) and the scheduler's
    config."""
    root = pipeline_folder(checkpoint_files)
    if root is None:
        return {}, None
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
    return adapter.folder_context(root), scheduler_config


class DiffusersPTQQuantizer(DiffusersQuantizer):
    """Calibrate-and-quantize on load (float checkpoint + config) or rebuild (pre-quantized checkpoint)."""

    requires_calibration = False  # True would mean "pre-quantized checkpoints only" in diffusers
    required_packages = ["optimum-quanto"]
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: DiffusersPTQConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] = []
        self.metadata: dict | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self.report = None  # api.QuantizationReport after a calibrating load
        # The model this quantizer belongs to (a weak reference: the model holds the quantizer as `hf_quantizer`).
        # Needed because diffusers' saving hook, get_state_dict_and_metadata(state_dict, safe_serialization), is not
        # given the model, and the metadata is read from its modules and attention processors.
        self._model = None

    def __deepcopy__(self, memo):
        """A deep copy of a quantized model gets a quantizer that belongs to the copy (`copy.deepcopy` puts the new
        model in `memo` before it copies the model's attributes, `hf_quantizer` among them)."""
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for key, value in self.__dict__.items():
            if key != "_model":
                setattr(twin, key, copy.deepcopy(value, memo))
        model = self._model() if self._model is not None else None
        if model is not None:
            model = memo.get(id(model), model)
        twin._model = weakref.ref(model) if model is not None else None
        return twin

    # --- checks ----------------------------------------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
            raise ValueError("diffusers_ptq does not support a device_map that splits the transformer over devices")
        if "torch_dtype" not in kwargs:  # diffusers calls this twice; the checks below run once
            return
        # A pre-quantized checkpoint loaded with a quantization_config: diffusers' merge_quantization_configs
        # (quantizers/auto.py) warns and keeps the checkpoint's config, and no hook sees the user's argument, so the
        # checkpoint is loaded as saved (docs/diffusers.md, "What diffusers lacks").
        if not self.pre_quantized:
            self.quantization_config.to_plan()  # methods not implemented yet fail here, before loading

    def update_torch_dtype(self, torch_dtype):
        if torch_dtype is None or torch_dtype == torch.float32:
            return torch.float32
        raise ValueError(f"torch_dtype={torch_dtype} is not supported with diffusers_ptq: quantization scales and the "
                         "float layers stay float32; allowed values: [None, torch.float32]")

    # --- pre-quantized loading -------------------------------------------------------------------------------------
    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        self.checkpoint_files = [str(f) for f in checkpoint_files or []]
        if not self.pre_quantized:
            return loaded_keys
        self.metadata = serialization.read_metadata(self.checkpoint_files)
        return serialization.float_model_keys(self.metadata, loaded_keys)

    def maybe_update_state_dict(self, state_dict):
        if not self.pre_quantized:
            return state_dict
        state_dict, ours = serialization.take_quantized_tensors(self.metadata, state_dict)
        self._tensors.update(ours)
        return state_dict

    @property
    def supports_parallel_loading(self) -> bool:
        return False  # maybe_update_state_dict collects tensors across shards

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        check_supported_model(model)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            if self.metadata is None:
                raise serialization.CheckpointError("pre-quantized checkpoint: metadata was not read")
            serialization.rebuild_quantized_modules(model, self.metadata, self._tensors)
            self._tensors = {}
        else:
            context, scheduler_config = folder_context(adapter_for(model), self.checkpoint_files)
            self.report = run_quantization(model, self.quantization_config, context, scheduler_config)
        attach(model, self)
        return model

    # --- saving ----------------------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        """diffusers' saving hook, called by ModelMixin.save_pretrained (and so by DiffusionPipeline.save_pretrained
        and push_to_hub) after it wrote config.json and before it writes the weights: adds the processor tensors and
        the metadata header, and refuses pickle."""
        if not safe_serialization:
            raise ValueError("diffusers_ptq checkpoints are saved as safetensors only (safe_serialization=True); "
                             "diffusers had already written config.json (diffusers_ptq.save_pretrained refuses "
                             "before writing anything)")
        model = self._model() if self._model is not None else None
        if model is None:
            raise RuntimeError("the quantized model this quantizer belongs to is gone")
        return serialization.state_dict_and_metadata(model, state_dict)

    @property
    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False


def run_quantization(transformer, config: DiffusersPTQConfig, context: dict | None = None,
                     scheduler_config: dict | None = None, progress: bool = True):
    """Calibrate and quantize a loaded transformer in place (the one engine pipeline), with the calibration
    `context` its pipeline or folder supplied. Returns its report."""
    from diffusers_ptq.api import quantize_transformer

    adapter = check_supported_model(transformer)
    plan = config.to_plan()
    context = dict(context or {})
    if config.class_labels is not None:  # the classes calibration draws its labels from (checked by the adapter)
        adapter.calibration_conditions(transformer, len(config.class_labels), {"class_labels": config.class_labels})
        context["id2label"] = {c: str(c) for c in config.class_labels}
    transformer.eval()
    report = quantize_transformer(transformer, plan, context=context, scheduler_config=scheduler_config,
                                  progress=progress)
    report.config = config.to_dict()
    return report


def attach(model, quantizer: DiffusersPTQQuantizer) -> None:
    """Mark a quantized transformer as diffusers marks a model after a quantized load (attributes only; no method
    of the model is replaced), and tie the quantizer to it for `get_state_dict_and_metadata`."""
    quantizer._model = weakref.ref(model)
    # What diffusers does to a model it loads with a quantizer, for `diffusers_ptq.quantize(...)` on a loaded one:
    # DiffusersQuantizer.preprocess_model (quantizers/base.py) sets is_quantized and quantization_method;
    # ModelMixin.from_pretrained (models/modeling_utils.py) sets `model.hf_quantizer = hf_quantizer` after
    # postprocess_model; ConfigMixin.from_config (configuration_utils.py) registers the config's quantization_config
    # with register_to_config, so that save_config writes it to config.json.
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = quantizer.quantization_config.quant_method
    if model.config.get("quantization_config") is not quantizer.quantization_config:
        model.register_to_config(quantization_config=quantizer.quantization_config)


def quantize(pipe_or_transformer, config: DiffusersPTQConfig, *, progress: bool = True):
    """Calibrate and quantize an already-loaded pipeline (its transformer) or transformer in place.

    A pipeline supplies its calibration context (`ModelAdapter.pipeline_context`: DiT's class labels, SD3/FLUX's
    text encoders) and its scheduler's noise schedule; a bare transformer is calibrated with its family's defaults
    (DiT: over all its classes; a text-to-image transformer needs its pipeline's text encoders). Returns the object
    passed in.
    """
    if not isinstance(config, DiffusersPTQConfig):
        raise TypeError(f"config must be one of {[c.__name__ for c in METHODS.values()]}, got {type(config).__name__}")
    transformer = getattr(pipe_or_transformer, PIPELINE_COMPONENT, None)
    is_pipeline = transformer is not None and hasattr(pipe_or_transformer, "components")
    if not is_pipeline:
        transformer = pipe_or_transformer
    adapter = check_supported_model(transformer)
    if getattr(transformer, "is_quantized", False) or any(
            type(m).__name__ == "QuantLinear" for m in transformer.modules()):
        raise ValueError("the transformer is already quantized; load the float model to quantize it again")
    if transformer.dtype != torch.float32:
        raise ValueError(f"the transformer is {transformer.dtype}: diffusers_ptq quantizes float32 models "
                         "(load with torch_dtype=torch.float32)")
    context, scheduler_config = {}, None
    if is_pipeline:
        context = adapter.pipeline_context(pipe_or_transformer)
        scheduler = getattr(pipe_or_transformer, "scheduler", None)
        scheduler_config = dict(scheduler.config) if scheduler is not None else None
    quantizer = DiffusersPTQQuantizer(config, pre_quantized=False)
    quantizer.report = run_quantization(transformer, config, context, scheduler_config, progress=progress)
    attach(transformer, quantizer)
    return pipe_or_transformer


# ------------------------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------------------------


def _register_with_diffusers(name: str, config_class: type[DiffusersPTQConfig]) -> None:
    diffusers_auto.AUTO_QUANTIZER_MAPPING[name] = DiffusersPTQQuantizer
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[name] = config_class
    # a saved config.json names the method with an import hint (see config.SAVED_METHOD_TEMPLATE)
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[saved_method_name(name)] = config_class
    try:  # PipelineQuantizationConfig(quant_backend=name) also looks the name up in transformers' mapping
        from transformers.quantizers import auto as transformers_auto
    except ImportError:
        return
    transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[name] = config_class


def register_method(config_class: type[DiffusersPTQConfig]) -> type[DiffusersPTQConfig]:
    """Add a method: a DiffusersPTQConfig subclass with a new `method` name (decorator-friendly). The quantizer
    needs no change: it calls `config.to_plan()` and the engine."""
    register_config(config_class)
    _register_with_diffusers(config_class.method, config_class)
    return config_class


def register_all() -> None:
    for name, config_class in METHODS.items():
        _register_with_diffusers(name, config_class)


register_all()
