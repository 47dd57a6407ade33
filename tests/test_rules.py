"""The baseline rules (DART, DivPrune, CDPruner) against slow references written with Python loops and
floats, hand-computed cases, and invariances that catch real bugs (permutations, scalings, duplicates,
ties)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivcprune import rules

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- loop references -----------------------------------------------------------------------------------


def rows(x: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in r] for r in x.tolist()]


def cos(a: list[float], b: list[float]) -> float:
    dot = sum(p * q for p, q in zip(a, b))
    return dot / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))


def l1(x: list[list[float]]) -> list[float]:
    return [sum(abs(v) for v in r) for r in x]


def ranked(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def ref_dart(tokens, keep, scores=None, text=None, text_scores=None, n_img=4, n_txt=4, mode="exact", start=None):
    x = rows(tokens)
    t = rows(text) if text is not None else []
    scores = l1(x) if scores is None else scores.tolist()
    text_scores = l1(t) if text_scores is None else text_scores.tolist()
    n = len(x)
    if keep >= n:
        return list(range(n))
    if keep == 0:
        return []
    img = ranked(scores)[: min(n_img, n if mode == "authors" else keep)]
    txt = ranked(text_scores)[: min(n_txt, len(t))]
    pivots = len(img) + len(txt)
    if mode == "exact":
        visits = [x[i] for i in sorted(img)] + [t[j] for j in sorted(txt)]
        rest = keep - len(img)
        quotas = [rest // pivots + (i < rest % pivots) for i in range(pivots)]
    else:
        by_position = {start + i: x[i] for i in img}
        by_position.update({start + n + j: t[j] for j in txt})
        visits = [by_position[p] for p in set([start + i for i in img] + [start + n + j for j in txt])]
        quotas = [keep // pivots] * pivots
    kept = set(img)
    for vec, quota in zip(visits, quotas):
        pool = sorted((j for j in range(n) if j not in kept), key=lambda j: (cos(x[j], vec), j))
        kept.update(pool[:quota])
    return sorted(kept)


def unit(a: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in a))
    return [v / norm for v in a]


def ref_divprune(embeddings, keep, priority=None):
    """Ties go to the lowest ``priority`` (by default the lowest index)."""
    x = rows(embeddings)
    n = len(x)
    dist = [[1.0 - ref_cos(a, b) for b in x] for a in x]
    if keep == 0:
        return []
    if n == 1:
        return [0]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    prio = list(range(n)) if priority is None else priority
    order = [max(range(n), key=lambda i: (nearest[i], -prio[i]))]
    while len(order) < keep:
        rest = [j for j in range(n) if j not in order]
        order.append(max(rest, key=lambda j: (min(dist[s][j] for s in order), -prio[j])))
    return order


def ref_relevance(image_embeds, text, negate=True):
    img, txt = rows(image_embeds), rows(text.reshape(-1, text.shape[-1]))
    rel = [sum(cos(a, b) for b in txt) / len(txt) for a in img]
    rel = [-r for r in rel] if negate else rel
    lo, hi = min(rel), max(rel)
    return [1.0] * len(rel) if hi == lo else [(r - lo + 1e-6) / (hi - lo) for r in rel]


def ref_cos(a: list[float], b: list[float]) -> float:
    """Cosine, exactly 1 for the same direction."""
    return 1.0 if unit(a) == unit(b) else cos(a, b)


def ref_kernel(visual, weights):
    x = rows(visual)
    kernel = [[weights[i] * ref_cos(a, b) * weights[j] for j, b in enumerate(x)] for i, a in enumerate(x)]
    return torch.tensor(kernel, dtype=torch.float64)


def ref_dpp(kernel, keep, eps=1e-10):
    """Greedy MAP by its definition: add the item that most increases det(L_S), i.e. the largest
    det(L_{S+j}) / det(L_S), until that gain is <= eps * max diag; then the lowest unpicked indices."""
    n = kernel.shape[0]

    def det(items: list[int]) -> float:
        return float(torch.linalg.det(kernel[items][:, items])) if items else 1.0

    floor = eps * max(max(float(kernel[i, i]) for i in range(n)), 0.0) if n else 0.0
    order: list[int] = []
    while len(order) < keep:
        base = det(order)
        gains = {j: det(order + [j]) / base for j in range(n) if j not in order}
        best = max(gains, key=lambda j: (gains[j], -j))
        if not gains[best] > floor:
            break
        order.append(best)
    return order + [j for j in range(n) if j not in order][: keep - len(order)]


# --- DART ----------------------------------------------------------------------------------------------


def test_dart_defaults_are_the_releases():
    sig = inspect.signature(rules.dart_select).parameters
    assert sig["num_pivots"].default == 4 and sig["num_text_pivots"].default == 4
    assert sig["mode"].default == "exact" and rules.DART_LAYER == 2


def test_dart_hand_case_exact_and_release_budget():
    # pivot 0 = (1, 0); cosines to it: t1 .994, t2 0, t3 -1, t4 .707
    tokens = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    scores = torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0])
    assert rules.dart_select(tokens, 3, num_pivots=1, pivot_scores=scores).tolist() == [0, 2, 3]
    # the release: the pivot takes keep // 1 = 3 tokens and is kept on top of them
    got = rules.dart_select(tokens, 3, num_pivots=1, pivot_scores=scores, mode="authors", span_start=35)
    assert got.tolist() == [0, 2, 3, 4]


def test_dart_text_pivot_takes_the_tokens_least_like_it():
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.6, 0.8], [-0.6, -0.8]])
    text = torch.tensor([[0.0, 2.0], [5.0, 5.0]])
    # one image pivot (token 0) with quota 1, one text pivot (text 1 by L1 norm, direction (1, 1)) with quota 1
    got = rules.dart_select(tokens, 3, num_pivots=1, pivot_scores=torch.tensor([9.0, 0, 0, 0, 0]),
                            text_tokens=text, num_text_pivots=1)
    # token 0 takes 4 (cos -.6 is lowest); the text pivot then takes 2 (cos -.707) over 1 (.707), 3 (.99)
    assert got.tolist() == [0, 2, 4]
    assert ref_dart(tokens, 3, torch.tensor([9.0, 0, 0, 0, 0]), text, None, 1, 1) == [0, 2, 4]


def test_dart_pivot_order_decides_who_takes_a_shared_token():
    # pivots 0 and 1 both want token 2 most; the first visited gets it
    tokens = torch.tensor([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    scores = torch.tensor([3.0, 2.0, 0.0, 0.0, 0.0])
    kw = dict(num_pivots=2, pivot_scores=scores)
    # visiting 0 then 1: 0 takes 2, 1 takes 4 (cos -.196) over 3 (+.196)
    assert rules.dart_select(tokens, 4, **kw).tolist() == [0, 1, 2, 4]
    # the release visits a set of positions: {0, 1} iterates 0, 1, but {7, 8} iterates 8, 7 (slot = value % 8),
    # so pivot 1 takes 2 first and pivot 0 is left with 3 and 4 at cosine 0: the lower index wins
    assert list({7, 8}) == [8, 7]
    assert rules.dart_select(tokens, 2, mode="authors", span_start=0, **kw).tolist() == [0, 1, 2, 4]
    assert rules.dart_select(tokens, 2, mode="authors", span_start=7, **kw).tolist() == [0, 1, 2, 3]


@PROPERTY
@given(seeds, st.integers(1, 40), st.integers(1, 16), st.data())
def test_dart_matches_loop_reference(seed, length, dim, data):
    keep = data.draw(st.integers(0, length))
    n_img, n_txt = data.draw(st.integers(0, 6)), data.draw(st.integers(0, 5))
    n_text = data.draw(st.integers(0, 8))
    mode = data.draw(st.sampled_from(rules.DART_MODES))
    start = data.draw(st.integers(0, 100))
    tokens, text = randn(seed, length, dim), (randn(seed + 1, n_text, dim) if n_text else None)
    scores = randn(seed + 2, length) if data.draw(st.booleans()) else None
    t_scores = randn(seed + 3, n_text) if n_text and data.draw(st.booleans()) else None
    kw = dict(num_pivots=n_img, pivot_scores=scores, text_tokens=text, text_pivot_scores=t_scores,
              num_text_pivots=n_txt, mode=mode, span_start=start)
    no_pivot = min(n_img, length if mode == "authors" else keep) + min(n_txt, n_text) == 0
    if no_pivot and 0 < keep < length:
        with pytest.raises(ValueError, match="at least one pivot"):
            rules.dart_select(tokens, keep, **kw)
        return
    got = rules.dart_select(tokens, keep, **kw).tolist()
    assert got == ref_dart(tokens, keep, scores, text, t_scores, n_img, n_txt, mode, start)
    assert got == sorted(set(got))
    if mode == "exact":
        assert len(got) == keep


@PROPERTY
@given(seeds, st.integers(2, 30), st.integers(2, 16), st.data())
def test_dart_ignores_token_scale_and_ranks_a_pivots_duplicate_last(seed, length, dim, data):
    keep = data.draw(st.integers(1, length - 1))
    tokens = randn(seed, length, dim)
    pivot = data.draw(st.integers(0, length - 2))
    tokens[-1] = tokens[pivot] * 4.0  # a duplicate of the pivot (cosine 1)
    scores = torch.zeros(length)
    scores[pivot] = 1.0
    got = rules.dart_select(tokens, keep, num_pivots=1, pivot_scores=scores)
    assert len(got) == keep and pivot in got.tolist()
    assert length - 1 not in got.tolist()  # the most similar token to the only pivot goes last
    powers = 2.0 ** torch.randint(-4, 5, (length, 1), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(rules.dart_select(tokens * powers, keep, num_pivots=1, pivot_scores=scores), got)


def test_dart_pivot_scores_are_l1_norms_over_heads():
    keys = randn(3, 4, 6, 5)  # (H, L, d)
    flat = keys.permute(1, 0, 2).reshape(6, 20)
    assert torch.allclose(rules.dart_pivot_scores(keys), flat.abs().sum(dim=1))
    assert torch.equal(rules.dart_pivot_scores(flat), flat.abs().sum(dim=1))
    # repeating the KV heads (grouped-query attention) scales every norm alike
    rep = keys.repeat_interleave(3, dim=0)
    assert torch.allclose(rules.dart_pivot_scores(rep), 3 * rules.dart_pivot_scores(keys))


def test_dart_ties_go_to_the_lower_index():
    tokens = torch.tensor([[1.0, 0.0]] * 6)
    # equal pivot scores: pivot 0; equal cosines: the lowest indices
    assert rules.dart_select(tokens, 3, num_pivots=1).tolist() == [0, 1, 2]
    assert rules.dart_select(tokens, 3, num_pivots=2).tolist() == [0, 1, 2]


# --- DivPrune ------------------------------------------------------------------------------------------


def test_divprune_hand_case():
    # t0 and t1 nearly equal, t2 orthogonal, t3 opposite to t0: nearest-neighbour distances .00005, .00005,
    # .99, 1 -> t3 first; then t0 (distance 2 to t3) over t1 (1.99995); then t2 (min distance 1) over t1
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.0]])
    assert rules.divprune_order(emb, 4).tolist() == [3, 0, 2, 1]
    assert [rules.divprune_select(emb, k).tolist() for k in range(5)] == [[], [3], [0, 3], [0, 2, 3], [0, 1, 2, 3]]


@PROPERTY
@given(seeds, st.integers(1, 40), st.integers(1, 16), st.data())
def test_divprune_matches_loop_reference(seed, length, dim, data):
    keep = data.draw(st.integers(0, length))
    emb = randn(seed, length, dim)
    if data.draw(st.booleans()):  # exact duplicates and exact ties
        emb = emb[torch.randint(0, length, (length,), generator=torch.Generator().manual_seed(seed))]
    order = rules.divprune_order(emb, keep).tolist()
    assert order == ref_divprune(emb, keep)
    assert len(set(order)) == keep
    assert rules.divprune_select(emb, keep).tolist() == sorted(order)


@PROPERTY
@given(seeds, st.integers(2, 40), st.integers(2, 16), st.data())
def test_divprune_permutation_and_scale(seed, length, dim, data):
    keep = data.draw(st.integers(0, length))
    g = torch.Generator().manual_seed(seed)
    emb = randn(seed, length, dim)
    order = rules.divprune_order(emb, keep)
    perm = torch.randperm(length, generator=g)
    # the same picks, except that exact ties (two mutual nearest neighbours, for one) now go to the token
    # that comes first in the permuted input
    position = torch.argsort(perm).tolist()
    assert perm[rules.divprune_order(emb[perm], keep)].tolist() == ref_divprune(emb, keep, position)
    powers = 2.0 ** torch.randint(-6, 7, (length, 1), generator=g)  # exact, so the cosines are bit-identical
    assert torch.equal(rules.divprune_order(emb * powers, keep), order)


@PROPERTY
@given(seeds, st.integers(1, 20), st.integers(1, 16), st.data())
def test_divprune_never_keeps_both_copies_while_distinct_directions_remain(seed, distinct, dim, data):
    base = randn(seed, distinct, dim)
    copy = data.draw(st.integers(0, distinct - 1))
    emb = torch.cat([base, base[copy : copy + 1] * 8.0])  # same direction: cosine distance 0
    keep = data.draw(st.integers(1, min(distinct, 2 if dim == 1 else distinct)))  # 1-D: only 2 directions
    got = rules.divprune_select(emb, keep).tolist()
    assert not (copy in got and distinct in got)


def test_divprune_ties_and_identical_tokens():
    same = torch.ones(5, 3)
    assert rules.divprune_order(same, 5).tolist() == [0, 1, 2, 3, 4]  # never the same token twice
    # all nearest-neighbour distances equal (1): the first token starts, then the opposite one
    assert rules.divprune_order(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]), 2).tolist() == [0, 1]


# --- CDPruner ------------------------------------------------------------------------------------------


def test_cdpruner_relevance_hand_case():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([2.0, 0.0])  # cosines 1, 0, .7071
    neg = rules.cdpruner_relevance(img, text)  # -cos: -1, 0, -.7071 -> min-max with the 1e-6 offset
    assert neg.tolist() == pytest.approx([1e-6, 1 + 1e-6, 1 - math.sqrt(0.5) + 1e-6], abs=1e-15)
    pos = rules.cdpruner_relevance(img, text, negate=False)
    assert pos.tolist() == pytest.approx([1 + 1e-6, 1e-6, math.sqrt(0.5) + 1e-6], abs=1e-15)
    # several text segments are averaged: mean cosines .5, .5, .7071, negated; range .7071 - .5
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    spread = math.sqrt(0.5) - 0.5
    expected = [1 + 1e-6 / spread, 1 + 1e-6 / spread, 1e-6 / spread]
    assert rules.cdpruner_relevance(img, two).tolist() == pytest.approx(expected, rel=1e-12)
    # equal relevance everywhere: the release divides by zero, here every token weighs 1
    assert rules.cdpruner_relevance(img[:2], torch.tensor([1.0, 1.0])).tolist() == [1.0, 1.0]


def test_cdpruner_hand_cases():
    # orthogonal features: the kernel is diag(r^2) and the picks follow the relevance
    vis = torch.eye(3, dtype=torch.float64)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([1.0, 0.0])
    assert rules.cdpruner_select(vis, text, 1, image_embeds=img).tolist() == [1]  # least CLIP-similar first
    assert rules.cdpruner_select(vis, text, 2, image_embeds=img).tolist() == [1, 2]
    assert rules.cdpruner_select(vis, text, 1, image_embeds=img, negate=False).tolist() == [0]
    # an opposite token is a duplicate for a DPP (det [[1, -1], [-1, 1]] = 0) but the farthest for DivPrune
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert rules.cdpruner_select(x, None, 2, relevance=torch.ones(3)).tolist() == [0, 2]
    assert rules.divprune_select(x, 2).tolist() == [0, 1]


@PROPERTY
@given(seeds, st.integers(1, 40), st.integers(1, 16), st.data())
def test_dpp_greedy_matches_determinant_greedy(seed, length, dim, data):
    feats = randn(seed, length, dim)
    weights = randn(seed + 1, length).abs() + 0.1
    kernel = weights[:, None] * (feats @ feats.T) * weights[None, :]
    keep = data.draw(st.integers(0, min(length, dim)))  # within the kernel's rank
    got = rules.dpp_greedy_map(kernel, keep).tolist()
    assert got == ref_dpp(kernel, keep)


@PROPERTY
@given(seeds, st.integers(1, 40), st.integers(1, 16), st.integers(1, 3), st.data())
def test_cdpruner_matches_loop_reference(seed, length, dim, segments, data):
    clip_dim = data.draw(st.integers(1, 8))
    visual, img = randn(seed, length, dim), randn(seed + 1, length, clip_dim)
    text = randn(seed + 2, segments, clip_dim)
    theta = data.draw(st.sampled_from([None, 0.25, 0.5, 0.8]))
    negate = data.draw(st.booleans())
    keep = data.draw(st.integers(0, min(length, dim)))
    rel = ref_relevance(img, text, negate)
    assert rules.cdpruner_relevance(img, text, negate=negate).tolist() == pytest.approx(rel, rel=1e-9, abs=1e-12)
    weights = rel if theta is None else [math.exp(theta / (2 * (1 - theta)) * r) for r in rel]
    expected = sorted(ref_dpp(ref_kernel(visual, weights), keep))
    got = rules.cdpruner_select(visual, text, keep, image_embeds=img, theta=theta, negate=negate)
    assert got.tolist() == expected


@PROPERTY
@given(seeds, st.integers(1, 40), st.integers(1, 16), st.data())
def test_cdpruner_with_uniform_relevance_is_plain_dpp(seed, length, dim, data):
    visual = randn(seed, length, dim)
    keep = data.draw(st.integers(0, length))
    plain = sorted(ref_dpp(ref_kernel(visual, [1.0] * length), keep))  # every diagonal entry 1: token 0 starts
    assert rules.cdpruner_select(visual, None, keep, relevance=torch.ones(length)).tolist() == plain
    text = randn(seed + 1, 2, dim)
    assert rules.cdpruner_select(visual, text, keep, theta=0.0).tolist() == plain  # exp(0 * r) = 1
    # text orthogonal to every token: all relevances equal, so uniform
    padded = torch.cat([visual, torch.zeros(length, 1, dtype=visual.dtype)], dim=1)
    ortho = torch.zeros(1, dim + 1, dtype=visual.dtype)
    ortho[0, -1] = 1.0
    assert rules.cdpruner_select(padded, ortho, keep).tolist() == plain


@PROPERTY
@given(seeds, st.integers(2, 40), st.integers(2, 16), st.data())
def test_cdpruner_permutation_and_scale(seed, length, dim, data):
    g = torch.Generator().manual_seed(seed)
    visual, text = randn(seed, length, dim), randn(seed + 1, 2, dim)
    keep = data.draw(st.integers(0, min(length, dim)))
    got = rules.cdpruner_select(visual, text, keep)
    perm = torch.randperm(length, generator=g)
    assert torch.equal(torch.sort(perm[rules.cdpruner_select(visual[perm], text, keep)]).values, got)
    powers = 2.0 ** torch.randint(-6, 7, (length, 1), generator=g)
    assert torch.equal(rules.cdpruner_select(visual * powers, text * 3.0, keep), got)
    rel = rules.cdpruner_relevance(visual, text)
    assert torch.equal(rules.cdpruner_select(visual, None, keep, relevance=rel * 8.0), got)


@PROPERTY
@given(seeds, st.integers(1, 16), st.data())
def test_cdpruner_never_keeps_both_copies_within_the_rank(seed, distinct, data):
    dim = data.draw(st.integers(distinct, 16))  # distinct random tokens span a space of that dimension
    base = randn(seed, distinct, dim)
    copy = data.draw(st.integers(0, distinct - 1))
    visual = torch.cat([base, base[copy : copy + 1] * 0.5])
    keep = data.draw(st.integers(1, distinct))
    got = rules.cdpruner_select(visual, None, keep, relevance=randn(seed + 1, distinct + 1).abs() + 0.1).tolist()
    assert not (copy in got and distinct in got)


def test_dpp_fills_with_the_lowest_unpicked_once_the_rank_is_used_up():
    feats = randn(5, 6, 2)  # rank 2
    kernel = feats @ feats.T
    order = rules.dpp_greedy_map(kernel, 5).tolist()
    greedy = ref_dpp(kernel, 2)
    assert order[:2] == greedy
    assert order[2:] == [j for j in range(6) if j not in greedy][:3]
    assert order == ref_dpp(kernel, 5)
    # identical tokens: one pick, then index order
    assert rules.dpp_greedy_map(torch.ones(4, 4), 3).tolist() == [0, 1, 2]


# --- budgets and errors, every rule ---------------------------------------------------------------------

SELECTORS = {
    "dart": lambda x, k: rules.dart_select(x, k),
    "divprune": rules.divprune_select,
    "cdpruner": lambda x, k: rules.cdpruner_select(x, torch.ones(1, x.shape[-1]), k),
}


@pytest.mark.parametrize("name", SELECTORS)
def test_keep_everything_nothing_and_out_of_range(name):
    select = SELECTORS[name]
    x = randn(0, 7, 4)
    assert select(x, 7).tolist() == list(range(7))
    assert select(x, 0).tolist() == []
    assert select(x, 0).dtype == torch.long
    for bad in (-1, 8):
        with pytest.raises(ValueError, match=r"keep must be in \[0, 7\]"):
            select(x, bad)
    for bad in (2.0, True, "3"):
        with pytest.raises(ValueError, match="keep must be an integer"):
            select(x, bad)
    with pytest.raises(ValueError, match="2-D"):
        select(x[0], 1)
    with pytest.raises(ValueError, match="non-finite"):
        select(torch.full((3, 2), math.nan), 1)
    x[2] = 0.0
    with pytest.raises(ValueError, match=r"zero vectors at rows \[2\]"):
        select(x, 3)


@pytest.mark.parametrize("name", SELECTORS)
def test_an_empty_span_keeps_nothing(name):
    assert SELECTORS[name](torch.zeros(0, 3), 0).tolist() == []


def test_argument_errors():
    x = randn(1, 6, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        rules.dart_select(x, 2, mode="fast")
    with pytest.raises(ValueError, match="needs span_start"):
        rules.dart_select(x, 2, mode="authors")
    with pytest.raises(ValueError, match="at least one pivot"):
        rules.dart_select(x, 2, num_pivots=0)
    with pytest.raises(ValueError, match="6 scores"):
        rules.dart_select(x, 2, pivot_scores=torch.ones(5))
    with pytest.raises(ValueError, match=r"text_tokens must have shape \(N, 3\)"):
        rules.dart_select(x, 2, text_tokens=torch.ones(2, 4))
    with pytest.raises(ValueError, match="without text_tokens"):
        rules.dart_select(x, 2, text_pivot_scores=torch.ones(2))
    with pytest.raises(ValueError, match="num_pivots must be a non-negative integer, got -1"):
        rules.dart_select(x, 2, num_pivots=-1)
    with pytest.raises(ValueError, match="theta"):
        rules.cdpruner_select(x, x, 2, theta=1.0)
    with pytest.raises(ValueError, match="not both"):
        rules.cdpruner_select(x, x, 2, relevance=torch.ones(6))
    with pytest.raises(ValueError, match="needs text"):
        rules.cdpruner_select(x, None, 2)
    with pytest.raises(ValueError, match="image_embeds must have 6 rows"):
        rules.cdpruner_select(x, x, 2, image_embeds=torch.ones(5, 3))
    with pytest.raises(ValueError, match=r"text must have shape"):
        rules.cdpruner_select(x, torch.ones(2, 4), 2)
    with pytest.raises(ValueError, match="square"):
        rules.dpp_greedy_map(torch.ones(3, 4), 1)
    with pytest.raises(ValueError, match="eps"):
        rules.dpp_greedy_map(torch.ones(3, 3), 1, eps=-1.0)
    with pytest.raises(ValueError, match=r"\(L, F\) or \(H, L, d\)"):
        rules.dart_pivot_scores(torch.ones(3))
