"""IVC-Prune (ICLR 2026) and its per-family paper presets (see ``METHOD.md``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import selection as sel
from .. import tiles as tiles_mod
from ..families import FAMILIES, Adapter
from ..runtime import VALUE_INPUTS, Needs, SpanInput, SpanSelection
from .base import PruningMethod, check_choice, check_ratio, paper_layer

RULES = ("fill", "union")
ABLATIONS = (None, "no_ivc", "no_foreground", "ivc_only")
DOMAINS = ("span", "sequence")
TILE_SCHEMES = ("thumbnail", "span")


@dataclass(frozen=True)
class Preset:
    """Default knobs of IVC-Prune for one model family (the authors' released settings)."""

    family: str
    layer: int
    rule: str  # "fill" (budget) or "union"
    budget: float
    ivc_ratio: float
    seed_ratio: float
    foreground_ratio: float  # union rule only
    softmax_domain: str  # "span" or "sequence"
    min_one_seed: bool
    note: str
    value_input: str = "normed"  # what layer K-1's value projection is applied to (runtime.VALUE_INPUTS)
    tile_scheme: str = "span"  # tiled images: "thumbnail" (InternVL's release) or "span" (one span)
    authors_mean: str = "per_row"  # how numerics="authors" averages similarity rows (selection.AUTHORS_MEANS)


_PRESETS = {
    "qwen2_5_vl": dict(
        family="Qwen2.5-VL", rule="fill", softmax_domain="span", min_one_seed=True,
        note="K=16 of 28 (7B) / 22 of 36 (3B); IVC 10% cos + 10% sin, seeds 1% (at least 1), fill to 50% by "
             "foreground; similarity softmax over the span",
    ),
    "qwen2_vl": dict(
        family="Qwen2-VL", rule="union", softmax_domain="sequence", min_one_seed=False, authors_mean="joint",
        note="K=16 of 28; keep IVC 10% cos + 10% sin, seeds 1% (no minimum) and top 40% foreground (union); "
             "similarity softmax over the whole sequence, sliced to the span",
    ),
    "llava": dict(
        family="LLaVA-1.5", rule="union", softmax_domain="sequence", min_one_seed=True, ivc_ratio=0.05,
        foreground_ratio=0.20,
        note="K=16 of 32; keep IVC 5% cos + 5% sin (1-D RoPE, all head dims), seeds 1% (at least 1) and top 20% "
             "foreground (union, about 31% kept); similarity softmax over the whole sequence",
    ),
    "internvl": dict(
        family="InternVL", rule="fill", softmax_domain="sequence", min_one_seed=True, value_input="residual",
        tile_scheme="thumbnail",
        note="K=16 of 32 (relative depth 1/2 elsewhere); IVC 10% cos + 10% sin per 256-token tile (thumbnail "
             "included); seeds (1% of 256) and foreground ranked on the thumbnail, kept there up to 50% and mapped "
             "onto the matching high-resolution blocks; filled from the thumbnail to 50% of the image; values of "
             "the un-normalised residual stream; similarity softmax over the whole sequence",
    ),
    "llava_onevision": dict(
        family="LLaVA-OneVision", rule="fill", softmax_domain="span", min_one_seed=True, tile_scheme="thumbnail",
        note="by analogy, not validated on real checkpoints: K at the relative depth 16/28 (16 of the 7B's 28 "
             "Qwen2 layers); IVC 10% cos + 10% sin per view (base view and high-resolution mosaic, each ranked on "
             "its own); seeds (1% of the base view) and foreground ranked on the base view and mapped onto the "
             "mosaic tokens it covers; filled to 50% of the image's content tokens by foreground; the row "
             "newlines always kept, outside the budget; similarity softmax over the scored view",
    ),
    "gemma3": dict(
        family="Gemma 3", rule="fill", softmax_domain="span", min_one_seed=True,
        note="by analogy, not validated on real checkpoints: K at the relative depth 16/28 (27 of 48 for 12B, a "
             "sliding-window layer; nothing adds visual features inside the decoder); IVC 10% cos + 10% sin per "
             "256-token image (each pan-and-scan crop its own) from the global layers' rotary (base 1e6, linear "
             "factor 8: Gemma3.ivc_rotary), seeds 1% (at least 1), fill to 50% by foreground; similarity softmax "
             "over the span",
    ),
}


# Families the paper did not cover (METHOD.md): the fill rule at Qwen2.5-VL's relative depth, marked so.
_BY_ANALOGY = dict(rule="fill", softmax_domain="span", min_one_seed=True,
                   note="by analogy, not validated: K at the relative depth 16/28, IVC 10% + 10%, seeds 1%, fill "
                        "to 50% by foreground, similarity softmax over the span")


# By-analogy presets with family-specific notes (still the _BY_ANALOGY rule and knobs).
_ANALOGY_NOTES = {
    model_type: f"by analogy, not validated: {name}: K at Qwen2.5-VL's depth (16 of 28, 22 of 36; 16/28 elsewhere, "
                "27 of 48 for the 30B-A3B) and never before the DeepStack additions end (K >= 3 on the released "
                "checkpoints, which add after layers 0-2); IVC 10% + 10% with the interleaved M-RoPE layout, seeds 1% "
                "(at least 1), fill to 50% by foreground from the attention block's value vectors, similarity "
                "softmax over the span"
    for model_type, name in (("qwen3_vl", "Qwen3-VL"), ("qwen3_vl_moe", "Qwen3-VL-MoE"))
}


def preset_for(model_type: str, num_layers: int) -> Preset:
    """The paper preset for a model family (``config.model_type``) with ``num_layers`` decoder layers; a
    preset by analogy for supported families the paper did not cover."""
    if model_type in _PRESETS:
        fields = _PRESETS[model_type]
    elif model_type in FAMILIES:
        fields = dict(_BY_ANALOGY, family=FAMILIES[model_type].display_name)
        if model_type in _ANALOGY_NOTES:
            fields["note"] = _ANALOGY_NOTES[model_type]
    else:
        raise ValueError(f"IVC-Prune has no preset for model type {model_type!r}; known: {', '.join(FAMILIES)}")
    fields = dict(dict(ivc_ratio=0.10, foreground_ratio=0.40), **fields)
    return Preset(layer=paper_layer(model_type, num_layers), budget=0.5, seed_ratio=0.01, **fields)


def span_ivc_scores(span: SpanInput, statistic: str = "authors", numerics: str = "ours"):
    """``(cos, sin)`` IVC statistics of a span's tokens, from its positions and the model's rotary layout."""
    rope = span.rope
    return sel.ivc_scores(span.positions, rope.inv_freq, attention_scaling=rope.attention_scaling,
                          statistic=statistic, mrope_section=rope.mrope_section, numerics=numerics,
                          model_dtype=rope.dtype, axis_of_freq=rope.axis_of_freq)


def ivc_tokens(span: SpanInput, ratio: float, statistic: str = "authors") -> tuple[torch.Tensor, torch.Tensor]:
    """The span's IVC tokens: the top ``ratio`` by cos score and the top ``ratio`` by sin score (local indices,
    rank order)."""
    cos_s, sin_s = span_ivc_scores(span, statistic)
    n = sel.ratio_count(ratio, span.length)
    return sel.stable_topk(cos_s, n), sel.stable_topk(sin_s, n)


@dataclass(repr=False, eq=False)
class IVCPrune(PruningMethod):
    """IVC-Prune: keep implicit-visual-coordinate tokens and prompt-aware foreground tokens.

    Every knob left ``None`` takes the model's paper preset (:func:`preset_for`).

    Args:
        layer, budget, budget_tokens: see :class:`PruningMethod`. The ``"union"`` rule of the Qwen2-VL
            preset sizes itself (pass ``rule="fill"`` there to keep a fixed fraction); under every rule, a
            budget that allows all of a span's tokens (``budget=1.0``) keeps them all.
        ivc_ratio: fraction of the span taken by cos (real-axis) score, and again by sin score.
        seed_ratio: fraction of the span taken as semantic seeds.
        min_one_seed: at least one seed (Qwen2.5-VL's release) or ``round(seed_ratio * L)`` (Qwen2-VL's).
        rule: ``"fill"``: IVC tokens and seeds, then the best foreground tokens up to the budget;
            ``"union"``: IVC tokens, seeds and the top ``foreground_ratio`` foreground tokens.
        foreground_ratio: foreground share of the ``"union"`` rule.
        softmax_domain: similarity softmax over the span's tokens (``"span"``) or over the whole prompt,
            sliced to the span (``"sequence"``).
        ivc_statistic: ``"authors"`` (cos/sin averaged over the three M-RoPE axes and all frequencies,
            as the reference code) or ``"applied"`` (the rotation M-RoPE actually applies).
        numerics: ``"ours"`` (float64 IVC statistic, float32 similarities) or ``"authors"`` (the release's
            bf16 arithmetic, which reproduces its selections to the token).
        ablation: ``None`` (the method); ``"no_ivc"``: seeds then foreground up to the budget;
            ``"no_foreground"``: the IVC tokens alone (no seeds, no fill, so fewer tokens than the
            budget); ``"ivc_only"``: the whole budget from the cos and sin rankings, alternately.
        query_offset: text queries start this many tokens after a span's end (2 skips the vision-end
            marker and the token after it, as the reference code).
    """

    name = "ivc"
    label = "IVC-Prune"

    ivc_ratio: float | None = field(default=None, metadata={"help": "share of each span kept by cos, and by sin"})
    seed_ratio: float | None = field(default=None, metadata={"help": "share of each span taken as semantic seeds"})
    min_one_seed: bool | None = field(default=None, metadata={"help": "at least one seed (true/false)"})
    rule: str | None = field(default=None, metadata={"choices": RULES, "help": "budget fill or the union rule"})
    foreground_ratio: float | None = field(default=None, metadata={"help": "foreground share of the union rule"})
    softmax_domain: str | None = field(default=None, metadata={"choices": DOMAINS,
                                                               "help": "similarity softmax over the span or prompt"})
    ivc_statistic: str = field(default="authors", metadata={"choices": sel.IVC_STATISTICS})
    numerics: str = field(default="ours", metadata={"choices": sel.NUMERICS,
                                                    "help": "authors: the release's bf16 arithmetic"})
    ablation: str | None = field(default=None, metadata={"choices": ABLATIONS[1:]})
    query_offset: int = field(default=2, metadata={"help": "text queries start this many tokens after a span"})
    value_input: str | None = field(default=None, metadata={
        "choices": VALUE_INPUTS, "help": "value vectors of layer K-1's normed input or of the raw residual stream"})
    tile_scheme: str | None = field(default=None, metadata={
        "choices": TILE_SCHEMES, "help": "tiled images: thumbnail-guided (InternVL's release; LLaVA-OneVision: its "
                                         "base view) or one plain span"})

    def __post_init__(self):
        super().__post_init__()
        check_ratio("ivc_ratio", self.ivc_ratio, allow_zero=True)
        check_ratio("seed_ratio", self.seed_ratio, allow_zero=True)
        check_ratio("foreground_ratio", self.foreground_ratio, allow_zero=True)
        if self.rule is not None:
            check_choice("rule", self.rule, RULES)
        if self.softmax_domain is not None:
            check_choice("softmax_domain", self.softmax_domain, DOMAINS)
        if self.value_input is not None:
            check_choice("value_input", self.value_input, VALUE_INPUTS)
        if self.tile_scheme is not None:
            check_choice("tile_scheme", self.tile_scheme, TILE_SCHEMES)
        check_choice("ivc_statistic", self.ivc_statistic, sel.IVC_STATISTICS)
        check_choice("numerics", self.numerics, sel.NUMERICS)
        check_choice("ablation", self.ablation, ABLATIONS)
        if isinstance(self.query_offset, bool) or not isinstance(self.query_offset, int) or self.query_offset < 0:
            raise ValueError(f"query_offset must be a non-negative int, got {self.query_offset!r}")

    def needs(self, config: dict[str, Any]) -> Needs:
        # the IVC-only ablations never look at value vectors
        return Needs(values=config["ablation"] not in ("no_foreground", "ivc_only"), value_input=config["value_input"])

    def default_layer(self, adapter: Adapter) -> int:
        # never before a layer that still adds visual features (Qwen3-VL's DeepStack), within the model
        layer = preset_for(adapter.model_type, adapter.num_layers).layer
        return min(max(layer, adapter.feature_layers), adapter.num_layers - 1)

    def resolve(self, adapter: Adapter) -> dict[str, Any]:
        cfg = super().resolve(adapter)
        preset = preset_for(adapter.model_type, adapter.num_layers)
        rule = self.rule or preset.rule
        if rule == "union" and ((self.budget is not None and self.budget < 1) or self.budget_tokens is not None):
            warnings.warn(
                f"the {preset.family} preset uses the union rule, which has no budget: budget is ignored; "
                "pass rule='fill' to keep a fixed fraction of each image",
                stacklevel=4,
            )
        for knob in ("ivc_ratio", "seed_ratio", "min_one_seed", "foreground_ratio", "softmax_domain", "value_input",
                     "tile_scheme"):
            if cfg[knob] is None:
                cfg[knob] = getattr(preset, knob)
        by_analogy = preset.note.startswith("by analogy")  # reports say which presets are not the authors'
        cfg.update(rule=rule, preset=preset.family + (" (by analogy, not validated)" if by_analogy else ""),
                   authors_mean=preset.authors_mean)
        return cfg

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        L = span.length
        ablation = config["ablation"]
        target = self.target_count(L, config)
        if target >= L:  # nothing to prune
            return SpanSelection(torch.arange(L), {})
        tiles = span.tiles
        if tiles is not None and tiles.thumbnail and config["tile_scheme"] == "thumbnail" and ablation is None:
            return self._select_tiles(span, config, target)
        anyres = span.layout if isinstance(span.layout, tiles_mod.AnyResLayout) else None
        if anyres is not None and anyres.mosaic and config["tile_scheme"] == "thumbnail" and ablation is None \
                and config["rule"] == "fill":
            return self._select_anyres(span, config, target)
        groups: dict[str, torch.Tensor] = {}
        priority: list[torch.Tensor] = []

        if ablation != "no_ivc":
            cos_s, sin_s = span_ivc_scores(span, config["ivc_statistic"], config["numerics"])
            if ablation == "ivc_only":
                ranked = [sel.stable_topk(s, L) for s in (cos_s, sin_s)]
                groups["ivc_cos"], groups["ivc_sin"] = sel.interleave_rankings(ranked, target)
                return SpanSelection(torch.cat(list(groups.values())).sort().values, groups)
            n_ivc = sel.ratio_count(config["ivc_ratio"], L)
            groups["ivc_cos"] = sel.stable_topk(cos_s, n_ivc)
            groups["ivc_sin"] = sel.stable_topk(sin_s, n_ivc)
            priority += [groups["ivc_cos"], groups["ivc_sin"]]
            if ablation == "no_foreground":
                return SpanSelection(torch.unique(torch.cat(priority)), groups)

        n_seed = sel.ratio_count(config["seed_ratio"], L)
        if config["min_one_seed"]:
            n_seed = max(1, n_seed)
        fg, seeds, note = self._foreground(span, config, n_seed)
        groups["seed"] = seeds.cpu()
        priority.append(groups["seed"])
        fg = fg.cpu()
        if config["rule"] == "union":
            fg_count = sel.ratio_count(config["foreground_ratio"], L)
            kept, groups["foreground"] = sel.union_rule(L, priority, fg, fg_count)
        else:
            kept, groups["foreground"] = sel.fill_to_budget(L, priority, fg, target)
        return SpanSelection(kept, groups, note)

    def _select_tiles(self, span: SpanInput, config: dict[str, Any], target: int) -> SpanSelection:
        """InternVL's scheme (:func:`ivcprune.tiles.tile_selection`): seeds and foreground ranked on the
        thumbnail, whose share of kept tokens follows the budget (the release fixes both at 50%)."""
        layout = span.tiles
        n_seed = sel.ratio_count(config["seed_ratio"], layout.tile_tokens)
        if config["min_one_seed"]:
            n_seed = max(1, n_seed)
        cos_s, sin_s = span_ivc_scores(span, config["ivc_statistic"], config["numerics"])
        fg, seeds, note = self._foreground(span, config, n_seed, part=(layout.thumbnail_start, layout.tile_tokens))
        chosen = tiles_mod.tile_selection(layout, cos_s, sin_s, fg.cpu(), seeds.cpu(), ivc_ratio=config["ivc_ratio"],
                                          thumbnail_ratio=target / span.length, target=target)
        return SpanSelection(chosen.kept, chosen.groups, note)

    def _select_anyres(self, span: SpanInput, config: dict[str, Any], target: int) -> SpanSelection:
        """LLaVA-OneVision's AnyRes images (:func:`ivcprune.tiles.anyres_selection`): IVC per view, seeds and
        foreground ranked on the base view and mapped onto the mosaic (by analogy with InternVL's thumbnail)."""
        layout = span.layout
        n_seed = sel.ratio_count(config["seed_ratio"], layout.base_tokens)
        if config["min_one_seed"]:
            n_seed = max(1, n_seed)
        cos_s, sin_s = span_ivc_scores(span, config["ivc_statistic"], config["numerics"])
        fg, seeds, note = self._foreground(span, config, n_seed, part=(0, layout.base_tokens))
        chosen = tiles_mod.anyres_selection(layout, cos_s, sin_s, fg.cpu(), seeds.cpu(), ivc_ratio=config["ivc_ratio"],
                                            target=target)
        return SpanSelection(chosen.kept, chosen.groups, note)

    def _foreground(self, span: SpanInput, config: dict[str, Any], n_seed: int,
                    part: tuple[int, int] | None = None):
        """``(scores, seeds, note)``: the two-stage foreground scores, with the text queries from
        ``query_offset`` tokens after the span (the last text token, and a note, when there are none)."""
        first = span.local_start + span.length + config["query_offset"]
        queries = span.text_after(config["query_offset"])
        note = None if queries.numel() and int(queries[0]) >= first else \
            "no text after the span; the last text token is the query"
        values = span.row.values
        first, length = part or (0, span.length)  # scored part of the span (InternVL: the thumbnail)
        start = span.local_start + first
        kwargs: dict[str, Any] = {"numerics": config["numerics"], "authors_mean": config["authors_mean"]}
        if config["softmax_domain"] == "sequence":
            kwargs.update(sequence_values=values, span_start=start)
        fg, seeds = sel.foreground_scores(values[:, start : start + length], values[:, queries.to(values.device)],
                                          n_seed, **kwargs)
        return fg, seeds, note

