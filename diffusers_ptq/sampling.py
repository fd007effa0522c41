"""Latent-space sampling with the transformer alone (no VAE), exactly as DiTPipeline does it.

Used by calibration; the evaluation module shares its seeding rules so that a calibration sample and a
pipeline sample with the same seed start from the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
# DiT's training schedule, for a transformer loaded without its pipeline's scheduler config.
DIT_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def make_scheduler(kind: str, config: dict | None = None):
    """A fresh DDIM or DDPM scheduler from a pipeline's scheduler config (or DiT's default schedule)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {kind!r}")
    if config is None:
        config = dict(DIT_NOISE_SCHEDULE, clip_sample=False)
    return SCHEDULERS[kind].from_config(config)


def model_class_ids(transformer, id2label: dict | None = None) -> list[int]:
    """Class ids to condition on: the keys of id2label when known, else every class the model embeds."""
    if id2label:
        return sorted({int(k) for k in id2label})
    num_classes = transformer.config.num_embeds_ada_norm
    if not num_classes:
        raise ValueError("the transformer is not class-conditional (num_embeds_ada_norm is None): pass class_labels")
    return list(range(num_classes))


def balanced_labels(class_ids: Sequence[int], num_samples: int) -> list[int]:
    """num_samples labels cycling through class_ids."""
    return [int(class_ids[i % len(class_ids)]) for i in range(num_samples)]


def sample_seeds(seed: int, num_samples: int) -> list[int]:
    """One noise seed per sample, so sample i's noise depends on (seed, i) and not on the batch size."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (num_samples,), generator=gen).tolist()


@torch.no_grad()
def sample_latents(
    transformer,
    scheduler,
    class_labels: Sequence[int],
    *,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    batch_size: int = 16,
    before_forward: Callable[[int, int, int], None] | None = None,
    progress: bool = True,
    sample_offset: int = 0,
) -> torch.Tensor:
    """Denoise Gaussian noise into latents, mirroring `DiTPipeline.__call__` without the VAE.

    Sample i starts from `randn` seeded with `sample_seeds(seed, N)[i]` (the same noise `evaluation.generate_images`
    gives the pipeline). With guidance_scale > 1 the batch is doubled with the null class
    (`num_embeds_ada_norm`). DDPM's per-step noise comes from a generator seeded with `seed`.
    `before_forward(step_index, batch_start, batch_len)` is called before every transformer call.
    `sample_offset`: the labels are samples sample_offset.. of a larger calibration set (one process's shard,
    distributed.py): sample i here is global sample sample_offset + i, with that sample's noise seed, and
    `batch_start` is reported as a global index. DDPM's step noise still comes from one generator per call
    (per process), so a sharded DDPM run is not the single-process one; a sharded DDIM run is.
    Returns the final latents, [N, C, H, W].
    """
    config = transformer.config
    device, dtype = transformer.device, transformer.dtype
    null_class = config.num_embeds_ada_norm
    use_cfg = guidance_scale > 1
    seeds = sample_seeds(seed, sample_offset + len(class_labels))[sample_offset:]
    step_generator = torch.Generator(device).manual_seed(seed)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    bar = tqdm(total=len(timesteps) * -(-len(class_labels) // batch_size), desc="calibration sampling",
               disable=not progress or not len(class_labels))
    results = []
    for start in range(0, len(class_labels), batch_size):
        labels = torch.tensor(list(class_labels[start : start + batch_size]), device=device)
        n = len(labels)
        gens = [torch.Generator(device).manual_seed(s) for s in seeds[start : start + n]]
        latents = randn_tensor((n, config.in_channels, config.sample_size, config.sample_size),
                               generator=gens, device=device, dtype=dtype)
        model_input = torch.cat([latents] * 2) if use_cfg else latents
        labels_input = torch.cat([labels, torch.full_like(labels, null_class)]) if use_cfg else labels
        for step_index, t in enumerate(timesteps):
            if use_cfg:
                half = model_input[: len(model_input) // 2]
                model_input = torch.cat([half, half], dim=0)
            model_input = scheduler.scale_model_input(model_input, t)
            t_batch = t.reshape(1).to(device).expand(model_input.shape[0])
            if before_forward is not None:
                before_forward(step_index, sample_offset + start, n)
            noise_pred = transformer(model_input, timestep=t_batch, class_labels=labels_input).sample
            channels = config.in_channels
            if use_cfg:
                eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
                cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
                half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
                noise_pred = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
            model_output = noise_pred[:, :channels] if config.out_channels // 2 == channels else noise_pred
            step_kwargs = {"generator": step_generator} if isinstance(scheduler, DDPMScheduler) else {}
            model_input = scheduler.step(model_output, t, model_input, **step_kwargs).prev_sample
            bar.update(1)
        results.append(model_input[:n] if use_cfg else model_input)
    bar.close()
    if not results:  # an empty shard
        return torch.zeros((0, config.in_channels, config.sample_size, config.sample_size), device=device, dtype=dtype)
    return torch.cat(results)
