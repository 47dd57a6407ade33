"""Selection functions against closed forms and brute force, and the whole selection of a real forward
pass against the loop-by-loop reference of METHOD.md."""

from __future__ import annotations

import math

import pytest
import torch

from ivcprune import IVCPrune
from ivcprune import selection as sel

from conftest import make_inputs, make_model
from reference import reference_selection


def test_ratio_count_rounds_like_python_round():
    assert sel.ratio_count(0.5, 77) == 38  # 38.5 -> 38 (half to even)
    assert sel.ratio_count(0.5, 75) == 38  # 37.5 -> 38
    assert sel.ratio_count(0.1, 1024) == 102
    assert sel.ratio_count(0.01, 49) == 0
    assert sel.ratio_count(1.0, 7) == 7


def test_stable_topk_breaks_ties_by_lower_index():
    s = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
    assert sel.stable_topk(s, 3).tolist() == [1, 3, 0]
    assert sel.stable_topk(s, 4).tolist() == [1, 3, 0, 2]
    assert sel.stable_topk(s, 0).tolist() == []
    assert sel.stable_topk(s, 99).tolist() == [1, 3, 0, 2, 5, 4]


def test_ivc_scores_1d_closed_form():
    d = 16
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    pos = torch.arange(0, 40)
    c, s = sel.ivc_scores(pos, inv.float(), attention_scaling=2.0)
    assert c[0].item() == pytest.approx(2.0) and s[0].item() == pytest.approx(0.0)
    for p in (3, 17, 39):
        exp_c = 2.0 * sum(math.cos(p * float(t)) for t in inv.float()) / len(inv)
        exp_s = 2.0 * sum(math.sin(p * float(t)) for t in inv.float()) / len(inv)
        assert c[p].item() == pytest.approx(exp_c, abs=1e-12)
        assert s[p].item() == pytest.approx(exp_s, abs=1e-12)


def test_ivc_scores_mrope_authors_statistic_and_exact_symmetry():
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    # (t, h, w) and (t, w, h) must tie exactly; the lower index must win the tie
    pos = torch.tensor([[5, 5, 5], [7, 9, 5], [9, 7, 5]]).T  # tokens: (5,7,9), (5,9,7), (5,5,5)
    pos = torch.tensor([[5, 5, 5], [7, 9, 5], [9, 7, 5]])
    c, s = sel.ivc_scores(pos, inv)
    assert c[0].item() == c[1].item() and s[0].item() == s[1].item()
    expected = sum(sum(math.cos(p * float(t)) for t in inv) / len(inv) for p in (5, 7, 9)) / 3
    assert c[0].item() == pytest.approx(expected, abs=1e-12)
    order = sel.stable_topk(c, 3).tolist()
    assert order.index(0) < order.index(1)


