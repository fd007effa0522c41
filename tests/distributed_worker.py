"""Worker for tests/test_distributed.py: calibrate and quantize the tiny DiT, dump what each process holds.

Run as `python tests/distributed_worker.py OUT` (one process) or under `torchrun --nproc_per_node 2` (the same
script, one shard of the samples per process). Every process writes OUT/rank{r}.pt (its statistics, Hessians,
attention absmax and the quantized model's flattened state dict) and OUT/state-rank{r}/ (that state saved directly
with diffusers' ModelMixin.save_pretrained, which every process runs), and asks the guarded save,
diffusers_ptq.save_pretrained, to write OUT/ckpt-rank{r}/ (only the main process may write it); OUT/recon-rank{r}/
holds a W4A8 block-reconstruction model (reconstruction is not split; the main process's result is broadcast);
OUT/seq-state-rank{r}/ and OUT/seq-rank{r}/ the same W8A8 GPTQ model quantized block by block (sequential=True).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_tiny_transformer, randomize_modulation  # noqa: E402

from diffusers_ptq import distributed, save_pretrained  # noqa: E402
from diffusers_ptq.attention import install_quant_attention  # noqa: E402
from diffusers_ptq.calibration import calibrate, select_linears  # noqa: E402
from diffusers_ptq.config import PTQ4DiTConfig  # noqa: E402
from diffusers_ptq.quantizer import quantize  # noqa: E402
from diffusers_ptq.rounding import HessianRecorder  # noqa: E402

STEPS, BATCH = 3, 2
SAMPLES = 4  # 2 processes: shards {0, 1} and {2, 3}, the single process's batches
FEW = 1  # 2 processes: the second one has no sample at all


def _stats(stats) -> dict:
    return {name: {k: getattr(s, k) for k in ("max", "min", "absmax", "sample_absmax", "token_samples")}
            for name, s in stats.layers.items()}


def _calibrate(model, num_samples: int, tokens: int) -> tuple[dict, dict]:
    with HessianRecorder(select_linears(model)) as recorder:
        stats = calibrate(model, num_inference_steps=STEPS, num_samples=num_samples, batch_size=BATCH, seed=3,
                          guidance_scale=1.5, sample_rows=True, tokens_per_call=tokens, progress=False)
    return _stats(stats), recorder.hessians()


def main(out: Path) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # conftest asks for 2 on import
    rank, world = distributed.process_info()
    model = make_tiny_transformer()
    randomize_modulation(model)
    result = {"world": world}
    result["stats"], result["hessians"] = _calibrate(copy.deepcopy(model), SAMPLES, tokens=4)

    few = copy.deepcopy(model)  # an empty shard on process 1: every collective must still match
    processors = install_quant_attention(few)
    result["few_stats"], result["few_hessians"] = _calibrate(few, FEW, tokens=0)
    result["few_attention"] = {f"{n}.{k}": v for n, p in processors.items() for k, v in p.absmax.items()}

    config = PTQ4DiTConfig(weight_bits=8, act_bits=8, weight_rounding="gptq", quantize_attention=True,
                           num_samples=SAMPLES, num_inference_steps=STEPS, batch_size=BATCH, seed=1)
    quantized = quantize(copy.deepcopy(model), config, progress=False)
    from diffusers import ModelMixin

    ModelMixin.save_pretrained(quantized, str(out / f"state-rank{rank}"), safe_serialization=True)  # unguarded
    save_pretrained(quantized, str(out / f"ckpt-rank{rank}"))  # guarded: the main process only
    sequential = PTQ4DiTConfig(weight_bits=8, act_bits=8, weight_rounding="gptq", quantize_attention=True,
                               num_samples=SAMPLES, num_inference_steps=STEPS, batch_size=BATCH, seed=1,
                               sequential=True)  # block by block, each process replaying its own cached calls
    block_by_block = quantize(copy.deepcopy(model), sequential, progress=False)
    ModelMixin.save_pretrained(block_by_block, str(out / f"seq-state-rank{rank}"), safe_serialization=True)
    save_pretrained(block_by_block, str(out / f"seq-rank{rank}"))
    recon = PTQ4DiTConfig(weight_bits=4, act_bits=8, weight_rounding="reconstruct", reconstruct_iters=20,
                          reconstruct_samples=16, reconstruct_batch=8, num_samples=SAMPLES, num_inference_steps=STEPS,
                          batch_size=BATCH)
    reconstructed = quantize(copy.deepcopy(model), recon, progress=False)  # not split: the main's result broadcast
    ModelMixin.save_pretrained(reconstructed, str(out / f"recon-rank{rank}"), safe_serialization=True)
    distributed.wait_for_everyone()
    result["process_group"] = torch.distributed.is_initialized()
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
