"""Plot one layer's channel ranges across the sampling steps before and after HTG, with the chosen groups.

    python scripts/plot_htg.py --model bundled-outliers --layer transformer_blocks.3.ff.net.0.proj \
        --output docs/results/htg-ranges.png

Needs matplotlib (`pip install -e '.[plot]'`). Calibrates the float model (no quantization), computes HTG's
group shifts and scale for the target whose first consumer is `--layer`, and draws, per step, the [min, max]
of the most extreme channels and the band of all channels, before and after X̃ = (X − z̄_g(t)) / s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusers_ptq.calibration import calibrate
from diffusers_ptq.harness.bundled import load_pipeline
from diffusers_ptq.methods import htg
from diffusers_ptq.models import adapter_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled-outliers")
    parser.add_argument("--layer", default="transformer_blocks.3.ff.net.0.proj")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--channels", type=int, default=6, help="how many of the most extreme channels to draw")
    parser.add_argument("--output", default="docs/results/htg-ranges.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipe = load_pipeline(args.model)
    transformer = pipe.transformer
    target = next(t for t in adapter_for(transformer).smoothing_targets(transformer) if t.consumers[0] == args.layer)
    id2label = {v: k for k, v in pipe.labels.items()} if pipe.labels else None
    stats = calibrate(transformer, scheduler_config=pipe.scheduler.config, num_inference_steps=args.steps,
                      num_samples=args.samples, id2label=id2label, include=[args.layer])
    layer = stats.layers[args.layer]
    weights = [transformer.get_submodule(c).weight.detach() for c in target.consumers]
    transform = htg.HTG().vectors(layer, weights, stats.timesteps)
    per_step = transform.shifts[htg.group_index(transform.starts, len(stats.timesteps))]
    after_max, after_min = (layer.max - per_step) / transform.scale, (layer.min - per_step) / transform.scale

    steps = torch.arange(len(stats.timesteps))
    extreme = layer.absmax.amax(0).topk(args.channels).indices
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    for ax, (hi, lo), title in ((axes[0], (layer.max, layer.min), "before: X"),
                                (axes[1], (after_max, after_min), "after HTG: (X − z̄_g(t)) / s")):
        ax.fill_between(steps, lo.amin(1), hi.amax(1), color="0.85", label="all channels: min..max")
        ax.fill_between(steps, lo.median(1).values, hi.median(1).values, color="0.6", label="median channel")
        for i, c in enumerate(extreme.tolist()):
            color = plt.cm.tab10(i)
            ax.plot(steps, hi[:, c], color=color, lw=1.2, label=f"channel {c}")
            ax.plot(steps, lo[:, c], color=color, lw=1.2, ls=":")
        for start in transform.starts[1:]:
            ax.axvline(start - 0.5, color="k", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("sampling step (0 = noisiest; dashed: group boundaries)")
        ax.set_ylabel("per-step channel max (solid) / min (dotted)")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{args.model}: input of {args.layer}, {args.steps} DDIM steps, "
                 f"{len(transform.starts)} groups (Ward), EMA 0.99, migration 0.5")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    summary = {
        "model": args.model, "layer": args.layer, "group_starts": transform.starts,
        "group_edges_timesteps": transform.edges.tolist(),
        "absmax_before": float(layer.absmax.max()), "absmax_after": float(torch.maximum(after_max.abs(), after_min.abs()).max()),
        "max_over_median_before": float(layer.absmax.amax(0).max() / layer.absmax.amax(0).median()),
        "max_over_median_after": float((lambda a: a.max() / a.median())(torch.maximum(after_max.abs(), after_min.abs()).amax(0))),
    }
    Path(args.output).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
