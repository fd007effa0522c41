"""The quantization methods, one file each: pure functions (statistics and weights in, ranges and factors out) and
the method's plug-in (its options dataclass and stage handlers, methods/base.py), registered in `PLUGINS` on import.
"""

from diffusers_ptq.methods import gptq, htg, ptq4dit, qdit, reconstruct, smoothquant  # noqa: F401  (registers them)
from diffusers_ptq.methods.base import PLUGINS, Method, Observations, register_method_plugin

__all__ = ["PLUGINS", "Method", "Observations", "register_method_plugin"]
