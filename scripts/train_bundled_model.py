"""Train the bundled default model: a tiny AutoencoderKL and a class-conditional DiT on MNIST.

Reproduces `diffusers_ptq/assets/dit-mnist` from a seed (CPU, about an hour on 2 cores):

    python scripts/train_bundled_model.py --work-dir runs/bundled --output diffusers_ptq/assets/dit-mnist

Resumable: each stage checkpoints into --work-dir and a rerun continues where it stopped. Writes
`training.json` (time, parameter counts, final losses) next to the pipeline.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from diffusers_ptq.harness.bundled import keep_id2label
from diffusers_ptq.harness.data import load_mnist, to_model_range

DIGITS = {i: name for i, name in enumerate("zero one two three four five six seven eight nine".split())}
VAE_CONFIG = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
# DiT-XL/2's architecture at toy size: adaLN-Zero, patch 2, 1000 label slots + the null class 1000 that
# DiTPipeline hard-codes for classifier-free guidance (only labels 0-9 are trained).
DIT_CONFIG = dict(
    num_attention_heads=6,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    num_layers=6,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
    activation_fn="gelu-approximate",
)
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)  # our own training state, reloaded with weights_only=True
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.exists() else None


def _batches(n: int, batch_size: int, generator: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def train_vae(images: torch.Tensor, work_dir: Path, steps: int, batch_size: int, seed: int) -> tuple[AutoencoderKL, dict]:
    """Train the VAE with MSE + a light KL term; sets `scaling_factor` to 1/std of the latents."""
    ckpt_path = work_dir / "vae.pt"
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    state = _load_checkpoint(ckpt_path)
    step, elapsed, losses = 0, 0.0, []
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    batches = _batches(len(images), batch_size, gen)
    for _ in range(step):  # replay the batch order so a resumed run sees the same data
        next(batches)
    t0 = time.time() - elapsed
    vae.train()
    while step < steps:
        x = images[next(batches)]
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.mse_loss(recon, x, reduction="sum") / len(x)
        kl = posterior.kl().mean()
        loss = rec + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(rec) / x[0].numel())
        if step % 100 == 0 or step == steps:
            print(f"vae step {step}/{steps} rec_mse {sum(losses[-100:]) / len(losses[-100:]):.5f} kl {float(kl):.1f}", flush=True)
            _save_checkpoint(ckpt_path, dict(model=vae.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                                             step=step, elapsed=time.time() - t0, losses=losses))
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 1000]).latent_dist.mode() for i in range(0, len(images), 1000)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    info = dict(steps=steps, batch_size=batch_size, seconds=time.time() - t0,
                final_reconstruction_mse=sum(losses[-100:]) / len(losses[-100:]),
                scaling_factor=vae.config.scaling_factor, parameters=sum(p.numel() for p in vae.parameters()))
    return vae, info


def _init_dit(model: DiTTransformer2DModel) -> None:
    """DiT's initialization: Xavier Linears, zeroed adaLN modulation and final layer (adaLN-Zero)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    emb = model.transformer_blocks[0].norm1.emb
    torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
    torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
    torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def _tie_embedders(model: DiTTransformer2DModel) -> None:
    """Train one timestep/class embedder shared by all blocks, as DiT does; untied (copied) before saving."""
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared


def _untie_embedders(model: DiTTransformer2DModel) -> None:
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = copy.deepcopy(shared)


def train_dit(latent_mean: torch.Tensor, latent_std: torch.Tensor, labels: torch.Tensor, work_dir: Path,
              steps: int, batch_size: int, seed: int, lr: float, ema_decay: float) -> tuple[DiTTransformer2DModel, dict]:
    ckpt_path = work_dir / "dit.pt"
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**DIT_CONFIG)
    _init_dit(model)
    _tie_embedders(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    step, elapsed, losses = 0, 0.0, []
    state = _load_checkpoint(ckpt_path)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    t0 = time.time() - elapsed
    warmup = 500
    model.train()
    while step < steps:
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        t = torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cur_lr = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        pred = model(xt, timestep=t, class_labels=labels[idx]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        losses.append(float(loss))
        if step % 100 == 0 or step == steps:
            rate = step / (time.time() - t0)
            print(f"dit step {step}/{steps} loss {sum(losses[-100:]) / 100:.4f} lr {cur_lr:.2e} {rate:.2f} it/s", flush=True)
        if step % 500 == 0 or step == steps:
            _save_checkpoint(ckpt_path, dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                             gen=gen.get_state(), step=step, elapsed=time.time() - t0, losses=losses))
    _untie_embedders(ema)
    ema.eval()
    info = dict(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, seconds=time.time() - t0,
                final_loss=sum(losses[-500:]) / len(losses[-500:]), parameters=sum(p.numel() for p in ema.parameters()))
    return ema, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bundled"))
    parser.add_argument("--output", type=Path, default=Path("diffusers_ptq/assets/dit-mnist"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch-size", type=int, default=64)
    parser.add_argument("--dit-steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    images, labels = load_mnist("train")
    images = to_model_range(images)
    vae_file = args.work_dir / "vae_final.safetensors"
    if vae_file.exists():
        vae_info = json.loads((args.work_dir / "vae_final.json").read_text())
        vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=vae_info["scaling_factor"])
        vae.load_state_dict(load_file(vae_file))
    else:
        vae, vae_info = train_vae(images, args.work_dir, args.vae_steps, args.vae_batch_size, args.seed)
        save_file(vae.state_dict(), vae_file)
        (args.work_dir / "vae_final.json").write_text(json.dumps(vae_info, indent=2))
    vae.eval()

    with torch.no_grad():
        dists = [vae.encode(images[i : i + 1000]).latent_dist for i in range(0, len(images), 1000)]
    sf = vae.config.scaling_factor
    latent_mean = torch.cat([d.mean for d in dists]) * sf
    latent_std = torch.cat([d.std for d in dists]) * sf

    dit, dit_info = train_dit(latent_mean, latent_std, labels, args.work_dir, args.dit_steps, args.batch_size,
                              args.seed, args.lr, args.ema_decay)
    scheduler = DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False)
    # Stored in float16 to keep the file small (11.5 MB); load_pipeline() runs it in float32.
    pipe = DiTPipeline(transformer=dit.to(torch.float16), vae=vae, scheduler=scheduler, id2label=DIGITS)
    keep_id2label(pipe, DIGITS)  # DiTPipeline does not register it itself: keep it on save
    args.output.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.output, safe_serialization=True)
    info = dict(seed=args.seed, torch=torch.__version__, threads=torch.get_num_threads(), vae=vae_info, dit=dit_info,
                transformer_storage_dtype="float16",
                total_seconds=vae_info["seconds"] + dit_info["seconds"])
    (args.output / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
