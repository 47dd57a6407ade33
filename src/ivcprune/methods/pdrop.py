"""PyramidDrop (Xing et al., CVPR 2025): visual tokens dropped in stages; at the start of each stage the
remaining visual tokens are ranked by the last instruction token's attention and a share ``stage_ratio``
of them is kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..families import Adapter
from ..runtime import Needs, SpanInput
from .base import RankedMethod, check_ratio


def default_stages(depth: int) -> tuple[int, ...]:
    """Stage layers at a quarter, half and three quarters of the depth (8/16/24 of LLaVA-1.5-7B's 32)."""
    return tuple(sorted({max(1, min(depth - 1, round(depth * f))) for f in (0.25, 0.5, 0.75)}))


@dataclass(repr=False, eq=False)
class PDrop(RankedMethod):
    """PyramidDrop: before each stage layer, keep ``stage_ratio`` of the visual tokens still there, ranked
    by the last prompt token's attention in that layer (its own queries and keys on its input, as the
    release computes it), heads averaged.

    Defaults from its code (Cooperx521/PyramidDrop, LLaVA-1.5 scripts): stages 8/16/24 of 32 layers
    (quarters of the depth elsewhere), λ = 0.5, so 50% / 25% / 12.5% of each image remain. ``budget``
    (the final share) sets λ = budget^(1/stages) instead; ``layer`` moves the first stage and keeps the
    spacing (dropping stages past the last layer). Differences from the release: kept tokens keep their
    original positions (the release renumbers them), every visual span is ranked on its own, and the KV
    cache of every layer holds only the tokens kept in the end (the release keeps each stage's tokens in its
    layers' caches): prefill is the release's, decoding sees fewer tokens in early layers.
    """

    name = "pdrop"
    label = "PDrop"

    stage_ratio: float = field(default=0.5, metadata={"help": "PDrop: share of the remaining visual tokens kept "
                                                              "at each stage (lambda)"})
    stage_layers: str | None = field(default=None, metadata={"help": "PDrop: stage layers, e.g. 8,16,24 "
                                                                     "(default: quarters of the depth)"})

    def __post_init__(self):
        super().__post_init__()
        check_ratio("stage_ratio", self.stage_ratio)
        if self.stage_layers is not None:
            self._parse_layers(self.stage_layers)

    @staticmethod
    def _parse_layers(text) -> tuple[int, ...]:
        try:
            layers = tuple(int(x) for x in (text.split(",") if isinstance(text, str) else text))
        except (TypeError, ValueError):
            raise ValueError(f"stage_layers must be comma-separated layer indices, got {text!r}") from None
        if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1:
            raise ValueError(f"stage_layers must be increasing layer indices >= 1, got {text!r}")
        return layers

    def _stages(self, adapter: Adapter) -> tuple[int, ...]:
        n = adapter.num_layers
        if self.stage_layers is not None:
            stages = self._parse_layers(self.stage_layers)
        else:
            stages = default_stages(n)
            if self.layer is not None:  # the first stage moved, the spacing kept (stages past the last layer go)
                stages = tuple(s - stages[0] + self.layer for s in stages if s - stages[0] + self.layer < n)
                stages = stages or (self.layer,)
        if stages[-1] >= n:
            raise ValueError(f"PDrop stages {stages} are out of range for a model with {n} decoder layers")
        return stages

    def default_layer(self, adapter: Adapter) -> int:
        return self._stages(adapter)[0]

    def default_budget(self, adapter: Adapter) -> float:
        return self.stage_ratio ** len(self._stages(adapter))

    def resolve(self, adapter: Adapter) -> dict[str, Any]:
        stages = self._stages(adapter)
        cfg = super().resolve(adapter)
        ratio = self.budget ** (1 / len(stages)) if self.budget is not None else self.stage_ratio
        cfg.update(stages=list(stages), layer=stages[0], stage_ratio=ratio)
        return cfg

    def stages(self, config: dict[str, Any]) -> list[int]:
        return config["stages"]

    def needs(self, config: dict[str, Any]) -> Needs:
        return Needs(attention=True, attention_at=0)

    def keep_count(self, span: SpanInput, config: dict[str, Any]) -> int:
        step = config["stages"].index(span.stage) + 1
        if config.get("budget_tokens"):  # the final count given: the same share dropped at each stage
            ratio = (min(config["budget_tokens"], span.length) / span.length) ** (1 / len(config["stages"]))
        else:
            ratio = config["stage_ratio"]
        return max(1, int(span.length * ratio**step))

    def scores(self, span: SpanInput, config: dict[str, Any]) -> torch.Tensor:
        return span.row.attention[span.local_start : span.local_start + span.length]
