"""Pruning methods: one small class each, behind one interface.

    pruner = IVCPrune(layer=16, budget=0.5)
    with pruner(model):
        model.generate(**inputs)
    pruner.last_report

A method says how to resolve its configuration for a model (presets) and which tokens of a visual
span to keep (:meth:`PruningMethod.select`); the runtime does the rest, identically for every method.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from . import selection as sel
from .adapters import Adapter, get_adapter
from .presets import preset_for
from .report import PruneReport
from .runtime import Pruner, SpanInput, SpanSelection

RULES = ("fill", "union")
ABLATIONS = (None, "no_ivc", "no_foreground", "ivc_only")


def _check_ratio(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    lo_ok = value >= 0 if allow_zero else value > 0
    if not (lo_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")


class PruningMethod:
    """Base class of pruning methods.

    Args:
        layer: K, the decoder layer before which visual tokens are pruned (layers ``0..K-1`` see every
            token). ``None``: the model's preset.
        budget: fraction of each visual span's tokens to keep, in (0, 1]. ``None``: the preset.
        budget_tokens: keep this many tokens per span instead of a fraction (overrides ``budget``).
    """

    name = "base"
    needs_values = False

    def __init__(self, layer: int | None = None, budget: float | None = None, budget_tokens: int | None = None):
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if layer is not None and layer < 1:
            raise ValueError(f"layer (K) must be >= 1: layer K-1 supplies the value vectors; got {layer}")
        _check_ratio("budget", budget)
        if budget_tokens is not None and (not isinstance(budget_tokens, int) or budget_tokens < 1):
            raise ValueError(f"budget_tokens must be a positive int, got {budget_tokens!r}")
        self.layer = layer
        self.budget = budget
        self.budget_tokens = budget_tokens
        self.last_report: PruneReport | None = None
        self._pruner: Pruner | None = None

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
        self._pruner = Pruner(self, model)
        return self

    def remove(self) -> None:
        """Take the hooks off; the model is exactly as before."""
        if self._pruner is not None:
            self._pruner.remove()
            self._pruner = None

    @property
    def applied(self) -> bool:
        return self._pruner is not None

    # -- configuration ---------------------------------------------------------------------------
    def resolve(self, adapter: Adapter) -> dict[str, Any]:
        """Concrete settings for ``adapter``'s model (preset values for what was left ``None``)."""
        preset = preset_for(adapter.model_type, adapter.num_layers)
        layer = self.layer if self.layer is not None else preset.layer
        n = adapter.num_layers
        if not 1 <= layer < n:
            raise ValueError(
                f"layer K={layer} is out of range for a model with {n} decoder layers: K must be in [1, {n - 1}]"
            )
        return {
            "method": self.name,
            "model_type": adapter.model_type,
            "num_layers": n,
            "layer": layer,
            "budget": self.budget if self.budget is not None else preset.budget,
            "budget_tokens": self.budget_tokens,
        }

    @staticmethod
    def target_count(length: int, config: dict[str, Any]) -> int:
        """Tokens the budget allows for a span of ``length`` tokens (at least one)."""
        if config.get("budget_tokens"):
            return min(length, config["budget_tokens"])
        return max(1, sel.ratio_count(config["budget"], length))

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._public_args().items())
        return f"{type(self).__name__}({args})"

    def _public_args(self) -> dict[str, Any]:
        return {"layer": self.layer, "budget": self.budget, "budget_tokens": self.budget_tokens}


