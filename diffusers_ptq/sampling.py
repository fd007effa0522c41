"""Latent-space sampling with the transformer alone (no VAE), exactly as the model family's pipeline does it
(the denoising loop itself is the adapter's: models/<family>.py).

Used by calibration; the evaluation module shares its seeding rules so that a calibration sample and a
pipeline sample with the same seed start from the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from diffusers_ptq.models import adapter_for

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm_solver": DPMSolverMultistepScheduler,
              "flow_match_euler": FlowMatchEulerDiscreteScheduler}


def make_scheduler(kind: str, config: dict | None = None, default: dict | None = None):
    """A fresh scheduler of `kind` (SCHEDULERS) from a pipeline's scheduler config (or `default`: the model
    family's training schedule, `ModelAdapter.default_noise_schedule`; the scheduler's own defaults if both are
    None)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {kind!r}")
    config = config if config is not None else default
    return SCHEDULERS[kind].from_config(dict(config)) if config is not None else SCHEDULERS[kind]()


def sampling_settings(adapter, transformer, scheduler: str | None, num_inference_steps: int | None,
                      guidance_scale: float | None) -> tuple[str, int, float]:
    """(scheduler, num_inference_steps, guidance_scale) with each None replaced by the model family's default
    (`ModelAdapter.calibration_defaults`); a scheduler the family does not sample with is refused."""
    defaults = adapter.calibration_defaults(transformer)
    scheduler = scheduler if scheduler is not None else defaults["scheduler"]
    if scheduler not in adapter.schedulers:
        raise ValueError(f"scheduler={scheduler!r} cannot sample {type(transformer).__name__}: allowed "
                         f"{list(adapter.schedulers)} (or None: {defaults['scheduler']!r}, as its pipeline)")
    steps = num_inference_steps if num_inference_steps is not None else defaults["num_inference_steps"]
    guidance = guidance_scale if guidance_scale is not None else defaults["guidance_scale"]
    return scheduler, steps, guidance


@dataclass
class SamplingRun:
    """What a calibration pass samples: one condition per sample, the scheduler (timesteps set for the noise
    shape), the resolved settings, and the context the adapter reads (prompts, resolution, ...)."""

    adapter: object
    conditions: list
    scheduler: object
    kind: str
    num_inference_steps: int
    guidance_scale: float
    cfg: bool  # the batch is doubled with unconditional rows
    context: dict

    @property
    def model_timesteps(self) -> torch.Tensor:
        """The timesteps as the transformer receives them, in sampling order."""
        return self.adapter.model_timesteps(self.scheduler.timesteps.clone().cpu())


def prepare_sampling(transformer, *, scheduler: str | None = None, scheduler_config: dict | None = None,
                     num_inference_steps: int | None = None, guidance_scale: float | None = None,
                     num_samples: int = 32, conditions: Sequence | None = None,
                     context: dict | None = None) -> SamplingRun:
    """Resolve the settings (None: the family's defaults), draw the conditions (`conditions` if given, else
    `adapter.calibration_conditions(transformer, num_samples, context)`) and build the scheduler."""
    adapter = adapter_for(transformer)
    context = dict(context or {})
    kind, steps, guidance = sampling_settings(adapter, transformer, scheduler, num_inference_steps, guidance_scale)
    conditions = list(conditions) if conditions is not None else adapter.calibration_conditions(
        transformer, num_samples, context)
    sched = make_scheduler(kind, scheduler_config, adapter.default_noise_schedule)
    adapter.set_timesteps(transformer, sched, steps, adapter.noise_shape(transformer, 1, context))
    return SamplingRun(adapter, conditions, sched, kind, steps, guidance, adapter.doubles_batch(transformer, guidance),
                       context)


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
    context: dict | None = None,
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
    `context`: the calibration context (resolution, ...), for `adapter.noise_shape`.
    Returns the final latents, [N, ...].
    """
    adapter = adapter or adapter_for(transformer)
    weight = next(transformer.parameters())
    device, dtype = weight.device, weight.dtype
    seeds = sample_seeds(seed, sample_offset + len(conditions))[sample_offset:]
    step_generator = torch.Generator(device).manual_seed(seed)
    shape = adapter.noise_shape(transformer, 1, context)
    adapter.set_timesteps(transformer, scheduler, num_inference_steps, shape)
    bar = tqdm(total=len(scheduler.timesteps) * -(-len(conditions) // batch_size), desc="calibration sampling",
               disable=not progress or not len(conditions))
    results = []
    for start in range(0, len(conditions), batch_size):
        batch = list(conditions[start : start + batch_size])
        n = len(batch)
        gens = [torch.Generator(device).manual_seed(s) for s in seeds[start : start + n]]
        latents = randn_tensor(adapter.noise_shape(transformer, n, context), generator=gens, device=device,
                               dtype=dtype)
        adapter.set_timesteps(transformer, scheduler, num_inference_steps, latents.shape)

        def before_step(step_index: int, start: int = start, n: int = n) -> None:
            if before_forward is not None:
                before_forward(step_index, sample_offset + start, n)

        results.append(adapter.denoise(transformer, scheduler, latents, batch, guidance_scale=guidance_scale,
                                       step_generator=step_generator, before_step=before_step,
                                       after_step=lambda: bar.update(1)))
    bar.close()
    if not results:  # an empty shard
        return torch.zeros(adapter.noise_shape(transformer, 0, context), device=device, dtype=dtype)
    return torch.cat(results)
