"""The benchmark harness, its metrics, the bundled toy models and their classifier.

`bench` (quality benchmark), `speed` (integer-kernel timing), `evaluation` (classifier accuracy / FID, PSNR,
FID/IS), `bundled` (the bundled MNIST DiT and its planted-outlier variant), `classifier` (the MNIST classifier
behind the metrics), `data` (MNIST loading) and `utils` (machine info, sample grids).

The library never imports this subpackage (tests/test_architecture.py checks it); the CLI (`diffusers_ptq.cli`)
and the scripts do.
"""
