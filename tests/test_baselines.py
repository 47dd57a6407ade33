"""Baseline methods against direct re-implementations of their rules: FastV and PDrop rank by attention
weights that eager attention materialises (``output_attentions``; the methods themselves compute the one row
they need from queries and keys, under sdpa); PDrop's stages are checked one by one on the masked reference,
and its prefill and decoding equal the multi-stage masked reference; the "+IVC" combinations keep the IVC
tokens inside the same budget."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ivcprune import FastV, PDrop, UnsupportedModelError, get_adapter, make_method
from ivcprune.merging import visionzip_select
from ivcprune.methods.pdrop import default_stages
from ivcprune.rules import cdpruner_select, dart_select, divprune_select

from conftest import FAMILIES, make_inputs, make_model
from reference import masked_stages

ATOL = 2e-4


def _last_row(model, inputs, layer, stages=()):
    """Eager attention of the last prompt token in ``layer`` (heads averaged), prompt positions masked as keys
    by ``stages`` (see :func:`masked_stages`)."""
    ctx = masked_stages(model, list(stages)) if stages else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        out = model(**inputs, output_attentions=True)
    return out.attentions[layer][0, :, -1].float().mean(0)


def _top(scores, candidates, k):
    order = sorted(candidates, key=lambda i: (-float(scores[i]), i))
    return set(order[:k])


def _content(s):
    """A span's positions that methods rank: all but its structure tokens (LLaVA-OneVision's newlines)."""
    return set(range(s.start, s.start + s.length)) - set(s.positions("structure").tolist())


def _text_positions(rep):
    """Positions every cut keeps: the text, and the spans' structure tokens."""
    content = set().union(*(_content(s) for s in rep.spans))
    return {p for p in range(rep.seq_len) if p not in content}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fastv_keeps_the_tokens_eager_attention_ranks_first(family):
    sdpa, eager = make_model(family, attn="sdpa"), make_model(family, attn="eager")
    inputs = make_inputs(sdpa, media=(("image", 1, 12, 16),), text_after=7)
    method = FastV(layer=2, budget=0.3)
    with torch.no_grad(), method(sdpa):
        sdpa(**inputs)
    rep = method.last_report
    row = _last_row(eager, inputs, 1)  # layer K-1
    for s in rep.spans:
        content = _content(s)
        expected = _top(row, content, method.target_count(len(content), rep.config))
        assert set(s.groups["fastv"].tolist()) == expected
        assert {p for p in rep.kept.tolist() if p in content} == expected


