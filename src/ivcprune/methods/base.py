"""What every pruning method shares: the knobs K and budget, applying to a model, reports per row.

    pruner = IVCPrune(layer=16, budget=0.5)
    with pruner(model):
        model.generate(**inputs)
    pruner.last_reports   # one report per batch row
    pruner.last_report    # batch size 1: its only report

A method is a small dataclass: its fields are its knobs (checked in ``__post_init__``), :meth:`needs`
declares what the runtime must capture for it, :meth:`select` picks the tokens of one visual span. The
runtime (:mod:`ivcprune.runtime`) does all the cutting, identically for every method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

import torch

from .. import selection as sel
from ..families import Adapter, get_adapter
from ..report import PruneReport
from ..runtime import Needs, Pruner, SpanInput, SpanSelection

# Pruning layer K where the authors released a setting for a checkpoint's depth, per model family;
# other depths take the 7B's relative depth 16/28.
PAPER_LAYERS = {"qwen2_5_vl": {28: 16, 36: 22}, "qwen2_vl": {28: 16}, "llava": {32: 16}, "internvl": {32: 16}}
# relative depth of K at other depths: the paper's families at their own (16 of 32), the rest at Qwen2.5-VL's
RELATIVE_DEPTH = {"llava": 16 / 32, "internvl": 16 / 32}
# families the authors did not release, whose K follows a released family's table (by analogy, not validated)
LAYERS_BY_ANALOGY = {"qwen3_vl": "qwen2_5_vl", "qwen3_vl_moe": "qwen2_5_vl"}


def paper_layer(model_type: str, depth: int) -> int:
    """K of the paper's setting for this family and depth (the family's relative depth elsewhere, 16/28 by
    default, in [1, depth-1])."""
    table = PAPER_LAYERS.get(model_type) or PAPER_LAYERS.get(LAYERS_BY_ANALOGY.get(model_type, ""), {})
    if depth in table:
        return table[depth]
    return max(1, min(depth - 1, round(depth * RELATIVE_DEPTH.get(model_type, 16 / 28))))


def check_ratio(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    lo_ok = value >= 0 if allow_zero else value > 0
    if not (lo_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(repr=False, eq=False)
class PruningMethod:
    """Base class of pruning methods.

    Args:
        layer: K, the decoder layer before which visual tokens are pruned (layers ``0..K-1`` see every
            token). ``None``: the model's preset.
        budget: fraction of each visual span's tokens to keep, in (0, 1]. ``None``: the preset.
        budget_tokens: keep this many tokens per span instead of a fraction (overrides ``budget``).
    """

    name: ClassVar[str] = "base"
    label: ClassVar[str] = "base"
    min_layer: ClassVar[int] = 1  # 0: the method may act before the first decoder layer (on the LLM's input)

    layer: int | None = field(default=None, metadata={"help": "K: prune before this decoder layer"})
    budget: float | None = field(default=None, metadata={"help": "fraction of each image's tokens kept, in (0, 1]"})
    _: KW_ONLY
    budget_tokens: int | None = field(default=None, metadata={"help": "tokens kept per image (instead of --budget)"})
    _pruner: Pruner | None = field(default=None, init=False, compare=False)
    _reports: threading.local = field(default_factory=threading.local, init=False, compare=False)

    def __post_init__(self):
        layer = self.layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if layer is not None and layer < self.min_layer:
            why = "layer K-1 feeds the selection" if self.min_layer else "0 is before the first decoder layer"
            raise ValueError(f"layer (K) must be >= {self.min_layer}: {why}; got {layer}")
        check_ratio("budget", self.budget)
        bt = self.budget_tokens
        if bt is not None and (isinstance(bt, bool) or not isinstance(bt, int) or bt < 1):
            raise ValueError(f"budget_tokens must be a positive int, got {bt!r}")

    # -- reports -----------------------------------------------------------------------------------
    @property
    def last_reports(self) -> list[PruneReport] | None:
        """One report per batch row of the last prefill run *in this thread* (None before any)."""
        return getattr(self._reports, "value", None)

    @last_reports.setter
    def last_reports(self, reports: list[PruneReport] | None) -> None:
        self._reports.value = reports

    @property
    def last_report(self) -> PruneReport | None:
        """The report of the last prefill in this thread, which had batch size 1."""
        reports = self.last_reports
        if reports is None:
            return None
        if len(reports) != 1:
            raise ValueError(f"the last prefill had {len(reports)} rows: read last_reports (one report per row)")
        return reports[0]

    @last_report.setter
    def last_report(self, report: PruneReport | None) -> None:
        self.last_reports = None if report is None else [report]

    # -- applying --------------------------------------------------------------------------------
    def __call__(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[PruningMethod]:
        """``with method(model): ...`` applies the method inside the block and removes it after.

        The configuration is checked against the model right here (unsupported model, K out of range),
        before the block is entered."""
        with warnings.catch_warnings():  # resolved again, and warned about, when the block is entered
            warnings.simplefilter("ignore")
            self.resolve(get_adapter(model))
        return self._applied(model)

    @contextlib.contextmanager
    def _applied(self, model) -> Iterator[PruningMethod]:
        self.apply(model)
        try:
            yield self
        finally:
            self.remove()

    def apply(self, model: torch.nn.Module) -> PruningMethod:
        """Install the hooks on ``model`` until :meth:`remove` (for long-lived servers)."""
        if self._pruner is not None:
            raise RuntimeError(f"{self.name} is already applied to a model; call remove() first")
        adapter = get_adapter(model)
        self._pruner = Pruner(self, model, self.resolve(adapter), self._set_reports)
        return self

    def _set_reports(self, reports: list[PruneReport]) -> None:
        self.last_reports = reports

    def remove(self) -> None:
        """Take the hooks off; the model is exactly as before."""
        if self._pruner is not None:
            self._pruner.remove()
            self._pruner = None

    @property
    def applied(self) -> bool:
        return self._pruner is not None

    # -- configuration ---------------------------------------------------------------------------
    def needs(self, config: dict[str, Any]) -> Needs:
        """What the runtime must capture for :meth:`select` (nothing by default)."""
        return Needs()

    def default_budget(self, adapter: Adapter) -> float:
        return 0.5

    def default_layer(self, adapter: Adapter) -> int:
        return paper_layer(adapter.model_type, adapter.num_layers)

    def resolve(self, adapter: Adapter) -> dict[str, Any]:
        """Concrete settings for ``adapter``'s model (preset values for what was left ``None``): every knob."""
        layer = self.layer if self.layer is not None else self.default_layer(adapter)
        n = adapter.num_layers
        if not self.min_layer <= layer < n:
            raise ValueError(
                f"layer K={layer} is out of range for a model with {n} decoder layers: K must be in "
                f"[{self.min_layer}, {n - 1}]"
            )
        cfg = {"method": self.name, "model_type": adapter.model_type, "num_layers": n}
        cfg.update(self.knobs())
        cfg.update(layer=layer, budget=self.budget if self.budget is not None else self.default_budget(adapter))
        return cfg

    def knobs(self) -> dict[str, Any]:
        """The fields as given (``None`` = preset)."""
        return {f.name: getattr(self, f.name) for f in knob_fields(type(self))}

    @staticmethod
    def target_count(length: int, config: dict[str, Any]) -> int:
        """Tokens the budget allows for a span of ``length`` tokens (at least one)."""
        if config.get("budget_tokens"):
            return min(length, config["budget_tokens"])
        return max(1, sel.ratio_count(config["budget"], length))

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.knobs().items())
        return f"{type(self).__name__}({args})"


