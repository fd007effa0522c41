"""What is stored: optimum-quanto Linear modules with this project's static input scale.

`QuantLinear` is quanto's `QLinear` (qint8 per-output-channel weights, or qint4 per-channel / grouped) with:
- a static per-tensor int8 input scale that we compute (`input_scale`), or none for weight-only modes, or dynamic
  per-token int8 inputs (`act_dynamic`: the kernel computes one scale per token at run time, max|x| / 127;
  `input_scale` is then an unused placeholder 1.0, kept so the state dict has the same keys);
- no output quantization;
- the multiplication delegated to a kernel from `kernels.py` (`module.kernel`, not saved), chosen when the
  weight is frozen, loaded or moved (`kernels.choose_kernel`: the fastest kernel exact for its bit widths on
  this device) or forced with `set_kernel`;
- a `copy.deepcopy` that copies quanto's weight tensors (quanto's own tensors do not support it) and leaves the
  kernel's in-memory state behind (the copy prepares its own).

`fuse_feedforwards` gives diffusers' `FeedForward` (GELU → dropout → Linear) whose two Linears are quantized a
forward that, under `torch.compile` without freezing, runs fc1, the GELU and fc2's input quantization as one oneDNN
call (`FusedFeedForward`); eager runs diffusers' forward unchanged.

4-bit codes are read with `kernels.unpack_bits` (torch ops): quanto's CPU `unpack` op, a C++ extension quanto
JIT-compiles on first use, is never called by this package and stays as quanto registers it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from optimum.quanto import QLinear, qint4, qint8

from diffusers_ptq.kernels import (
    KernelError,
    choose_kernel,
    default_kernel,
    dequantize_weight,
    kernel_problem,
    onednn_gelu_codes,
    prepare_kernel,
    run_kernel,
    stored_data,
)
from diffusers_ptq.memory import release_file_pages

if TYPE_CHECKING:
    from diffusers_ptq.rounding import RoundedWeight

WEIGHT_QTYPES = {8: qint8, 4: qint4}
KERNEL_STATE = "_kernel_state"  # the kernel's prepared weight (kernels._prepared): in memory only


def _copy_tensor(t: torch.Tensor, memo: dict) -> torch.Tensor:
    """A deep copy of a plain or quanto (wrapper subclass) tensor, through its flatten/unflatten protocol."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return copy.deepcopy(t, memo)
    names, meta = t.__tensor_flatten__()
    inner = {name: _copy_tensor(getattr(t, name), memo) for name in names}
    return type(t).__tensor_unflatten__(inner, meta, t.size(), t.stride())


