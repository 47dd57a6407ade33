"""The paper families' presets (METHOD.md) on LLaVA-1.5 and InternVL, checked against loop references built
from the unpruned model's hidden states: LLaVA's union rule over 1-D RoPE, InternVL's tile scheme (seeds and
foreground on the thumbnail, values of the un-normalised residual stream, softmax over the whole sequence),
and the tile grid the runtime reads off the pixel values."""

from __future__ import annotations

import pytest
import torch

from ivcprune import IVCPrune
from ivcprune.families.internvl import tiled_pixels
from ivcprune.methods.ivc import preset_for
from ivcprune.tiles import TileLayout, match_tiling

from conftest import make_inputs, make_model
from reference import reference_selection
from test_tiles import bf_tile_selection


def _run(model, inputs, method):
    with torch.no_grad(), method(model):
        model(**inputs)
    return method.last_report


def test_llava_preset_is_the_authors_union_rule():
    p = preset_for("llava", 32)
    assert (p.layer, p.rule, p.ivc_ratio, p.foreground_ratio, p.softmax_domain, p.min_one_seed) == \
        (16, "union", 0.05, 0.20, "sequence", True)
    assert preset_for("llava", 40).layer == 20  # relative depth 16 of 32 elsewhere


@pytest.mark.filterwarnings("ignore:the LLaVA-1.5 preset uses the union rule")
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llava_selection_equals_loop_reference(attn):
    model = make_model("llava", attn=attn)
    inputs = make_inputs(model, text_after=12)
    K = 3
    rep = _run(model, inputs, IVCPrune(layer=K))
    assert rep.config["rule"] == "union" and rep.config["value_input"] == "normed"
    ref = reference_selection(model, inputs, K, ivc_ratio=0.05, rule="union", fg_ratio=0.2,
                              softmax_domain="sequence")
    assert len(ref) == len(rep.spans) == 1
    r, s = ref[0], rep.spans[0]
    assert (s.start, s.length) == (r["start"], r["length"])
    assert set(s.ivc_cos.tolist()) == r["ivc_cos"] and set(s.ivc_sin.tolist()) == r["ivc_sin"]
    assert set(s.seeds.tolist()) == r["seed"]
    assert {p for p in rep.kept.tolist() if s.start <= p < s.start + s.length} == r["kept"]
    assert s.kept < s.length


def test_internvl_preset():
    p = preset_for("internvl", 32)
    assert (p.layer, p.rule, p.ivc_ratio, p.softmax_domain, p.value_input, p.tile_scheme) == \
        (16, "fill", 0.10, "sequence", "residual", "thumbnail")
    assert preset_for("internvl", 28).layer == 14  # InternVL3-8B: relative depth 1/2


@pytest.mark.parametrize("grid", [(1, 2), (2, 3), (3, 1)])
def test_internvl_tile_scheme_equals_loop_reference(grid):
    model = make_model("internvl")
    rows, cols = grid
    inputs = make_inputs(model, media=(("image", 1, 8 * rows, 8 * cols),), text_after=10, seed=rows + cols)
    K = 2
    rep = _run(model, inputs, IVCPrune(layer=K))
    side = model.config.image_seq_length ** 0.5
    layout = TileLayout(rows, cols, int(side))
    span = rep.spans[0]
    assert span.length == layout.length

    def thumbnail(start, L):
        return layout.thumbnail_start, layout.tile_tokens

    ref = reference_selection(model, inputs, K, softmax_domain="sequence", value_input="residual",
                              scored_part=thumbnail)[0]
    n = layout.tile_tokens
    kept = bf_tile_selection(rows, cols, layout.side, ref["cos"], ref["sin"], ref["fg_scores"], ref["seed"],
                             0.1, round(0.5 * layout.length) / layout.length, 0.5)[0]
    assert {p - span.start for p in rep.kept.tolist() if span.start <= p < span.start + span.length} == set(kept)
    assert set((span.seeds - span.start).tolist()) == {layout.thumbnail_start + k for k in ref["seed"]}
    assert "tile_foreground" in span.groups
    assert n * (rows * cols + 1) == span.length


def test_internvl_residual_values_matter():
    """The preset's values come from the raw residual stream; the normed input gives another selection."""
    model = make_model("internvl")
    inputs = make_inputs(model, media=(("image", 1, 16, 24),), text_after=10)
    kept = {vi: _run(model, inputs, IVCPrune(layer=2, value_input=vi)).kept.tolist() for vi in ("residual", "normed")}
    assert kept["residual"] != kept["normed"]


def test_internvl_span_plain_scheme_is_one_span():
    """tile_scheme='span' scores a tiled image as one span: the plain fill rule of the loop reference."""
    model = make_model("internvl")
    inputs = make_inputs(model, media=(("image", 1, 8, 16),), text_after=10)
    rep = _run(model, inputs, IVCPrune(layer=2, tile_scheme="span"))
    ref = reference_selection(model, inputs, 2, softmax_domain="sequence", value_input="residual")[0]
    s = rep.spans[0]
    assert {p for p in rep.kept.tolist() if s.start <= p < s.start + s.length} == ref["kept"]
    assert "tile_foreground" not in s.groups


@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (2, 3), (3, 2), (1, 6), (6, 1), (2, 2), (4, 1), (3, 3)])
def test_tile_grid_is_read_off_the_pixel_values(grid):
    g = torch.Generator().manual_seed(sum(grid))
    px = tiled_pixels(*grid, size=56, channels=3, generator=g)
    assert match_tiling(px[:-1], px[-1]) == grid


def test_tiled_span_without_pixels_falls_back_to_one_span():
    """Features passed without pixel values (nothing to read the grid from): the span is scored as one."""
    model = make_model("internvl")
    inputs = make_inputs(model, media=(("image", 1, 8, 16),), text_after=10)
    method = IVCPrune(layer=2)
    with torch.no_grad(), method(model):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])  # no pixels: text only
    span = method.last_report.spans[0]
    assert "tile_foreground" not in span.groups and span.kept == span.length // 2
