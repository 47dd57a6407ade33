"""Pruned-and-cut == the unpruned model with pruned tokens masked as keys (an independent reference),
for prefill logits and every decode step; KV lengths and positions; budget=1.0 is the identity."""

from __future__ import annotations

import pytest
import torch

from ivcprune import IVCPrune, RandomPrune
from ivcprune.methods import REGISTRY, make_method

from conftest import FAMILIES, FRAME_BLOCKS, make_inputs, make_model
from reference import masked_reference, masked_stages

ATOL = 2e-4

CASES = [(family, attn) for family in FAMILIES for attn in ("sdpa", "eager")]


def _generate(model, inputs, n=6, **kw):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kw)


def _assert_matches_reference(model, inputs, pruner, K, n=4):
    """Prefill logits of the kept tokens and greedy decoding equal the masked reference."""
    with torch.no_grad(), pruner(model):
        logits = model(**inputs).logits[0]
        out = _generate(model, inputs, n=n)
    keep = pruner.last_report.kept
    with torch.no_grad(), masked_reference(model, keep, K):
        ref_logits = model(**inputs).logits[0]
        ref = _generate(model, inputs, n=n)
    torch.testing.assert_close(logits, ref_logits[keep], atol=ATOL, rtol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4, msg=f"decode step {step}")
    return pruner.last_report


@pytest.mark.parametrize("family,attn", CASES)
@pytest.mark.parametrize("method", ["ivc", "random"])
def test_prefill_and_decode_match_masked_reference(family, attn, method):
    model = make_model(family, attn=attn)
    inputs = make_inputs(model, media=(("image", 1, 12, 16),))
    K = 2
    pruner = IVCPrune(layer=K) if method == "ivc" else RandomPrune(layer=K, budget=0.3, seed=3)
    report = _assert_matches_reference(model, inputs, pruner, K, n=6)
    S = inputs["input_ids"].shape[1]
    assert report.pruned and report.kept.numel() < S
    # ...and the pruning matters: the unpruned model gives other logits, the pruned prefill fewer rows.
    with torch.no_grad():
        full = model(**inputs).logits[0]
        with pruner(model):
            pruned_prefill = model(**inputs).logits[0]
    assert pruned_prefill.shape[0] == report.kept.numel()
    assert (full[-1] - pruned_prefill[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_of_every_layer_is_cut(family):
    model = make_model(family)
    inputs = make_inputs(model, media=(("image", 1, 12, 16),))
    n = 5
    pruner = IVCPrune(layer=2, budget=0.25, rule="fill")
    with torch.no_grad(), pruner(model):
        out = _generate(model, inputs, n=n)
    kept = pruner.last_report.kept.numel()
    S = inputs["input_ids"].shape[1]
    cache = out.past_key_values
    lengths = [layer.get_seq_length() for layer in cache.layers]
    # the last generated token is never fed back, hence n - 1
    assert lengths == [kept + n - 1] * len(cache.layers)
    # a sliding-window layer (Gemma 3) holds the last window - 1 of them
    held = [min(kept + n - 1, getattr(layer, "sliding_window", kept + n) - 1) for layer in cache.layers]
    assert [layer.keys.shape[-2] for layer in cache.layers] == held
    assert [layer.values.shape[-2] for layer in cache.layers] == held
    assert kept < S
    assert cache.get_seq_length() == kept + n - 1


def _positions_seen(model, fn):
    seen = []
    h = model.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone()),
        with_kwargs=True,
    )
    try:
        fn()
    finally:
        h.remove()
    k = len(set(getattr(model.config.get_text_config(), "layer_types", None) or [None]))
    return seen[::k]  # the rotary runs once per layer type and forward (Gemma 3 has two)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generated_tokens_get_unpruned_positions(family):
    model = make_model(family)
    inputs = make_inputs(model, media=(("image", 1, 12, 16),))
    pruner = IVCPrune(layer=2)
    with torch.no_grad():
        base = _positions_seen(model, lambda: _generate(model, inputs, n=5))
        with pruner(model):
            pruned = _positions_seen(model, lambda: _generate(model, inputs, n=5))
    assert len(base) == len(pruned) == 5
    for a, b in zip(base, pruned):
        assert torch.equal(a, b)
    # decode positions continue after the last prompt position (text + rope delta), not after the cut cache
    S = inputs["input_ids"].shape[1]
    last_prompt = base[0][..., -1]
    assert torch.equal(pruned[1][..., 0], last_prompt + 1)
    assert pruner.last_report.kept.numel() < S


