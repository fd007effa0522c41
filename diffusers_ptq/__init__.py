"""diffusers-ptq: post-training quantization for Diffusion Transformers.

`import diffusers_ptq` registers the quantization methods with diffusers (and with transformers' mapping, for
`PipelineQuantizationConfig(quant_backend=...)`): "ptq4dit", "baseline", "htg" (HTG: issue #5), "qdit"
(Q-DiT: issue #12).

`save_pretrained(model_or_pipeline, folder)` is the atomic, safetensors-only save with a model card;
`push_to_hub(model_or_pipeline, repo_id)` uploads that. diffusers' own `save_pretrained` / `push_to_hub` also write
loadable checkpoints (in place, with diffusers' generic card): docs/diffusers.md.
"""

from diffusers_ptq._version import __version__
from diffusers_ptq.config import (
    METHODS,
    BaselineConfig,
    DiffusersPTQConfig,
    HTGConfig,
    PTQ4DiTConfig,
    QDiTConfig,
    QuantConfig,
    config_from_dict,
    load_recipe,
)
from diffusers_ptq.hub import model_card, push_to_hub, save_pretrained
from diffusers_ptq.quantizer import DiffusersPTQQuantizer, quantize, register_method

__all__ = [
    "__version__",
    "METHODS",
    "BaselineConfig",
    "DiffusersPTQConfig",
    "DiffusersPTQQuantizer",
    "HTGConfig",
    "PTQ4DiTConfig",
    "QDiTConfig",
    "QuantConfig",
    "config_from_dict",
    "load_recipe",
    "model_card",
    "push_to_hub",
    "quantize",
    "register_method",
    "save_pretrained",
]
