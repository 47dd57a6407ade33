"""LLaVA-OneVision: the AnyRes layout (base view, unpadded mosaic, row newlines) against transformers' own packing
and processor counts, the pure base-view -> mosaic mapping and per-view selection against brute force, the
newlines kept by every method outside the budget, layouts recovered alike by a forward and by ``generate``
(which encodes the images before the prefill), video spans, the preset by analogy and the ``random:`` shapes."""

from __future__ import annotations

import types
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ivcprune import IVCPrune
from ivcprune.families import get_adapter
from ivcprune.families.base import UnsupportedModelError
from ivcprune.families.llava_onevision import LlavaOnevision, anyres_prompt, image_layout, tile_grid
from ivcprune.methods import REGISTRY, make_method
from ivcprune.methods.ivc import preset_for
from ivcprune.models import random_config
from ivcprune.selection import ratio_count
from ivcprune.tiles import AnyResLayout, anyres_selection, base_to_mosaic, mosaic_cells, unpadded_mosaic
from ivcprune.tiny import build_onevision_processor

from conftest import make_model
from reference import reference_selection

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = random_config("tiny-llava-onevision")
REAL = random_config("llava-onevision-7b")
SIZES = [(56, 56), (100, 150), (150, 100), (60, 170), (170, 60), (168, 168), (300, 200), (200, 600), (500, 90),
         (90, 500), (333, 334), (40, 30), (1000, 1000), (384, 384), (768, 1152), (1200, 700), (2000, 300), (37, 919)]


# -- the layout ---------------------------------------------------------------------------------------------
def walk(side: int, rows: int, cols: int, tiled: bool) -> list[str]:
    """The span token by token, as pack_image_features concatenates it."""
    out = ["base"] * side * side
    if not tiled:
        return out + ["newline"]
    for _ in range(rows):
        out += ["mosaic"] * cols + ["newline"]
    return out


@settings(max_examples=60, deadline=None)
@given(side=st.integers(1, 6), shape=st.one_of(st.just((0, 0, False)), st.just((0, 0, True)),
                                                st.tuples(st.integers(1, 9), st.integers(0, 9), st.just(True))))
def test_layout_equals_the_token_walk(side, shape):
    layout = AnyResLayout(side, *shape)
    tokens = walk(side, *shape)
    assert layout.length == len(tokens)
    assert layout.newline_index().tolist() == [i for i, t in enumerate(tokens) if t == "newline"]
    assert layout.content_index().tolist() == [i for i, t in enumerate(tokens) if t != "newline"]
    assert layout.content == layout.length - layout.newlines


@pytest.mark.parametrize("bad", [(0, 1, 1), (2, 0, 3), (2, -1, 0), (2, 1, -1), (2, 2, 2, False)])
def test_layout_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="AnyRes layout"):
        AnyResLayout(*bad)


