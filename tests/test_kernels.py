"""Kernels: every kernel equals an integer reference (int64 accumulators times the scales) to float rounding, on
random inputs and on adversarial ones that saturate int16 pair sums; a model gives the same output whichever
exact kernel runs it; forcing a kernel that cannot run a layer exactly is a clear error."""

import pytest
import torch
from conftest import gamma

from diffusers_ptq import kernels
from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.kernels import KernelError, QuantizedInput, available_kernels, choose_kernel, kernel_problem
from diffusers_ptq.modules import QuantLinear, quantize_linear, set_kernel
from diffusers_ptq.rounding import RoundedWeight, nearest_round

HAS_ONEDNN = kernels.onednn_available()
needs_onednn = pytest.mark.skipif(not HAS_ONEDNN, reason="torch.ops.onednn.qlinear_pointwise unavailable (non-x86)")


def _codes(module: QuantLinear):
    """(integer codes [out, in] int64, scale [out, G], shift [out, G] or None) from the quanto weight (G groups)."""
    w = module.weight
    n, k = module.out_features, module.in_features
    if module.weight_qtype.bits == 8:
        return w._data.long(), w._scale.reshape(n, 1).double(), None
    groups = k // (module.weight_group_size or k)
    codes = kernels.weight_codes(w).long().reshape(n, k)  # grouped layout [n * groups, group] is row-major in [n, k]
    return codes, w._scale.reshape(n, groups).double(), w._shift.reshape(n, groups).double()


