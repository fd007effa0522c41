"""The tiny random PixArt-Σ pipeline (diffusers_ptq/harness/text.py), the bundled trained MNIST model
"bundled-pixart" (diffusers_ptq/assets/pixart-mnist, docs/bundled-pixart.md) and its training script's loss, text
shortcut and resume logic (scripts/train_bundled_pixart.py; issue #20). Nothing here downloads anything."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from diffusers_ptq.harness.text import PIXART_SCHEDULER, text_components, tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
MAX_FOLDER_BYTES = 25 * 2**20
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _call(pipe, prompt="a handwritten seven", output_type="latent", seed=0, **kwargs):
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type=output_type, clean_caption=False,
                use_resolution_binning=False, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_bundled_pixart
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return train_bundled_pixart


# --- the tiny random pipeline ---------------------------------------------------------------------------------------


def test_tiny_pixart_pipeline_runs_and_reloads_equal(tmp_path):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    pipe = tiny_pipeline("pixart")
    assert isinstance(pipe, PixArtSigmaPipeline) and isinstance(pipe.transformer, PixArtTransformer2DModel)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert {k: pipe.scheduler.config[k] for k in PIXART_SCHEDULER} == PIXART_SCHEDULER
    cfg = pipe.transformer.config
    assert (cfg.sample_size, cfg.patch_size, cfg.in_channels, cfg.out_channels, cfg.num_layers) == (8, 2, 4, 8, 2)
    assert cfg.caption_channels == pipe.text_encoder.config.d_model == 32 and not cfg.use_additional_conditions
    pipe.set_progress_bar_config(disable=True)
    latents = _call(pipe)
    assert latents.shape == (1, 4, 8, 8)
    assert _call(pipe, output_type="pil")[0].size == (32, 32)
    again = tiny_pipeline("pixart")
    again.set_progress_bar_config(disable=True)
    assert torch.equal(_call(again), latents)  # seeded construction
    assert not torch.equal(_call(tiny_pipeline("pixart", seed=1)), latents)
    pipe.save_pretrained(tmp_path)
    reloaded = PixArtSigmaPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    for (name, a), b in zip(pipe.transformer.state_dict().items(), reloaded.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    # equal up to float32 rounding: see test_bundled_mmdit.test_tiny_pipeline_runs_and_reloads_equal
    torch.testing.assert_close(_call(reloaded), latents, rtol=1e-5, atol=1e-5)


def test_tiny_pixart_overrides_and_the_default_resolution_binning():
    pipe = tiny_pipeline("pixart", out_channels=4, num_layers=1)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.out_channels == 4 and len(pipe.transformer.transformer_blocks) == 1
    assert _call(pipe).shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="sample size"):  # why PIXART_SAMPLING turns binning off
        pipe("a handwritten seven", num_inference_steps=2, height=32, width=32, output_type="latent")


def test_load_pipeline_reloads_a_saved_pixart_folder(tmp_path):
    from diffusers import DDIMScheduler

    from diffusers_ptq.harness.bundled import load_pipeline

    tiny_pipeline("pixart").save_pretrained(tmp_path)
    pipe = load_pipeline(tmp_path)
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    ddim = load_pipeline(tmp_path, scheduler="ddim")
    assert isinstance(ddim.scheduler, DDIMScheduler) and ddim.scheduler.config.beta_schedule == "linear"
    with pytest.raises(ValueError):
        load_pipeline(tmp_path, scheduler="flow_match_euler")


# --- the training script ------------------------------------------------------------------------------------------


def test_vb_term_is_zero_at_the_true_posterior(script):
    """L_vb = KL(q(x_{t-1}|x_t,x0) || p): zero when ε is the true noise and v = -1 (log variance = the clipped
    posterior's); larger with a wrong ε or variance."""
    diffusion = script.Diffusion()
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    t = torch.tensor([1, 2, 10, 100, 500, 999])
    xt = diffusion.q_sample(x0, t, noise)
    exact = diffusion.vb_bits(x0, xt, t, noise, -torch.ones_like(x0))
    assert float(exact.abs().max()) < 1e-3
    assert bool((diffusion.vb_bits(x0, xt, t, noise + 0.1, -torch.ones_like(x0)) > exact).all())
    # v = +1 (log variance = log β_t): wrong below t ~ 500; near t = 999 β_t equals the posterior variance
    assert bool((diffusion.vb_bits(x0, xt, t, noise, torch.ones_like(x0))[:4] > exact[:4]).all())
    assert torch.allclose(diffusion.alphas_cumprod.float(), tiny_pipeline("pixart").scheduler.alphas_cumprod)


def _tiny_setup(script):
    config = dict(script.PIXART_CONFIG, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                  cross_attention_dim=16)
    components = text_components("pixart", 0)
    prompts = [""] + [f"a handwritten {w}" for w in WORDS] + [f"the digit {d}" for d in range(10)]
    table = torch.stack([torch.arange(1, 11), torch.arange(11, 21)], 1)
    cond = script.encode_prompts(components, prompts)
    gen = torch.Generator().manual_seed(0)
    latents = (torch.randn(40, 4, 8, 8, generator=gen), torch.rand(40, 4, 8, 8, generator=gen) * 0.1,
               torch.arange(40) % 10)
    return config, components, prompts, table, cond, latents


def test_truncated_text_context_is_the_pipelines(script):
    config, components, prompts, _, cond, _ = _tiny_setup(script)
    assert cond["context"].shape[1] == cond["mask"].shape[1] == 4  # "the digit 7" + </s>
    assert script.check_shortcut(script.build_transformer(0, config), components, prompts, cond, 0) < 1e-5


def test_training_resumes_exactly(script, tmp_path):
    config, _, _, table, cond, latents = _tiny_setup(script)

    def run(work_dir, steps):
        args = types.SimpleNamespace(work_dir=work_dir, seed=0, steps=steps, batch_size=8, lr=1e-3, ema_decay=0.9,
                                     empty_prompt_rate=0.1, checkpoint_every=2)
        return script.train(args, *latents, cond, table, config=config, log=lambda msg: None)

    straight, info = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, info_b = run(tmp_path / "b", 4)  # rerun with a larger --steps: continues from the checkpoint
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert info["final_mse"] == info_b["final_mse"] and info["parameters"] == info_b["parameters"]
    assert torch.load(tmp_path / "b" / "transformer.pt", weights_only=True)["step"] == 4


# --- the bundled trained model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_pixart():
    from diffusers_ptq.harness.bundled import load_pipeline

    pipe = load_pipeline("bundled-pixart")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bundled_pixart_loads_offline_as_its_pipeline(bundled_pixart):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    pipe = bundled_pixart
    assert isinstance(pipe, PixArtSigmaPipeline) and isinstance(pipe.transformer, PixArtTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.latent_channels == 4
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert {k: pipe.scheduler.config[k] for k in PIXART_SCHEDULER} == PIXART_SCHEDULER
    cfg = pipe.transformer.config
    assert (cfg.in_channels, cfg.out_channels, cfg.patch_size, cfg.sample_size) == (4, 8, 2, 8)  # learned sigma
    assert cfg.caption_channels == pipe.text_encoder.config.d_model
    assert cfg.num_attention_heads * cfg.attention_head_dim == cfg.cross_attention_dim
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in pipe.transformer.parameters())


def test_bundled_pixart_generates_images(bundled_pixart):
    out = _call(bundled_pixart, ["a handwritten seven", "the digit 3"], output_type="pt")
    assert out.shape == (2, 1, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert _call(bundled_pixart, guidance_scale=1.0).shape == (1, 4, 8, 8)


def test_bundled_pixart_samples_are_recognizable(bundled_pixart):
    """One sample per digit at the reported settings (PIXART_SAMPLING: DPM-Solver++ 20 steps, guidance 4.5 against
    the default negative prompt ""), classified by the bundled MNIST classifier; 8/10 leaves room for a sample that
    another CPU's rounding tips over (the 100-sample accuracy is in training.json and docs/bundled-pixart.md)."""
    from diffusers_ptq.harness.bundled import PIXART_SAMPLING
    from diffusers_ptq.harness.classifier import load_classifier

    images = bundled_pixart([f"a handwritten {w}" for w in WORDS], output_type="pt",
                            generator=[torch.Generator().manual_seed(100 + d) for d in range(10)],
                            **PIXART_SAMPLING).images
    with torch.no_grad():
        predicted = load_classifier()(images[:, :1].float()).argmax(1)
    assert int((predicted == torch.arange(10)).sum()) >= 8, predicted.tolist()


def test_bundled_pixart_folder_is_small_safetensors_with_a_training_record():
    from diffusers_ptq.harness.bundled import BUNDLED_PIXART_DIR, PIXART_SAMPLING

    files = [p for p in BUNDLED_PIXART_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < MAX_FOLDER_BYTES
    weights = [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".safetensors"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    info = json.loads((BUNDLED_PIXART_DIR / "training.json").read_text())
    assert {"seed", "transformer", "machine", "evaluation"} <= set(info) and info["family"] == "pixart"
    main = info["evaluation"][0]
    assert main["samples"] == 100 and main["accuracy"] >= 0.9
    assert (main["num_inference_steps"], main["guidance_scale"]) == (PIXART_SAMPLING["num_inference_steps"],
                                                                   PIXART_SAMPLING["guidance_scale"])
