"""The chosen group size per layer (as Q-DiT's Fig. 8): the proxy search and the classifier-FID-scored evolutionary
search (docs/results/qdit-fid-search.json), plus the searched rows of the benchmark (docs/results/bundled-qdit.json)
when present. Writes docs/results/qdit-group-sizes.png.

    python scripts/plot_qdit_groups.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path("docs/results")
search = json.loads((RESULTS / "qdit-fid-search.json").read_text())
names, shapes = search["layers"], search["shapes"]
series = {f"proxy search ({search['proxy_search']['bits_per_weight']:.2f} b/w)": search["proxy_search"]["group_sizes"],
          f"cFID-scored evolutionary ({search['fid_search']['bits_per_weight']:.2f} b/w)":
              search["fid_search"]["group_sizes"]}
bench = RESULTS / "bundled-qdit.json"
if bench.is_file():
    for row in json.loads(bench.read_text())["rows"][1:]:
        config = row.get("config") or {}
        if config.get("group_search_bits") == 5.0 and row.get("group_sizes") and not config.get("htg_shift"):
            series["proxy search, 5.0 b/w budget"] = row["group_sizes"]
            break


def short(name: str) -> str:
    if not name.startswith("transformer_blocks."):
        return name
    _, block, rest = name.split(".", 2)
    rest = {"norm1.linear": "adaLN", "attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v",
            "attn1.to_out.0": "out", "ff.net.0.proj": "fc1", "ff.net.2": "fc2"}.get(rest, rest)
    return f"{block}.{rest}"


def level(name: str, g) -> float:
    return math.log2(g if g is not None else shapes[name][1])


fig, ax = plt.subplots(figsize=(14, 4.2))
markers = ["o", "x", "s"]
for i, (label, sizes) in enumerate(series.items()):
    ax.plot(range(len(names)), [level(n, sizes[n]) for n in names], markers[i % 3], label=label,
            markersize=7 if i == 0 else 6, mfc="none" if i == 0 else None, alpha=0.85)
ticks = [5, 6, 7, 7.585, 8, 9.585]
ax.set_yticks(ticks, ["32", "64", "128", "192 = ch (192 in)", "256", "768 = ch (768 in)"])
ax.set_xticks(range(len(names)), [short(n) for n in names], rotation=90, fontsize=7)
ax.set_ylabel("group size (log scale; ch = per output channel)")
ax.set_title(f"Q-DiT group size per layer, bundled MNIST DiT, W4A8, budget {search['budget_bits_per_weight']} bits/weight")
ax.grid(alpha=0.3)
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(RESULTS / "qdit-group-sizes.png", dpi=120)
print("written", RESULTS / "qdit-group-sizes.png")
