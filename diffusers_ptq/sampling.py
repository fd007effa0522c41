"""Latent-space sampling with the transformer alone (no VAE), exactly as the model family's pipeline does it
(the denoising loop itself is the adapter's: models/<family>.py).

Used by calibration; the evaluation module shares its seeding rules so that a calibration sample and a
pipeline sample with the same seed start from the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from diffusers_ptq.models import adapter_for

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def make_scheduler(kind: str, config: dict | None = None, default: dict | None = None):
    """A fresh DDIM or DDPM scheduler from a pipeline's scheduler config (or `default`: the model family's
    training schedule, `ModelAdapter.default_noise_schedule`; the scheduler's own defaults if both are None)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {kind!r}")
    config = config if config is not None else default
    return SCHEDULERS[kind].from_config(dict(config)) if config is not None else SCHEDULERS[kind]()


def sample_seeds(seed: int, num_samples: int) -> list[int]:
    """One noise seed per sample, so sample i's noise depends on (seed, i) and not on the batch size."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (num_samples,), generator=gen).tolist()


@torch.no_grad()
def sample_latents(
    transformer,
    scheduler,
    conditions: Sequence,
    *,
    adapter=None,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    batch_size: int = 16,
    before_forward: Callable[[int, int, int], None] | None = None,
    progress: bool = True,
    sample_offset: int = 0,
) -> torch.Tensor:
    """Denoise Gaussian noise into latents, mirroring the family's pipeline without the VAE (`adapter.denoise`;
    default: the transformer's adapter). `conditions`: one per sample (class labels, ...).

    Sample i starts from `randn` seeded with `sample_seeds(seed, N)[i]` (the same noise the harness's
    `generate_images` gives the pipeline). A stochastic scheduler's per-step noise comes from a generator seeded
    with `seed`. `before_forward(step_index, batch_start, batch_len)` is called before every transformer call.
    `sample_offset`: the conditions are samples sample_offset.. of a larger calibration set (one process's shard,
    distributed.py): sample i here is global sample sample_offset + i, with that sample's noise seed, and
    `batch_start` is reported as a global index. DDPM's step noise still comes from one generator per call
    (per process), so a sharded DDPM run is not the single-process one; a sharded DDIM run is.
    Returns the final latents, [N, ...].
    """
    adapter = adapter or adapter_for(transformer)
    weight = next(transformer.parameters())
    device, dtype = weight.device, weight.dtype
    seeds = sample_seeds(seed, sample_offset + len(conditions))[sample_offset:]
    step_generator = torch.Generator(device).manual_seed(seed)
    scheduler.set_timesteps(num_inference_steps)
    bar = tqdm(total=len(scheduler.timesteps) * -(-len(conditions) // batch_size), desc="calibration sampling",
               disable=not progress or not len(conditions))
    results = []
    for start in range(0, len(conditions), batch_size):
        batch = list(conditions[start : start + batch_size])
        n = len(batch)
        gens = [torch.Generator(device).manual_seed(s) for s in seeds[start : start + n]]
        latents = randn_tensor(adapter.noise_shape(transformer, n), generator=gens, device=device, dtype=dtype)

        def before_step(step_index: int, start: int = start, n: int = n) -> None:
            if before_forward is not None:
                before_forward(step_index, sample_offset + start, n)

        results.append(adapter.denoise(transformer, scheduler, latents, batch, guidance_scale=guidance_scale,
                                       step_generator=step_generator, before_step=before_step,
                                       after_step=lambda: bar.update(1)))
    bar.close()
    if not results:  # an empty shard
        return torch.zeros(adapter.noise_shape(transformer, 0), device=device, dtype=dtype)
    return torch.cat(results)
