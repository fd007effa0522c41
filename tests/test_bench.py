import json
import os

import pytest
import torch

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


@pytest.mark.parametrize("family, scheduler", [("sd3", "FlowMatchEulerDiscreteScheduler"),
                                               ("pixart", "DPMSolverMultistepScheduler")])
def test_benchmark_runs_on_a_text_to_image_pipeline(tmp_path, family, scheduler):
    """A folder holding an SD3 or PixArt-Σ pipeline: sampled with its own scheduler from prompts, calibrated from
    the bench's prompts through its text encoders (the tiny random pipeline has 3-channel images: paired metrics
    only, no MNIST classifier)."""
    from diffusers_ptq.harness.bench import default_scheduler
    from diffusers_ptq.harness.text import tiny_pipeline

    folder = tmp_path / family
    tiny_pipeline(family).save_pretrained(folder)
    assert default_scheduler(folder) is None and default_scheduler("bundled") == "ddim"
    configs = [QuantConfig(weight_bits=8, act_bits=8, htg_shift=True, htg_scale=True, num_inference_steps=3,
                           num_samples=2)]
    out = tmp_path / "results.json"
    run_benchmark(folder, configs, num_samples=4, num_inference_steps=3, guidance_scale=4.0, batch_size=4,
                  output=out, progress=False)
    result = json.loads(out.read_text())
    fp, htg = result["rows"]
    assert result["scheduler"] == scheduler and result["scheduler_kind"] is None
    assert fp["psnr_db"] == float("inf") and 15 < htg["psnr_db"] < float("inf")
    assert "classifier_accuracy" not in htg and result["outliers"]


def test_speed_worker_runs_the_mmdit_models(monkeypatch):
    """The machinery of the SD3/FLUX/PixArt speed rows and of the PixArt modulation multiply's cost, on shrunken
    models: a dry run, not a measurement."""
    from diffusers_ptq.harness.speed import forward_worker, mmdit_speed_markdown, modulation_multiply_worker

    monkeypatch.setenv("DIFFUSERS_PTQ_SPEED_TINY", "1")
    names = ("sd3-medium", "flux", "pixart-sigma")
    rows = [forward_worker(label, repeats=1, compiled=False, model_name=name) for name in names
            for label in ("FP32", "W8A8")]
    assert [r["model"] for r in rows] == [n for n in names for _ in range(2)]
    assert all(r["kernels"] and r["speedup"] > 0 for r in rows[1::2]) and not rows[0]["kernels"]
    multiply = modulation_multiply_worker(repeats=1)
    assert multiply["blocks"] == 2 and multiply["width"] == 6 * 144 and multiply["overhead_ratio"] > 0
    text = mmdit_speed_markdown(rows, multiply)
    assert "FLUX.1-dev width" in text and "PixArt-Σ width" in text and "modulation multiply" in text


@pytest.mark.parametrize("label", ["quanto-W8A8", "torchao-int8dyn"])
def test_speed_peers_quantize_the_same_linears_as_ours(monkeypatch, label):
    """bench --speed's peers (issue #21) replace exactly the Linears diffusers-ptq quantizes; the row runs (a dry
    run on a one-block DiT-XL/2, not a measurement). torchao is optional: skipped where it is not installed."""
    if label.startswith("torchao"):
        pytest.importorskip("torchao")
    from diffusers_ptq.harness.speed import PEER_MODES, _dit_xl_inputs, _dit_xl_model, _peer_targets, forward_worker

    monkeypatch.setenv("DIFFUSERS_PTQ_SPEED_TINY", "1")
    model = _dit_xl_model()
    targets = _peer_targets(model)
    before = {name: type(m.weight) if hasattr(m, "weight") else None for name, m in model.named_modules()}
    inputs = _dit_xl_inputs()
    inputs["hidden_states"] = inputs["hidden_states"][:, :, :8, :8]
    PEER_MODES[label](model, inputs)
    changed = {name for name, m in model.named_modules()
               if name in before and (type(m).__name__ != "Linear" or type(getattr(m, "weight", None)) is not before[name])
               and isinstance(m, torch.nn.Linear)}
    assert changed == set(targets) and len(targets) == 9
    row = forward_worker(label, repeats=1, compiled=False)
    assert row["kernels"] == {f"{label.split('-')[0]} (peer)": 9} and row["speedup"] > 0


