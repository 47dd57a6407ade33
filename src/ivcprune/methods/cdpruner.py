"""CDPruner (Zhang et al., NeurIPS 2025): before the LLM, keep the visual tokens of the greedy MAP of a
determinantal point process conditioned on the instruction (diverse and relevant)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..families import Adapter
from ..rules import cdpruner_select
from ..runtime import Needs, SpanInput, SpanSelection
from .base import PruningMethod, check_ratio


@dataclass(repr=False, eq=False)
class CDPruner(PruningMethod):
    """CDPruner: per visual span, the DPP kernel ``diag(r) S diag(r)`` with ``S`` the cosine similarity of the
    projected visual embeddings and ``r`` each token's min-max normalised relevance to the instruction, and
    the ``budget`` share chosen by fast greedy MAP inference; pruned before the LLM's first layer.

    Defaults from its code (Theia-4869/CDPruner): layer 0, 128 of LLaVA-1.5's 576 tokens (its scripts use 64 /
    128 / 192), relevance used as is (``theta`` unset; the paper's ``exp(alpha r)`` weighting with ``theta``
    in [0, 1)). Difference: the release's LLaVA relevance compares CLIP image features with CLIP's *text*
    tower (negated cosine); the text tower is not part of a LLaVA / Qwen / InternVL checkpoint, so here the
    relevance is the mean cosine between each visual embedding and the embeddings of the prompt's text after
    the span, both as the LLM receives them (one embedding space, no negation).
    """

    name = "cdpruner"
    label = "CDPruner"
    min_layer = 0

    theta: float | None = field(default=None, metadata={"help": "CDPruner: the paper's relevance trade-off in "
                                                                "[0, 1) (unset: relevance used as is)"})
    query_offset: int = field(default=2, metadata={"help": "text queries start this many tokens after a span"})

    def __post_init__(self):
        super().__post_init__()
        if self.theta is not None:
            check_ratio("theta", self.theta, allow_zero=True)
            if self.theta >= 1:
                raise ValueError(f"theta must be in [0, 1), got {self.theta}")

    def needs(self, config: dict[str, Any]) -> Needs:
        return Needs(hidden=True)

    def default_layer(self, adapter: Adapter) -> int:
        return 0

    def default_budget(self, adapter: Adapter) -> float:
        return 128 / 576

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        hidden = span.row.hidden
        visual = hidden[span.local_start : span.local_start + span.length]
        text = hidden[span.text_after(config["query_offset"]).to(hidden.device)]
        kept = cdpruner_select(visual, text, self.target_count(span.length, config), theta=config["theta"],
                               negate=False).to("cpu")
        return SpanSelection(kept, {"dpp": kept})
