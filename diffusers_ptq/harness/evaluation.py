"""Quality metrics: paired fidelity to a reference pipeline first, distance to real data second.

- `psnr`, `relative_mse`: a pipeline's images against the reference pipeline's images from the same noise.
- `frechet_distance` on classifier features: "classifier-FID" to held-out real MNIST, and the paired
  Fréchet distance between quantized and full-precision samples.
- `classifier_accuracy`: how often a generated image is classified as its conditioning label.
- `inception_metrics`: FID/IS with torchmetrics for real (ImageNet) models, given local Inception weights.

`evaluate` runs all of this for any DiTPipeline and returns (and optionally writes) a JSON-safe dict.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

from diffusers_ptq.models.dit import balanced_labels, model_class_ids
from diffusers_ptq.sampling import sample_seeds

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------- pure metrics


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean over images of the per-image PSNR in dB (images in [0, data_range]); inf when identical."""
    if images.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(images.shape)} vs reference {tuple(reference.shape)}")
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    values = 10 * torch.log10(data_range**2 / mse)
    return float(values.mean())


def relative_mse(images: torch.Tensor, reference: torch.Tensor) -> float:
    """||images − reference||² / ||reference||² over the whole set."""
    if images.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(images.shape)} vs reference {tuple(reference.shape)}")
    return float((images.double() - reference.double()).pow(2).sum() / reference.double().pow(2).sum())


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of [N, D] features, in float64."""
    feats = features.double()
    mu = feats.mean(0)
    centered = feats - mu
    sigma = centered.T @ centered / (len(feats) - 1)
    return mu, sigma


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |Δμ|² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)."""
    m1, m2 = mu1.double().numpy(), mu2.double().numpy()
    s1, s2 = sigma1.double().numpy(), sigma2.double().numpy()
    with warnings.catch_warnings():  # rank-deficient covariances (few samples, dead ReLU features) are expected
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularize as pytorch-fid does
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def classifier_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


# ----------------------------------------------------------------------------- sampling


DIGIT_PROMPT = "a handwritten {}"  # how the bundled text-to-image models are asked for digit d (harness/text.py)


def is_text_to_image(pipe) -> bool:
    """A prompt-conditioned pipeline (SD3, FLUX, PixArt): it encodes prompts."""
    return hasattr(pipe, "encode_prompt")


def pixart_call(pipe) -> dict:
    """What a PixArt pipeline's call needs at the bundled models' 32 px: no aspect-ratio binning (its tables start at
    256 px) and captions as given (cleaning needs bs4/ftfy); {} for other pipelines."""
    parameters = inspect.signature(pipe.__call__).parameters
    return {"use_resolution_binning": False, "clean_caption": False} if "use_resolution_binning" in parameters else {}


def digit_prompts(labels: Sequence[int]) -> list[str]:
    """The prompts that ask the bundled text-to-image models for these digits ("a handwritten seven", ...)."""
    from diffusers_ptq.harness.text import DIGIT_WORDS

    return [DIGIT_PROMPT.format(DIGIT_WORDS[int(d)]) for d in labels]


def class_ids_of(pipe) -> list[int]:
    """The class ids a pipeline can be conditioned on: those of its id2label if it has one, else all of the model's;
    a text-to-image pipeline: the ten digits its prompts name (digit_prompts)."""
    if is_text_to_image(pipe):
        return list(range(10))
    labels = getattr(pipe, "labels", None)
    return sorted(set(labels.values())) if labels else model_class_ids(pipe.transformer)


@torch.no_grad()
def generate_images(
    pipe,
    class_labels: Sequence[int],
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    batch_size: int = 100,
    progress: bool = True,
) -> torch.Tensor:
    """Run a DiTPipeline (conditioned on `class_labels`) or a text-to-image pipeline (on `digit_prompts` of them,
    at its VAE's sample size) and return [N, C, H, W] float images in [0, 1].

    Each sample gets its own generator (`sample_seeds`), so two pipelines given the same seed start from the
    same noise; the global RNG is also seeded (DiTPipeline does not pass a generator to the scheduler step).
    """
    torch.manual_seed(seed)
    seeds = sample_seeds(seed, len(class_labels))
    device = pipe._execution_device
    was_disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    images = []
    try:
        for start in tqdm(range(0, len(class_labels), batch_size), desc="sampling", disable=not progress):
            labels = list(class_labels[start : start + batch_size])
            gens = [torch.Generator(device).manual_seed(s) for s in seeds[start : start + batch_size]]
            if is_text_to_image(pipe):
                size = pipe.vae.config.sample_size
                condition = dict(prompt=digit_prompts(labels), height=size, width=size, **pixart_call(pipe))
            else:
                condition = dict(class_labels=labels)
            out = pipe(**condition, generator=gens, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, output_type="pt")
            images.append(out.images.float().cpu())
    finally:
        pipe.set_progress_bar_config(disable=was_disabled)
    return torch.cat(images)


# ----------------------------------------------------------------------------- evaluation


