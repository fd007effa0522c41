import json

from diffusers_ptq.config import QuantConfig
from diffusers_ptq.harness.bench import run_benchmark


def test_benchmark_rows_are_paired_and_written(tmp_path):
    configs = [QuantConfig(weight_bits=8, act_bits=None),
               QuantConfig(weight_bits=4, act_bits=8, num_inference_steps=3, num_samples=4)]
    out = tmp_path / "results.json"
    result = run_benchmark("bundled", configs, num_samples=20, num_inference_steps=3, output=out, progress=False)
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == ["FP32", "W8A16 weight-only", "W4A8 minmax"]
    fp, w8, w4 = rows
    assert fp["relative_mse"] == 0.0 and fp["psnr_db"] == float("inf")
    assert 0 < w8["relative_mse"] < w4["relative_mse"]
    assert w4["state_dict_bytes"] < w8["state_dict_bytes"] < 0.6 * fp["state_dict_bytes"]
    assert w4["calibration_seconds"] > 0 and w8["calibration_seconds"] == 0
    table = out.with_suffix(".md").read_text()
    assert "| W4A8 minmax |" in table and result["machine"]["cpu_model"]

    # a later run of only some rows (`--only`) reuses its finished rows and keeps the others
    first = rows[1]
    run_benchmark("bundled", configs[:1], num_samples=20, num_inference_steps=3, output=out, progress=False)
    again = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(again) == sorted(["FP32", "W8A16 weight-only", "W4A8 minmax"])
    assert again["W8A16 weight-only"] == first and again["W4A8 minmax"] == w4