def integer_reference(module: QuantLinear, x: torch.Tensor, reciprocal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """y = s_x Σ_g (scale_og Σ_{i∈g} q_i·code_oi − shift_og Σ_{i∈g} q_i) + bias_o: int64 accumulators per group
    times the scales in float64; and a bound on the size of the terms. q = round(x / s), or round(x · (1/s)) with
    `reciprocal` (PyTorch 2 export's quantize_per_tensor)."""
    s = module.input_scale.double()
    scaled = x.float() * (1.0 / float(module.input_scale)) if reciprocal else x.float() / module.input_scale.float()
    q = torch.clamp(torch.round(scaled), -128, 127).long().reshape(-1, x.shape[-1])
    codes, scale, shift = _codes(module)
    groups = scale.shape[1]
    gsize = module.in_features // groups
    y = torch.zeros(q.shape[0], module.out_features, dtype=torch.float64)
    bound = torch.zeros_like(y)
    for g in range(groups):
        qg, cg = q[:, g * gsize:(g + 1) * gsize], codes[:, g * gsize:(g + 1) * gsize]
        y += s * scale[:, g] * (qg @ cg.T).double()  # int64 accumulation: exact
        bound += s * scale[:, g] * (qg.abs() @ cg.abs().T).double()
        if shift is not None:
            y -= s * shift[:, g] * qg.sum(1, keepdim=True).double()
            bound += s * shift[:, g].abs() * qg.abs().sum(1, keepdim=True).double()
    if module.bias is not None:
        y = y + module.bias.double()
        bound = bound + module.bias.double().abs()
    shape = (*x.shape[:-1], module.out_features)
    return y.reshape(shape), bound.reshape(shape)


def float_rounding_bound(terms: int, bound: torch.Tensor) -> torch.Tensor:
    """A-priori bound on the float32 error of a result made of `terms` products summed in any order, plus a few
    more roundings: γ_n·Σ|terms| (conftest.gamma; Higham §3.1). n = terms + 4 covers the rounding of the inputs
    (x/s rounded to an integer is exact; q·s and code·scale are each rounded once), the scale multiply of the integer
    result, the 4-bit shift term and the bias add; `bound` is Σ|terms| (+|bias|) computed in float64. Integer
    kernels are tighter (exact accumulation, then a few roundings)."""
    return gamma(terms + 4) * bound


def assert_matches_integer_reference(module, x, kernel):
    """|y − reference| within float32 rounding of Σ|terms| over K terms (a bound that holds for every summation
    order, so on every CPU): a saturated int16 pair sum (an error of thousands of integer steps) cannot hide in it."""
    module.kernel = kernel
    with torch.no_grad():
        y = module(x).double()
    ref, bound = integer_reference(module, x)
    err = (y - ref).abs()
    tol = float_rounding_bound(module.in_features, bound)
    worst = float((err / tol).max())
    assert worst <= 1, f"{kernel}: error {float(err.max()):.3g} exceeds float rounding (worst ratio {worst:.2f})"


def _linear(in_f=256, out_f=48, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f)


def _extreme_int8(in_f=256, out_f=48, seed=0) -> QuantLinear:
    """8-bit codes at the int8 extremes: rows of +127 and rows of −128 (as GPTQ may produce), plus random rows."""
    lin = _linear(in_f, out_f, seed)
    codes = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8)
    codes[: out_f // 3] = 127
    codes[out_f // 3: 2 * out_f // 3] = -128
    scale = torch.rand(out_f, 1) * 0.01 + 1e-3
    rounded = RoundedWeight(weight=codes.float() * scale, data=codes, scale=scale, shift=None, bits=8, group_size=None)
    return quantize_linear(lin, 8, 0.02, rounded=rounded)


def _adversarial_inputs(module, rows=24):
    """Inputs whose codes are +127 and −128 everywhere (u8 255 / 0 for a full-range kernel), mixed with rows
    inside ±64 steps, so both the single-GEMM and the residual rows of the split path are exercised."""
    s = float(module.input_scale)
    k = module.in_features
    x = torch.empty(rows, k)
    x[0::4] = 127 * s
    x[1::4] = -128 * s
    x[2::4] = torch.randint(-64, 65, (len(range(2, rows, 4)), k)).float() * s
    x[3::4] = torch.where(torch.rand(len(range(3, rows, 4)), k) < 0.5, 127.0, -128.0) * s
    x[3, :5] = 65 * s  # just past the split point
    return x.reshape(2, rows // 2, k)


LAYERS = {
    "w8a8": lambda: quantize_linear(_linear(), 8, 0.02),
    "w8a8-extreme": _extreme_int8,
    "w4a8": lambda: quantize_linear(_linear(), 4, 0.02),
    # integer zero points: oneDNN multiplies code − z, no shift term (rounding.quant_grid, kernels.integer_zero_points)
    "w4a8-zi": lambda: quantize_linear(_linear(), 4, 0.02, rounded=nearest_round(_linear().weight.detach(), 4, None,
                                                                                  "integer")),
    "w4a8-g32": lambda: quantize_linear(_linear(), 4, 0.02, group_size=32),
}
ALL_KERNELS = ["onednn", "emulated", "emulated-per-call", "int8-per-call", "quanto"]


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_kernel_equals_integer_reference_random_and_adversarial(layer, kernel):
    module = LAYERS[layer]()
    problem = kernel_problem(module, kernel)
    if problem is not None:
        pytest.skip(problem)
    torch.manual_seed(1)
    x_random = torch.randn(2, 33, module.in_features) * 2.0
    assert_matches_integer_reference(module, x_random, kernel)
    assert_matches_integer_reference(module, _adversarial_inputs(module), kernel)


def _full_range_onednn_layer(layer: str, seed: int):
    """(a LAYERS layer on oneDNN, random and adversarial inputs), skipping where the layer needs the split path
    (the compiled paths take one full-range GEMM only); resets Dynamo."""
    module = LAYERS[layer]()
    module.kernel = "onednn"
    if not kernels.prepare_onednn(module).full_range:
        pytest.skip("8-bit codes beyond ±64 without int32 accumulation: the split path, the whole-layer op")
    torch.manual_seed(seed)
    x = torch.cat([torch.randn(2, 9, module.in_features) * 2.0, _adversarial_inputs(module)], dim=1)
    torch._dynamo.reset()
    return module, x


@needs_onednn
@pytest.mark.parametrize("layer", ["w8a8", "w8a8-extreme", "w4a8", "w4a8-zi"])
def test_compiled_onednn_layer_quantizes_in_traced_ops_around_an_opaque_gemm(layer):
    """Under torch.compile (inference) a oneDNN layer whose input takes one full-range GEMM quantizes its input and
    adds the 4-bit epilogue in traced torch ops (so Inductor fuses them with the ops producing the input) around
    the opaque u8 GEMM: the generated code calls that op, not the whole-layer op, and the result is the integer
    reference to float rounding — as eager, so the traced rounding is the eager one (x / s, round half to even)."""
    from torch._inductor.utils import run_and_get_code

    module, x = _full_range_onednn_layer(layer, seed=3)
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        y, code = run_and_get_code(compiled, x)
    code = "\n".join(code)
    assert "onednn_u8_linear" in code and "onednn_linear.default" not in code
    ref, bound = integer_reference(module, x)
    assert float(((y.double() - ref).abs() - float_rounding_bound(module.in_features, bound)).max()) <= 0
    # a gradient wanted: the whole-layer op and its straight-through backward, as in eager
    xg = x.clone().requires_grad_(True)
    compiled(xg).sum().backward()
    xe = x.clone().requires_grad_(True)
    module(xe).sum().backward()
    w = module.dequantized_weight().double()
    bound = gamma(module.out_features + 4) * (torch.ones(*x.shape[:-1], module.out_features).double() @ w.abs())
    assert float(((xg.grad.double() - xe.grad.double()).abs() - 2 * bound).max()) <= 0  # each within γ·Σ|terms|
    torch._dynamo.reset()


@needs_onednn
@pytest.mark.parametrize("layer", ["w8a8", "w8a8-extreme", "w4a8", "w4a8-zi"])
def test_compiled_with_freezing_inductor_lowers_the_layer_itself(layer):
    """With `torch._inductor.config.freezing`, a oneDNN layer is compiled as PyTorch 2 export's decomposed pattern,
    which Inductor's x86 quantization passes lower to oneDNN's qlinear on a weight they prepack (a 4-bit layer: its
    codes as int8, the affine shift as a rank-1 epilogue on the integer row sums): the generated code calls that op
    and neither of ours, and the result is the integer reference for the codes x · (1/s) rounds to, to float
    rounding."""
    from torch._inductor.utils import run_and_get_code

    module, x = _full_range_onednn_layer(layer, seed=4)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        y, code = run_and_get_code(torch.compile(module, fullgraph=True), x)
    code = "\n".join(code)
    assert "qlinear_pointwise" in code and "onednn_u8_linear" not in code and "onednn_linear.default" not in code
    ref, bound = integer_reference(module, x, reciprocal=True)
    assert float(((y.double() - ref).abs() - float_rounding_bound(module.in_features, bound)).max()) <= 0
    torch._dynamo.reset()


@needs_onednn
@pytest.mark.parametrize("bits,zero_point", [(8, "float"), (4, "float"), (4, "integer")])
def test_compiled_with_freezing_every_onednn_layer_of_a_model_is_lowered(bits, zero_point):
    """In a whole model compiled with freezing, every oneDNN layer becomes Inductor's qlinear — q, k and v, which
    share one quantized input, too — and no weight is dequantized at run time (a float GEMM on a weight
    dequantized per call is what a missed pattern leaves: measured 1.7× slower on DiT-XL/2 W4A8)."""
    from conftest import make_tiny_transformer, tiny_inputs
    from torch._inductor.utils import run_and_get_code

    from diffusers_ptq import BaselineConfig, quantize
    from diffusers_ptq.modules import quant_linears, set_kernel

    model = make_tiny_transformer()
    quantize(model, BaselineConfig(weight_bits=bits, act_bits=8, num_samples=2, num_inference_steps=2,
                                   batch_size=2, weight_zero_point=zero_point))
    set_kernel(model, "onednn")
    layers = [m for _, m in quant_linears(model)]
    if not all(kernels._prepared(m, kernels.KERNELS["onednn"]).full_range for m in layers):
        pytest.skip("8-bit layers take the split path here (no int32 accumulation): no traced or frozen pattern")
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in layers]
    with torch.no_grad():
        model(**tiny_inputs())
    for h in hooks:
        h.remove()
    torch._dynamo.reset()
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        _, code = run_and_get_code(torch.compile(model, fullgraph=True), **tiny_inputs())
    run = "\n".join(code).split("def call(self, args)")[-1]  # the per-call code, after the kernels' definitions
    gemms = [line for line in run.splitlines() if "torch.ops.onednn.qlinear_pointwise." in line
             and not line.strip().startswith("assert")]  # a call, not the size checks of its output
    assert len(gemms) == len(calls) and "dequantize_per_channel" not in run
    torch._dynamo.reset()


# fc1's GELU and fc2's input rounding in oneDNN against eager's torch GELU: two float implementations (tanh or erf)
# that differ by a few tens of float32 ulps at most; g / s is at most 128 in magnitude, so a code can differ only where
# g / s lies within 64 ulps of 128 (64·128·2⁻²³ ≈ 1e-3) of a half-integer
GELU_TIE = 64 * 128 * 2.0**-23


def _quantized_feedforward(bits: int, zero_point: str, activation: str = "gelu-approximate"):
    """diffusers' FeedForward (64 → 256 → 64, GELU: tanh or erf) with both Linears quantized on oneDNN and fused
    (`fuse_feedforwards`), and an input; skips where fc1 would need the split path."""
    from diffusers.models.attention import FeedForward

    from diffusers_ptq.modules import FusedFeedForward, fuse_feedforwards

    torch.manual_seed(5)
    ff = FeedForward(64, mult=4, activation_fn=activation).eval()

    def quantized(linear, scale):
        rounded = nearest_round(linear.weight.detach(), 4, None, "integer") if zero_point == "integer" else None
        return quantize_linear(linear, bits, scale, rounded=rounded)

    ff.net[0].proj, ff.net[2] = quantized(ff.net[0].proj, 0.02), quantized(ff.net[2], 0.01)
    set_kernel(ff, "onednn")
    assert fuse_feedforwards(ff) == 1 and type(ff) is FusedFeedForward
    if not kernels._prepared(ff.net[0].proj, kernels.KERNELS["onednn"]).full_range:
        pytest.skip("8-bit codes beyond ±64 without int32 accumulation: the split path, not fused")
    torch._dynamo.reset()
    return ff, torch.randn(2, 40, 64) * 2.0


@needs_onednn
@pytest.mark.parametrize("bits,zero_point,activation", [(8, "float", "gelu-approximate"),
                                                       (4, "integer", "gelu-approximate"), (8, "float", "gelu")])
def test_plain_compile_runs_fc1_gelu_and_fc2_input_rounding_as_one_onednn_call(bits, zero_point, activation):
    """Under torch.compile without freezing, a quantized FeedForward runs fc1, the GELU and fc2's input quantization
    as one oneDNN call (issue #21, point 1): fc2's input codes equal eager's — round(gelu(fc1(x)) / s) — except by
    one where that quotient lies within float rounding of a half-integer, and the compiled output (no_grad and
    inference_mode) is fc2's integer reference on those codes."""
    import torch.nn.functional as F

    ff, x = _quantized_feedforward(bits, zero_point, activation)
    fc1, fc2 = ff.net[0].proj, ff.net[2]
    before = kernels.ONEDNN_STATS["gelu_fused_calls"]
    compiled = torch.compile(ff, fullgraph=True)
    with torch.no_grad():
        codes = torch.compile(ff._fused_codes, fullgraph=True)(x)
        out = compiled(x)
        r = F.gelu(fc1(x), approximate=ff.net[0].approximate) / fc2.input_scale
    with torch.inference_mode():
        out_inference = compiled(x)
    assert kernels.ONEDNN_STATS["gelu_fused_calls"] - before == 3
    eager = torch.clamp(torch.round(r), -128, 127) + 128
    diff = codes.long() - eager.long()
    assert int(diff.abs().max()) <= 1 and float((diff != 0).float().mean()) < 1e-2
    flipped = r[diff != 0]
    assert not flipped.numel() or float((flipped - flipped.floor() - 0.5).abs().max()) <= GELU_TIE
    ref, bound = integer_reference(fc2, (codes.float() - 128) * fc2.input_scale)
    for y in (out, out_inference):
        assert float(((y.double() - ref).abs() - float_rounding_bound(fc2.in_features, bound)).max()) <= 0
    torch._dynamo.reset()


@needs_onednn
def test_fused_feedforward_runs_diffusers_forward_where_it_cannot_fuse():
    """Eager, a compile with freezing (Inductor's own passes fuse there), a gradient wanted, or a hook on fc1 (HTG's
    group biases, offload): the FeedForward runs diffusers' forward, and the fused call is not made."""
    from diffusers.models.attention import FeedForward

    ff, x = _quantized_feedforward(4, "integer")
    before = kernels.ONEDNN_STATS["gelu_fused_calls"]
    with torch.no_grad():
        assert torch.equal(ff(x), FeedForward.forward(ff, x))
        with torch._inductor.config.patch(freezing=True):
            torch.compile(ff, fullgraph=True)(x)
    torch._dynamo.reset()
    xg = x.clone().requires_grad_(True)
    torch.compile(ff, fullgraph=True)(xg).sum().backward()
    assert xg.grad is not None
    torch._dynamo.reset()
    hook = ff.net[0].proj.register_forward_hook(lambda _m, _a, y: y + 1.0)
    with torch.no_grad():
        expected = ff(x)
        torch.testing.assert_close(torch.compile(ff, fullgraph=True)(x), expected, rtol=1e-4,
                                   atol=1e-3 * float(expected.abs().max()))
    hook.remove()
    assert kernels.ONEDNN_STATS["gelu_fused_calls"] == before
    torch._dynamo.reset()


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("kernel", ["onednn", "emulated", "emulated-per-call"])
def test_input_gradient_is_that_of_the_dequantized_weight(layer, kernel):
    """Straight-through backward: grad_x = grad_y · W with W the dequantized weight (computed directly here), the
    same whichever kernel ran the forward; the stored weight gets no gradient."""
    module = LAYERS[layer]()
    problem = kernel_problem(module, kernel)
    if problem is not None:
        pytest.skip(problem)
    module.kernel = kernel
    torch.manual_seed(2)
    x = torch.randn(2, 5, module.in_features, requires_grad=True)
    grad_y = torch.randn(2, 5, module.out_features)
    module(x).backward(grad_y)
    w = module.dequantized_weight().double()
    expected = grad_y.double() @ w
    bound = gamma(module.out_features + 4) * (grad_y.double().abs() @ w.abs())  # N-term sums; W, x/s·s rounded
    assert float(((x.grad.double() - expected).abs() - bound).max()) <= 0
    assert module.weight.grad is None


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_the_chosen_kernel_never_saturates_here(layer):
    """The kernel picked automatically on this machine, on worst-case inputs: fails if it silently saturates."""
    module = LAYERS[layer]()
    chosen = choose_kernel(module)
    assert module.kernel == chosen
    assert_matches_integer_reference(module, _adversarial_inputs(module, rows=32), chosen)
    assert_matches_integer_reference(module, _channel_outliers(module), chosen)


@needs_onednn
def test_choice_per_bit_width_on_x86():
    assert choose_kernel(LAYERS["w8a8"]()) == "onednn"
    assert choose_kernel(LAYERS["w4a8"]()) == "onednn"
    assert choose_kernel(LAYERS["w4a8-g32"]()) == "emulated"
    assert choose_kernel(quantize_linear(_linear(), 8, None)) == "emulated"
    assert "onednn" in repr(LAYERS["w8a8"]())


@needs_onednn
@pytest.mark.parametrize("k", [64, 1152, 4608])
def test_full_range_probe_agrees_with_a_raw_gemm(k):
    """The measured regime: a raw single full-range GEMM over K terms is exact iff the probe says so (if it saturates
    here, the kernel must be using the split path — covered by the adversarial tests above)."""
    w = torch.full((8, k), 127, dtype=torch.int8)
    u = torch.full((3, k), 255, dtype=torch.uint8)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    y = kernels._qlinear(u, 1.0, 0, packed, torch.ones(8), torch.zeros(8, dtype=torch.int64), None)
    exact = torch.equal(y, (u.long() @ w.long().T).to(torch.float32))
    assert exact == kernels.onednn_full_range_exact(k)
    assert kernels.onednn_probe(k).problem is None
    if kernels.has_vnni():
        assert exact


@needs_onednn
def test_a_kernel_that_fails_its_probe_falls_back_with_a_warning(monkeypatch):
    """The probe runs the op for the widths it will serve; if it fails here, the layers take the next exact kernel
    (a warning says so) instead of failing at run time."""
    def broken(*args, **kwargs):
        raise RuntimeError("simulated oneDNN failure")

    monkeypatch.setattr(kernels, "onednn_available", lambda: True)
    monkeypatch.setattr(kernels, "_qlinear", broken)
    kernels.onednn_probe.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="simulated oneDNN failure"):
            module = quantize_linear(_linear(in_f=96), 8, 0.02)
        assert module.kernel == "emulated"
        assert "failed to run" in kernel_problem(module, "onednn")
    finally:
        kernels.onednn_probe.cache_clear()


def _channel_outliers(module, rows=40, channels=(3, 17, 200)):
    """DiT-like: a few input channels at the int8 extremes in every token, the rest within ±64 steps."""
    s = float(module.input_scale)
    x = torch.randint(-64, 65, (rows, module.in_features)).float() * s
    for i, ch in enumerate(channels):
        x[:, ch] = (127 if i % 2 == 0 else -128) * s
    return x


def _split(module, x) -> QuantizedInput:
    """How the split path quantizes this input (the kernel builds the same object inside its op)."""
    return QuantizedInput(x.reshape(-1, module.in_features).float(), module.input_scale, full_range=False)


@needs_onednn
def test_split_path_is_exact_by_tokens_and_by_channels(monkeypatch):
    """Force the no-VNNI split path (as on AVX2) on any machine: its residual by tokens (large activations spread
    over the input) and by input channels (a few outlier channels) both equal the integer reference."""
    monkeypatch.setattr(kernels, "onednn_full_range_exact", lambda k=64: False)
    module = _extreme_int8()
    assert not kernels.prepare_onednn(module).full_range
    x = _adversarial_inputs(module)
    assert_matches_integer_reference(module, x, "onednn")
    assert _split(module, x).row_resid is not None and _split(module, x).cols is None
    x = x.reshape(-1, module.in_features)[:12]
    x[3:] = torch.randint(-64, 65, (9, module.in_features)).float() * float(module.input_scale)
    assert_matches_integer_reference(module, x, "onednn")  # a few tokens: gathered, then added back
    assert _split(module, x).rows.tolist() == [0, 1]  # row 2 lies within ±64 steps
    x = _channel_outliers(module)
    assert_matches_integer_reference(module, x, "onednn")
    assert _split(module, x).cols.tolist() == [3, 17, 200] and _split(module, x).row_resid is None
    x = torch.randint(-64, 65, (7, module.in_features)).float() * float(module.input_scale)  # no residual at all
    assert_matches_integer_reference(module, x, "onednn")
    assert _split(module, x).cols is None and _split(module, x).row_resid is None


@needs_onednn
def test_seven_bit_weight_codes_take_one_full_range_gemm_exactly(monkeypatch):
    """8-bit weights on ±63 (stored as ordinary qint8): one full-range GEMM, exact on worst-case inputs even
    where int16 pair sums saturate; one code of 64 sends the layer back to the split path."""
    from diffusers_ptq.modules import seven_bit_weight

    monkeypatch.setattr(kernels, "onednn_full_range_exact", lambda k=64: False)
    lin = _linear()
    module = quantize_linear(lin, 8, 0.02, rounded=seven_bit_weight(lin.weight))
    codes = module.weight._data
    assert int(codes.abs().max()) == 63 and kernels.prepare_onednn(module).full_range
    for x in (_adversarial_inputs(module), _channel_outliers(module)):
        assert_matches_integer_reference(module, x, "onednn")
    assert not kernels.prepare_onednn(_extreme_int8()).full_range


def _tiny_quantized(tiny_transformer, **config):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tiny_transformer.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    quantize_transformer(tiny_transformer, QuantConfig(**config, num_inference_steps=2, num_samples=2, batch_size=2),
                         progress=False)
    return tiny_transformer


def _forward(model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, 4, generator=gen)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([999, 500, 3]), class_labels=torch.tensor([1, 2, 1000])).sample