def test_ivc_scores_applied_statistic_uses_one_axis_per_band():
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))  # 8 frequencies
    section = (2, 3, 3)
    pos = torch.tensor([[4, 4], [10, 2], [3, 8]])  # two tokens, axes t, h, w
    c, s = sel.ivc_scores(pos, inv, statistic="applied", mrope_section=section)
    axis = [0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(2):
        ec = sum(math.cos(int(pos[axis[j], i]) * float(inv[j])) for j in range(8)) / 8
        es = sum(math.sin(int(pos[axis[j], i]) * float(inv[j])) for j in range(8)) / 8
        assert c[i].item() == pytest.approx(ec, abs=1e-12)
        assert s[i].item() == pytest.approx(es, abs=1e-12)
    with pytest.raises(ValueError):
        sel.ivc_scores(pos, inv, statistic="applied", mrope_section=(2, 2, 2))
    with pytest.raises(ValueError):
        sel.ivc_scores(pos, inv, statistic="bogus")


def _brute_rows(q, k):
    H, Q, d = q.shape
    L = k.shape[1]
    rows = torch.zeros(Q, L, dtype=torch.float64)
    for h in range(H):
        for a in range(Q):
            logits = torch.tensor([float(q[h, a] @ k[h, i]) / math.sqrt(d) for i in range(L)], dtype=torch.float64)
            rows[a] += torch.softmax(logits, 0) / H
    return rows


def test_foreground_scores_brute_force():
    g = torch.Generator().manual_seed(0)
    vis = torch.randn(2, 30, 8, generator=g, dtype=torch.float64)
    qry = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    scores, seeds = sel.foreground_scores(vis, qry, num_seeds=3)
    text = _brute_rows(qry, vis)
    stage1 = text.mean(0)
    exp_seeds = sorted(range(30), key=lambda i: (-stage1[i].item(), i))[:3]
    assert seeds.tolist() == exp_seeds
    rows = torch.cat([text, _brute_rows(vis[:, exp_seeds], vis)])
    torch.testing.assert_close(scores.double(), rows.mean(0), atol=1e-6, rtol=1e-5)
    # softmax over the visual tokens only: every row sums to one
    assert scores.sum().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        sel.foreground_scores(vis, qry[:, :0], 1)


def _manual_sequence_rows(q, seq, start, length):
    """Softmax over all S tokens of the sequence, per head, averaged over heads, sliced to the span."""
    H, Q, d = q.shape
    S = seq.shape[1]
    rows = torch.zeros(Q, length, dtype=torch.float64)
    for h in range(H):
        for a in range(Q):
            logits = [float(q[h, a] @ seq[h, t]) / math.sqrt(d) for t in range(S)]
            m = max(logits)
            ex = [math.exp(x - m) for x in logits]
            z = math.fsum(ex)
            for k in range(length):
                rows[a, k] += ex[start + k] / z / H
    return rows


def test_similarity_rows_sequence_domain_is_sliced_full_softmax():
    g = torch.Generator().manual_seed(1)
    seq = torch.randn(2, 23, 8, generator=g, dtype=torch.float64)
    q = seq[:, 18:21]
    rows = sel.similarity_rows(q, seq, span=(5, 9))
    assert rows.shape == (3, 9)
    torch.testing.assert_close(rows.double(), _manual_sequence_rows(q, seq, 5, 9), atol=1e-6, rtol=1e-5)
    # slicing keeps the sequence-wide normalisation: a row sums to less than one over the span
    assert (rows.sum(1) < 1 - 1e-3).all()
    # without span, all columns; the span columns of that are the sliced rows
    full = sel.similarity_rows(q, seq)
    assert full.shape == (3, 23)
    torch.testing.assert_close(full[:, 5:14], rows)
    with pytest.raises(ValueError):
        sel.similarity_rows(q, seq, span=(20, 9))


def test_foreground_scores_sequence_domain_brute_force():
    g = torch.Generator().manual_seed(2)
    S, start, L = 40, 6, 24
    seq = torch.randn(2, S, 8, generator=g, dtype=torch.float64)
    vis, qry = seq[:, start : start + L], seq[:, start + L + 2 :]  # queries from two after the span
    scores, seeds = sel.foreground_scores(vis, qry, 3, sequence_values=seq, span_start=start)
    text = _manual_sequence_rows(qry, seq, start, L)
    stage1 = text.mean(0)
    exp_seeds = sorted(range(L), key=lambda i: (-stage1[i].item(), i))[:3]
    assert seeds.tolist() == exp_seeds
    # seed rows: the seeds as queries, their softmax over the whole sequence too
    rows = torch.cat([text, _manual_sequence_rows(vis[:, exp_seeds], seq, start, L)])
    torch.testing.assert_close(scores.double(), rows.mean(0), atol=1e-6, rtol=1e-5)
    # it is not the span softmax
    span_scores, _ = sel.foreground_scores(vis, qry, 3)
    assert not torch.allclose(span_scores, scores, atol=1e-4)
    with pytest.raises(ValueError):
        sel.foreground_scores(vis, qry, 3, sequence_values=seq)  # span_start missing
    with pytest.raises(ValueError):
        sel.foreground_scores(vis, qry, 3, span_start=start)  # span_start without the sequence
    with pytest.raises(ValueError):
        sel.foreground_scores(vis, qry, 3, sequence_values=seq, span_start=S - L + 1)  # span past the end
    with pytest.raises(ValueError):
        sel.foreground_scores(vis, qry, 3, sequence_values=seq[:1], span_start=start)  # head count


@pytest.mark.parametrize("domain", ["span", "sequence"])
def test_zero_seeds_gives_text_rows_only(domain):
    g = torch.Generator().manual_seed(3)
    S, start, L = 30, 4, 20
    seq = torch.randn(2, S, 8, generator=g, dtype=torch.float64)
    vis, qry = seq[:, start : start + L], seq[:, start + L + 2 :]
    kw = {"sequence_values": seq, "span_start": start} if domain == "sequence" else {}
    scores, seeds = sel.foreground_scores(vis, qry, 0, **kw)
    assert seeds.numel() == 0 and seeds.dtype == torch.long
    text = _manual_sequence_rows(qry, seq, start, L) if domain == "sequence" else _brute_rows(qry, vis)
    torch.testing.assert_close(scores.double(), text.mean(0), atol=1e-6, rtol=1e-5)
    # = the stage-1 scores; a negative count is no seed either, and one seed changes the scores
    assert torch.equal(sel.foreground_scores(vis, qry, -2, **kw)[0], scores)
    one, s1 = sel.foreground_scores(vis, qry, 1, **kw)
    assert s1.numel() == 1 and not torch.equal(one, scores)
    # round(0.01 L) seeds, no minimum: 0 seeds below L = 50
    assert sel.ratio_count(0.01, 49) == 0 and sel.ratio_count(0.01, 51) == 1


def test_numerics_choices_are_checked():
    assert sel.NUMERICS == ("ours", "authors")
    vis = torch.randn(1, 4, 8)
    pos = torch.arange(4)
    with pytest.raises(ValueError):
        sel.ivc_scores(pos, torch.ones(4), numerics="bf16")
    with pytest.raises(ValueError):
        sel.foreground_scores(vis, vis, 1, numerics="bf16")
    with pytest.raises(ValueError):
        sel.foreground_scores(vis, vis, 1, numerics="authors", authors_mean="bogus")
    with pytest.raises(ValueError):  # the release computes in one dtype
        sel.foreground_scores(vis.bfloat16(), vis, 1, numerics="authors")


def test_authors_numerics_hand_computed_small_case():
    # 1-D RoPE, head_dim 4 (two frequencies 1 and 0.01), bf16: the statistic is the bf16 mean of the
    # bf16-rounded cos over the four head dimensions (each frequency twice), accumulated in float32.
    inv = torch.tensor([1.0, 0.01])
    pos = torch.tensor([0, 1, 2, 3])
    c, s = sel.ivc_scores(pos, inv, numerics="authors")

    def f32(x):
        return torch.tensor(x, dtype=torch.float32)

    def bf16(x):
        return f32(x).bfloat16().double().item()

    for p in range(4):
        angles = [f32(p * f32(t).item()).item() for t in (1.0, 0.01)]  # float32 angles
        cos_parts = [bf16(math.cos(a)) for a in angles]  # each cos rounded to bf16
        sin_parts = [bf16(math.sin(a)) for a in angles]
        assert c[p].item() == bf16(sum(cos_parts) * 2 / 4)  # mean over 4 dims (2 freqs twice)
        assert s[p].item() == bf16(sum(sin_parts) * 2 / 4)
    assert c.dtype == torch.float64
    # the same values as bf16 numbers: a few distinct values only
    assert torch.equal(c, c.bfloat16().double())
    # the attention scaling multiplies the float32 cos before the cast
    c2, _ = sel.ivc_scores(pos, inv, numerics="authors", attention_scaling=2.0)
    assert torch.equal(c2, 2 * c)
    # float32 model: the same arithmetic in float32
    c32, _ = sel.ivc_scores(pos, inv, numerics="authors", model_dtype=torch.float32)
    torch.testing.assert_close(c32, sel.ivc_scores(pos, inv)[0], atol=1e-6, rtol=0)


def test_fill_to_budget_and_union_rule():
    fg = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.5, 0.3])
    kept, fill = sel.fill_to_budget(8, [torch.tensor([1]), torch.tensor([4, 1])], fg, target=4)
    assert fill.tolist() == [0, 2] and kept.tolist() == [0, 1, 2, 4]
    # a priority set larger than the budget is kept whole, nothing is filled
    kept, fill = sel.fill_to_budget(8, [torch.tensor([1, 4, 7])], fg, target=2)
    assert kept.tolist() == [1, 4, 7] and fill.numel() == 0
    kept, fg_new = sel.union_rule(8, [torch.tensor([0, 4])], fg, fg_count=3)
    assert kept.tolist() == [0, 2, 3, 4] and fg_new.tolist() == [2, 3]