def packed(config, hw, tiled=True):
    """transformers' own packing of one image (LlavaOnevisionModel.pack_image_features on feature ids): the
    packed length and where the newline (-1) sits, and the base view's ids."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    side = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = tile_grid(hw, config.image_grid_pinpoints, config.vision_config.image_size) if tiled else (0, 0)
    feats = torch.arange((1 + rows * cols) * side * side, dtype=torch.float32).reshape(1 + rows * cols, side * side, 1)
    fake = types.SimpleNamespace(config=config)
    (out,), _ = LlavaOnevisionModel.pack_image_features(fake, [feats], torch.tensor([hw]), torch.tensor([-1.0]),
                                                        vision_aspect_ratio=config.vision_aspect_ratio)
    return out[:, 0]


@pytest.mark.parametrize("config", [TINY, REAL], ids=["tiny", "7b"])
def test_layout_equals_the_models_packing_and_the_processors_count(config):
    """For images of many aspect ratios: the span length, the newline positions and the base view first, as the
    model packs them, and the number of <image> tokens the processor writes."""
    vc = config.vision_config
    processor = build_onevision_processor(vc.image_size, vc.patch_size,
                                          image_grid_pinpoints=config.image_grid_pinpoints,
                                          vision_aspect_ratio=config.vision_aspect_ratio)
    shrunk = 0
    for hw in SIZES:
        layout = image_layout(config, hw)
        out = packed(config, hw)
        assert layout.length == out.numel(), hw
        assert (out == -1).nonzero().squeeze(1).tolist() == layout.newline_index().tolist(), hw
        assert torch.equal(out[: layout.base_tokens], torch.arange(layout.base_tokens, dtype=out.dtype))
        assert processor._get_number_of_features(*hw, vc.image_size, vc.image_size) == layout.length, hw
        grid = tile_grid(hw, config.image_grid_pinpoints, vc.image_size)
        shrunk += layout.mosaic_tokens < max(layout.rows, layout.cols) * min(grid) * layout.side  # downsampled
    assert shrunk  # some sizes were shrunk to anyres_max_N
    base_only = image_layout(config, None)
    assert base_only.length == base_only.base_tokens + 1 == processor.num_image_tokens + 1


def test_real_shape_numbers():
    assert image_layout(REAL, (384, 384)) == AnyResLayout(27, 27, 27)  # one tile: 729 + 27 x 28
    assert image_layout(REAL, (384, 384)).length == 729 + 27 * 28
    assert image_layout(REAL, (768, 1152)) == AnyResLayout(27, 54, 81)  # 2 x 3 tiles, no padding, not shrunk
    assert image_layout(REAL, (2304, 2304)).mosaic_tokens <= 9 * 729 * 1.1**2  # 6 x 6 tiles shrunk to anyres_max_9
    assert unpadded_mosaic((100, 400), (1, 4), 27, 9) == (27, 108)
    # 3:1 in a 4:1 grid: 27 of 108 columns are padding, 13 on each side go (the odd one stays, as in the model)
    assert unpadded_mosaic((100, 300), (1, 4), 27, 9) == (27, 82)


# -- base view -> mosaic ------------------------------------------------------------------------------------
def bf_cell(i: int, j: int, layout: AnyResLayout) -> int:
    """The base cell holding mosaic token (i, j)'s centre, by exact fractions of the image."""
    y, x = Fraction(2 * i + 1, 2 * layout.rows), Fraction(2 * j + 1, 2 * layout.cols)
    s = layout.side
    r = next(r for r in range(s) if Fraction(r, s) <= y < Fraction(r + 1, s))
    c = next(c for c in range(s) if Fraction(c, s) <= x < Fraction(c + 1, s))
    return r * s + c


@settings(max_examples=60, deadline=None)
@given(side=st.integers(1, 7), rows=st.integers(1, 20), cols=st.integers(1, 20), data=st.data())
def test_base_to_mosaic_equals_centre_cells(side, rows, cols, data):
    layout = AnyResLayout(side, rows, cols)
    cells = [bf_cell(i, j, layout) for i in range(rows) for j in range(cols)]
    assert mosaic_cells(layout).tolist() == cells
    base = data.draw(st.lists(st.integers(0, side * side - 1), max_size=side * side))
    expected = sorted(side * side + k for k, c in enumerate(cells) if c in set(base))
    assert base_to_mosaic(torch.tensor(base, dtype=torch.long), layout).tolist() == expected
    every = base_to_mosaic(torch.arange(side * side), layout)  # the base cells partition the mosaic
    assert every.tolist() == list(range(side * side, layout.content))


def test_base_to_mosaic_by_hand():
    layout = AnyResLayout(2, 4, 6)  # each base cell covers a 2 x 3 block
    assert base_to_mosaic(torch.tensor([0]), layout).tolist() == [4 + k for k in (0, 1, 2, 6, 7, 8)]
    assert base_to_mosaic(torch.tensor([3]), layout).tolist() == [4 + k for k in (15, 16, 17, 21, 22, 23)]
    assert base_to_mosaic(torch.tensor([1]), AnyResLayout(2, tiled=False)).numel() == 0  # no mosaic