@pytest.mark.parametrize("bits", [8, 4])
def test_model_output_is_the_same_whichever_exact_kernel_runs_it(tiny_transformer, bits):
    model = _tiny_quantized(tiny_transformer, weight_bits=bits, act_bits=8)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    names = sorted(set.intersection(*(set(available_kernels(m)) for m in layers)))
    assert "emulated" in names and "quanto" in names and ("onednn" in names) == HAS_ONEDNN
    outputs = {}
    for name in names:
        set_kernel(model, name)
        assert all(m.kernel == name for m in layers)
        outputs[name] = _forward(model)
    reference = outputs["emulated"]
    for name, out in outputs.items():
        # float rounding may move an activation across a rounding boundary in a later layer: one int8 step
        torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()), msg=name)
    set_kernel(model, "auto")
    assert all(m.kernel == choose_kernel(m) for m in layers)


def test_forcing_an_unavailable_or_inexact_kernel_is_a_clear_error(tiny_transformer, monkeypatch):
    model = _tiny_quantized(tiny_transformer, weight_bits=4, act_bits=None)  # weight-only
    before = {n: m.kernel for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    with pytest.raises(KernelError, match="weight-only"):
        set_kernel(model, "onednn")
    assert before == {n: m.kernel for n, m in model.named_modules() if isinstance(m, QuantLinear)}  # unchanged
    with pytest.raises(KernelError, match="unknown kernel 'fast'"):
        set_kernel(model, "fast")
    grouped = quantize_linear(_linear(), 4, 0.02, group_size=32)
    with pytest.raises(KernelError, match="groups of 32"):
        set_kernel(grouped, "onednn")
    monkeypatch.setattr(kernels, "onednn_available", lambda: False)
    kernels.onednn_probe.cache_clear()
    try:
        with pytest.raises(KernelError, match="not available"):
            set_kernel(quantize_linear(_linear(), 8, 0.02), "onednn")
        assert choose_kernel(quantize_linear(_linear(), 8, 0.02)) == "emulated"
    finally:
        kernels.onednn_probe.cache_clear()


@needs_onednn
def test_prepared_weights_are_never_saved_and_follow_moves(tiny_transformer, tmp_path):
    from diffusers import DiTTransformer2DModel

    from diffusers_ptq import BaselineConfig, quantize

    model = tiny_transformer
    quantize(model, BaselineConfig(weight_bits=4, num_samples=2, num_inference_steps=2), progress=False)
    expected = _forward(model)  # prepacks every layer
    keys = set(model.state_dict())
    assert not any("onednn" in k for k in keys)
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    assert "_kernel_state" in layer.__dict__ and "_kernel_state" not in layer.__getstate__()
    prepared = layer.__dict__["_kernel_state"]
    for m in model.modules():  # a move drops the prepared weights and prepares them anew (before any forward)
        if isinstance(m, QuantLinear):
            m.to("cpu")
    assert layer.__dict__["_kernel_state"] is not prepared and layer.kernel == "onednn"
    assert torch.equal(_forward(model), expected)
    model.save_pretrained(tmp_path / "q")
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "q")
    assert {m.kernel for m in reloaded.modules() if isinstance(m, QuantLinear)} == {"onednn"}
    assert torch.equal(_forward(reloaded), expected)
    assert set(reloaded.state_dict()) == keys


