import copy

import numpy as np
import pytest
import torch
from conftest import randomize_modulation
from diffusers import DiTTransformer2DModel
from scipy.stats import rankdata, spearmanr

from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.calibration import calibrate
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.methods import ptq4dit
from diffusers_ptq.methods.base import smooth
from diffusers_ptq.methods.ptq4dit import PTQ4DiT
from diffusers_ptq.models import adapter_for


def _forward(model, timesteps, labels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(len(timesteps), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    with torch.no_grad():
        return model(x, timestep=torch.tensor(timesteps), class_labels=torch.tensor(labels)).sample


def _all_targets(model):
    return {c for t in adapter_for(model).smoothing_targets(model) for c in t.consumers}


def _calibration_stats(model, steps=3, samples=4):
    return calibrate(model, num_inference_steps=steps, num_samples=samples, batch_size=samples,
                     id2label={i: str(i) for i in range(10)}, sample_rows=True, progress=False)


def test_spearman_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 6, (7, 40), generator=gen).float()  # many ties
    reference = torch.randint(0, 4, (40,), generator=gen).float()
    rho = ptq4dit.spearman_rho(rows, reference)
    expected = [spearmanr(r.numpy(), reference.numpy()).statistic for r in rows]
    np.testing.assert_allclose(rho.numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ptq4dit.average_ranks(rows).numpy(), rankdata(rows.numpy(), axis=1))
    assert float(ptq4dit.spearman_rho(torch.ones(1, 5), reference[:5])) == 0.0  # constant row: no ranking


def test_balancing_vector_matches_direct_recomputation(tiny_transformer):
    randomize_modulation(tiny_transformer)
    stats = _calibration_stats(tiny_transformer)
    method = PTQ4DiT(csb_alpha=0.5)
    for target in adapter_for(tiny_transformer).smoothing_targets(tiny_transformer):
        layer = stats.layers[target.consumers[0]]
        weights = [tiny_transformer.get_submodule(c).weight.detach() for c in target.consumers]
        got = method.vector(layer, weights)
        # Direct: numpy/scipy on the same statistics.
        w_sal = np.abs(np.concatenate([w.numpy() for w in weights])).max(axis=0)
        rows = layer.sample_absmax.numpy().reshape(-1, w_sal.size)
        assert rows.shape[0] == 3 * 8  # 3 steps x (4 conditional + 4 unconditional) rows
        rho = np.array([spearmanr(r, w_sal).statistic for r in rows])
        eta = np.exp(-rho) / np.exp(-rho).sum()
        act_sal = eta @ rows
        np.testing.assert_allclose(got.numpy(), np.sqrt(act_sal / w_sal), rtol=1e-5)
        # CSB without SSC: every row weighs the same; per-timestep rows: the [T, C] absmax.
        uniform = PTQ4DiT(csb_alpha=0.5, ssc=False).vector(layer, weights)
        np.testing.assert_allclose(uniform.numpy(), np.sqrt(rows.mean(axis=0) / w_sal), rtol=1e-5)
        per_step = PTQ4DiT(csb_alpha=0.3, ssc_rows="timestep").vector(layer, weights)
        steps = layer.absmax.numpy()
        rho_t = np.array([spearmanr(r, w_sal).statistic for r in steps])
        eta_t = np.exp(-rho_t) / np.exp(-rho_t).sum()
        np.testing.assert_allclose(per_step.numpy(), (eta_t @ steps / w_sal) ** 0.3, rtol=1e-5)


def test_ssc_weights_favour_anticorrelated_rows():
    w_sal = torch.arange(1.0, 9.0)
    rows = torch.stack([w_sal, w_sal.flip(0)])  # rho = +1, -1
    act_sal, eta = ptq4dit.activation_salience(rows, w_sal)
    assert eta[1] > eta[0] and float(eta.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(eta, torch.softmax(torch.tensor([-1.0, 1.0]), 0))


def _assert_folded_matches(model, stats, method, timesteps, labels, rtol, atol):
    reference = _forward(model, timesteps, labels)
    folded = copy.deepcopy(model)
    done = smooth(folded, dict(stats.layers), method.vector, _all_targets(folded))
    assert len(done) == len(adapter_for(model).smoothing_targets(model))
    assert any(float((s - 1).abs().max()) > 0.1 for s in done.values())  # the fold really changed the weights
    torch.testing.assert_close(_forward(folded, timesteps, labels), reference, rtol=rtol, atol=atol)


def test_ptq4dit_fold_without_quantization_reproduces_bundled_model(bundled_pipe):
    model = copy.deepcopy(bundled_pipe.transformer)
    stats = _calibration_stats(model, steps=3, samples=4)
    _assert_folded_matches(model, stats, PTQ4DiT(csb_alpha=0.5), [999, 500, 20, 500], [1, 7, 1000, 1000],
                           rtol=1e-4, atol=1e-4)


def test_ptq4dit_fold_without_quantization_reproduces_dit_xl_shaped_block():
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=1000).eval()
    randomize_modulation(model, std=0.02)
    stats = _calibration_stats(model, steps=2, samples=2)
    _assert_folded_matches(model, stats, PTQ4DiT(csb_alpha=0.5), [999, 20], [3, 1000], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [
    QuantConfig(weight_bits=8, act_bits=8, csb_alpha=0.5, num_inference_steps=2, num_samples=2),
    QuantConfig(weight_bits=4, act_bits=8, csb_alpha=0.5, ssc=False, num_inference_steps=2, num_samples=2),
    QuantConfig(weight_bits=4, act_bits=8, csb_alpha=0.5, ssc_rows="timestep", quantize_attention=True,
                num_inference_steps=2, num_samples=2),
])
def test_quantize_with_ptq4dit_folds_every_target(tiny_transformer, config):
    randomize_modulation(tiny_transformer)
    reference = _forward(tiny_transformer, [999, 20], [1, 1000])
    report = quantize_transformer(tiny_transformer, config, progress=False)
    assert len(report.smoothed_targets) == len(adapter_for(tiny_transformer).smoothing_targets(tiny_transformer))
    out = _forward(tiny_transformer, [999, 20], [1, 1000])
    assert torch.isfinite(out).all()
    assert (out - reference).pow(2).mean() < 0.05 * reference.pow(2).mean()


def test_ptq4dit_config_validation():
    with pytest.raises(ValueError, match="choose one smoothing method"):
        QuantConfig(csb_alpha=0.5, smoothquant_alpha=0.5)
    with pytest.raises(ValueError, match="ssc_rows"):
        QuantConfig(csb_alpha=0.5, ssc_rows="token")
    with pytest.raises(ValueError, match="csb_alpha"):
        QuantConfig(csb_alpha=1.5)
    assert QuantConfig(weight_bits=4, csb_alpha=0.5).label == "W4A8 minmax+csb+ssc"
    assert QuantConfig(csb_alpha=0.5, ssc=False).label == "W8A8 minmax+csb"