def test_method_grid_places_each_mmdit_row():
    """The `mmdit` and `mmdit-dynamic` suites' rows land in their (bits and activations, rounding, method) cell; a
    row not run yet leaves it empty; a bits × activations with no row has no line."""
    from diffusers_ptq.harness.bench import SUITES, method_grid

    labels = [c.label for c in SUITES["mmdit"]()]
    rows = [{"label": "FP32", "psnr_db": float("inf")}] + [
        {"label": label, "psnr_db": 20.0 + i, "classifier_fid_to_reference": 0.5, "classifier_accuracy": 0.9}
        for i, label in enumerate(labels[:-1])]  # the last row (Q-DiT + GPTQ) not run
    lines = method_grid({"rows": rows}).splitlines()
    assert lines[0].startswith("| PSNR vs FP") and len(lines) == 8  # W8A8 static, W4A8 static, W4A8 dynamic (Q-DiT)
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| W8A8 static, nearest", "| W8A8 static, GPTQ", "| W4A8 static, nearest", "| W4A8 static, GPTQ",
        "| W4A8 dynamic, nearest", "| W4A8 dynamic, GPTQ"]
    w4_nearest, w4_gptq, qdit_nearest, qdit_gptq = (lines[i].split(" | ") for i in (4, 5, 6, 7))
    assert w4_nearest[1] == "20.00 / 0.50 / 0.90"  # the first row: W4A8 min-max, nearest
    assert w4_gptq[2].startswith("23.00")  # W4A8 SmoothQuant + GPTQ, the fourth row
    assert qdit_nearest[5].startswith("36.00") and qdit_gptq[5].strip(" |") == ""  # Q-DiT: nearest run, GPTQ not yet
    assert sum(cell.count(" / ") == 2 for line in lines[2:] for cell in line.split(" | ")) == len(labels) - 1
    assert method_grid({"rows": rows[:1]}) == ""

    dynamic = [c.label for c in SUITES["mmdit-dynamic"]()]
    assert all("dynamic" in label for label in dynamic) and len(set(dynamic)) == 16
    rows = [{"label": "FP32", "psnr_db": float("inf")}] + [{"label": label, "psnr_db": 40.0 + i} for i, label in
                                                           enumerate(dynamic)]
    lines = method_grid({"rows": rows}).splitlines()
    assert len(lines) == 6 and lines[2].startswith("| W8A8 dynamic, nearest | 48.00 / – / –")  # "W8A8 dynamic"
    assert lines[4].split(" | ")[4].startswith("46.00")  # W4A8 dynamic HTG, nearest: the 7th row


def test_footprint_worker_runs_on_the_flux_width_model(monkeypatch):
    """bench --footprint's FLUX rows, on the shrunken speed model: a dry run of the machinery, not a measurement."""
    from diffusers_ptq.harness.bench import footprint_table, footprint_worker

    monkeypatch.setenv("DIFFUSERS_PTQ_SPEED_TINY", "1")
    rows = [footprint_worker(label, "flux") for label in ("FP32", "W4A8")]
    fp, w4 = rows
    assert w4["checkpoint_bytes"] < fp["checkpoint_bytes"] and w4["checkpoint_parts"]["scales"] > 0
    assert "| W4A8 |" in footprint_table(rows, "FLUX") and w4["model"] == "flux"
    # the checkpoint saved and loaded again in a fresh process: its files hold the parts plus their headers
    for row in rows:
        load = row["load"]
        assert row["checkpoint_bytes"] <= load["checkpoint_file_bytes"] <= row["checkpoint_bytes"] + 2**20
        assert load["imports_rss_bytes"] < load["loaded_rss_bytes"] <= load["load_forward_peak_bytes"]
    assert "| loading the saved checkpoint" in footprint_table(rows, "FLUX")
    # the quantized checkpoint loaded a second time with the kernels chosen for memory (KERNEL_CHOICE "memory")
    assert "memory_kernels" not in fp["load"] and w4["load"]["memory_kernels"]["forward_seconds"] > 0
    assert "| W4A8 (memory kernels) |" in footprint_table(rows, "FLUX")
    # and with glibc's mmap threshold fixed at 1 MiB: each load's settings reach its fresh process
    load = w4["load"]
    per_call = {"int8-per-call", "emulated-per-call"}  # the faster per shape, measured in each process
    assert set(load["memory_kernels"]["kernels"]) | set(load["memory_kernels_mmap"]["kernels"]) <= per_call
    assert not per_call & set(load["kernels"])
    assert load["memory_kernels_mmap"]["malloc_mmap_threshold"] == "1048576"
    assert load["memory_kernels"]["malloc_mmap_threshold"] == os.environ.get("MALLOC_MMAP_THRESHOLD_")
    assert load["memory_kernels_mmap"]["forward_seconds"] > 0
    assert "| W4A8 (memory kernels, MALLOC_MMAP_THRESHOLD_=1 MiB) |" in footprint_table(rows, "FLUX")


