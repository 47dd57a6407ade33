"""Tiled spans (InternVL: tiles plus a thumbnail) against brute force: every function of ``ivcprune.tiles``
is re-implemented here with plain loops over (row, col) coordinates, and the thumbnail -> mosaic map from
image rectangles (exact fractions) rather than from any index formula."""

from __future__ import annotations

import functools
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ivcprune.tiles import TileLayout, per_tile_topk, thumbnail_to_mosaic, tile_count_grids, tile_selection

TILINGS = [(1, 2), (2, 1), (2, 3), (3, 2), (1, 4), (4, 1), (2, 2), (3, 3)]
SIDES = [2, 3, 4, 5]

# bounded and reproducible: the same examples on every run, nothing written to disk
FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)
SLOW = settings(max_examples=40, deadline=None, derandomize=True, database=None)


# ----------------------------------------------------------------------------------------------------------
# brute force


def bf_blocks(rows: int, cols: int, side: int) -> list[tuple[str, int, list[int]]]:
    """The span walked block by block: ``(kind, tile number, span indices)``, tiles row-major then the
    thumbnail when there are several tiles."""
    blocks, index = [], 0
    for tr in range(rows):
        for tc in range(cols):
            tokens = []
            for _y in range(side):
                for _x in range(side):
                    tokens.append(index)
                    index += 1
            blocks.append(("tile", tr * cols + tc, tokens))
    if rows * cols > 1:
        blocks.append(("thumbnail", -1, list(range(index, index + side * side))))
    return blocks


def bf_mosaic_coordinates(rows: int, cols: int, side: int) -> dict[int, tuple[int, int]]:
    """Span index -> (row, col) in the mosaic of ``rows*side x cols*side`` tokens, by walking every tile's
    grid in place."""
    where, index = {}, 0
    for tr in range(rows):
        for tc in range(cols):
            for y in range(side):
                for x in range(side):
                    where[index] = (tr * side + y, tc * side + x)
                    index += 1
    return where


def rect(col: int, row: int, width: int, height: int) -> tuple[Fraction, Fraction, Fraction, Fraction]:
    """Image rectangle (x0, x1, y0, y1), normalised to [0, 1), of cell (row, col) of a ``height x width`` grid."""
    return Fraction(col, width), Fraction(col + 1, width), Fraction(row, height), Fraction(row + 1, height)


def inside(a, b) -> bool:
    return b[0] <= a[0] and a[1] <= b[1] and b[2] <= a[2] and a[3] <= b[3]


@functools.lru_cache(maxsize=None)
def bf_cover(rows: int, cols: int, side: int) -> tuple[frozenset[int], ...]:
    """For every thumbnail token (local index), the span indices of the mosaic tokens whose image rectangle
    lies inside its own."""
    coords = bf_mosaic_coordinates(rows, cols, side)
    mosaic_rects = {i: rect(C, R, cols * side, rows * side) for i, (R, C) in coords.items()}
    cover = []
    for r in range(side):
        for c in range(side):
            cell = rect(c, r, side, side)
            cover.append(frozenset(i for i, box in mosaic_rects.items() if inside(box, cell)))
    return tuple(cover)


def bf_mosaic(thumb_local, rows: int, cols: int, side: int) -> list[int]:
    cover = bf_cover(rows, cols, side)
    out = set()
    for t in thumb_local:
        out |= cover[t]
    return sorted(out)


def bf_topk(scores: list, indices: list[int], k: int) -> list[int]:
    """The ``k`` best of ``scores`` over ``indices``, best first, ties to the lower index."""
    return [i for _, i in sorted((-scores[i], i) for i in indices)[:k]]


def bf_per_tile_topk(scores: list, tile_tokens: int, k: int) -> list[int]:
    out = []
    for start in range(0, len(scores), tile_tokens):
        out += bf_topk(scores, list(range(start, start + tile_tokens)), k)
    return out


