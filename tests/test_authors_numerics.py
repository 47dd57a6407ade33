"""``numerics="authors"`` against an independent re-statement of the released code's arithmetic.

The helpers below re-state, in plain torch and in the order the release runs them, what the authors'
modeling code computes (FireRedTeam/IVC-Prune, commit 03afd9c): the rotary module's cos/sin (float32
angles from a k=1 matmul, both halves of head_dim, attention scaling in float32, cast to the model
dtype), the IVC statistic as one mean of those over axes and head dimensions, and the value similarity
(model-dtype matmul, division by sqrt(head_dim), float32 softmax cast back, model-dtype means, heads
repeated to the attention-head count). Top-k takes ties at the lowest index, as the release's CUDA
top-k does. Nothing here calls ``ivcprune.selection``; the tests compare its ``numerics="authors"``
results with these at real model sizes.
"""

from __future__ import annotations

import math

import pytest
import torch

from ivcprune import selection as sel

# ---------------------------------------------------------------- re-statement of the release


def _release_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    # the default rope init: float32 inverse frequencies
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _release_mrope_cos_sin(position_ids, inv_freq, scaling=1.0, dtype=torch.bfloat16):
    """Qwen2(.5)-VL rotary module: position_ids (3, B, S) -> cos, sin (3, B, S, head_dim) in ``dtype``."""
    inv_exp = inv_freq[None, None, :, None].float().expand(3, position_ids.shape[1], -1, 1)
    pos_exp = position_ids[:, :, None, :].float()
    freqs = (inv_exp.float() @ pos_exp.float()).transpose(2, 3)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * scaling
    sin = emb.sin() * scaling
    return cos.to(dtype), sin.to(dtype)


