"""Small helpers shared by the CLI and the benchmark: image grids and the machine description."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> None:
    """Write [N, C, H, W] images in [0, 1] as one PNG grid, nrow images per row."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = img
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if c == 1 else array).save(path)


# environment variables that make oneDNN, ATen (and Inductor's generated code) and MKL use less than the CPU has
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def machine_info() -> dict:
    """CPU model and flags (lscpu), torch version and threads: recorded with every timing."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        info["cpu_flags_of_note"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))
    except (OSError, subprocess.CalledProcessError):
        info["cpu_model"] = platform.processor()
    limits = {k: os.environ[k] for k in ISA_LIMITS if k in os.environ}
    if limits:  # the flags above are the CPU's; these restrict what the libraries use of them
        info["isa_limits"] = limits
    return info


def process_memory() -> dict[str, int | None]:
    """This process's resident bytes now and at their peak (/proc/self/status on Linux; elsewhere the peak from
    getrusage and no current figure)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "peak": int(fields["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError):
        return {"rss": None, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
