import copy
import os

# Kernel choice by registry priority in the tests (and the processes they start), so that which kernel runs a layer
# does not depend on timings; tests/test_kernels.py checks the measured choice (the library's default) itself.
os.environ.setdefault("DIFFUSERS_PTQ_KERNEL_CHOICE", "priority")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiTTransformer2DModel  # noqa: E402

torch.set_num_threads(2)


# --- float rounding bounds for tolerances (issue #17) ---------------------------------------------------------------
# CI runs on different CPUs (AVX2 EPYC, AVX512-VNNI Xeon, maybe ARM); their BLAS kernels add a GEMM's products in
# different orders (SIMD width, blocking, FMA), so float32 results differ between machines by rounding. A tolerance
# for float32 arithmetic must hold for *every* order: derive it from the a-priori bound below, not from what one
# machine gave. tests/test_tolerances.py checks the bound against adversarial data in several orders.


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u = 2^-p for a p-bit significand: 2^-24 for float32, 2^-53 for float64 (half of torch.finfo(dtype).eps)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """γ_n = n·u / (1 − n·u): a quantity that went through n roundings, each fl(x∘y) = (x∘y)(1 + δ) with |δ| ≤ u,
    has relative error at most γ_n (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Lemma 3.1)."""
    u = unit_roundoff(dtype)
    if n < 0 or n * u >= 1:
        raise ValueError(f"gamma needs 0 <= n·u < 1, got n={n} (u={u:g})")
    return n * u / (1 - n * u)


def matmul_error_bound(a: torch.Tensor, b: torch.Tensor, *, scale=None, bias=None, extra_roundings: int = 0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elementwise a-priori bound on |computed − exact| for `scale · (a @ b.T) + bias` computed in `dtype`.

    a: [..., K], b: [N, K] (the layout of F.linear(a, b)); scale: None or broadcastable to the [..., N] result;
    bias: None or [N]. Returns a float64 tensor shaped like the result:

        γ_n · (|scale| · (|a| @ |b|.T) + |bias|),   n = K + extra_roundings + (scale given) + (bias given)

    Higham §3.1 (the inner-product bound): a length-K dot product computed in floating point, in ANY summation order (sequential,
    reversed, pairwise, blocked, several SIMD accumulators, with or without FMA), has |error| ≤ γ_K · Σ|a_i b_i|:
    every product goes through one multiply and at most K − 1 additions. Multiplying the sum by a scale, or adding a
    bias as one more term, is one more rounding each (counted automatically). `extra_roundings` counts roundings
    the caller's exact value did not have, e.g. 2 when the exact value is computed from float64 inputs that were
    rounded to float32 (one rounding per factor of every product), 1 for a scale that was itself rounded.
    Σ|a||b| is computed in float64 (its own rounding, ~K·2^-53 relative, is negligible next to γ_n in float32).

    Assumptions (name them where a test relies on this): IEEE arithmetic in `dtype` with round-to-nearest; no
    overflow, underflow or subnormals (the bound has no absolute term); the GEMM really accumulates in `dtype` —
    not in TF32/bfloat16 (torch.get_float32_matmul_precision() == "highest", the default) nor in float16; the
    inputs given here are the exact values the computation started from (round them first, or count their
    rounding in extra_roundings). It bounds the worst case over orders and data: typical errors are ~√K·u·Σ|ab|,
    and recursive summation can come within a few percent of it (tests/test_tolerances.py shows both).
    """
    a64, b64 = a.detach().double().abs(), b.detach().double().abs()
    k = a64.shape[-1]
    if b64.shape[-1] != k:
        raise ValueError(f"inner dimensions differ: a {tuple(a.shape)}, b {tuple(b.shape)} (b is [N, K])")
    n = k + extra_roundings
    total = a64 @ b64.T
    if scale is not None:
        total = total * torch.as_tensor(scale).detach().double().abs()
        n += 1
    if bias is not None:
        total = total + torch.as_tensor(bias).detach().double().abs()
        n += 1
    return gamma(n, dtype) * total


def assert_within_bound(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> None:
    """|actual − expected| ≤ bound elementwise (bound: a tensor broadcastable to them, or a number), compared in
    float64; the message names the element furthest over its bound. For bounds from matmul_error_bound."""
    err = (torch.as_tensor(actual).detach().double() - torch.as_tensor(expected).detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    assert err.shape == torch.as_tensor(expected).shape, (err.shape, torch.as_tensor(expected).shape)
    ok = err <= bound  # False for NaN too
    if not bool(ok.all()):
        worst = int(torch.where(ok, torch.zeros_like(err), err / bound).nan_to_num(float("inf")).argmax())
        raise AssertionError(f"{what + ': ' if what else ''}error {float(err.flatten()[worst]):.3g} > bound "
                             f"{float(bound.flatten()[worst]):.3g} ({int((~ok).sum())} of {ok.numel()} elements): "
                             "more than float rounding can explain")


def make_tiny_transformer(seed: int = 0) -> DiTTransformer2DModel:
    """A random DiT built from a config (2 blocks, 32 channels): fast, with nonzero adaLN so stats differ."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
    return model.eval()


@pytest.fixture
def tiny_transformer() -> DiTTransformer2DModel:
    return make_tiny_transformer()


@pytest.fixture(scope="session")
def bundled_pipe():
    from diffusers_ptq.harness.bundled import load_pipeline

    return load_pipeline("bundled")


def bundled_relative_error(pipe, config):
    """Quantize a copy of the pipeline's transformer with `config`; its relative output MSE against the float one
    on 8 fixed inputs (timesteps 999..20, conditional and unconditional), and the quantization report."""
    from diffusers_ptq.api import quantize_transformer

    model = copy.deepcopy(pipe.transformer)
    report = quantize_transformer(model, config, id2label={i: str(i) for i in range(10)},
                                  scheduler_config=pipe.scheduler.config, progress=False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 8, 8, generator=gen)
    t = torch.tensor([999, 800, 600, 400, 300, 200, 100, 20])
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 1000, 1000])
    with torch.no_grad():
        reference = pipe.transformer(x, timestep=t, class_labels=labels).sample
        out = model(x, timestep=t, class_labels=labels).sample
    return float((out - reference).pow(2).mean() / reference.pow(2).mean()), report


