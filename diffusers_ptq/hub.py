"""Model card, atomic save and Hub upload for a quantized transformer or pipeline.

`model_card(obj, metrics=...)` states the method, bits, calibration settings, library versions and, when given,
the measured quality figures. `save_pretrained(obj, folder)` writes the whole folder atomically
(`serialization.save_atomic`), safetensors only, with the card as README.md at its root. `push_to_hub(obj, repo_id)`
does that save into a temporary folder and uploads it with `huggingface_hub.HfApi` (`create_repo`, then
`upload_folder`).

These are functions of ours, not replacements of diffusers' methods: diffusers has no hook after a save (where an
atomic swap or a model card would go). `model.save_pretrained` / `pipe.save_pretrained` / `push_to_hub`, diffusers'
own, write the same loadable checkpoint (our tensors and metadata come from the quantizer's
`get_state_dict_and_metadata` hook), in place and with diffusers' generic card.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import tempfile
from pathlib import Path

from diffusers_ptq import serialization
from diffusers_ptq.config import PIPELINE_COMPONENT, DiffusersPTQConfig, config_from_dict
from diffusers_ptq.models import adapter_for

PACKAGES = ("diffusers-ptq", "diffusers", "optimum-quanto", "torch", "safetensors", "huggingface_hub")


def _transformer_of(obj):
    return getattr(obj, "transformer", None) if hasattr(obj, "components") else obj


def quantization_config_of(obj) -> DiffusersPTQConfig:
    """The diffusers_ptq config of a quantized transformer or pipeline (ValueError if it is not quantized by us)."""
    transformer = _transformer_of(obj)
    config = transformer.config.get("quantization_config") if transformer is not None else None
    if isinstance(config, dict):
        config = config_from_dict(config)
    if not isinstance(config, DiffusersPTQConfig):
        raise ValueError(f"{type(obj).__name__} is not quantized by diffusers_ptq (no diffusers_ptq quantization_config)")
    return config


def library_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _base_model(obj) -> str | None:
    name = str((getattr(obj, "config", {}) or {}).get("_name_or_path") or "")
    if name and not os.path.exists(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    return None


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _conditions(config) -> str:
    if config.class_labels is not None:
        return f"class labels {config.class_labels}"
    if config.calibration_prompts is not None:
        return f"{len(config.calibration_prompts)} prompts: {json.dumps(config.calibration_prompts[:3])[:-1]}, ...]"
    return "the family's default: all the classes, balanced (class-conditional), or the bundled calibration prompts"


def model_card(obj, *, metrics: dict | None = None, base_model: str | None = None) -> str:
    """A Markdown model card (with YAML front matter) for a quantized transformer or pipeline."""
    config = quantization_config_of(obj)
    try:
        quant = config.to_quant_config()
    except NotImplementedError:
        quant = None
    is_pipeline = hasattr(obj, "components")
    adapter = adapter_for(_transformer_of(obj))
    model_class = adapter.pipeline_class if is_pipeline else adapter.model_class
    defaults = adapter.calibration_defaults(_transformer_of(obj))  # what the settings left None resolved to
    sampling = {k: defaults[k] if getattr(config, k) is None else getattr(config, k) for k in defaults}
    base_model = base_model or _base_model(obj)
    bits = f"W{config.weight_bits}A{config.act_bits or 16}"
    tags = ["diffusers", "diffusers-ptq", "quantization", config.method, bits.lower(), adapter.name]
    front = ["---", "library_name: diffusers", "tags:", *[f"- {t}" for t in tags]]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    weights = (f"int{config.weight_bits}, per output channel" if config.weight_group_size is None
               else f"int{config.weight_bits}, groups of {config.weight_group_size} input channels")
    method_options = {k: getattr(config, k) for k in type(config).OPTIONS}
    lines = [
        *front, "",
        f"# {bits} {config.method} quantized {model_class}", "",
        f"Post-training quantization with diffusers-ptq (`{config.method}`, "
        f"{quant.label if quant else bits}){f' of `{base_model}`' if base_model else ''}.", "",
        "## Quantization", "",
        "| setting | value |", "|---|---|",
        f"| method | `{config.method}` {json.dumps(method_options)} |",
        f"| weights | {weights} ({config.weight_rounding} rounding) |",
        f"| activations | {'int8, per-tensor static scales' if config.act_bits else 'float (weight-only)'}"
        f"{f', range: {config.act_range}' if config.act_bits else ''} |",
        f"| attention matmuls | {'int8 Q/K/V, 8-bit probabilities' if config.quantize_attention else 'float'} |",
        f"| layers | include {config.include}, exclude {config.exclude} |", "",
        "## Calibration", "",
        "| setting | value |", "|---|---|",
        f"| scheduler | {sampling['scheduler']}, {sampling['num_inference_steps']} steps |",
        f"| guidance scale | {sampling['guidance_scale']} |",
        f"| samples | {config.num_samples} (seed {config.seed}) |",
        f"| conditions | {_conditions(config)} |",
        "",
    ]
    if metrics:
        lines += ["## Quality", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {_fmt(v)} |" for k, v in metrics.items()], ""]
    else:
        lines += ["## Quality", "", "Not measured for this upload.", ""]
    lines += ["## Usage", "", "```python", "import diffusers_ptq  # registers the quantizer with diffusers",
              f"from diffusers import {model_class}", "",
              f"model = {model_class}.from_pretrained(\"<this repo>\")"
              "  # no calibration, bit-exact", "```", "",
              "## Library versions", "", "| package | version |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in library_versions().items()], ""]
    return "\n".join(lines)


def save_pretrained(obj, save_directory: str | os.PathLike, *, metrics: dict | None = None,
                    base_model: str | None = None, safe_serialization: bool = True, variant: str | None = None,
                    max_shard_size: int | str | None = None) -> None:
    """Save a quantized transformer or pipeline as diffusers' `save_pretrained` does, but atomically (the whole
    folder is written beside save_directory, checked, then swapped in: `serialization.save_atomic`), safetensors only,
    with our model card as README.md at its root. Under a distributed launch only the main process writes."""
    if not safe_serialization:
        raise ValueError("diffusers_ptq checkpoints are saved as safetensors only (safe_serialization=True)")
    card = model_card(obj, metrics=metrics, base_model=base_model)  # fails early if obj is not quantized by us
    is_pipeline = hasattr(obj, "components")
    kwargs = {"safe_serialization": True, "variant": variant}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size

    def check(folder: Path) -> None:
        serialization.check_saved_folder(folder / PIPELINE_COMPONENT if is_pipeline else folder)

    serialization.save_atomic(lambda tmp: obj.save_pretrained(tmp, **kwargs), save_directory,
                              extra_files={"README.md": card}, check=check)


def push_to_hub(obj, repo_id: str, *, metrics: dict | None = None, base_model: str | None = None,
                commit_message: str | None = None, private: bool | None = None, token: str | None = None,
                create_pr: bool = False, **save_kwargs):
    """Upload a quantized transformer or pipeline with its model card (what `save_pretrained` above writes). Returns
    upload_folder's result (None on the non-main processes of a multi-process run: only the main process uploads).
    `save_kwargs`: `variant`, `max_shard_size`."""
    from huggingface_hub import HfApi

    from diffusers_ptq.distributed import is_main_process

    if not is_main_process():
        return None
    config = quantization_config_of(obj)  # fails early if obj is not quantized by us
    save_kwargs.pop("subfolder", None)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "upload"
        save_pretrained(obj, folder, metrics=metrics, base_model=base_model, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {config.method} quantized model "
                                                                  f"(diffusers-ptq)")