# --- the measured choice (issue #21, point 5) -------------------------------------------------------------------------


@needs_onednn
def test_measured_choice_takes_the_faster_exact_kernel_once_per_layer_shape(monkeypatch):
    """KERNEL_CHOICE = "measured" (the library's default): the faster of the exact kernels on this layer, timed once per
    process and layer shape (timings faked here, so the test does not depend on this machine's speed)."""
    monkeypatch.setattr(kernels, "KERNEL_CHOICE", "measured")
    monkeypatch.setattr(kernels, "MEASURED", {})
    timed, speeds = [], {"onednn": 2.0, "emulated": 1.0}

    def fake(kernel, module, x, repeats=3):
        assert x.shape == (kernels.MEASURE_ROWS, module.in_features)
        timed.append((kernel.name, module.in_features))
        return speeds[kernel.name]

    monkeypatch.setattr(kernels, "time_kernel", fake)
    assert quantize_linear(_linear(), 8, 0.02).kernel == "emulated"
    assert sorted(timed) == [("emulated", 256), ("onednn", 256)]
    speeds.update(onednn=0.5)  # the same shape again: not timed again, the first result stands
    assert quantize_linear(_linear(), 8, 0.02).kernel == "emulated" and len(timed) == 2
    assert quantize_linear(_linear(in_f=96), 8, 0.02).kernel == "onednn" and len(timed) == 4  # another shape
    assert quantize_linear(_linear(), 4, 0.02).kernel == "onednn"  # 4-bit weights: another key
    monkeypatch.setattr(kernels, "KERNEL_CHOICE", "priority")
    assert quantize_linear(_linear(), 8, 0.02).kernel == "onednn"