def test_kept_tokens_keep_their_original_rotary_embeddings(qwen25):
    inputs = make_inputs(qwen25, media=(("image", 1, 12, 16),))
    K = 2
    pruner = IVCPrune(layer=K, budget=0.5)
    captured = {}

    def grab(module, args, kwargs):
        captured["pe"] = kwargs["position_embeddings"]
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    with torch.no_grad():
        lm = qwen25.model.language_model
        full_pe = {}

        def grab_full(module, args, kwargs):
            full_pe["pe"] = kwargs["position_embeddings"]

        h0 = lm.layers[K].register_forward_pre_hook(grab_full, with_kwargs=True)
        qwen25(**inputs)
        h0.remove()
        with pruner(qwen25):
            h = lm.layers[K].register_forward_pre_hook(grab, with_kwargs=True)  # runs after the pruner's hook
            qwen25(**inputs)
            h.remove()
    keep = pruner.last_report.kept
    for cut, full in zip(captured["pe"], full_pe["pe"]):
        assert torch.equal(cut, full[:, keep])
    assert captured["hidden"].shape[1] == keep.numel()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_budget_one_changes_nothing(family):
    model = make_model(family)
    inputs = make_inputs(model, media=(("image", 1, 12, 16),))
    with torch.no_grad():
        base = _generate(model, inputs, n=6)
        pruner = IVCPrune(layer=2, budget=1.0)
        with pruner(model):
            same = _generate(model, inputs, n=6)
    assert torch.equal(base.sequences, same.sequences)
    for a, b in zip(base.logits, same.logits):
        assert torch.equal(a, b)
    rep = pruner.last_report
    assert not rep.pruned and rep.visual_kept == rep.visual_tokens


def test_model_is_untouched_after_the_block(qwen25):
    inputs = make_inputs(qwen25)
    with torch.no_grad():
        before = qwen25(**inputs).logits
        n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in qwen25.modules())
        with IVCPrune(layer=2)(qwen25):
            pass
        pruner = IVCPrune(layer=2)
        pruner.apply(qwen25)
        pruner.remove()
        after = qwen25(**inputs).logits
    assert torch.equal(before, after)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in qwen25.modules()) == n_hooks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_several_images_each_get_their_own_budget(family):
    model = make_model(family)
    inputs = make_inputs(model, media=(("image", 1, 8, 12), ("image", 1, 12, 16)))
    rep = _assert_matches_reference(model, inputs, IVCPrune(layer=2, budget=0.5, rule="fill"), 2)
    lengths, grids = {
        "llava": ([64, 64], [(1, 8, 8)] * 2),  # one fixed size per image
        "internvl": ([16, 48], [None, None]),  # one tile; 1x2 tiles + thumbnail
        "llava_onevision": ([17, 17], [(1, 4, 4)] * 2),  # several images: base views and their newline
        "gemma3": ([16, 16], [(1, 4, 4)] * 2),  # one fixed size per image
    }.get(family, ([24, 48], [(1, 4, 6), (1, 6, 8)]))
    assert [s.length for s in rep.spans] == lengths
    fixed = [len(s.positions("structure")) for s in rep.spans]  # structure tokens: always kept, outside the budget
    assert [s.kept for s in rep.spans] == [(n - f) // 2 + f for n, f in zip(lengths, fixed)]
    assert [s.grid for s in rep.spans] == grids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_video_spans_are_pruned_like_images(family):
    if family in ("llava", "gemma3"):
        pytest.skip(f"{family} takes no video")
    model = make_model(family)
    inputs = make_inputs(model, media=(("video", 2, 8, 8),))
    rep = _assert_matches_reference(model, inputs, IVCPrune(layer=2, budget=0.5, rule="fill"), 2)
    expected = {"internvl": [("image", 16, 8, None)] * 2,
                "llava_onevision": [("video", 9, 5, (2, 2, 2))],  # 2 pooled frames of 2x2, a newline kept
                }.get(family, [("video", 32, 16, (2, 4, 4))])
    if family in FRAME_BLOCKS:  # Qwen3-VL: every frame is its own block (after a timestamp), so its own span
        expected = [("video", 16, 8, (1, 4, 4))] * 2
    assert [(s.kind, s.length, s.kept, s.grid) for s in rep.spans] == expected  # InternVL: a frame is an image


def test_prompt_without_image_is_a_reported_noop(qwen25):
    inputs = make_inputs(qwen25, media=())
    pruner = IVCPrune(layer=2)
    with torch.no_grad():
        base = _generate(qwen25, inputs, n=4)
        with pruner(qwen25):
            out = _generate(qwen25, inputs, n=4)
    assert torch.equal(base.sequences, out.sequences)
    rep = pruner.last_report
    assert not rep.pruned and rep.spans == [] and "no image" in rep.reason
    assert rep.kept.numel() == inputs["input_ids"].shape[1]


def test_sampling_matches_reference_and_is_seeded(qwen25):
    inputs = make_inputs(qwen25, media=(("image", 1, 12, 16),))
    K = 2
    pruner = IVCPrune(layer=K, budget=0.5)
    kw = dict(max_new_tokens=8, do_sample=True, top_k=50, temperature=1.3)
    with torch.no_grad():
        with pruner(qwen25):
            torch.manual_seed(7)
            a = qwen25.generate(**inputs, **kw)
            torch.manual_seed(7)
            b = qwen25.generate(**inputs, **kw)
        with masked_reference(qwen25, pruner.last_report.kept, K):
            torch.manual_seed(7)
            ref = qwen25.generate(**inputs, **kw)
    assert torch.equal(a, b)
    assert torch.equal(a, ref)


def test_stopping_criteria_and_eos(qwen25):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, n):
            self.n, self.calls = n, 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            return torch.full((input_ids.shape[0],), self.calls >= self.n, dtype=torch.bool)

    inputs = make_inputs(qwen25, media=(("image", 1, 12, 16),))
    S = inputs["input_ids"].shape[1]
    with torch.no_grad(), IVCPrune(layer=2)(qwen25):
        out = qwen25.generate(**inputs, max_new_tokens=20, do_sample=False,
                              stopping_criteria=StoppingCriteriaList([StopAfter(3)]))
        assert out.shape[1] == S + 3
        first = qwen25.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1].item()
        # make the first greedy token the end-of-sequence token: generation stops right there
        stopped = qwen25.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=first)
    assert stopped.shape[1] == S + 1