def test_interleave_rankings():
    a = torch.tensor([3, 1, 2, 0])
    b = torch.tensor([3, 2, 0, 1])
    ca, cb = sel.interleave_rankings([a, b], target=3)
    assert ca.tolist() == [3, 1] and cb.tolist() == [2]
    ca, cb = sel.interleave_rankings([a, b], target=10)
    assert sorted(ca.tolist() + cb.tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "family,media,rule,budget,domain,min_one_seed",
    [
        ("qwen2_5_vl", (("image", 1, 16, 20),), "fill", 0.5, "span", True),
        ("qwen2_5_vl", (("image", 1, 12, 12), ("image", 1, 8, 20)), "fill", 0.3, "span", True),
        ("qwen2_vl", (("image", 1, 16, 20),), "union", None, "sequence", False),
        # 24 and 48 tokens: round(0.01 L) = 0 seeds, stage 2 is the text rows only
        ("qwen2_vl", (("image", 1, 8, 12), ("image", 1, 12, 16)), "union", None, "sequence", False),
        ("qwen2_5_vl", (("video", 2, 8, 12),), "fill", 0.5, "span", True),
    ],
)
def test_selection_matches_loop_reference(family, media, rule, budget, domain, min_one_seed):
    model = make_model(family, layers=4)
    inputs = make_inputs(model, media=media, text_after=12)
    K = 3
    pruner = IVCPrune(layer=K, budget=budget)  # Qwen2-VL without a budget: its union preset
    with torch.no_grad(), pruner(model):
        model(**inputs)
    rep = pruner.last_report
    assert rep.config["rule"] == rule
    # the family presets of METHOD.md: Qwen2-VL's softmax over the whole sequence, no seed minimum
    assert rep.config.get("softmax_domain", domain) == domain
    assert rep.config.get("min_one_seed", min_one_seed) == min_one_seed
    ref = reference_selection(model, inputs, K, budget=budget or 0.5, rule=rule, softmax_domain=domain,
                              min_one_seed=min_one_seed)
    assert len(ref) == len(rep.spans)
    for r, s in zip(ref, rep.spans):
        assert (s.start, s.length) == (r["start"], r["length"])
        assert set(s.ivc_cos.tolist()) == r["ivc_cos"]
        assert set(s.ivc_sin.tolist()) == r["ivc_sin"]
        assert set(s.seeds.tolist()) == r["seed"]
        kept_here = {p for p in rep.kept.tolist() if s.start <= p < s.start + s.length}
        assert kept_here == r["kept"]
        assert s.kept == len(r["kept"])


