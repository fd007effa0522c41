"""Block-sequential wall time at full depth from measured per-block times (issue #22, point 4; harness/walltime.py):
the formula against a direct computation, its refusals, and one tiny end-to-end run of the measurement."""

import json

import pytest

from diffusers_ptq.harness import walltime

# two double blocks and one single block, as a report's block_seconds would hold them
BLOCKS = {
    "transformer_blocks.0": {"calibrate": 4.0, "quantize": 10.0, "replay": 2.0, "calls": 2},
    "transformer_blocks.1": {"calibrate": 6.0, "quantize": 14.0, "replay": 2.0, "calls": 2},
    "single_transformer_blocks.0": {"calibrate": 1.0, "quantize": 5.0, "replay": 1.0, "calls": 2},
}


@pytest.mark.parametrize("samples, batch, steps, processes, expected", [
    (32, 4, 28, 1, 224), (32, 4, 28, 8, 28), (30, 4, 28, 8, 28), (33, 4, 28, 8, 56), (3, 4, 10, 8, 10)])
def test_calls_of_the_busiest_process(samples, batch, steps, processes, expected):
    assert walltime.calls_per_process(samples, batch, steps, processes) == expected


def test_wall_time_against_a_direct_computation():
    # per call: double blocks (4 + 2) / 2 = 3 and (6 + 2) / 2 = 4 -> 3.5; single (1 + 1) / 2 = 1
    # fixed: double (10 + 14) / 2 = 12; single 5
    depth = {"transformer_blocks": 19, "single_transformer_blocks": 38}
    full = 19 * 3.5 + 38 * 1.0
    measured = 3.5 + 3.5 + 1.0
    first_per_call = 9.0 / 2 * full / measured
    for processes, calls in ((1, 224), (8, 28)):
        got = walltime.wall_time(9.0, BLOCKS, depth, samples=32, batch_size=4, steps=28, processes=processes)
        assert got["calls_per_process"] == calls
        assert got["first_run_seconds"] == pytest.approx(calls * first_per_call, rel=1e-12)
        assert got["block_calls_seconds"] == pytest.approx(calls * full, rel=1e-12)
        assert got["block_quantize_seconds"] == pytest.approx(19 * 12 + 38 * 5, rel=1e-12)
        assert got["total_seconds"] == pytest.approx(calls * (first_per_call + full) + 19 * 12 + 38 * 5, rel=1e-12)


def test_unmeasured_kinds_and_uneven_calls_are_refused():
    with pytest.raises(ValueError, match="no measured block of kind"):
        walltime.wall_time(1.0, BLOCKS, {"transformer_blocks": 19, "other_blocks": 2}, 32, 4, 28, 8)
    uneven = {**BLOCKS, "transformer_blocks.2": {"calibrate": 1.0, "quantize": 1.0, "replay": 1.0, "calls": 3}}
    with pytest.raises(ValueError, match="different numbers of calls"):
        walltime.wall_time(1.0, uneven, {"transformer_blocks": 19}, 32, 4, 28, 8)


def test_a_tiny_measurement_end_to_end(tmp_path, monkeypatch):
    """The measurement machinery on the tiny FLUX twin (DIFFUSERS_PTQ_SPEED_TINY: not a measurement): every block
    of the few-block model timed over the calls its run made, the estimates and the validation run written."""
    monkeypatch.setenv("DIFFUSERS_PTQ_SPEED_TINY", "1")
    out = tmp_path / "wall.json"
    result = walltime.main(["--model", "flux", "--recipe", "flux1-dev-w8a8-htg", "--steps", "1", "--samples", "1",
                            "--resolution", "64", "--processes", "1", "8", "--validate", "--output", str(out)])
    assert json.loads(out.read_text())["estimates"] == result["estimates"]
    assert out.with_suffix(".md").read_text().startswith("# Block-sequential calibration")
    blocks = result["measured"]["block_seconds"]
    assert sorted(blocks) == ["single_transformer_blocks.0", "single_transformer_blocks.1", "transformer_blocks.0"]
    assert all(t["calls"] == 1 for t in blocks.values())  # 1 sample in one batch (the recipe's 4), 1 step
    steps, depth = result["validation"]["twice the steps"], result["validation"]["twice the blocks"]
    assert all(t["calls"] == 2 for t in steps["run"]["block_seconds"].values())
    assert sorted(depth["run"]["block_seconds"]) == [f"single_transformer_blocks.{i}" for i in range(4)] + [
        "transformer_blocks.0", "transformer_blocks.1"]
    assert depth["depth"] == {"transformer_blocks": 2, "single_transformer_blocks": 4}
    for check in (steps, depth):
        assert check["measured_seconds"] == pytest.approx(walltime.sequential_seconds(check["run"]), rel=1e-12)
        assert check["ratio"] == pytest.approx(check["predicted_seconds"] / check["measured_seconds"], rel=1e-12)
    one, eight = result["estimates"]
    assert (one["calls_per_process"], eight["calls_per_process"]) == (8 * 28, 28)  # 32 samples, batch 4, 28 steps
    assert eight["total_seconds"] < one["total_seconds"]
