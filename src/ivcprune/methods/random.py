"""Random pruning: the baseline every method should beat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..runtime import SpanInput, SpanSelection
from .base import PruningMethod


@dataclass(repr=False, eq=False)
class RandomPrune(PruningMethod):
    """Keep a uniformly random subset of each visual span (the budget's share of it).

    Reproducible: the same ``seed`` and prompt give the same selection, whatever the batch around it.
    """

    name = "random"
    label = "random"

    seed: int = field(default=0, metadata={"flag": "--random-seed", "help": "seed of --method random"})

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        gen = torch.Generator().manual_seed(config["seed"] * 1_000_003 + span.index)
        pick = torch.randperm(span.length, generator=gen)[: self.target_count(span.length, config)]
        return SpanSelection(pick.sort().values, {"random": pick})