@needs_onednn
def test_measured_choice_times_real_calls_and_leaves_the_statistics_alone(monkeypatch):
    monkeypatch.setattr(kernels, "KERNEL_CHOICE", "measured")
    monkeypatch.setattr(kernels, "MEASURED", {})
    before = dict(kernels.ONEDNN_STATS)
    layer = quantize_linear(_linear(), 8, 0.02)
    (times,) = kernels.MEASURED.values()
    assert set(times) == {"onednn", "emulated"} and all(0 < t < 10 for t in times.values())
    assert layer.kernel == min(times, key=times.get) and kernels.ONEDNN_STATS == before


INT_MM_EXACT = kernels.int_mm_exact("cpu")
needs_int_mm = pytest.mark.skipif(not INT_MM_EXACT, reason="torch._int_mm is not exact on this CPU")
PER_CALL_KERNELS = ("int8-per-call", "emulated-per-call")


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_memory_choice_keeps_nothing_beside_the_stored_weight(layer, monkeypatch):
    """KERNEL_CHOICE "memory" (issue #22): on the CPU a layer with 8-bit inputs and per-channel weights takes
    "int8-per-call" where `torch._int_mm` is exact (an integer GEMM on codes unpacked at each call; its state at
    most the integer zero points, one int8 a channel), every other layer "emulated-per-call" (the weight dequantized
    at each call, no state), whose output is the cached emulation's bit for bit — where both can run, the faster
    (timings faked here: each order once); the automatic choices take neither."""
    monkeypatch.setattr(kernels, "KERNEL_CHOICE", "memory")
    speeds = {"int8-per-call": 1.0, "emulated-per-call": 2.0, "onednn": 1.0, "emulated": 2.0}
    monkeypatch.setattr(kernels, "time_kernel", lambda kernel, module, x, repeats=3: speeds[kernel.name])
    monkeypatch.setattr(kernels, "MEASURED", {})
    module = LAYERS[layer]()
    integer = INT_MM_EXACT and layer != "w4a8-g32"
    assert (kernel_problem(module, "int8-per-call") is None) == integer
    state = module.__dict__["_kernel_state"][2]
    assert module.kernel == ("int8-per-call" if integer else "emulated-per-call")
    monkeypatch.setattr(kernels, "MEASURED", {})
    speeds.update({"int8-per-call": 3.0})  # slower than the emulation (as `torch._int_mm` may be without VNNI)
    assert choose_kernel(module) == "emulated-per-call"
    if integer and layer == "w4a8-zi":
        assert state.dtype == torch.int8 and state.shape == (module.out_features, 1)
    else:
        assert state is None
    torch.manual_seed(5)
    x = torch.randn(3, 7, module.in_features)
    with torch.no_grad():
        module.kernel = "emulated-per-call"
        y = module(x)
        module.kernel = "emulated"
        assert torch.equal(y, module(x))
    for choice in ("measured", "priority"):
        monkeypatch.setattr(kernels, "KERNEL_CHOICE", choice)
        assert choose_kernel(module) not in PER_CALL_KERNELS
    monkeypatch.setattr(kernels, "KERNEL_CHOICE", "smallest")
    with pytest.raises(ValueError, match="DIFFUSERS_PTQ_KERNEL_CHOICE"):
        choose_kernel(module)


