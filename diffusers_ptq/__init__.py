"""diffusers-ptq: post-training quantization for Diffusion Transformers.

`import diffusers_ptq` registers the quantization methods with diffusers (and with transformers' mapping, for
`PipelineQuantizationConfig(quant_backend=...)`): "ptq4dit", "baseline", "htg" (HTG: issue #5), "qdit"
(Q-DiT: issue #12).
"""

__version__ = "0.1.0"

from diffusers_ptq.config import (  # noqa: E402
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
from diffusers_ptq.hub import model_card, push_to_hub  # noqa: E402
from diffusers_ptq.quantizer import DiffusersPTQQuantizer, quantize, register_method  # noqa: E402

__all__ = [
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
