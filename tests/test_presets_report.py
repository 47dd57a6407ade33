"""Presets chosen from the model type, overridable knobs, and the report's JSON."""

from __future__ import annotations

import json

import pytest
import torch

from ivcprune import IVCPrune, RandomPrune, get_adapter, preset_for

from conftest import make_inputs


def test_paper_presets():
    p7 = preset_for("qwen2_5_vl", 28)
    assert (p7.layer, p7.rule, p7.budget, p7.ivc_ratio, p7.seed_ratio) == (16, "fill", 0.5, 0.1, 0.01)
    assert preset_for("qwen2_5_vl", 36).layer == 22
    q2 = preset_for("qwen2_vl", 28)
    assert (q2.layer, q2.rule, q2.foreground_ratio) == (16, "union", 0.4)
    assert preset_for("qwen2_5_vl", 4).layer == 2  # other depths: the 16/28 ratio
    assert preset_for("qwen2_5_vl", 2).layer == 1
    with pytest.raises(ValueError, match="no preset for model type 'llama'"):
        preset_for("llama", 32)
    q2 = preset_for("qwen2_vl", 28)  # the authors' Qwen2-VL code: sequence softmax, seeds without a minimum
    assert (q2.softmax_domain, q2.min_one_seed) == ("sequence", False)
    assert (p7.softmax_domain, p7.min_one_seed) == ("span", True)


def test_resolution_from_model_type(qwen25, qwen2):
    a25, a2 = get_adapter(qwen25), get_adapter(qwen2)
    cfg = IVCPrune().resolve(a25)
    assert (cfg["layer"], cfg["rule"], cfg["budget"], cfg["preset"]) == (2, "fill", 0.5, "Qwen2.5-VL")
    assert IVCPrune().resolve(a2)["rule"] == "union"
    # the preset's rule stays unless overridden; a budget with the union rule is ignored, loudly
    with pytest.warns(UserWarning, match="union rule"):
        assert IVCPrune(budget=0.3).resolve(a2)["rule"] == "union"
    assert IVCPrune(budget=0.3, rule="fill").resolve(a2)["rule"] == "fill"
    cfg = IVCPrune(layer=3, ivc_ratio=0.05, seed_ratio=0.02, foreground_ratio=0.2).resolve(a2)
    assert (cfg["layer"], cfg["ivc_ratio"], cfg["seed_ratio"], cfg["foreground_ratio"]) == (3, 0.05, 0.02, 0.2)
    assert RandomPrune().resolve(a2)["budget"] == 0.5


def test_budget_tokens(qwen25):
    inputs = make_inputs(qwen25, media=(("image", 1, 12, 16),))
    p = IVCPrune(layer=2, budget_tokens=20)
    with torch.no_grad(), p(qwen25):
        qwen25(**inputs)
    assert p.last_report.spans[0].kept == 20


def test_report_contents_and_json(qwen25):
    inputs = make_inputs(qwen25, media=(("image", 1, 12, 16),))
    p = IVCPrune(layer=2, budget=0.5)
    with torch.no_grad(), p(qwen25):
        qwen25(**inputs)
    rep = p.last_report
    (span,) = rep.spans
    assert rep.kept.dtype == torch.long and rep.kept.dim() == 1
    assert torch.equal(rep.kept, rep.kept.sort().values)
    assert (span.start, span.length, span.kept, span.grid) == (7, 48, 24, (1, 6, 8))
    assert span.ivc_cos.numel() == span.ivc_sin.numel() == 5 and span.seeds.numel() == 1
    in_span = rep.kept[(rep.kept >= span.start) & (rep.kept < span.start + span.length)]
    union = set(span.ivc_cos.tolist()) | set(span.ivc_sin.tolist()) | set(span.seeds.tolist()) | set(
        span.foreground.tolist())
    assert set(in_span.tolist()) == union
    assert not set(span.foreground.tolist()) & (set(span.ivc_cos.tolist()) | set(span.seeds.tolist()))
    labels = span.labels()
    assert labels.count("pruned") == 24 and len(labels) == 48
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["kept"] == rep.kept.tolist() and d["spans"][0]["grid"] == [1, 6, 8]
    assert d["config"]["layer"] == 2 and d["visual_kept"] == 24
    assert "kept 24/48" in rep.summary()


def test_a_span_without_text_after_it_is_noted(qwen25):
    """The queries come from the text after a span; a prompt ending with its image falls back to the last
    text token before it, and the report says so."""
    from conftest import make_inputs

    inputs = make_inputs(qwen25, media=(("image", 1, 8, 8),), text_after=0)
    # the prompt ends with the vision-end marker right after the image
    inputs = {k: v[:, :-2] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
              for k, v in inputs.items()}
    p = IVCPrune(layer=2, budget=0.5)
    with torch.no_grad(), p(qwen25):
        qwen25(**inputs)
    rep = p.last_report
    assert rep.pruned and "no text after the span" in rep.reason and rep.spans[0].kept == 8