def bf_tile_selection(rows, cols, side, cos, sin, thumb, seeds, ivc_ratio, thumbnail_ratio, budget):
    """METHOD.md "InternVL tiles", one step at a time with sets and lists."""
    blocks = bf_blocks(rows, cols, side)
    n = side * side
    L = sum(len(tokens) for _, _, tokens in blocks)
    t0 = blocks[-1][2][0]  # the thumbnail's first span index
    k = round(ivc_ratio * n)
    ivc_cos, ivc_sin = [], []
    for _, _, tokens in blocks:
        ivc_cos += bf_topk(cos, tokens, k)
        ivc_sin += bf_topk(sin, tokens, k)
    thumb_ivc = {i - t0 for i in ivc_cos + ivc_sin if i >= t0}
    ranked = bf_topk(thumb, list(range(n)), n)
    cap = round(thumbnail_ratio * n)
    fg = []
    for i in ranked:
        if len(thumb_ivc) + len(fg) >= cap:
            break
        if i not in thumb_ivc:
            fg.append(i)
    mosaic = bf_mosaic(fg, rows, cols, side)
    seed_span = [s + t0 for s in seeds]
    priority = set(ivc_cos) | set(ivc_sin) | {i + t0 for i in fg} | set(mosaic) | set(seed_span)
    target = max(1, round(budget * L))
    if len(priority) < target:
        branch = "fill"
        kept = set(priority)
        fill = []
        for i in ranked:
            if len(kept) >= target:
                break
            if i + t0 not in kept:
                kept.add(i + t0)
                fill.append(i + t0)
    else:
        branch = "cut"
        kept = set(sorted(priority)[:target])
        fill = []
    groups = {"ivc_cos": set(ivc_cos), "ivc_sin": set(ivc_sin), "seed": set(seed_span),
              "foreground": {i + t0 for i in fg}, "tile_foreground": set(mosaic), "fill": set(fill)}
    return sorted(kept), {name: g & kept for name, g in groups.items()}, branch, priority, target


def check_selection(rows, cols, side, cos, sin, thumb, seeds, ivc_ratio, thumbnail_ratio, budget):
    layout = TileLayout(rows, cols, side)
    got = tile_selection(layout, cos, sin, thumb, torch.tensor(seeds, dtype=torch.long), ivc_ratio=ivc_ratio,
                         thumbnail_ratio=thumbnail_ratio, budget=budget)
    kept, groups, branch, priority, target = bf_tile_selection(
        rows, cols, side, cos.tolist(), sin.tolist(), thumb.tolist(), seeds, ivc_ratio, thumbnail_ratio, budget)
    assert got.kept.dtype == torch.long
    assert got.kept.tolist() == kept
    assert set(got.groups) == set(groups)
    union = set()
    for name, g in got.groups.items():
        members = g.tolist()
        assert set(members) == groups[name], name
        assert set(members) <= set(kept), name
        union |= set(members)
    assert union == set(kept)  # every kept token is there for a reason
    if branch == "cut":
        assert len(kept) == target and not groups["fill"]
    else:
        assert priority <= set(kept) and len(kept) <= target
        assert set(kept) - priority == groups["fill"]
        assert all(i >= layout.thumbnail_start for i in groups["fill"])
    return branch, kept, priority, target


# ----------------------------------------------------------------------------------------------------------
# strategies


layouts = st.tuples(st.sampled_from(TILINGS), st.sampled_from(SIDES)).map(lambda t: (*t[0], t[1]))


def score_lists(size: int):
    """Heavy ties (a few integer values) or finite floats."""
    return st.one_of(st.lists(st.integers(0, 3).map(float), min_size=size, max_size=size),
                     st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=size, max_size=size))


# ----------------------------------------------------------------------------------------------------------
# TileLayout


@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("tiling", TILINGS + [(1, 1), (2, 4), (4, 3)])
def test_layout_equals_the_block_walk(tiling, side):
    rows, cols = tiling
    layout = TileLayout(rows, cols, side)
    blocks = bf_blocks(rows, cols, side)
    flat = [i for _, _, tokens in blocks for i in tokens]
    assert flat == list(range(len(flat)))
    assert layout.length == len(flat)
    assert layout.blocks == len(blocks)
    assert layout.tiles == sum(kind == "tile" for kind, _, _ in blocks)
    assert layout.tile_tokens == side * side
    assert layout.thumbnail == (blocks[-1][0] == "thumbnail")
    if layout.thumbnail:
        assert layout.thumbnail_start == blocks[-1][2][0]
        assert layout.length - layout.thumbnail_start == side * side
    else:
        assert layout.thumbnail_start == layout.length == side * side


def test_layout_internvl_numbers():
    assert TileLayout(2, 3).length == 7 * 256 and TileLayout(2, 3).thumbnail_start == 6 * 256
    assert TileLayout(1, 1).length == 256 and TileLayout(1, 1).blocks == 1 and not TileLayout(1, 1).thumbnail
    assert TileLayout(1, 2).blocks == 3 and TileLayout(1, 2).length == 768


