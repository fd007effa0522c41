"""Quantization memory (issue #22, point 2): once the engine has packed a layer, nothing keeps its float weight, its
rounded copy or its Hessian alive — checked with weak references, not with the process's resident size (which
depends on the allocator; `bench --footprint` measures that). Loading a pre-quantized checkpoint keeps the stored
weights on disk, in safetensors' map of the file, with only the kernel's form in memory — checked on the file's own
mappings in /proc/self/smaps (Linux), where the pages a tensor occupies are counted exactly."""

import gc
import mmap
import os
import weakref

import pytest
import torch
from conftest import make_tiny_transformer
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from diffusers_ptq import BaselineConfig, HTGConfig, quantize
from diffusers_ptq.kernels import stored_data
from diffusers_ptq.memory import (
    _madvise,
    file_mapping,
    page_flags,
    release_file_pages,
    return_freed_memory,
    whole_pages,
    written_pages,
)
from diffusers_ptq.modules import quant_linears

FAST = dict(num_samples=2, num_inference_steps=2)


@pytest.mark.parametrize("config", [BaselineConfig(**FAST), HTGConfig(weight_bits=4, weight_rounding="gptq", **FAST)],
                         ids=["w8a8", "htg-w4a8-gptq"])
def test_float_weights_are_freed_as_each_layer_is_packed(config, monkeypatch):
    """At every point where the engine hands memory back (after each packed layer), the float weight of every layer
    packed so far is gone: packing never holds more than one layer's float and packed forms at once."""
    model = make_tiny_transformer()
    weights = {name: weakref.ref(m.weight) for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    alive_after_packing = []

    def check():
        gc.collect()
        packed = {name for name, _ in quant_linears(model)}
        alive_after_packing.append(sorted(name for name in packed if weights[name]() is not None))

    monkeypatch.setattr("diffusers_ptq.api.return_freed_memory", check)
    quantize(model, config, progress=False)
    packed = {name for name, _ in quant_linears(model)}
    assert len(alive_after_packing) == len(packed) > 0  # one release per packed layer
    assert alive_after_packing == [[]] * len(packed)
    gc.collect()
    kept = {name for name, ref in weights.items() if ref() is not None}
    assert kept == set(weights) - packed  # the layers left float (the embedders) keep theirs
    return_freed_memory()  # safe to call anywhere (a no-op off glibc)


linux_only = pytest.mark.skipif(_madvise() is None or not os.path.exists("/proc/self/smaps"),
                                reason="madvise and /proc/self/smaps: Linux with glibc")
PAGE = mmap.PAGESIZE


def resident_bytes(path) -> int:
    """Bytes of `path` resident in this process: the Rss of its mappings (/proc/self/smaps)."""
    path, total, ours = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:  # a mapping's header: address range, perms, ..., path
                ours = len(fields) >= 6 and fields[5] == path
            elif ours and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def present_pages(tensor) -> int:
    """How many of the whole pages inside a tensor's bytes are in this process's memory (/proc/self/pagemap: bit 63
    of each page's entry, readable without privileges)."""
    return sum(f >> 63 for f in page_flags(*whole_pages(tensor)))


@linux_only
def test_release_file_pages_hands_back_a_loaded_tensor_and_reads_it_again(tmp_path):
    """A tensor loaded with safetensors lies in its map of the file: released, its pages leave the process (all but
    the two partial pages at its ends), and reading it again gives the same values, from the file."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randint(-128, 128, (257, 1031), dtype=torch.int8, generator=gen),
               "b": torch.randn(64, 300, generator=gen)}
    file = tmp_path / "t.safetensors"
    save_file(tensors, str(file))
    loaded = load_file(str(file))
    a = loaded["a"]
    assert file_mapping(a.data_ptr())[2] == os.path.realpath(file)  # not a copy: the file's own pages
    assert torch.equal(a, tensors["a"]) and torch.equal(loaded["b"], tensors["b"])  # both touched: resident
    before = resident_bytes(file)
    assert present_pages(a) >= a.numel() // PAGE - 1  # touched: every whole page inside it
    released = release_file_pages(a)
    assert present_pages(a) == 0
    assert released >= a.numel() - 2 * PAGE
    assert resident_bytes(file) <= before - released
    assert torch.equal(a, tensors["a"]) and torch.equal(loaded["b"], tensors["b"])  # read again from the file


@linux_only
def test_release_file_pages_keeps_a_tensor_the_process_has_written(tmp_path):
    """A page written in place is the process's own copy: released, it would go back to the file's old bytes. Any
    written page keeps the whole tensor resident, and the write survives."""
    file = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(64, 4096, dtype=torch.int8)}, str(file))
    a = load_file(str(file))["a"]
    a[40, :3] = 7
    assert written_pages(a) >= 1
    assert release_file_pages(a) == 0
    assert int(a.sum()) == 21 and int(a[40, :3].sum()) == 21


def test_release_file_pages_leaves_memory_that_is_not_a_file_alone():
    """A tensor in anonymous memory (dropping its pages would zero them) is never released."""
    t = torch.arange(1 << 20, dtype=torch.int32)
    assert file_mapping(t.data_ptr()) is None
    assert release_file_pages(t) == 0
    assert torch.equal(t, torch.arange(1 << 20, dtype=torch.int32))


def wide_quantized_model(bits: int, seed: int = 0) -> DiTTransformer2DModel:
    """A one-block DiT wide enough (hidden 256) that each quantized weight spans whole pages."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=8,
                                  num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=1000).eval()
    return quantize(model, BaselineConfig(weight_bits=bits, num_samples=2, num_inference_steps=2), progress=False)


