"""The small MNIST classifier behind the bundled model's quality metrics (accuracy and classifier-FID)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

CLASSIFIER_DIR = Path(__file__).parent.parent / "assets" / "mnist-classifier"
FEATURE_DIM = 128


class MnistClassifier(nn.Module):
    """Three conv blocks and a 128-d feature layer; takes [N, 1, 32, 32] images in [0, 1]."""

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != (1, 32, 32):
            raise ValueError(f"the MNIST classifier takes [N, 1, 32, 32] images, got {tuple(images.shape)}")
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@lru_cache(maxsize=2)
def load_classifier(directory: Path = CLASSIFIER_DIR) -> MnistClassifier:
    """Load the shipped classifier (safetensors) in eval mode, frozen (cached: do not modify it)."""
    model = MnistClassifier()
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=2)
def load_reference_statistics(directory: Path = CLASSIFIER_DIR) -> dict[str, torch.Tensor]:
    """Mean and covariance of the classifier's features on the 10k held-out MNIST test images."""
    return load_file(directory / "reference_stats.safetensors")


def classifier_info(directory: Path = CLASSIFIER_DIR) -> dict:
    return json.loads((directory / "training.json").read_text())