class QuantLinear(QLinear):
    """quanto QLinear whose input is quantized by the kernel (static per-tensor scale), output unquantized."""

    @classmethod
    def qcreate(cls, module, weights, activations=None, optimizer=None, device=None):
        return cls(module.in_features, module.out_features, module.bias is not None, dtype=module.weight.dtype,
                   device=device, weights=weights, activations=activations, optimizer=optimizer,
                   quantize_input=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.disable_output_quantization()
        self.kernel = default_kernel(self.weight.device)
        self._kernel_forced = False  # set_kernel(..., name) forces one; otherwise choose_kernel on freeze/load/move
        self.act_dynamic = False  # True: per-token input scales computed by the kernel at run time

    def select_kernel(self) -> str:
        """Pick the fastest exact kernel for this layer where it is now (unless one was forced) and prepare it (so
        that a compiled forward finds the prepared weight); returns it."""
        if not self._kernel_forced:
            self.kernel = choose_kernel(self)
        if self.frozen and self.weight.device.type != "meta":
            prepare_kernel(self)
            self.release_stored_pages()
        return self.kernel

    def release_stored_pages(self) -> int:
        """A weight loaded from a checkpoint lies in safetensors' map of the file: once the kernel has its own form,
        the stored codes go back to the file, read again only by what needs them (a save, a backward pass, another
        kernel). Returns the bytes handed back (0 for a weight in memory: quantized here, copied, moved)."""
        return release_file_pages(stored_data(self.weight)) if self.frozen else 0

    def freeze(self):
        super().freeze()
        self.select_kernel()

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self.__dict__.pop(KERNEL_STATE, None)  # prepared kernel weights follow the stored weight
        if getattr(self, "frozen", False) and hasattr(self, "_kernel_forced"):
            self.select_kernel()
        return result

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop(KERNEL_STATE, None)  # in-memory kernel state (e.g. an opaque oneDNN tensor): never pickled or saved
        return state

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == KERNEL_STATE:
                continue
            if key == "_parameters":
                value = {name: None if p is None else torch.nn.Parameter(_copy_tensor(p.detach(), memo),
                                                                         requires_grad=p.requires_grad)
                         for name, p in value.items()}
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        new.select_kernel()  # its own kernel state
        return new

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight [out, in] the quantized one stands for (computed on each call; not cached)."""
        return dequantize_weight(self.weight).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_kernel(self, x)

    def extra_repr(self) -> str:
        act = self.activation_qtype.name if self.activation_qtype is not None else "none"
        if self.activation_qtype is not None and getattr(self, "act_dynamic", False):
            act += " (dynamic per token)"
        group = f", group_size={self.weight_group_size}" if self.weight_qtype.bits < 8 else ""
        return f"{super().extra_repr()}, weights={self.weight_qtype.name}{group}, activations={act}, kernel={self.kernel}"


def quantize_linear(linear: torch.nn.Linear, weight_bits: int, input_scale: float | torch.Tensor | None,
                    group_size: int | None = None, rounded: RoundedWeight | None = None,
                    act_dynamic: bool = False) -> QuantLinear:
    """A frozen QuantLinear from a float Linear.

    weight_bits 8: symmetric per-output-channel qint8. weight_bits 4: quanto's affine qint4, per output channel
    (group_size None) or in groups of group_size input channels. input_scale None: weight-only (A16).
    rounded: integer codes and scales from `rounding` (e.g. GPTQ) stored as the quanto weight as they are,
    instead of rounding the float weight to nearest; same format, same bits, same group size.
    act_dynamic: int8 inputs quantized per token at run time (input_scale must then be None: nothing is calibrated).
    """
    if weight_bits not in WEIGHT_QTYPES:
        raise ValueError(f"weight_bits must be 8 or 4, got {weight_bits!r}")
    if group_size is not None:
        if weight_bits == 8:
            raise ValueError("group_size applies to 4-bit weights only; 8-bit weights are per output channel")
        if group_size <= 0 or linear.in_features % group_size:
            raise ValueError(f"group_size {group_size} must divide in_features={linear.in_features}")
    if act_dynamic and input_scale is not None:
        raise ValueError("act_dynamic computes the input scales per token at run time: pass input_scale=None")
    module = QuantLinear.from_module(linear, weights=WEIGHT_QTYPES[weight_bits],
                                     activations=qint8 if input_scale is not None or act_dynamic else None)
    module.weight_group_size = group_size if weight_bits == 4 else None
    module.act_dynamic = bool(act_dynamic)
    if input_scale is not None:
        scale = torch.as_tensor(input_scale, dtype=module.input_scale.dtype, device=module.input_scale.device)
        if not (scale > 0 and torch.isfinite(scale)):
            raise ValueError(f"input_scale must be a positive finite number, got {float(scale)}")
        module.input_scale = scale.reshape(())
    if rounded is not None:
        module.weight = torch.nn.Parameter(_quanto_weight(rounded, module), requires_grad=False)
    module.freeze()  # chooses the kernel (choose_kernel): the fastest exact one for these bit widths here
    module.requires_grad_(False)
    return module


def _quanto_weight(rounded: RoundedWeight, module: QuantLinear):
    """The quanto weight tensor holding `rounded`'s integer codes, scale and shift as they are (no rounding)."""
    from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor

    shape = (module.out_features, module.in_features)
    if rounded.bits != module.weight_qtype.bits or rounded.group_size != module.weight_group_size:
        raise ValueError(f"rounded weight is {rounded.bits}-bit with group_size {rounded.group_size}, the module "
                         f"{module.weight_qtype.bits}-bit with group_size {module.weight_group_size}")
    if tuple(rounded.data.shape) != shape:
        raise ValueError(f"rounded weight of shape {tuple(rounded.data.shape)} for a Linear of shape {shape}")
    device, dtype = module.weight.device, module.weight.dtype
    size, stride = module.weight.size(), module.weight.stride()
    scale = rounded.scale.to(device=device, dtype=dtype)
    if rounded.bits == 8:
        data = rounded.data.to(device=device, dtype=torch.int8)
        return WeightQBytesTensor.create(qint8, 0, size, stride, data, scale, activation_qtype=module.activation_qtype)
    data = rounded.data.to(device=device, dtype=torch.uint8)
    if rounded.group_size is not None:
        data = data.reshape(-1, rounded.group_size)  # quanto's grouped layout for axis 0
    shift = rounded.shift.to(device=device, dtype=dtype)
    return WeightQBitsTensor.create(qint4, 0, rounded.group_size, size, stride, data, scale, shift)


def seven_bit_weight(weight: torch.Tensor) -> RoundedWeight:
    """A float weight [out, in] rounded to 8-bit codes restricted to [-64, 63] (scale = max|row| / 63): stored as
    an ordinary qint8 weight (same checkpoint format), pass it as `quantize_linear(..., rounded=...)`.

    Costs one bit of weight resolution; buys one exact oneDNN GEMM with full-range 8-bit activations on CPUs
    without VNNI (the kernel checks the codes when it prepares the weight; see kernels.py)."""
    from diffusers_ptq.rounding import RoundedWeight

    w = weight.detach()
    scale = w.abs().amax(dim=1, keepdim=True) / 63
    codes = torch.clamp(torch.round(w / torch.where(scale == 0, torch.ones_like(scale), scale)), -64, 63)
    return RoundedWeight(weight=codes * scale, data=codes.to(torch.int8), scale=scale, shift=None, bits=8,
                         group_size=None)


class QuantEmbedding(torch.nn.Module):
    """An embedding table stored as int8 codes with one float32 scale per row (symmetric, scale = max|row| / 127):
    a looked-up row is codes[i] · scale[i] (`embedder_bits=8`: a class table such as DiT's). Not trainable."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("codes", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(num_embeddings, 1, dtype=torch.float32, device=device))

    @classmethod
    def from_embedding(cls, embedding: torch.nn.Embedding) -> QuantEmbedding:
        if embedding.padding_idx is not None or embedding.max_norm is not None or embedding.sparse:
            raise ValueError("8-bit embedding tables support plain nn.Embedding only (no padding_idx, max_norm or "
                             "sparse gradients); leave this table float (embedder_bits=None)")
        w = embedding.weight.detach().float()
        module = cls(embedding.num_embeddings, embedding.embedding_dim, device=w.device)
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        module.codes.copy_(torch.clamp(torch.round(w / safe), -127, 127).to(torch.int8))
        module.scale.copy_(safe)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.codes).float() * torch.nn.functional.embedding(ids, self.scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weights=qint8 (per row)"


def quant_linears(model: torch.nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def set_kernel(model: torch.nn.Module, name: str) -> dict[str, str]:
    """Force kernel `name` on every QuantLinear of `model` (or on `model` itself); "auto" restores the automatic
    choice. Raises KernelError, changing nothing, if the kernel cannot run one of the layers exactly here.
    Returns {layer name: kernel}."""
    layers = quant_linears(model)
    if name != "auto":
        problems = [(n, kernel_problem(m, name)) for n, m in layers]
        problems = [(n, p) for n, p in problems if p is not None]
        if problems:
            shown = "; ".join(f"{n or '<module>'}: {p}" for n, p in problems[:3])
            more = f" (and {len(problems) - 3} more layers)" if len(problems) > 3 else ""
            raise KernelError(f"kernel {name!r} cannot run {len(problems)} of {len(layers)} quantized layers "
                              f"exactly here — {shown}{more}")
    for _, m in layers:
        m._kernel_forced = name != "auto"
        if m._kernel_forced:
            m.kernel = name
        m.select_kernel()
    return {n: m.kernel for n, m in layers}


def kernel_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many quantized layers run on each kernel."""
    counts: dict[str, int] = {}
    for _, m in quant_linears(model):
        counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts


def _rerouted(module: torch.nn.Module) -> bool:
    """Whether something else runs when `module` is called: hooks (HTG's group biases, accelerate's offload) or a
    forward set on the instance."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in vars(module)


class FusedFeedForward(FeedForward):
    """diffusers' FeedForward (GELU → dropout → Linear) with both Linears quantized. Under `torch.compile` without
    freezing, fc1, the GELU and fc2's input quantization run as one oneDNN call writing fc2's uint8 input codes
    (`kernels.onednn_gelu_codes`; issue #21, point 1 — with freezing Inductor's own passes fuse them); fc2 gets
    those codes times its input scale, which it rounds back to the same codes (|n·s/s − n| ≤ 128·2⁻²³ ≪ ½), and
    Inductor fuses that pair of pointwise ops. Everywhere else (eager, a gradient wanted, another kernel, dynamic
    activations, hooks on fc1) diffusers' forward, unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        codes = self._fused_codes(hidden_states) if torch.compiler.is_compiling() else None
        if codes is None:
            return super().forward(hidden_states, *args, **kwargs)
        fc2 = self.net[2]
        hidden_states = (codes.to(torch.float32) - 128) * fc2.input_scale.to(torch.float32)
        for module in list(self.net)[1:]:
            hidden_states = module(hidden_states)
        return hidden_states

    def _fused_codes(self, x: torch.Tensor) -> torch.Tensor | None:
        act, dropout, fc2 = self.net[0], self.net[1], self.net[2]
        fc1 = act.proj
        if (not isinstance(fc1, QuantLinear) or not isinstance(fc2, QuantLinear) or fc2.activation_qtype is None
                or fc2.act_dynamic or _rerouted(act) or _rerouted(fc1) or (dropout.training and dropout.p > 0)):
            return None
        return onednn_gelu_codes(fc1, x, fc2.input_scale, act.approximate)


def fuse_feedforwards(model: torch.nn.Module) -> int:
    """Make each diffusers `FeedForward` of `model` whose GELU's Linear and output Linear are QuantLinears a
    `FusedFeedForward` (its class only: the same modules, parameters and state dict); returns how many."""
    count = 0
    for module in model.modules():
        net = getattr(module, "net", None)
        if (type(module) is FeedForward and len(net) >= 3 and type(net[0]) is GELU
                and isinstance(net[1], torch.nn.Dropout) and isinstance(net[0].proj, QuantLinear)
                and isinstance(net[2], QuantLinear)):
            module.__class__ = FusedFeedForward
            count += 1
    return count
