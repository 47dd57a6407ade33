"""DART (Wen et al., EMNLP 2025, "Stop Looking for Important Tokens ...: Duplication Matters More"): before
layer K, a few pivot tokens (largest key norms) each keep the visual tokens least similar to them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..families import Adapter
from ..rules import DART_IMAGE_PIVOTS, DART_LAYER, DART_MODES, DART_TEXT_PIVOTS, dart_pivot_scores, dart_select
from ..runtime import Needs, SpanInput, SpanSelection
from .base import PruningMethod, check_choice


@dataclass(repr=False, eq=False)
class DART(PruningMethod):
    """DART: pivots are the visual tokens (and text tokens after the span) with the largest L1 norm of layer
    K-1's keys (rotary applied, all heads); each pivot in turn keeps the visual tokens least cosine-similar to
    it on the hidden states entering layer K through the decoder's final norm, until the ``budget`` share.

    Defaults from its code (ZichenWen1/DART, LLaVA scripts): K=2, 4 image and 4 text pivots, 128 of 576
    tokens kept (``reduction_ratio`` 0.778). ``mode="exact"`` keeps exactly the budget and visits pivots in
    position order; ``mode="authors"`` reproduces the release's count (pivots on top of the per-pivot
    quotas, e.g. 132 for 128) and its visiting order. Kept tokens keep their original positions.
    """

    name = "dart"
    label = "DART"

    pivots: int = field(default=DART_IMAGE_PIVOTS, metadata={"help": "DART: image pivot tokens"})
    text_pivots: int = field(default=DART_TEXT_PIVOTS, metadata={"help": "DART: text pivot tokens"})
    dart_mode: str = field(default="exact", metadata={"choices": DART_MODES,
                                                      "help": "DART: exact budget, or the release's count"})
    def __post_init__(self):
        super().__post_init__()
        check_choice("dart_mode", self.dart_mode, DART_MODES)
        for name in ("pivots", "text_pivots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")

    def needs(self, config: dict[str, Any]) -> Needs:
        return Needs(hidden=True, hidden_norm="final", keys=True)

    def default_layer(self, adapter: Adapter) -> int:
        return DART_LAYER

    def default_budget(self, adapter: Adapter) -> float:
        return 128 / 576

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        row = span.row
        part = slice(span.local_start, span.local_start + span.length)
        text = span.text_after(0)  # the release's text pivots: any token after the image
        scores = dart_pivot_scores(row.keys)  # (length,)
        kept = dart_select(
            row.hidden[part], self.target_count(span.length, config),
            num_pivots=min(config["pivots"], span.length), pivot_scores=scores[part],
            text_tokens=row.hidden[text.to(row.hidden.device)] if text.numel() else None,
            text_pivot_scores=scores[text] if text.numel() else None,
            num_text_pivots=min(config["text_pivots"], int(text.numel())), mode=config["dart_mode"],
            span_start=span.start,
        ).to("cpu")
        return SpanSelection(kept, {"dart": kept})
