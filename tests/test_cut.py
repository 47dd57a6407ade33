"""The cutting functions, directly and property-based: random keep sets, paddings and past lengths against
plain loops; and on a model, random batches (paddings, budgets, seeds) against each row alone."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivcprune import RandomPrune, cut

from conftest import batch_inputs, make_inputs, make_model


@st.composite
def keep_sets(draw, max_rows=4, max_len=12):
    rows = draw(st.integers(1, max_rows))
    length = draw(st.integers(1, max_len))
    keeps = []
    for _ in range(rows):
        chosen = draw(st.sets(st.integers(0, length - 1), min_size=1))
        keeps.append(torch.tensor(sorted(chosen)))
    return length, keeps


@given(keep_sets())
def test_keep_index_right_aligns_each_row(case):
    _, keeps = case
    index, valid = cut.keep_index(keeps)
    assert index.shape == valid.shape == (len(keeps), max(len(k) for k in keeps))
    for b, k in enumerate(keeps):
        n = len(k)
        assert valid[b].tolist() == [False] * (index.shape[1] - n) + [True] * n
        assert index[b, index.shape[1] - n :].tolist() == k.tolist()
        assert set(index[b].tolist()) == set(k.tolist())  # padding slots repeat a kept token


@given(keep_sets(), st.integers(0, 3), st.booleans())
def test_gather_tokens_equals_a_loop(case, past, broadcast):
    length, keeps = case
    B = len(keeps)
    index, _ = cut.keep_index(keeps)
    x = torch.randn(1 if broadcast else B, length, 3)
    out = cut.gather_tokens(x, index, 1)
    for b in range(B):
        for j, i in enumerate(index[b].tolist()):
            assert torch.equal(out[b, j], x[0 if broadcast else b, i])
    # a cache layer (B, H, past + L, d) with the past kept whole
    kv = torch.randn(B, 2, past + length, 3)
    full = cut.extend_index(index, past)
    k, v = cut.cut_cache(kv, kv + 1, full)
    assert k.shape == (B, 2, past + index.shape[1], 3)
    for b in range(B):
        cols = list(range(past)) + [past + i for i in index[b].tolist()]
        assert torch.equal(k[b], kv[b][:, cols]) and torch.equal(v[b], kv[b][:, cols] + 1)


@given(st.integers(1, 4), st.integers(1, 8), st.integers(0, 4), st.data())
def test_attention_mask_equals_a_loop(B, q_len, past, data):
    T = past + q_len
    valid = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B)))
    sdpa = cut.attention_mask(valid, q_len, attn_implementation="sdpa", dtype=torch.float32, device="cpu")
    eager = cut.attention_mask(valid, q_len, attn_implementation="eager", dtype=torch.float16, device="cpu")
    flash = cut.attention_mask(valid, q_len, attn_implementation="flash_attention_2", dtype=torch.float32, device="cpu")
    if past == 0 and bool(valid.all()):
        assert sdpa is None  # plain causal attention: sdpa's is_causal path
        sdpa = cut.attention_mask(valid, q_len, attn_implementation="eager", dtype=torch.float32, device="cpu") == 0
    assert sdpa.shape == (B, 1, q_len, T) and sdpa.dtype == torch.bool
    for b in range(B):
        for i in range(q_len):
            row = past + i
            for j in range(T):
                expect = (j <= row and bool(valid[b, j])) or (j == row and not bool(valid[b, row]))
                assert bool(sdpa[b, 0, i, j]) == expect
                assert (eager[b, 0, i, j] == 0) == expect
            assert sdpa[b, 0, i].any()  # no fully masked query (sdpa would give NaN)
    if bool(valid.all()):
        assert flash is None
    else:
        assert torch.equal(flash, valid.long())


def test_contiguous_positions():
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    pos = cut.contiguous_positions(valid, torch.tensor([0, 5]))
    assert pos.tolist() == [[0, 0, 0, 1], [5, 6, 7, 8]]


_MODEL = make_model("qwen2_5_vl")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from([(4, 4), (8, 8), (4, 12), None]), st.integers(0, 9),
                          st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0])), min_size=1, max_size=4))
def test_random_batches_equal_rows_alone(rows):
    """Random paddings (text lengths), image sizes, rows without images and per-row budgets (via seeds and a
    shared budget): the batch's last-token logits equal each row's alone."""
    budget = rows[0][3]
    inputs = [make_inputs(_MODEL, media=() if grid is None else (("image", 1, *grid),), text_before=1 + pre,
                          text_after=2, seed=seed) for pre, grid, seed, _ in rows]
    method = RandomPrune(layer=2, budget=budget, seed=rows[0][2])
    with torch.no_grad(), method(_MODEL):
        batched = _MODEL(**batch_inputs(inputs)).logits[:, -1]
        reports = method.last_reports
        for b, x in enumerate(inputs):
            alone = _MODEL(**x).logits[:, -1]
            torch.testing.assert_close(batched[b], alone[0], atol=2e-4, rtol=1e-4)
            assert torch.equal(reports[b].kept, method.last_report.kept)