def test_manual_decode_loop_without_position_ids(qwen25):
    """A hand-written loop that passes neither position ids nor a cut mask still decodes correctly."""
    inputs = make_inputs(qwen25, media=(("image", 1, 12, 16),))
    K = 2
    pruner = IVCPrune(layer=K, budget=0.5)
    steps = 4
    with torch.no_grad():
        with pruner(qwen25):
            ref_gen = _generate(qwen25, inputs, n=steps + 1)
            out = qwen25(**inputs, use_cache=True)
            cache = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            mask = inputs["attention_mask"]
            toks = [tok]
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)  # unpruned length
                out = qwen25(input_ids=tok, past_key_values=cache, attention_mask=mask, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                toks.append(tok)
    S = inputs["input_ids"].shape[1]
    assert torch.equal(torch.cat(toks, dim=1), ref_gen.sequences[:, S:])


def test_base_model_without_lm_head(qwen25):
    """The pruner also works on the bare Qwen2_5_VLModel (no lm_head): hidden states are cut the same way."""
    inputs = make_inputs(qwen25, media=(("image", 1, 12, 16),))
    pruner = IVCPrune(layer=2, budget=0.5)
    with torch.no_grad():
        with pruner(qwen25.model):
            base_out = qwen25.model(**inputs).last_hidden_state[0]
        kept_base = pruner.last_report.kept
        with pruner(qwen25):
            full_out = qwen25(**inputs, output_hidden_states=True).hidden_states[-1][0]
    assert torch.equal(kept_base, pruner.last_report.kept)
    assert base_out.shape[0] == kept_base.numel() < inputs["input_ids"].shape[1]
    torch.testing.assert_close(qwen25.model.language_model.norm(full_out), base_out, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:the .* preset uses the union rule")
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "visionzip"])  # VisionZip merges too: its own test
def test_every_method_matches_the_masked_reference_of_its_stages(family, name):
    """Every registered method at its defaults: prefill and decoding equal the unpruned model with each cut's
    pruned tokens masked as keys from that cut's layer on (every layer while decoding). The cutting is the
    same for every method; eager attention is covered by the cases above."""
    model = make_model(family)
    inputs = make_inputs(model, media=(("image", 1, 12, 16),), text_after=7)
    method = make_method(name)
    with torch.no_grad(), method(model):
        logits = model(**inputs).logits[0]
        out = _generate(model, inputs, n=4)
    rep = method.last_report
    assert rep.pruned and [layer for layer, _ in rep.stages] == rep.config.get("stages", [rep.layer])
    assert torch.equal(rep.stages[-1][1], rep.kept)
    with torch.no_grad(), masked_stages(model, rep.stages):
        ref_logits = model(**inputs).logits[0]
        ref = _generate(model, inputs, n=4)
    torch.testing.assert_close(logits, ref_logits[rep.kept], atol=ATOL, rtol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4, msg=f"decode step {step}")
    assert {layer.get_seq_length() for layer in out.past_key_values.layers} == {rep.kept.numel() + 3}
