"""DivPrune (Alvar et al., CVPR 2025): before the LLM, keep the most diverse visual tokens (greedy
max-min cosine distance on the projected visual embeddings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..families import Adapter
from ..rules import DIVPRUNE_RATIO, divprune_select
from ..runtime import Needs, SpanInput, SpanSelection
from .base import PruningMethod


@dataclass(repr=False, eq=False)
class DivPrune(PruningMethod):
    """DivPrune: per visual span, the ``budget`` share picked greedily for diversity (first the token whose
    nearest neighbour is farthest, then each time the token farthest from those picked) on the embeddings the
    LLM receives; pruned before its first layer (``layer=0``; a later layer ranks that layer's input instead).

    Defaults from its code (vbdi/divprune, ``run_Divprune.sh``): layer 0, 9.8% kept. Kept tokens keep their
    original positions (as in the release).
    """

    name = "divprune"
    label = "DivPrune"
    min_layer = 0

    def needs(self, config: dict[str, Any]) -> Needs:
        return Needs(hidden=True)

    def default_layer(self, adapter: Adapter) -> int:
        return 0

    def default_budget(self, adapter: Adapter) -> float:
        return DIVPRUNE_RATIO

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        emb = span.row.hidden[span.local_start : span.local_start + span.length]
        kept = divprune_select(emb, self.target_count(span.length, config)).to("cpu")
        return SpanSelection(kept, {"diverse": kept})