@pytest.mark.parametrize("bad", [(0, 1, 2), (1, 0, 2), (1, 1, 0), (-1, 2, 2)])
def test_layout_rejects_empty_grids(bad):
    with pytest.raises(ValueError):
        TileLayout(*bad)


# ----------------------------------------------------------------------------------------------------------
# tile_count_grids


@pytest.mark.parametrize("n", range(1, 41))
def test_tile_count_grids_are_all_factorizations(n):
    expect = []
    for r in range(1, n + 1):
        for c in range(1, n + 1):
            if r * c == n:
                expect.append((r, c))
    assert tile_count_grids(n) == expect


def test_tile_count_grids_by_hand():
    assert tile_count_grids(1) == [(1, 1)]
    assert tile_count_grids(6) == [(1, 6), (2, 3), (3, 2), (6, 1)]
    assert tile_count_grids(7) == [(1, 7), (7, 1)]
    assert tile_count_grids(12) == [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]


# ----------------------------------------------------------------------------------------------------------
# per_tile_topk


@FAST
@given(st.integers(1, 9), st.integers(1, 5), st.data())
def test_per_tile_topk_equals_sorting_each_block(tile_tokens, blocks, data):
    L = tile_tokens * blocks
    values = data.draw(score_lists(L))
    k = data.draw(st.integers(0, tile_tokens + 2))
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]))
    scores = torch.tensor(values, dtype=dtype)
    got = per_tile_topk(scores, tile_tokens, k)
    assert got.dtype == torch.long
    assert got.tolist() == bf_per_tile_topk(scores.tolist(), tile_tokens, k)


