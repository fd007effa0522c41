"""Quantized checkpoints: what diffusers' save_pretrained writes for a quantized transformer, and how it is rebuilt.

A checkpoint is a normal diffusers model folder (config.json with the `quantization_config`, safetensors weights).
The weights file holds, besides the float tensors of the layers that stay in float:

- for each `QuantLinear`, quanto's own tensors: `<name>.weight._data` (qint8 [out, in] int8) or
  `<name>.weight._data._data` (qint4, two values per uint8, per output channel or in groups), `<name>.weight._scale`,
  `<name>.weight._shift` (qint4), `<name>.input_scale`, `<name>.output_scale`, `<name>.bias`;
- for each `QuantEmbedding` (`embedder_bits=8`), `<name>.codes` (int8 [rows, dim]) and `<name>.scale` (float32
  [rows, 1]);
- for each quantized attention processor, its frozen scales: `<attn>.ptq_processor.{q,k,v}_scale`;
- in the safetensors header, under `"diffusers_ptq"`, the JSON metadata quanto does not keep: per module its kind,
  shape, weight bits, int4 group size (per layer), activation bits, whether they are dynamic per-token (`act_dynamic`;
  absent = static) and output-quantization state (always off); per processor its
  kind and bits; the format version.

Loading rebuilds the modules from these tensors without calibrating (`rebuild_quantized_modules`). Module kinds are a
registry (`register_module_kind` / `register_processor_kind`): a later kind (HTG's group-bias Linear) adds a
`describe` and a `build` without touching the loader. Tensors are read with safetensors only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffusers_ptq.memory import return_freed_memory

FORMAT_VERSION = 1
METADATA_KEY = "diffusers_ptq"
PROCESSOR_INFIX = "ptq_processor"
TIED_KEY = "tied_modules"  # metadata: {alias module: canonical module} of identical copies stored once
GROUP_BIAS_INFIX = "group_biases"  # a module's HTG per-timestep-group biases: <module>.group_biases.<i>.{edges,values,rows}


class CheckpointError(ValueError):
    """A quantized checkpoint is incomplete, corrupt or not written by diffusers_ptq."""


# ------------------------------------------------------------------------------------------------------------------
# Module kinds
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleKind:
    """How one kind of quantized module is described in the metadata and rebuilt from its tensors.

    describe(module) -> JSON-safe dict; expected(meta) -> {tensor suffix: (shape, dtype)} that must be present;
    build(template, meta, tensors) -> module, where template is the float module the checkpoint's model has at that
    place (on `meta`) and tensors maps suffixes to tensors.
    """

    name: str
    module_class: type
    describe: Callable[[nn.Module], dict]
    expected: Callable[[dict], dict[str, tuple[tuple[int, ...], torch.dtype]]]
    build: Callable[[nn.Module, dict, dict[str, torch.Tensor]], nn.Module]


@dataclass(frozen=True)
class ProcessorKind:
    """The same for attention processors (not modules: their state is not in the state dict)."""

    name: str
    processor_class: type
    describe: Callable[[object], tuple[dict, dict[str, torch.Tensor]]]  # -> (meta, tensors)
    build: Callable[[nn.Module, dict, dict[str, torch.Tensor]], object]  # (attention module, meta, tensors)


MODULE_KINDS: dict[str, ModuleKind] = {}
PROCESSOR_KINDS: dict[str, ProcessorKind] = {}


def register_module_kind(kind: ModuleKind) -> ModuleKind:
    MODULE_KINDS[kind.name] = kind
    return kind


def register_processor_kind(kind: ProcessorKind) -> ProcessorKind:
    PROCESSOR_KINDS[kind.name] = kind
    return kind


def _module_kind_of(module: nn.Module) -> ModuleKind | None:
    # The most specific registered class wins (a subclass kind registered later takes precedence).
    for kind in reversed(list(MODULE_KINDS.values())):
        if type(module) is kind.module_class:
            return kind
    return None


def _processor_kind_of(processor) -> ProcessorKind | None:
    for kind in reversed(list(PROCESSOR_KINDS.values())):
        if type(processor) is kind.processor_class:
            return kind
    return None


# --- QuantLinear ------------------------------------------------------------------------------------------------


def _describe_quant_linear(module) -> dict:
    dynamic = bool(getattr(module, "act_dynamic", False)) and module.activation_qtype is not None
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "weight_bits": module.weight_qtype.bits,
        "weight_group_size": module.weight_group_size if module.weight_qtype.bits < 8 else None,
        "act_bits": module.activation_qtype.bits if module.activation_qtype is not None else None,
        **({"act_dynamic": True} if dynamic else {}),  # written only when dynamic: static metadata is unchanged
        "output_quantization": False,
    }


def _weight_group_size(meta: dict) -> int | None:
    """The metadata's weight group size, checked: None (per output channel) or, for 4-bit weights, a positive
    integer that divides in_features (a 0 would otherwise end in a ZeroDivisionError)."""
    group, bits, inp = meta["weight_group_size"], meta["weight_bits"], meta["in_features"]
    if group is None:
        return None
    if bits != 4:
        raise CheckpointError(f"weight_group_size={group!r} with weight_bits={bits!r} in the checkpoint metadata; "
                              "weight groups apply to 4-bit weights only (null otherwise): corrupt checkpoint, "
                              "quantize and save the model again")
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or inp % group:
        raise CheckpointError(f"weight_group_size={group!r} in the checkpoint metadata; expected null (per output "
                              f"channel) or a positive integer that divides in_features ({inp}): corrupt "
                              "checkpoint, quantize and save the model again")
    return group


def _expected_quant_linear(meta: dict) -> dict:
    out, inp, bits = meta["out_features"], meta["in_features"], meta["weight_bits"]
    if bits not in (8, 4):
        raise CheckpointError(f"weight_bits={bits!r} in the checkpoint metadata; supported: [8, 4]")
    group = _weight_group_size(meta)
    scalar = ((), torch.float32)
    expected = {"input_scale": scalar, "output_scale": scalar}
    if meta["bias"]:
        expected["bias"] = ((out,), torch.float32)
    if bits == 8:
        expected["weight._data"] = ((out, inp), torch.int8)
        expected["weight._scale"] = ((out, 1), torch.float32)
    else:
        rows, cols = (out, inp) if group is None else (out * inp // group, group)
        expected["weight._data._data"] = (((rows + 1) // 2, cols), torch.uint8)
        expected["weight._scale"] = ((rows, 1), torch.float32)
        expected["weight._shift"] = ((rows, 1), torch.float32)
    return expected


def _build_quant_linear(template: nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    from optimum.quanto import qint8

    from diffusers_ptq.modules import WEIGHT_QTYPES, QuantLinear

    if not isinstance(template, nn.Linear):
        raise CheckpointError(f"expected a Linear in the model, found {type(template).__name__}")
    if (template.in_features, template.out_features, template.bias is not None) != (
            meta["in_features"], meta["out_features"], meta["bias"]):
        raise CheckpointError(f"the metadata says Linear({meta['in_features']}, {meta['out_features']}, "
                              f"bias={meta['bias']}) but the model has {template}")
    if meta.get("output_quantization"):
        raise CheckpointError("output quantization is not supported (the metadata says it is on)")
    group = _weight_group_size(meta)
    if meta["act_bits"] not in (8, None):
        raise CheckpointError(f"act_bits={meta['act_bits']!r} in the checkpoint metadata; supported: [8, None]")
    act_dynamic = meta.get("act_dynamic", False)  # absent in checkpoints written before dynamic activations
    if not isinstance(act_dynamic, bool) or (act_dynamic and meta["act_bits"] is None):
        raise CheckpointError(f"act_dynamic={act_dynamic!r} with act_bits={meta['act_bits']!r} in the checkpoint "
                              "metadata; dynamic activations are 8-bit (True with act_bits 8, else False)")
    activations = qint8 if meta["act_bits"] == 8 else None
    module = QuantLinear.qcreate(template, WEIGHT_QTYPES[meta["weight_bits"]], activations, device="meta")
    module = module.to_empty(device="cpu")
    module.weight_group_size = group
    module.act_dynamic = act_dynamic
    others = {k: v for k, v in tensors.items() if not k.startswith("weight.")}
    result = module.load_state_dict(others, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"could not rebuild the quantized weight (unexpected {result.unexpected_keys})")
    module.weight = nn.Parameter(_stored_weight(module, tensors), requires_grad=False)
    module.select_kernel()  # the fastest exact kernel for these bit widths on this machine (never stored)
    module.requires_grad_(False)
    return module


def _stored_weight(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """The quanto weight over the checkpoint's own tensors, not copied: loaded from safetensors, they lie in its map
    of the file, and `QuantLinear.select_kernel` hands their pages back once the kernel has its own form. (quanto's
    `load_state_dict` would re-pack a 4-bit weight into new memory on the CPU: its `optimize()`; a move to CUDA still
    builds quanto's optimized form.)"""
    from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor

    state = {k: v for k, v in tensors.items() if k.startswith("weight.")}
    size, stride, missing = module.weight.size(), module.weight.stride(), []
    if module.weight_qtype.bits == 8:
        weight = WeightQBytesTensor.load_from_state_dict(state, "weight.", qtype=module.weight_qtype, axis=0, size=size,
                                                         stride=stride, activation_qtype=module.activation_qtype,
                                                         missing_keys=missing)
    else:
        weight = WeightQBitsTensor.load_from_state_dict(state, "weight.", qtype=module.weight_qtype, axis=0,
                                                        group_size=module.weight_group_size, size=size, stride=stride,
                                                        missing_keys=missing)
    if weight is None:
        raise CheckpointError(f"could not rebuild the quantized weight (missing {missing})")
    return weight


# --- QuantEmbedding (8-bit embedding tables) ----------------------------------------------------------------------


def _describe_quant_embedding(module) -> dict:
    return {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim, "weight_bits": 8}


def _expected_quant_embedding(meta: dict) -> dict:
    if meta["weight_bits"] != 8:
        raise CheckpointError(f"weight_bits={meta['weight_bits']!r} for an embedding table; supported: [8]")
    rows = meta["num_embeddings"]
    return {"codes": ((rows, meta["embedding_dim"]), torch.int8), "scale": ((rows, 1), torch.float32)}


def _build_quant_embedding(template: nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    from diffusers_ptq.modules import QuantEmbedding

    if not isinstance(template, nn.Embedding):
        raise CheckpointError(f"expected an Embedding in the model, found {type(template).__name__}")
    if (template.num_embeddings, template.embedding_dim) != (meta["num_embeddings"], meta["embedding_dim"]):
        raise CheckpointError(f"the metadata says Embedding({meta['num_embeddings']}, {meta['embedding_dim']}) but "
                              f"the model has {template}")
    module = QuantEmbedding(meta["num_embeddings"], meta["embedding_dim"])
    module.load_state_dict(dict(tensors))
    return module


def _register_builtin_kinds() -> None:
    from diffusers_ptq.attention import QuantAttnProcessor
    from diffusers_ptq.modules import QuantEmbedding, QuantLinear

    register_module_kind(ModuleKind("quant_linear", QuantLinear, _describe_quant_linear, _expected_quant_linear,
                                    _build_quant_linear))
    register_module_kind(ModuleKind("quant_embedding", QuantEmbedding, _describe_quant_embedding,
                                    _expected_quant_embedding, _build_quant_embedding))

    def describe_attention(processor) -> tuple[dict, dict]:
        if processor.observing or set(processor.scales) != {"q", "k", "v"}:
            raise ValueError("a QuantAttnProcessor is still observing (not frozen): quantization did not finish")
        return {"bits": processor.bits}, {f"{k}_scale": v.detach().float().reshape(()) for k, v in
                                          processor.scales.items()}

    def build_attention(attn: nn.Module, meta: dict, tensors: dict) -> QuantAttnProcessor:
        if not hasattr(attn, "set_processor"):
            raise CheckpointError(f"expected an Attention module, found {type(attn).__name__}")
        processor = QuantAttnProcessor(int(meta["bits"]))
        processor.scales = {k: tensors[f"{k}_scale"] for k in ("q", "k", "v")}
        processor.observing = False
        attn.set_processor(processor)
        return processor

    register_processor_kind(ProcessorKind("quant_attention", QuantAttnProcessor, describe_attention,
                                          build_attention))


_register_builtin_kinds()


# ------------------------------------------------------------------------------------------------------------------
# Saving: what the quantizer adds to diffusers' state dict
# ------------------------------------------------------------------------------------------------------------------


def quantization_metadata(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, extra tensors) of a quantized model: every registered module and processor kind."""
    from diffusers_ptq._version import __version__
    from diffusers_ptq.groupbias import group_bias_layout
    from diffusers_ptq.modulation import modulation_scales

    modules, processors, group_biases, extra = {}, {}, {}, {}
    for name, module in model.named_modules():
        if getattr(module, "group_biases", None):
            group_biases[name] = group_bias_layout(module)
        kind = _module_kind_of(module)
        if kind is not None:
            modules[name] = {"kind": kind.name, **kind.describe(module)}
        processor = getattr(module, "processor", None)
        pkind = _processor_kind_of(processor) if processor is not None else None
        if pkind is not None:
            meta, tensors = pkind.describe(processor)
            processors[name] = {"kind": pkind.name, **meta}
            extra.update({f"{name}.{PROCESSOR_INFIX}.{k}": v.contiguous() for k, v in tensors.items()})
    if not modules:
        raise ValueError("the model has no quantized module to save")
    metadata = {"format_version": FORMAT_VERSION, "library_version": __version__, "modules": modules,
                "processors": processors, "group_biases": group_biases}
    scales = {block: {"width": m.out_features, "argument": m.argument, "index": m.index}
              for block, m in modulation_scales(model).items()}
    if scales:  # adaLN-single blocks' multipliers of the shared modulation (modulation.py)
        metadata["modulation_scales"] = scales
    return metadata, extra


def identical_copies(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} among the modules the model's adapter names in `shared_copies` (fnmatch patterns): a module
    whose tensors all equal those of an earlier one (or that is the same module object) is an alias of it."""
    from fnmatch import fnmatch

    from diffusers_ptq.models import adapter_for

    patterns = adapter_for(model).shared_copies
    canonical, aliases = [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not any(fnmatch(name, p) for p in patterns):
            continue
        state = module.state_dict()
        for other_name, other, other_state in canonical:
            if other is module or (state.keys() == other_state.keys()
                                   and all(torch.equal(state[k], other_state[k]) for k in state)):
                aliases[name] = other_name
                break
        else:
            canonical.append((name, module, state))
    return aliases


@torch.no_grad()
def tie_copies(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make every alias module the canonical module object (one copy in memory; the state dict still lists both)."""
    for alias, canonical in aliases.items():
        model.set_submodule(alias, model.get_submodule(canonical))


def alias_keys(aliases: dict[str, str], keys) -> dict[str, str]:
    """{alias key: canonical key} for the canonical modules' keys among `keys`."""
    out = {}
    for alias, canonical in aliases.items():
        prefix = canonical + "."
        out.update({alias + k[len(canonical):]: k for k in keys if k.startswith(prefix)})
    return out


def state_dict_and_metadata(model: nn.Module, state_dict: dict) -> tuple[dict, dict[str, str]]:
    """diffusers' `get_state_dict_and_metadata` hook: add the processor tensors and the JSON metadata header; store
    identical copies (the adapter's `shared_copies`) once, recording the aliases in the metadata."""
    metadata, extra = quantization_metadata(model)
    aliases = identical_copies(model)
    if aliases:
        dropped = alias_keys(aliases, state_dict)
        state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
        metadata[TIED_KEY] = aliases
    clash = sorted(set(extra) & set(state_dict))
    if clash:
        raise ValueError(f"processor tensor names clash with the state dict: {clash[:5]}")
    for name, tensor in state_dict.items():
        if name.endswith(("_scale", "_shift")) and tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ValueError(f"{name} is {tensor.dtype}: quantization scales must stay float32")
    return {**state_dict, **extra}, {METADATA_KEY: json.dumps(metadata, sort_keys=True)}


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------


def read_metadata(checkpoint_files: list[str | os.PathLike]) -> dict:
    """The diffusers_ptq metadata from the safetensors header(s); a clear error if absent, unreadable or unknown."""
    from safetensors import safe_open

    if not checkpoint_files:
        raise CheckpointError("no checkpoint file found")
    found = None
    for file in checkpoint_files:
        if str(file).endswith(".bin") or not str(file).endswith(".safetensors"):
            raise CheckpointError(f"{file}: diffusers_ptq checkpoints are safetensors only (pickle is never loaded)")
        try:
            with safe_open(str(file), framework="pt") as f:
                header = f.metadata() or {}
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read the safetensors header of {file}: {error}") from error
        if METADATA_KEY in header:
            found = (file, header[METADATA_KEY])
            break
    if found is None:
        raise CheckpointError(f"{checkpoint_files[0]}: config.json has a diffusers_ptq quantization_config but the "
                              f"weights carry no '{METADATA_KEY}' metadata: not written by diffusers_ptq, or corrupt")
    try:
        metadata = json.loads(found[1])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{found[0]}: corrupt '{METADATA_KEY}' metadata: {error}") from error
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{found[0]}: checkpoint format version {version!r}; this diffusers_ptq reads "
                              f"version {FORMAT_VERSION}")
    for section, kinds in (("modules", MODULE_KINDS), ("processors", PROCESSOR_KINDS)):
        for name, meta in metadata.get(section, {}).items():
            if meta.get("kind") not in kinds:
                raise CheckpointError(f"{name}: unknown {section[:-1]} kind {meta.get('kind')!r}; this version "
                                      f"supports {sorted(kinds)}")
    return metadata


def _owner(metadata: dict, key: str) -> tuple[str, str, str] | None:
    """(section, owner name, suffix) of a checkpoint key that belongs to a quantized module, a processor, the
    timestep-group biases (HTG) of a module, or a block's modulation multiplier (adaLN-single)."""
    from diffusers_ptq.modulation import SCALER

    for name in metadata.get("group_biases", {}):
        prefix = f"{name}.{GROUP_BIAS_INFIX}."
        if key.startswith(prefix):
            return "group_biases", name, key[len(prefix):]
    for name in metadata.get("modulation_scales", {}):
        prefix = f"{name}.{SCALER}."
        if key.startswith(prefix):
            return "modulation_scales", name, key[len(prefix):]
    for name in metadata["modules"]:
        if key.startswith(name + "."):
            return "modules", name, key[len(name) + 1:]
    for name in metadata["processors"]:
        prefix = f"{name}.{PROCESSOR_INFIX}."
        if key.startswith(prefix):
            return "processors", name, key[len(prefix):]
    return None


def float_model_keys(metadata: dict, loaded_keys: list[str]) -> list[str]:
    """The checkpoint's keys as the float model sees them: a quantized module's tensors stand for its float
    weight and bias (so diffusers reports neither missing nor unexpected keys); processor tensors are dropped; the
    keys of a copy stored once stand for every alias of it."""
    keys = [k for k in loaded_keys if _owner(metadata, k) is None]
    for name, meta in metadata["modules"].items():
        keys.append(f"{name}.weight")
        if meta.get("bias"):
            keys.append(f"{name}.bias")
    return keys + list(alias_keys(metadata.get(TIED_KEY, {}), keys))  # a tied copy may hold quantized modules


def take_quantized_tensors(metadata: dict, state_dict: dict) -> tuple[dict, dict]:
    """Split a loaded (shard's) state dict: (what diffusers loads into the float model, with the aliases of copies
    stored once filled in from their canonical tensors; our tensors)."""
    ours = {k: state_dict[k] for k in state_dict if _owner(metadata, k) is not None}
    floats = {k: v for k, v in state_dict.items() if k not in ours}
    floats.update({alias: floats[k] for alias, k in alias_keys(metadata.get(TIED_KEY, {}), floats).items()})
    return floats, ours


def _check_tensors(where: str, expected: dict, tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: missing quantized tensors {missing} in the checkpoint")
    for suffix, (shape, dtype) in expected.items():
        tensor = tensors[suffix]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise CheckpointError(f"{where}.{suffix}: expected {dtype} {list(shape)}, found {tensor.dtype} "
                                  f"{list(tensor.shape)} (corrupt checkpoint)")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}.{suffix}: non-finite values (corrupt checkpoint)")
        if suffix.endswith("scale") and suffix != "output_scale" and not (tensor > 0).all():
            raise CheckpointError(f"{where}.{suffix}: non-positive scale (corrupt checkpoint)")


@torch.no_grad()
def rebuild_quantized_modules(model: nn.Module, metadata: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the float placeholders named in the metadata by quantized modules built from the checkpoint tensors,
    and install the quantized attention processors. No calibration; the result equals the saved model bit for bit."""
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        owner = _owner(metadata, key)
        if owner is not None:
            grouped.setdefault(owner[:2], {})[owner[2]] = tensor
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for name, meta in metadata["modules"].items():
        kind = MODULE_KINDS[meta["kind"]]
        try:
            template = model.get_submodule(name)
        except AttributeError as error:
            raise CheckpointError(f"{name}: the checkpoint quantizes a module the model does not have") from error
        own = grouped.get(("modules", name), {})
        try:
            _check_tensors(name, kind.expected(meta), own)
            module = kind.build(template, meta, own)
        except CheckpointError as error:
            raise CheckpointError(f"{name}: {error}" if not str(error).startswith(name) else str(error)) from None
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"{name}: corrupt metadata {meta}: {error!r}") from error
        # built on the CPU, its kernel prepared there: moved (and prepared again) only for another device
        model.set_submodule(name, module if device == torch.device("cpu") else module.to(device))
        return_freed_memory()  # the layer's temporaries (unpacked codes, a measured kernel's trial weights)
    for name, meta in metadata["processors"].items():
        kind = PROCESSOR_KINDS[meta["kind"]]
        own = {k: v.to(device) for k, v in grouped.get(("processors", name), {}).items()}
        _check_tensors(f"{name}.{PROCESSOR_INFIX}", {f"{k}_scale": ((), torch.float32) for k in "qkv"}, own)
        kind.build(model.get_submodule(name), meta, own)
    _rebuild_modulation_scales(model, metadata.get("modulation_scales", {}), grouped, device)
    _rebuild_group_biases(model, metadata.get("group_biases", {}), grouped, device)
    _retie(model, metadata.get(TIED_KEY, {}))
    left = [p for p, _ in model.named_parameters() if _.device.type == "meta"]
    if left:
        raise CheckpointError(f"tensors missing from the checkpoint: {left[:8]}")
    # each layer handed its stored codes back as it was built; reading the next layers' tensors mapped some of those
    # pages in again (Linux's fault-around maps up to 64 KB around a page read from a file), so once more, now
    from diffusers_ptq.modules import fuse_feedforwards, quant_linears

    for _, module in quant_linears(model):
        module.release_stored_pages()
    return_freed_memory()
    fuse_feedforwards(model)


def _retie(model: nn.Module, aliases: dict) -> None:
    """Tie the copies a checkpoint stored once (loaded as equal tensors) back into one module."""
    for alias, canonical in aliases.items():
        try:
            a, c = model.get_submodule(alias), model.get_submodule(canonical)
        except AttributeError as error:
            raise CheckpointError(f"{TIED_KEY}: {alias} -> {canonical}: {error}") from error
        if type(a) is not type(c):
            raise CheckpointError(f"{TIED_KEY}: {alias} ({type(a).__name__}) is not a copy of {canonical} "
                                  f"({type(c).__name__})")
    tie_copies(model, aliases)


def _rebuild_modulation_scales(model: nn.Module, layouts: dict, grouped: dict, device: torch.device) -> None:
    """Give the blocks named in the metadata their multiplier of the shared modulation (before the group biases
    that may sit on it), checking its tensor."""
    from diffusers_ptq.modulation import SCALER, scale_block_modulation

    for name, meta in layouts.items():
        where = f"{name}.{SCALER}"
        try:
            width, argument, index = int(meta["width"]), str(meta["argument"]), int(meta["index"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: corrupt metadata {meta}: {error!r}") from error
        own = {k: v.to(device) for k, v in grouped.get(("modulation_scales", name), {}).items()}
        _check_tensors(where, {"scale": ((width,), torch.float32)}, own)
        try:
            scaler = scale_block_modulation(model.get_submodule(name), width, argument, index)
        except (AttributeError, ValueError) as error:
            raise CheckpointError(f"{where}: {error}") from error
        scaler.scale.copy_(own["scale"])


def _rebuild_group_biases(model: nn.Module, layouts: dict, grouped: dict, device: torch.device) -> None:
    """Attach the HTG group biases named in the metadata (to quantized or float modules), checking their tensors."""
    from diffusers_ptq.groupbias import build_group_biases

    for name, layout in layouts.items():
        where = f"{name}.{GROUP_BIAS_INFIX}"
        try:
            expected = {}
            for i, entry in enumerate(layout):
                groups, (start, stop) = int(entry["groups"]), (int(v) for v in entry["rows"])
                expected.update({f"{i}.edges": ((groups - 1,), torch.float32),
                                 f"{i}.values": ((groups, stop - start), torch.float32),
                                 f"{i}.rows": ((2,), torch.int64)})
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: corrupt metadata {layout}: {error!r}") from error
        own = {k: v.to(device) for k, v in grouped.get(("group_biases", name), {}).items()}
        _check_tensors(where, expected, own)
        try:
            build_group_biases(model, model.get_submodule(name), layout, own)
        except (AttributeError, ValueError) as error:
            raise CheckpointError(f"{where}: {error}") from error


# ------------------------------------------------------------------------------------------------------------------
# Atomic save
# ------------------------------------------------------------------------------------------------------------------

_WEIGHT_FILE = re.compile(r"^diffusion_pytorch_model.*\.(safetensors|bin)(\.index\.json)?$")


def save_atomic(save: Callable[[str], None], save_directory: str | os.PathLike,
                extra_files: dict[str, str] | None = None, check: Callable[[Path], None] | None = None) -> None:
    """Run `save(tmp_dir)` in a fresh folder next to save_directory, then swap the whole folder in.

    Steps: (1) `save(tmp)` writes into the sibling `.<name>.partial-<id>`, then `extra_files` and `check(tmp)`;
    every file and folder in it is fsynced. (2) An existing save_directory is renamed to `.<name>.old-<id>`.
    (3) The new folder is renamed to save_directory and the parent folder fsynced. (4) The files of the old folder
    that are not part of the checkpoint (a user's notes, a `.git` folder, ...: anything but weight files
    `diffusion_pytorch_model*` and names the new save wrote) are moved into the new folder, which is fsynced;
    (5) the old folder, now only the previous checkpoint, is deleted. So save_directory always holds the old
    or the new checkpoint whole (never old shards with a new index or config), and nothing of the user's is lost.

    Where a crash (kill, power loss) stops it, and what `recover_interrupted_save` (run at the start of every
    save, and after a failed one) does:
    - during (1): save_directory is untouched; the `.partial-` folder is deleted;
    - between (2) and (3): save_directory is missing and the old checkpoint is whole in `.<name>.old-<id>`:
      it is renamed back (the new checkpoint is dropped);
    - during (4) or (5): save_directory is the new checkpoint; the rest of the user's files are moved over from
      the `.old-` folder, which is then deleted.
    After an exception (not a crash) the same recovery runs at once, so a failed save leaves the previous
    folder as it was and no temporary folder. One writer per folder at a time.

    A path to a file, or the current working directory (or a folder above it), is refused; a missing or empty
    folder is fine; a symlink is followed (the folder it points to is swapped). Under a distributed launch only the
    main process writes; the others return at once (no barrier here, so that saving from the main process alone
    also works: call `distributed.wait_for_everyone()` before other processes read the folder).
    """
    from diffusers_ptq.distributed import is_main_process

    if not is_main_process():
        return
    target = Path(os.path.realpath(save_directory))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file: save_pretrained needs a folder (pass a folder path)")
    if target == Path.cwd() or target in Path.cwd().parents:
        raise ValueError(f"{target} is (or holds) the current working directory: an atomic save replaces the whole "
                         "folder; save into a subfolder or change directory first")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(target)
    prefix = f".{target.name}.partial-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    old = target.parent / f".{target.name}.old-{tmp.name[len(prefix):]}"
    replacing = target.exists()
    try:
        save(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if check is not None:
            check(tmp)
        _fsync_tree(tmp)
        if replacing:
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync(target.parent)
    except BaseException:
        recover_interrupted_save(target)  # the old folder back if it was moved away; the partial folder removed
        raise
    if replacing:
        _retire(old, target)


def recover_interrupted_save(save_directory: str | os.PathLike) -> None:
    """Repair what an interrupted `save_atomic` left next to save_directory (see its crash states): put the old
    checkpoint back if save_directory is missing, else finish moving the user's files out of the replaced folder
    and delete it; delete partially written folders. Nothing to do (and nothing done) after a save that finished."""
    target = Path(os.path.realpath(save_directory))
    if not target.parent.is_dir():
        return
    leftover = re.compile(rf"\.{re.escape(target.name)}\.(old|partial)-[^.]+")
    found: dict[str, list[Path]] = {"old": [], "partial": []}
    for sibling in sorted(target.parent.iterdir()):
        match = leftover.fullmatch(sibling.name)
        if match:
            found[match.group(1)].append(sibling)
    olds = found["old"]
    if olds and not os.path.lexists(target):
        if len(olds) > 1:
            raise CheckpointError(f"{target} is missing and interrupted saves left several earlier folders "
                                  f"{[str(p) for p in olds]}: rename the one to keep to {target.name}, delete the rest")
        os.rename(olds.pop(), target)
        _fsync(target.parent)
    for old in olds:
        _retire(old, target)
    for partial in found["partial"]:
        shutil.rmtree(partial, ignore_errors=True)


def _retire(old: Path, target: Path) -> None:
    """Move what is not checkpoint (weights, or names the new save wrote) from the replaced folder into the new
    one, then delete the replaced folder."""
    for item in sorted(old.iterdir()):
        if not _WEIGHT_FILE.match(item.name) and not os.path.lexists(target / item.name):
            os.rename(item, target / item.name)
    _fsync(target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries (so that renames in it survive a power loss), to disk."""
    if os.name == "nt" and os.path.isdir(path):
        return  # Windows cannot open a folder for fsync (NTFS journals the renames itself)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems (FUSE mounts) cannot fsync a folder; files are always fsynced
        if not os.path.isdir(path) or error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(os.path.join(root, name))
        _fsync(root)


def check_saved_folder(folder: Path) -> None:
    """A written checkpoint folder has a config.json with a quantization_config and readable metadata."""
    config = json.loads((folder / "config.json").read_text())
    if not config.get("quantization_config"):
        raise CheckpointError(f"{folder}/config.json has no quantization_config")
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    read_metadata(files)