# -- per-view selection -------------------------------------------------------------------------------------
def bf_selection(layout, cos, sin, base, seeds, ivc_ratio, target):
    """anyres_selection's steps with plain lists."""
    n, content = layout.base_tokens, layout.content

    def top(scores, idx, k):
        return sorted(idx, key=lambda i: (-scores[i], i))[:k]

    views = [list(range(n)), list(range(n, content))]
    ivc = set()
    for scores in (cos, sin):
        for view in views:
            ivc |= set(top(scores, view, ratio_count(ivc_ratio, len(view))))
    chosen = ivc | set(seeds)
    if len(chosen) >= target:
        return sorted(chosen)[:target]
    cells = [bf_cell(i, j, layout) for i in range(layout.rows) for j in range(layout.cols)]
    room = max(0, ratio_count(target / content, n) - len([i for i in chosen if i < n]))
    picked = 0
    for b in top(base, range(n), n):
        if picked >= room:
            break
        if b in chosen:
            continue
        block = {n + k for k, c in enumerate(cells) if c == b}
        if len(chosen | {b} | block) > target:
            break
        chosen |= {b} | block
        picked += 1
    score = list(base) + [base[c] for c in cells]
    rest = [i for i in top(score, range(content), content) if i not in chosen]
    return sorted(chosen | set(rest[: target - len(chosen)]))


@settings(max_examples=80, deadline=None)
@given(side=st.integers(2, 5), rows=st.integers(1, 12), cols=st.integers(1, 12), ivc=st.sampled_from([0.0, 0.1, 0.3]),
       share=st.floats(0.05, 0.95), ties=st.booleans(), data=st.data())
def test_anyres_selection_equals_brute_force(side, rows, cols, ivc, share, ties, data):
    layout = AnyResLayout(side, rows, cols)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))

    def scores(k):
        x = torch.randn(k, generator=g, dtype=torch.float64)
        return x.round() if ties else x

    cos, sin, base = scores(layout.content), scores(layout.content), scores(layout.base_tokens)
    seeds = data.draw(st.lists(st.integers(0, layout.base_tokens - 1), max_size=2))
    target = max(1, round(share * layout.content))
    got = anyres_selection(layout, cos, sin, base, torch.tensor(seeds, dtype=torch.long), ivc_ratio=ivc,
                           target=target)
    expected = bf_selection(layout, cos.tolist(), sin.tolist(), base.tolist(), seeds, ivc, target)
    assert got.kept.tolist() == expected
    assert got.kept.numel() == target
    for name, group in got.groups.items():
        assert bool(torch.isin(group, got.kept).all()), name


def test_anyres_selection_by_hand():
    layout = AnyResLayout(2, 4, 4)  # base cells each cover a 2 x 2 block of the mosaic
    cos = torch.zeros(20)
    sin = torch.zeros(20)
    base = torch.tensor([0.1, 0.9, 0.2, 0.3])
    chosen = anyres_selection(layout, cos, sin, base, torch.tensor([3]), ivc_ratio=0.0, target=10)
    # content 20, target 10: the seed (base 3); the base share is ratio_count(10/20, 4) = 2 base tokens, so one
    # foreground token: base 1 (best score) with the mosaic block it covers (content 6, 7, 10, 11); the fill by
    # score then takes base 3's block (score 0.3: content 14, 15, 18, 19)
    assert chosen.groups["foreground"].tolist() == [1]
    assert chosen.groups["tile_foreground"].tolist() == [6, 7, 10, 11]
    assert chosen.kept.tolist() == [1, 3, 6, 7, 10, 11, 14, 15, 18, 19]
    assert chosen.groups["fill"].tolist() == [14, 15, 18, 19]
    with pytest.raises(ValueError, match="needs a mosaic"):
        anyres_selection(AnyResLayout(2, tiled=False), cos[:4], sin[:4], base, torch.tensor([0]), target=2)
    with pytest.raises(ValueError, match="seeds must be"):
        anyres_selection(layout, cos, sin, base, torch.tensor([4]), target=2)


# -- on the model ---------------------------------------------------------------------------------------------
def _prompt(model, sizes, frames=None, seed=0):
    return anyres_prompt(model.config, sizes, 7, generator=torch.Generator().manual_seed(seed), frames=frames)


@pytest.fixture(scope="module")
def model():
    return make_model("llava_onevision")