def test_applied_statistic_changes_ivc_choice_but_not_shapes(qwen25):
    inputs = make_inputs(qwen25, media=(("image", 1, 16, 20),))
    reps = {}
    for stat in ("authors", "applied"):
        p = IVCPrune(layer=2, ivc_statistic=stat)
        with torch.no_grad(), p(qwen25):
            qwen25(**inputs)
        reps[stat] = p.last_report.spans[0]
    a, b = reps["authors"], reps["applied"]
    assert a.kept == b.kept
    assert a.ivc_cos.numel() == b.ivc_cos.numel()
    assert set(a.ivc_cos.tolist()) != set(b.ivc_cos.tolist()) or set(a.ivc_sin.tolist()) != set(b.ivc_sin.tolist())


@pytest.mark.parametrize("ablation", ["no_ivc", "no_foreground", "ivc_only"])
def test_ablations(qwen25, ablation):
    inputs = make_inputs(qwen25, media=(("image", 1, 16, 20),))
    p = IVCPrune(layer=2, budget=0.5, ablation=ablation)
    with torch.no_grad(), p(qwen25):
        qwen25(**inputs)
    span = p.last_report.spans[0]
    L = span.length  # 80
    if ablation == "no_ivc":
        assert span.ivc_cos.numel() == 0 and span.seeds.numel() == 1 and span.kept == 40
    elif ablation == "no_foreground":
        assert span.seeds.numel() == 0 and span.foreground.numel() == 0
        assert span.kept == len(set(span.ivc_cos.tolist()) | set(span.ivc_sin.tolist())) <= 2 * round(0.1 * L)
    else:
        assert span.seeds.numel() == 0 and span.kept == 40
        assert abs(span.ivc_cos.numel() - span.ivc_sin.numel()) <= 1
