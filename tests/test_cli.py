import json

import pytest

from diffusers_ptq.cli import main
from diffusers_ptq.harness.evaluation import inception_metrics


def test_demo_quantizes_and_writes_table_grid_and_json(tmp_path):
    from PIL import Image

    assert main(["demo", "--output-dir", str(tmp_path), "--num-samples", "20", "--steps", "3",
                 "--calibration-samples", "2"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["FP32", "W8A8 minmax+csb+ssc", "W4A8 minmax", "W4A8 minmax+htg+gptq"]
    assert all(r["relative_mse"] > 0 for r in result["rows"][1:])
    assert "| W4A8 minmax+htg+gptq |" in (tmp_path / "results.md").read_text()
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (20 * 34 + 2, 4 * 34 + 2)  # 4 methods x (10 digits x 2 samples)
    assert result["machine"]["cpu_model"] is not None


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


def test_cli_offers_every_benchmark_suite():
    from diffusers_ptq import cli
    from diffusers_ptq.harness import bench

    assert set(cli.SUITES_NAMES) == set(bench.SUITES)
