"""Tiled images (InternVL's dynamic 448-pixel tiles plus a thumbnail) as small pure functions.

A tiled image's span is ``rows x cols`` high-resolution tiles in row-major order, each ``side x side``
tokens (no separators), followed by the thumbnail: the whole image at one tile's resolution, ``side x side``
tokens. One tile alone has no thumbnail. Nothing here knows about models: indices are local to the span
(``0 .. L-1``); ties in every ranking go to the lower index.

The authors' tile scheme (``METHOD.md``, "InternVL tiles") is :func:`tile_selection`; the pieces it is
made of (:func:`per_tile_topk`, :func:`thumbnail_to_mosaic`) are what the tests check against
brute-force re-implementations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .selection import ratio_count


@dataclass(frozen=True)
class TileLayout:
    """``rows x cols`` high-resolution tiles of ``side x side`` tokens, then a thumbnail when there are
    several tiles."""

    rows: int
    cols: int
    side: int = 16

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1 or self.side < 1:
            raise ValueError(f"a tile layout needs rows, cols, side >= 1, got {self}")

    @property
    def tile_tokens(self) -> int:
        return self.side * self.side

    @property
    def tiles(self) -> int:
        """High-resolution tiles (the thumbnail not counted)."""
        return self.rows * self.cols

    @property
    def thumbnail(self) -> bool:
        return self.tiles > 1

    @property
    def blocks(self) -> int:
        """Blocks of ``tile_tokens`` in the span: the tiles and the thumbnail."""
        return self.tiles + int(self.thumbnail)

    @property
    def length(self) -> int:
        return self.blocks * self.tile_tokens

    @property
    def thumbnail_start(self) -> int:
        """Span index of the thumbnail's first token (the span's length when there is none)."""
        return self.tiles * self.tile_tokens if self.thumbnail else self.length


def tile_count_grids(tiles: int) -> list[tuple[int, int]]:
    """Every ``(rows, cols)`` with ``rows * cols == tiles``, by rows."""
    return [(r, tiles // r) for r in range(1, tiles + 1) if tiles % r == 0]


def match_tiling(tiles: torch.Tensor, thumbnail: torch.Tensor, cell: int = 8) -> tuple[int, int]:
    """``(rows, cols)`` of the tile grid that ``tiles`` ``(T, C, H, W)`` (row-major) were cut from, given the
    ``thumbnail`` ``(C, H, W)`` of the same image: the grid whose mosaic, shrunk to one tile, is closest to
    the thumbnail (both compared at ``cell x cell``). Ties (e.g. a uniform image) go to the squarest grid,
    then to fewer rows."""
    T = tiles.shape[0]
    C = tiles.shape[1]
    pooled = torch.nn.functional.adaptive_avg_pool2d(tiles.float(), cell)  # (T, C, cell, cell)
    thumb = torch.nn.functional.adaptive_avg_pool2d(thumbnail.float()[None], cell)[0]
    best, best_key = (1, T), None
    for rows, cols in tile_count_grids(T):
        mosaic = pooled.reshape(rows, cols, C, cell, cell).permute(2, 0, 3, 1, 4)
        mosaic = mosaic.reshape(1, C, rows * cell, cols * cell)
        shrunk = torch.nn.functional.avg_pool2d(mosaic, (rows, cols))[0]
        err = float((shrunk - thumb).pow(2).mean())
        key = (round(err, 6), abs(rows - cols), rows)
        if best_key is None or key < best_key:
            best, best_key = (rows, cols), key
    return best


def per_tile_topk(scores: torch.Tensor, tile_tokens: int, k: int) -> torch.Tensor:
    """The ``k`` best-scored tokens of every block of ``tile_tokens`` consecutive tokens (span indices,
    block after block, each block's in rank order)."""
    L = scores.numel()
    if L % tile_tokens:
        raise ValueError(f"{L} scores are not whole tiles of {tile_tokens} tokens")
    k = max(0, min(int(k), tile_tokens))
    order = torch.sort(scores.reshape(-1, tile_tokens), dim=1, descending=True, stable=True).indices[:, :k]
    offsets = torch.arange(0, L, tile_tokens, device=scores.device).unsqueeze(1)
    return (order + offsets).reshape(-1)


def thumbnail_to_mosaic(thumb: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Span indices of the high-resolution tokens covering the image region of each thumbnail token.

    The tiles form a mosaic of ``rows*side x cols*side`` tokens; thumbnail token ``(r, c)`` of its
    ``side x side`` grid covers the ``rows x cols`` block of mosaic tokens from ``(r*rows, c*cols)``.
    ``thumb`` holds thumbnail-local indices (``0 .. side²-1``); the result is sorted and unique."""
    s = layout.side
    thumb = thumb.reshape(-1).long()
    dr = torch.arange(layout.rows, device=thumb.device)
    dc = torch.arange(layout.cols, device=thumb.device)
    mr = ((thumb // s) * layout.rows)[:, None, None] + dr[None, :, None]  # mosaic rows
    mc = ((thumb % s) * layout.cols)[:, None, None] + dc[None, None, :]  # mosaic cols
    tile = (mr // s) * layout.cols + mc // s
    index = tile * layout.tile_tokens + (mr % s) * s + mc % s
    return torch.unique(index.reshape(-1))


@dataclass
class TileSelection:
    kept: torch.Tensor  # sorted span indices
    groups: dict[str, torch.Tensor]


def tile_selection(
    layout: TileLayout,
    cos_scores: torch.Tensor,
    sin_scores: torch.Tensor,
    thumb_scores: torch.Tensor,
    seeds: torch.Tensor,
    *,
    ivc_ratio: float = 0.1,
    thumbnail_ratio: float = 0.5,
    budget: float = 0.5,
    target: int | None = None,
) -> TileSelection:
    """The authors' InternVL selection for a tiled span (``layout.thumbnail`` must be true).

    Args:
        cos_scores, sin_scores: ``(L,)`` IVC statistics of the whole span.
        thumb_scores: ``(side²,)`` stage-2 foreground scores of the thumbnail's tokens.
        seeds: thumbnail-local indices of the semantic seeds.
        ivc_ratio: share of every block (tiles and thumbnail) kept by cos, and again by sin.
        thumbnail_ratio: the thumbnail keeps its IVC tokens plus its best foreground tokens up to this share.
        budget: share of the span to keep in the end.
        target: tokens to keep in the end (instead of ``budget``).

    Steps: every block keeps its top IVC tokens; the thumbnail adds its best non-IVC foreground tokens
    until ``thumbnail_ratio`` of it; those foreground tokens are mapped onto the tiles
    (:func:`thumbnail_to_mosaic`); the seeds are kept. Below the budget, the rest is filled from the
    thumbnail by foreground score; above it, the lowest span indices are kept (the thumbnail, last in the
    span, goes first), as the authors' release does.
    """
    if not layout.thumbnail:
        raise ValueError("tile_selection needs several tiles and a thumbnail; score a single tile as one span")
    n = layout.tile_tokens
    t0 = layout.thumbnail_start
    if cos_scores.numel() != layout.length or sin_scores.numel() != layout.length or thumb_scores.numel() != n:
        raise ValueError(f"{layout} needs {layout.length} cos and sin scores and {n} thumbnail scores, got "
                         f"{cos_scores.numel()}, {sin_scores.numel()}, {thumb_scores.numel()}")
    seeds = torch.unique(seeds.reshape(-1).long())
    if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= n):
        raise ValueError(f"seeds must be thumbnail indices in [0, {n}), got {seeds.tolist()}")
    k = ratio_count(ivc_ratio, n)
    ivc_cos = per_tile_topk(cos_scores, n, k)
    ivc_sin = per_tile_topk(sin_scores, n, k)
    thumb_ivc = torch.unique(torch.cat([ivc_cos, ivc_sin]))
    thumb_ivc = thumb_ivc[thumb_ivc >= t0] - t0
    ranked = torch.sort(thumb_scores, descending=True, stable=True).indices  # thumbnail-local, best first
    room = max(0, ratio_count(thumbnail_ratio, n) - thumb_ivc.numel())
    fg = ranked[~torch.isin(ranked, thumb_ivc)][:room]
    mosaic = thumbnail_to_mosaic(fg, layout)
    priority = torch.unique(torch.cat([ivc_cos, ivc_sin, fg + t0, mosaic, seeds + t0]))
    if target is None:
        target = max(1, ratio_count(budget, layout.length))
    if priority.numel() < target:
        fill = ranked[~torch.isin(ranked + t0, priority)][: target - priority.numel()] + t0
        kept = torch.unique(torch.cat([priority, fill]))
    else:
        fill = priority.new_zeros(0)
        kept = priority[:target]
    groups = {"ivc_cos": ivc_cos, "ivc_sin": ivc_sin, "seed": seeds + t0, "foreground": fg + t0,
              "tile_foreground": mosaic, "fill": fill}
    return TileSelection(kept, {name: g[torch.isin(g, kept)] for name, g in groups.items()})


# -- AnyRes images (LLaVA-OneVision): a base view, then an unpadded high-resolution mosaic with row newlines ----
@dataclass(frozen=True)
class AnyResLayout:
    """An AnyRes image span: the base view (the whole image at one tile's resolution, ``side x side`` tokens,
    no separators), then the high-resolution mosaic of the image's tiles, unpadded to the
    image's aspect ratio (and downsampled when too large) to ``rows x cols`` tokens, each row followed by a
    newline token. An untiled image (``tiled=False``: an image of a multi-image prompt) is its base view and
    one newline. (A sliver of an image may unpad to rows without columns, or to nothing: ``rows == 0``.)

    Two coordinate systems: *span* indices (``0 .. length-1``, newlines included, as the tokens sit in the
    prompt) and *content* indices (``0 .. content-1``, newlines left out: the base view, then the mosaic
    row-major), which is what pruning methods see.
    """

    side: int
    rows: int = 0
    cols: int = 0
    tiled: bool = True  # False: an image of a multi-image prompt (base view and one newline)

    def __post_init__(self):
        if self.side < 1 or self.rows < 0 or self.cols < 0 or (self.rows == 0 and self.cols) or \
                (not self.tiled and self.rows):
            raise ValueError(f"an AnyRes layout needs side >= 1, rows >= 0, cols >= 0 (0 without rows) and no rows "
                             f"when untiled, got {self}")

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "rows": self.rows, "cols": self.cols, "tiled": self.tiled}

    @property
    def base_tokens(self) -> int:
        return self.side * self.side

    @property
    def mosaic(self) -> bool:
        """Whether the span has mosaic tokens (a sliver of an image may unpad to none)."""
        return self.rows * self.cols > 0

    @property
    def mosaic_tokens(self) -> int:
        return self.rows * self.cols

    @property
    def content(self) -> int:
        """Tokens without the newlines (base view + mosaic)."""
        return self.base_tokens + self.mosaic_tokens

    @property
    def newlines(self) -> int:
        return self.rows if self.tiled else 1

    @property
    def length(self) -> int:
        return self.content + self.newlines

    def newline_index(self) -> torch.Tensor:
        """Span indices of the newline tokens (sorted)."""
        if not self.tiled:
            return torch.tensor([self.base_tokens])
        return self.base_tokens + torch.arange(self.rows) * (self.cols + 1) + self.cols

    def content_index(self) -> torch.Tensor:
        """Span index of every content token, in content order."""
        base = torch.arange(self.base_tokens)
        if not self.mosaic:
            return base
        r, c = torch.arange(self.rows).repeat_interleave(self.cols), torch.arange(self.cols).repeat(self.rows)
        return torch.cat([base, self.base_tokens + r * (self.cols + 1) + c])


def unpadded_mosaic(image_hw: tuple[int, int], tiles: tuple[int, int], side: int, max_tiles: int) -> tuple[int, int]:
    """``(rows, cols)`` of mosaic tokens of an image of ``image_hw`` pixels cut into a ``tiles`` grid of
    ``side x side``-token tiles: the padding bands of the letterboxed mosaic removed (the image fitted to the
    grid's aspect ratio, centred), then, when the rest exceeds ``max_tiles`` tiles' tokens by more than 10%
    in scale, shrunk by that scale (floored), as LLaVA-OneVision's ``anyres_max_N`` does."""
    h, w = image_hw
    ch, cw = tiles[0] * side, tiles[1] * side
    if w / h > cw / ch:  # wider than the grid: bands above and below
        new = int(round(h * (cw / w), 7))
        ch -= 2 * ((ch - new) // 2)
    else:
        new = int(round(w * (ch / h), 7))
        cw -= 2 * ((cw - new) // 2)
    ratio = math.sqrt(ch * cw / (max_tiles * side * side))
    if ratio > 1.1:
        ch, cw = int(ch // ratio), int(cw // ratio)
    return (ch, cw) if ch else (0, 0)


def mosaic_cells(layout: AnyResLayout) -> torch.Tensor:
    """For each mosaic token (content order), the base-view token covering its centre: both views cover the
    whole image, so mosaic token ``(i, j)`` of ``rows x cols`` lies in base cell
    ``(floor((i + 1/2) side / rows), floor((j + 1/2) side / cols))``."""
    s = layout.side
    if not layout.mosaic:
        return torch.zeros(0, dtype=torch.long)
    r = ((2 * torch.arange(layout.rows) + 1) * s) // (2 * layout.rows)
    c = ((2 * torch.arange(layout.cols) + 1) * s) // (2 * layout.cols)
    return (r[:, None] * s + c[None, :]).reshape(-1)


def base_to_mosaic(base: torch.Tensor, layout: AnyResLayout) -> torch.Tensor:
    """Content indices of the mosaic tokens whose centre lies in one of the ``base`` view tokens (base-local
    indices ``0 .. side²-1``); sorted. Every mosaic token belongs to exactly one base token."""
    if not layout.mosaic:
        return torch.zeros(0, dtype=torch.long)
    hit = torch.isin(mosaic_cells(layout), base.reshape(-1).long())
    return hit.nonzero().squeeze(1) + layout.base_tokens


def anyres_selection(
    layout: AnyResLayout,
    cos_scores: torch.Tensor,
    sin_scores: torch.Tensor,
    base_scores: torch.Tensor,
    seeds: torch.Tensor,
    *,
    ivc_ratio: float = 0.1,
    target: int,
) -> TileSelection:
    """IVC-Prune on an AnyRes image with a mosaic, by analogy with InternVL's tile scheme (content indices).

    Args:
        cos_scores, sin_scores: ``(content,)`` IVC statistics of the base view and the mosaic.
        base_scores: ``(side²,)`` stage-2 foreground scores of the base view's tokens.
        seeds: base-local indices of the semantic seeds.
        ivc_ratio: share of each view (base, mosaic) kept by cos, and again by sin, each view ranked on its own.
        target: content tokens to keep.

    Steps: each view keeps its top IVC tokens; the seeds are kept; the base view's best non-IVC foreground
    tokens are kept, each with the mosaic tokens it covers (:func:`base_to_mosaic`), as many as fit the
    target (at most ``target / content`` of the base view, InternVL's thumbnail share); the rest is filled by
    foreground score over both views (a mosaic token scores as the base token covering it; ties to the lower
    index). When the IVC tokens and seeds alone exceed the target, the lowest indices of them are kept."""
    if not layout.mosaic:
        raise ValueError("anyres_selection needs a mosaic; score a base view alone as one span")
    n, m = layout.base_tokens, layout.mosaic_tokens
    if cos_scores.numel() != layout.content or sin_scores.numel() != layout.content or base_scores.numel() != n:
        raise ValueError(f"{layout} needs {layout.content} cos and sin scores and {n} base scores, got "
                         f"{cos_scores.numel()}, {sin_scores.numel()}, {base_scores.numel()}")
    seeds = torch.unique(seeds.reshape(-1).long())
    if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= n):
        raise ValueError(f"seeds must be base-view indices in [0, {n}), got {seeds.tolist()}")
    target = max(1, min(int(target), layout.content))

    def view_topk(scores: torch.Tensor) -> torch.Tensor:
        kb, km = ratio_count(ivc_ratio, n), ratio_count(ivc_ratio, m)
        top_b = torch.sort(scores[:n], descending=True, stable=True).indices[:kb]
        top_m = torch.sort(scores[n:], descending=True, stable=True).indices[:km] + n
        return torch.cat([top_b, top_m])

    ivc_cos, ivc_sin = view_topk(cos_scores.reshape(-1)), view_topk(sin_scores.reshape(-1))
    chosen = torch.zeros(layout.content, dtype=torch.bool)
    chosen[ivc_cos] = chosen[ivc_sin] = True
    chosen[seeds] = True
    if int(chosen.sum()) >= target:
        kept = chosen.nonzero().squeeze(1)[:target]
        fg = mosaic = fill = kept.new_zeros(0)
    else:
        ranked = torch.sort(base_scores.reshape(-1), descending=True, stable=True).indices  # base-local, best first
        cells = mosaic_cells(layout)
        by_cell = torch.sort(cells, stable=True).indices + n  # mosaic tokens grouped by base cell
        ends = torch.cumsum(torch.bincount(cells, minlength=n), 0).tolist()
        room = max(0, ratio_count(target / layout.content, n) - int(chosen[:n].sum()))
        picked, count = [], int(chosen.sum())
        for b in ranked.tolist():
            if len(picked) >= room:
                break
            if chosen[b]:
                continue
            block = by_cell[(ends[b - 1] if b else 0) : ends[b]]
            new = 1 + int((~chosen[block]).sum())
            if count + new > target:
                break
            chosen[b] = True
            chosen[block] = True
            picked.append(b)
            count += new
        fg = torch.tensor(picked, dtype=torch.long)
        mosaic = base_to_mosaic(fg, layout)
        score = torch.cat([base_scores.reshape(-1).float(), base_scores.reshape(-1).float()[cells]])
        order = torch.sort(score, descending=True, stable=True).indices
        fill = order[~chosen[order]][: target - int(chosen.sum())]
        chosen[fill] = True
        kept = chosen.nonzero().squeeze(1)
    groups = {"ivc_cos": ivc_cos, "ivc_sin": ivc_sin, "seed": seeds, "foreground": fg,
              "tile_foreground": mosaic, "fill": torch.sort(fill).values}
    return TileSelection(kept, {name: g[torch.isin(g, kept)] for name, g in groups.items()})
