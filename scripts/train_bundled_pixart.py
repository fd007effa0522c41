"""Train the bundled PixArt-Σ-family model: a small PixArt transformer on MNIST, prompted in words ("a handwritten
seven"), shipped as a PixArtSigmaPipeline folder.

    python scripts/train_bundled_pixart.py --work-dir runs/pixart --output diffusers_ptq/assets/pixart-mnist

The pattern is scripts/train_bundled_mmdit.py's (whose prompt table, VAE and MNIST latent cache it reuses). Only the
transformer is trained. The VAE is the bundled DiT model's (diffusers_ptq/assets/dit-mnist/vae, 32x32 images ->
4x8x8 latents); the text encoder is the frozen, seeded random-init tiny T5 of diffusers_ptq.harness.text
(`text_components("pixart", seed)`, 32 wide = caption_channels).

Objective: PixArt's, which is DiT's (IDDPM's GaussianDiffusion, linear betas 1e-4..0.02 over 1000 steps, learned
sigma): x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, t uniform in 0..999; the transformer's 8 output channels are ε (the first
4, what PixArtSigmaPipeline keeps) and the interpolation weight v of the log-variance between β_t and the clipped
posterior variance (the last 4, "learned_range"). Loss = MSE(ε) + L_vb, L_vb the KL (in bits per dim) between the
true posterior q(x_{t-1}|x_t,x0) and the model's Gaussian with the ε-mean *frozen* (stop-gradient), the decoder NLL
at t = 0 — so the variance half learns the variance, the ε half learns exactly as with plain MSE (IDDPM's L_hybrid
with λ = 1/1000 expressed the way DiT/PixArt code it: loss_type MSE + vb term on the frozen mean).

The prompt goes in exactly as PixArtSigmaPipeline passes it: T5 states of the prompt tokenized to 300 tokens
(max_sequence_length) with its attention mask, the mask also given to the transformer as `encoder_attention_mask`
(which turns it into a -10000 key bias in cross-attention). Masked keys get weight exp(-10000) = 0 exactly in
float32, so training keeps only the first L positions (L = the longest prompt's tokens with `</s>`, 8 here) with
their mask: the same function at 8/300 of the cross-attention cost, checked against the full 300-position input at
the start of every run. 10 % of the prompts are "" (T5: just `</s>`), so classifier-free guidance against the
pipeline's default negative prompt "" works.

Reproducible from --seed, resumable: state is checkpointed into --work-dir every --checkpoint-every steps (atomic
replace), and rerunning the same command continues. The learning rate is constant after a 300-step warm-up (the
weights are an EMA), so rerunning with a larger --steps extends the run exactly as if that number had been given from
the start. At the end the pipeline folder is written (safetensors only), 100 samples (10 per digit) are drawn
through the saved pipeline at PIXART_SAMPLING (DPM-Solver++ 20 steps, guidance 4.5, negative prompt "") and
classified by the bundled MNIST classifier, a grid goes to docs/images/, and `training.json` is written beside the
pipeline.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bundled_mmdit import (  # noqa: E402  (the sibling script: shared prompt table, VAE, latents)
    DIT_VAE_DIR,
    EVAL_TEMPLATES,
    ROOT,
    TEMPLATES,
    _save_checkpoint,
    classify_samples,
    eval_prompts,
    load_vae,
    mnist_latents,
    optimizer_step,
    prompt_table,
    write_evaluations,
    xavier_init_linears,
)

from diffusers_ptq.harness.text import PIXART_SCHEDULER, text_components  # noqa: E402

PIXART_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=6, attention_head_dim=32,
                     num_attention_heads=4, cross_attention_dim=128, caption_channels=32, norm_type="ada_norm_single",
                     num_embeds_ada_norm=1000, use_additional_conditions=False)
T5_LENGTH = 300  # PixArtSigmaPipeline's default max_sequence_length
DEFAULTS = dict(steps=8000, batch_size=64, lr=8e-4, eval_steps=20, eval_guidance=4.5)


# --- the linear-beta DDPM of PixArt/DiT, with IDDPM's learned-range variance ---------------------------------------


class Diffusion:
    """The quantities of IDDPM's GaussianDiffusion the loss needs (float64, as there), for PIXART_SCHEDULER's betas."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        ac = torch.cumprod(1 - betas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.num_steps = num_steps
        self.betas, self.alphas_cumprod = betas, ac
        self.sqrt_ac, self.sqrt_1m_ac = ac.sqrt(), (1 - ac).sqrt()
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self.post_log_var_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.post_coef1 = betas * ac_prev.sqrt() / (1 - ac)
        self.post_coef2 = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)

    def _at(self, values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return values[t].float().view(-1, 1, 1, 1)

    def q_sample(self, x0, t, noise):
        return self._at(self.sqrt_ac, t) * x0 + self._at(self.sqrt_1m_ac, t) * noise

    def vb_bits(self, x0, xt, t, eps, v) -> torch.Tensor:
        """Per-sample L_vb (bits/dim) of the model N(mean(eps), exp(logvar(v))), eps already detached."""
        pred_x0 = (xt - self._at(self.sqrt_1m_ac, t) * eps) / self._at(self.sqrt_ac, t)
        c1, c2 = self._at(self.post_coef1, t), self._at(self.post_coef2, t)
        model_mean = c1 * pred_x0 + c2 * xt
        true_mean = c1 * x0 + c2 * xt
        min_log, max_log = self._at(self.post_log_var_clipped, t), self._at(self.betas.log(), t)
        frac = (v + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        true_log_var = min_log
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """IDDPM's decoder likelihood (data assumed in [-1, 1] with 256 bins, as DiT/PixArt apply it to latents)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


# --- prompts, their (frozen) T5 states, and the transformer ----------------------------------------------------------


@torch.no_grad()
def encode_prompts(components: dict, prompts: list[str]) -> dict[str, torch.Tensor]:
    """T5 states and masks of every prompt as PixArtSigmaPipeline.encode_prompt makes them (300 tokens, the mask
    passed to T5), truncated to the longest prompt's L tokens: context [P, L, 32], mask [P, L]."""
    tok, enc = components["tokenizer"], components["text_encoder"]
    batch = tok(prompts, padding="max_length", max_length=T5_LENGTH, truncation=True, add_special_tokens=True,
                return_tensors="pt")
    states = enc(batch.input_ids, attention_mask=batch.attention_mask)[0]
    mask = batch.attention_mask
    length = int(mask.sum(1).max())
    assert bool((mask[:, length:] == 0).all()) and bool((mask.cumsum(1).max(1).values == mask.sum(1)).all())
    return dict(context=states[:, :length].contiguous(), mask=mask[:, :length].contiguous())


def build_transformer(seed: int, config: dict | None = None):
    """PixArtTransformer2DModel initialized as PixArt's `initialize_weights` (DiT's): Xavier Linears and patch
    embedding, zero biases, N(0, 0.02) timestep/caption MLPs and adaLN-single projection, zeroed cross-attention
    output projections and output layer. The blocks' scale_shift_tables keep diffusers' init (randn/sqrt(dim))."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**(config or PIXART_CONFIG))
    with torch.no_grad():
        xavier_init_linears(model)
        proj = model.pos_embed.proj
        torch.nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        proj.bias.zero_()
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if name.startswith(("adaln_single.", "caption_projection.")):
                torch.nn.init.normal_(module.weight, std=0.02)
            if name.endswith("attn2.to_out.0") or name == "proj_out":
                module.weight.zero_()
                module.bias.zero_()
    return model


def forward(model, xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The transformer called as PixArtSigmaPipeline calls it: integer timesteps, T5 states, their attention mask
    as encoder_attention_mask, no micro-conditions. Returns [B, 8, 8, 8] (ε, then the variance interpolation v)."""
    return model(xt, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


@torch.no_grad()
def check_shortcut(model, components: dict, prompts: list[str], cond: dict, seed: int) -> float:
    """Max |difference| between the truncated-context forward (training's) and the pipeline's full 300-token one,
    on a few prompts and a perturbed copy of the model (its zero-initialized layers would hide a difference)."""
    from diffusers import PixArtSigmaPipeline

    pick = [0, 1, 2, len(prompts) // 2, len(prompts) - 1]
    pipe = PixArtSigmaPipeline(transformer=None, vae=None, scheduler=None, **components)
    embeds, mask, _, _ = pipe.encode_prompt([prompts[i] for i in pick], do_classifier_free_guidance=False,
                                            device=torch.device("cpu"), clean_caption=False,
                                            max_sequence_length=T5_LENGTH)
    gen = torch.Generator().manual_seed(seed)
    probe = copy.deepcopy(model)
    for p in probe.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    xt = torch.randn(len(pick), model.config.in_channels, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (len(pick),), generator=gen)
    idx = torch.tensor(pick)
    full = forward(probe, xt, t, embeds, mask)
    short = forward(probe, xt, t, cond["context"][idx], cond["mask"][idx])
    diff, scale = float((full - short).abs().max()), float(full.abs().max())
    if diff > 1e-4 * max(scale, 1.0):
        raise RuntimeError(f"the truncated text context does not reproduce the pipeline's: max diff {diff} (scale {scale})")
    return diff


# --- training -------------------------------------------------------------------------------------------------------


def train(args, latent_mean, latent_std, labels, cond: dict, table: torch.Tensor, config: dict | None = None,
          check=None, log=print):
    """Train (or resume from args.work_dir/transformer.pt) to args.steps; returns (EMA model, info).

    args: work_dir, seed, steps, batch_size, lr, ema_decay, empty_prompt_rate, checkpoint_every.
    check: called with the fresh model before the first step of a new run (the shortcut check)."""
    ckpt_path = Path(args.work_dir) / "transformer.pt"
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    diffusion = Diffusion()
    model = build_transformer(args.seed, config)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, elapsed, losses, vbs = 0, 0.0, [], []
    state = torch.load(ckpt_path, weights_only=True) if ckpt_path.exists() else None
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, elapsed, losses, vbs = state["step"], state["elapsed"], state["losses"], state["vbs"]
        log(f"resumed at step {step} ({elapsed:.0f} s)")
    elif check is not None:
        log(f"shortcut check: max |truncated - full| = {check(model):.2e}")
    t0 = time.time() - elapsed
    warmup = 300
    channels = model.config.in_channels
    model.train()
    while step < args.steps:
        idx = torch.randint(0, len(labels), (args.batch_size,), generator=gen)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, diffusion.num_steps, (args.batch_size,), generator=gen)
        choice = torch.randint(0, table.shape[1], (args.batch_size,), generator=gen)
        empty = torch.rand(args.batch_size, generator=gen) < args.empty_prompt_rate
        pidx = torch.where(empty, 0, table[labels[idx], choice])
        xt = diffusion.q_sample(x0, t, noise)
        cur_lr = args.lr * min(1.0, (step + 1) / warmup)  # then constant: a longer --steps extends the same run
        for g in opt.param_groups:
            g["lr"] = cur_lr
        out = forward(model, xt, t, cond["context"][pidx], cond["mask"][pidx])
        eps, v = out[:, :channels], out[:, channels:]
        mse = F.mse_loss(eps, noise)
        if v.shape[1]:
            vb = diffusion.vb_bits(x0, xt, t, eps.detach(), v).mean()
        else:
            vb = mse.new_zeros(())
        loss = mse + vb
        optimizer_step(model, ema, opt, loss, args.ema_decay, step)
        step += 1
        losses.append(mse.item())
        vbs.append(vb.item())
        if step % 50 == 0 or step == args.steps:
            rate = step / (time.time() - t0)
            log(f"pixart step {step}/{args.steps} mse {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"vb {sum(vbs[-50:]) / len(vbs[-50:]):.4f} lr {cur_lr:.2e} {rate:.2f} it/s")
        if step % args.checkpoint_every == 0 or step == args.steps:
            _save_checkpoint(ckpt_path, dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                             gen=gen.get_state(), step=step, elapsed=time.time() - t0,
                                             losses=losses, vbs=vbs))
    ema.eval()
    seconds = time.time() - t0
    info = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                objective="DDPM epsilon MSE + IDDPM L_vb (learned-range variance, frozen mean), linear betas "
                          "1e-4..0.02, t uniform in 0..999",
                empty_prompt_rate=args.empty_prompt_rate, seconds=round(seconds, 1),
                seconds_per_step=round(seconds / max(args.steps, 1), 3),
                final_mse=round(sum(losses[-500:]) / max(len(losses[-500:]), 1), 4),
                mse_first_500=round(sum(losses[:500]) / max(len(losses[:500]), 1), 4),
                final_vb=round(sum(vbs[-500:]) / max(len(vbs[-500:]), 1), 4),
                parameters=sum(p.numel() for p in ema.parameters()))
    return ema, info


# --- pipeline assembly and evaluation -------------------------------------------------------------------------------


def assemble(transformer, vae, seed: int):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    return PixArtSigmaPipeline(transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler(
        **PIXART_SCHEDULER), **text_components("pixart", seed))


def evaluate_pipeline(pipe, per_digit: int, steps: int, guidance: float, seed: int,
                      batch_size: int = 50) -> tuple[dict, torch.Tensor]:
    """per_digit samples per digit through the real pipeline at PIXART_SAMPLING (steps and guidance as given);
    returns (report, images [N, 1, 32, 32] in [0, 1], digit-major)."""
    from diffusers_ptq.harness.bundled import PIXART_SAMPLING

    digits, prompts = eval_prompts(per_digit)
    kwargs = dict(PIXART_SAMPLING, num_inference_steps=steps, guidance_scale=guidance, output_type="pt")
    scores, images = classify_samples(pipe, digits, prompts, kwargs, seed, batch_size)
    report = dict(samples=len(prompts), num_inference_steps=steps, guidance_scale=guidance, negative_prompt="",
                  scheduler="DPMSolverMultistepScheduler", seed=seed, accuracy=scores["accuracy"],
                  accuracy_per_digit=scores["accuracy_per_digit"], seconds=scores["seconds"],
                  prompts=list(EVAL_TEMPLATES))
    return report, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--empty-prompt-rate", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--eval-per-digit", type=int, default=10)
    parser.add_argument("--eval-steps", type=int, default=DEFAULTS["eval_steps"])
    parser.add_argument("--eval-guidance", type=float, nargs="*", default=[DEFAULTS["eval_guidance"]],
                        help="guidance scales to evaluate (the first one is reported as the main number)")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "images" / "bundled-pixart-samples.png")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the pipeline in --output, no training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    from diffusers import PixArtSigmaPipeline

    from diffusers_ptq.harness.utils import machine_info

    def log(msg):
        print(msg, flush=True)

    if not args.eval_only:
        vae = load_vae()
        latent_mean, latent_std, labels = mnist_latents(vae, args.work_dir)
        components = text_components("pixart", args.seed)
        prompts, table = prompt_table()
        cond = encode_prompts(components, prompts)
        transformer, train_info = train(
            args, latent_mean, latent_std, labels, cond, table, log=log,
            check=lambda model: check_shortcut(model, components, prompts, cond, args.seed))
        pipe = assemble(transformer, vae, args.seed)
        tmp = args.output.with_name(args.output.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(args.output, ignore_errors=True)
        os.replace(tmp, args.output)
        info = dict(family="pixart", seed=args.seed, torch=torch.__version__, threads=torch.get_num_threads(),
                    machine=machine_info()["cpu_model"], transformer=train_info,
                    transformer_config={k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")},
                    vae=f"copied from {DIT_VAE_DIR.relative_to(ROOT)} (shift_factor 0.0 added)",
                    text_encoders=f"text_components('pixart', seed={args.seed}): random-init, frozen",
                    text_tokens=f"{T5_LENGTH} (PixArtSigmaPipeline's max_sequence_length) with the attention mask; "
                                f"training keeps the first {cond['mask'].shape[1]} (the rest are masked)",
                    prompts=dict(templates=list(TEMPLATES), digit_names="word or numeral, 50/50"))
        (args.output / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    info = json.loads((args.output / "training.json").read_text())
    pipe = PixArtSigmaPipeline.from_pretrained(args.output, dtype=torch.float32)
    write_evaluations(args, info, lambda guidance: evaluate_pipeline(pipe, args.eval_per_digit, args.eval_steps,
                                                                     guidance, args.seed), log)


if __name__ == "__main__":
    main()