def test_per_tile_topk_ties_go_to_the_lower_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    assert per_tile_topk(scores, 4, 2).tolist() == [1, 2, 4, 5, 8, 9]
    assert per_tile_topk(scores, 4, 3).tolist() == [1, 2, 0, 4, 5, 6, 8, 9, 10]
    assert per_tile_topk(scores, 6, 1).tolist() == [1, 8]
    assert per_tile_topk(scores, 4, 0).tolist() == []
    assert per_tile_topk(scores, 4, 9).tolist() == [1, 2, 0, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    # -0.0 and 0.0 are the same score
    assert per_tile_topk(torch.tensor([-0.0, 0.0, -0.0, 0.0]), 4, 2).tolist() == [0, 1]


def test_per_tile_topk_rejects_partial_tiles():
    with pytest.raises(ValueError):
        per_tile_topk(torch.zeros(10), 4, 1)


# ----------------------------------------------------------------------------------------------------------
# thumbnail_to_mosaic


def test_thumbnail_to_mosaic_by_hand_2x3_side_2():
    """side 2, 2x3 tiles: mosaic 4 x 6 tokens, tiles 0..5 of 4 tokens, thumbnail at 24..27.

    Mosaic (row, col) -> span index, written out:
        row 0:  0  1 |  4  5 |  8  9
        row 1:  2  3 |  6  7 | 10 11
        row 2: 12 13 | 16 17 | 20 21
        row 3: 14 15 | 18 19 | 22 23
    Thumbnail token (r, c) covers mosaic rows 2r..2r+1, cols 3c..3c+2."""
    layout = TileLayout(2, 3, 2)
    assert layout.length == 28 and layout.thumbnail_start == 24
    # token 3 = (1, 1): rows 2..3, cols 3..5
    assert thumbnail_to_mosaic(torch.tensor([3]), layout).tolist() == [17, 19, 20, 21, 22, 23]
    # token 0 = (0, 0): rows 0..1, cols 0..2
    assert thumbnail_to_mosaic(torch.tensor([0]), layout).tolist() == [0, 1, 2, 3, 4, 6]
    # token 1 = (0, 1): rows 0..1, cols 3..5
    assert thumbnail_to_mosaic(torch.tensor([1]), layout).tolist() == [5, 7, 8, 9, 10, 11]
    # token 2 = (1, 0): rows 2..3, cols 0..2
    assert thumbnail_to_mosaic(torch.tensor([2]), layout).tolist() == [12, 13, 14, 15, 16, 18]
    # several at once, duplicates included: sorted and unique
    assert thumbnail_to_mosaic(torch.tensor([3, 0, 3]), layout).tolist() == [0, 1, 2, 3, 4, 6, 17, 19, 20, 21,
                                                                             22, 23]
    assert bf_mosaic([3], 2, 3, 2) == [17, 19, 20, 21, 22, 23]  # the brute force agrees with the hand count


def test_thumbnail_to_mosaic_by_hand_3x2_side_2():
    """side 2, 3x2 tiles: mosaic 6 x 4; thumbnail token (r, c) covers rows 3r..3r+2, cols 2c..2c+1.
        row 0:  0  1 |  4  5
        row 1:  2  3 |  6  7
        row 2:  8  9 | 12 13
        row 3: 10 11 | 14 15
        row 4: 16 17 | 20 21
        row 5: 18 19 | 22 23"""
    layout = TileLayout(3, 2, 2)
    assert thumbnail_to_mosaic(torch.tensor([1]), layout).tolist() == [4, 5, 6, 7, 12, 13]
    assert thumbnail_to_mosaic(torch.tensor([2]), layout).tolist() == [10, 11, 16, 17, 18, 19]


@FAST
@given(layouts, st.data())
def test_thumbnail_to_mosaic_equals_image_rectangles(shape, data):
    rows, cols, side = shape
    thumb = data.draw(st.lists(st.integers(0, side * side - 1), max_size=2 * side * side))
    got = thumbnail_to_mosaic(torch.tensor(thumb, dtype=torch.long), TileLayout(rows, cols, side))
    assert got.dtype == torch.long
    assert got.tolist() == bf_mosaic(thumb, rows, cols, side)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("tiling", TILINGS + [(1, 1), (4, 3)])
def test_thumbnail_tokens_partition_the_mosaic(tiling, side):
    rows, cols = tiling
    layout = TileLayout(rows, cols, side)
    mosaic_tokens = set(range(rows * cols * side * side))
    # brute force: every mosaic token lies in exactly one thumbnail cell, every cell holds rows x cols tokens
    cover = bf_cover(rows, cols, side)
    for i in mosaic_tokens:
        assert sum(i in c for c in cover) == 1
    assert all(len(c) == rows * cols for c in cover)
    # the module: the images of the thumbnail tokens are disjoint and fill the mosaic
    seen = set()
    for t in range(side * side):
        block = thumbnail_to_mosaic(torch.tensor([t]), layout).tolist()
        assert set(block) == cover[t]
        assert not seen & set(block)
        seen |= set(block)
    assert seen == mosaic_tokens
    assert thumbnail_to_mosaic(torch.arange(side * side), layout).tolist() == sorted(mosaic_tokens)
    assert thumbnail_to_mosaic(torch.zeros(0, dtype=torch.long), layout).tolist() == []


# ----------------------------------------------------------------------------------------------------------
# tile_selection


def test_tile_selection_by_hand():
    """side 2, 1x2 tiles: tiles at 0..3 and 4..7, thumbnail 8..11; ivc 0.25 -> one token per block and kind.

    cos keeps 1, 6, 10; sin keeps 1, 4, 10; the thumbnail's IVC token is local 2. Thumbnail cap
    round(0.75*4) = 3 -> room for 2 foreground tokens: ranked [1, 2, 0, 3] minus IVC -> [1, 0] (span 9, 8).
    Mosaic 2 x 4: thumbnail token (0, c) covers cols 2c, 2c+1 of row 0 -> local 1 -> 4, 5; local 0 -> 0, 1."""
    layout = TileLayout(1, 2, 2)
    cos = torch.tensor([0, 5, 0, 0, 3, 0, 4, 0, 0, 0, 7, 0], dtype=torch.float64)
    sin = torch.tensor([0, 2, 1, 0, 9, 0, 0, 0, 0, 0, 3, 0], dtype=torch.float64)
    thumb = torch.tensor([0.5, 0.9, 0.9, 0.1], dtype=torch.float64)

    def run(seeds, budget):
        return tile_selection(layout, cos, sin, thumb, torch.tensor(seeds, dtype=torch.long), ivc_ratio=0.25,
                              thumbnail_ratio=0.75, budget=budget)

    # priority {0, 1, 4, 5, 6, 8, 9, 10} (8 tokens); budget 0.75 -> 9: fill with the best remaining thumbnail
    # token, local 3 -> 11
    got = run([], 0.75)
    assert got.kept.tolist() == [0, 1, 4, 5, 6, 8, 9, 10, 11]
    assert got.groups["fill"].tolist() == [11]
    assert sorted(got.groups["foreground"].tolist()) == [8, 9]
    assert got.groups["tile_foreground"].tolist() == [0, 1, 4, 5]
    # budget 1.0 -> 12, but the thumbnail runs out after one token: 9 kept
    assert run([], 1.0).kept.tolist() == [0, 1, 4, 5, 6, 8, 9, 10, 11]
    # seed local 3 -> 11 joins the priority set (9 tokens); budget 0.5 -> 6: the lowest span indices
    got = run([3], 0.5)
    assert got.kept.tolist() == [0, 1, 4, 5, 6, 8]
    assert got.groups["seed"].tolist() == [] and got.groups["fill"].tolist() == []
    assert sorted(got.groups["ivc_sin"].tolist()) == [1, 4] and sorted(got.groups["ivc_cos"].tolist()) == [1, 6]
    for seeds, budget in [([], 0.75), ([], 1.0), ([3], 0.5), ([3, 3, 0], 0.3)]:
        check_selection(1, 2, 2, cos, sin, thumb, seeds, 0.25, 0.75, budget)


def _random_scores(layout: TileLayout, seed: int, ties: bool):
    g = torch.Generator().manual_seed(seed)
    if ties:
        make = lambda n: torch.randint(0, 3, (n,), generator=g).double()  # noqa: E731
    else:
        make = lambda n: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    return make(layout.length), make(layout.length), make(layout.tile_tokens)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4), (3, 2, 4), (1, 4, 5), (3, 3, 3)])
