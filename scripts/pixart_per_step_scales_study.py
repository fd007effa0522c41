"""Upper bound of per-timestep static activation scales on the bundled PixArt (issue #20; a study, not library code).

W8A8 min-max with one input scale per sampling step — each layer's per-step input absmax over the 32 calibration
prompts of the float model, set before every transformer call by a hook — against the usual one scale per tensor;
emulated kernel (the same integers as oneDNN's, to float rounding); 30 samples, 20 steps, cfg 4.5; paired PSNR
against FP from the same noise. Per-timestep-group scales can do no better than one scale per step.

    python scripts/pixart_per_step_scales_study.py
"""

from __future__ import annotations

import torch

import diffusers_ptq
from diffusers_ptq.harness.bench import bench_context
from diffusers_ptq.harness.bundled import load_pipeline
from diffusers_ptq.harness.evaluation import digit_prompts, generate_images, psnr
from diffusers_ptq.modules import QuantLinear, set_kernel
from diffusers_ptq.sampling import prepare_sampling, sample_latents

STEPS, GUIDANCE = 20, 4.5
LABELS = [d for d in range(10) for _ in range(3)]


def sample(pipe) -> torch.Tensor:
    return generate_images(pipe, LABELS, seed=0, num_inference_steps=STEPS, guidance_scale=GUIDANCE, batch_size=30,
                           progress=False)


def quantized_w8a8():
    pipe = load_pipeline("bundled-pixart")
    config = diffusers_ptq.BaselineConfig(weight_bits=8, act_bits=8, num_samples=32, num_inference_steps=STEPS,
                                          guidance_scale=GUIDANCE, calibration_prompts=digit_prompts(range(10)),
                                          calibration_resolution=32)
    diffusers_ptq.quantize(pipe, config, progress=False)
    set_kernel(pipe.transformer, "emulated")
    return pipe


def per_step_absmax(fp, names) -> dict[str, torch.Tensor]:
    """{layer: [STEPS] input absmax} of the float model over the calibration prompts."""
    model, step = fp.transformer, [0]
    absmax = {n: torch.zeros(STEPS) for n in names}

    def record(name):
        def hook(_module, args):
            i = step[0] % STEPS
            absmax[name][i] = max(float(absmax[name][i]), float(args[0].abs().max()))
        return hook

    def advance(*_):
        step[0] += 1

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    hooks.append(model.register_forward_hook(advance))
    context = {**bench_context(fp), "prompts": digit_prompts(range(10)), "resolution": 32}
    run = prepare_sampling(model, num_inference_steps=STEPS, guidance_scale=GUIDANCE, num_samples=32, context=context)
    sample_latents(model, run.scheduler, run.conditions, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   batch_size=32, progress=False, context=run.context)
    for h in hooks:
        h.remove()
    return absmax


def use_per_step_scales(pipe, absmax: dict[str, torch.Tensor]) -> None:
    step = [0]

    def set_scale(name):
        def hook(module, _args):
            module.input_scale.fill_(float(absmax[name][step[0] % STEPS]) / 127)
        return hook

    def advance(*_):
        step[0] += 1

    for name in absmax:
        pipe.transformer.get_submodule(name).register_forward_pre_hook(set_scale(name))
    pipe.transformer.register_forward_hook(advance)


def main() -> None:
    torch.set_num_threads(2)
    fp = load_pipeline("bundled-pixart")
    reference = sample(fp)
    pipe = quantized_w8a8()
    names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, QuantLinear)]
    absmax = per_step_absmax(fp, names)
    print(f"W8A8, one static scale per tensor: {psnr(sample(pipe), reference):.2f} dB")
    use_per_step_scales(pipe, absmax)
    print(f"W8A8, one static scale per tensor and sampling step: {psnr(sample(pipe), reference):.2f} dB")


if __name__ == "__main__":
    main()