SLICED_LAYERS = {**LAYERS,
                 # an odd channel count: 4-bit codes' high half one row shorter; in groups a channel straddles halves
                 "w4a8-odd": lambda: quantize_linear(_linear(out_f=47), 4, 0.02),
                 "w4a8-g32-odd": lambda: quantize_linear(_linear(out_f=47), 4, 0.02, group_size=32)}


@pytest.mark.parametrize("layer", sorted(SLICED_LAYERS))
def test_per_call_kernel_in_slices_equals_the_whole_weight(layer, monkeypatch):
    """The per-call kernel (issue #22) dequantizes 5 output channels at a time: the slices are `dequantize_weight`'s
    rows bit for bit (read from the packed bytes directly, against its unpacking of the whole tensor), and the layer
    equals the integer reference to float rounding, forward and input gradient."""
    module = SLICED_LAYERS[layer]()
    slices = list(kernels.dequantized_slices(module.weight, module.out_features, module.in_features, 5))
    assert torch.equal(torch.cat(slices), kernels.dequantize_weight(module.weight))
    codes = list(kernels.code_slices(module.weight, module.out_features, 5))
    assert torch.equal(torch.cat([c for _, c, _, _ in codes]), kernels.weight_codes(module.weight))
    if module.weight_group_size is None:  # each slice's first channel: the channels before it
        assert [a for a, *_ in codes] == [sum(len(c) for _, c, _, _ in codes[:i]) for i in range(len(codes))]
    assert max(len(w) for w in slices) == (module.out_features if layer == "w4a8-g32-odd" else 5)  # that one whole
    monkeypatch.setattr(kernels, "PER_CALL_SLICE_BYTES", 5 * 4 * module.in_features)
    torch.manual_seed(6)
    assert_matches_integer_reference(module, torch.randn(2, 9, module.in_features), "emulated-per-call")
    assert_matches_integer_reference(module, _adversarial_inputs(module), "emulated-per-call")
    x = torch.randn(2, 5, module.in_features, requires_grad=True)
    grad_y = torch.randn(2, 5, module.out_features)
    module(x).backward(grad_y)
    w = module.dequantized_weight().double()
    bound = gamma(module.out_features + 4) * (grad_y.double().abs() @ w.abs())  # as the whole-weight gradient test
    assert float(((x.grad.double() - grad_y.double() @ w).abs() - bound).max()) <= 0


