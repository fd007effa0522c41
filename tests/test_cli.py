import json

import pytest

from diffusers_ptq.cli import main
from diffusers_ptq.evaluation import inception_metrics


def test_demo_writes_grid_and_metrics(tmp_path):
    from PIL import Image

    assert main(["demo", "--output-dir", str(tmp_path), "--num-samples", "20", "--seeds", "0", "--steps", "4"]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (10 * 34 + 2, 10 * 34 + 2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"classifier_accuracy", "classifier_fid"} <= set(metrics["metrics"])
    assert metrics["machine"]["cpu_model"] is not None


def test_evaluate_against_reference(tmp_path):
    out = tmp_path / "m.json"
    assert main(["evaluate", "bundled", "--reference", "bundled", "--output", str(out), "--num-samples", "10",
                 "--seeds", "1", "--steps", "3", "--scheduler", "ddpm"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["scheduler"] == "DDPMScheduler" and metrics["metrics"]["relative_mse"]["mean"] == 0.0


def test_inception_metrics_never_download(tmp_path):
    import torch

    with pytest.raises(FileNotFoundError, match="never downloads"):
        inception_metrics(torch.rand(2, 3, 8, 8), None, tmp_path / "missing.pth")
