"""diffusers-ptq: post-training quantization for Diffusion Transformers."""

__version__ = "0.1.0"
