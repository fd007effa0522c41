"""Train the MNIST classifier used by the metrics, and the reference feature statistics of the test set.

    python scripts/train_classifier.py --output diffusers_ptq/assets/mnist-classifier

Writes model.safetensors, reference_stats.safetensors (mean/covariance of the 128-d features over the 10k
test images) and training.json (test accuracy, time, parameter count). Deterministic given --seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers_ptq.harness.classifier import MnistClassifier
from diffusers_ptq.harness.data import load_mnist, to_model_range
from diffusers_ptq.harness.evaluation import feature_statistics


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (padding with black), a light augmentation."""
    padded = F.pad(images, (max_shift,) * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + images.shape[2], dx : dx + images.shape[3]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("diffusers_ptq/assets/mnist-classifier"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    train_x = (to_model_range(train_x) + 1) / 2  # [0, 1], 32x32: what DiTPipeline outputs
    test_x = (to_model_range(test_x) + 1) / 2

    model = MnistClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = args.epochs * (len(train_x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    t0 = time.time()
    model.train()
    step = 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(_random_shift(train_x[idx], gen)), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs} loss {float(loss):.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(test_x[i : i + 1000]) for i in range(0, len(test_x), 1000)])
        accuracy = float((model.head(feats).argmax(1) == test_y).float().mean())
    mu, sigma = feature_statistics(feats)
    args.output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output / "model.safetensors")
    save_file({"mu": mu, "sigma": sigma, "count": torch.tensor(len(feats))}, args.output / "reference_stats.safetensors")
    info = dict(seed=args.seed, epochs=args.epochs, seconds=time.time() - t0, test_accuracy=accuracy,
                test_images=len(test_x), parameters=sum(p.numel() for p in model.parameters()), torch=torch.__version__)
    (args.output / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
