"""The registries drive everything: every registered method resolves on every family, has a CLI flag per
knob and is built by the one factory; registering a new method makes it reachable from all of them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from ivcprune import SpanSelection, UnsupportedModelError, register
from ivcprune.cli import build_parser
from ivcprune.families import FAMILIES, family_class, get_adapter
from ivcprune.methods import REGISTRY, PruningMethod, knob_fields, make_method, method_label, method_names
from ivcprune.models import RANDOM_CONFIGS, random_config

from conftest import make_inputs, make_model


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_method_resolves_on_every_family(family, name):
    model = make_model(family, layers=4)
    cls = REGISTRY[name].cls
    try:
        cfg = make_method(name).resolve(get_adapter(model))
    except UnsupportedModelError as e:  # a refusal names what the family lacks
        assert cls.name in ("visionzip",) and "CLS" in str(e)
        return
    assert cfg["method"] == cls.name and cls.min_layer <= cfg["layer"] < 4 and 0 < cfg["budget"] <= 1
    # every knob is in the resolved configuration (what run.json records)
    assert {f.name for f in knob_fields(REGISTRY[name].cls)} <= set(cfg)


def test_cli_flags_come_from_the_fields():
    parser = build_parser()
    for command in ("generate", "bench", "eval"):
        sub = parser._subparsers._group_actions[0].choices[command]
        dests = {a.dest for a in sub._actions}
        for entry in REGISTRY.values():
            for f in knob_fields(entry.cls):
                assert f"knob_{f.name}" in dests, (command, f.name)
        method = next(a for a in sub._actions if a.dest == "method")
        assert set(method.choices) == set(method_names())


def test_factory_checks_knobs():
    assert make_method("none") is None
    assert make_method("ivc", layer=None, budget=None).knobs() == make_method("ivc").knobs()  # None = preset
    assert make_method("ivc", rule="fill").rule == "fill"
    with pytest.raises(TypeError, match="has no knob seed"):
        make_method("ivc", seed=3)
    with pytest.raises(ValueError, match="rule must be one of"):
        make_method("ivc", rule="sometimes")
    assert method_label("none") == "unpruned" and method_label("ivc_only") == "IVC only"


def test_families_know_their_facts():
    for model_type, cls in FAMILIES.items():
        assert family_class(model_type) is cls
        assert "{ref}" in cls.grounding_prompt
        config_cls, model_cls = cls.model_classes()
        assert config_cls.model_type == model_type and model_cls.__name__.endswith("ForConditionalGeneration")
    for name in RANDOM_CONFIGS:
        cfg = random_config(name, {"num_hidden_layers": 2})
        assert cfg.model_type in FAMILIES and cfg.get_text_config().num_hidden_layers == 2
    with pytest.raises(ValueError, match="unknown random config"):
        random_config("llava-next-7b")


@dataclasses.dataclass(repr=False, eq=False)
class KeepCorners(PruningMethod):
    """A test method: the first and last ``corner`` tokens of each span (plus the budget's fill from the left)."""

    name = "corners"
    label = "corners"
    corner: int = 2

    def select(self, span, config: dict[str, Any]) -> SpanSelection:
        n = self.target_count(span.length, config)
        head = torch.arange(min(n, span.length))
        tail = torch.arange(max(0, span.length - config["corner"]), span.length)
        kept = torch.unique(torch.cat([head[: max(0, n - len(tail))], tail]))
        return SpanSelection(kept, {"random": kept})


def test_a_new_method_is_one_class_and_one_registration():
    register("corners", KeepCorners)
    try:
        assert "corners" in method_names()
        args = build_parser().parse_args(["generate", "--model", "x", "--image", "a.png", "--prompt", "p",
                                          "--method", "corners", "--corner", "3", "--budget", "0.25"])
        assert (args.method, args.knob_corner, args.knob_budget) == ("corners", 3, 0.25)
        method = make_method("corners", corner=3, budget=0.25, layer=2)
        model = make_model("qwen2_5_vl")
        inputs = make_inputs(model, media=(("image", 1, 8, 8),))
        with torch.no_grad(), method(model):
            model(**inputs)
        span = method.last_report.spans[0]
        assert span.kept == 4 and span.length == 16  # 25% of 16, the last 3 among them
        assert method.last_report.kept[-1].item() == inputs["input_ids"].shape[1] - 1
    finally:
        del REGISTRY["corners"]
