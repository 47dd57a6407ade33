"""Gemma 3: the real 12B shapes, the tiny model's layer mix, the rotary IVC reads, and the cut kept exact where
Gemma differs from the other families (bidirectional image blocks, sliding windows measured in original
positions, sliding cache layers, decoding past the window), with negative controls showing that the reference
sees each of them; what is refused (flash attention, VisionZip)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ivcprune import FastV, IVCPrune, RandomPrune
from ivcprune.families import AttentionCut, UnsupportedModelError, gemma3, get_adapter
from ivcprune.families.base import Family
from ivcprune.families.gemma3 import Gemma3, block_ids
from ivcprune.merging import last_query_attention
from ivcprune.methods import make_method
from ivcprune.methods.ivc import preset_for
from ivcprune.models import random_config

from conftest import batch_inputs, make_inputs, make_model
from reference import masked_reference

ATOL = 2e-4
pytestmark = pytest.mark.usefixtures("one_thread")


def _generate(model, inputs, n):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


def _run(model, inputs, pruner, n):
    with torch.no_grad(), pruner(model):
        logits = model(**inputs).logits[0]
        out = _generate(model, inputs, n)
    return logits, out, pruner.last_report.kept


def _reference(model, inputs, keep, layer, n):
    with torch.no_grad(), masked_reference(model, keep, layer):
        return model(**inputs).logits[0], _generate(model, inputs, n)


def _matches(model, inputs, pruner, layer=2, n=4) -> bool:
    logits, out, keep = _run(model, inputs, pruner, n)
    ref_logits, ref = _reference(model, inputs, keep, layer, n)
    same = torch.allclose(logits, ref_logits[keep], atol=ATOL, rtol=1e-4) and torch.equal(out.sequences, ref.sequences)
    return same and all(torch.allclose(a, b, atol=ATOL, rtol=1e-4) for a, b in zip(out.logits, ref.logits))


@pytest.fixture(scope="module")
def models():
    return {attn: make_model("gemma3", attn=attn) for attn in ("sdpa", "eager")}


# -- shapes and presets ------------------------------------------------------------------------------------------
def test_random_config_has_the_real_12b_shape():
    cfg = random_config("gemma-3-12b")
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (48, 3840, 16, 8, 256, 15360, 262208)
    assert text.sliding_window == 1024 and text.query_pre_attn_scalar == 256
    assert text.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 8  # 5 local : 1 global
    assert text.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert text.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads, vision.intermediate_size,
            vision.image_size, vision.patch_size) == (27, 1152, 16, 4304, 896, 14)
    assert (cfg.mm_tokens_per_image, cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id) == \
        (256, 262144, 255999, 256000)
    assert (vision.image_size // vision.patch_size) // Gemma3.grid_side(cfg) == 4  # 64x64 patches pooled to 16x16


def test_tiny_model_has_both_layer_types_on_both_sides_of_k(models):
    text = models["sdpa"].config.text_config
    assert text.layer_types == ["sliding_attention", "full_attention"] * 2
    assert text.query_pre_attn_scalar != text.head_dim  # the logit scale is not head_dim ** -0.5
    inputs = make_inputs(models["sdpa"])
    assert inputs["input_ids"].shape[1] > 3 * text.sliding_window > models["sdpa"].config.mm_tokens_per_image // 2


def test_preset_by_analogy():
    p = preset_for("gemma3", 48)
    assert (p.layer, p.budget, p.ivc_ratio, p.seed_ratio, p.rule, p.softmax_domain) == (27, 0.5, 0.1, 0.01, "fill",
                                                                                       "span")
    assert p.min_one_seed and "by analogy, not validated on real checkpoints" in p.note
    assert preset_for("gemma3", 34).layer == 19  # 16/28 of any depth


@pytest.mark.parametrize("choice, kinds", [("global", ["full_attention"]), ("local", ["sliding_attention"]),
                                           ("both", ["full_attention", "sliding_attention"])])
def test_ivc_rotary_is_the_rotation_the_model_applies(models, monkeypatch, choice, kinds):
    """IVC's inverse frequencies are those whose cos/sin the chosen layers really multiply with."""
    model = models["sdpa"]
    monkeypatch.setattr(Gemma3, "ivc_rotary", choice)
    rope = get_adapter(model).rope_info()
    pos = torch.arange(40)[None]
    rotary = model.model.language_model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    first = 0
    for kind in kinds:
        cos, sin = rotary(x, pos, kind)
        half = cos.shape[-1] // 2
        inv = rope.inv_freq[first:first + half]
        first += half
        torch.testing.assert_close(cos[0, :, :half], torch.cos(pos[0, :, None] * inv) * rope.attention_scaling)
        torch.testing.assert_close(sin[0, :, :half], torch.sin(pos[0, :, None] * inv) * rope.attention_scaling)
    assert first == rope.inv_freq.numel()
    if choice == "global":  # base 1e6 with linear factor 8
        half = rope.inv_freq.numel()
        expected = 1.0 / (1e6 ** (torch.arange(0, 2 * half, 2, dtype=torch.float) / (2 * half))) / 8
        torch.testing.assert_close(rope.inv_freq, expected)


