"""Batches: every row's output is what that row gets alone, for every registered method x family x attention.

Rows differ in prompt length, image sizes, image counts (one row has none) and media kind, left-padded as
processors pad them. The single-row runs are themselves checked against the masked reference in
test_equivalence.py, so batched == alone closes the chain.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ivcprune import IVCPrune, RandomPrune, UnsupportedModelError, get_adapter
from ivcprune.methods import REGISTRY, make_method

from conftest import FAMILIES, batch_inputs, make_inputs, make_model, mixed_rows
from reference import masked_reference

ATOL = 2e-4
N_NEW = 4


def _generate(model, inputs, n=N_NEW, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, output_logits=True,
                          return_dict_in_generate=True, **kw)


def _method(name: str, model=None):
    """``name`` at K=2 (before the LLM for methods that act there) with a budget that prunes under every rule
    (the union rule ignores it and sizes itself); a family the method refuses is skipped, with its message."""
    pre_llm = REGISTRY[name].cls.min_layer == 0
    method = make_method(name, budget=0.4, **({} if pre_llm else {"layer": 2}))
    if model is not None:
        try:
            method.resolve(get_adapter(model))
        except UnsupportedModelError as e:
            pytest.skip(f"{name} refuses {model.config.model_type}: {e}")
    return method


@pytest.fixture(scope="module")
def models():
    return {(f, a): make_model(f, attn=a) for f in FAMILIES for a in ("sdpa", "eager")}


# Every method on sdpa; eager (its own mask path in the cut) with the IVC preset, random's fixed share and
# PDrop's several cuts: the cutting itself is the same for every method.
MATRIX = [(name, family, "sdpa") for name in REGISTRY for family in FAMILIES] + \
    [(name, family, "eager") for name in ("ivc", "random", "pdrop") for family in FAMILIES]


@pytest.mark.filterwarnings("ignore:the .* preset uses the union rule")  # budget given to every method
@pytest.mark.parametrize("name,family,attn", MATRIX)
def test_each_row_of_a_batch_equals_the_row_alone(models, family, attn, name):
    model = models[(family, attn)]
    rows = mixed_rows(model)
    batch = batch_inputs(rows)
    method = _method(name, model)
    with torch.no_grad(), method(model):
        out = _generate(model, batch)
        reports = method.last_reports
        alone = []
        for r in rows:
            alone.append((_generate(model, r), method.last_report))
    assert len(reports) == len(rows)
    for i, (single, rep) in enumerate(alone):
        assert torch.equal(out.sequences[i, -N_NEW:], single.sequences[0, -N_NEW:]), f"row {i}"
        for step, (a, b) in enumerate(zip(out.logits, single.logits)):
            torch.testing.assert_close(a[i], b[0], atol=ATOL, rtol=1e-4, msg=f"row {i} step {step}")
        assert torch.equal(reports[i].kept, rep.kept)
        assert reports[i].seq_len == rep.seq_len == rows[i]["input_ids"].shape[1]
        assert [s.to_dict() for s in reports[i].spans] == [s.to_dict() for s in rep.spans]
    assert not reports[1].pruned and reports[1].reason  # the row without an image
    kept = [r.kept.numel() for r in reports]
    assert len(set(kept)) > 1 and all(r.pruned for i, r in enumerate(reports) if i != 1)
    # every layer's cache holds the longest row's kept tokens (shorter rows padded), plus the fed tokens
    assert [layer.get_seq_length() for layer in out.past_key_values.layers] == [max(kept) + N_NEW - 1] * 4


@pytest.mark.parametrize("knobs", [dict(numerics="authors"), dict(softmax_domain="sequence", min_one_seed=False),
                                   dict(softmax_domain="span", min_one_seed=True), dict(ivc_statistic="applied"),
                                   dict(budget_tokens=7, rule="fill")])
def test_knob_variants_batch_like_rows_alone(models, knobs):
    model = models[("qwen2_vl", "sdpa")]
    rows = mixed_rows(model)
    method = IVCPrune(layer=2, **knobs)
    with torch.no_grad(), method(model):
        batched = model(**batch_inputs(rows)).logits[:, -1]
        reports = method.last_reports
        for i, r in enumerate(rows):
            torch.testing.assert_close(batched[i], model(**r).logits[0, -1], atol=ATOL, rtol=1e-4)
            assert torch.equal(reports[i].kept, method.last_report.kept)
    assert all(r.pruned for i, r in enumerate(reports) if i != 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_decode_positions_equal_unpruned(models, family):
    """Generated tokens get, per row, the positions they get in the unpruned batch."""
    model = models[(family, "sdpa")]
    batch = batch_inputs(mixed_rows(model))
    seen: list[torch.Tensor] = []
    hook = model.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[1] if len(a) > 1 else kw["position_ids"]).clone()), with_kwargs=True)
    # the rotary runs once per layer type and forward (Gemma 3 has two)
    k = len(set(getattr(model.config.get_text_config(), "layer_types", None) or [None]))
    try:
        with torch.no_grad():
            _generate(model, batch)
            base, seen[:] = seen[::k][1:], []
            with IVCPrune(layer=2)(model):
                _generate(model, batch)
    finally:
        hook.remove()
    seen = seen[::k]
    assert len(seen[1:]) == len(base) == N_NEW - 1
    for a, b in zip(base, seen[1:]):
        assert torch.equal(a, b)


def test_budget_one_on_a_batch_changes_nothing(models):
    model = models[("qwen2_5_vl", "sdpa")]
    batch = batch_inputs(mixed_rows(model))
    with torch.no_grad():
        ref = _generate(model, batch)
        with IVCPrune(layer=2, budget=1.0)(model) as p:
            out = _generate(model, batch)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)
    assert not any(r.pruned for r in p.last_reports)


def test_beam_search_and_return_sequences_match_reference(models):
    model = models[("qwen2_5_vl", "sdpa")]
    inputs = make_inputs(model, media=(("image", 1, 12, 16),))
    p = IVCPrune(layer=2)
    kw = dict(num_beams=3, num_return_sequences=2, output_scores=True)
    with torch.no_grad():
        with p(model):
            out = _generate(model, inputs, **kw)
        assert len(p.last_reports) == 3  # one per beam (the expanded batch)
        assert all(torch.equal(r.kept, p.last_reports[0].kept) for r in p.last_reports)
        with masked_reference(model, p.last_reports[0].kept, 2):
            ref = _generate(model, inputs, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=ATOL, rtol=1e-4)


def test_sampling_several_sequences_per_row_of_a_batch(models):
    """num_return_sequences > 1 with sampling on a padded batch: each expanded row equals its prompt alone
    under the same random stream (checked through greedy with top_k=1 and the seeded sampler)."""
    model = models[("qwen2_vl", "sdpa")]
    rows = mixed_rows(model)[:3]
    batch = batch_inputs(rows)
    p = RandomPrune(layer=2, budget=0.5, seed=1)
    with torch.no_grad(), p(model):
        torch.manual_seed(0)
        out = _generate(model, batch, do_sample=True, num_return_sequences=2, top_k=1)
        reports = p.last_reports
        assert len(reports) == 6
        for i, r in enumerate(rows):
            single = _generate(model, r)
            for j in (2 * i, 2 * i + 1):
                assert torch.equal(out.sequences[j, -N_NEW:], single.sequences[0, -N_NEW:])
                assert torch.equal(reports[j].kept, p.last_report.kept)
        torch.manual_seed(5)
        a = _generate(model, batch, do_sample=True, num_return_sequences=2)
        torch.manual_seed(5)
        b = _generate(model, batch, do_sample=True, num_return_sequences=2)
    assert torch.equal(a.sequences, b.sequences)


def test_reports_never_mix_across_threads(models):
    """Two pruners on two models, and one pruner shared by two threads on one model: each thread reads the
    reports of its own prefills."""
    m1, m2 = models[("qwen2_5_vl", "sdpa")], models[("qwen2_vl", "sdpa")]
    prompts = {m: [make_inputs(m, media=(("image", 1, 4 * k, 8),), seed=k) for k in (1, 2, 3, 4)] for m in (m1, m2)}
    expected = {}
    own = {m1: IVCPrune(layer=2), m2: RandomPrune(layer=2, budget=0.5)}
    with torch.no_grad():
        for m in (m1, m2):
            for k, x in enumerate(prompts[m]):
                with own[m](m):
                    m(**x)
                expected[(m, k)] = own[m].last_report.kept
    errors: list[str] = []
    barrier = threading.Barrier(3)

    def work(m, order):
        barrier.wait()
        with torch.no_grad():
            for _ in range(3):
                for k in order:
                    m(**prompts[m][k])
                    if not torch.equal(own[m].last_report.kept, expected[(m, k)]):
                        errors.append(f"report of prompt {k} mixed up")

    # threads 1 and 2: a pruner each on a model each; thread 3 shares model 1 and its pruner with thread 1,
    # running the prompts in the other order
    own[m1].apply(m1)
    own[m2].apply(m2)
    try:
        threads = [threading.Thread(target=work, args=(m1, [0, 1, 2, 3])),
                   threading.Thread(target=work, args=(m2, [0, 1, 2, 3])),
                   threading.Thread(target=work, args=(m1, [3, 2, 1, 0]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        own[m1].remove()
        own[m2].remove()
    assert not errors, errors[:3]


def test_last_report_on_a_batch_points_to_last_reports(models):
    model = models[("qwen2_5_vl", "sdpa")]
    p = IVCPrune(layer=2)
    with torch.no_grad(), p(model):
        model(**batch_inputs(mixed_rows(model)[:2]))
    with pytest.raises(ValueError, match="last_reports"):
        _ = p.last_report
    assert len(p.last_reports) == 2