def _release_rope_cos_sin(position_ids, inv_freq, scaling=1.0, dtype=torch.float16):
    """Llama rotary module (LLaVA): position_ids (B, S) -> cos, sin (B, S, head_dim) in ``dtype``."""
    inv_exp = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    pos_exp = position_ids[:, None, :].float()
    freqs = (inv_exp.float() @ pos_exp.float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _topk_low_index(values: torch.Tensor, k: int) -> set[int]:
    v = values.tolist()
    return set(sorted(range(len(v)), key=lambda i: (-v[i], i))[:k])


def _ranking_low_index(values: torch.Tensor) -> list[int]:
    v = values.tolist()
    return sorted(range(len(v)), key=lambda i: (-v[i], i))


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def _qwen25_similarity(values, query_idx, head_dim, img_start, img_len):
    """Qwen2.5-VL release: softmax over the image tokens; mean over batch and heads -> (Q, L) rows."""
    vq = values[:, :, query_idx, :]
    vk = values[:, :, img_start : img_start + img_len, :].transpose(2, 3)
    sim = torch.einsum("bhqd,bhdk->bhqk", vq, vk) / math.sqrt(head_dim)
    w = torch.nn.functional.softmax(sim, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.mean(w, dim=(0, 1))


def _qwen2_similarity(values, query_idx, head_dim):
    """Qwen2-VL release: softmax over every token of the sequence; one mean over batch, heads, rows -> (S,)."""
    vq = values[:, :, query_idx, :]
    sim = torch.matmul(vq, values.transpose(2, 3)) / math.sqrt(head_dim)
    w = torch.nn.functional.softmax(sim, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.mean(w, dim=(0, 1, 2))


def _llava_similarity_rows(values, query_idx, head_dim):
    """LLaVA release: softmax over every token; head mean per row (rows = the queries here) -> (Q, S)."""
    sim = torch.matmul(values[:, :, query_idx, :], values.transpose(2, 3)) / math.sqrt(head_dim)
    w = torch.nn.functional.softmax(sim, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.mean(w, dim=1)[0]


def _qwen_image_positions(start: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """M-RoPE (t, h, w) ids of an image's merged grid placed at ``start`` (Qwen's get_rope_index)."""
    r = torch.arange(grid_h).repeat_interleave(grid_w)
    c = torch.arange(grid_w).repeat(grid_h)
    return torch.stack([torch.full_like(r, start), start + r, start + c])


def _qwen_prompt_positions(start: int, grid_h: int, grid_w: int, text_after: int) -> torch.Tensor:
    img = _qwen_image_positions(start, grid_h, grid_w)
    before = torch.arange(start).expand(3, -1)
    nxt = start + max(grid_h, grid_w)
    after = torch.arange(nxt, nxt + text_after).expand(3, -1)
    return torch.cat([before, img, after], dim=1)[:, None, :]  # (3, 1, S)


# Qwen2.5-VL-7B: head_dim 128, rope_theta 1e6, mrope_section (16, 24, 24). The chat template puts 15
# tokens ("<|im_start|>system ... <|vision_start|>") before the image; a 448x560 picture gives a
# 32x40 merged grid (1280 tokens).
HEAD_DIM, THETA, SECTION = 128, 1e6, (16, 24, 24)
GRID = (32, 40)


def _ivc_sets(cos_s, sin_s, k, topk):
    return topk(cos_s, k), topk(sin_s, k)


# ------------------------------------------------------------------------------- IVC statistic


@pytest.mark.parametrize("start", [15, 40, 200])
def test_ivc_authors_equals_release_at_qwen25_7b_size(start):
    L = GRID[0] * GRID[1]
    inv = _release_inv_freq(HEAD_DIM, THETA)
    pos = _qwen_prompt_positions(start, *GRID, text_after=30)
    cos, sin = _release_mrope_cos_sin(pos, inv)
    rel_cos = cos[:, 0, start : start + L].mean(dim=(0, 2))
    rel_sin = sin[:, 0, start : start + L].mean(dim=(0, 2))

    ours_cos, ours_sin = sel.ivc_scores(pos[:, 0, start : start + L], inv, numerics="authors")
    assert torch.equal(ours_cos, rel_cos.double()) and torch.equal(ours_sin, rel_sin.double())
    k = round(0.1 * L)
    rel = _ivc_sets(rel_cos, rel_sin, k, _topk_low_index)
    ours = _ivc_sets(ours_cos, ours_sin, k, lambda s, n: set(sel.stable_topk(s, n).tolist()))
    assert ours == rel
    # the bf16 statistic takes few distinct values: the tie rule decides part of the sets
    assert len(set(rel_cos.tolist())) < L // 4 and len(set(rel_sin.tolist())) < L // 4


def test_ivc_authors_equals_release_with_attention_scaling_and_applied_bands():
    start, grid = 22, (12, 18)
    L = grid[0] * grid[1]
    inv = _release_inv_freq(HEAD_DIM, THETA)
    pos = _qwen_prompt_positions(start, *grid, text_after=5)
    cos, sin = _release_mrope_cos_sin(pos, inv, scaling=0.8125)
    c, s = sel.ivc_scores(pos[:, 0, start : start + L], inv, attention_scaling=0.8125, numerics="authors")
    assert torch.equal(c, cos[:, 0, start : start + L].mean(dim=(0, 2)).double())
    assert torch.equal(s, sin[:, 0, start : start + L].mean(dim=(0, 2)).double())
    # "applied" in the model's arithmetic: the merged cos/sin that apply_multimodal_rotary_pos_emb
    # builds (band i of both halves from axis i % 3), averaged over head_dim
    split = list(SECTION) * 2
    merged_cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(split, dim=-1))], dim=-1)[0]
    merged_sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(split, dim=-1))], dim=-1)[0]
    c, s = sel.ivc_scores(
        pos[:, 0, start : start + L], inv, attention_scaling=0.8125, numerics="authors",
        statistic="applied", mrope_section=SECTION,
    )
    assert torch.equal(c, merged_cos[start : start + L].mean(dim=-1).double())
    assert torch.equal(s, merged_sin[start : start + L].mean(dim=-1).double())


