"""GPTQ rounding (diffusers_ptq.rounding) and the quanto weights built from it (modules.quantize_linear)."""

import pytest
import torch
from conftest import assert_within_bound, gamma, matmul_error_bound, unit_roundoff

from diffusers_ptq.modules import quantize_linear
from diffusers_ptq.rounding import (
    HessianRecorder,
    gptq_quantize_weights,
    gptq_round,
    nearest_round,
    quant_grid,
    scale_hessian,
    shift_hessian,
)

FORMATS = [(8, None), (4, None), (4, 16)]


def _correlated_inputs(n, d, seed=0):
    """Rows with correlated channels of different magnitudes and a non-zero mean (like real activations)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    gains = torch.logspace(-1, 1, d)[torch.randperm(d, generator=gen)]
    return (torch.randn(n, d, generator=gen) @ mix + 0.5) * gains


def _layer(out_features, in_features, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features)


def _output_error(x, w, w_hat):
    return float(((x @ (w - w_hat).T) ** 2).sum())


# ------------------------------------------------------------------- a direct reference, column by column

def _reference_grid(w, bits, group_size):
    """Per-column scale and shift [out, in], from the original weight (quanto's formulas, written out)."""
    if bits == 8:
        return (w.abs().amax(1, keepdim=True) / 127).expand_as(w), None
    g = group_size or w.shape[1]
    groups = w.reshape(w.shape[0], -1, g)
    lo, hi = groups.amin(2, keepdim=True), groups.amax(2, keepdim=True)
    return ((hi - lo) / 15).expand_as(groups).reshape(w.shape), (-lo).expand_as(groups).reshape(w.shape)


def _reference_gptq(w, hessian, bits, group_size, damp, act_order):
    """Naive GPTQ: round column j, e = (w_j - q_j) / [H⁻¹]_jj, w_k -= e [H⁻¹]_jk for the columns left,
    then remove j from H⁻¹ by the Schur complement. Returns the integer codes [out, in]."""
    scale, shift = _reference_grid(w, bits, group_size)
    scale = scale.double()
    shift = None if shift is None else shift.double()
    w = w.double().clone()
    h = hessian.double().clone()
    n = h.shape[0]
    for j in range(n):
        if h[j, j] == 0:
            h[j, j] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist() if act_order else list(range(n))
    hinv = torch.linalg.inv(h)
    codes = torch.zeros_like(w)
    for step, j in enumerate(order):
        if bits == 8:
            q = torch.clamp(torch.round(w[:, j] / scale[:, j]), -128, 127)
            value = q * scale[:, j]
        else:
            q = torch.clamp(torch.round((w[:, j] + shift[:, j]) / scale[:, j]), 0, 15)
            value = q * scale[:, j] - shift[:, j]
        codes[:, j] = q
        e = (w[:, j] - value) / hinv[j, j]
        for k in order[step + 1:]:
            w[:, k] -= e * hinv[j, k]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


@pytest.mark.parametrize("bits,group_size", FORMATS + [(4, 4)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_naive_reference_on_tiny_layer(bits, group_size, act_order):
    w = _layer(6, 32).weight.detach()
    x = _correlated_inputs(200, 32)
    h = x.T @ x / len(x)
    expected = _reference_gptq(w, h, bits, group_size, damp=0.01, act_order=act_order)
    # block_size 5 does not divide 32: the lazy block updates and the ragged last block are exercised
    got = gptq_round(w, h, bits, group_size, damp=0.01, act_order=act_order, block_size=5, dtype=torch.float64)
    assert torch.equal(got.data.double(), expected)
    # in float32 the working precision may flip a code sitting on a rounding boundary, no more
    got32 = gptq_round(w, h, bits, group_size, damp=0.01, act_order=act_order, block_size=5)
    assert (got32.data.double() != expected).float().mean() < 0.01


# ------------------------------------------------------------------- GPTQ beats round-to-nearest

@pytest.mark.parametrize("bits,group_size", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_lower_than_nearest(bits, group_size, act_order):
    w = _layer(48, 64).weight.detach()
    x = _correlated_inputs(1024, 64)
    h = x.T @ x / len(x)
    nearest = nearest_round(w, bits, group_size)
    gptq = gptq_round(w, h, bits, group_size, act_order=act_order)
    err_nearest, err_gptq = _output_error(x, w, nearest.weight), _output_error(x, w, gptq.weight)
    assert err_gptq < 0.8 * err_nearest, (err_gptq, err_nearest)
    # same grid as round-to-nearest: only the integers differ
    torch.testing.assert_close(gptq.scale, nearest.scale, rtol=0, atol=0)
    assert (gptq.shift is None) == (nearest.shift is None)
    assert not torch.equal(gptq.data, nearest.data)


def test_gptq_is_deterministic():
    w = _layer(32, 64).weight.detach()
    x = _correlated_inputs(300, 64)
    h = x.T @ x / len(x)
    a, b = gptq_round(w, h, 4, 16), gptq_round(w.clone(), h.clone(), 4, 16)
    assert torch.equal(a.data, b.data) and torch.equal(a.weight, b.weight)


def test_dead_inputs_constant_groups_and_zero_rows():
    w = _layer(8, 32).weight.detach().clone()
    w[3] = 0.0                # all-zero row: zero scale
    w[5, :16] = 0.25          # constant group: zero scale, its value is the group's min
    x = _correlated_inputs(200, 32)
    x[:, [2, 17]] = 0.0       # dead inputs: zero row and column in H
    h = x.T @ x / len(x)
    for bits, group_size in FORMATS:
        got = gptq_round(w, h, bits, group_size)
        assert torch.isfinite(got.weight).all()
        assert torch.equal(got.weight[3], torch.zeros(32))
        if group_size:
            assert torch.equal(got.weight[5, :16], torch.full((16,), 0.25))
        # a dead column is decoupled from the others: it keeps its round-to-nearest value
        nearest = nearest_round(w, bits, group_size)
        assert torch.equal(got.data[:, [2, 17]], nearest.data[:, [2, 17]])


# ------------------------------------------------------------------- the quanto weight holds exactly GPTQ's values

@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_nearest_round_is_quantos_rounding(bits, group_size):
    linear = _layer(24, 64)
    module = quantize_linear(linear, bits, 0.02, group_size)
    assert torch.equal(module.dequantized_weight(), nearest_round(linear.weight.detach(), bits, group_size).weight)


@pytest.mark.parametrize("bits,group_size", FORMATS)
@pytest.mark.parametrize("act_scale", [0.05, None])
def test_quant_linear_from_gptq_dequantizes_to_gptq_weight(bits, group_size, act_scale):
    linear = _layer(24, 64)
    x = _correlated_inputs(256, 64)
    rounded = gptq_round(linear.weight.detach(), x.T @ x / len(x), bits, group_size)
    module = quantize_linear(linear, bits, act_scale, group_size, rounded=rounded)
    assert torch.equal(module.dequantized_weight(), rounded.weight)
    assert torch.equal(module.weight.dequantize(), rounded.weight)
    assert not module.weight.requires_grad
    xs = x[:5] if act_scale is None else x[:5].div(act_scale).round().clamp(-128, 127) * act_scale
    # both sides are float32 evaluations of Σ q·s·w + b over K = 64 terms, in whatever order the kernel and F.linear
    # add them: each within γ_{K+6} (Σ|xs|·|terms of w| + |b|) (conftest.matmul_error_bound; 6 roundings cover the
    # input's q·s, the kernel's scale product and multiply, its 4-bit shift term, and |xs| for the exact |q·s|).
    # The kernel's weight terms are code·scale and shift (w = code·scale − shift): magnitudes ≤ |w| + 2|shift|.
    shift = _reference_grid(linear.weight.detach(), bits, group_size)[1]
    w_terms = rounded.weight.abs() + (0 if shift is None else 2 * shift.abs())
    assert_within_bound(module(x[:5]), torch.nn.functional.linear(xs, rounded.weight, linear.bias),
                        2 * matmul_error_bound(xs, w_terms, bias=linear.bias, extra_roundings=6))
    # the stored format is the one round-to-nearest produces: same keys, shapes and dtypes
    nearest = quantize_linear(linear, bits, act_scale, group_size).state_dict()
    state = module.state_dict()
    assert state.keys() == nearest.keys()
    for key in state:
        assert (state[key].shape, state[key].dtype) == (nearest[key].shape, nearest[key].dtype), key


def test_quant_linear_rejects_a_rounded_weight_of_another_format():
    linear = _layer(24, 64)
    rounded = nearest_round(linear.weight.detach(), 4, 16)
    with pytest.raises(ValueError, match="group_size"):
        quantize_linear(linear, 4, None, 32, rounded=rounded)
    with pytest.raises(ValueError, match="4-bit"):
        quantize_linear(linear, 8, None, None, rounded=rounded)


def test_gptq_quantize_weights_covers_every_linear():
    layers = {"a": _layer(16, 32, seed=2), "b": _layer(8, 32, seed=3)}
    x = _correlated_inputs(100, 32)
    h = x.T @ x / len(x)
    out = gptq_quantize_weights(layers, {"a": h, "b": h}, 4, group_size=16, progress=False)
    assert set(out) == {"a", "b"}
    assert torch.equal(out["b"].data, gptq_round(layers["b"].weight.detach(), h, 4, 16).data)
    with pytest.raises(KeyError):
        gptq_quantize_weights(layers, {"a": h}, 8, progress=False)


# ------------------------------------------------------------------- Hessians

def test_hessian_streamed_over_calls_equals_all_rows_at_once():
    linear, other = _layer(8, 16), _layer(4, 16, seed=4)
    x = _correlated_inputs(2 * 3 * 50, 16).reshape(6, 50, 16)  # [batch, tokens, channels], fed in 3 calls
    with HessianRecorder({"lin": linear, "other": other}) as recorder:
        for chunk in x.split(2):
            linear(chunk)
    rows = x.reshape(-1, 16)
    assert set(recorder.hessians()) == {"lin"}  # a layer that saw nothing has no Hessian
    # streamed (3 addmm calls) and at once: two float32 orders of the same N-term sums, then one division each
    n = len(rows)
    assert_within_bound(recorder.hessians()["lin"], rows.T @ rows / n,
                        2 * matmul_error_bound(rows.T, rows.T, extra_roundings=1) / n)
    assert_within_bound(recorder.means()["lin"], rows.mean(0),
                        2 * matmul_error_bound(rows.T, torch.ones(1, n), extra_roundings=1)[:, 0] / n)
    linear(x)  # hooks are gone after the context
    assert recorder.counts["lin"] == len(rows)


class _TinyTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = _layer(8, 16)

    def forward(self, hidden_states, timestep=None):
        return self.proj(hidden_states)


@pytest.mark.parametrize("per_sample", [False, True])
def test_hessian_weighted_by_timestep(per_sample):
    model = _TinyTransformer()
    x = _correlated_inputs(4 * 2 * 10, 16).reshape(4, 2, 10, 16)  # 4 calls of [batch 2, tokens 10, channels]
    steps = [torch.tensor([900, 900]), torch.tensor([600, 600]), torch.tensor([300, 100]), torch.tensor([50, 10])]

    def weight_fn(t):
        w = 1.0 + t.double() / 1000
        return w if per_sample else float(w.mean())

    with HessianRecorder({"proj": model.proj}, weight_fn=weight_fn, transformer=model) as recorder:
        for xi, t in zip(x, steps):
            model(xi, timestep=t)
    num = torch.zeros(16, 16, dtype=torch.float64)
    den = 0.0
    for xi, t in zip(x, steps):
        w = weight_fn(t)
        w = w if per_sample else torch.full((2,), w, dtype=torch.float64)
        for b in range(2):
            rows = xi[b].double()
            num += w[b] * rows.T @ rows
            den += float(w[b]) * len(rows)
    # the float64 reference is exact to float32's eye (up to its final rounding, u·|ref|); the recorder's float32
    # sums have N + 4 roundings (weight cast and multiply, the count's cast, the division), each relative to
    # Σ w|x_i||x_j| / Σ w ≤ sqrt(H_ii H_jj) (Cauchy–Schwarz)
    ref = num / den
    d = ref.diagonal().sqrt()
    assert_within_bound(recorder.hessians()["proj"], ref.float(),
                        gamma(x[..., 0].numel() + 4) * d[:, None] * d[None, :] + unit_roundoff() * ref.abs())


def test_scale_hessian_is_the_hessian_of_the_scaled_input():
    x = _correlated_inputs(300, 16)
    s = torch.linspace(0.3, 4.0, 16)
    h = x.T @ x / len(x)
    xs = x / s
    # H / (s sᵀ): N + 1 roundings, then 2; (x / s)ᵀ(x / s) / N: 2 per product (the divisions), N + 1: both within
    # γ_{N+3} |x/s|ᵀ|x/s| / N of the exact value, in any summation order
    a = x.double() / s.double()
    assert_within_bound(scale_hessian(h, s), xs.T @ xs / len(x), 2 * matmul_error_bound(a.T, a.T, extra_roundings=3)
                        / len(x))


def test_shift_then_scale_hessian_is_the_hessian_of_the_smoothed_input():
    x = _correlated_inputs(300, 16)
    z, s = torch.linspace(-1.0, 2.0, 16), torch.linspace(0.3, 4.0, 16)
    h, mean = x.T @ x / len(x), x.mean(0)
    xs = (x - z) / s
    # H − zμᵀ − μzᵀ + zzᵀ cancels: its rounding is relative to Σ(|x_i| + |z_i|)(|x_j| + |z_j|) / N, not to the
    # result; N + 7 roundings on our side (the sums, the products, three additions, the scaling), N + 5 on the
    # reference's ((x − z) / s rounded twice per factor): both within γ_{N+7} of that, divided by s_i s_j
    a = (x.double().abs() + z.double().abs()) / s.double()
    assert_within_bound(scale_hessian(shift_hessian(h, mean, z), s), xs.T @ xs / len(x),
                        2 * matmul_error_bound(a.T, a.T, extra_roundings=7) / len(x))


def test_quant_grid_is_the_original_weights_grid():
    w = _layer(24, 64).weight.detach()
    scale, shift = quant_grid(w, 4, 16)
    assert scale.shape == shift.shape == (24 * 4, 1)
    groups = w.reshape(-1, 16)
    torch.testing.assert_close(scale, (groups.amax(1, keepdim=True) - groups.amin(1, keepdim=True)) / 15)
    with pytest.raises(ValueError):
        quant_grid(w, 8, 16)


def test_gptq_factorizes_with_at_most_two_float64_hessian_copies_alive():
    """Memory of GPTQ on wide layers (issue #22): the float64 n × n matrices alive at once while the Hessian is
    factorized — 1.9 GB each at FLUX's 15,360 inputs — counted by a dispatch mode holding weak references to every
    n × n float64 result: at most two (one step's input and output), with the same codes as always."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    n = 48

    class LiveSquares(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs, self.peak = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.refs += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                          and t.dtype == torch.float64 and tuple(t.shape) == (n, n)]
            self.peak = max(self.peak, sum(r() is not None for r in self.refs))
            return out

    x = _correlated_inputs(400, n)
    w = _layer(16, n).weight.detach()
    with LiveSquares() as live:
        rounded = gptq_round(w, x.T @ x / len(x), 4)
    assert 1 <= live.peak <= 2
    codes = _reference_gptq(w, x.T @ x / len(x), 4, None, damp=0.01, act_order=True)
    assert torch.equal(rounded.data.long(), codes.long())