@needs_int_mm
@pytest.mark.parametrize("layer", sorted(SLICED_LAYERS))
def test_int8_per_call_kernel_in_slices_equals_the_integer_reference(layer, monkeypatch):
    """The integer per-call kernel (issue #22) on 5 output channels a slice (the slices' codes, scales, zero points
    and shifts must line up with their channels) equals the integer reference to float rounding, random and
    adversarial inputs, fewer and more rows than inputs; grouped 4-bit weights are refused with the reason."""
    module = SLICED_LAYERS[layer]()
    problem = kernel_problem(module, "int8-per-call")
    if module.weight_group_size is not None:
        assert "groups of 32" in problem
        return
    monkeypatch.setattr(kernels, "INT8_SLICE_BYTES", 5 * module.in_features)
    torch.manual_seed(7)
    assert_matches_integer_reference(module, torch.randn(2, 9, module.in_features) * 2.0, "int8-per-call")
    assert_matches_integer_reference(module, _adversarial_inputs(module), "int8-per-call")
    # more rows than inputs: integer zero points come off the codes, not off the sums
    assert_matches_integer_reference(module, torch.randn(1, module.in_features + 8, module.in_features) * 2.0,
                                     "int8-per-call")


@needs_int_mm
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_per_call_kernel_with_dynamic_per_token_scales(bits):
    """Dynamic activations (Q-DiT): each token quantized with its own scale, as the emulation does, then the integer
    GEMM; against int64 sums times the scales in float64, within float32 rounding of Σ|terms|."""
    module = quantize_linear(_linear(), bits, None, act_dynamic=True)
    torch.manual_seed(8)
    x = torch.randn(2, 9, module.in_features)
    x[0, :3] *= 100.0  # tokens of very different ranges
    module.kernel = "int8-per-call"
    with torch.no_grad():
        y = module(x).double().reshape(-1, module.out_features)
    x2 = x.reshape(-1, module.in_features)
    s32 = kernels.per_token_scale(x2)
    q = torch.clamp(torch.round(x2 / s32), -128, 127).long()
    codes, scale, shift = _codes(module)
    s = s32.double()
    ref = s * (q @ codes.T).double() * scale.T + module.bias.double()
    bound = s * (q.abs() @ codes.abs().T).double() * scale.T + module.bias.double().abs()
    if shift is not None:
        ref -= s * q.sum(1, keepdim=True).double() * shift.T
        bound += s * q.abs().sum(1, keepdim=True).double() * shift.T.abs()
    assert float(((y - ref).abs() - float_rounding_bound(module.in_features, bound)).max()) <= 0