def test_ivc_authors_equals_release_llava_1d_fp16():
    # LLaVA-1.5-7B: 1-D RoPE, head_dim 128, theta 1e4, fp16; 576 image tokens after ~35 prompt tokens
    start, L = 35, 576
    inv = _release_inv_freq(HEAD_DIM, 1e4)
    position_ids = torch.arange(start + L + 40)[None]
    cos, sin = _release_rope_cos_sin(position_ids, inv, dtype=torch.float16)
    rel_cos = cos[0, start : start + L].mean(dim=1)
    rel_sin = sin[0, start : start + L].mean(dim=1)
    c, s = sel.ivc_scores(torch.arange(start, start + L), inv, numerics="authors", model_dtype=torch.float16)
    assert torch.equal(c, rel_cos.double()) and torch.equal(s, rel_sin.double())
    k = round(0.05 * L)
    assert set(sel.stable_topk(c, k).tolist()) == _topk_low_index(rel_cos, k)
    assert set(sel.stable_topk(s, k).tolist()) == _topk_low_index(rel_sin, k)


def test_ivc_ours_and_authors_differ_by_a_few_percent_at_7b_size():
    start = 15
    L = GRID[0] * GRID[1]
    inv = _release_inv_freq(HEAD_DIM, THETA)
    pos = _qwen_image_positions(start, *GRID)
    k = round(0.1 * L)
    sets = {}
    for numerics in sel.NUMERICS:
        c, s = sel.ivc_scores(pos, inv, numerics=numerics)
        sets[numerics] = set(sel.stable_topk(c, k).tolist()) | set(sel.stable_topk(s, k).tolist())
    ours, authors = sets["ours"], sets["authors"]
    assert len(ours) == len(authors) == 2 * k  # cos and sin sets are disjoint here
    changed = len(ours ^ authors) / L  # tokens in one IVC set and not the other
    assert 0.01 <= changed <= 0.05, changed  # METHOD.md: about 2-4% of the span's tokens


# ------------------------------------------------------------------------------ value similarity


def _values(S, heads=4, d=HEAD_DIM, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(1, heads, S, d, generator=g)).to(dtype)


