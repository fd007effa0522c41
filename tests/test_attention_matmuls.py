"""Quantized attention's matmuls on integers (issue #21, point 2): the codes' path equals an int64 computation of
the same quantized attention bit for bit (the softmax and the scaling are the same float ops on the same exact
integers), on `torch._int_mm` and on the float32 fallback alike while the sums stay below 2^24; beyond that the
integer path stays exact and the float one within its rounding bound; the model's output does not depend on which
of the two the machine picks."""

import pytest
import torch
from conftest import gamma, tiny_inputs

from diffusers_ptq import kernels
from diffusers_ptq.attention import (
    MEASURED_ATTENTION,
    PROBABILITY_OFFSET,
    attention_matmul,
    attention_on_codes,
    install_quant_attention,
)

INT_MM_EXACT = kernels.int_mm_exact("cpu")
needs_int_mm = pytest.mark.skipif(not INT_MM_EXACT, reason="torch._int_mm is not exact on this CPU")


def _inputs(batch, heads, tokens, dim, seed=0):
    """Q, K, V whose codes reach the clamp (|x| / scale up to ~5 × 127) and per-tensor scales."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=gen) * 2 for _ in range(3))
    scales = {name: torch.tensor(2.0 / 127) for name in "qkv"}
    return q, k, v, scales


def int64_attention(q, k, v, scales, softmax_scale, bits=8):
    """The quantized attention with int64 products, one head at a time; softmax and scaling as `attention_on_codes`
    writes them (those float ops on exact integers are the definition, not an approximation)."""
    b, h, t, d = q.shape
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    qc, kc, vc = (torch.clamp(torch.round(x / scales[n]), lo, hi).long().reshape(b * h, t, d)
                  for n, x in zip("qkv", (q, k, v)))
    levels = 2**bits - 1
    out = []
    for i in range(b * h):
        logits = (qc[i] @ kc[i].T).float() * (scales["q"] * scales["k"] * softmax_scale)
        p = torch.round(torch.softmax(logits, dim=-1) * levels).long()
        out.append((p @ vc[i]).float())
    return torch.stack(out).view(b, h, t, d) * (scales["v"] / levels)


@pytest.mark.parametrize("integer", [pytest.param(True, marks=needs_int_mm), False], ids=["int_mm", "float"])
def test_codes_path_equals_the_int64_computation(integer):
    q, k, v, scales = _inputs(2, 3, 64, 72)  # sums: D·2^14 = 1.2e6 and T·255·128 = 2.1e6, below 2^24
    assert (q / scales["q"]).abs().max() > 128  # the clamp is reached
    with torch.no_grad():
        got = attention_on_codes(q, k, v, scales, 72**-0.5, integer=integer)
    assert torch.equal(got, int64_attention(q, k, v, scales, 72**-0.5))


@needs_int_mm
def test_beyond_float_exactness_the_integer_path_stays_exact():
    """600 tokens: the output sums reach 600·255·128 ≈ 2^24.2, where float32 rounds: the int_mm path still equals
    the int64 computation; the float path is within γ_(T+3) of Σ|terms| (a rounding per addition, the offset term, the scaling)."""
    q, k, v, scales = _inputs(1, 2, 600, 16, seed=1)
    v = v.abs() * 10  # every V code at +127, so the sums are as large as they get
    with torch.no_grad():
        exact = int64_attention(q, k, v, scales, 0.25)
        assert torch.equal(attention_on_codes(q, k, v, scales, 0.25, integer=True), exact)
        rounded = attention_on_codes(q, k, v, scales, 0.25, integer=False)
    # |Σ (p − 128)·v| + 128·|Σ v| ≤ 2·T·128·127, times the output scale s_v / 255
    bound = gamma(600 + 3) * 2 * 600 * PROBABILITY_OFFSET * 127 * float(scales["v"]) / 255
    assert (rounded - exact).abs().max() <= bound


def test_the_choice_is_measured_and_recorded():
    choice = attention_matmul(torch.device("cpu"), 4, 64, 32)
    record = MEASURED_ATTENTION[("cpu", 4, 64, 32)]
    assert record["choice"] == choice
    if not INT_MM_EXACT:
        assert choice == "float"
    elif kernels.KERNEL_CHOICE == "measured":
        assert choice == min(("int_mm", "float"), key=record.get)


@needs_int_mm
def test_a_shape_int_mm_refuses_takes_the_float_matmuls(monkeypatch):
    """`_int_mm` exact by the probe but refusing a shape (CUDA's wants multiples of 8): that shape takes float32."""
    real = torch._int_mm

    def picky(a, b, *args, **kwargs):
        if a.shape[-1] % 8 or b.shape[-1] % 8:
            raise RuntimeError("self.size(1) needs to be greater than 16 and a multiple of 8")
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_int_mm", picky)
    assert attention_matmul(torch.device("cpu"), 2, 20, 12) == "float"  # D = 12: QKᵀ's K dimension refused
    assert MEASURED_ATTENTION[("cpu", 2, 20, 12)] == {"choice": "float"}


def test_the_model_output_does_not_depend_on_the_matmul(tiny_transformer, monkeypatch):
    """A frozen quantized attention runs the same integers on either kernel: the same output, bit for bit."""
    processors = install_quant_attention(tiny_transformer)
    inputs = tiny_inputs()
    with torch.no_grad():
        tiny_transformer(**inputs)
        for p in processors.values():
            p.freeze()
        outputs = {}
        for choice in (["int_mm"] if INT_MM_EXACT else []) + ["float"]:
            monkeypatch.setattr("diffusers_ptq.attention.attention_matmul", lambda *_shape, c=choice: c)
            outputs[choice] = tiny_transformer(**inputs).sample
    assert all(torch.equal(out, outputs["float"]) for out in outputs.values())


@needs_int_mm
def test_int8_bmm_is_exact():
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(-128, 128, (3, 40, 72), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (3, 72, 24), generator=gen, dtype=torch.int8)
    assert torch.equal(kernels.int8_bmm(a, b).long(), a.long() @ b.long())


def flip_bound(q, k, v, scales, softmax_scale, eps):
    """Per output element, the most a compiled softmax can move it: probabilities whose code round(P·255) could
    differ under a relative error `eps` of P (P·255 within eps·P·255 of a rounding boundary) each move the output
    by at most one code step times |v| (s_v / 255 · |code(v)|); from float64 probabilities."""
    b, h, t, d = q.shape
    qc, kc, vc = (torch.clamp(torch.round(x / scales[n]), -128, 127).double().reshape(b * h, t, d)
                  for n, x in zip("qkv", (q, k, v)))
    scaled = torch.softmax(qc @ kc.transpose(1, 2) * float(scales["q"] * scales["k"] * softmax_scale), -1) * 255
    ambiguous = ((scaled - torch.floor(scaled) - 0.5).abs() <= eps * scaled + 1e-9).double()
    return (ambiguous @ vc.abs()).view(b, h, t, d) * float(scales["v"]) / 255


@needs_int_mm
def test_compiled_attention_calls_the_batched_op_once_per_matmul():
    """Under torch.compile the heads are not unrolled into the graph (that cost minutes of compile time on
    DiT-XL/2): two opaque `int8_bmm` calls; the output equals the int64 computation except where Inductor's own
    softmax (a vectorized exp within 1 ulp, a sum of T terms, a division: relative error within γ_(T+64) for
    logits spanning less than 50) moves a probability code across a rounding boundary."""
    from torch._inductor.utils import run_and_get_code

    q, k, v, scales = _inputs(2, 3, 64, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(lambda q, k, v: attention_on_codes(q, k, v, scales, 32**-0.5), fullgraph=True)
        out, (code,) = run_and_get_code(compiled, q, k, v)
        reference = int64_attention(q, k, v, scales, 32**-0.5)
    assert code.count("torch.ops.diffusers_ptq.int8_bmm.default(") == 2 and "_int_mm" not in code
    bound = flip_bound(q, k, v, scales, 32**-0.5, gamma(64 + 64)) + gamma(4) * reference.abs()
    assert ((out - reference).abs() <= bound).all()
