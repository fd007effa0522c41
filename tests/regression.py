"""Regression fingerprints of quantized checkpoints (issue #18: the engine redesign must not change a bit).

Every method config (min-max, SmoothQuant, PTQ4DiT, HTG, Q-DiT), nearest and GPTQ rounding, W8A8 and W4A8, on the
bundled model and on the planted-outlier model, is quantized through the public API (`diffusers_ptq.quantize`) with a
small calibration; the checkpoint's tensors (exactly what `save_pretrained` writes: the state dict plus the processor
tensors) are hashed one by one and combined per block, and the quantization metadata (without the library version)
is hashed too.

Float results depend on the order a CPU's kernels add products (SIMD width, blocking), so the fingerprints are only
comparable on the machine kind that wrote them: `machine_key()` (CPU model, the ISA flags that change kernels, torch
version, thread count) names the set in tests/data/regression-hashes.json. Regenerate for this machine kind with

    python tests/regression.py --write        # adds/replaces this machine kind's entry

only from code whose behaviour is the reference (the hashes were first written from the code before the redesign).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import torch

HASH_FILE = Path(__file__).parent / "data" / "regression-hashes.json"
MODELS = ("bundled", "bundled-outliers")
CALIBRATION = dict(num_samples=4, num_inference_steps=5, batch_size=4, seed=0)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni")


def configs() -> dict:
    """Case name -> a public config: every method × rounding (nearest, GPTQ) × bits (W8A8, W4A8)."""
    from diffusers_ptq import BaselineConfig, HTGConfig, PTQ4DiTConfig, QDiTConfig

    methods = {
        "minmax": lambda **k: BaselineConfig(**k),
        "smoothquant": lambda **k: BaselineConfig(smoothquant_alpha=0.5, **k),
        "ptq4dit": lambda **k: PTQ4DiTConfig(**k),
        "htg": lambda **k: HTGConfig(num_groups=2, **k),
        "qdit": lambda **k: QDiTConfig(search_proxy="output", **k),
    }
    cases = {}
    for method, make in methods.items():
        for rounding in ("nearest", "gptq"):
            for bits in (8, 4):
                extra = {"weight_group_size": 32} if bits == 4 and method != "qdit" else {}  # Q-DiT searches
                cases[f"{method}-w{bits}a8-{rounding}"] = make(weight_bits=bits, act_bits=8, weight_rounding=rounding,
                                                               **extra, **CALIBRATION)
    # the engine's other paths: quantized attention with each fold, other ranges, weight-only, the model proxy,
    # block reconstruction (few iterations), dynamic activations with HTG
    cases["ptq4dit-w8a8-attn"] = PTQ4DiTConfig(quantize_attention=True, **CALIBRATION)
    cases["htg-w4a8-gptq-attn"] = HTGConfig(num_groups=2, weight_bits=4, weight_group_size=32, weight_rounding="gptq",
                                            quantize_attention=True, **CALIBRATION)
    cases["minmax-w8a8-mse"] = BaselineConfig(act_range="mse", **CALIBRATION)
    cases["smoothquant-w8a8-percentile-attn"] = BaselineConfig(smoothquant_alpha=0.5, act_range="percentile",
                                                               quantize_attention=True, **CALIBRATION)
    cases["minmax-w4a16"] = BaselineConfig(weight_bits=4, act_bits=None, **CALIBRATION)
    cases["ptq4dit-w4a8-recon"] = PTQ4DiTConfig(weight_bits=4, weight_group_size=32, weight_rounding="reconstruct",
                                                reconstruct_iters=3, reconstruct_samples=8, reconstruct_batch=4,
                                                **CALIBRATION)
    cases["qdit-w4a8-model"] = QDiTConfig(group_sizes=[32, 64, None], **CALIBRATION)
    cases["qdit-w4a8-htg-gptq"] = QDiTConfig(shift=True, scale=True, search_proxy="relative", weight_rounding="gptq",
                                             **CALIBRATION)
    cases["htg-w8a8-timestep-rows"] = HTGConfig(num_groups=3, linkage="optimal", migration_alpha=None,
                                                **CALIBRATION)
    cases["ptq4dit-w8a8-timestep-rows"] = PTQ4DiTConfig(ssc_rows="timestep", csb_alpha=0.4, **CALIBRATION)
    return cases


def machine_key() -> str:
    """The machine kind float results are reproducible on: CPU model, kernel-relevant ISA flags, torch, threads."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "+".join(f for f in ISA_FLAGS if f in flags) or "none"
    return f"{model} | {isa} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def tensor_digest(tensor: torch.Tensor) -> str:
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _group(name: str) -> str:
    """Fingerprint group of a tensor: its block ("transformer_blocks.3") or top-level module ("proj_out_1")."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "transformer_blocks" else parts[0]


def fingerprint(transformer) -> dict:
    """{"groups": {block or top-level module: digest of its tensors}, "names": digest of the tensor names and
    shapes, "metadata": digest} of what save_pretrained would write for `transformer`."""
    from diffusers_ptq.serialization import METADATA_KEY, TIED_KEY, alias_keys, state_dict_and_metadata

    tensors, header = state_dict_and_metadata(transformer, transformer.state_dict())
    metadata = json.loads(header[METADATA_KEY])
    metadata.pop("library_version", None)
    # identical copies stored once (issue #22) are fingerprinted as every copy, as before: the values are what this
    # guards; the storage format is tested in tests/test_tied_copies.py
    aliases = metadata.pop(TIED_KEY, {})
    tensors.update({alias: tensors[key] for alias, key in alias_keys(aliases, tensors).items()})
    groups: dict[str, hashlib._Hash] = {}
    for name, tensor in sorted(tensors.items()):
        groups.setdefault(_group(name), hashlib.sha256()).update(f"{name}:{tensor_digest(tensor)};".encode())
    names = ";".join(f"{k}{tuple(v.shape)}{v.dtype}" for k, v in sorted(tensors.items()))
    return {"groups": {g: h.hexdigest()[:16] for g, h in groups.items()},
            "names": hashlib.sha256(names.encode()).hexdigest()[:16],
            "metadata": hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]}


def quantized_fingerprint(model: str, config) -> dict:
    from diffusers_ptq import quantize
    from diffusers_ptq.harness.bundled import load_pipeline

    pipe = load_pipeline(model, scheduler="ddim")
    quantize(pipe, config, progress=False)
    return fingerprint(pipe.transformer)


def all_cases() -> list[tuple[str, str]]:
    return [(model, case) for model in MODELS for case in configs()]


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)  # tests/conftest.py runs with 2 threads
    if argv != ["--write"]:
        raise SystemExit(__doc__)
    cases = configs()
    result = {f"{model}/{case}": quantized_fingerprint(model, cases[case]) for model, case in all_cases()}
    data = json.loads(HASH_FILE.read_text()) if HASH_FILE.exists() else {}
    data[machine_key()] = result
    HASH_FILE.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
    print(f"wrote {len(result)} fingerprints for {machine_key()!r} to {HASH_FILE}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
