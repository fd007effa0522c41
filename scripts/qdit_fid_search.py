"""Q-DiT's group-size search two ways on the bundled model, at the same budget (docs/qdit.md):

1. the proxy search of the engine (`QuantConfig(group_search_bits=B)`, proxy "model": one calibration run, then
   each layer × candidate's transformer-output error; methods/qdit.search_group_sizes), timed;
2. Q-DiT's own kind of search: evolutionary (methods/qdit.evolutionary_search), every candidate configuration
   scored by the classifier-FID of N generated samples (dynamic per-token activations, round-to-nearest weights).

Both choices are then scored the same way (cFID and PSNR vs FP on the same N samples). Writes
docs/results/qdit-fid-search.json (read by the `qdit` benchmark suite for its FID-searched row) and .md.
Resumable: every evaluated configuration is cached in runs/qdit-fid-search-cache.json (the search is
deterministic given --seed, so a restart replays the cached scores).

    OMP_NUM_THREADS=1 python scripts/qdit_fid_search.py --samples 100 --population 6 --generations 2
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.config import GROUP_CANDIDATES, QuantConfig
from diffusers_ptq.harness.bundled import load_pipeline
from diffusers_ptq.harness.evaluation import class_ids_of, generate_images, score_images, write_json
from diffusers_ptq.harness.utils import machine_info
from diffusers_ptq.methods import qdit
from diffusers_ptq.models.dit import balanced_labels
from diffusers_ptq.modules import QuantLinear

parser = argparse.ArgumentParser()
parser.add_argument("--budget", type=float, default=4.5)
parser.add_argument("--samples", type=int, default=100)
parser.add_argument("--population", type=int, default=6)
parser.add_argument("--generations", type=int, default=2)
parser.add_argument("--mutation", type=float, default=0.1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--output", default="docs/results/qdit-fid-search.json")
parser.add_argument("--cache", default="runs/qdit-fid-search-cache.json")
args = parser.parse_args()

torch.set_num_threads(1)
pipe = load_pipeline("bundled")
float_transformer = copy.deepcopy(pipe.transformer)
labels = balanced_labels(class_ids_of(pipe), args.samples)
sample = dict(seed=args.seed, num_inference_steps=50, guidance_scale=1.5, batch_size=250, progress=False)
id2label = {v: k for k, v in pipe.labels.items()} if pipe.labels else None
t0 = time.time()
fp_images = generate_images(pipe, labels, **sample)
fp_scores = score_images(fp_images, labels, fp_images, True)  # cFID of N samples is biased upwards: compare to this
print(f"FP reference: {time.time() - t0:.0f} s, cFID {fp_scores['classifier_fid']:.3f}", flush=True)

cache_path = Path(args.cache)
cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}


def key(choice: dict) -> str:
    return json.dumps({n: choice[n] for n in sorted(choice)})


def evaluate(config: QuantConfig) -> tuple[dict, dict]:
    """(scores of N samples from the float model quantized with `config`, report fields)."""
    pipe.transformer = copy.deepcopy(float_transformer)
    report = quantize_transformer(pipe.transformer, config, id2label=id2label,
                                  scheduler_config=pipe.scheduler.config, progress=False)
    t = time.time()
    images = generate_images(pipe, labels, **sample)
    scores = score_images(images, labels, fp_images, True)
    scores["sampling_seconds"] = time.time() - t
    return scores, {"group_sizes": report.group_sizes, "calibration_seconds": report.calibration_seconds,
                    "search_seconds": report.search_seconds, "total_seconds": report.total_seconds}


def score_choice(choice: dict) -> float:
    k = key(choice)
    if k not in cache:
        scores, _ = evaluate(QuantConfig(weight_bits=4, act_bits=8, act_dynamic=True, weight_group_sizes=choice))
        cache[k] = scores
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache))
        print(f"  cFID {scores['classifier_fid']:.3f}  PSNR {scores['psnr_db']:.2f}  "
              f"({scores['sampling_seconds']:.0f} s)", flush=True)
    return cache[k]["classifier_fid"]


# the quantized layers and their shapes: those a default config quantizes
probe = copy.deepcopy(float_transformer)
quantize_transformer(probe, QuantConfig(weight_bits=4, act_bits=None), progress=False)
names = [n for n, m in probe.named_modules() if isinstance(m, QuantLinear)]
del probe
shapes = {n: (float_transformer.get_submodule(n).out_features, float_transformer.get_submodule(n).in_features)
          for n in names}
options = {n: qdit.candidate_sizes(shapes[n][1], GROUP_CANDIDATES) for n in names}

# 1. the proxy search (the engine's), timed end to end: calibration + per-layer errors + knapsack
proxy_config = QuantConfig(weight_bits=4, act_bits=8, act_dynamic=True, group_search_bits=args.budget)
if "proxy" in cache:  # a resumed run: the proxy search's own evaluation, with its timings
    proxy_scores, proxy_report = cache["proxy"]["scores"], cache["proxy"]["report"]
else:
    proxy_scores, proxy_report = evaluate(proxy_config)
    cache["proxy"] = {"scores": proxy_scores, "report": proxy_report}
proxy_choice = {n: proxy_report["group_sizes"][n] for n in names}
cache.setdefault(key(proxy_choice), proxy_scores)
print(f"proxy search: {proxy_report['total_seconds']:.1f} s (calibration {proxy_report['calibration_seconds']:.1f} s, "
      f"search {proxy_report['search_seconds']:.1f} s); cFID {proxy_scores['classifier_fid']:.3f}", flush=True)

# 2. the evolutionary search scored by classifier-FID
t_fid = time.time()
best, best_score, history = qdit.evolutionary_search(
    score_choice, options, shapes, args.budget, population=args.population, generations=args.generations,
    mutation=args.mutation, seed=args.seed,
    log=lambda e: print(f"gen {e['generation']}: cFID {e['score']:.3f}, {e['bits_per_weight']:.3f} bits", flush=True))
fid_seconds = time.time() - t_fid  # (replayed evaluations from the cache count ~0 s: see the evaluations' own times)
evaluations = [cache[key(h["group_sizes"])] for h in history]
result = {
    "budget_bits_per_weight": args.budget, "samples": args.samples, "seed": args.seed, "fp_scores": fp_scores,
    "candidates": [g for g in GROUP_CANDIDATES], "layers": names, "shapes": shapes,
    "proxy_search": {"group_sizes": proxy_choice, "bits_per_weight": qdit.average_bits(shapes, proxy_choice),
                     "proxy": proxy_config.group_search_proxy, **{k: proxy_report[k] for k in (
                         "calibration_seconds", "search_seconds", "total_seconds")}, "scores": proxy_scores},
    "fid_search": {"group_sizes": best, "bits_per_weight": qdit.average_bits(shapes, best),
                   "classifier_fid": best_score, "scores": cache[key(best)], "population": args.population,
                   "generations": args.generations, "mutation": args.mutation, "evaluations": len(history),
                   "wall_seconds": fid_seconds,
                   "evaluation_seconds": sum(e["sampling_seconds"] for e in evaluations),
                   "history": [{**h, "psnr_db": cache[key(h["group_sizes"])]["psnr_db"]} for h in history]},
    "machine": machine_info(),
}
write_json(result, args.output)


def fmt(g):
    return "ch" if g is None else str(g)


lines = [f"# Q-DiT group-size search: proxy vs classifier-FID (bundled model, {args.budget} bits per weight)", "",
         f"Scored on {args.samples} samples (50 DDIM steps, guidance 1.5, seed {args.seed}), W4A8 with dynamic "
         "per-token activations, round-to-nearest weights.", "",
         f"FP32 on the same {args.samples} samples: cFID {fp_scores['classifier_fid']:.3f}.", "",
         "| search | wall time | evaluations | bits/weight | cFID (N) | PSNR vs FP (N) |", "|---|---|---|---|---|---|",
         f"| proxy (\"model\") | {proxy_report['total_seconds']:.1f} s (search {proxy_report['search_seconds']:.1f} s) "
         f"| 1 calibration run | {result['proxy_search']['bits_per_weight']:.3f} | "
         f"{proxy_scores['classifier_fid']:.3f} | {proxy_scores['psnr_db']:.2f} |",
         f"| evolutionary, cFID-scored | {result['fid_search']['evaluation_seconds']:.0f} s of sampling | {len(history)} "
         f"| {result['fid_search']['bits_per_weight']:.3f} | {best_score:.3f} | {cache[key(best)]['psnr_db']:.2f} |", "",
         "| layer | in | proxy | cFID search |", "|---|---|---|---|"]
lines += [f"| {n} | {shapes[n][1]} | {fmt(proxy_choice[n])} | {fmt(best[n])} |" for n in names]
Path(args.output).with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
