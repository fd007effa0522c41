import copy
import itertools

import pytest
import torch
from conftest import randomize_modulation
from diffusers import DiTTransformer2DModel

from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.calibration import calibrate
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.groupbias import GroupBias, group_bias_bytes
from diffusers_ptq.methods import htg
from diffusers_ptq.methods.htg import HTG
from diffusers_ptq.models import adapter_for
from diffusers_ptq.modules import QuantLinear


def _brute_force(z, num_groups):
    """Every contiguous partition into num_groups groups; the one with the least within-group SSE."""
    best = None
    for cuts in itertools.combinations(range(1, len(z)), num_groups - 1):
        starts = [0, *cuts]
        cost = htg.within_group_sse(z, starts)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, starts)
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_groups", [1, 2, 3, 5])
def test_clustering_is_contiguous_and_optimal_matches_brute_force(seed, num_groups):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(8, 3, generator=gen).cumsum(0)  # a drifting shift, like z_t over the steps
    best_cost, best_starts = _brute_force(z, num_groups)
    assert htg.cluster_timesteps(z, num_groups, "optimal") == best_starts
    for linkage in ("ward", "centroid", "average"):
        starts = htg.cluster_timesteps(z, num_groups, linkage)
        assert len(starts) == num_groups and starts[0] == 0 and starts == sorted(set(starts))
        assert htg.within_group_sse(z, starts) >= best_cost - 1e-6  # greedy can only be worse than the optimum


def test_greedy_clustering_finds_well_separated_groups():
    z = torch.cat([torch.full((4, 2), 0.0), torch.full((3, 2), 5.0), torch.full((5, 2), -3.0)])
    z += 0.01 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    for linkage in htg.LINKAGES:
        assert htg.cluster_timesteps(z, 3, linkage) == [0, 4, 7]
    with pytest.raises(ValueError, match="num_groups"):
        htg.cluster_timesteps(z, 13)
    with pytest.raises(ValueError, match="linkage"):
        htg.cluster_timesteps(z, 2, "single")


def test_group_edges_map_timesteps_to_groups():
    timesteps = torch.tensor([981, 961, 941, 921, 901, 881])
    starts = [0, 2, 5]
    edges = htg.group_edges(timesteps, starts)
    torch.testing.assert_close(edges, torch.tensor([951.0, 891.0]))
    torch.testing.assert_close(htg.timestep_groups(timesteps, edges), htg.group_index(starts, 6))
    # another schedule: each timestep goes to the group of the nearest calibrated boundary
    torch.testing.assert_close(htg.timestep_groups(torch.tensor([999, 952, 950, 892, 890, 0]), edges),
                               torch.tensor([0, 0, 1, 1, 2, 2]))


def test_ema_and_scaling_match_direct_formulas():
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(6, 4, generator=gen) * 5
    alpha = 0.9
    closed_form = alpha ** 5 * values[0] + sum((1 - alpha) * alpha ** (5 - t) * values[t] for t in range(1, 6))
    torch.testing.assert_close(htg.ema_over_steps(values, alpha), closed_form)
    w = torch.rand(4, generator=gen) + 0.1
    m = closed_form
    torch.testing.assert_close(htg.scaling_vector(m, w, "printed"), m / w)
    torch.testing.assert_close(htg.scaling_vector(m, w, "migration", 0.3), m ** 0.3 / w ** 0.7)


def _stats(model, steps, samples=2):
    return calibrate(model, num_inference_steps=steps, num_samples=samples, batch_size=samples,
                     id2label={i: str(i) for i in range(10)}, progress=False)


def test_htg_vectors_match_direct_computation(tiny_transformer):
    randomize_modulation(tiny_transformer)
    stats = _stats(tiny_transformer, steps=6)
    method = HTG(num_groups=3, linkage="optimal")
    target = adapter_for(tiny_transformer).smoothing_targets(tiny_transformer)[0]
    layer = stats.layers[target.consumers[0]]
    weights = [tiny_transformer.get_submodule(c).weight.detach() for c in target.consumers]
    got = method.vectors(layer, weights, stats.timesteps)
    z = (layer.max + layer.min) / 2
    best_cost, best_starts = _brute_force(z, 3)
    assert got.starts == best_starts
    ends = best_starts[1:] + [6]
    shifts = torch.stack([z[a:b].mean(0) for a, b in zip(best_starts, ends)])
    torch.testing.assert_close(got.shifts, shifts)
    per_step = torch.cat([shifts[g].expand(b - a, -1) for g, (a, b) in enumerate(zip(best_starts, ends))])
    shifted = torch.maximum((layer.max - per_step).abs(), (layer.min - per_step).abs())
    m = shifted[0]
    for t in range(1, 6):
        m = 0.99 * m + 0.01 * shifted[t]
    w_sal = torch.cat(weights).abs().amax(0)
    torch.testing.assert_close(got.scale, m.sqrt() / w_sal.sqrt())
    assert got.edges.shape == (2,)