def test_unknown_ivc_rotary_is_refused(models, monkeypatch):
    monkeypatch.setattr(Gemma3, "ivc_rotary", "middle")
    with pytest.raises(ValueError, match="ivc_rotary must be one of"):
        get_adapter(models["sdpa"]).rope_info()


# -- attention signals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1])  # a sliding layer, a global layer
def test_last_query_attention_equals_eager_attentions(models, layer):
    """The runtime's last-token attention (q/k norms, query_pre_attn_scalar, the layer's rotary, its window)
    equals what eager attention computes."""
    model = models["eager"]
    inputs = make_inputs(model, text_after=1)  # the window of the last token ends inside the image
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        adapter = get_adapter(model)
        dec = adapter.layers[layer]
        q, k = adapter.query_key(dec, out.hidden_states[layer])
        S = inputs["input_ids"].shape[1]
        kind = adapter.layer_types[layer]
        cos, sin = model.model.language_model.rotary_emb(out.hidden_states[layer], torch.arange(S)[None], kind)
        window = adapter.attention_window(dec)
        key_mask = None if window is None else (S - 1 - torch.arange(S)) < window
        row = last_query_attention(q[0, :, -1], k[0], cos[0], sin[0], dec.self_attn.scaling,
                                   q.shape[1] // k.shape[1], key_mask=key_mask)
    assert (window is None) == (kind == "full_attention")
    torch.testing.assert_close(row, out.attentions[layer][0, :, -1].float().mean(0), atol=1e-5, rtol=1e-4)


def test_fastv_at_a_sliding_layer_ranks_what_eager_attention_sees(models):
    """K-1 a sliding layer: tokens out of the last token's window get no attention, as in the model."""
    sdpa, eager = models["sdpa"], models["eager"]
    inputs = make_inputs(sdpa, text_after=1)
    method = FastV(layer=1, budget=0.25)
    with torch.no_grad(), method(sdpa):
        sdpa(**inputs)
    span = method.last_report.spans[0]
    with torch.no_grad():
        row = eager(**inputs, output_attentions=True).attentions[0][0, :, -1].float().mean(0)
    order = sorted(range(span.start, span.start + span.length), key=lambda i: (-float(row[i]), i))
    assert set(span.groups["fastv"].tolist()) == set(order[:span.kept])
    assert float(row[span.start]) == 0.0  # the image's first tokens are out of the window


# -- exactness ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decoding_far_past_the_window_matches_the_reference(models, attn):
    """Prompt + 20 generated tokens, several windows long: each decode step sees exactly the kept tokens
    less than a window back (the sliding cache keeps them), global layers every kept token."""
    model = models[attn]
    inputs = make_inputs(model, media=(("image", 1, 8, 8), ("image", 1, 8, 8)))
    assert _matches(model, inputs, IVCPrune(layer=2, budget=0.25), n=20)
    assert _matches(model, inputs, IVCPrune(layer=1, budget=0.5), layer=1, n=6)  # K-1 a sliding layer
    assert _matches(model, inputs, RandomPrune(layer=3, budget=0.3, seed=1), layer=3, n=6)


def test_without_token_type_ids_images_are_causal(models):
    model = models["eager"]
    inputs = make_inputs(model)
    inputs.pop("token_type_ids")
    assert _matches(model, inputs, IVCPrune(layer=2, budget=0.4))


def test_sliding_cache_bookkeeping_after_the_cut(models):
    model = models["sdpa"]
    inputs = make_inputs(model)
    n = 12
    _, out, keep = _run(model, inputs, IVCPrune(layer=2, budget=0.25), n)
    for layer in out.past_key_values.layers:
        assert layer.get_seq_length() == keep.numel() + n - 1  # cumulative_length: kept + generated - 1
        held = min(keep.numel() + n - 1, getattr(layer, "sliding_window", 10**9) - 1)
        assert layer.keys.shape[2] == layer.values.shape[2] == held
    assert out.past_key_values.get_seq_length() == keep.numel() + n - 1


def test_rows_of_different_lengths_batch_like_alone(models):
    model = models["eager"]
    rows = [make_inputs(model, media=(("image", 1, 8, 8),), text_before=2, seed=1),
            make_inputs(model, media=(("image", 1, 8, 8), ("image", 1, 8, 8)), text_before=9, seed=2),
            make_inputs(model, media=(), seed=3)]
    method = IVCPrune(layer=2, budget=0.3)
    with torch.no_grad(), method(model):
        batch = _generate(model, batch_inputs(rows), 12)
        reports = method.last_reports
        for i, r in enumerate(rows):
            alone = _generate(model, r, 12)
            assert torch.equal(batch.sequences[i, -12:], alone.sequences[0, -12:])
            assert torch.equal(reports[i].kept, method.last_report.kept)
            for a, b in zip(batch.logits, alone.logits):
                torch.testing.assert_close(a[i], b[0], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("broken", ["one_mask", "no_window", "no_blocks"])
def test_the_reference_sees_what_the_family_keeps(models, monkeypatch, broken):
    """Negative controls: a cut that drops any one of Gemma's mask features no longer equals the reference."""
    model = models["eager"]
    inputs = make_inputs(model, media=(("image", 1, 8, 8), ("image", 1, 8, 8)))
    real = Gemma3.layer_attention_mask
    if broken == "one_mask":  # today's single causal mask for every layer, and the 2-D mask while decoding
        monkeypatch.setattr(Gemma3, "layer_attention_mask", Family.layer_attention_mask)
        monkeypatch.setattr(Gemma3, "decode_attention_mask", Family.decode_attention_mask)
    elif broken == "no_window":  # the prefill's sliding layers see every kept key
        def no_window(self, idx, mask, cut):
            return gemma3.cut_mask(cut, None, cut.context, offset=cut.valid_kv.shape[1] - cut.q_len)

        monkeypatch.setattr(Gemma3, "layer_attention_mask", no_window)
    else:
        def no_blocks(self, idx, mask, cut):
            return real(self, idx, mask, AttentionCut(**{**cut.__dict__, "context": None}))

        monkeypatch.setattr(Gemma3, "layer_attention_mask", no_blocks)
    assert not _matches(model, inputs, IVCPrune(layer=2, budget=0.25), n=12)


def test_pan_and_scan_crops_are_spans_of_their_own(models):
    """A pan-and-scan image: the original and each crop, every one its own <boi> + 16 tokens + <eoi>, its own
    bidirectional block and its own budget."""
    model = models["sdpa"]
    inputs = make_inputs(model, media=(("image", 1, 8, 8),) * 3)  # the layout of an image with two crops
    ids = inputs["input_ids"][0]
    assert int(block_ids(inputs["token_type_ids"]).max()) == 2
    method = IVCPrune(layer=2, budget=0.5)
    assert _matches(model, inputs, method)
    spans = method.last_report.spans
    assert [(s.length, s.kept, s.grid) for s in spans] == [(16, 8, (1, 4, 4))] * 3
    assert all(int(ids[s.start - 1]) == model.config.boi_token_id for s in spans)


# -- refusals -----------------------------------------------------------------------------------------------------
def test_flash_attention_is_refused_with_the_fix(models):
    adapter = get_adapter(models["sdpa"])
    cut = AttentionCut(valid_kv=torch.ones(1, 4, dtype=torch.bool), origin_kv=torch.arange(4)[None], q_len=4,
                       attn_implementation="flash_attention_2", dtype=torch.float32, device="cpu")
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa' or 'eager'"):
        adapter.layer_attention_mask(0, None, cut)
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa' or 'eager'"):
        adapter.decode_attention_mask(None, cut)


def test_visionzip_is_refused_for_siglip(models):
    with pytest.raises(UnsupportedModelError, match="no CLS token"):
        make_method("visionzip")(models["sdpa"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [None, 3])
def test_cut_masks_are_built_on_the_device_the_layers_run_on(attn, window):
    """The runtime keeps its bookkeeping (valid slots, origins, image blocks) on the CPU; the masks must land on
    the device the cut says (on a GPU, a CPU mask makes every Gemma 3 forward fail). ``meta`` stands in for it."""
    valid = torch.tensor([[False, True, True, True, True, True]])
    origin = torch.tensor([[0, 1, 2, 4, 5, 7]])
    blocks = torch.tensor([[-1, -1, 0, 0, 0, -1, -1, -1]])
    cut = AttentionCut(valid_kv=valid, origin_kv=origin, q_len=6, attn_implementation=attn, dtype=torch.float32,
                       device=torch.device("meta"))
    on_cpu = gemma3.cut_mask(dataclasses.replace(cut, device=torch.device("cpu")), window, blocks)
    on_meta = gemma3.cut_mask(cut, window, blocks)
    assert on_meta.device.type == "meta" and on_cpu.device.type == "cpu"
    assert on_meta.shape == on_cpu.shape and on_meta.dtype == on_cpu.dtype