def test_pdrop_defaults():
    assert default_stages(32) == (8, 16, 24) and default_stages(28) == (7, 14, 21)
    model = make_model("llava", layers=8)
    cfg = PDrop().resolve(get_adapter(model))
    assert cfg["stages"] == [2, 4, 6] and cfg["layer"] == 2 and cfg["stage_ratio"] == 0.5
    assert cfg["budget"] == pytest.approx(0.125)
    assert PDrop(budget=0.25).resolve(get_adapter(model))["stage_ratio"] == \
        pytest.approx(0.25 ** (1 / 3))
    with pytest.raises(ValueError, match="stage_layers"):
        PDrop(stage_layers="8,4")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pdrop_stages_match_eager_attention_and_the_masked_reference(family):
    layers = 8
    sdpa, eager = make_model(family, attn="sdpa", layers=layers), make_model(family, attn="eager", layers=layers)
    inputs = make_inputs(sdpa, media=(("image", 1, 12, 16),), text_after=7)
    method = PDrop()
    with torch.no_grad(), method(sdpa):
        logits = sdpa(**inputs).logits[0]
        out = sdpa.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
    rep = method.last_report
    stages = rep.config["stages"]
    assert stages == [2, 4, 6]
    text = _text_positions(rep)
    alive = {s.index: _content(s) for s in rep.spans}
    sizes = {s.index: len(alive[s.index]) for s in rep.spans}
    masks = []
    for step, layer in enumerate(stages, start=1):
        row = _last_row(eager, inputs, layer, masks)  # the stage layer's own attention, earlier stages masked
        keep = set(text)
        for s in rep.spans:
            alive[s.index] = _top(row, alive[s.index], int(sizes[s.index] * 0.5**step))
            assert set(s.groups[f"pdrop@{layer}"].tolist()) == alive[s.index], f"stage {layer}"
            keep |= alive[s.index]
        masks.append((layer, torch.tensor(sorted(keep))))
    assert set(rep.kept.tolist()) == set(masks[-1][1].tolist())
    with torch.no_grad(), masked_stages(sdpa, masks):
        ref_logits = sdpa(**inputs).logits[0]
        ref = sdpa.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
    torch.testing.assert_close(logits, ref_logits[rep.kept], atol=ATOL, rtol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
    # every layer's cache holds the tokens kept in the end, plus the generated ones
    assert {layer.get_seq_length() for layer in out.past_key_values.layers} == {rep.kept.numel() + 3}


@pytest.mark.parametrize("name", ["fastv+ivc", "pdrop+ivc"])
def test_ivc_tokens_are_kept_inside_the_budget(name):
    model = make_model("qwen2_5_vl", layers=8)
    inputs = make_inputs(model, media=(("image", 1, 16, 20),), text_after=7)
    base, combined = make_method(name.split("+")[0]), make_method(name)
    for m in (base, combined):
        with torch.no_grad(), m(model):
            model(**inputs)
    b, c = base.last_report.spans[0], combined.last_report.spans[0]
    assert b.kept == c.kept  # the same budget
    ivc = set(c.groups["ivc_cos"].tolist()) | set(c.groups["ivc_sin"].tolist())
    kept = {p for p in combined.last_report.kept.tolist() if c.start <= p < c.start + c.length}
    assert ivc and ivc <= kept
    assert kept != {p for p in base.last_report.kept.tolist() if b.start <= p < b.start + b.length}


def test_fastv_plus_ivc_fills_with_fastv_ranking():
    """Outside the IVC tokens, FastV+IVC keeps FastV's best tokens: its pick is FastV's ranking with the IVC
    tokens taken out first."""
    model, eager = make_model("llava"), make_model("llava", attn="eager")
    inputs = make_inputs(model, text_after=7)
    m = make_method("fastv+ivc", layer=2, budget=0.4)
    with torch.no_grad(), m(model):
        model(**inputs)
    s = m.last_report.spans[0]
    ivc = set(s.groups["ivc_cos"].tolist()) | set(s.groups["ivc_sin"].tolist())
    row = _last_row(eager, inputs, 1)
    rest = [p for p in range(s.start, s.start + s.length) if p not in ivc]
    assert set(s.groups["fastv+ivc"].tolist()) == _top(row, rest, s.kept - len(ivc))


def test_visionzip_matches_clip_attention_and_the_masked_reference():
    sdpa, eager = make_model("llava", attn="sdpa"), make_model("llava", attn="eager")
    inputs = make_inputs(sdpa, media=(("image", 1, 8, 8), ("image", 1, 8, 8)), text_after=7, seed=3)
    method = make_method("visionzip", budget=0.25)
    with torch.no_grad(), method(sdpa):
        logits = sdpa(**inputs).logits[0]
        out = sdpa.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
    rep = method.last_report
    # the CLS row of CLIP's -2 layer, as eager attention materialises it, heads summed
    with torch.no_grad():
        vt = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = len(eager.model.vision_tower.encoder.layers) - 2
    cls = vt.attentions[layer][:, :, 0, 1:].sum(1)  # (images, 64)
    features = vt.hidden_states[-2][:, 1:]
    keys = []

    def grab(module, args, kwargs):
        keys.append(module.k_proj(kwargs["hidden_states"])[:, 1:])

    h = eager.model.vision_tower.encoder.layers[layer].self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        eager.model.vision_tower(inputs["pixel_values"])
    h.remove()
    heads = eager.config.vision_config.num_attention_heads
    picks = []
    for i, s in enumerate(rep.spans):
        dominant = set(torch.sort(cls[i], descending=True, stable=True).indices[:14].tolist())
        assert set((s.groups["dominant"] - s.start).tolist()) == dominant
        k = keys[0][i].view(64, heads, -1).transpose(0, 1)
        picks.append(visionzip_select(cls[i], k, features[i], 14, 2))
        assert set((s.groups["contextual"] - s.start).tolist()) == set(picks[-1].targets.tolist())

    def merged(module, args):  # the reference: the same merge before the projector, nothing cut
        f = args[0].clone()
        for i, p in enumerate(picks):
            f[i, p.targets] = p.merged
        return (f,)

    h = sdpa.model.multi_modal_projector.register_forward_pre_hook(merged)
    try:
        with torch.no_grad(), masked_stages(sdpa, [(0, rep.kept)]):
            ref_logits = sdpa(**inputs).logits[0]
            ref = sdpa.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    finally:
        h.remove()
    torch.testing.assert_close(logits, ref_logits[rep.kept], atol=ATOL, rtol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)
    assert {layer.get_seq_length() for layer in out.past_key_values.layers} == {rep.kept.numel() + 3}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_visionzip_refuses_towers_without_a_cls_token(family):
    with pytest.raises(UnsupportedModelError, match="CLS"):
        make_method("visionzip")(make_model(family))


def _span_of(rep):
    s = rep.spans[0]
    return s, {p for p in rep.kept.tolist() if p in _content(s)}


def _check_masked(model, inputs, method, stages):
    """Prefill logits of the kept tokens and greedy decoding equal the masked reference."""
    with torch.no_grad(), method(model):
        logits = model(**inputs).logits[0]
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    keep = method.last_report.kept
    with torch.no_grad(), masked_stages(model, [(layer, keep) for layer in stages]):
        ref_logits = model(**inputs).logits[0]
        ref = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    torch.testing.assert_close(logits, ref_logits[keep], atol=ATOL, rtol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", ["divprune", "cdpruner"])
def test_pre_llm_methods_rank_the_llm_input_embeddings(family, name):
    """DivPrune and CDPruner before layer 0: their choice from the embeddings the unpruned model feeds its
    first layer (visual rows of the span; CDPruner's text: the prompt after the span), and the masked
    reference from layer 0 on."""
    model = make_model(family)
    inputs = make_inputs(model, media=(("image", 1, 12, 16),), text_after=7)
    method = make_method(name, budget=0.3)
    _check_masked(model, inputs, method, [0])
    s, kept = _span_of(method.last_report)
    with torch.no_grad():
        emb = model(**inputs, output_hidden_states=True).hidden_states[0][0]
    content = torch.tensor(sorted(_content(s)))
    k = method.target_count(len(content), method.last_report.config)
    visual = emb[content]
    if name == "divprune":
        expected = divprune_select(visual, k)
    else:
        expected = cdpruner_select(visual, emb[s.start + s.length + 2 :], k, negate=False)
    assert kept == set(content[expected].tolist())


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_dart_pivots_and_similarities_come_from_layer_k(family):
    model = make_model(family)
    inputs = make_inputs(model, media=(("image", 1, 12, 16),), text_after=7)
    method = make_method("dart", budget=0.3)
    _check_masked(model, inputs, method, [2])
    s, kept = _span_of(method.last_report)
    lm = model.model.language_model
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
        layer = lm.layers[1]
        x = layer.input_layernorm(hs[1])
        k = layer.self_attn.k_proj(x)[0].view(x.shape[1], -1, layer.self_attn.head_dim).transpose(0, 1)
        cos, sin = lm.rotary_emb(x, torch.arange(x.shape[1])[None])
        half = k.shape[-1] // 2
        k = k * cos[0] + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * sin[0]  # rotary, by hand
        states = lm.norm(hs[2])[0]
    scores = k.abs().sum(dim=(0, 2))  # L1 norm over heads and dims
    after = torch.arange(s.start + s.length, x.shape[1])
    expected = dart_select(states[s.start : s.start + s.length], method.target_count(s.length, method.last_report
                           .config), pivot_scores=scores[s.start : s.start + s.length], text_tokens=states[after],
                           text_pivot_scores=scores[after])
    assert kept == set((expected + s.start).tolist())