class IVCPrune(PruningMethod):
    """IVC-Prune (ICLR 2026): keep implicit-visual-coordinate tokens and prompt-aware foreground tokens.

    Every argument left ``None`` takes the model's paper preset (see ``ivcprune.presets``).

    Args:
        layer: K (see :class:`PruningMethod`).
        budget: fraction of each span kept by the ``"fill"`` rule. The ``"union"`` rule of the Qwen2-VL
            preset sizes itself (pass ``rule="fill"`` there to keep a fixed fraction); under every rule,
            a budget that allows all of a span's tokens (``budget=1.0``) keeps them all.
        ivc_ratio: fraction of the span taken by cos (real-axis) score, and again by sin score.
        seed_ratio: fraction of the span taken as semantic seeds (at least one).
        rule: ``"fill"``: IVC tokens and seeds, then the best foreground tokens up to the budget;
            ``"union"``: IVC tokens, seeds and the top ``foreground_ratio`` foreground tokens.
        foreground_ratio: foreground share of the ``"union"`` rule.
        ivc_statistic: ``"authors"`` (cos/sin averaged over the three M-RoPE axes and all frequencies,
            as the reference code) or ``"applied"`` (the rotation M-RoPE actually applies).
        ablation: ``None`` (the method); ``"no_ivc"``: seeds then foreground up to the budget;
            ``"no_foreground"``: the IVC tokens alone (no seeds, no fill, so fewer tokens than the
            budget); ``"ivc_only"``: the whole budget from the cos and sin rankings, alternately.
        query_offset: text queries start this many tokens after a span's end (2 skips the
            vision-end marker and the token after it, as the reference code).
    """

    name = "ivc"
    needs_values = True

    def __init__(
        self,
        layer: int | None = None,
        budget: float | None = None,
        *,
        budget_tokens: int | None = None,
        ivc_ratio: float | None = None,
        seed_ratio: float | None = None,
        rule: str | None = None,
        foreground_ratio: float | None = None,
        ivc_statistic: str = "authors",
        ablation: str | None = None,
        query_offset: int = 2,
    ):
        super().__init__(layer, budget, budget_tokens)
        _check_ratio("ivc_ratio", ivc_ratio, allow_zero=True)
        _check_ratio("seed_ratio", seed_ratio, allow_zero=True)
        _check_ratio("foreground_ratio", foreground_ratio, allow_zero=True)
        if rule is not None and rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if ivc_statistic not in sel.IVC_STATISTICS:
            raise ValueError(f"ivc_statistic must be one of {sel.IVC_STATISTICS}, got {ivc_statistic!r}")
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        if not isinstance(query_offset, int) or query_offset < 0:
            raise ValueError(f"query_offset must be a non-negative int, got {query_offset!r}")
        self.ivc_ratio = ivc_ratio
        self.seed_ratio = seed_ratio
        self.rule = rule
        self.foreground_ratio = foreground_ratio
        self.ivc_statistic = ivc_statistic
        self.ablation = ablation
        self.query_offset = query_offset
        # The IVC-only ablations never look at value vectors.
        self.needs_values = ablation not in ("no_foreground", "ivc_only")

    def _public_args(self) -> dict[str, Any]:
        out = super()._public_args()
        out.update(
            ivc_ratio=self.ivc_ratio,
            seed_ratio=self.seed_ratio,
            rule=self.rule,
            foreground_ratio=self.foreground_ratio,
            ivc_statistic=self.ivc_statistic,
            ablation=self.ablation,
        )
        return out

    def resolve(self, adapter: Adapter) -> dict[str, Any]:
        cfg = super().resolve(adapter)
        preset = preset_for(adapter.model_type, adapter.num_layers)
        rule = self.rule or preset.rule
        if rule == "union" and ((self.budget is not None and self.budget < 1) or self.budget_tokens is not None):
            warnings.warn(
                f"the {preset.family} preset uses the union rule, which has no budget: budget is ignored; "
                "pass rule='fill' to keep a fixed fraction of each image",
                stacklevel=3,
            )
        cfg.update(
            rule=rule,
            ivc_ratio=preset.ivc_ratio if self.ivc_ratio is None else self.ivc_ratio,
            seed_ratio=preset.seed_ratio if self.seed_ratio is None else self.seed_ratio,
            foreground_ratio=preset.foreground_ratio if self.foreground_ratio is None else self.foreground_ratio,
            ivc_statistic=self.ivc_statistic,
            ablation=self.ablation,
            query_offset=self.query_offset,
            preset=preset.family,
        )
        return cfg

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        L = span.length
        ablation = config["ablation"]
        target = self.target_count(L, config)
        if target >= L:  # nothing to prune
            return SpanSelection(torch.arange(L), {})
        n_ivc = sel.ratio_count(config["ivc_ratio"], L)
        groups: dict[str, torch.Tensor] = {}
        priority: list[torch.Tensor] = []

        if ablation != "no_ivc":
            rope = span.rope
            cos_s, sin_s = sel.ivc_scores(
                span.positions,
                rope.inv_freq,
                attention_scaling=rope.attention_scaling,
                statistic=config["ivc_statistic"],
                mrope_section=rope.mrope_section,
            )
            if ablation == "ivc_only":
                ranked = [sel.stable_topk(s, L) for s in (cos_s, sin_s)]
                groups["ivc_cos"], groups["ivc_sin"] = sel.interleave_rankings(ranked, target)
                return SpanSelection(torch.cat(list(groups.values())).sort().values, groups)
            groups["ivc_cos"] = sel.stable_topk(cos_s, n_ivc)
            groups["ivc_sin"] = sel.stable_topk(sin_s, n_ivc)
            priority += [groups["ivc_cos"], groups["ivc_sin"]]
            if ablation == "no_foreground":
                return SpanSelection(torch.unique(torch.cat(priority)), groups)

        n_seed = max(1, sel.ratio_count(config["seed_ratio"], L))
        fg, seeds = sel.foreground_scores(span.visual_values, span.query_values, n_seed)
        groups["seed"] = seeds.cpu()
        priority.append(groups["seed"])
        fg = fg.cpu()
        if config["rule"] == "union":
            kept, groups["foreground"] = sel.union_rule(L, priority, fg, sel.ratio_count(config["foreground_ratio"], L))
        else:
            kept, groups["foreground"] = sel.fill_to_budget(L, priority, fg, target)
        return SpanSelection(kept, groups)


class RandomPrune(PruningMethod):
    """Keep a uniformly random subset of each visual span (the baseline every method should beat).

    Reproducible: the same ``seed`` and prompt give the same selection.
    """

    name = "random"

    def __init__(
        self, layer: int | None = None, budget: float | None = None, *, budget_tokens: int | None = None, seed: int = 0
    ):
        super().__init__(layer, budget, budget_tokens)
        self.seed = seed

    def _public_args(self) -> dict[str, Any]:
        return {**super()._public_args(), "seed": self.seed}

    def resolve(self, adapter: Adapter) -> dict[str, Any]:
        return {**super().resolve(adapter), "seed": self.seed}

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + span.index)
        pick = torch.randperm(span.length, generator=gen)[: self.target_count(span.length, config)]
        return SpanSelection(pick.sort().values, {"random": pick})


METHODS: dict[str, type[PruningMethod]] = {"ivc": IVCPrune, "random": RandomPrune}


def make_method(name: str, **kwargs) -> PruningMethod | None:
    """Method by CLI name (``ivc``, ``random``; ``none`` gives ``None``), ignoring ``None`` kwargs."""
    if name == "none":
        return None
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from none, {', '.join(METHODS)}")
    cls = METHODS[name]
    return cls(**{k: v for k, v in kwargs.items() if v is not None})
