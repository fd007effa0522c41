"""Write tests/data/checkpoints/: small quantized checkpoints saved by the code before the engine redesign (#18), so
that tests/test_regression.py can check that checkpoints saved by earlier versions still load bit-exactly.

    python tests/make_legacy_checkpoints.py      # run from the reference code only
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

FOLDER = Path(__file__).parent / "data" / "checkpoints"
CALIBRATION = dict(num_samples=4, num_inference_steps=4, batch_size=4, class_labels=[0, 1, 2, 3])


def configs() -> dict:
    from diffusers_ptq import HTGConfig, PTQ4DiTConfig, QDiTConfig

    return {
        "ptq4dit-w8a8-attn": PTQ4DiTConfig(quantize_attention=True, **CALIBRATION),
        "htg-w4a8-gptq": HTGConfig(num_groups=2, weight_bits=4, weight_group_size=16, weight_rounding="gptq",
                                   **CALIBRATION),
        "qdit-w4a8": QDiTConfig(bits_per_weight=7, group_sizes=[16, 32, None], search_proxy="output", **CALIBRATION),
    }


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import make_tiny_transformer, randomize_modulation

    from diffusers_ptq import __version__, quantize

    torch.set_num_threads(2)
    shutil.rmtree(FOLDER, ignore_errors=True)
    for name, config in configs().items():
        model = make_tiny_transformer()
        randomize_modulation(model)
        quantize(model, config, progress=False)
        model.save_pretrained(FOLDER / name)  # diffusers' own save: no model card
    (FOLDER / "VERSION").write_text(f"saved by diffusers_ptq {__version__}\n")
    print(f"wrote {sorted(configs())} to {FOLDER}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
