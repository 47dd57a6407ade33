"""A ranking method with IVC-Prune's coordinate tokens kept first ("X+IVC", as in the paper's FastV+IVC
and PDrop+IVC): the span's IVC tokens (top ``ivc_ratio`` by cos score and by sin score) are kept, and
the method's ranking fills the rest of the same budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import selection as sel
from ..runtime import SpanInput, SpanSelection
from .base import RankedMethod, check_ratio
from .ivc import ivc_tokens


def with_ivc(base: type[RankedMethod]) -> type[RankedMethod]:
    """``base`` with the IVC tokens of every span always kept inside its budget (at every stage; a budget
    smaller than the IVC tokens is spent on the cos and sin rankings in turn)."""

    @dataclass(repr=False, eq=False)
    class WithIVC(base):
        ivc_ratio: float = field(default=0.1, metadata={"help": "share of each span kept by cos, and by sin"})

        def __post_init__(self):
            super().__post_init__()
            check_ratio("ivc_ratio", self.ivc_ratio, allow_zero=True)

        def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
            count = self.keep_count(span, config)
            alive = span.alive_index
            cos_idx, sin_idx = (i[torch.isin(i, alive)] for i in ivc_tokens(span, config["ivc_ratio"]))
            # more IVC tokens than the budget: the cos and sin rankings take turns until it is spent
            cos_idx, sin_idx = sel.interleave_rankings([cos_idx, sin_idx], count)
            ivc = torch.unique(torch.cat([cos_idx, sin_idx]))
            ranked = self.ranking(span, config)
            fill = ranked[~torch.isin(ranked, ivc)][: max(0, count - ivc.numel())]
            kept = torch.unique(torch.cat([ivc, fill]))
            groups = {"ivc_cos": cos_idx, "ivc_sin": sin_idx, self.stage_group(span): fill.sort().values}
            return SpanSelection(kept, groups)

    WithIVC.__name__ = WithIVC.__qualname__ = f"{base.__name__}WithIVC"
    WithIVC.name = f"{base.name}+ivc"
    WithIVC.label = f"{base.label}+IVC"
    WithIVC.__doc__ = f"{base.label} with IVC-Prune's coordinate tokens kept first ({__name__})."
    return WithIVC