def _assert_same_model_dtype_scores(ours: torch.Tensor, release: torch.Tensor):
    # the release's reductions run in CUDA's float32 order, ours in an exact sum rounded to float32: a
    # value may land on the other side of a bf16 rounding boundary, one ulp off, very rarely (the wrong
    # order of means, per-row instead of joint or back, changes 2-10% of the values)
    rel = release.float()
    assert (ours != rel).sum().item() <= max(2, rel.numel() // 1000)
    torch.testing.assert_close(ours, rel, rtol=2**-7, atol=0)


def test_similarity_authors_equals_release_qwen25_span_domain():
    start, L, text_after, kv_heads, groups = 15, GRID[0] * GRID[1], 40, 4, 7
    S = start + L + text_after
    values = _values(S, kv_heads)
    query_idx = torch.arange(start + L + 2, S)
    n_seed = max(1, round(L * 0.01))
    # release: heads repeated to the 28 attention heads, two-level means in bf16
    rep = _repeat_kv(values, groups)
    text = _qwen25_similarity(rep, query_idx, HEAD_DIM, start, L)
    seeds = sorted(_topk_low_index(torch.mean(text, dim=0), n_seed))
    ranked_seeds = _ranking_low_index(torch.mean(text, dim=0))[:n_seed]
    seed_rows = _qwen25_similarity(rep, torch.tensor(ranked_seeds) + start, HEAD_DIM, start, L)
    final = torch.mean(torch.cat((text, seed_rows), dim=0), dim=0)

    v = values[0]
    scores, ours_seeds = sel.foreground_scores(v[:, start : start + L], v[:, query_idx], n_seed, numerics="authors")
    assert sorted(ours_seeds.tolist()) == seeds
    _assert_same_model_dtype_scores(scores, final)
    rows = sel.similarity_rows(v[:, query_idx], v[:, start : start + L], numerics="authors")
    assert rows.dtype == torch.bfloat16
    _assert_same_model_dtype_scores(rows.float(), text)
    # the fill rule's ranking of the stage-2 scores (lowest index first among ties)
    assert sel.stable_topk(scores, L // 2).tolist() == _ranking_low_index(final)[: L // 2]


@pytest.mark.parametrize("grid", [GRID, (6, 8)])  # 1280 tokens: 13 seeds; 48 tokens: round(0.48) = 0 seeds
def test_similarity_authors_equals_release_qwen2_vl_sequence_domain(grid):
    start, text_after, kv_heads, groups = 15, 40, 4, 7
    L = grid[0] * grid[1]
    S = start + L + text_after
    values = _values(S, kv_heads, seed=1)
    query_idx = torch.arange(start + L + 2, S)
    n_seed = round(L * 0.01)  # no minimum in this release
    rep = _repeat_kv(values, groups)
    stage1 = _qwen2_similarity(rep, query_idx, HEAD_DIM)[start : start + L]
    seeds = _ranking_low_index(stage1)[:n_seed]
    new_dim = torch.cat((torch.tensor(seeds, dtype=torch.long) + start, query_idx))
    stage2 = _qwen2_similarity(rep, new_dim, HEAD_DIM)[start : start + L]

    v = values[0]
    scores, ours_seeds = sel.foreground_scores(
        v[:, start : start + L], v[:, query_idx], n_seed, numerics="authors", sequence_values=v, span_start=start
    )
    assert ours_seeds.tolist() == seeds
    _assert_same_model_dtype_scores(scores, stage2)
    n_fg = round(0.4 * L)
    assert set(sel.stable_topk(scores, n_fg).tolist()) == _topk_low_index(stage2, n_fg)
    if n_seed == 0:  # text rows only: stage 2 is stage 1
        assert ours_seeds.numel() == 0
        assert torch.equal(stage2, stage1)
    # the joint mean is the default of the sequence domain; per-row means differ by bf16 rounding only
    per_row, _ = sel.foreground_scores(
        v[:, start : start + L], v[:, query_idx], n_seed, numerics="authors", sequence_values=v, span_start=start,
        authors_mean="per_row",
    )
    torch.testing.assert_close(per_row, scores, rtol=2**-6, atol=1e-12)
    if L > 1000:
        assert not torch.equal(per_row, scores)


def test_similarity_authors_equals_release_llava_sequence_domain_fp16():
    # LLaVA: fp16, no GQA, head mean per row then row mean (per_row), softmax over the whole sequence
    start, L, text_after, heads, d = 35, 576, 30, 8, 128
    S = start + L + text_after
    values = _values(S, heads, d, dtype=torch.float16, seed=2)
    query_idx = torch.arange(start + L + 2, S)
    n_seed = max(1, round(L * 0.01))
    avg = _llava_similarity_rows(values, query_idx, d)  # (Q, S)
    stage1 = torch.mean(avg, dim=0)[start : start + L]
    seeds = _ranking_low_index(stage1)[:n_seed]
    seed_avg = _llava_similarity_rows(values, torch.tensor(seeds) + start, d)
    stage2 = torch.mean(torch.cat((seed_avg, avg), dim=0), dim=0)[start : start + L]

    v = values[0]
    scores, ours_seeds = sel.foreground_scores(
        v[:, start : start + L], v[:, query_idx], n_seed, numerics="authors", sequence_values=v, span_start=start,
        authors_mean="per_row",
    )
    assert ours_seeds.tolist() == seeds
    _assert_same_model_dtype_scores(scores, stage2)
    n_fg = round(0.2 * L)
    assert set(sel.stable_topk(scores, n_fg).tolist()) == _topk_low_index(stage2, n_fg)


def test_similarity_ours_and_authors_agree_up_to_rounding():
    start, L, text_after = 15, GRID[0] * GRID[1], 40
    S = start + L + text_after
    v = _values(S, seed=3)[0]
    q = v[:, start + L + 2 :]
    for kw in ({}, {"sequence_values": v, "span_start": start}):
        ours, s_ours = sel.foreground_scores(v[:, start : start + L], q, 13, **kw)
        auth, s_auth = sel.foreground_scores(v[:, start : start + L], q, 13, numerics="authors", **kw)
        assert ours.dtype == auth.dtype == torch.float32
        assert len(set(s_ours.tolist()) & set(s_auth.tolist())) >= 11
        # away from the seeds (whose own rows lift them), bf16 rounding moves scores by well under 1%
        others = torch.ones(L, dtype=torch.bool)
        others[s_ours] = False
        others[s_auth] = False
        assert (auth - ours)[others].abs().max() <= 0.01 * ours.max()
        top_o = set(sel.stable_topk(ours, L // 2).tolist())
        top_a = set(sel.stable_topk(auth, L // 2).tolist())
        assert len(top_o ^ top_a) <= 0.05 * L
