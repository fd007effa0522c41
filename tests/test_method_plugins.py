"""Method plug-ins (issue #18): each method is one dataclass + stage handlers, registered by name; the orchestrator
(api.py) never names a method, and a new method runs through it without touching it."""

import ast
import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_transformer, randomize_modulation, tiny_inputs

from diffusers_ptq import api
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.methods import PLUGINS, Method, Observations
from diffusers_ptq.methods.base import fold_smoothing
from diffusers_ptq.scheme import CalibrationSettings, Plan, QuantScheme

CALIBRATION = CalibrationSettings(num_inference_steps=2, num_samples=2, batch_size=2)
METHOD_WORDS = ("htg", "gptq", "ptq4dit", "smoothquant", "qdit", "reconstruct", "csb", "group_search", "ssc")


def test_every_method_is_registered_with_a_kind():
    assert set(PLUGINS) == {"smoothquant", "ptq4dit", "htg", "group_search", "gptq", "reconstruct"}
    assert {cls.kind for cls in PLUGINS.values()} == {"transform", "group_sizes", "rounding"}


def test_the_orchestrator_names_no_method():
    """No identifier, attribute or string of the orchestrator (QuantRun, quantize_transformer, the imports) names a
    method: its stages are the plug-ins' handlers. (QuantizationReport's fields are the public report.)"""
    tree = ast.parse(Path(api.__file__).read_text())
    parts = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
             or getattr(n, "name", None) in ("QuantRun", "quantize_transformer")]
    assert len([n for n in parts if hasattr(n, "name")]) == 2
    words = set()
    for node in (sub for part in parts for sub in ast.walk(part)):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.update(node.name.split("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.update(node.value.lower().replace("-", " ").replace("'", " ").split())
    named = sorted(w for w in words if any(m in w.lower() for m in METHOD_WORDS))
    assert not named, f"api.py names methods: {named}"


def test_flat_config_becomes_composed_methods():
    plan = QuantConfig(weight_bits=4, htg_shift=True, htg_scaling="printed", htg_groups=3, group_search_bits=5.0,
                       weight_rounding="gptq", gptq_damp=0.05).plan()
    assert [type(m).__name__ for m in plan.methods] == ["HTG", "GroupSearch", "GPTQ"]
    htg, search, gptq = plan.methods
    assert (htg.shift, htg.scale, htg.num_groups, htg.migration_alpha) == (True, False, 3, None)
    assert (search.bits_per_weight, gptq.damp) == (5.0, 0.05)


def test_a_plan_takes_one_method_per_kind():
    from diffusers_ptq.methods.htg import HTG
    from diffusers_ptq.methods.smoothquant import SmoothQuant

    with pytest.raises(ValueError, match="both transform"):
        Plan(QuantScheme(), CALIBRATION, [SmoothQuant(), HTG()])


@pytest.mark.parametrize(("cls", "options", "message"), [
    ("htg", {"ema_alpha": 1.5}, "ema_alpha must be in"),
    ("htg", {"shift": False, "scale": False}, "at least one"),
    ("ptq4dit", {"ssc_rows": "token"}, "ssc_rows"),
    ("smoothquant", {"alpha": -1}, "alpha must be in"),
    ("group_search", {"bits_per_weight": 4}, "above 4"),
    ("gptq", {"damp": 1}, "damp"),
    ("reconstruct", {"iters": 0}, "positive int"),
])
def test_method_options_are_validated_on_construction(cls, options, message):
    with pytest.raises(ValueError, match=message):
        PLUGINS[cls](**options)


@dataclass
class HalveEveryTarget(Method):
    """A toy transform, defined here and not in the engine: divide every smoothing target's input by 2."""

    name = "halve-test"
    kind = "transform"
    factor: float = 2.0

    def observations(self, scheme) -> Observations:
        return Observations(stats=True)

    def transform(self, run) -> None:
        fold_smoothing(run, lambda stats, weights: torch.full((weights[0].shape[1],), self.factor))


def test_a_new_method_runs_through_the_engine_unchanged():
    """The toy method is folded into every target (the float model is unchanged by it, exactly up to rounding) and
    the quantized model works; the orchestrator was not edited for it."""
    model = make_tiny_transformer()
    randomize_modulation(model)
    with torch.no_grad():
        reference = model(**tiny_inputs()).sample
    quantized = copy.deepcopy(model)
    plan = Plan(QuantScheme(act_bits=None), CALIBRATION, [HalveEveryTarget()])
    report = api.quantize_transformer(quantized, plan, id2label={0: "0", 1: "1"}, progress=False)
    assert len(report.smoothed_targets) == 7
    with torch.no_grad():
        out = quantized(**tiny_inputs()).sample
    rel = float((out - reference).pow(2).mean() / reference.pow(2).mean())
    assert rel < 1e-3  # W8A16: the fold by 2 is exact; only 8-bit weight rounding is left


def _configs():
    from diffusers_ptq import BaselineConfig, HTGConfig, PTQ4DiTConfig, QDiTConfig
    from diffusers_ptq.config import load_recipe, recipe_names

    made = [BaselineConfig(), BaselineConfig(smoothquant_alpha=0.3, weight_rounding="gptq", gptq_damp=0.1),
            PTQ4DiTConfig(ssc=False, ssc_rows="timestep", weight_rounding="reconstruct", reconstruct_iters=7),
            HTGConfig(num_groups=3, linkage="optimal", migration_alpha=None, scale=False, include=["x*"]),
            HTGConfig(ema_alpha=0.5, weight_bits=4, weight_group_size=64, quantize_attention=True),
            QDiTConfig(), QDiTConfig(shift=True, scale=True, search_proxy="output", weight_rounding="gptq"),
            QDiTConfig(weight_group_size=64), QDiTConfig(weight_bits=8)]
    return made + [load_recipe(name) for name in recipe_names()]


@pytest.mark.parametrize("index", range(len(_configs())))
def test_diffusers_configs_compose_the_same_plan_as_their_flat_form(index):
    """The diffusers config classes build their plug-ins from their own options (to_plan); the flat QuantConfig
    form gives the identical plan, so both paths run the same engine."""
    config = _configs()[index]
    assert config.to_plan() == config.to_quant_config().plan()
