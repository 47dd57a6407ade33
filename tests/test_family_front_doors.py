"""Every front door on LLaVA-1.5 and InternVL, as on Qwen-VL: tiny checkpoints saved with their real processors
(``ivcprune generate`` with pictures, batches equal to one-by-one, ``ivcprune eval`` on grounding + multiple
choice + yes/no, lmms-eval's ``generate_until``), the box formats and frames of both, and InternVL's tile grid
as the processor chooses it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ivcprune.boxes import parse_box
from ivcprune.cli import main
from ivcprune.evals.grounding import authors_to_original, grounding_record, to_original
from ivcprune.families.internvl import InternVL
from ivcprune.generation import Request
from ivcprune.inputs import build_inputs, user_message
from ivcprune.media import ImageView, tower_view
from ivcprune.methods import make_method
from ivcprune.models import load_model, save_tiny_checkpoint
from ivcprune.tiles import TileLayout, match_tiling
from ivcprune.tiny import TOKEN_IDS, build_internvl_processor, build_llava_processor

from conftest import FAMILIES
from frontdoors import batch_and_alone, eval_datasets, generate_one, lmms_generate, run_eval, smooth_image

NAMES = {family: FAMILIES[family] for family in ("llava", "internvl")}
# LLaVA-1.5's preset keeps its union rule: the budget given to every family is ignored there, with a warning
pytestmark = [pytest.mark.filterwarnings("ignore:the LLaVA-1.5 preset uses the union rule"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_checkpoint(root / name, name, init_std=0.15) for family, name in NAMES.items()}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {family: load_model(str(path)) for family, path in checkpoints.items()}


# -- checkpoints and processors ----------------------------------------------------------------------------
def test_tiny_processors_expand_images_as_the_configs_expect(loaded):
    model, processor = loaded["llava"]
    assert type(processor).__name__ == "LlavaProcessor" and processor.tokenizer.image_token == "<image>"
    messages = user_message("What is it?", [smooth_image(150, 100)])
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "USER: <image>\nWhat is it? ASSISTANT:"
    inputs, seen = build_inputs(processor, messages)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.image_seq_length == 64
    assert seen[0].size == (112, 112)  # the tower's input: short side resized, centre cropped

    model, processor = loaded["internvl"]
    tok = processor.tokenizer
    assert (tok.start_image_token, tok.end_image_token, tok.context_image_token) == ("<img>", "</img>", "<IMG_CONTEXT>")
    assert (tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id) == \
        (model.config.start_image_token_id, model.config.end_image_token_id, model.config.image_token_id)
    assert tok.video_token == "<video>"
    messages = user_message("What is it?", [smooth_image(300, 100)])
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    inputs, seen = build_inputs(processor, messages, max_tiles=6)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(tok.start_image_token_id) == ids.count(tok.end_image_token_id) == 1
    # 3x1 tiles + thumbnail of 16 tokens each
    assert ids.count(model.config.image_token_id) == 4 * 16 and inputs["pixel_values"].shape[0] == 4
    assert seen[0].size == (300, 100)  # InternVL's pictures draw on the original
    assert TOKEN_IDS["image_token_id"] == model.config.image_token_id


def test_llava_view_follows_the_processor_config():
    image = Image.new("RGB", (200, 100))
    seen, view = tower_view(build_llava_processor(112).image_processor, image)  # llava-hf: resize + centre crop
    assert seen.size == (112, 112)
    assert view.scale == (224 / 200, 112 / 100) and view.offset == (-56, 0)
    assert view.box((50, 0, 150, 100)) == pytest.approx((0, 0, 112, 112))  # the middle square is what it sees
    seen, view = tower_view(build_llava_processor(112, do_pad=True).image_processor, image)  # original LLaVA
    assert seen.size == (112, 112)
    assert view.box((0, 0, 200, 100)) == pytest.approx((0, 28, 112, 84))  # padded above and below
    assert seen.getpixel((56, 5)) == tuple(int(m * 255) for m in build_llava_processor().image_processor.image_mean)


@pytest.mark.parametrize("do_pad", [False, True])
@pytest.mark.parametrize("size", [(300, 200), (120, 260), (500, 499)])
def test_llava_seen_image_is_what_the_tower_gets(do_pad, size):
    """The picture's image is the processor's pixel values, de-normalised (crop or pad, then resize)."""
    ip = build_llava_processor(112, do_pad=do_pad).image_processor
    image = smooth_image(*size, seed=3)
    seen, _ = tower_view(ip, image)
    pixels = ip(image, return_tensors="pt")["pixel_values"][0]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (ip.image_mean, ip.image_std))
    tower = (pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.abs(tower - np.asarray(seen, dtype=np.float32) / 255).mean() < 1e-3


# -- the tile grid the processor chooses -------------------------------------------------------------------
SIZES = [(112, 112), (300, 100), (100, 300), (224, 112), (112, 224), (400, 150), (150, 400), (336, 224), (500, 90),
         (90, 500), (250, 240), (640, 480), (480, 640), (200, 600), (700, 120), (333, 333), (60, 40)]


@pytest.mark.parametrize("max_tiles", [6, 12])
def test_tile_grid_matched_from_pixels_is_the_processors_choice(max_tiles):
    """For images of many aspect ratios, the processor's tiles per image (tokens between <img> and </img>), the
    grid InternVL.tiling predicts and the grid the runtime matches on the pixel values all agree."""
    processor = build_internvl_processor(112, 16, max_patches=max_tiles)
    images = [smooth_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt", max_patches=max_tiles)
    ids = inputs["input_ids"][0]
    starts = (ids == processor.start_image_token_id).nonzero().squeeze(1).tolist()
    ends = (ids == processor.end_image_token_id).nonzero().squeeze(1).tolist()
    blocks = [(e - s - 1) // 16 for s, e in zip(starts, ends)]
    pixels, first, grids = inputs["pixel_values"], 0, []
    for image, n in zip(images, blocks):
        rows, cols = InternVL.tiling(image.size, 1, max_tiles, tile_size=112)
        assert n == rows * cols + (rows * cols > 1), image.size
        if n > 1:
            assert match_tiling(pixels[first:first + n - 1], pixels[first + n - 1]) == (rows, cols), image.size
        first += n
        grids.append((rows, cols))
    assert first == pixels.shape[0]
    assert len(set(grids)) >= 8 and (1, 1) in grids  # many grids were tried: one tile, portrait, landscape


# -- generate, batches -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(NAMES))
def test_generate_writes_answer_report_and_picture(family, checkpoints, tmp_path, capsys):
    report, printed, width = generate_one(checkpoints[family], tmp_path, capsys, "--layer", "2", "--budget", "0.5")
    answer = (tmp_path / "out" / "answer.txt").read_text()[:-1]
    assert printed.startswith(answer + "\n\n")  # the answer, then the report
    span = report["spans"][0]
    assert report["pruned"] and report["layer"] == 2 and span["kept"] < span["length"]
    if family == "llava":
        assert span["grid"] == [1, 8, 8] and span["tiles"] is None
    else:  # a 300x200 image: 3x2 tiles of 4x4 tokens and the thumbnail
        assert span["tiles"] == {"rows": 2, "cols": 3, "side": 4} and span["length"] == 7 * 16
        assert span["kept"] == 56  # the budget holds with the tile scheme
    assert width > 3 * 200 if family == "internvl" else width > 2 * 200  # image, tiles, thumbnail


@pytest.mark.parametrize("family", list(NAMES))
def test_batch_equals_one_by_one(family, loaded):
    model, processor = loaded[family]
    requests = [Request([smooth_image(300, 200, 1)], "What is it?"),
                Request([smooth_image(120, 260, 2)], "Where is the red part of the picture?"),
                Request([], "Say something."),
                Request([smooth_image(200, 200, 3), smooth_image(400, 120, 4)], "Compare them.")]
    alone, batch = batch_and_alone(model, processor, requests, make_method("ivc", layer=2, budget=0.5), 6)
    for a, b in zip(alone, batch, strict=True):
        assert [im.size for im in b.seen] == [im.size for im in a.seen] and b.views == a.views
    assert batch[0].report.pruned and not batch[2].report.pruned and len(batch[3].report.spans) == 2
    if family == "internvl":  # each image's grid, matched on its pixels, is the processor's
        for row in (batch[0], batch[1], batch[3]):
            for span, view in zip(row.report.spans, row.views, strict=True):
                assert (span.tiles.rows, span.tiles.cols) == view.tiles


@pytest.mark.parametrize("family", list(NAMES))
def test_bench(family, checkpoints, capsys):
    rc = main(["bench", "--model", str(checkpoints[family]), "--image-tokens", "64", "--repeats", "1", "--warmup", "0",
               "--new-tokens", "3", "--layer", "2", "--json"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["seq_len"] > row["kept_len"] and row["pruned"]["prefill_s"] > 0
    assert row["grid"] == ([8, 8] if family == "llava" else [1, 3])  # LLaVA's one size; InternVL: 3 tiles + thumbnail


def test_image_flags_of_another_family_are_refused_before_loading(checkpoints, tmp_path):
    image = tmp_path / "img.png"
    smooth_image(64, 64).save(image)
    base = ["generate", "--image", str(image), "--prompt", "x"]
    with pytest.raises(SystemExit, match="--max-tiles applies to tiled-image models"):
        main([*base, "--model", str(checkpoints["llava"]), "--max-tiles", "4"])
    with pytest.raises(SystemExit, match="--min-pixels applies to Qwen-VL models"):
        main([*base, "--model", str(checkpoints["internvl"]), "--min-pixels", "3136"])


# -- eval ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return eval_datasets(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("family", list(NAMES))
def test_eval_grounding_mcq_yesno(family, checkpoints, datasets, tmp_path, capsys):
    out = tmp_path / "run"
    runs = run_eval(checkpoints[family], datasets, out, capsys, family)
    assert all(info["max_tiles"] == (6 if family == "internvl" else None) for _, info in runs.values())
    rec = json.loads((out / "ground" / "predictions.jsonl").read_text().splitlines()[0])
    assert rec["task"] == "grounding" and rec["gt"] == [20.0, 30.0, 150.0, 120.0]
    prompt = json.loads((out / "ground" / "run.json").read_text())["prompt"]
    assert prompt.startswith("Please provide the bounding box coordinate of the region this sentence describes")


# -- lmms-eval ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(NAMES))
def test_lmms_eval_generate_until(family, checkpoints):
    pytest.importorskip("lmms_eval")
    docs = [{"image": smooth_image(300, 200, 5), "q": "What is it?"}, {"image": smooth_image(150, 300, 6), "q": "Why?"},
            {"image": None, "q": "Hello."}]
    _, reports = lmms_generate(checkpoints[family], docs)
    assert [r["doc_id"] for r in reports] == [0, 1, 2]
    assert reports[0]["visual_tokens"] > reports[0]["visual_kept"] > 0 and reports[2]["visual_tokens"] == 0
    if family == "internvl":
        assert reports[0]["visual_tokens"] == 7 * 16  # 3x2 tiles and the thumbnail (the processor's 12-tile limit)


# -- boxes and frames ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, fmt, lenient, authors", [
    ("[0.12, 0.25, 0.5, 0.75]", "list", (0.12, 0.25, 0.5, 0.75), (0.12, 0.25, 0.5, 0.75)),
    ("The box is [0.5, 0.75, 0.12, 0.25].", "list", (0.12, 0.25, 0.5, 0.75), (0.12, 0.25, 0.5, 0.75)),
    ("no box here", "list", None, None),
    ("<ref>the dog</ref><box>[[120, 340, 560, 780]]</box>", "ref_box", (120, 340, 560, 780), (120, 340, 560, 780)),
    ("the dog[[120,340,560,780]]", "ref_box", (120, 340, 560, 780), (120, 340, 560, 780)),
    ("[[560, 780, 120, 340]]", "ref_box", (120, 340, 560, 780), (560, 780, 120, 340)),  # authors: as written
    ("[[1.5e2, 3, 5, 6]]", "ref_box", None, (150, 3, 5, 6)),  # their float() reads exponents
    ("[a] then [[1, 2, 3, 4]]", "ref_box", (1, 2, 3, 4), None),  # theirs starts at the first "["
    ("[[1, 2, 3, 4, 5]]", "ref_box", None, None),
    ("[[0.1, 0.2, 0.5, 0.9]]", "ref_box", (0.1, 0.2, 0.5, 0.9), (0.1, 0.2, 0.5, 0.9)),
])
def test_box_parsers(text, fmt, lenient, authors):
    assert parse_box(text, fmt, "lenient") == (None if lenient is None else pytest.approx(lenient))
    assert parse_box(text, fmt, "authors") == (None if authors is None else pytest.approx(authors))


def test_frames_by_hand():
    # LLaVA: 0-1 of the image padded to a centred square; a 400x200 image sits in a 400x400 square, 100 px down
    assert to_original((0.25, 0.25, 0.75, 0.5), "llava", (0, 0), (400, 200)) == pytest.approx((100, 0, 300, 100))
    assert to_original((0.0, 0.0, 1.0, 1.0), "llava", (0, 0), (200, 400)) == pytest.approx((-100, 0, 300, 400))
    assert authors_to_original((0.25, 0.25, 0.75, 0.5), "llava", (0, 0), (400, 200)) == \
        pytest.approx((100, 0, 300, 100))
    # InternVL: 0-1000 of the original image
    assert to_original((100, 500, 300, 1000), "internvl", (0, 0), (640, 480)) == pytest.approx((64, 240, 192, 480))
    assert authors_to_original((100, 500, 300, 1000), "internvl", (0, 0), (640, 480)) == \
        pytest.approx((64, 240, 192, 480))
    # the authors: four coordinates summing to under 4 are 0-1 already; a coordinate over 1100 leaves it unscaled
    assert authors_to_original((0.1, 0.5, 0.3, 1.0), "internvl", (0, 0), (640, 480)) == \
        pytest.approx((64, 240, 192, 480))
    assert authors_to_original((100, 500, 300, 1200), "internvl", (0, 0), (640, 480)) == \
        pytest.approx((0.1, 0.5, 0.3, 1.2))
    rec = grounding_record("s", "the dog", "<box>[[100, 500, 300, 1000]]</box>", (64, 240, 192, 480), "internvl",
                           (640, 480), (640, 480))
    assert rec["hit"] and rec["iou"] == pytest.approx(1.0)
    rec = grounding_record("s", "the dog", "[0.25, 0.25, 0.75, 0.5]", (100, 0, 300, 100), "llava", (112, 112),
                           (400, 200), parser="lenient")
    assert rec["hit"] and rec["box"] == [100, 0, 300, 100]


def test_views_map_boxes_onto_what_was_seen():
    view = ImageView((400, 200), (112, 112), (112 / 400, 112 / 400), (0, 28))
    assert view.box((0, 0, 400, 200)) == pytest.approx((0, 28, 112, 84))
    assert view.box(None) is None
    assert TileLayout(2, 3, 4).tiles == 6
