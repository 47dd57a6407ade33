"""What a prefill kept: the pruning report users and tools read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .tiles import TileLayout

# Kinds of kept tokens, in the order used for colouring (first match wins); ``tile_foreground`` (thumbnail
# foreground mapped onto the tiles) and ``fill`` (the budget's remainder) come from InternVL's tile scheme.
GROUPS = ("ivc_cos", "ivc_sin", "seed", "foreground", "tile_foreground", "fill", "random")
GROUPS += ("structure",)  # structure tokens inside a span (LLaVA-OneVision's newlines), always kept


@dataclass
class SpanReport:
    """One visual span of the prompt (an image or a video)."""

    index: int
    kind: str  # "image" or "video"
    start: int  # prompt position of the span's first token
    length: int  # visual tokens in the span (L)
    kept: int  # visual tokens that exist from layer K on
    groups: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> prompt positions
    grid: tuple[int, int, int] | None = None  # (t, h, w) token grid after merging, when known
    tiles: TileLayout | None = None  # a tiled image (InternVL): rows x cols tiles of side x side, then a thumbnail
    layout: Any = None  # a family's own layout (LLaVA-OneVision: tiles.AnyResLayout)

    def positions(self, group: str) -> torch.Tensor:
        return self.groups.get(group, torch.zeros(0, dtype=torch.long))

    @property
    def ivc_cos(self) -> torch.Tensor:
        return self.positions("ivc_cos")

    @property
    def ivc_sin(self) -> torch.Tensor:
        return self.positions("ivc_sin")

    @property
    def seeds(self) -> torch.Tensor:
        return self.positions("seed")

    @property
    def foreground(self) -> torch.Tensor:
        """Tokens kept for their foreground score beyond the IVC tokens and seeds (the fill)."""
        return self.positions("foreground")

    fill = foreground

    @property
    def kept_count(self) -> int:
        return self.kept

    @property
    def kept_ratio(self) -> float:
        return self.kept / self.length if self.length else 1.0

    def labels(self) -> list[str]:
        """Per-token kind over the span, ``"pruned"`` for tokens that were removed."""
        out = ["pruned"] * self.length
        for group in reversed(GROUPS):
            for p in self.positions(group).tolist():
                out[p - self.start] = group
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "start": self.start,
            "length": self.length,
            "kept": self.kept,
            "kept_ratio": round(self.kept_ratio, 6),
            "grid": list(self.grid) if self.grid else None,
            "tiles": ({"rows": self.tiles.rows, "cols": self.tiles.cols, "side": self.tiles.side}
                      if self.tiles else None),
            "groups": {k: v.tolist() for k, v in self.groups.items()},
            **({"layout": self.layout.to_dict()} if hasattr(self.layout, "to_dict") else {}),
        }


@dataclass
class PruneReport:
    """What one row of the last prefill kept, in the row's own coordinates (its tokens without padding).

    ``kept`` is the sorted 1-D LongTensor of prompt positions that exist from layer ``layer`` on.
    When nothing was pruned (no visual span, or a budget that keeps everything) ``pruned`` is False
    and ``reason`` says why.
    """

    method: str
    layer: int | None
    seq_len: int
    kept: torch.Tensor
    spans: list[SpanReport] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    selection_ms: float = 0.0
    stages: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, kept positions) per cut

    @property
    def pruned(self) -> bool:
        return self.kept.numel() < self.seq_len

    @property
    def visual_tokens(self) -> int:
        return sum(s.length for s in self.spans)

    @property
    def visual_kept(self) -> int:
        return sum(s.kept for s in self.spans)

    @property
    def kept_visual_ratio(self) -> float:
        return self.visual_kept / self.visual_tokens if self.visual_tokens else 1.0

    def summary(self) -> str:
        if not self.spans:
            return f"{self.method}: nothing pruned ({self.reason})"
        head = (
            f"{self.method} at layer {self.layer}: kept {self.visual_kept}/{self.visual_tokens} visual tokens "
            f"({100 * self.kept_visual_ratio:.1f}%), sequence {self.seq_len} -> {self.kept.numel()} from layer "
            f"{self.layer} on"
        )
        lines = [head]
        for s in self.spans:
            counts = ", ".join(f"{k} {v.numel()}" for k, v in s.groups.items())
            lines.append(f"  {s.kind} {s.index} @ {s.start}+{s.length}: kept {s.kept} ({counts})")
        if self.reason:
            lines.append(f"  note: {self.reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "layer": self.layer,
            "seq_len": self.seq_len,
            "kept_len": int(self.kept.numel()),
            "pruned": self.pruned,
            "visual_tokens": self.visual_tokens,
            "visual_kept": self.visual_kept,
            "kept_visual_ratio": round(self.kept_visual_ratio, 6),
            "selection_ms": round(self.selection_ms, 3),
            "stages": [[layer, int(kept.numel())] for layer, kept in self.stages],  # tokens from each cut on
            "reason": self.reason,
            "config": self.config,
            "spans": [s.to_dict() for s in self.spans],
            "kept": self.kept.tolist(),
        }
