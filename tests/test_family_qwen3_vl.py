"""Qwen3-VL (dense and MoE) at the model level: the interleaved M-RoPE frequency->axis map read off the model's
own rotary module, the ``applied`` IVC statistic against the rotation the model applies, the ``authors``
statistic and the preset's selection against the loop reference, DeepStack additions following the cut (every
K from before the first decoder layer to after DeepStack, against the masked reference, batched), videos as
one span per frame, the by-analogy preset and the released checkpoints' shapes."""

from __future__ import annotations

import pytest
import torch

from ivcprune import IVCPrune, get_adapter, preset_for
from ivcprune.families.qwen3_vl import deepstack_add, interleaved_axes
from ivcprune.methods import make_method
from ivcprune.models import random_config
from ivcprune.selection import ivc_scores

from conftest import batch_inputs, make_inputs, make_model
from reference import masked_stages, reference_selection

FAMILIES = ("qwen3_vl", "qwen3_vl_moe")
pytestmark = pytest.mark.usefixtures("one_thread")


def _rotary(name: str):
    """The text rotary module of a ``random:`` / ``tiny-`` config (no weights needed)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    return Qwen3VLTextRotaryEmbedding(random_config(name).get_text_config())


def probed_axes(rotary) -> list[int]:
    """Which axis rotates each frequency, read off the module's output: positions moving one axis at a time
    (the others at 0) give sin != 0 exactly at the frequencies that axis drives."""
    n = rotary.inv_freq.numel()
    axes = [-1] * n
    x = torch.zeros(1, 1, 1)
    for axis in range(3):
        pos = torch.zeros(3, 1, 1, dtype=torch.long)
        pos[axis] = 7
        _, sin = rotary(x, pos)
        for j in (sin[0, 0, :n] != 0).nonzero().squeeze(1).tolist():
            assert axes[j] == -1, f"frequency {j} follows two axes"
            axes[j] = axis
    assert -1 not in axes
    return axes


@pytest.mark.parametrize("name", ["qwen3-vl-8b", "qwen3-vl-30b-a3b", "tiny-qwen3-vl", "tiny-qwen3-vl-moe"])
def test_frequency_axis_map_is_the_models(name):
    rotary = _rotary(name)
    axes = probed_axes(rotary)
    assert tuple(axes) == interleaved_axes(rotary.mrope_section, rotary.inv_freq.numel())
    if name.startswith("qwen3"):  # [24, 20, 20]: t, h, w round-robin over the first 60, the last 4 on t
        assert axes[:6] == [0, 1, 2, 0, 1, 2] and axes[60:] == [0] * 4
        assert [axes.count(a) for a in range(3)] == [24, 20, 20]


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_info_carries_the_map_and_the_applied_statistic_is_the_models_rotation(family):
    model = make_model(family)
    info = get_adapter(model).rope_info()
    rotary = model.model.language_model.rotary_emb
    assert list(info.axis_of_freq) == probed_axes(rotary)
    inputs = make_inputs(model, media=(("image", 1, 12, 16),))
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"])
    span = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    positions = pos[:, 0, span]  # (3, L), h and w differ from t inside the image
    cos, sin = rotary(torch.zeros(1, 1, dtype=torch.float64), positions[:, None, :])
    applied = ivc_scores(positions, info.inv_freq, statistic="applied", mrope_section=info.mrope_section,
                         axis_of_freq=info.axis_of_freq)
    # the model's cos/sin repeat each frequency twice over the head: their mean is the mean over frequencies
    torch.testing.assert_close(applied[0], cos[0].double().mean(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(applied[1], sin[0].double().mean(-1), atol=1e-6, rtol=0)
    contiguous = ivc_scores(positions, info.inv_freq, statistic="applied", mrope_section=info.mrope_section)
    assert (contiguous[0] - applied[0]).abs().max() > 1e-3  # Qwen2.5-VL's sections would be another rotation


def test_axis_map_is_checked():
    pos = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="axis_of_freq must give one of 3 axes to each of 4 frequencies"):
        ivc_scores(pos, torch.ones(4), statistic="applied", axis_of_freq=[0, 1, 3, 0])
    # the authors' statistic (every axis, every frequency) does not depend on the layout
    pos = torch.randint(0, 50, (3, 6))
    inv = torch.rand(4)
    a = ivc_scores(pos, inv, statistic="authors", axis_of_freq=[0, 1, 2, 0])
    b = ivc_scores(pos, inv, statistic="authors", mrope_section=[2, 1, 1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_preset_selection_equals_loop_reference(family):
    """The by-analogy preset (fill to 50%, IVC 10% + 10% authors' statistic, seeds 1%, softmax over the span) at a
    K after DeepStack, against the float64 loop reference from the unpruned model's hidden states (layer K-1's
    input is the output of layer K-2, recorded after DeepStack ends)."""
    model = make_model(family, layers=6)
    inputs = make_inputs(model, media=(("image", 1, 12, 16),), text_after=10)
    K = 5
    method = IVCPrune(layer=K)
    with torch.no_grad(), method(model):
        model(**inputs)
    rep = method.last_report
    assert rep.config["rule"] == "fill" and rep.config["softmax_domain"] == "span"
    (r,) = reference_selection(model, inputs, K)
    (s,) = rep.spans
    assert (s.start, s.length) == (r["start"], r["length"])
    assert set(s.ivc_cos.tolist()) == r["ivc_cos"] and set(s.ivc_sin.tolist()) == r["ivc_sin"]
    assert set(s.seeds.tolist()) == r["seed"]
    assert {p for p in rep.kept.tolist() if s.start <= p < s.start + s.length} == r["kept"]


def test_applied_statistic_selects_with_the_interleaved_map():
    model = make_model("qwen3_vl")
    inputs = make_inputs(model, media=(("image", 1, 12, 16),))
    info = get_adapter(model).rope_info()
    method = IVCPrune(layer=3, ivc_statistic="applied", ablation="no_foreground")
    with torch.no_grad(), method(model):
        model(**inputs)
    (s,) = method.last_report.spans
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"])
    cos, _ = ivc_scores(pos[:, 0, s.start:s.start + s.length], info.inv_freq, statistic="applied",
                        axis_of_freq=info.axis_of_freq)
    top = sorted(range(s.length), key=lambda i: (-float(cos[i]), i))[:5]
    assert sorted(s.ivc_cos.tolist()) == sorted(s.start + i for i in top)


# -- DeepStack ---------------------------------------------------------------------------------------------
def test_deepstack_add_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 7, generator=g) > 0.4
    embeds = torch.randn(int(mask.sum()), 3, generator=g)
    hidden = torch.randn(2, 7, 3, generator=g)
    full = deepstack_add(hidden, mask, embeds, None)
    rows = [(b, s) for b in range(2) for s in range(7) if mask[b, s]]
    expect = hidden.clone()
    for k, (b, s) in enumerate(rows):
        expect[b, s] += embeds[k]
    assert torch.equal(full, expect)
    # a cut sequence: row 0 keeps slots 1, 3, 6 (left-padded to 4), row 1 keeps 0, 2, 4, 5
    index = torch.tensor([[0, 1, 3, 6], [0, 2, 4, 5]])
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    cut = deepstack_add(hidden.gather(1, index[..., None].expand(-1, -1, 3)), mask, embeds, (index, valid))
    for b in range(2):
        for m in range(4):
            if valid[b, m]:
                assert torch.equal(cut[b, m], expect[b, index[b, m]])


@pytest.mark.parametrize("family", FAMILIES)
def test_deepstack_features_matter(family):
    """Without DeepStack's additions the model's logits change: the masked-reference checks exercise them."""
    model = make_model(family)
    inputs = make_inputs(model, media=(("image", 1, 12, 16),))
    with torch.no_grad():
        full = model(**inputs).logits
        hooks = [m.register_forward_hook(lambda mod, a, out: out * 0) for m in model.model.visual.deepstack_merger_list]
        try:
            without = model(**inputs).logits
        finally:
            for h in hooks:
                h.remove()
    assert (full - without).abs().max() > 1e-3
    assert get_adapter(model).feature_layers == 3


def _check_against_masked_reference(model, inputs, method, n=3):
    with torch.no_grad(), method(model):
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    reports = method.last_reports
    with torch.no_grad(), masked_stages(model, reports[0].stages):
        ref_logits = model(**inputs).logits
        ref = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    keep = reports[0].kept
    torch.testing.assert_close(logits[0], ref_logits[0, keep], atol=2e-5, rtol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    return reports[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name, layer", [("divprune", 0), ("cdpruner", 0), ("random", 1), ("fastv", 2), ("ivc", 2),
                                         ("ivc", 3)])
def test_every_k_around_deepstack_matches_the_masked_reference(family, name, layer):
    """Cuts before, between and after the DeepStack layers: kept tokens get their additions, exactly as the unpruned
    model with the pruned tokens masked; the KV cache of every layer holds the kept tokens only."""
    model = make_model(family, attn="eager" if name == "fastv" else "sdpa")
    inputs = make_inputs(model, media=(("image", 1, 8, 12), ("video", 2, 8, 8)), text_after=6)
    rep = _check_against_masked_reference(model, inputs, make_method(name, layer=layer, budget=0.4))
    assert rep.layer == layer and rep.pruned
    assert [s.kind for s in rep.spans] == ["image", "video", "video"]
    method = make_method(name, layer=layer, budget=0.4)
    with torch.no_grad(), method(model):
        out = model(**inputs, use_cache=True)
    kept = method.last_report.kept.numel()
    assert {layer_cache.keys.shape[2] for layer_cache in out.past_key_values.layers} == {kept}


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_equal_alone_at_k_before_deepstack_ends(family):
    model = make_model(family)
    rows = [make_inputs(model, media=(("image", 1, 12, 16),), seed=1),
            make_inputs(model, media=(), text_before=5, text_after=7, seed=2),
            make_inputs(model, media=(("image", 1, 8, 8), ("video", 2, 4, 8)), text_before=3, seed=3)]
    method = make_method("ivc", layer=1, budget=0.5)
    alone = []
    for r in rows:
        with torch.no_grad(), method(model):
            out = model.generate(**r, max_new_tokens=4, do_sample=False)
        alone.append((out[0, r["input_ids"].shape[1]:], method.last_report.kept))
    batch = batch_inputs(rows)
    with torch.no_grad(), method(model):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    for b, (tokens, kept) in enumerate(alone):
        assert torch.equal(out[b, batch["input_ids"].shape[1]:], tokens)
        assert torch.equal(method.last_reports[b].kept, kept)


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_one_is_identical_and_hooks_leave_nothing(family):
    model = make_model(family)
    inputs = make_inputs(model, media=(("image", 1, 12, 16), ("video", 2, 8, 8)))
    with torch.no_grad():
        ref = model(**inputs).logits
        for name, layer in (("divprune", 0), ("random", 1), ("random", 2)):
            method = make_method(name, layer=layer, budget=1.0)
            with method(model):
                assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model(**inputs).logits, ref)  # hooks removed: the model's own DeepStack again


# -- preset and shapes -------------------------------------------------------------------------------------
def test_preset_by_analogy_after_deepstack():
    for family in FAMILIES:
        assert preset_for(family, 36).layer == 22 and preset_for(family, 28).layer == 16
        assert preset_for(family, 48).layer == 27
        p = preset_for(family, 36)
        assert (p.rule, p.budget, p.ivc_ratio, p.seed_ratio, p.min_one_seed, p.softmax_domain) == \
            ("fill", 0.5, 0.1, 0.01, True, "span")
        assert p.note.startswith("by analogy, not validated")
    model = make_model("qwen3_vl")  # 4 layers: 16/28 gives 2, before DeepStack's last addition (after layer 2)
    cfg = IVCPrune().resolve(get_adapter(model))
    assert cfg["layer"] == 3 and cfg["preset"] == "Qwen3-VL (by analogy, not validated)"
    assert cfg["value_input"] == "normed"
    assert IVCPrune(layer=1).resolve(get_adapter(model))["layer"] == 1  # an explicit K stays: the cut is exact


def test_random_configs_have_the_released_shapes():
    c = random_config("qwen3-vl-8b")
    t, v = c.text_config, c.vision_config
    assert (c.model_type, t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads,
            t.num_key_value_heads, t.head_dim, t.vocab_size) == ("qwen3_vl", 36, 4096, 12288, 32, 8, 128, 151936)
    assert t.rope_parameters["rope_theta"] == 5e6 and t.rope_parameters["mrope_section"] == [24, 20, 20]
    assert t.rope_parameters["mrope_interleaved"] is True
    assert (v.patch_size, v.spatial_merge_size, list(v.deepstack_visual_indexes), v.depth, v.out_hidden_size) == \
        (16, 2, [8, 16, 24], 27, 4096)
    c = random_config("qwen3-vl-30b-a3b")
    t, v = c.text_config, c.vision_config
    assert (c.model_type, t.num_hidden_layers, t.hidden_size, t.num_experts, t.num_experts_per_tok,
            t.moe_intermediate_size, t.num_key_value_heads, t.head_dim) == \
        ("qwen3_vl_moe", 48, 2048, 128, 8, 768, 4, 128)
    assert (v.out_hidden_size, list(v.deepstack_visual_indexes)) == (2048, [8, 16, 24])
    # a reduced tower keeps three DeepStack layers at the same relative depths
    assert list(random_config("qwen3-vl-8b", {"vision.depth": 4}).vision_config.deepstack_visual_indexes) == [1, 2, 3]