def randomize_modulation(model, seed: int = 1, std: float = 0.2) -> None:
    """adaLN-Zero starts at zero: give the modulation and final layers real weights so every fold is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def tiny_inputs() -> dict:
    """A fixed batch of three samples at three timesteps (one unconditional) for the tiny transformer."""
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(3, 4, 4, 4, generator=gen), timestep=torch.tensor([999, 500, 3]),
                class_labels=torch.tensor([0, 5, 1000]))


def reload_bit_exact(model, folder, monkeypatch) -> DiTTransformer2DModel:
    """Save a quantized transformer, reload it without calibrating or unpickling, and check that the output and
    every state-dict tensor are bit-identical; returns the reloaded model."""
    with torch.no_grad():
        expected = model(**tiny_inputs()).sample
    model.save_pretrained(folder)
    with monkeypatch.context() as patch:
        patch.setattr("diffusers_ptq.api.calibrate", lambda *a, **k: pytest.fail("calibrated on reload"))
        patch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
        reloaded = DiTTransformer2DModel.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(**tiny_inputs()).sample, expected)
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return reloaded


def assert_fold_exact(model, target, forward, seed: int, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Fold a random smoothing vector s ∈ [0.5, 2) and a random per-channel shift into `target` of a copy of `model`
    (reparam.apply_smoothing, reparam.shift_input): something must change, and `forward(copy)` must equal
    `forward(model)` to float tolerance (callers state the bound behind rtol/atol)."""
    from diffusers_ptq.reparam import apply_smoothing, shift_input

    reference = forward(model)
    width = model.get_submodule(target.consumers[0]).in_features if target.columns is None else \
        target.columns[1] - target.columns[0]
    gen = torch.Generator().manual_seed(seed)
    folded = copy.deepcopy(model)
    with torch.no_grad():
        apply_smoothing(folded, target, 0.5 + 1.5 * torch.rand(width, generator=gen))
        shift_input(folded, target, torch.randn(width, generator=gen))
    assert any(not torch.equal(p, model.get_parameter(n)) for n, p in folded.named_parameters()), "nothing folded"
    torch.testing.assert_close(forward(folded), reference, rtol=rtol, atol=atol)