def score_images(images: torch.Tensor, labels: Sequence[int], reference_images: torch.Tensor | None = None,
                 use_classifier: bool = True) -> dict:
    """Metrics of generated images: classifier accuracy and classifier-FID to real MNIST (if use_classifier),
    and with `reference_images` (the reference pipeline's samples from the same noise) PSNR, relative MSE and,
    with the classifier, the paired Fréchet distance."""
    row: dict = {}
    feats = None
    if use_classifier:
        from diffusers_ptq.harness.classifier import load_classifier, load_reference_statistics

        classifier, real = load_classifier(), load_reference_statistics()
        feats = classifier_features(classifier, images)
        mu, sigma = feature_statistics(feats)
        row["classifier_accuracy"] = classifier_accuracy(classifier.head(feats), torch.tensor(list(labels)))
        row["classifier_fid"] = frechet_distance(mu, sigma, real["mu"], real["sigma"])
    if reference_images is not None:
        row["psnr_db"] = psnr(images, reference_images)
        row["relative_mse"] = relative_mse(images, reference_images)
        if use_classifier:
            ref_feats = classifier_features(classifier, reference_images)
            row["classifier_fid_to_reference"] = frechet_distance(*feature_statistics(feats),
                                                                  *feature_statistics(ref_feats))
    return row


@torch.no_grad()
def classifier_features(classifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([classifier.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max())}


def uses_mnist_classifier(pipe) -> bool:
    """True for pipelines that draw 1-channel 32x32 images: the bundled model's family."""
    cfg = pipe.vae.config
    return cfg.out_channels == 1 and cfg.sample_size == 32


def evaluate(
    pipe,
    reference_pipe=None,
    *,
    num_samples: int = 1000,
    seeds: Sequence[int] = (0,),
    num_inference_steps: int = 50,
    guidance_scale: float = 1.5,
    batch_size: int = 100,
    inception_weights: str | os.PathLike | None = None,
    reference_images: torch.Tensor | None = None,
    output: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a DiTPipeline, optionally against a reference (full-precision) pipeline, over several seeds.

    Class labels are balanced over the pipeline's classes. For the bundled MNIST model: classifier accuracy and
    classifier-FID against the 10k test images; with `reference_pipe`: PSNR, relative MSE and the Fréchet
    distance between the two pipelines' samples drawn from the same noise. For other models, pass
    `inception_weights` (a local FID Inception checkpoint) and `reference_images` for FID/IS. Every metric is
    reported per seed and as mean/std/min/max over seeds. Writes JSON to `output` if given.
    """
    use_classifier = uses_mnist_classifier(pipe)
    if not use_classifier and inception_weights is None:
        logger.warning("No MNIST classifier applies to this pipeline and no inception_weights were given: "
                       "only paired metrics (needs reference_pipe) are computed.")
    labels = balanced_labels(class_ids_of(pipe), num_samples)
    per_seed = []
    t0 = time.time()
    for seed in seeds:
        kwargs = dict(seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      batch_size=batch_size, progress=progress)
        t_sample = time.time()
        images = generate_images(pipe, labels, **kwargs)
        row: dict = {"seed": seed, "sampling_seconds": time.time() - t_sample}
        ref_images = generate_images(reference_pipe, labels, **kwargs) if reference_pipe is not None else None
        row.update(score_images(images, labels, ref_images, use_classifier))
        if inception_weights is not None:
            row.update(inception_metrics(images, reference_images, inception_weights))
        per_seed.append(row)
    metric_names = [k for k in per_seed[0] if k != "seed"]
    result = {
        "num_samples": num_samples,
        "seeds": list(seeds),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "scheduler": type(pipe.scheduler).__name__,
        "metrics": {name: _summary([row[name] for row in per_seed]) for name in metric_names},
        "per_seed": per_seed,
        "total_seconds": time.time() - t0,
    }
    if output is not None:
        write_json(result, output)
    return result


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- real models


def inception_metrics(images: torch.Tensor, reference_images: torch.Tensor | None, weights_path) -> dict:
    """FID (against `reference_images`) and Inception Score with torchmetrics, from a local weights file.

    Needs `pip install "diffusers-ptq[inception]"` (torchmetrics with torch-fidelity and a torchvision that matches
    your torch) and the FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`) on disk: nothing is
    downloaded. Images are float in [0, 1], [N, 3, H, W].
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {weights_path}: download pt_inception-2015-12-05-6726825d.pth once "
            "(torch-fidelity's FID Inception) and pass its path; this library never downloads it itself."
        )
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
        from torchmetrics.image.inception import InceptionScore
    except ImportError as err:
        raise ImportError('FID/IS need torchmetrics: pip install "diffusers-ptq[inception]"') from err
    if images.shape[1] != 3:
        raise ValueError(f"Inception metrics need RGB images [N, 3, H, W], got {tuple(images.shape)}")
    result = {}
    extractor = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                   feature_extractor_weights_path=str(weights_path))
    inception_score = InceptionScore(feature=extractor, normalize=True)
    inception_score.update(images)
    is_mean, is_std = inception_score.compute()
    result.update(inception_score=float(is_mean), inception_score_std=float(is_std))
    if reference_images is not None:
        fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights_path))
        fid.update(reference_images, real=True)
        fid.update(images, real=False)
        result["fid"] = float(fid.compute())
    if not math.isfinite(result["inception_score"]):
        logger.warning("Inception Score is not finite: too few images?")
    return result
