"""Tiny offline text stacks and pipelines of the SD3 / FLUX.1 families (diffusers_ptq/harness/text.py), and the
bundled trained MNIST models "bundled-sd3" / "bundled-flux" (issue #19, point 4). Nothing here downloads anything."""

import pytest
import torch

from diffusers_ptq.harness.text import (
    CLIP_MAX_LENGTH,
    WORDS,
    clip_tokenizer,
    clip_vocab_and_merges,
    t5_tokenizer,
    text_components,
    tiny_pipeline,
)

PROMPTS = ["a handwritten seven", "the digit 7", "a photo of a handwritten number seven", "",
           "a bold black 3 on a white background", "nine", "a small thin drawing of the number zero written by hand"]


def _call(pipe, prompt="a handwritten seven", output_type="latent", seed=0, **kwargs):
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type=output_type,
                generator=torch.Generator().manual_seed(seed), **kwargs).images


# --- tokenizers -----------------------------------------------------------------------------------------------------


def test_clip_tokenizer_one_token_per_word_and_round_trip():
    tok = clip_tokenizer()
    assert tok.model_max_length == CLIP_MAX_LENGTH
    for word in WORDS:
        ids = tok(word).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == 3 and tok.unk_token_id not in ids[1:-1] or word == "", word
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        assert len(ids) == len(prompt.split()) + 2
        assert tok.decode(ids, skip_special_tokens=True) == prompt
    padded = tok(PROMPTS, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (len(PROMPTS), CLIP_MAX_LENGTH)
    assert clip_vocab_and_merges() == clip_vocab_and_merges.__wrapped__()  # deterministic


def test_t5_tokenizer_round_trip_and_lengths():
    tok = t5_tokenizer()
    assert tok.model_max_length == 512 and (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        assert ids[-1] == tok.eos_token_id and len(ids) == len(prompt.split()) + 1
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == prompt
    for length in (300, 512):
        batch = tok(PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        assert batch.input_ids.shape == (len(PROMPTS), length)
        assert batch.attention_mask.sum(1).tolist() == [len(p.split()) + 1 for p in PROMPTS]


@pytest.mark.parametrize("make", [clip_tokenizer, t5_tokenizer])
def test_unknown_words_tokenize_without_error(make):
    tok = make()
    for text in ["zebra quixotic", "A Handwritten SEVEN!!", "ünïcödé ✓ 漢字", "x" * 500, "7" * 100]:
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert len(ids) == tok.model_max_length and all(0 <= i < len(tok) for i in ids)
        tok.decode(ids)


# --- encoders and tiny pipelines ----------------------------------------------------------------------------------


def test_text_components_are_seeded():
    a, b, c = text_components("flux", seed=3), text_components("flux", seed=3), text_components("flux", seed=4)
    for name in ("text_encoder", "text_encoder_2"):
        sa, sb, sc = (x[name].state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    sd3 = text_components("sd3")
    assert sd3["text_encoder_3"] is None and sd3["tokenizer_3"] is None
    assert not torch.equal(sd3["text_encoder"].text_model.embeddings.token_embedding.weight,
                           sd3["text_encoder_2"].text_model.embeddings.token_embedding.weight)
    pixart = text_components("pixart")
    assert set(pixart) == {"text_encoder", "tokenizer"}
    with pytest.raises(ValueError):
        text_components("sdxl")


def test_position_free_t5_gives_every_pad_position_the_same_output():
    comps = text_components("flux")
    ids = comps["tokenizer_2"](["a handwritten seven"], padding="max_length", max_length=512,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        out = comps["text_encoder_2"](ids)[0][0]
    pads = out[ids[0] == 0]
    assert len(pads) == 508 and torch.allclose(pads, pads[:1].expand_as(pads), rtol=0, atol=1e-6)


def test_sd3_uses_zeros_for_the_missing_t5():
    pipe = tiny_pipeline("sd3")
    embeds, _, pooled, _ = pipe.encode_prompt("a handwritten seven", None, None, do_classifier_free_guidance=False)
    assert embeds.shape == (1, CLIP_MAX_LENGTH + 256, 64) and pooled.shape == (1, 64)
    assert torch.count_nonzero(embeds[:, CLIP_MAX_LENGTH:]) == 0
    assert torch.count_nonzero(embeds[:, :CLIP_MAX_LENGTH]) > 0


def _reload(pipe, folder):
    from diffusers import StableDiffusion3Pipeline

    pipe.save_pretrained(folder)
    extra = dict(text_encoder_3=None, tokenizer_3=None) if isinstance(pipe, StableDiffusion3Pipeline) else {}
    return type(pipe).from_pretrained(folder, **extra)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_pipeline_runs_and_reloads_equal(family, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe = tiny_pipeline(family)
    assert isinstance(pipe, {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family])
    pipe.set_progress_bar_config(disable=True)
    latents = _call(pipe)
    assert latents.shape == ((1, 4, 8, 8) if family == "sd3" else (1, 16, 16))  # FLUX returns packed latents
    images = _call(pipe, output_type="pil")
    assert images[0].size == (32, 32)
    again = tiny_pipeline(family)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(_call(again), latents)  # seeded construction
    reloaded = _reload(pipe, tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    for (name, a), b in zip(pipe.transformer.state_dict().items(), reloaded.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    # Same weights, but safetensors leaves some at addresses that are not 64-byte aligned and the CPU GEMM picks
    # another kernel (another summation order) for those: equal up to float32 rounding (measured: 4e-7 after two
    # steps, values O(1)). 1e-5 keeps a margin of ~25x; a wrong weight, config or scheduler moves the output by O(1).
    torch.testing.assert_close(_call(reloaded), latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_call(reloaded, "a photo of the digit 3", seed=1),
                               _call(pipe, "a photo of the digit 3", seed=1), rtol=1e-5, atol=1e-5)


def test_flux_guidance_embeds_override():
    pipe = tiny_pipeline("flux", guidance_embeds=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embeds
    assert _call(pipe, guidance_scale=3.5).shape == (1, 16, 16)


# --- the bundled trained models -----------------------------------------------------------------------------------

BUNDLED = {"bundled-sd3": "StableDiffusion3Pipeline", "bundled-flux": "FluxPipeline"}
MAX_FOLDER_BYTES = 25 * 2**20


@pytest.fixture(scope="module", params=sorted(BUNDLED))
def bundled_mmdit(request):
    from diffusers_ptq.harness.bundled import load_pipeline

    pipe = load_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def test_bundled_mmdit_loads_offline_as_its_pipeline(bundled_mmdit):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    name, pipe = bundled_mmdit
    assert type(pipe).__name__ == BUNDLED[name]
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae.config.latent_channels == 4
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in pipe.transformer.parameters())
    if name == "bundled-sd3":
        assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
        assert pipe.scheduler.config.shift == 3.0
    else:
        assert not pipe.transformer.config.guidance_embeds
        assert pipe.scheduler.config.use_dynamic_shifting


def test_bundled_mmdit_generates_images(bundled_mmdit):
    name, pipe = bundled_mmdit
    out = pipe(["a handwritten seven", "the digit 3"], num_inference_steps=2, height=32, width=32, output_type="pt",
               generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert out.shape == (2, 1, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    latents = pipe("a handwritten seven", num_inference_steps=2, height=32, width=32, output_type="latent").images
    assert latents.shape == ((1, 4, 8, 8) if name == "bundled-sd3" else (1, 16, 16))  # FLUX's are packed


def test_bundled_mmdit_samples_are_recognizable(bundled_mmdit):
    """One sample per digit at the reported settings (SD3: 28 steps, guidance 5 against ""; FLUX: 8 steps, no
    guidance), classified by the bundled MNIST classifier. Measured 100/100 and 95/100 on 100 samples
    (docs/bundled-mmdit.md); these 10 are all right on the machine that trained them, 8 leaves room for a sample
    that another CPU's rounding tips over."""
    from diffusers_ptq.harness.bundled import FLUX_SAMPLING, SD3_SAMPLING
    from diffusers_ptq.harness.classifier import load_classifier

    name, pipe = bundled_mmdit
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    settings = dict(SD3_SAMPLING, negative_prompt="") if name == "bundled-sd3" else FLUX_SAMPLING
    images = pipe([f"a handwritten {w}" for w in words], output_type="pt",
                  generator=[torch.Generator().manual_seed(100 + d) for d in range(10)], **settings).images
    with torch.no_grad():
        predicted = load_classifier()(images[:, :1].float()).argmax(1)
    assert int((predicted == torch.arange(10)).sum()) >= 8, predicted.tolist()


def test_bundled_mmdit_folders_are_small_safetensors_with_a_training_record():
    import json

    from diffusers_ptq.harness.bundled import BUNDLED_FLUX_DIR, BUNDLED_SD3_DIR

    for folder in (BUNDLED_SD3_DIR, BUNDLED_FLUX_DIR):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in files) < MAX_FOLDER_BYTES, folder
        weights = [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".safetensors"}]
        assert weights and all(p.suffix == ".safetensors" for p in weights)
        info = json.loads((folder / "training.json").read_text())
        assert {"seed", "transformer", "machine", "evaluation"} <= set(info)


def test_load_pipeline_reloads_a_saved_mmdit_folder(tmp_path):
    from diffusers_ptq.harness.bundled import load_pipeline

    pipe = tiny_pipeline("sd3")
    pipe.save_pretrained(tmp_path)
    reloaded = load_pipeline(tmp_path)
    assert type(reloaded).__name__ == "StableDiffusion3Pipeline"
    with pytest.raises(ValueError):
        load_pipeline(tmp_path, scheduler="ddim")