@pytest.mark.filterwarnings("ignore:the .* preset uses the union rule")
@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "visionzip"])
def test_every_method_keeps_every_newline_outside_its_budget(model, name):
    """Every method sees the content tokens only: the newlines are kept, the budget counts the rest."""
    inputs = _prompt(model, [(100, 150)], frames=[2])
    method = make_method(name, layer=2, budget=0.4) if name not in ("divprune", "cdpruner") else \
        make_method(name, budget=0.4)
    with torch.no_grad(), method(model):
        model(**inputs)
    rep = method.last_report
    image, video = rep.spans
    layout = image_layout(model.config, (100, 150))
    assert image.layout == layout and image.length == layout.length
    kept = set(rep.kept.tolist())
    newlines = (layout.newline_index() + image.start).tolist() + [video.start + video.length - 1]
    assert set(newlines) <= kept
    assert set(image.positions("structure").tolist()) | set(video.positions("structure").tolist()) == set(newlines)
    for s in (image, video):
        content = s.length - len(s.positions("structure"))
        in_span = [p for p in kept if s.start <= p < s.start + s.length]
        assert len(in_span) == s.kept
        if name not in ("pdrop", "pdrop+ivc", "no_foreground"):  # these size their own counts (stages, IVC only)
            assert s.kept - len(s.positions("structure")) == max(1, ratio_count(0.4, content))


def test_preset_selection_per_view(model):
    inputs = _prompt(model, [(300, 200)])
    method = IVCPrune(layer=2)
    with torch.no_grad(), method(model):
        model(**inputs)
    rep = method.last_report
    assert rep.config["tile_scheme"] == "thumbnail" and rep.config["rule"] == "fill"
    (s,) = rep.spans
    layout = s.layout
    content = layout.content_index() + s.start
    n = layout.base_tokens
    assert s.kept == layout.newlines + layout.content // 2  # 50% of the content, newlines on top
    # IVC tokens in both views; seeds and foreground in the base view; mapped foreground in the mosaic
    for group in ("ivc_cos", "ivc_sin"):
        pos = set(s.positions(group).tolist())
        assert pos & set(content[:n].tolist()) and pos & set(content[n:].tolist())
    assert set(s.seeds.tolist()) <= set(content[:n].tolist())
    assert set(s.foreground.tolist()) <= set(content[:n].tolist())
    assert set(s.positions("tile_foreground").tolist()) <= set(content[n:].tolist())
    local = torch.searchsorted(content, s.foreground) if s.foreground.numel() else torch.zeros(0, dtype=torch.long)
    mapped = set((content[base_to_mosaic(local, layout)]).tolist())
    assert mapped == set(s.positions("tile_foreground").tolist()) and mapped <= set(rep.kept.tolist())


def _reports(model, inputs, method, generate: bool):
    with torch.no_grad(), method(model):
        if generate:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        else:
            model(**inputs)
    return method.last_reports


@pytest.mark.parametrize("sizes, frames", [([(100, 150)], None), ([(60, 170)], [2]), ([(80, 40), (50, 90)], None),
                                           ([], [3])])
def test_generate_recovers_the_layouts_a_forward_reads(model, sizes, frames):
    """``generate`` encodes the media before the prefill (image_sizes never reach the decoder): the layouts come
    from the newline embedding's place in the features, and equal those a forward reads off image_sizes."""
    inputs = _prompt(model, sizes, frames)
    method = IVCPrune(layer=2)
    a = _reports(model, inputs, method, generate=False)[0]
    b = _reports(model, inputs, method, generate=True)[0]
    assert [s.to_dict() for s in a.spans] == [s.to_dict() for s in b.spans]
    assert torch.equal(a.kept, b.kept)
    layouts = [s.layout for s in a.spans if s.kind == "image"]
    assert layouts == [image_layout(model.config, None if len(sizes) > 1 else hw) for hw in sizes]
    videos = [s for s in a.spans if s.kind == "video"]
    assert [(s.grid, s.length) for s in videos] == [((f, 2, 2), f * 4 + 1) for f in frames or []]


def test_layout_of_features_refuses_what_is_no_layout(model):
    adapter = get_adapter(model)
    newline = model.model.image_newline.detach()
    feats = torch.randn(16 + 3 * 5, newline.numel())
    assert adapter.layout_of_features(feats) is None  # no newline at all
    feats[16 + 4] = feats[16 + 9] = feats[16 + 14] = newline
    assert adapter.layout_of_features(feats) == AnyResLayout(4, 3, 4)
    feats[16 + 9] = 0.0
    assert adapter.layout_of_features(feats) is None  # newlines out of place


