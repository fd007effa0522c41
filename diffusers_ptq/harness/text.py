"""Tiny, offline-built text stacks for the SD3 / FLUX.1 / PixArt families (issue #19): tokenizers over a small word
vocabulary for digit prompts, seeded random-init text encoders, and complete random-weight tiny pipelines for tests.

Nothing here downloads anything: the tokenizers are built in memory from the word list below (CLIP: byte-pair
merges over whole words with the `</w>` suffix, trained here deterministically; T5: a Unigram model over the same
words with `</s>`, `<pad>`, `<unk>`), and the encoders are `transformers` models at toy size with seeded weights.

    >>> from diffusers_ptq.harness.text import tiny_pipeline
    >>> pipe = tiny_pipeline("sd3")
    >>> pipe("a handwritten seven", num_inference_steps=2, height=32, width=32, output_type="latent").images.shape
    torch.Size([1, 4, 8, 8])

tiny_pipeline("pixart") is a PixArtSigmaPipeline; call it with use_resolution_binning=False (its default bins the
size to a 256..2048-pixel table and rejects a transformer sample_size of 8).

The T5 encoders are *position-free*: their relative attention bias is zeroed (`t5_positions=False`, the default), so
the encoder is a bag of words. Then every `<pad>` position gets the same output, which FLUX training relies on to
collapse the 512 padded positions into one (exactly, see scripts/train_bundled_mmdit.py); digit prompts lose nothing.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(i) for i in range(10))
COMMON_WORDS = (
    "a", "an", "the", "of", "photo", "handwritten", "digit", "number", "numeral", "drawing", "picture", "image",
    "white", "black", "gray", "grey", "on", "in", "with", "background", "written", "by", "hand", "small", "large",
    "big", "bold", "thin", "thick", "clean", "neat", "messy", "sketch", "scan", "scanned", "mnist", "style",
    "character", "single", "centered", "simple", "pen", "ink", "and", "is", "this", "it", "show", "shows",
    "showing", "figure", "sample", "dark", "light", "blurry", "sharp", "close", "up", "old", "new",
)
WORDS = DIGIT_WORDS + NUMERALS + COMMON_WORDS
ALPHABET = tuple("abcdefghijklmnopqrstuvwxyz0123456789")

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
FAMILIES = ("sd3", "flux", "pixart")


# --- tokenizers ---------------------------------------------------------------------------------------------------


def _merge(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Byte-pair merges learned over WORDS (each word once) until every word is one token, `</w>`-suffixed as CLIP.

    Deterministic: the most frequent pair wins, ties broken by the pair's text. The vocabulary holds every letter
    and digit both inside and at the end of a word (so any lowercase word tokenizes into pieces), every merge
    product, and CLIP's two special tokens last (ids len-2 and len-1, as in CLIP's own vocabulary).
    """
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in WORDS if len(w) > 1}
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(p for s in seqs.values() for p in zip(s, s[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        seqs = {w: _merge(s, pair) for w, s in seqs.items()}
        seqs = {w: s for w, s in seqs.items() if len(s) > 1}
    tokens = list(ALPHABET) + [c + "</w>" for c in ALPHABET] + ["".join(p) for p in merges]
    tokens = list(dict.fromkeys(tokens)) + [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, tuple(merges)


def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """A transformers `CLIPTokenizer` (the tokenizers-backed class SD3/FLUX pipelines take) over WORDS.

    Lowercases, splits letters/digits as CLIP does; known words are one token each, other lowercase words split
    into letters, anything else maps to the unknown token (`<|endoftext|>`, CLIP's default) — never an error.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces: `<pad>`=0, `</s>`=1, `<unk>`=2, then "▁word" for every word (score -1), and single letters
    (both cases) and digits (score -20, the fallback for unknown words). T5 does not lowercase (a normalizer set on
    the backend is not kept by save_pretrained in transformers 5): prompts are meant lowercase, as in training."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -30.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    singles = set(p for p, _ in pieces)
    pieces += [(c, -20.0) for c in ALPHABET + tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ") if c not in singles]
    return pieces


def t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """A transformers `T5TokenizerFast` (Unigram over WORDS, `</s>` appended, `<pad>` = 0), 512 tokens at most."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(), extra_ids=0, model_max_length=model_max_length)


# --- text encoders ------------------------------------------------------------------------------------------------


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval().requires_grad_(False)


def clip_config(tokenizer, width: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=2, projection_dim=width,
                          max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def t5_config(tokenizer, width: int = 32):
    from transformers import T5Config

    return T5Config(vocab_size=len(tokenizer), d_model=width, num_layers=2, num_heads=2, d_ff=2 * width,
                    d_kv=width // 2, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id)


def _t5_encoder(tokenizer, seed: int, width: int, positions: bool):
    from transformers import T5EncoderModel

    model = _seeded(seed, lambda: T5EncoderModel(t5_config(tokenizer, width)))
    if not positions:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "relative_attention_bias" in name:
                    p.zero_()
    return model


def text_components(family: str, seed: int = 0, width: int = 32, t5_positions: bool = False) -> dict:
    """Seeded random-init text encoders and their tokenizers, as pipeline components of `family`.

    "sd3": two `CLIPTextModelWithProjection` (seeds seed, seed+1) and two CLIP tokenizers; text_encoder_3 and
           tokenizer_3 are None (StableDiffusion3Pipeline then uses zeros for the T5 part).
    "flux": `CLIPTextModel` + CLIP tokenizer, `T5EncoderModel` (seed+1) + T5 tokenizer.
    "pixart": `T5EncoderModel` + T5 tokenizer.
    Every encoder: `width` hidden, 2 layers, 2 heads (CLIP projection_dim = width; T5 d_ff 2·width, d_kv width/2).
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family == "sd3":
        tok = clip_tokenizer()
        return dict(
            tokenizer=tok, tokenizer_2=clip_tokenizer(),
            text_encoder=_seeded(seed, lambda: CLIPTextModelWithProjection(clip_config(tok, width))),
            text_encoder_2=_seeded(seed + 1, lambda: CLIPTextModelWithProjection(clip_config(tok, width))),
            text_encoder_3=None, tokenizer_3=None,
        )
    if family == "flux":
        tok, tok2 = clip_tokenizer(), t5_tokenizer()
        return dict(tokenizer=tok, text_encoder=_seeded(seed, lambda: CLIPTextModel(clip_config(tok, width))),
                    tokenizer_2=tok2, text_encoder_2=_t5_encoder(tok2, seed + 1, width, t5_positions))
    if family == "pixart":
        tok = t5_tokenizer()
        return dict(tokenizer=tok, text_encoder=_t5_encoder(tok, seed, width, t5_positions))
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


# --- tiny pipelines -----------------------------------------------------------------------------------------------

# FLUX.1-dev's scheduler config (dynamic shifting by image sequence length).
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# PixArt-Sigma's released scheduler_config.json (DPMSolverMultistepScheduler, DDPM linear betas, epsilon prediction).
PIXART_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                        solver_type="midpoint", lower_order_final=True, thresholding=False, sample_max_value=1.0,
                        dynamic_thresholding_ratio=0.995, timestep_spacing="linspace", steps_offset=0,
                        use_karras_sigmas=False, use_lu_lambdas=False, euler_at_final=False, variance_type=None)


def tiny_vae(seed: int = 0, channels: int = 3):
    """A random AutoencoderKL: 3 blocks (4x down), 4 latent channels, shift_factor 0 (SD3/FLUX read it)."""
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=1.0, shift_factor=0.0))


def tiny_transformer(family: str, seed: int = 0, **overrides):
    """A seeded random transformer of `family` at toy size (32x32 images -> 4x8x8 latents), overrides to its config.

    "sd3": SD3Transformer2DModel, 2 joint blocks, 2 heads x 8; "flux": FluxTransformer2DModel, 1 double + 2 single
    blocks, 2 heads x 8; "pixart": PixArtTransformer2DModel, 2 blocks, 2 heads x 8, patch 2, learned-sigma output
    (out_channels 8 = epsilon + variance, as PixArt-alpha/Sigma), caption_channels 32 (the T5 width) projected to
    the 16-wide cross-attention, adaLN-single, no resolution/aspect-ratio micro-conditions.
    """
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    if family == "sd3":
        cfg = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                   pooled_projection_dim=64, pos_embed_max_size=16)
        cls = SD3Transformer2DModel
    elif family == "flux":
        cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                   axes_dims_rope=(2, 2, 4))
        cls = FluxTransformer2DModel
    elif family == "pixart":
        cfg = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, caption_channels=32, cross_attention_dim=16, norm_type="ada_norm_single",
                   use_additional_conditions=False, num_embeds_ada_norm=1000)
        cls = PixArtTransformer2DModel
    else:
        raise ValueError(f"tiny_transformer builds one of {FAMILIES}, got {family!r}")
    cfg.update(overrides)
    return _seeded(seed, lambda: cls(**cfg))


def tiny_pipeline(family: str, seed: int = 0, **transformer_overrides):
    """A complete random-weight StableDiffusion3Pipeline ("sd3"), FluxPipeline ("flux") or PixArtSigmaPipeline
    ("pixart"), CPU float32, for tests.

    32x32 images -> 4x8x8 latents; SD3: 16 patch tokens of width 16, CLIP widths 32+32 (joint_attention_dim 64,
    pooled 64); FLUX: 16 packed tokens of 16 channels, CLIP pooled 32 + T5 width 32; PixArt: 16 patch tokens of
    width 16, T5 width 32, DPMSolverMultistepScheduler with PixArt-Sigma's config (PIXART_SCHEDULER).
    transformer_overrides go to the transformer's constructor (e.g. guidance_embeds=True for FLUX.1-dev style).

    PixArtSigmaPipeline bins the requested size to its 256..2048-pixel aspect-ratio table by default and rejects a
    transformer sample_size outside {32, 64, 128, 256}: call the tiny (and bundled) PixArt pipeline with
    use_resolution_binning=False.
    """
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        PixArtSigmaPipeline,
        StableDiffusion3Pipeline,
    )

    if family == "sd3":
        return StableDiffusion3Pipeline(
            transformer=tiny_transformer("sd3", seed, **transformer_overrides), vae=tiny_vae(seed + 10),
            scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), **text_components("sd3", seed + 20))
    if family == "flux":
        return FluxPipeline(
            transformer=tiny_transformer("flux", seed, **transformer_overrides), vae=tiny_vae(seed + 10),
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), **text_components("flux", seed + 20))
    if family == "pixart":
        return PixArtSigmaPipeline(
            transformer=tiny_transformer("pixart", seed, **transformer_overrides), vae=tiny_vae(seed + 10),
            scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER), **text_components("pixart", seed + 20))
    raise ValueError(f"tiny_pipeline builds one of {FAMILIES}, got {family!r}")