@linux_only
@pytest.mark.parametrize("bits", [8, 4])
def test_a_loaded_checkpoint_keeps_its_stored_weights_on_disk(bits, tmp_path):
    """Loading a pre-quantized checkpoint: each layer's stored codes are the file's own pages (not copied) and are
    handed back once its kernel has its own form, so at most the rest of the file (float tensors, scales, the two
    partial pages at each tensor's ends) stays resident; forward and backward (which reads the codes again) are
    those of the model that was saved, bit for bit."""
    model = wide_quantized_model(bits)
    model.save_pretrained(tmp_path)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    layers = quant_linears(reloaded)
    assert len(layers) >= 6 and {m.kernel for _, m in layers} <= {"onednn", "emulated"}
    stored = [stored_data(m.weight) for _, m in layers]
    assert all(file_mapping(t.data_ptr())[2] == os.path.realpath(file) for t in stored)
    kept = os.path.getsize(file) - sum(max(0, t.numel() * t.element_size() - 2 * PAGE) for t in stored)
    assert resident_bytes(file) <= kept
    assert sum(t.numel() * t.element_size() for t in stored) > 3 * len(stored) * PAGE  # whole pages to hand back
    assert [present_pages(t) for t in stored] == [0] * len(stored)  # all but the partial pages at each end

    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    kwargs = dict(timestep=torch.tensor([999, 20]), class_labels=torch.tensor([3, 1000]))
    grads = []
    for m in (model, reloaded):
        xi = x.clone().requires_grad_(True)
        out = m(xi, **kwargs).sample
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@linux_only
@pytest.mark.parametrize("save", ["diffusers", "diffusers_ptq"])
def test_saving_over_the_loaded_folder_leaves_the_live_model_intact(save, tmp_path):
    """The loaded model's stored codes are the file's pages: a save into the same folder (diffusers' own or ours)
    writes a new file, so the live model keeps its codes and still saves the checkpoint it was loaded from."""
    import diffusers_ptq

    wide_quantized_model(8).save_pretrained(tmp_path)
    live = DiTTransformer2DModel.from_pretrained(tmp_path)
    codes = {name: stored_data(m.weight).clone() for name, m in quant_linears(live)}
    other = wide_quantized_model(8, seed=1)
    if save == "diffusers":
        other.save_pretrained(tmp_path)
    else:
        diffusers_ptq.save_pretrained(other, tmp_path)
    assert all(torch.equal(stored_data(m.weight), codes[name]) for name, m in quant_linears(live))
    name, first = quant_linears(other)[0]
    assert not torch.equal(stored_data(first.weight), codes[name])  # the file now holds other codes