@needs_int_mm
def test_int8_per_call_kernel_gradient_and_inference_mode():
    """With a gradient wanted for the input the integer per-call kernel runs "emulated-per-call" (autograd's
    straight-through rounding): the same input gradient; under inference_mode and no_grad it runs the integer GEMM,
    the same output in both."""
    module = LAYERS["w4a8"]()
    torch.manual_seed(9)
    x = torch.randn(2, 5, module.in_features, requires_grad=True)
    grad_y = torch.randn(2, 5, module.out_features)
    grads = []
    for kernel in PER_CALL_KERNELS:
        module.kernel = kernel
        module(x).backward(grad_y)
        grads.append(x.grad)
        x.grad = None
    assert torch.equal(*grads)
    module.kernel = "int8-per-call"
    with torch.inference_mode():
        y_inference = module(x.detach())
    with torch.no_grad():
        assert torch.equal(y_inference, module(x.detach()))


def test_int8_per_call_kernel_refuses_what_it_cannot_run_exactly(monkeypatch):
    assert "weight-only" in kernel_problem(quantize_linear(_linear(), 8, None), "int8-per-call")
    assert "groups of 32" in kernel_problem(LAYERS["w4a8-g32"](), "int8-per-call")
    assert "runs on CPU; this layer is on meta" in kernel_problem(LAYERS["w8a8"]().to("meta"), "int8-per-call")
    module = LAYERS["w8a8"]()
    monkeypatch.setattr(kernels, "int_mm_exact", lambda device_type: False)
    assert "torch._int_mm is not exact on this CPU" in kernel_problem(module, "int8-per-call")
    with pytest.raises(KernelError, match="not exact"):
        set_kernel(module, "int8-per-call")
    monkeypatch.setattr(kernels, "int_mm_exact", lambda device_type: True)
    monkeypatch.setattr(kernels, "INT32_EXACT_TERMS", module.in_features - 1)
    assert "overflow int32" in kernel_problem(module, "int8-per-call")


def test_a_model_on_memory_kernels_compiles_and_trains_like_the_emulation(monkeypatch):
    """A whole W4A8 model under KERNEL_CHOICE "memory": every layer on a per-call kernel ("int8-per-call" only where
    `torch._int_mm` is exact); on each, torch.compile (fullgraph) gives the eager output to float reassociation, and
    the input gradient flows (LoRA)."""
    from conftest import make_tiny_transformer, tiny_inputs

    from diffusers_ptq import BaselineConfig, quantize
    from diffusers_ptq.modules import kernel_summary

    monkeypatch.setattr(kernels, "KERNEL_CHOICE", "memory")
    model = make_tiny_transformer()
    quantize(model, BaselineConfig(weight_bits=4, act_bits=8, num_samples=2, num_inference_steps=2, batch_size=2),
             progress=False)
    assert set(kernel_summary(model)) <= set(PER_CALL_KERNELS[0 if INT_MM_EXACT else 1:])  # the faster per shape
    for kernel in PER_CALL_KERNELS[0 if INT_MM_EXACT else 1:]:
        with torch.no_grad():
            set_kernel(model, kernel)
            eager = model(**tiny_inputs()).sample
            set_kernel(model, "emulated")
            emulated = model(**tiny_inputs()).sample
            set_kernel(model, kernel)
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True)(**tiny_inputs()).sample
        # float reassociation only: a few units in the last place of the largest outputs, plus input codes that a
        # different summation order or Inductor's fused rounding may flip at an exact tie (one step of the activation
        # grid reaching the output)
        tolerance = {"rtol": 1e-4, "atol": 1e-3 * float(eager.abs().max())}
        if kernel == "emulated-per-call":
            assert torch.equal(eager, emulated)  # the cached emulation, bit for bit
        else:
            torch.testing.assert_close(eager, emulated, **tolerance)
        torch.testing.assert_close(compiled, eager, **tolerance)
    x = tiny_inputs()["hidden_states"].requires_grad_(True)
    model(**{**tiny_inputs(), "hidden_states": x}).sample.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    torch._dynamo.reset()
