"""Model adapters (issue #18): a family is one file in diffusers_ptq/models/, and nothing else names its modules."""

import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_transformer, randomize_modulation, tiny_inputs

import diffusers_ptq
from diffusers_ptq.models import ADAPTERS, ModulationRows, OutputRows, adapter_for
from diffusers_ptq.models.dit import DiTAdapter
from diffusers_ptq.reparam import apply_smoothing, shift_input

PACKAGE = Path(diffusers_ptq.__file__).resolve().parent
# Module and class names of the DiT family: only the adapters (models/<family>.py) may spell them — SD3 and others
# reuse some of DiT's module names (transformer_blocks, norm1, ff.net). The harness (benchmarks, the bundled
# toy DiT and its classifier) is not the library: it is about the bundled DiT by definition.
DIT_NAMES = ("transformer_blocks", "attn1", "norm1", "ff.net", "proj_out_1", "proj_out_2", "num_embeds_ada_norm",
             "DiTTransformer2DModel", "DiTPipeline")
HARNESS = ("harness",)


def library_files() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in HARNESS or (rel.parts[0] == "models" and rel.name not in ("base.py", "__init__.py")):
            continue  # the adapters (models/<family>.py) are where a family's module names belong
        files.append(path)
    return files


def test_no_dit_module_name_outside_its_adapter():
    pattern = re.compile("|".join(re.escape(n) for n in DIT_NAMES))
    found = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in library_files()
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not found, "DiT module names outside models/dit.py:\n" + "\n".join(found)


def test_the_grep_can_fail(tmp_path):
    read = {p.relative_to(PACKAGE).as_posix() for p in library_files()}
    assert "models/dit.py" not in read and {"api.py", "models/base.py", "reparam.py"} <= read
    assert (PACKAGE / "models" / "dit.py").read_text().count("transformer_blocks") > 0  # it does look for them


def test_adapter_found_by_model_class(tiny_transformer):
    assert isinstance(adapter_for(tiny_transformer), DiTAdapter)
    assert ADAPTERS["DiTTransformer2DModel"] is adapter_for(tiny_transformer)


def test_unsupported_model_names_the_supported_ones():
    with pytest.raises(ValueError, match="DiTTransformer2DModel.*got Linear"):
        adapter_for(torch.nn.Linear(2, 2))


def test_adapter_checks_the_variant(tiny_transformer):
    tiny_transformer.register_to_config(norm_type="ada_norm_single")
    with pytest.raises(ValueError, match="norm_type='ada_norm_single'"):
        adapter_for(tiny_transformer)


def test_dit_targets_as_data(tiny_transformer):
    targets = adapter_for(tiny_transformer).smoothing_targets(tiny_transformer)
    assert len(targets) == 3 * 2 + 1
    qkv, out = targets[0], targets[1]
    assert qkv.producers == (ModulationRows("transformer_blocks.0.norm1.linear", 0, 1, 6),)
    assert out.producers == (OutputRows("transformer_blocks.0.attn1.to_v", attention="transformer_blocks.0.attn1"),)
    names = dict(tiny_transformer.named_modules())
    assert all(p.linear in names for t in targets for p in t.producers)
    assert all(c in names for t in targets for c in t.consumers)


def test_forward_arguments_positional_and_keyword():
    adapter = DiTAdapter()
    x, t, y = torch.zeros(2, 4, 4, 4), torch.tensor(5), torch.tensor([1, 2])
    for args, kwargs in (((x, t, y), {}), ((x,), {"timestep": t, "class_labels": y}), ((), {"hidden_states": x,
                                                                                            "timestep": t,
                                                                                            "class_labels": y})):
        got = adapter.batched_inputs(args, kwargs)
        assert got["hidden_states"] is x and got["timestep"].tolist() == [5, 5] and got["class_labels"].tolist() == [1, 2]
        assert int(adapter.timestep(args, kwargs)) == 5


def _two_producer_target(model):
    """A made-up target with two producers: the value rows of two blocks' to_v feeding both blocks' to_out."""
    from diffusers_ptq.models import SmoothingTarget

    return SmoothingTarget("joint", tuple(OutputRows(f"transformer_blocks.{i}.attn1.to_v") for i in (0, 1)),
                           tuple(f"transformer_blocks.{i}.attn1.to_out.0" for i in (0, 1)))


