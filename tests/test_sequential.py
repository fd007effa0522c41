"""Block-sequential calibration (issue #22, point 3; api.quantize_sequential, sequential.py).

- With the float model's outputs feeding each block (sequential_inputs="float"), every observation is the
  all-in-memory run's, so the checkpoint is the same bit for bit (methods that do not calibrate again after their
  fold; HTG with static activations observes the folded model a second time, which differs by rounding).
- With the quantized blocks' outputs (the default), block k's statistics are those of what the quantized blocks
  0..k−1 feed it: checked against a direct computation (the quantized first block run on the float model's inputs).
- Files or memory give the same checkpoint; the files are removed. Hessians exist for one block at a time.
- Percentile / MSE ranges draw their token samples from one random stream in the order the layers are called,
  which a block-by-block run visits in another order: other picks of the same distribution (not compared here).
"""

import copy
import os

import pytest
import torch

from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.config import BaselineConfig, QuantConfig
from diffusers_ptq.serialization import state_dict_and_metadata

CALIBRATION = dict(num_samples=4, num_inference_steps=3, batch_size=2)


def _quantized(model, **options):
    q = copy.deepcopy(model)
    report = quantize_transformer(q, QuantConfig(**CALIBRATION, **options), progress=False)
    return q, report


def _checkpoint(model) -> tuple[dict, dict]:
    return state_dict_and_metadata(model, model.state_dict())


def _assert_same_checkpoint(a, b) -> None:
    (ta, ma), (tb, mb) = _checkpoint(a), _checkpoint(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert ma == mb


CONFIGS = {
    "minmax W8A8": dict(),
    "SmoothQuant W4A8 GPTQ": dict(weight_bits=4, weight_rounding="gptq", smoothquant_alpha=0.5),
    "PTQ4DiT W8A8 GPTQ (SSC rows)": dict(csb_alpha=0.5, ssc=True, weight_rounding="gptq"),
    "quantized attention": dict(quantize_attention=True),
    "HTG W4A16 GPTQ": dict(weight_bits=4, act_bits=None, htg_shift=True, htg_scale=True, weight_rounding="gptq"),
}


@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_float_inputs_give_the_all_in_memory_checkpoint_bit_for_bit(tiny_transformer, options):
    one_pass, _ = _quantized(tiny_transformer, **options)
    sequential, report = _quantized(tiny_transformer, sequential=True, sequential_inputs="float", **options)
    _assert_same_checkpoint(one_pass, sequential)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 900]), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.equal(one_pass(x, timestep=t, class_labels=y).sample, sequential(x, timestep=t, class_labels=y).sample)


def test_quantized_inputs_are_what_the_quantized_blocks_feed(tiny_transformer):
    """Block 1's static input scales under sequential_inputs="quantized" are those of block 1's inputs when the
    QUANTIZED block 0 runs on the float model's block-0 inputs (recorded directly here, every call of the same
    calibration run), and not the float model's; block 0's are the float model's. The report times every block
    over the calls recorded here (scripts/sequential_wall_time.py derives wall times from it)."""
    from diffusers_ptq.api import activation_range
    from diffusers_ptq.calibration import LayerStats, calibrate
    from diffusers_ptq.methods import baselines

    model = tiny_transformer
    sequential, report = _quantized(model, sequential=True)
    one_pass, _ = _quantized(model)
    calls = []
    block0 = model.transformer_blocks[0]
    handle = block0.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        calibrate(model, include=["proj_out_2"], progress=False, **CALIBRATION)
    finally:
        handle.remove()
    blocks = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    assert list(report.block_seconds) == blocks
    assert all(t["calls"] == len(calls) and min(t.values()) >= 0 for t in report.block_seconds.values())
    timed = report.first_run_seconds + sum(sum(t.values()) - t["calls"] for t in report.block_seconds.values())
    assert 0 < report.first_run_seconds and timed <= report.total_seconds
    quantized0 = sequential.transformer_blocks[0]
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0)
            seen[name] = x if name not in seen else torch.maximum(seen[name], x)
        return hook

    block1 = copy.deepcopy(model.transformer_blocks[1])
    handles = [block1.get_submodule(n).register_forward_pre_hook(record(n)) for n in ("attn1.to_q", "norm1.linear")]
    with torch.no_grad():
        for args, kwargs in calls:
            block1(quantized0(*args, **kwargs), **kwargs)
    for h in handles:
        h.remove()
    for name in ("attn1.to_q", "norm1.linear"):
        stats = LayerStats(seen[name], -seen[name], seen[name])
        expected = baselines.scale_from_range(activation_range(stats, QuantConfig().plan().scheme).clamp(min=1e-8), 8)
        got = sequential.get_submodule(f"transformer_blocks.1.{name}").input_scale
        assert torch.equal(got.reshape(()), expected.reshape(())), name
        if name == "attn1.to_q":
            assert not torch.equal(got, one_pass.get_submodule(f"transformer_blocks.1.{name}").input_scale)
    for name in ("attn1.to_q", "ff.net.0.proj"):  # block 0: the float model's inputs either way
        assert torch.equal(sequential.get_submodule(f"transformer_blocks.0.{name}").input_scale,
                           one_pass.get_submodule(f"transformer_blocks.0.{name}").input_scale)


