"""`diffusers-ptq bench --speed`: integer speed at DiT-XL/2 shapes, beside the bare kernel's ceiling.

- DiT-XL/2 from its config (random weights, seed 0), batch 2 (CFG) × 256 tokens: the transformer forward in
  FP32, W8A8, W4A8, W8A16 and W4A16, each in a fresh process (so peak memory is that mode's own), each
  quantized as `footprint_worker` does (a 1-sample, 2-step calibration) and run with the kernels chosen
  automatically (`kernels.choose_kernel`); ratios to the FP32 forward of the same run.
- The ceiling: every Linear call of the FP32 forward (its M×K→N shape and count) timed as a bare float GEMM
  (`F.linear`) and as the bare oneDNN int8 GEMM on an already-quantized input (no quantize, no residual, no
  epilogue), all calls of a shape in one timed loop, fastest of 5: Σ float / Σ int8 is the kernel's ceiling on
  these shapes; with the forward's non-Linear time
  added unchanged (Amdahl) it is the forward's ceiling.
- With `--head-to-head`: our quantized modes and torchao's int8-dynamic peer compiled in one process, timed against
  each other in interleaved rounds (`head_to_head_worker`).
- The 50-step sampling time of the bundled pipeline (10 labels, guidance 1.5): FP vs W8A8 vs W4A8 (and W8A8
  forced onto the float emulation, for comparison).
Writes JSON (every number, CPU model, ISA flags, load average) and a Markdown table.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusers_ptq.harness.utils import process_memory
from diffusers_ptq.memory import return_freed_memory
from diffusers_ptq.modules import kernel_summary, set_kernel

# DiT-XL/2 at 256 px (its released config), the speed and footprint benchmarks' subject
DIT_XL_2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


SPEED_MODES = {
    "FP32": None,
    "W8A8": dict(weight_bits=8, act_bits=8),
    "W8A8-w7": dict(weight_bits=8, act_bits=8),  # then the weight codes restricted to ±63 (`seven_bit_weight`)
    "W4A8": dict(weight_bits=4, act_bits=8),
    "W4A8-zi": dict(weight_bits=4, act_bits=8, weight_zero_point="integer"),  # integer zero points: no shift term
    "W8A8-attn": dict(weight_bits=8, act_bits=8, quantize_attention=True),  # QKᵀ and PV on int8 codes too
    "W4A8-attn": dict(weight_bits=4, act_bits=8, quantize_attention=True),
    "W8A16": dict(weight_bits=8, act_bits=None),
    "W4A16": dict(weight_bits=4, act_bits=None),
}


def _peer_targets(model: torch.nn.Module) -> list[str]:
    """The Linears the peers quantize: the ones diffusers-ptq quantizes (the family's `default_include`)."""
    from diffusers_ptq.calibration import select_linears
    from diffusers_ptq.models import adapter_for

    return list(select_linears(model, adapter_for(model).default_include))


def torchao_int8_dynamic(model: torch.nn.Module, inputs: dict) -> None:
    """torchao's int8 dynamic activations × int8 weights (what diffusers' TorchAoConfig("int8dq") gives), on the
    same Linears as ours."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    names = set(_peer_targets(model))
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda _m, fqn: fqn in names)


def quanto_w8a8(model: torch.nn.Module, inputs: dict) -> None:
    """optimum-quanto's own W8A8 (qint8 weights and activations, activation scales from one calibration forward on
    the timed inputs), on the same Linears as ours."""
    from optimum.quanto import Calibration, freeze, qint8, quantize

    quantize(model, weights=qint8, activations=qint8, include=_peer_targets(model))
    with torch.no_grad(), Calibration():
        model(**inputs)
    freeze(model)


# Peers timed beside ours in the same run (issue #21); torchao is optional: its row is left out where it is not
# installed (`pip install torchao`).
PEER_MODES = {"torchao-int8dyn": torchao_int8_dynamic, "quanto-W8A8": quanto_w8a8}


def available_peers() -> list[str]:
    import importlib.util

    return [label for label in PEER_MODES if label != "torchao-int8dyn" or importlib.util.find_spec("torchao")]


def to_seven_bit_codes(model: torch.nn.Module) -> None:
    """Re-round every 8-bit QuantLinear's weight to codes on ±63 (from its dequantized weight), in place: the
    same checkpoint format; the oneDNN kernel then runs one full-range GEMM without VNNI."""
    from diffusers_ptq.modules import QuantLinear, _quanto_weight, seven_bit_weight

    for m in model.modules():
        if isinstance(m, QuantLinear) and m.weight_qtype.bits == 8:
            rounded = seven_bit_weight(m.dequantized_weight())
            m.weight = torch.nn.Parameter(_quanto_weight(rounded, m), requires_grad=False)


def _rss_bytes() -> int:
    """Resident memory now, after handing freed heap pages back to the OS (glibc keeps them otherwise); 0 where the
    current figure cannot be read (utils.process_memory)."""
    return_freed_memory()
    return process_memory()["rss"] or 0


def _dit_xl_inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 4, 32, 32, generator=gen), timestep=torch.tensor([500, 500]),
                class_labels=torch.tensor([1, 1000]))


def _paired(fns: dict, repeats: int) -> dict:
    """Each fn run once to warm up, then all of them in turn, `repeats` rounds: {name: [seconds per round]}.

    Interleaving keeps the compared runs seconds apart, so a shared or throttled CPU's drift hits both sides."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _dit_xl_model():
    """DiT-XL/2 from its config, random weights, every block's timestep/class embedder a copy of block 0's, as in
    converted DiT-XL/2 checkpoints (diffusers' conversion copies the one embedder of the original into each block):
    the float model and the peers run 28 equal copies, a quantized model one (`api.quantize_transformer` ties
    identical copies)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    config = DIT_XL_2_256
    if os.environ.get("DIFFUSERS_PTQ_SPEED_TINY"):  # a dry run of the machinery (tests), not a measurement
        config = {**DIT_XL_2_256, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 32}
    model = DiTTransformer2DModel(**config).eval()
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


# SD3-medium, FLUX.1 and PixArt-Σ at full width (random weights, a few blocks so that CPU memory and time stay
# small), at 512×512 (1024 image tokens): {name: (model class, config, description, dry-run overrides)}.
MMDIT_SPEED_MODELS = {
    "sd3-medium": ("SD3Transformer2DModel", dict(
        sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192), "SD3-medium width (hidden 1536), 2 of 24 joint blocks, batch 2 (CFG) × (1024 image "
        "+ 333 text tokens)", dict(num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                                   caption_projection_dim=128)),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), "FLUX.1-dev width (hidden 3072), 1 of 19 double + 2 of 38 single blocks, "
        "batch 1 × (1024 image + 512 text tokens)", dict(num_attention_heads=2, joint_attention_dim=64,
                                                         pooled_projection_dim=32)),
    "pixart-sigma": ("PixArtTransformer2DModel", dict(
        sample_size=64, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=72,
        num_attention_heads=16, caption_channels=4096, cross_attention_dim=1152, norm_type="ada_norm_single",
        use_additional_conditions=False, interpolation_scale=1), "PixArt-Σ width (hidden 1152), 2 of 28 blocks, batch 2 "
        "(CFG) × (1024 image tokens, cross-attention to 300 T5 tokens)",
        dict(num_attention_heads=2, caption_channels=64, cross_attention_dim=144)),
}


def _mmdit_model(name: str):
    import diffusers

    cls, config, _, tiny = MMDIT_SPEED_MODELS[name]
    torch.manual_seed(0)
    if os.environ.get("DIFFUSERS_PTQ_SPEED_TINY"):  # a dry run of the machinery (tests), not a measurement
        config = {**config, **tiny}
    return getattr(diffusers, cls)(**config).eval()


def _mmdit_inputs(name: str, model) -> dict:
    gen = torch.Generator().manual_seed(0)
    config = model.config
    if name == "sd3-medium":
        return dict(hidden_states=torch.randn(2, 16, 64, 64, generator=gen),
                    encoder_hidden_states=torch.randn(2, 333, config.joint_attention_dim, generator=gen),
                    pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=gen),
                    timestep=torch.tensor([500.0, 500.0]))
    if name == "pixart-sigma":
        mask = torch.zeros(2, 300)
        mask[:, :40] = 1  # a 40-token prompt, padded to 300 as PixArtSigmaPipeline does
        return dict(hidden_states=torch.randn(2, 4, 64, 64, generator=gen),
                    encoder_hidden_states=torch.randn(2, 300, config.caption_channels, generator=gen),
                    encoder_attention_mask=mask, timestep=torch.tensor([500, 500]),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    from diffusers import FluxPipeline

    return dict(hidden_states=torch.randn(1, 1024, 64, generator=gen),
                encoder_hidden_states=torch.randn(1, 512, config.joint_attention_dim, generator=gen),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=gen),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, 32, 32, "cpu", torch.float32),
                txt_ids=torch.zeros(512, 3))


def _speed_subject(model_name: str):
    """(model, inputs, calibration context) of a speed measurement: DiT-XL/2, or a text-to-image transformer at
    full width whose calibration encodes prompts as random embeddings (random weights: speed only)."""
    if model_name == "dit-xl-2":
        return _dit_xl_model(), _dit_xl_inputs(), {}
    model = _mmdit_model(model_name)
    inputs = _mmdit_inputs(model_name, model)
    text = inputs["encoder_hidden_states"][0]
    if model_name == "pixart-sigma":
        mask = inputs["encoder_attention_mask"][0]
        condition = {"prompt_embeds": text, "prompt_attention_mask": mask, "negative_prompt_embeds": text,
                     "negative_prompt_attention_mask": mask}
    else:
        pooled = inputs["pooled_projections"][0]
        condition = {"prompt_embeds": text, "pooled_projections": pooled, "negative_prompt_embeds": text,
                     "negative_pooled_projections": pooled}
    return model, inputs, {"encode_prompts": lambda _model, prompts: {p: condition for p in prompts},
                           "resolution": 512}


def modulation_multiply_worker(repeats: int = 5) -> dict:
    """The one operation a PixArt fold adds (modulation.py): the PixArt-Σ speed model's float forward with and
    without a ModulationScale in every block (ones: the same output), interleaved in this process; and the
    multiplies alone."""
    from diffusers_ptq.modulation import scale_block_modulation

    model, inputs, _ = _speed_subject("pixart-sigma")
    scaled = copy.deepcopy(model)
    for block in scaled.transformer_blocks:
        scale_block_modulation(block, block.scale_shift_table.numel(), "timestep", 4)
    m = torch.randn(inputs["hidden_states"].shape[0], model.transformer_blocks[0].scale_shift_table.numel())
    scalers = [block.modulation_scale for block in scaled.transformer_blocks]
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, scaled(**inputs).sample)
        times = _paired({"plain": lambda: model(**inputs), "scaled": lambda: scaled(**inputs),
                         "multiplies": lambda: [s(m) for s in scalers]}, repeats)
    plain, with_scale = statistics.median(times["plain"]), statistics.median(times["scaled"])
    return {"model": "pixart-sigma", "blocks": len(scalers), "batch": int(m.shape[0]), "width": int(m.shape[1]),
            "forward_seconds": plain, "forward_with_multiply_seconds": with_scale,
            "multiplies_alone_seconds": statistics.median(times["multiplies"]),
            "overhead_ratio": statistics.median(s / p for s, p in zip(times["scaled"], times["plain"])),
            "all": times}


FREEZING_ENV = "DIFFUSERS_PTQ_SPEED_FREEZING"  # set by run_speed_benchmark(freezing=True) for its worker processes


def _freezing_from_env() -> dict:
    """`bench --speed --freezing`: every mode compiled with Inductor's freezing, set here in the worker process;
    {"freezing": True} for its row, or {}."""
    if not os.environ.get(FREEZING_ENV):
        return {}
    from torch._inductor import config as inductor_config

    inductor_config.freezing = True
    return {"freezing": True}


def _apply_mode(label: str, model: torch.nn.Module, inputs: dict, context: dict) -> None:
    """Turn the float speed subject into mode `label`, in place: a peer's quantization, or ours (a 1-sample, 2-step
    calibration, as `footprint_worker` does); FP32 stays float."""
    from diffusers_ptq.api import quantize_transformer
    from diffusers_ptq.config import QuantConfig

    if label in PEER_MODES:
        PEER_MODES[label](model, inputs)
    elif SPEED_MODES[label] is not None:
        quantize_transformer(model, QuantConfig(**SPEED_MODES[label], num_samples=1, num_inference_steps=2,
                                                batch_size=1), context=context, progress=False)
        if label.endswith("-w7"):
            to_seven_bit_codes(model)


def forward_worker(label: str, repeats: int = 3, compiled: bool = True, model_name: str = "dit-xl-2") -> dict:
    """In this process: DiT-XL/2 (or `model_name` of MMDIT_SPEED_MODELS; random weights) in mode `label`; its peak
    memory; then its forward timed `repeats` times, interleaved with the same model under `torch.compile`
    (`compiled`) and a float twin's eager forward (built after the memory was read): speedups are medians of the
    per-round ratios."""
    from diffusers_ptq import kernels
    from diffusers_ptq.attention import MEASURED_ATTENTION, QuantAttnProcessor

    model, inputs, context = _speed_subject(model_name)
    row = {"label": label, "model": model_name, "threads": torch.get_num_threads(), "load_before": os.getloadavg(),
           **_freezing_from_env()}
    t0 = time.time()
    _apply_mode(label, model, inputs, context)
    row["quantize_seconds"] = time.time() - t0
    row["kernels"] = {f"{label.split('-')[0]} (peer)": len(_peer_targets(model))} if label in PEER_MODES \
        else kernel_summary(model)
    attention = sum(isinstance(getattr(m, "processor", None), QuantAttnProcessor) for m in model.modules())
    shapes: dict[tuple, int] = {}

    def record(module, args):
        x = args[0]
        key = (x.numel() // x.shape[-1], x.shape[-1], module.out_features)
        shapes[key] = shapes.get(key, 0) + 1

    with torch.no_grad():
        hooks = [m.register_forward_pre_hook(record) for m in model.modules()
                 if isinstance(m, torch.nn.Linear) or type(m).__name__ == "QuantLinear"]
        model(**inputs)
        for h in hooks:
            h.remove()
        if attention:  # the quantized attention's matmuls, chosen on the first forward (attention.py)
            row["attention_matmul"] = {" ".join(map(str, key)): v for key, v in MEASURED_ATTENTION.items()}
            for choice in {v["choice"] for v in MEASURED_ATTENTION.values()}:
                row["kernels"][f"attention {choice}"] = attention
        before = dict(kernels.ONEDNN_STATS)
        model(**inputs)
        stats = {k: v - before[k] for k, v in kernels.ONEDNN_STATS.items()}
        row["onednn_stats_per_forward"] = stats
        row["linear_calls"] = [{"m": m, "k": k, "n": n, "count": c} for (m, k, n), c in sorted(shapes.items())]
        row["resident_bytes_after"] = _rss_bytes()
        row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fns = {"model": lambda: model(**inputs)}
        if compiled:  # torch.compile (Inductor, default mode) of the same model: compiled on the warm-up call
            torch._dynamo.reset()
            compiled_model = torch.compile(model)
            fns["compiled"] = lambda: compiled_model(**inputs)
        if label != "FP32":
            reference = _speed_subject(model_name)[0]
            fns["fp32"] = lambda: reference(**inputs)
        t0 = time.time()
        times = _paired(fns, repeats)
        row["timing_seconds"] = time.time() - t0
    row.update(seconds=statistics.median(times["model"]), all_seconds=times["model"])
    if compiled:
        row.update(compiled_seconds=statistics.median(times["compiled"]), compiled_all_seconds=times["compiled"],
                   compiled_vs_eager=statistics.median(e / c for e, c in zip(times["model"], times["compiled"])))
    if "fp32" in times:
        row.update(fp32_seconds=statistics.median(times["fp32"]), fp32_all_seconds=times["fp32"],
                   speedup=statistics.median(f / q for f, q in zip(times["fp32"], times["model"])))
    else:
        row["speedup"] = 1.0
    row["load_after"] = os.getloadavg()
    return row


HEAD_TO_HEAD_REFERENCE = "torchao-int8dyn"


def head_to_head_worker(labels: list[str], repeats: int = 5, compiled: bool = True) -> dict:
    """In this process, the direct comparison: DiT-XL/2 in each mode of `labels` (built one after another from the
    same float subject), each under `torch.compile` (with freezing when the benchmark asks, `_freezing_from_env`),
    their forwards on the same inputs timed in `repeats` interleaved rounds after one warm-up round (which compiles
    them). No float twin: the last label is the reference, and each mode's ratio is the median of the per-round
    ratios reference seconds / mode seconds. `compiled=False`: eager (a dry run of the machinery)."""
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"head to head needs two or more distinct modes, the reference last; got {labels}")
    row = {"labels": list(labels), "reference": labels[-1], "threads": torch.get_num_threads(),
           "compiled": compiled, "load_before": os.getloadavg(), **_freezing_from_env()}
    fns, kernels = {}, {}
    with torch.no_grad():
        for label in labels:
            model, inputs, context = _speed_subject("dit-xl-2")
            _apply_mode(label, model, inputs, context)
            kernels[label] = {f"{label.split('-')[0]} (peer)": len(_peer_targets(model))} if label in PEER_MODES \
                else kernel_summary(model)
            run = torch.compile(model) if compiled else model
            fns[label] = functools.partial(lambda run, inputs: run(**inputs), run, inputs)
        t0 = time.time()
        times = _paired(fns, repeats)
    reference = times[labels[-1]]
    row.update(timing_seconds=time.time() - t0, load_after=os.getloadavg(), modes=[
        {"label": label, "kernels": kernels[label], "seconds": statistics.median(times[label]),
         "all_seconds": times[label],
         "vs_reference": statistics.median(r / s for r, s in zip(reference, times[label]))} for label in labels])
    return row


def head_to_head_markdown(h2h: dict) -> str:
    how = "compiled with freezing" if h2h.get("freezing") else ("compiled" if h2h["compiled"] else "eager")
    lines = [f"Head to head, one process ({how}; {len(h2h['modes'][0]['all_seconds'])} interleaved rounds after a "
             f"warm-up; ratio = median of the per-round ratios {h2h['reference']} seconds / mode seconds; load "
             f"{h2h['load_before'][0]:.2f} → {h2h['load_after'][0]:.2f}):", "",
             f"| mode | forward (s) | vs {h2h['reference']} |", "|---|---|---|"]
    lines += [f"| {m['label']} | {m['seconds']:.3f} | {m['vs_reference']:.3f}× |" for m in h2h["modes"]]
    return "\n".join(lines) + "\n"


def attention_times(repeats: int = 5) -> dict:
    """One DiT-XL/2 attention's core — softmax(QKᵀ)V of every head, without the q/k/v/out projections (Linears,
    timed in the ceiling) — at the forward's shape, each variant's fastest of `repeats` interleaved rounds: FP32
    SDPA eager and compiled; the quantized attention on its codes (`attention.attention_on_codes`: Q/K/V and P
    rounded, QKᵀ and PV on integers) with float32 matmuls, on `torch._int_mm` one head at a time (eager) and
    compiled (the heads batched through `kernels.int8_bmm`); the int_mm rows only where it is exact here."""
    from diffusers_ptq import kernels
    from diffusers_ptq.attention import attention_on_codes

    config = _dit_xl_model().config
    batch, tokens = _dit_xl_inputs()["hidden_states"].shape[0], (config.sample_size // config.patch_size) ** 2
    heads, dim = config.num_attention_heads, config.attention_head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=gen) for _ in range(3))
    scales = {name: torch.tensor(4.0 / 127) for name in "qkv"}
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    on_codes = functools.partial(attention_on_codes, q, k, v, scales, dim**-0.5)
    fns = {"sdpa_fp32": sdpa, "sdpa_fp32_compiled": torch.compile(sdpa),
           "codes_float_matmuls": functools.partial(on_codes, integer=False)}
    if kernels.int_mm_exact("cpu"):
        fns["codes_int_mm"] = functools.partial(on_codes, integer=True)
        fns["codes_int8_bmm_compiled"] = torch.compile(functools.partial(on_codes, integer=True))
    torch._dynamo.reset()
    with torch.no_grad():
        times = _paired(fns, repeats)
    return {"batch": batch, "heads": heads, "tokens": tokens, "dim": dim, "layers": config.num_layers,
            "repeats": repeats, "seconds": {name: min(t) for name, t in times.items()}}


def ceiling_worker(linear_calls: list[dict], repeats: int = 5) -> dict:
    """Bare GEMMs on the forward's Linear shapes: float F.linear vs oneDNN's u8×s8 GEMM on a quantized input; and,
    in the same process, the float forward itself (so its non-Linear time is measured on the same CPU state)."""
    from diffusers_ptq import kernels

    rows, fp_total, int_total = [], 0.0, 0.0
    have_onednn = kernels.onednn_available()
    with torch.no_grad():
        model, inputs = _dit_xl_model(), _dit_xl_inputs()
        # F821: ruff sees the `del model` below; the lambda is called (by _paired) before it
        forward = min(_paired({"fp32": lambda: model(**inputs)}, 3)["fp32"])  # noqa: F821
        del model
        torch.manual_seed(0)
        for call in linear_calls:
            m, k, n, count = call["m"], call["k"], call["n"], call["count"]
            x, w, b = torch.randn(m, k), torch.randn(n, k) * 0.02, torch.randn(n)
            # all `count` calls of a shape timed together (a single small GEMM is below the timer's noise), float and
            # int8 in turn; the fastest of `repeats` rounds: the bare kernel's ceiling, not a typical time.
            # B023: the lambdas are called (by _paired) within this iteration, so they see its variables
            fns = {"fp32": lambda: [torch.nn.functional.linear(x, w, b) for _ in range(count)]}  # noqa: B023
            if have_onednn:
                packed = torch.ops.onednn.qlinear_prepack(torch.randint(-127, 128, (n, k), dtype=torch.int8), None)
                u = torch.randint(0, 256, (m, k), dtype=torch.uint8)
                scales, zeros = torch.rand(n) * 1e-3, torch.zeros(n, dtype=torch.int64)
                fns["int8"] = lambda: [kernels._qlinear(u, 0.01, 128, packed, scales, zeros, b)  # noqa: B023
                                       for _ in range(count)]  # noqa: B023
            times = _paired(fns, repeats)
            row = {**call, "fp32_seconds": min(times["fp32"])}
            fp_total += row["fp32_seconds"]
            if have_onednn:
                row["int8_seconds"] = min(times["int8"])
                int_total += row["int8_seconds"]
            rows.append(row)
    return {"shapes": rows, "fp32_forward_seconds": forward, "fp32_linear_seconds": fp_total,
            "int8_linear_seconds": int_total if have_onednn else None, "attention": attention_times(repeats)}


def _run_worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "diffusers_ptq.harness.speed", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"speed worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sampling_times(num_inference_steps: int = 50, guidance_scale: float = 1.5, labels=tuple(range(10)),
                   repeats: int = 3) -> list[dict]:
    """Bundled pipeline, 50 DDIM steps, one sample per label (batch 2×10 with CFG): FP, W8A8, W8A8 emulated, W8A8
    with ±63 weight codes, W4A8, and FP, W8A8, W4A8, W4A8 with integer zero points with the transformer under
    `torch.compile` (Inductor, default mode; compiled during the warm-up round); `repeats` interleaved rounds (median; speedup = median of per-round
    ratios to the eager FP32 pipeline)."""
    from diffusers_ptq.api import quantize_transformer
    from diffusers_ptq.config import QuantConfig
    from diffusers_ptq.harness.bundled import load_pipeline
    from diffusers_ptq.harness.evaluation import generate_images

    def quantized(bits: int, seven_bit: bool = False, kernel: str | None = None, zero_point: str = "float"):
        pipe = load_pipeline("bundled")
        quantize_transformer(pipe.transformer, QuantConfig(weight_bits=bits, act_bits=8, num_samples=10,
                                                           weight_zero_point=zero_point),
                             id2label={i: str(i) for i in range(10)}, scheduler_config=pipe.scheduler.config,
                             progress=False)
        if seven_bit:
            to_seven_bit_codes(pipe.transformer)
        if kernel:
            set_kernel(pipe.transformer, kernel)
        return pipe

    def compiled(pipe):
        pipe.transformer = torch.compile(pipe.transformer)
        return pipe

    pipes = {"FP32": load_pipeline("bundled"), "W8A8": quantized(8), "W8A8 (emulated)": quantized(8, kernel="emulated"),
             "W8A8-w7": quantized(8, seven_bit=True), "W4A8": quantized(4),
             "FP32 compiled": compiled(load_pipeline("bundled")), "W8A8 compiled": compiled(quantized(8)),
             "W4A8 compiled": compiled(quantized(4)),
             "W4A8-zi compiled": compiled(quantized(4, zero_point="integer"))}
    torch._dynamo.reset()
    times = _paired({label: functools.partial(generate_images, pipe, list(labels),
                                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                              batch_size=len(labels), progress=False)
                     for label, pipe in pipes.items()}, repeats)
    return [{"label": label, "kernels": kernel_summary(pipe.transformer),
             "seconds": statistics.median(times[label]), "all_seconds": times[label],
             "speedup": statistics.median(f / q for f, q in zip(times["FP32"], times[label]))}
            for label, pipe in pipes.items()]


def run_speed_benchmark(output: str | os.PathLike, repeats: int = 3, modes=None, sampling: bool = True,
                        freezing: bool = False, head_to_head: bool = False) -> dict:
    """`bench --speed`: `modes` (default: every SPEED_MODES entry and the installed peers) each in its own process,
    the bare-kernel ceiling, the bundled pipeline's sampling time; JSON + Markdown at `output`. `freezing`: every
    mode's compiled forward with `torch._inductor.config.freezing = True` (weights constant to Inductor: its x86
    quantization passes then lower our W8A8 layers and fuse their neighbours, kernels.py), peers included.
    `head_to_head`: then our quantized modes and torchao's peer compiled in one more process, timed against each
    other (`head_to_head_worker`)."""
    from diffusers_ptq import kernels
    from diffusers_ptq.harness.utils import machine_info

    if freezing:
        os.environ[FREEZING_ENV] = "1"  # read by the worker processes
    else:
        os.environ.pop(FREEZING_ENV, None)
    t0 = time.time()
    result = {"machine": {**machine_info(), **kernels.machine_kernel_info(),
                          "all_int8_flags": sorted(f for f in kernels.cpu_flags()
                                                   if "vnni" in f or f.startswith(("amx", "avx512")))},
              "load_at_start": os.getloadavg(), "repeats": repeats, "batch": 2, "tokens": 256, "freezing": freezing}
    if modes is not None:  # the FP32 row is every ratio's reference
        unknown = [m for m in modes if m not in SPEED_MODES and m not in PEER_MODES]
        if unknown:
            raise ValueError(f"unknown speed mode(s) {unknown}; the modes: {[*SPEED_MODES, *PEER_MODES]}")
        modes = ["FP32", *(m for m in modes if m != "FP32")]
    modes = [*SPEED_MODES, *available_peers()] if modes is None else modes
    ours = [m for m in modes if m != "FP32" and m not in PEER_MODES]
    if head_to_head and (HEAD_TO_HEAD_REFERENCE not in available_peers() or not ours):
        raise ValueError(f"head to head compares our quantized modes with {HEAD_TO_HEAD_REFERENCE}: it needs torchao "
                         "(`pip install diffusers-ptq[peers]`) and one of our modes among --only")
    forward = [_run_worker("--forward", label, str(repeats)) for label in modes]
    fp = next(r for r in forward if r["label"] == "FP32")
    ceiling = _run_worker("--ceiling", json.dumps(fp["linear_calls"]))
    other = ceiling["fp32_forward_seconds"] - ceiling["fp32_linear_seconds"]
    ceiling["non_linear_seconds"] = other
    if ceiling["int8_linear_seconds"]:
        ceiling["kernel_speedup"] = ceiling["fp32_linear_seconds"] / ceiling["int8_linear_seconds"]
        ceiling["forward_speedup"] = ceiling["fp32_forward_seconds"] / (max(other, 0.0) + ceiling["int8_linear_seconds"])
        for r in forward:
            if "A8" in r["label"]:
                # what is neither the bare GEMMs nor the float parts (quantize, residual, epilogue, gathers), in the
                # ceiling process's time scale: this mode's forward = FP32 forward there / this mode's speedup
                seconds = ceiling["fp32_forward_seconds"] / r["speedup"]
                r["overhead_seconds"] = seconds - max(other, 0.0) - ceiling["int8_linear_seconds"]
                r["overhead_fraction"] = r["overhead_seconds"] / seconds
                r["fraction_of_ceiling"] = r["speedup"] / ceiling["forward_speedup"]
    result.update(forward=forward, ceiling=ceiling)
    if head_to_head:
        result["head_to_head"] = _run_worker("--head-to-head", ",".join([*ours, HEAD_TO_HEAD_REFERENCE]), str(repeats))
    if sampling:
        result["sampling"] = sampling_times()
    result["load_at_end"] = os.getloadavg()
    result["total_seconds"] = time.time() - t0
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(speed_markdown(result))
    return result


def speed_markdown(result: dict) -> str:
    m = result["machine"]
    c = result["ceiling"]
    lines = [f"# Integer speed at DiT-XL/2 shapes (batch {result['batch']} × {result['tokens']} tokens)", "",
             f"CPU: {m.get('cpu_model')}; {m['threads']} threads; torch {m['torch']}; ISA: "
             f"{', '.join(m.get('cpu_flags_of_note', []))}; VNNI/AMX: {', '.join(m['vnni_flags']) or 'none'}"
             + (f" (libraries restricted: {', '.join(f'{k}={v}' for k, v in m['isa_limits'].items())})"
                if m.get("isa_limits") else "") +
             f"; oneDNN full-range u8×s8 exact (measured): {m['onednn_full_range_exact']}. Load average at start "
             f"{result['load_at_start'][0]:.2f}, at end {result['load_at_end'][0]:.2f}. Each mode in its own process "
             f"(its peak memory), its forward timed {result['repeats']} times after one warm-up, interleaved with "
             "a float DiT-XL/2's forward in the same process: forward = median, speedup = median of the per-round "
             "ratios." + (" Compiled with `torch._inductor.config.freezing = True` (every mode, peers too)."
                          if result.get("freezing") else ""), "",
             "| mode | kernels (layers) | forward (s) | speedup vs FP32 | compiled (s) | compiled vs eager | compiled "
             "vs FP32 eager | of the ceiling | quantize/residual/epilogue share | peak RSS (GB) | resident after (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["forward"]:
        kern = ", ".join(f"{k} {v}" for k, v in r["kernels"].items()) or "float"
        share = f"{r['overhead_fraction']:.0%}" if "overhead_fraction" in r else "–"
        frac = f"{r['fraction_of_ceiling']:.0%}" if "fraction_of_ceiling" in r else "–"
        comp = (f"{r['compiled_seconds']:.2f} | {r['compiled_vs_eager']:.2f}× | "
                f"{r['speedup'] * r['compiled_vs_eager']:.2f}×") if "compiled_seconds" in r else "– | – | –"
        lines.append(f"| {r['label']} | {kern} | {r['seconds']:.2f} | {r['speedup']:.2f}× | {comp} | {frac} | {share} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['resident_bytes_after'] / 1e9:.2f} |")
    peer = next((r for r in result["forward"] if r["label"] == "torchao-int8dyn" and "compiled_seconds" in r), None)
    if peer is not None:  # across processes: each mode's time against its own float twin, then the ratio
        best = peer["speedup"] * max(1.0, peer["compiled_vs_eager"])
        lines += ["", f"Against torchao's int8 dynamic peer at its best ({best:.2f}× FP32 eager"
                  f"{', compiled' if peer['compiled_vs_eager'] > 1 else ', eager'}), each mode at its best "
                  "(eager or compiled): " + ", ".join(
                      f"{r['label']} {r['speedup'] * max(1.0, r.get('compiled_vs_eager', 1.0)) / best:.2f}×"
                      for r in result["forward"] if r["label"] not in ("FP32", "torchao-int8dyn")) + "."]
    if "head_to_head" in result:
        lines += ["", head_to_head_markdown(result["head_to_head"]).rstrip("\n")]
    if c.get("kernel_speedup"):
        lines += ["", f"Ceiling (bare oneDNN u8×s8 GEMM on pre-quantized inputs vs bare fp32 GEMM, every Linear call "
                  f"of the forward): Linear time {c['fp32_linear_seconds']:.2f} s → {c['int8_linear_seconds']:.2f} s "
                  f"(**{c['kernel_speedup']:.2f}×**); FP32 forward there {c['fp32_forward_seconds']:.2f} s, of which "
                  f"non-Linear {c['non_linear_seconds']:.2f} s; forward "
                  f"ceiling (Amdahl) **{c['forward_speedup']:.2f}×**.", "",
                  "| M×K→N | calls | fp32, all calls (ms) | int8, all calls (ms) | ratio |", "|---|---|---|---|---|"]
        for s in c["shapes"]:
            lines.append(f"| {s['m']}×{s['k']}→{s['n']} | {s['count']} | {s['fp32_seconds'] * 1e3:.2f} | "
                         f"{s['int8_seconds'] * 1e3:.2f} | {s['fp32_seconds'] / s['int8_seconds']:.2f}× |")
    if c.get("attention"):
        lines += ["", attention_markdown(c["attention"], c["fp32_forward_seconds"])]
    for r in result["forward"]:
        st = r.get("onednn_stats_per_forward") or {}
        if st.get("calls"):
            lines.append("")
            lines.append(f"{r['label']}: {st['calls']:.0f} oneDNN calls per forward (eager); split-path residual over "
                         f"{st['residual_rows'] / max(st['rows'], 1):.1%} of the token rows"
                         f" and {st['residual_channels'] / max(st['channels'], 1):.1%} of the input channels.")
    if "sampling" in result:
        lines += ["", "Bundled pipeline (dit-mnist, 6 blocks, hidden 192), 50 DDIM steps, 10 samples (batch 20 with "
                  "CFG); every model in one process, timed in interleaved rounds (median; speedup = median of the "
                  "per-round ratios to the eager FP32 pipeline; \"compiled\": the transformer under torch.compile):",
                  "", "| model | kernels (layers) | sampling (s) | speedup vs FP32 eager |", "|---|---|---|---|"]
        for r in result["sampling"]:
            kern = ", ".join(f"{k} {v}" for k, v in r.get("kernels", {}).items()) or "float"
            lines.append(f"| {r['label']} | {kern} | {r['seconds']:.2f} | {r['speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


ATTENTION_VARIANTS = {
    "sdpa_fp32": "FP32 SDPA, eager (what a float or Linear-only quantized model runs)",
    "sdpa_fp32_compiled": "FP32 SDPA, compiled",
    "codes_float_matmuls": "quantized, on codes: float32 matmuls, eager",
    "codes_int_mm": "quantized, on codes: `torch._int_mm` per head, eager",
    "codes_int8_bmm_compiled": "quantized, on codes: `int8_bmm` (all heads), compiled",
}


def attention_markdown(attention: dict, fp32_forward_seconds: float) -> str:
    """The attention_times table: per layer, over the model's layers, and that as a share of the FP32 forward timed
    in the same process."""
    a = attention
    lines = [f"Attention core per layer (softmax(QKᵀ)V, {a['batch']} × {a['heads']} heads × {a['tokens']} tokens × "
             f"{a['dim']}; the projections are Linears, above), fastest of {a['repeats']} interleaved "
             f"rounds, and over the model's {a['layers']} layers as a share of the FP32 forward "
             f"({fp32_forward_seconds:.2f} s, same process):", "",
             "| attention | per layer (ms) | all layers (ms) | of the FP32 forward |", "|---|---|---|---|"]
    for name, seconds in a["seconds"].items():
        lines.append(f"| {ATTENTION_VARIANTS.get(name, name)} | {seconds * 1e3:.2f} | {seconds * a['layers'] * 1e3:.0f} | "
                     f"{seconds * a['layers'] / fp32_forward_seconds:.1%} |")
    return "\n".join(lines)


def w8a8_range_quality(num_samples: int = 200, seed: int = 0, output: str | os.PathLike | None = None) -> dict:
    """Quality cost of the ways to make W8A8 a single non-saturating GEMM without VNNI, on the bundled model
    (W8A8 min-max, 50 DDIM steps, guidance 1.5, paired with the FP pipeline on the same noise):
    exact 8-bit (what the `onednn` split path computes), 7-bit weights (±63 per output channel, from the float
    weights) and 7-bit activations ([-64, 63] over the same calibrated range). The 7-bit variants are emulated."""
    from diffusers_ptq import kernels
    from diffusers_ptq.api import quantize_transformer
    from diffusers_ptq.config import QuantConfig
    from diffusers_ptq.harness.bundled import load_pipeline
    from diffusers_ptq.harness.evaluation import evaluate
    from diffusers_ptq.modules import QuantLinear

    fp = load_pipeline("bundled")
    pipe = load_pipeline("bundled")
    quantize_transformer(pipe.transformer, QuantConfig(weight_bits=8, act_bits=8),
                         id2label={i: str(i) for i in range(10)}, scheduler_config=pipe.scheduler.config,
                         progress=False)
    layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, QuantLinear)}
    float_weights = {n: fp.transformer.get_submodule(n).weight.detach() for n in layers}

    def a7(module, weight, x):
        scale = module.input_scale.to(x.dtype) * 127 / 63
        return torch.nn.functional.linear(kernels.fake_quantize_symmetric(x, scale, 7), weight, module.bias)

    names = {id(m): n for n, m in layers.items()}

    def w7(module) -> torch.Tensor:
        w = float_weights[names[id(module)]]
        return kernels.fake_quantize_symmetric(w, w.abs().amax(1, keepdim=True) / 63, 7)

    def score(label):
        r = evaluate(pipe, fp, num_samples=num_samples, seeds=[seed], progress=False)
        return {"label": label, **{k: v["mean"] for k, v in r["metrics"].items()}}

    set_kernel(pipe.transformer, "emulated")  # the same integers as the onednn split path, to float rounding
    rows = [score("W8A8 exact (8-bit weights and activations: the onednn split path)")]
    emulated = kernels.KERNELS["emulated"]
    studies = {"_study_a7": (kernels.Kernel("_study_a7", a7, prepare=emulated.prepare),
                             "W8A7 (activations on [-64, 63], same range): one GEMM, zero point 64"),
               "_study_w7": (kernels.Kernel("_study_w7", emulated.run, prepare=w7),
                             "W7A8 (weights on ±63 per output channel): one GEMM, full-range input")}
    try:  # study kernels, registered for this measurement only
        for name, (kernel, label) in studies.items():
            kernels.register_kernel(kernel)
            set_kernel(pipe.transformer, name)
            rows.append(score(label))
    finally:
        for name in studies:
            kernels.KERNELS.pop(name, None)
        set_kernel(pipe.transformer, "emulated")
    result = {"num_samples": num_samples, "seed": seed, "rows": rows}
    if output is not None:
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def mmdit_speed(repeats: int = 3, models=tuple(MMDIT_SPEED_MODELS), modes=("FP32", "W8A8", "W4A8")) -> list[dict]:
    """The forward of each MM-DiT speed model (full width, a few blocks) in each mode, each in its own process,
    eager (the compiled path is #21's): rows of forward_worker."""
    return [_run_worker("--forward", label, str(repeats), "--eager-only", name) for name in models for label in modes]


def mmdit_speed_markdown(rows: list[dict], multiply: dict | None = None) -> str:
    lines = ["| model | mode | kernels (layers) | forward (s) | speedup vs FP32 | peak RSS (GB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        kern = ", ".join(f"{k} {v}" for k, v in r["kernels"].items()) or "float"
        lines.append(f"| {MMDIT_SPEED_MODELS[r['model']][2]} | {r['label']} | {kern} | {r['seconds']:.2f} | "
                     f"{r['speedup']:.2f}× | {r['peak_rss_bytes'] / 1e9:.2f} |")
    if multiply is not None:
        lines += ["", f"PixArt's per-sample modulation multiply ({multiply['blocks']} blocks, [{multiply['batch']}, "
                  f"{multiply['width']}] each): float forward {multiply['forward_seconds']:.3f} s without, "
                  f"{multiply['forward_with_multiply_seconds']:.3f} s with (paired ratio "
                  f"{multiply['overhead_ratio']:.4f}); the multiplies alone {multiply['multiplies_alone_seconds'] * 1e6:.0f} µs."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--forward":
        print(json.dumps(forward_worker(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3,
                                        compiled=len(sys.argv) <= 4 or sys.argv[4] != "--eager-only",
                                        model_name=sys.argv[5] if len(sys.argv) > 5 else "dit-xl-2")))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--mmdit":
        # OUTPUT [REPEATS [MODEL,...]]: the MM-DiT / PixArt rows, and the PixArt modulation multiply's cost
        models = sys.argv[4].split(",") if len(sys.argv) > 4 else tuple(MMDIT_SPEED_MODELS)
        rows = mmdit_speed(int(sys.argv[3]) if len(sys.argv) > 3 else 3, models=models)
        multiply = modulation_multiply_worker() if "pixart-sigma" in models else None
        from diffusers_ptq.harness.utils import machine_info

        Path(sys.argv[2]).write_text(json.dumps({"machine": machine_info(), "rows": rows,
                                                 "modulation_multiply": multiply}, indent=2) + "\n")
        Path(sys.argv[2]).with_suffix(".md").write_text(mmdit_speed_markdown(rows, multiply))
    elif len(sys.argv) >= 3 and sys.argv[1] == "--head-to-head":  # LABEL,...,REFERENCE [REPEATS [OUTPUT]]
        h2h = head_to_head_worker(sys.argv[2].split(","), int(sys.argv[3]) if len(sys.argv) > 3 else 5)
        if len(sys.argv) > 4:  # on its own: JSON with the machine, and the Markdown table beside it
            from diffusers_ptq import kernels
            from diffusers_ptq.harness.utils import machine_info

            h2h["machine"] = {**machine_info(), **kernels.machine_kernel_info()}
            Path(sys.argv[4]).write_text(json.dumps(h2h, indent=2) + "\n")
            m = h2h["machine"]
            Path(sys.argv[4]).with_suffix(".md").write_text(
                f"CPU: {m.get('cpu_model')}; {m['threads']} threads; torch {m['torch']}; ISA: "
                f"{', '.join(m.get('cpu_flags_of_note', []))}; VNNI/AMX: {', '.join(m['vnni_flags']) or 'none'}. "
                f"DiT-XL/2 from its config (random weights), batch 2 × 256 tokens.\n\n" + head_to_head_markdown(h2h))
        print(json.dumps(h2h))
    elif len(sys.argv) == 3 and sys.argv[1] == "--ceiling":
        print(json.dumps(ceiling_worker(json.loads(sys.argv[2]))))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--w8a8-quality":
        print(json.dumps(w8a8_range_quality(output=sys.argv[2] if len(sys.argv) > 2 else None), indent=2))
    else:
        raise SystemExit("usage: python -m diffusers_ptq.harness.speed --forward LABEL [REPEATS [--eager-only [MODEL]]] "
                         "| --head-to-head LABEL,...,REFERENCE [REPEATS [OUTPUT]] | --ceiling JSON | --w8a8-quality [OUTPUT] | --mmdit OUTPUT [REPEATS [MODEL,...]]")
