"""Q-DiT: grouped 4-bit weights per layer, the group-size search under a bits budget, dynamic per-token activations,
QDiTConfig through diffusers, and checkpoints that keep per-layer group sizes and the dynamic flag bit for bit."""

import itertools
import json
import random

import pytest
import torch
from conftest import matmul_error_bound, reload_bit_exact
from diffusers import DiTPipeline

from diffusers_ptq import METHODS, QDiTConfig, config_from_dict, kernels, load_recipe, quantize
from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.config import QuantConfig, read_recipe
from diffusers_ptq.harness.bundled import BUNDLED_MODEL_DIR
from diffusers_ptq.kernels import kernel_problem, per_token_scale, weight_codes
from diffusers_ptq.methods import qdit
from diffusers_ptq.modules import QuantLinear, quantize_linear

FAST = dict(num_samples=2, num_inference_steps=2)
HAS_ONEDNN = kernels.onednn_available()



# --- grouped weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [8, 16, 32, None])
def test_grouped_weights_dequantize_to_a_direct_computation(group_size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    module = quantize_linear(linear, 4, None, group_size=group_size)
    w = linear.weight.detach().double()
    g = group_size or 64
    rows = w.reshape(24, 64 // g, g)
    lo, hi = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    codes = torch.clamp(torch.round((rows - lo) / scale), 0, 15)
    direct = (codes * scale + lo).reshape(24, 64)
    stored = weight_codes(module.weight).long().reshape(24, 64)
    # the stored codes are the direct ones (up to a tie flipped by float32 vs float64 rounding)
    assert (stored != codes.reshape(24, 64).long()).float().mean() < 0.002
    deq = module.dequantized_weight().double()
    assert torch.allclose(deq, direct, atol=1e-6 + float(scale.max()) * 1.001 * 0.0) or \
        float((deq - direct).abs().max()) <= float(scale.max()) + 1e-6
    # error bounded by half a step of each weight's own group
    half_step = (scale / 2).expand_as(rows).reshape(24, 64)
    assert bool(((deq - w).abs() <= half_step + 1e-6).all())
    assert module.weight_group_size == group_size


def test_per_layer_group_sizes_by_name_and_pattern(tiny_transformer):
    config = QuantConfig(weight_bits=4, act_bits=None, weight_group_size=16,
                         weight_group_sizes={"transformer_blocks.0.attn1.to_q": 8, "*.ff.net.2": 32,
                                             "*.attn1.to_*": None}, **FAST)
    report = quantize_transformer(tiny_transformer, config, progress=False)
    got = {n: m.weight_group_size for n, m in tiny_transformer.named_modules() if isinstance(m, QuantLinear)}
    assert got["transformer_blocks.0.attn1.to_q"] == 8  # exact name first
    assert got["transformer_blocks.1.attn1.to_q"] is None  # then the first matching pattern
    assert got["transformer_blocks.0.ff.net.2"] == 32
    assert got["transformer_blocks.0.ff.net.0.proj"] == 16  # default
    assert report.group_sizes == got
    assert config.label.startswith("W4A16g16gmix-")


def test_group_size_that_does_not_divide_names_the_layer(tiny_transformer):
    config = QuantConfig(weight_bits=4, weight_group_sizes={"*.ff.net.2": 48}, **FAST)
    with pytest.raises(ValueError, match=r"ff\.net\.2.*48.*in_features=128"):
        quantize_transformer(tiny_transformer, config, progress=False)


@pytest.mark.parametrize("kwargs, words", [
    (dict(weight_bits=8, weight_group_sizes={"*": 32}), ["weight_bits=4"]),
    (dict(weight_bits=4, weight_group_sizes={"*": 0}), ["weight_group_sizes"]),
    (dict(weight_bits=4, group_search_bits=4.0), ["group_search_bits", "above 4"]),
    (dict(weight_bits=4, group_search_bits=4.5, weight_group_size=32), ["group_search_bits", "set one"]),
    (dict(weight_bits=4, group_search_bits=4.5, group_search_proxy="fid"), ["group_search_proxy", "model"]),
    (dict(weight_bits=4, group_candidates=[32, 32]), ["group_candidates"]),
    (dict(act_bits=None, act_dynamic=True), ["act_dynamic", "act_bits=8"]),
])
def test_invalid_group_and_dynamic_options(kwargs, words):
    with pytest.raises(ValueError) as info:
        QuantConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


# --- bits and the search ----------------------------------------------------------------------------------------


def test_bits_count_what_quanto_stores():
    linear = torch.nn.Linear(256, 64)
    for g in (32, 128, None):
        module = quantize_linear(linear, 4, None, group_size=g)
        state = module.state_dict()
        assert state["weight._scale"].dtype == state["weight._shift"].dtype == torch.float32
        stored = (state["weight._data._data"].numel() * 8 + state["weight._scale"].numel() * 32
                  + state["weight._shift"].numel() * 32)
        assert qdit.weight_bits_of(64, 256, g) == stored
    assert qdit.bits_per_weight(64, 256, 128) == 4.5 and qdit.bits_per_weight(64, 256, None) == 4.25
    assert qdit.candidate_sizes(192, [32, 64, 128, 256, None]) == [32, 64, None]
    assert qdit.candidate_sizes(128, [32, 128, None]) == [32, None]  # a group of in_features is per channel


def _random_problem(seed, layers=7):
    rng = random.Random(seed)
    shapes, errors = {}, {}
    for i in range(layers):
        out, inp = rng.choice([16, 32, 48]), rng.choice([64, 128, 192, 256])
        shapes[f"l{i}"] = (out, inp)
        sizes = qdit.candidate_sizes(inp, [16, 32, 64, 128, None])
        base = rng.uniform(0.5, 5)
        errors[f"l{i}"] = {g: base * (1 + rng.uniform(0, 0.3)) * ((g or inp) / inp) ** rng.uniform(0.5, 1.5)
                           for g in sizes}
    return errors, shapes


def _brute_force(errors, shapes, budget):
    names = sorted(errors)
    best = None
    for combo in itertools.product(*(list(errors[n]) for n in names)):
        choice = dict(zip(names, combo))
        if qdit.average_bits(shapes, choice) <= budget + 1e-12:
            err = sum(errors[n][choice[n]] for n in names)
            best = err if best is None or err < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [4.3, 4.6, 5.2])
def test_search_respects_its_budget_is_deterministic_and_near_optimal(seed, budget):
    errors, shapes = _random_problem(seed)
    cheapest = qdit.average_bits(shapes, {n: None for n in shapes})
    if budget < cheapest:
        with pytest.raises(ValueError, match="below the cheapest"):
            qdit.search_group_sizes(errors, shapes, budget)
        return
    result = qdit.search_group_sizes(errors, shapes, budget)
    assert result.bits_per_weight <= budget
    assert result.bits_per_weight == pytest.approx(qdit.average_bits(shapes, result.group_sizes))
    assert result.proxy_error == pytest.approx(sum(errors[n][g] for n, g in result.group_sizes.items()))
    shuffled = dict(sorted(errors.items(), reverse=True))
    assert qdit.search_group_sizes(shuffled, shapes, budget).group_sizes == result.group_sizes  # deterministic
    optimum = _brute_force(errors, shapes, budget)
    assert optimum <= result.proxy_error <= optimum * 1.15  # the knapsack greedy: close to the exact optimum
    # more budget never hurts
    assert qdit.search_group_sizes(errors, shapes, budget + 0.5).proxy_error <= result.proxy_error


def test_evolutionary_search_is_seeded_and_within_budget():
    errors, shapes = _random_problem(3)
    options = {n: list(e) for n, e in errors.items()}

    def score(choice):
        return sum(errors[n][g] for n, g in choice.items())

    a = qdit.evolutionary_search(score, options, shapes, 4.6, population=6, generations=3, seed=1)
    b = qdit.evolutionary_search(score, options, shapes, 4.6, population=6, generations=3, seed=1)
    assert a == b
    assert all(qdit.average_bits(shapes, h["group_sizes"]) <= 4.6 for h in a[2])
    assert a[1] == min(h["score"] for h in a[2])


@pytest.mark.parametrize("proxy", ["model", "output", "relative", "weight"])
def test_engine_search_is_deterministic_and_within_budget(tiny_transformer, proxy):
    import copy

    # tiny model: 32 input channels (per channel = 6 bits per weight), ff.net.2 128
    config = QuantConfig(weight_bits=4, act_dynamic=True, group_search_bits=7.0, group_candidates=[8, 16, 32, None],
                         group_search_proxy=proxy, **FAST)
    twin = copy.deepcopy(tiny_transformer)
    report = quantize_transformer(tiny_transformer, config, progress=False)
    again = quantize_transformer(twin, config, progress=False)
    assert report.group_sizes == again.group_sizes
    shapes = {n: (m.out_features, m.in_features) for n, m in tiny_transformer.named_modules()
              if isinstance(m, QuantLinear)}
    assert qdit.average_bits(shapes, report.group_sizes) <= 7.0
    assert report.group_search["bits_per_weight"] <= 7.0 and report.search_seconds > 0
    assert len(set(report.group_sizes.values())) > 1  # a real mix on this budget
    for name, size in report.group_sizes.items():
        assert tiny_transformer.get_submodule(name).weight_group_size == size


def test_search_with_gptq_stores_the_searched_gptq_weights(tiny_transformer):
    import copy

    from diffusers_ptq.rounding import nearest_round

    original = copy.deepcopy(tiny_transformer)
    config = QuantConfig(weight_bits=4, act_dynamic=True, group_search_bits=7.0, group_candidates=[8, 16, None],
                         weight_rounding="gptq", group_search_proxy="output", **FAST)
    report = quantize_transformer(tiny_transformer, config, progress=False)
    shapes = {n: (m.out_features, m.in_features) for n, m in tiny_transformer.named_modules()
              if isinstance(m, QuantLinear)}
    assert qdit.average_bits(shapes, report.group_sizes) <= 7.0
    changed = 0
    for name, size in report.group_sizes.items():
        module = tiny_transformer.get_submodule(name)
        assert module.weight_group_size == size
        nearest = nearest_round(original.get_submodule(name).weight.detach(), 4, size)
        changed += int(not torch.equal(module.dequantized_weight(), nearest.weight))
    assert changed > 0  # GPTQ chose other codes than round-to-nearest, in the searched group sizes


# --- dynamic activations ----------------------------------------------------------------------------------------


def per_token_reference(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """y_t = s_t · Σ_g (scale_g · Σ q·code − shift_g · Σ q) + bias with s_t = max|x_t| / 127, q integer (int64)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    s = x2.abs().amax(1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(x.reshape(-1, x.shape[-1]).float() / s.float()), -128, 127).long()
    n, k = module.out_features, module.in_features
    w = module.weight
    if module.weight_qtype.bits == 8:
        codes, scale, shift = w._data.long(), w._scale.reshape(n, 1).double(), None
    else:
        codes = weight_codes(w).long().reshape(n, k)
        groups = k // (module.weight_group_size or k)
        scale, shift = w._scale.reshape(n, groups).double(), w._shift.reshape(n, groups).double()
    gsize = k // scale.shape[1]
    y = torch.zeros(q.shape[0], n, dtype=torch.float64)
    for g in range(scale.shape[1]):
        qg, cg = q[:, g * gsize:(g + 1) * gsize], codes[:, g * gsize:(g + 1) * gsize]
        y += scale[:, g] * (qg @ cg.T).double()
        if shift is not None:
            y -= shift[:, g] * qg.sum(1, keepdim=True).double()
    y = s * y
    if module.bias is not None:
        y += module.bias.double()
    return y.reshape(*x.shape[:-1], n)


DYNAMIC_LAYERS = {
    "w8": lambda lin: quantize_linear(lin, 8, None, act_dynamic=True),
    "w4": lambda lin: quantize_linear(lin, 4, None, act_dynamic=True),
    "w4-g32": lambda lin: quantize_linear(lin, 4, None, group_size=32, act_dynamic=True),
}


@pytest.mark.parametrize("layer", sorted(DYNAMIC_LAYERS))
@pytest.mark.parametrize("kernel", ["emulated", "onednn", "quanto"])
def test_dynamic_activations_equal_a_per_token_reference(layer, kernel):
    torch.manual_seed(0)
    module = DYNAMIC_LAYERS[layer](torch.nn.Linear(128, 40))
    problem = kernel_problem(module, kernel)
    if problem is not None:
        assert kernel == "quanto" or not HAS_ONEDNN or layer == "w4-g32"
        pytest.skip(problem)
    module.kernel = kernel
    x = torch.randn(2, 17, 128) * torch.logspace(-2, 1, 17).reshape(1, 17, 1)  # very different token ranges
    x[0, 3, :7] *= 40  # outliers: a token whose scale is set by a few channels
    x[1, 5] = 0  # an all-zero token
    with torch.no_grad():
        y = module(x).double()
    ref = per_token_reference(module, x)
    # float32 rounding of a K = 128 term sum in any order (conftest.matmul_error_bound): γ_{K+6} Σ|terms| + |bias|,
    # 6 roundings for the per-token scale (rounded, multiplied), the input's q·s, the weight's scale product and
    # multiply, the 4-bit shift term. |q·s_t| ≤ |x| + s_t / 2 (s_t = max|x_t| / 127); the 4-bit weight's terms
    # code·scale and shift have |.| ≤ |w| + 2 max|w| (shift = −min of the group, a dequantized value of the row).
    w = module.dequantized_weight().detach()
    w_terms = w.abs() + (2 * w.abs().amax(1, keepdim=True) if module.weight_qtype.bits == 4 else 0)
    bound = matmul_error_bound(x.abs() + x.abs().amax(-1, keepdim=True) / 254, w_terms, bias=module.bias,
                               extra_roundings=6)
    assert bool(((y - ref).abs() <= bound).all()), float(((y - ref).abs() / bound).max())
    assert torch.all(y[1, 5] == module.bias.double()) or float((y[1, 5] - module.bias.double()).abs().max()) < 1e-5


def test_per_token_scale_and_static_vs_dynamic_difference():
    x = torch.tensor([[1.0, -2.54], [0.0, 0.0], [127.0, 3.0]])
    assert torch.allclose(per_token_scale(x), torch.tensor([[2.54 / 127], [1.0], [1.0]]))
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    static, dynamic = quantize_linear(lin, 8, 0.05), quantize_linear(lin, 8, None, act_dynamic=True)
    assert dynamic.activation_qtype is not None and dynamic.act_dynamic and not static.act_dynamic
    assert "dynamic per token" in repr(dynamic)
    with pytest.raises(ValueError, match="input_scale=None"):
        quantize_linear(lin, 8, 0.05, act_dynamic=True)


def test_dynamic_mode_needs_no_calibration(tiny_transformer, monkeypatch):
    monkeypatch.setattr("diffusers_ptq.api.calibrate", lambda *a, **k: pytest.fail("calibrated"))
    report = quantize_transformer(tiny_transformer, QuantConfig(weight_bits=8, act_dynamic=True), progress=False)
    assert all(v["input_scale"] is None for v in report.layers.values())
    assert all(m.act_dynamic and m.activation_qtype is not None for m in tiny_transformer.modules()
               if isinstance(m, QuantLinear))


# --- QDiTConfig, diffusers, checkpoints -------------------------------------------------------------------------


def test_qdit_config_is_registered_and_round_trips():
    assert METHODS["qdit"] is QDiTConfig
    config = QDiTConfig(bits_per_weight=4.75, group_sizes=[32, 64, None], search_proxy="output", seed=3)
    data = json.loads(json.dumps(config.to_dict()))
    assert QDiTConfig.from_dict(data) == config == config_from_dict(data)
    engine = config.to_quant_config()
    assert (engine.weight_bits, engine.act_bits, engine.act_dynamic) == (4, 8, True)
    assert (engine.group_search_bits, engine.group_candidates, engine.group_search_proxy) == (4.75, [32, 64, None],
                                                                                               "output")
    fixed = QDiTConfig(weight_group_size=64).to_quant_config()  # fixed groups win over the search
    assert fixed.group_search_bits is None and fixed.weight_group_size == 64
    htg = QDiTConfig(shift=True, scale=True).to_quant_config()
    assert htg.htg_shift and htg.htg_scale and "htg" in htg.label
    with pytest.raises(ValueError, match="group_search_bits"):
        QDiTConfig(bits_per_weight=3.9)


def test_pipeline_with_qdit_config(monkeypatch):
    pipe = DiTPipeline.from_pretrained(BUNDLED_MODEL_DIR, quantization_config=QDiTConfig(
        bits_per_weight=4.6, search_proxy="output", **FAST))
    layers = [m for m in pipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.act_dynamic and m.weight_qtype.bits == 4 for m in layers)
    sizes = {m.weight_group_size for m in layers}
    assert len(sizes) > 1


@pytest.mark.parametrize("config", [
    QDiTConfig(bits_per_weight=7.0, group_sizes=[8, 16, 32, None], **FAST),
    QDiTConfig(bits_per_weight=None, weight_group_sizes={"*.ff.net.2": 32, "*.attn1.*": 8}, act_dynamic=False,
               **FAST),
    QDiTConfig(weight_bits=8, bits_per_weight=None, **FAST),
], ids=["searched-dynamic", "per-layer-static", "w8-dynamic"])
def test_checkpoint_keeps_group_sizes_and_dynamic_flag_bit_exactly(config, tiny_transformer, tmp_path, monkeypatch):
    quantize(tiny_transformer, config, progress=False)
    reloaded = reload_bit_exact(tiny_transformer, tmp_path / "q", monkeypatch)  # no calibration, no unpickling
    for name, module in tiny_transformer.named_modules():
        if isinstance(module, QuantLinear):
            again = reloaded.get_submodule(name)
            assert (again.weight_group_size, again.act_dynamic, again.kernel) == (
                module.weight_group_size, module.act_dynamic, module.kernel)
    assert reloaded.config.quantization_config == config
    from safetensors import safe_open

    from diffusers_ptq.serialization import METADATA_KEY

    with safe_open(str(tmp_path / "q" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        modules = json.loads(f.metadata()[METADATA_KEY])["modules"]
    for name, meta in modules.items():
        module = tiny_transformer.get_submodule(name)
        assert meta["weight_group_size"] == module.weight_group_size
        assert meta.get("act_dynamic", False) == module.act_dynamic  # written only when True


def test_old_metadata_without_the_dynamic_flag_loads_as_static():
    from diffusers_ptq.serialization import _build_quant_linear

    lin = torch.nn.Linear(32, 8)
    module = quantize_linear(lin, 8, 0.1)
    meta = {"in_features": 32, "out_features": 8, "bias": True, "weight_bits": 8, "weight_group_size": None,
            "act_bits": 8, "output_quantization": False}
    rebuilt = _build_quant_linear(lin, meta, module.state_dict())
    assert rebuilt.act_dynamic is False


@pytest.mark.parametrize("name", ["qdit-dit-xl-2-256-w4a8", "qdit-dit-xl-2-512-w4a8"])
def test_qdit_recipes_load(name):
    recipe = read_recipe(name)
    config = load_recipe(name)
    assert recipe["method"] == "qdit" and isinstance(config, QDiTConfig)
    engine = config.to_quant_config()
    assert engine.weight_bits == 4 and engine.act_dynamic and engine.group_search_bits is not None
