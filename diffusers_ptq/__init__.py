"""diffusers-ptq: post-training quantization for Diffusion Transformers.

`import diffusers_ptq` registers the quantization methods with diffusers (and with transformers' mapping, for
`PipelineQuantizationConfig(quant_backend=...)`): "ptq4dit", "baseline", "htg" (HTG: issue #5), "qdit"
(Q-DiT: issue #12).
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
from diffusers_ptq.hub import model_card, push_to_hub
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
]
