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

from dataclasses import dataclass

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
