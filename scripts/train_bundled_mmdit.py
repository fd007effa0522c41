"""Train the bundled SD3- and FLUX.1-family models: small MM-DiTs on MNIST, prompted in words ("a handwritten seven").

    python scripts/train_bundled_mmdit.py --family sd3  --work-dir runs/sd3  --output diffusers_ptq/assets/sd3-mnist
    python scripts/train_bundled_mmdit.py --family flux --work-dir runs/flux --output diffusers_ptq/assets/flux-mnist

Only the transformer is trained. The VAE is the bundled DiT model's (diffusers_ptq/assets/dit-mnist/vae, copied with
shift_factor 0: 32x32 images -> 4x8x8 latents); the text encoders are the frozen, seeded random-init tiny encoders
of diffusers_ptq.harness.text. Rectified flow matching as SD3 and FLUX.1 are trained: x_t = (1-s)·x0 + s·noise,
target noise - x0, s logit-normal(0, 1); the timestep goes in as each pipeline passes it (SD3: s·1000, FLUX: s, the
transformer multiplies by 1000), FLUX's latents packed 2x2 with their img_ids/txt_ids. 10 % of the prompts are
empty, so classifier-free guidance with negative prompt "" works (SD3). FLUX is schnell-style (no guidance embedding).

Exact shortcut for the text tokens the pipelines pad with. Both pipelines feed the transformer many identical text
tokens: SD3 256 zero rows for the absent T5 (text_encoder_3=None), FLUX the <pad> positions of the 512-token T5
sequence (identical because the tiny T5 is position-free, see harness/text.py). The MM-DiTs give text tokens no
position (SD3 none, FLUX RoPE id 0 for all), so identical tokens stay identical through every block, and in
attention k identical keys act as one key whose logit is raised by log(k). Training feeds one such token with that
additive bias (SD3: a training-only copy of JointAttnProcessor2_0 that passes the mask; FLUX: its processor's
attention_mask) — the same function as the pipeline's, checked against the full-length input at the start of each
run — at a fraction of the cost. The shipped model has the stock processors.

Reproducible from --seed, resumable: state is checkpointed into --work-dir every --checkpoint-every steps (atomic
replace), and rerunning the same command continues. The learning rate is constant after a 300-step warm-up (the
weights are an EMA), so nothing depends on the total: rerunning with a larger --steps extends the run exactly as if
that number had been given from the start. At the end the pipeline folder is written (safetensors only),
100 samples (10 per digit) are classified by the bundled MNIST classifier, a grid goes to docs/images/, and
`training.json` (seed, steps, time, parameters, final loss, machine, accuracy) is written beside the pipeline.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffusers_ptq.harness.text import FLUX_SCHEDULER, SD3_SCHEDULER, text_components

ROOT = Path(__file__).resolve().parent.parent
DIT_VAE_DIR = ROOT / "diffusers_ptq" / "assets" / "dit-mnist" / "vae"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "{d}", "a {d}", "the {d}", "the digit {d}", "a digit {d}", "the number {d}", "a number {d}", "the numeral {d}",
    "a handwritten {d}", "handwritten digit {d}", "a handwritten digit {d}", "a handwritten number {d}",
    "a photo of a handwritten number {d}", "a photo of the digit {d}", "a picture of a {d}", "an image of the number {d}",
    "a drawing of the digit {d}", "a sketch of a {d}", "{d} written by hand", "a {d} written by hand",
    "a white {d} on a black background", "a {d} on a black background", "a bold {d}", "a thin {d}",
    "a small handwritten {d}", "a large handwritten {d}", "an mnist digit {d}", "a neat handwritten {d}",
    "a messy handwritten {d}", "a scan of a handwritten {d}",
)
EVAL_TEMPLATES = ("a handwritten {d}", "the digit {d}", "a photo of a handwritten number {d}", "{d}", "the number {d}")

SD3_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
                  pos_embed_max_size=8)
FLUX_CONFIG = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=4,
                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                   guidance_embeds=False, axes_dims_rope=(8, 12, 12))
SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length
FLUX_T5_LENGTH = 512  # FluxPipeline's default max_sequence_length
DEFAULTS = dict(  # per family: steps, batch size, learning rate, sampling settings of the report
    sd3=dict(steps=3000, batch_size=64, lr=8e-4, eval_steps=28, eval_guidance=5.0),
    flux=dict(steps=8500, batch_size=64, lr=8e-4, eval_steps=8, eval_guidance=0.0),
)


# --- prompts and their (frozen) text embeddings ---------------------------------------------------------------------


def prompt_table() -> tuple[list[str], torch.Tensor]:
    """All training prompts ("" first) and, per digit, the indices of its prompts [10, 2·len(TEMPLATES)]."""
    prompts, table = [""], []
    for digit, word in enumerate(DIGITS):
        row = []
        for template in TEMPLATES:
            for name in (word, str(digit)):
                row.append(len(prompts))
                prompts.append(template.format(d=name))
        table.append(row)
    return prompts, torch.tensor(table)


@torch.no_grad()
def encode_prompts(family: str, components: dict, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The pipelines' own text conditioning of every prompt, compressed (see the module docstring).

    sd3:  context [P, 77+1, 64] (both CLIPs' penultimate states, then one token for the 256 zero T5 rows),
          key_bias [P, 78] (0, and log 256 on the last), pooled [P, 64].
    flux: context [P, L, 32] (the T5 states of the real tokens, then one <pad> state, then filler), key_bias [P, L]
          (0 on real tokens, log(#pads) on the pad token, -inf on filler), pooled [P, 32] (CLIP pooled output).
    """
    if family == "sd3":
        hidden, pooled = [], []
        for tok, enc in ((components["tokenizer"], components["text_encoder"]),
                         (components["tokenizer_2"], components["text_encoder_2"])):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, -1)
        context = torch.cat([clip, clip.new_zeros(len(prompts), 1, clip.shape[-1])], 1)
        key_bias = torch.zeros(len(prompts), context.shape[1])
        key_bias[:, -1] = math.log(SD3_T5_LENGTH)
        return dict(context=context, key_bias=key_bias, pooled=torch.cat(pooled, -1))
    tok, enc = components["tokenizer"], components["text_encoder"]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    pooled = enc(ids).pooler_output
    tok2, enc2 = components["tokenizer_2"], components["text_encoder_2"]
    ids = tok2(prompts, padding="max_length", max_length=FLUX_T5_LENGTH, truncation=True, return_tensors="pt").input_ids
    states = enc2(ids)[0]
    real = (ids != tok2.pad_token_id).sum(1)
    assert all(bool((ids[i, : real[i]] != tok2.pad_token_id).all()) for i in range(len(prompts)))
    width = int(real.max()) + 1
    context = states.new_zeros(len(prompts), width, states.shape[-1])
    key_bias = torch.full((len(prompts), width), float("-inf"))
    for i, n in enumerate(real.tolist()):
        pads = states[i, n:]
        torch.testing.assert_close(pads, pads[:1].expand_as(pads), rtol=0, atol=1e-5)  # position-free T5
        context[i, :n], context[i, n] = states[i, :n], pads[0]
        key_bias[i, : n] = 0.0
        key_bias[i, n] = math.log(FLUX_T5_LENGTH - n)
    return dict(context=context, key_bias=key_bias, pooled=pooled)


