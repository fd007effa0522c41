import json

import torch

from diffusers_ptq.harness.bundled import BUNDLED_MODEL_DIR, load_pipeline
from diffusers_ptq.harness.classifier import CLASSIFIER_DIR, load_classifier, load_reference_statistics
from diffusers_ptq.harness.data import load_mnist, to_model_range
from diffusers_ptq.harness.evaluation import evaluate, feature_statistics, frechet_distance, generate_images


def test_bundled_pipeline_is_a_real_dit_pipeline(bundled_pipe):
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    assert isinstance(bundled_pipe, DiTPipeline)
    assert isinstance(bundled_pipe.transformer, DiTTransformer2DModel)
    assert isinstance(bundled_pipe.vae, AutoencoderKL)
    cfg = bundled_pipe.transformer.config
    assert (cfg.patch_size, cfg.norm_type, cfg.num_embeds_ada_norm) == (2, "ada_norm_zero", 1000)
    assert bundled_pipe.scheduler.config.num_train_timesteps == 1000
    assert bundled_pipe.transformer.dtype == torch.float32
    assert bundled_pipe.get_label_ids(["seven", "zero"]) == [7, 0]


def test_id2label_survives_save_and_reload(bundled_pipe, tmp_path):
    bundled_pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["id2label"]["3"] == "three"
    reloaded = load_pipeline(tmp_path)
    assert reloaded.labels == bundled_pipe.labels and len(reloaded.labels) == 10
    for (name, a), b in zip(bundled_pipe.transformer.state_dict().items(), reloaded.transformer.state_dict().values()):
        assert torch.equal(a, b), name


def test_shipped_files_are_safetensors_only():
    files = [p for p in list(BUNDLED_MODEL_DIR.rglob("*")) + list(CLASSIFIER_DIR.rglob("*")) if p.is_file()]
    weights = [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".safetensors"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


def test_classifier_accuracy_and_reference_statistics():
    x, y = load_mnist("test")
    images = (to_model_range(x) + 1) / 2
    clf = load_classifier()
    with torch.no_grad():
        feats = torch.cat([clf.features(images[i : i + 2000]) for i in range(0, len(images), 2000)])
        accuracy = float((clf.head(feats).argmax(1) == y).float().mean())
    assert accuracy > 0.98
    ref = load_reference_statistics()
    mu, sigma = feature_statistics(feats)
    assert frechet_distance(mu, sigma, ref["mu"], ref["sigma"]) < 1e-6 * float(sigma.trace())


def test_full_precision_samples_are_recognizable(bundled_pipe):
    labels = [d for d in range(10) for _ in range(5)]
    images = generate_images(bundled_pipe, labels, seed=0, num_inference_steps=20, progress=False)
    assert images.shape == (50, 1, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    with torch.no_grad():
        predicted = load_classifier()(images).argmax(1)
    assert float((predicted == torch.tensor(labels)).float().mean()) >= 0.9


def test_paired_metrics_of_identical_pipelines(bundled_pipe):
    result = evaluate(bundled_pipe, bundled_pipe, num_samples=20, seeds=[0, 1], num_inference_steps=5, progress=False)
    m = result["metrics"]
    assert m["relative_mse"]["max"] == 0.0 and m["psnr_db"]["mean"] == float("inf")
    assert abs(m["classifier_fid_to_reference"]["max"]) < 1e-3  # 20 samples: rank-deficient covariances
    assert len(result["per_seed"]) == 2 and result["per_seed"][0]["classifier_fid"] != result["per_seed"][1]["classifier_fid"]


def test_paired_metrics_see_a_perturbation(bundled_pipe):
    perturbed = load_pipeline("bundled")
    with torch.no_grad():
        w = perturbed.transformer.transformer_blocks[0].attn1.to_q.weight
        w.add_(0.2 * w.abs().max() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    result = evaluate(perturbed, bundled_pipe, num_samples=20, seeds=[0], num_inference_steps=5, progress=False)
    assert 0 < result["metrics"]["relative_mse"]["mean"] < 1
    assert 5 < result["metrics"]["psnr_db"]["mean"] < 80


def test_planted_outliers_keep_the_float_function_and_create_outliers(bundled_pipe):
    from diffusers_ptq.harness.bench import outlier_summary
    from diffusers_ptq.harness.bundled import OUTLIER_MODEL

    planted = load_pipeline(OUTLIER_MODEL)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(timestep=torch.tensor([999, 400, 400, 10]), class_labels=torch.tensor([3, 7, 1000, 1000]))
    with torch.no_grad():
        ref = bundled_pipe.transformer(x, **kwargs).sample
        out = planted.transformer(x, **kwargs).sample
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    assert not torch.equal(planted.transformer.transformer_blocks[0].attn1.to_q.weight,
                           bundled_pipe.transformer.transformer_blocks[0].attn1.to_q.weight)
    common = dict(num_samples=2, num_inference_steps=3, progress=False)
    before = outlier_summary(bundled_pipe.transformer, **common)["ff.net.0.proj"]["max_over_median_mean"]
    after = outlier_summary(planted.transformer, **common)["ff.net.0.proj"]["max_over_median_mean"]
    assert after > 4 * before