def test_unknown_layout_is_a_plain_span(model):
    """Image tokens without media kwargs (nothing tells the layout): one plain span, nothing fixed."""
    adapter = get_adapter(model)
    ids = torch.tensor([5, 6] + [model.config.image_token_id] * 20 + [7])
    (span,) = adapter.find_spans(ids, {})
    assert (span.start, span.length, span.fixed, span.layout) == (2, 20, (), None)


def test_visionzip_is_refused(model):
    with pytest.raises(UnsupportedModelError, match="no CLS token"):
        make_method("visionzip")(model)


def test_preset_by_analogy():
    p = preset_for("llava_onevision", 28)
    assert (p.layer, p.rule, p.budget, p.ivc_ratio, p.seed_ratio, p.softmax_domain, p.tile_scheme, p.value_input) == \
        (16, "fill", 0.5, 0.10, 0.01, "span", "thumbnail", "normed")
    assert p.note.startswith("by analogy, not validated on real checkpoints")
    assert preset_for("llava_onevision", 24).layer == 14  # the relative depth 16/28 (Qwen2 0.5B)


def test_random_configs_have_the_released_shapes():
    text, vision = REAL.text_config, REAL.vision_config
    assert (REAL.model_type, REAL.image_token_id, REAL.video_token_id) == ("llava_onevision", 151646, 151647)
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size, text.rope_parameters["rope_theta"]) == \
        (28, 3584, 28, 4, 18944, 152128, 1e6)
    assert (vision.model_type, vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads,
            vision.intermediate_size, vision.image_size, vision.patch_size) == \
        ("siglip_vision_model", 27, 1152, 16, 4304, 384, 14)
    assert (REAL.vision_feature_layer, REAL.vision_feature_select_strategy, REAL.vision_aspect_ratio) == \
        (-1, "full", "anyres_max_9")
    assert len(REAL.image_grid_pinpoints) == 36 and [2304, 2304] in REAL.image_grid_pinpoints
    inputs, grid = LlavaOnevision.synthetic_inputs(TINY, 64, 8)  # 4 views of 16 tokens: the base view and 1x3 tiles
    assert int((inputs["input_ids"] == TINY.image_token_id).sum()) == image_layout(TINY, (56, 168)).length
    assert grid == (4, 12) and inputs["image_sizes"].tolist() == [[56, 168]]


def test_expanded_generate_batches_find_every_layout(model):
    """Beams and several sequences per prompt: generate expands the encoded media with the rows, every row
    finds the layout."""
    inputs = _prompt(model, [(100, 150)], frames=[2])
    method = IVCPrune(layer=2)
    alone = _reports(model, inputs, method, generate=True)[0]
    for kw in ({"num_beams": 2, "num_return_sequences": 2}, {"do_sample": True, "num_return_sequences": 3}):
        with torch.no_grad(), method(model):
            model.generate(**inputs, max_new_tokens=2, **kw)
        for rep in method.last_reports:
            assert [s.to_dict() for s in rep.spans] == [s.to_dict() for s in alone.spans]


@pytest.mark.parametrize("hw", [(60, 170), (168, 168)])  # 1x3 tiles as they are; 3x3 tiles shrunk (anyres_max_4)
def test_per_view_preset_equals_loop_reference(model, hw):
    """The preset end to end: IVC statistics, seeds and base-view foreground scores from the loop reference (the
    unpruned model's values, float64), then the per-view steps of :func:`bf_selection` on the content tokens."""
    inputs = _prompt(model, [hw], seed=sum(hw))
    rep = _reports(model, inputs, IVCPrune(layer=2), generate=False)[0]
    (span,) = rep.spans
    layout = span.layout
    assert layout.mosaic
    ref = reference_selection(model, inputs, 2, scored_part=lambda start, L: (0, layout.base_tokens))[0]
    content = layout.content_index()
    cos = [ref["cos"][i] for i in content.tolist()]
    sin = [ref["sin"][i] for i in content.tolist()]
    kept = bf_selection(layout, cos, sin, ref["fg_scores"], ref["seed"], 0.1, max(1, round(0.5 * layout.content)))
    expected = set((content[kept] + span.start).tolist()) | set((layout.newline_index() + span.start).tolist())
    assert {p for p in rep.kept.tolist() if span.start <= p < span.start + span.length} == expected
    assert set((span.seeds - span.start).tolist()) == set(ref["seed"])