@torch.no_grad()
def full_pipeline_conditioning(family: str, components: dict, prompts: list[str], transformer) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) exactly as the pipelines build them, uncompressed: for the equivalence check."""
    if family == "sd3":
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(transformer=transformer, vae=None, scheduler=None, **components)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  device=torch.device("cpu"), max_sequence_length=SD3_T5_LENGTH)
        return embeds, pooled
    from diffusers import FluxPipeline

    pipe = FluxPipeline(transformer=None, vae=None, scheduler=None, **components)
    embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=torch.device("cpu"), max_sequence_length=FLUX_T5_LENGTH)
    return embeds, pooled


# --- the transformer, its training-time attention, and the conditioning passed the pipelines' way -------------------


class BiasedJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3) with `attention_mask` (an additive key bias) passed to attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        out = F.scaled_dot_product_attention(torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2),
                                             attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
        hidden_states, encoder_hidden_states = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def xavier_init_linears(model) -> None:
    """Every Linear: Xavier-uniform weight, zero bias (DiT's initialisation), in place."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                module.bias.zero_()


def build_transformer(family: str, seed: int):
    """The MM-DiT, initialized DiT-style: Xavier Linears, zero biases, zeroed adaLN modulations and output layer."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**SD3_CONFIG) if family == "sd3" else FluxTransformer2DModel(**FLUX_CONFIG)
    with torch.no_grad():
        xavier_init_linears(model)
        for name, module in model.named_modules():
            if "timestep_embedder" in name or "text_embedder" in name or "guidance_embedder" in name:
                if isinstance(module, torch.nn.Linear):
                    torch.nn.init.normal_(module.weight, std=0.02)
            is_modulation = name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear"))
            if isinstance(module, torch.nn.Linear) and (is_modulation or name == "proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    return model


def pack(latents: torch.Tensor) -> torch.Tensor:
    """FluxPipeline._pack_latents: [B, C, H, W] -> [B, H/2·W/2, 4C]."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def image_ids(latent_hw: int = 8) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, latent_hw // 2, latent_hw // 2, "cpu", torch.float32)


def forward(family: str, model, xt: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
            key_bias: torch.Tensor | None) -> torch.Tensor:
    """The transformer on unpacked latents [B, 4, 8, 8], the timestep passed as the family's pipeline passes it.

    key_bias [B, context length] (or None: plain attention over the full-length context, the pipelines' way).
    Returns the velocity prediction [B, 4, 8, 8].
    """
    if family == "sd3":
        kwargs = {}
        if key_bias is not None:
            n = xt.shape[-1] // SD3_CONFIG["patch_size"]
            bias = torch.cat([key_bias.new_zeros(len(key_bias), n * n), key_bias], 1)  # SD3 order: [image, text]
            kwargs = dict(joint_attention_kwargs=dict(attention_mask=bias[:, None, None, :]))
        return model(hidden_states=xt, encoder_hidden_states=context, pooled_projections=pooled,
                     timestep=sigma * 1000, return_dict=False, **kwargs)[0]
    from diffusers import FluxPipeline

    b, c, h, w = xt.shape
    kwargs = {}
    if key_bias is not None:
        bias = torch.cat([key_bias, key_bias.new_zeros(b, h * w // 4)], 1)  # FLUX order: [text, image]
        kwargs = dict(joint_attention_kwargs=dict(attention_mask=bias[:, None, None, :]))
    out = model(hidden_states=pack(xt), encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
                img_ids=image_ids(h), txt_ids=torch.zeros(context.shape[1], 3), return_dict=False, **kwargs)[0]
    return FluxPipeline._unpack_latents(out, h * 4, w * 4, 4)  # vae_scale_factor 4: 32x32 images


@torch.no_grad()
def check_shortcut(family: str, model, components: dict, prompts: list[str], cond: dict, seed: int) -> float:
    """Max |difference| between the compressed-context forward (training's) and the full-length one with the stock
    attention processors (the pipelines'), on a few prompts and a perturbed copy of the model."""
    pick = [0, 1, 2, 50, len(prompts) - 1]
    embeds, pooled = full_pipeline_conditioning(family, components, [prompts[i] for i in pick], model)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.randn(len(pick), 4, 8, 8, generator=gen)
    sigma = torch.rand(len(pick), generator=gen)
    with torch.no_grad():  # give the zero-initialized modulations something to carry for the check
        probe = copy.deepcopy(model)
        for p in probe.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        if family == "sd3":
            from diffusers.models.attention_processor import JointAttnProcessor2_0

            probe.set_attn_processor(JointAttnProcessor2_0())  # the stock processor, as shipped
        full = forward(family, probe, xt, sigma, embeds, pooled, None)
        if family == "sd3":
            probe.set_attn_processor(BiasedJointAttnProcessor())
        idx = torch.tensor(pick)
        short = forward(family, probe, xt, sigma, cond["context"][idx], cond["pooled"][idx], cond["key_bias"][idx])
    torch.testing.assert_close(cond["pooled"][idx], pooled, rtol=0, atol=1e-6)
    diff = float((full - short).abs().max())
    scale = float(full.abs().max())
    if diff > 1e-4 * max(scale, 1.0):
        raise RuntimeError(f"the compressed text context does not reproduce the pipeline's: max diff {diff} (scale {scale})")
    return diff


# --- data and training ----------------------------------------------------------------------------------------------


def load_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(DIT_VAE_DIR)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def mnist_latents(vae, work_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean and std (times scaling_factor) of the 60k MNIST training images, cached in work_dir."""
    from diffusers_ptq.harness.data import load_mnist, to_model_range

    cache = work_dir / "latents.safetensors"
    if cache.exists():
        t = load_file(cache)
        return t["mean"], t["std"], t["labels"]
    images, labels = load_mnist("train")
    images = to_model_range(images)
    dists = [vae.encode(images[i : i + 500]).latent_dist for i in range(0, len(images), 500)]
    sf = vae.config.scaling_factor
    mean, std = torch.cat([d.mean for d in dists]) * sf, torch.cat([d.std for d in dists]) * sf
    tmp = cache.with_suffix(".tmp")
    save_file(dict(mean=mean.contiguous(), std=std.contiguous(), labels=labels), tmp)
    os.replace(tmp, cache)
    return mean, std, labels


def optimizer_step(model, ema, opt, loss: torch.Tensor, ema_decay: float, step: int) -> None:
    """One AdamW step on `loss` (gradients clipped to norm 1) and the EMA update (decay warmed up over the first
    steps)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        decay = min(ema_decay, (1 + step) / (10 + step))
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)  # our own training state, reloaded with weights_only=True
    os.replace(tmp, path)


def train(family: str, args, latent_mean, latent_std, labels, cond: dict, table: torch.Tensor, components, prompts):
    ckpt_path = args.work_dir / "transformer.pt"
    model = build_transformer(family, args.seed)
    if family == "sd3":
        model.set_attn_processor(BiasedJointAttnProcessor())
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, elapsed, losses = 0, 0.0, []
    state = torch.load(ckpt_path, weights_only=True) if ckpt_path.exists() else None
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        print(f"resumed at step {step} ({elapsed:.0f} s)", flush=True)
    else:
        print(f"shortcut check: max |compressed - full| = {check_shortcut(family, model, components, prompts, cond, args.seed):.2e}",
              flush=True)
    t0 = time.time() - elapsed
    warmup = 300
    model.train()
    while step < args.steps:
        idx = torch.randint(0, len(labels), (args.batch_size,), generator=gen)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(args.batch_size, generator=gen))  # logit-normal(0, 1), as SD3
        choice = torch.randint(0, table.shape[1], (args.batch_size,), generator=gen)
        empty = torch.rand(args.batch_size, generator=gen) < args.empty_prompt_rate
        pidx = torch.where(empty, 0, table[labels[idx], choice])
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        cur_lr = args.lr * min(1.0, (step + 1) / warmup)  # then constant: a longer --steps extends the same run
        for g in opt.param_groups:
            g["lr"] = cur_lr
        pred = forward(family, model, xt, sigma, cond["context"][pidx], cond["pooled"][pidx], cond["key_bias"][pidx])
        loss = F.mse_loss(pred, noise - x0)
        optimizer_step(model, ema, opt, loss, args.ema_decay, step)
        step += 1
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            rate = step / (time.time() - t0)
            print(f"{family} step {step}/{args.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                  f"lr {cur_lr:.2e} {rate:.2f} it/s", flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            _save_checkpoint(ckpt_path, dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                             gen=gen.get_state(), step=step, elapsed=time.time() - t0, losses=losses))
    ema.eval()
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    if family == "sd3":
        ema.set_attn_processor(JointAttnProcessor2_0())  # the stock processor (the shipped model's)
    info = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                sigma_sampling="logit-normal(0, 1)", empty_prompt_rate=args.empty_prompt_rate,
                seconds=round(time.time() - t0, 1), seconds_per_step=round((time.time() - t0) / args.steps, 3),
                final_loss=round(sum(losses[-500:]) / len(losses[-500:]), 4),
                loss_first_500=round(sum(losses[:500]) / len(losses[:500]), 4),
                parameters=sum(p.numel() for p in ema.parameters()))
    return ema, info


# --- pipeline assembly and evaluation -------------------------------------------------------------------------------


def assemble(family: str, transformer, vae, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    if family == "sd3":
        return StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(
            **SD3_SCHEDULER), **text_components("sd3", seed))
    return FluxPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                        **text_components("flux", seed))


def eval_prompts(per_digit: int) -> tuple[list[int], list[str]]:
    """The digits and prompts of the evaluation: digit-major, prompts cycling over EVAL_TEMPLATES with the word and
    the numeral alternating."""
    digits = [d for d in range(10) for _ in range(per_digit)]
    prompts = []
    for i, d in enumerate(digits):
        k = i % per_digit
        name = DIGITS[d] if k % 2 == 0 else str(d)
        prompts.append(EVAL_TEMPLATES[(k // 2) % len(EVAL_TEMPLATES)].format(d=name))
    return digits, prompts


@torch.no_grad()
def classify_samples(pipe, digits: list[int], prompts: list[str], kwargs: dict, seed: int,
                     batch_size: int) -> tuple[dict, torch.Tensor]:
    """Sample `prompts` through the pipeline (call arguments `kwargs`, one seeded generator per sample) and classify
    the images with the project's MNIST classifier: ({accuracy, accuracy_per_digit, seconds}, images [N, 1, 32, 32])."""
    from diffusers_ptq.harness.classifier import load_classifier

    pipe.set_progress_bar_config(disable=True)
    images = []
    t0 = time.time()
    for start in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(seed * 100003 + i) for i in range(start, min(start + batch_size, len(prompts)))]
        out = pipe(prompts[start : start + batch_size], generator=gens, **kwargs).images
        images.append(out.float()[:, :1])
    images = torch.cat(images)
    predicted = load_classifier()(images).argmax(1)
    truth = torch.tensor(digits)
    accuracy = float((predicted == truth).float().mean())
    per = [float((predicted[truth == d] == d).float().mean()) for d in range(10)]
    return dict(accuracy=round(accuracy, 4), accuracy_per_digit=[round(a, 2) for a in per],
                seconds=round(time.time() - t0, 1)), images


def evaluate_pipeline(pipe, family: str, per_digit: int, steps: int, guidance: float, seed: int,
                      batch_size: int = 50) -> tuple[dict, torch.Tensor]:
    """per_digit samples per digit through the real pipeline, prompts cycling over EVAL_TEMPLATES (word and numeral
    alternating); returns (report, images [N, 1, 32, 32] in [0, 1], digit-major)."""
    digits, prompts = eval_prompts(per_digit)
    kwargs = dict(num_inference_steps=steps, height=32, width=32, output_type="pt")
    if family == "sd3":
        kwargs.update(guidance_scale=guidance, negative_prompt="")
    else:
        kwargs.update(guidance_scale=0.0)
        if guidance > 1:
            kwargs.update(true_cfg_scale=guidance, negative_prompt="")
    scores, images = classify_samples(pipe, digits, prompts, kwargs, seed, batch_size)
    report = dict(samples=len(prompts), num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                  accuracy=scores["accuracy"], accuracy_per_digit=scores["accuracy_per_digit"],
                  seconds=scores["seconds"], prompts=list(EVAL_TEMPLATES))
    return report, images


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd3", "flux"), required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--empty-prompt-rate", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--eval-per-digit", type=int, default=10)
    parser.add_argument("--eval-steps", type=int, default=None)
    parser.add_argument("--eval-guidance", type=float, nargs="*", default=None,
                        help="guidance scales to evaluate (first one is reported as the main number)")
    parser.add_argument("--grid", type=Path, default=None, help="PNG grid (default docs/images/bundled-<family>-samples.png)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the pipeline in --output, no training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    defaults = DEFAULTS[args.family]
    for key in ("steps", "batch_size", "lr", "eval_steps"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.eval_guidance is None:
        args.eval_guidance = [defaults["eval_guidance"]]
    args.grid = args.grid or ROOT / "docs" / "images" / f"bundled-{args.family}-samples.png"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    from diffusers_ptq.harness.utils import machine_info

    if not args.eval_only:
        vae = load_vae()
        latent_mean, latent_std, labels = mnist_latents(vae, args.work_dir)
        components = text_components(args.family, args.seed)
        prompts, table = prompt_table()
        cond = encode_prompts(args.family, components, prompts)
        transformer, train_info = train(args.family, args, latent_mean, latent_std, labels, cond, table, components,
                                        prompts)
        pipe = assemble(args.family, transformer, vae, args.seed)
        tmp = args.output.with_name(args.output.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(args.output, ignore_errors=True)
        os.replace(tmp, args.output)
        info = dict(family=args.family, seed=args.seed, torch=torch.__version__, threads=torch.get_num_threads(),
                    machine=machine_info()["cpu_model"], transformer=train_info,
                    transformer_config={k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")},
                    vae=f"copied from {DIT_VAE_DIR.relative_to(ROOT)} (shift_factor 0.0 added)",
                    text_encoders=f"text_components({args.family!r}, seed={args.seed}): random-init, frozen",
                    prompts=dict(templates=list(TEMPLATES), digit_names="word or numeral, 50/50"))
        (args.output / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    info = json.loads((args.output / "training.json").read_text())
    pipe = _load(args.family, args.output)
    write_evaluations(args, info, lambda guidance: evaluate_pipeline(pipe, args.family, args.eval_per_digit,
                                                                     args.eval_steps, guidance, args.seed))


def write_evaluations(args, info: dict, evaluate, log=lambda message: print(message, flush=True)) -> None:
    """Evaluate the saved pipeline at each of args.eval_guidance (`evaluate(guidance) -> (report, images)`), save the
    first one's grid, and write everything into the output folder's training.json."""
    from diffusers_ptq.harness.utils import save_grid

    evaluations = []
    for i, guidance in enumerate(args.eval_guidance):
        report, images = evaluate(guidance)
        log(json.dumps(report))
        evaluations.append(report)
        if i == 0:
            save_grid(images, args.grid, nrow=args.eval_per_digit)
    info["evaluation"] = evaluations
    info["grid"] = str(args.grid.relative_to(ROOT)) if args.grid.is_relative_to(ROOT) else str(args.grid)
    info["folder_bytes"] = folder_size(args.output)
    (args.output / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log(json.dumps({k: v for k, v in info.items() if k not in ("transformer_config", "prompts")}, indent=2))


def _load(family: str, folder: Path):
    """The saved pipeline, loaded the way harness.bundled.load_pipeline loads the bundled ones."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if family == "sd3":
        return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                        torch_dtype=torch.float32)
    return FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)


if __name__ == "__main__":
    main()