def test_files_give_the_memory_checkpoint_and_are_removed(tiny_transformer, tmp_path):
    options = dict(weight_bits=4, weight_rounding="gptq", smoothquant_alpha=0.5, sequential=True)
    in_memory, _ = _quantized(tiny_transformer, **options)
    seen = []
    from diffusers_ptq import sequential as sequential_module

    save = sequential_module.BlockInputs.set_rows

    def spy(self, index, rows):
        save(self, index, rows)
        if self.folder is not None:
            seen.append(os.listdir(self.folder))
            assert self.calls[index].rows is None  # on disk only

    sequential_module.BlockInputs.set_rows = spy
    try:
        on_disk, _ = _quantized(tiny_transformer, sequential_cache=str(tmp_path), **options)
    finally:
        sequential_module.BlockInputs.set_rows = save
    _assert_same_checkpoint(in_memory, on_disk)
    assert seen and max(len(s) for s in seen) >= 2  # several calls' files were written
    assert os.listdir(tmp_path) == []  # and removed


def test_hessians_exist_for_one_block_at_a_time(tiny_transformer, monkeypatch):
    """GPTQ's Hessians are recorded and consumed block by block: at no time do Hessians of two blocks coexist."""
    from diffusers_ptq import rounding

    live, peak = set(), []
    original = rounding.HessianRecorder.hessians

    def hessians(self):
        out = original(self)
        live.update(out)
        peak.append({n.split(".")[1] if n.startswith("transformer_blocks.") else "outside" for n in live})
        return out

    monkeypatch.setattr(rounding.HessianRecorder, "hessians", hessians)
    from diffusers_ptq import api

    clear = api.quantize_unit

    def unit(run):
        clear(run)
        live.difference_update(run.targets)

    monkeypatch.setattr(api, "quantize_unit", unit)
    _quantized(tiny_transformer, weight_bits=4, weight_rounding="gptq", sequential=True)
    assert len(peak) >= 3 and all(len(blocks - {"outside"}) <= 1 for blocks in peak), peak


@pytest.mark.parametrize("options, message", [
    (dict(weight_bits=4, group_search_bits=4.5), "bit budget"),
    (dict(weight_bits=4, weight_rounding="reconstruct"), "block reconstruction"),
])
def test_methods_that_need_the_whole_model_are_refused(tiny_transformer, options, message):
    with pytest.raises(ValueError, match=message):
        _quantized(tiny_transformer, sequential=True, **options)


def test_bad_sequential_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sequential_inputs"):
        QuantConfig(sequential=True, sequential_inputs="fp32")
    with pytest.raises(ValueError, match="existing folder"):
        QuantConfig(sequential=True, sequential_cache=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="True or False"):
        BaselineConfig(sequential="yes")
    assert BaselineConfig(sequential=True).to_plan().calibration.sequential
    assert "+seq" in QuantConfig(sequential=True).label


@pytest.fixture(scope="module", params=["bundled-sd3", "bundled-flux", "bundled-pixart"])
def bundled(request):
    from diffusers_ptq.harness.bundled import load_pipeline

    pipe = load_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def test_bundled_text_to_image_models_float_inputs_bit_for_bit(bundled, tmp_path):
    """SD3, FLUX (joint blocks, then single-stream blocks) and PixArt (adaLN-single, the caption projection and
    the timestep embedder outside the blocks): the checkpoint with float inputs is the all-in-memory one (FLUX's
    block inputs cached in files)."""
    from diffusers_ptq.quantizer import quantize

    name, pipe = bundled
    fp = pipe.transformer
    smoothing = dict(smoothquant_alpha=0.5) if name != "bundled-pixart" else {}  # PixArt: see the next test
    results = []
    # FLUX: block inputs cached in files, batches of one (a single-stream block returns its two streams as
    # non-overlapping views of one tensor: written to one file together)
    cache = dict(sequential_cache=str(tmp_path)) if name == "bundled-flux" else {}
    calibration = {**CALIBRATION, "batch_size": 1} if name == "bundled-flux" else CALIBRATION
    for sequential in ({}, dict(sequential=True, sequential_inputs="float", **cache)):
        pipe.transformer = copy.deepcopy(fp)
        try:
            quantize(pipe, BaselineConfig(weight_bits=4, weight_rounding="gptq", calibration_resolution=32,
                                          **calibration, **smoothing, **sequential), progress=False)
            results.append(pipe.transformer)
        finally:
            pipe.transformer = fp
    _assert_same_checkpoint(*results)


@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_an_offloaded_model_gives_the_same_checkpoint_and_is_left_plain(tiny_transformer, tmp_path, offload):
    """accelerate's disk / CPU offload (weights on the meta device between forwards, loaded by hooks): block by
    block, each block is brought in (`sequential.onload`) when its turn comes; the checkpoint is the one of the
    model without offload, bit for bit, and no hook is left on the quantized model. One pass brings in the whole
    model first."""
    from accelerate import cpu_offload, disk_offload

    options = dict(weight_bits=4, weight_rounding="gptq", smoothquant_alpha=0.5)
    for sequential in (dict(sequential=True), {}):
        plain, _ = _quantized(tiny_transformer, **options, **sequential)
        offloaded = copy.deepcopy(tiny_transformer)
        if offload == "disk":
            disk_offload(offloaded, str(tmp_path / f"weights{len(sequential)}"), execution_device=torch.device("cpu"))
        else:
            cpu_offload(offloaded, execution_device=torch.device("cpu"))
        assert next(offloaded.transformer_blocks[1].parameters()).device.type == "meta"
        quantize_transformer(offloaded, QuantConfig(**CALIBRATION, **options, **sequential), progress=False)
        _assert_same_checkpoint(plain, offloaded)
        assert not any(hasattr(m, "_hf_hook") for m in offloaded.modules())