def _forward_steps(model, timesteps, labels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(len(timesteps), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    with torch.no_grad():
        return model(x, timestep=timesteps, class_labels=labels).sample


def _assert_htg_fold_exact(model, steps, groups, rtol=1e-4, atol=1e-4):
    stats = _stats(model, steps=steps)
    folded = copy.deepcopy(model)
    consumers = {c for t in adapter_for(folded).smoothing_targets(folded) for c in t.consumers}
    transforms = HTG(num_groups=groups).fold(folded, adapter_for(folded), dict(stats.layers), stats.timesteps, consumers)
    assert all(len(t.starts) == groups for t in transforms.values())
    assert any(float(t.shifts.abs().max()) > 1e-3 for t in transforms.values())
    # every calibrated timestep (so every group's bias is used), with CFG pairs of labels, in one batch
    timesteps = stats.timesteps.repeat_interleave(2)
    labels = torch.tensor([3, 1000] * steps)
    reference = _forward_steps(model, timesteps, labels)
    mixed = _forward_steps(folded, timesteps, labels)
    torch.testing.assert_close(mixed, reference, rtol=rtol, atol=atol)
    return folded


def test_htg_fold_without_quantization_reproduces_bundled_model_at_every_timestep(bundled_pipe):
    model = copy.deepcopy(bundled_pipe.transformer)
    _assert_htg_fold_exact(model, steps=6, groups=3)


def test_htg_fold_reproduces_dit_xl_shaped_block():
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=1000).eval()
    randomize_modulation(model, std=0.02)
    _assert_htg_fold_exact(model, steps=4, groups=4)


def test_mixed_timestep_batch_equals_one_by_one(bundled_pipe):
    model = copy.deepcopy(bundled_pipe.transformer)
    stats = _stats(model, steps=4)
    consumers = {c for t in adapter_for(model).smoothing_targets(model) for c in t.consumers}
    HTG(num_groups=4, scale=False).fold(model, adapter_for(model), dict(stats.layers), stats.timesteps, consumers)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    timesteps, labels = torch.tensor([980, 20, 500, 980]), torch.tensor([1, 2, 1000, 7])
    with torch.no_grad():
        batched = model(x, timestep=timesteps, class_labels=labels).sample
        single = torch.cat([model(x[i:i + 1], timestep=timesteps[i:i + 1], class_labels=labels[i:i + 1]).sample
                            for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [
    QuantConfig(weight_bits=8, act_bits=8, htg_shift=True, htg_scale=True, num_inference_steps=4, num_samples=2),
    QuantConfig(weight_bits=4, act_bits=8, htg_shift=True, htg_groups=4, num_inference_steps=4, num_samples=2),
    QuantConfig(weight_bits=4, act_bits=8, htg_scale=True, quantize_attention=True, num_inference_steps=3,
                num_samples=2),
    QuantConfig(weight_bits=4, act_bits=None, htg_shift=True, htg_scale=True, htg_groups=2, num_inference_steps=4,
                num_samples=2, act_range="mse"),
])
def test_quantize_with_htg(tiny_transformer, config):
    randomize_modulation(tiny_transformer)
    timesteps, labels = torch.tensor([999, 20]), torch.tensor([1, 1000])
    reference = _forward_steps(tiny_transformer, timesteps, labels)
    report = quantize_transformer(tiny_transformer, config, progress=False)
    assert len(report.smoothed_targets) == len(adapter_for(tiny_transformer).smoothing_targets(tiny_transformer))
    groups = config.htg_groups or 1 if config.htg_shift else 1
    assert all(len(starts) == groups for starts in report.timestep_groups.values())
    carriers = [m for m in tiny_transformer.modules() if getattr(m, "group_biases", None) is not None]
    assert bool(carriers) == config.htg_shift
    assert all(isinstance(m, QuantLinear) for m in carriers)
    assert (group_bias_bytes(tiny_transformer) > 0) == config.htg_shift
    assert all(isinstance(e, GroupBias) for m in carriers for e in m.group_biases)
    out = _forward_steps(tiny_transformer, timesteps, labels)
    assert (out - reference).pow(2).mean() < 0.05 * reference.pow(2).mean()


def test_htg_config_validation():
    with pytest.raises(ValueError, match="choose one smoothing method"):
        QuantConfig(htg_shift=True, smoothquant_alpha=0.5)
    with pytest.raises(ValueError, match="htg_linkage"):
        QuantConfig(htg_shift=True, htg_linkage="single")
    with pytest.raises(ValueError, match="htg_groups"):
        QuantConfig(htg_shift=True, htg_groups=0)
    assert QuantConfig(weight_bits=4, htg_shift=True, htg_scale=True).label == "W4A8 minmax+htg"
    assert QuantConfig(htg_shift=True, htg_groups=5).label == "W8A8 minmax+htg(shift) G5"