def knob_fields(cls: type) -> list[dataclasses.Field]:
    """The user-facing fields (knobs) of a method class."""
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


@dataclass(repr=False, eq=False)
class RankedMethod(PruningMethod):
    """A method that scores a span's tokens and keeps the best ones (among those an earlier stage left)."""

    def scores(self, span: SpanInput, config: dict[str, Any]) -> torch.Tensor:
        """``(L,)`` scores of the span's tokens, higher is better (only the alive ones are read)."""
        raise NotImplementedError

    def keep_count(self, span: SpanInput, config: dict[str, Any]) -> int:
        """Tokens of the span to keep at this stage."""
        return self.target_count(span.length, config)

    def ranking(self, span: SpanInput, config: dict[str, Any]) -> torch.Tensor:
        """The alive tokens, best first (ties to the lower index)."""
        alive = span.alive_index
        scores = self.scores(span, config).cpu()
        return alive[sel.stable_topk(scores[alive], alive.numel())]

    def stage_group(self, span: SpanInput) -> str:
        """The report group of this stage's picks: the method's name (``name@layer`` for multi-stage methods)."""
        stages = getattr(self, "stages", None)
        return self.name if stages is None else f"{self.name}@{span.stage}"

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        top = self.ranking(span, config)[: self.keep_count(span, config)].sort().values
        return SpanSelection(top, {self.stage_group(span): top})