def test_fold_into_several_producers_and_consumers_is_exact():
    """Several producers and consumers: each block's attention output is divided by s in its to_v rows and
    multiplied back in its to_out columns (and a per-channel shift through every to_v bias), so the float function
    is unchanged — what joint attention (two streams' V feeding both output projections) needs."""
    model = make_tiny_transformer()
    randomize_modulation(model)
    with torch.no_grad():
        reference = model(**tiny_inputs()).sample
        target = _two_producer_target(model)
        gen = torch.Generator().manual_seed(3)
        apply_smoothing(model, target, torch.rand(32, generator=gen) + 0.5)
        shift_input(model, target, torch.randn(32, generator=gen))
        folded = model(**tiny_inputs()).sample
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-5)


# --- a second family in one test file: the engine runs it unchanged ------------------------------------------------


class ToyAdaLN(torch.nn.Module):
    """A one-block adaLN model that is not a DiT: timestep → (shift, scale) → LayerNorm-modulated MLP."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.t_embed = torch.nn.Linear(1, dim)
        self.mod = torch.nn.Linear(dim, 2 * dim)
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, hidden_states, timestep):
        from types import SimpleNamespace

        temb = self.t_embed(torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1) / 1000)
        shift, scale = self.mod(torch.nn.functional.silu(temb)).chunk(2, dim=-1)
        h = self.norm(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        return SimpleNamespace(sample=hidden_states + self.fc2(torch.nn.functional.gelu(self.fc1(h))))


class ToyAdapter(DiTAdapter.__mro__[1]):  # ModelAdapter: everything the engine needs, as data
    name, model_class, pipeline_class = "toy", "ToyAdaLN", "ToyPipeline"
    default_include = ("mod", "fc1", "fc2")
    forward_arguments = ("hidden_states", "timestep")
    default_noise_schedule = dict(num_train_timesteps=1000)

    def blocks(self, model):
        return []

    def smoothing_targets(self, model):
        from diffusers_ptq.models import SmoothingTarget

        return [SmoothingTarget("mlp", (ModulationRows("mod", 0, 1, 2),), ("fc1",))]

    def batched_inputs(self, args, kwargs):
        x = self.argument("hidden_states", args, kwargs)
        return {"hidden_states": x, "timestep": self.timestep(args, kwargs).reshape(-1).expand(x.shape[0])}

    def calibration_conditions(self, model, num_samples, context):
        return [None] * num_samples

    def noise_shape(self, model, batch, context=None):
        return (batch, 8, 16)

    def denoise(self, model, scheduler, latents, conditions, *, guidance_scale, step_generator, before_step,
                after_step):
        x = latents
        for i, t in enumerate(scheduler.timesteps):
            before_step(i)
            x = scheduler.step(model(x, timestep=t.reshape(1).expand(len(x))).sample, t, x).prev_sample
            after_step()
        return x


@pytest.fixture
def toy_family():
    from diffusers_ptq.models import register_adapter

    register_adapter(ToyAdapter())
    yield
    ADAPTERS.pop("ToyAdaLN")


@pytest.mark.parametrize("method", ["ptq4dit", "htg", "smoothquant"])
def test_a_new_family_is_one_adapter(toy_family, method):
    """Registered from this test (no engine file knows it), the toy family calibrates through its own denoise loop
    and takes each fold: weight-only 8-bit quantization after the fold stays close to the float model (the fold is
    exact; only weight rounding is left), and the fold really happened."""
    import copy

    from diffusers_ptq.api import quantize_transformer
    from diffusers_ptq.methods import PLUGINS
    from diffusers_ptq.scheme import CalibrationSettings, Plan, QuantScheme

    torch.manual_seed(0)
    model = ToyAdaLN().eval()
    x, t = torch.randn(3, 8, 16), torch.tensor([900, 400, 20])
    with torch.no_grad():
        reference = model(x, t).sample
    quantized = copy.deepcopy(model)
    plan = Plan(QuantScheme(act_bits=None), CalibrationSettings(num_inference_steps=4, num_samples=4, batch_size=2,
                                                                guidance_scale=1.0), [PLUGINS[method]()])
    report = quantize_transformer(quantized, plan, progress=False)
    assert report.smoothed_targets == ["mlp"]
    assert sorted(report.layers) == ["fc1", "fc2", "mod"]
    with torch.no_grad():
        out = quantized(x, t).sample
    rel = float((out - reference).pow(2).mean() / reference.pow(2).mean())
    assert rel < 1e-3, rel