def test_speed_benchmark_refuses_an_unknown_mode_before_running_anything(tmp_path):
    from diffusers_ptq.harness.speed import run_speed_benchmark

    with pytest.raises(ValueError, match=r"unknown speed mode\(s\) \['W9A9'\]"):
        run_speed_benchmark(tmp_path / "speed.json", modes=["W8A8", "W9A9"])
    assert not (tmp_path / "speed.json").exists()


def test_head_to_head_times_the_modes_against_the_last(monkeypatch):
    """The one-process comparison's machinery on a shrunken DiT-XL/2 (eager: a dry run, not a measurement): each
    mode built from the same subject, their forwards in interleaved rounds, each ratio the median of the per-round
    ratios to the last mode's."""
    import statistics

    from diffusers_ptq.harness.speed import FREEZING_ENV, head_to_head_markdown, head_to_head_worker

    monkeypatch.setenv("DIFFUSERS_PTQ_SPEED_TINY", "1")
    monkeypatch.delenv(FREEZING_ENV, raising=False)
    row = head_to_head_worker(["W8A8", "W4A8", "FP32"], repeats=3, compiled=False)
    assert [m["label"] for m in row["modes"]] == ["W8A8", "W4A8", "FP32"] and row["reference"] == "FP32"
    modes = {m["label"]: m for m in row["modes"]}
    assert modes["FP32"]["kernels"] == {} and sum(modes["W8A8"]["kernels"].values()) > 0
    reference = modes["FP32"]["all_seconds"]
    for m in row["modes"]:
        assert len(m["all_seconds"]) == 3 and m["seconds"] == statistics.median(m["all_seconds"])
        assert m["vs_reference"] == statistics.median(r / s for r, s in zip(reference, m["all_seconds"]))
    assert modes["FP32"]["vs_reference"] == 1.0
    assert "| W4A8 |" in head_to_head_markdown(row) and "eager" in head_to_head_markdown(row)
    with pytest.raises(ValueError, match="two or more distinct"):
        head_to_head_worker(["W8A8"], repeats=1, compiled=False)


def test_head_to_head_needs_one_of_our_modes_and_the_peer(tmp_path):
    from diffusers_ptq.harness.speed import run_speed_benchmark

    with pytest.raises(ValueError, match="head to head"):  # refused before any worker runs
        run_speed_benchmark(tmp_path / "speed.json", modes=["FP32", "torchao-int8dyn"], head_to_head=True)
    assert not (tmp_path / "speed.json").exists()


def test_speed_attention_rows(monkeypatch):
    """bench --speed's attention core timings (issue #21 point 2: attention's share of the forward) and their table,
    on the shrunken DiT-XL/2: a dry run, not a measurement."""
    from diffusers_ptq import kernels
    from diffusers_ptq.harness.speed import ATTENTION_VARIANTS, attention_markdown, attention_times

    monkeypatch.setenv("DIFFUSERS_PTQ_SPEED_TINY", "1")
    a = attention_times(repeats=1)
    assert (a["batch"], a["heads"], a["tokens"], a["dim"], a["layers"]) == (2, 2, 256, 32, 1)
    expected = set(ATTENTION_VARIANTS) if kernels.int_mm_exact("cpu") else {"sdpa_fp32", "sdpa_fp32_compiled",
                                                                             "codes_float_matmuls"}
    assert set(a["seconds"]) == expected and all(s > 0 for s in a["seconds"].values())
    text = attention_markdown(a, 1.0)
    assert text.count("\n| ") == len(expected) + 1  # the header and a row per variant
    assert ("`int8_bmm` (all heads), compiled" in text) == kernels.int_mm_exact("cpu")


def test_machine_info_records_the_libraries_isa_limits(monkeypatch):
    """A run with oneDNN / ATen / MKL held below the CPU's ISA (a proxy for an older CPU) says so in its record;
    the CPU's own flags are unchanged."""
    from diffusers_ptq.harness.utils import ISA_LIMITS, machine_info

    for name in ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    plain = machine_info()
    assert "isa_limits" not in plain
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    limited = machine_info()
    assert limited["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    assert limited.get("cpu_flags_of_note") == plain.get("cpu_flags_of_note")