def test_tile_selection_fill_branch(shape, ties):
    layout = TileLayout(*shape)
    cos, sin, thumb = _random_scores(layout, 7, ties)
    thumbnail = set(range(layout.thumbnail_start, layout.length))
    # ivc 0.1, thumbnail 0.3: the priority set stays under 40% of the span -> fill, to the target or until
    # the thumbnail runs out
    branch, kept, priority, target = check_selection(*shape, cos, sin, thumb, [0, 2], 0.1, 0.3, 0.4)
    assert branch == "fill" and len(priority) < target
    assert len(kept) == target or thumbnail <= set(kept)
    # budget 0.9: fill takes the whole thumbnail and still falls short
    branch, kept, priority, target = check_selection(*shape, cos, sin, thumb, [1], 0.1, 0.3, 0.9)
    assert branch == "fill" and len(kept) < target
    assert thumbnail <= set(kept)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4), (3, 2, 4), (1, 4, 5), (3, 3, 3), (2, 1, 2)])
def test_tile_selection_cut_branch(shape, ties):
    layout = TileLayout(*shape)
    cos, sin, thumb = _random_scores(layout, 11, ties)
    branch, kept, priority, target = check_selection(*shape, cos, sin, thumb, [0, 1], 0.25, 0.75, 0.1)
    assert branch == "cut" and len(priority) > target == len(kept)
    assert kept == sorted(priority)[:target]


def test_tile_selection_default_internvl_settings():
    """16x16 tiles, the defaults (ivc 0.1, thumbnail 0.5, budget 0.5), three seeds."""
    for shape, ties in [((1, 2, 16), False), ((2, 1, 16), True)]:
        layout = TileLayout(*shape)
        cos, sin, thumb = _random_scores(layout, 3, ties)
        got = tile_selection(layout, cos, sin, thumb, torch.tensor([5, 200, 77]))
        kept, _, _, _, _ = bf_tile_selection(*shape, cos.tolist(), sin.tolist(), thumb.tolist(), [5, 200, 77],
                                             0.1, 0.5, 0.5)
        assert got.kept.tolist() == kept
        assert len(kept) == round(0.5 * layout.length)


@SLOW
@given(layouts, st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.5]), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
       st.sampled_from([0.0, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]), st.data())
def test_tile_selection_equals_the_steps(shape, ivc_ratio, thumbnail_ratio, budget, data):
    rows, cols, side = shape
    n = side * side
    L = (rows * cols + 1) * n
    cos = torch.tensor(data.draw(score_lists(L)), dtype=torch.float64)
    sin = torch.tensor(data.draw(score_lists(L)), dtype=torch.float64)
    thumb = torch.tensor(data.draw(score_lists(n)), dtype=torch.float64)
    seeds = data.draw(st.lists(st.integers(0, n - 1), max_size=4))
    check_selection(rows, cols, side, cos, sin, thumb, seeds, ivc_ratio, thumbnail_ratio, budget)


@pytest.mark.parametrize("side", [1, 2, 16])
def test_tile_selection_needs_a_thumbnail(side):
    layout = TileLayout(1, 1, side)
    n = side * side
    with pytest.raises(ValueError):
        tile_selection(layout, torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.tensor([0]))
