"""Checkpoints are bit-identical to those of the code before the engine redesign (issue #18).

The fingerprints in tests/data/regression-hashes.json were written by `python tests/regression.py --write` from the
code before the redesign; each case here quantizes again and compares every checkpoint tensor's hash and the
metadata's. Float results depend on the CPU's summation order, so a machine kind without recorded fingerprints skips
(say `python tests/regression.py --write` on the reference code to add one).
"""

import json

import pytest
import regression


def _recorded() -> dict:
    data = json.loads(regression.HASH_FILE.read_text())
    return data.get(regression.machine_key(), {})


RECORDED = _recorded()
CONFIGS = regression.configs()


def test_every_case_is_recorded_somewhere():
    data = json.loads(regression.HASH_FILE.read_text())
    expected = {f"{m}/{c}" for m, c in regression.all_cases()}
    for machine, cases in data.items():
        assert set(cases) == expected, f"{machine}: recorded cases differ from regression.configs()"


@pytest.mark.parametrize(("model", "case"), regression.all_cases(), ids=lambda v: v)
def test_checkpoint_is_bit_identical_to_the_reference(model, case):
    if not RECORDED:
        pytest.skip(f"no fingerprints recorded for this machine kind ({regression.machine_key()})")
    expected = RECORDED[f"{model}/{case}"]
    got = regression.quantized_fingerprint(model, CONFIGS[case])
    assert got["names"] == expected["names"], "the checkpoint's tensor names, shapes or dtypes changed"
    changed = [g for g in expected["groups"] if got["groups"].get(g) != expected["groups"][g]]
    assert not changed, f"tensors differ from the reference in {changed}"
    assert got["metadata"] == expected["metadata"], "the quantization metadata changed"


LEGACY = sorted(p.name for p in (regression.HASH_FILE.parent / "checkpoints").iterdir() if p.is_dir())


def test_legacy_checkpoints_are_present():
    assert LEGACY == ["htg-w4a8-gptq", "ptq4dit-w8a8-attn", "qdit-w4a8"]


@pytest.mark.parametrize("name", LEGACY)
def test_checkpoint_saved_by_the_reference_code_loads_bit_exactly(name):
    """tests/data/checkpoints/ (tests/make_legacy_checkpoints.py, before the redesign): every tensor in the file comes
    back bit for bit in what the reloaded model would save, and the model runs."""
    import torch
    from conftest import tiny_inputs
    from diffusers import DiTTransformer2DModel
    from safetensors.torch import load_file

    from diffusers_ptq.serialization import state_dict_and_metadata

    folder = regression.HASH_FILE.parent / "checkpoints" / name
    saved = load_file(folder / "diffusion_pytorch_model.safetensors")
    model = DiTTransformer2DModel.from_pretrained(folder)
    tensors, _ = state_dict_and_metadata(model, model.state_dict())
    assert sorted(tensors) == sorted(saved)
    assert all(torch.equal(tensors[k], saved[k]) for k in saved), [k for k in saved if not torch.equal(tensors[k], saved[k])]
    with torch.no_grad():
        out = model(**tiny_inputs()).sample
    assert torch.isfinite(out).all()
