"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"): before layer K, keep the
visual tokens the last prompt token attends to most in layer K-1 (attention averaged over heads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..families import Adapter
from ..runtime import Needs, SpanInput
from .base import RankedMethod


@dataclass(repr=False, eq=False)
class FastV(RankedMethod):
    """FastV: rank each visual span by the last prompt token's attention in layer K-1 and keep the ``budget``
    share (the paper's R is ``1 - budget``).

    Defaults from the paper and its code (pkunlp-icler/FastV): K=2, R=50%. The attention row is computed
    from layer K-1's queries and keys (rotary applied), so the model keeps its attention implementation
    (sdpa, flash) instead of materialising attention weights. Kept tokens keep their original positions, as
    in FastV's code. Differences: the release ranks one image per prompt and leaves the KV caches of layers
    below K whole; here every visual span gets its own budget and every layer's cache is cut (as for every
    method of this library), which changes decoding only.
    """

    name = "fastv"
    label = "FastV"

    def needs(self, config: dict[str, Any]) -> Needs:
        return Needs(attention=True, attention_at=-1)

    def default_layer(self, adapter: Adapter) -> int:
        return 2

    def scores(self, span: SpanInput, config: dict[str, Any]) -> torch.Tensor:
        return span.row.attention[span.local_start : span.local_start + span.length]
