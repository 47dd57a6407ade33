"""Every front door on LLaVA-OneVision, as on the other families: a tiny checkpoint saved with transformers' real
``LlavaOnevisionProcessor`` (``ivcprune generate`` with pictures of the base view and the mosaic, batches equal to
one-by-one, ``ivcprune bench``, ``ivcprune eval`` on grounding + multiple choice + yes/no, lmms-eval's
``generate_until``, ``ivcprune serve``), and the layouts the runtime finds equal to the processor's."""

from __future__ import annotations

import json

import pytest

from ivcprune.cli import main
from ivcprune.families.llava_onevision import image_layout
from ivcprune.generation import Request, generate_batch
from ivcprune.inputs import build_inputs, user_message
from ivcprune.media import media_for
from ivcprune.methods import make_method
from ivcprune.models import load_model, save_tiny_checkpoint
from ivcprune.tiny import TOKEN_IDS

from conftest import FAMILIES
from frontdoors import batch_and_alone, eval_datasets, generate_one, lmms_generate, run_eval, serve_one, smooth_image

NAME = FAMILIES["llava_onevision"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("onevision") / NAME, NAME, init_std=0.15)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(str(checkpoint))


SIZES = [(300, 200), (120, 260), (56, 56), (500, 90), (90, 500), (170, 60), (1000, 700), (30, 40)]


def test_processor_expands_images_as_the_layouts_say(loaded):
    model, processor = loaded
    assert type(processor).__name__ == "LlavaOnevisionProcessor" and type(media_for("llava_onevision")) is \
        type(media_for(processor=processor))
    tok = processor.tokenizer
    assert (tok.image_token, tok.video_token) == ("<image>", "<video>")
    assert (tok.image_token_id, tok.video_token_id) == (model.config.image_token_id, model.config.video_token_id)
    assert TOKEN_IDS["image_token_id"] == model.config.image_token_id
    messages = user_message("What is it?", [smooth_image(300, 200)])
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    for w, h in SIZES:  # one image: base view + mosaic with newlines, as many tokens as the layout
        inputs, seen = build_inputs(processor, user_message("?", [smooth_image(w, h)]))
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert n == image_layout(model.config, (h, w)).length, (w, h)
        assert seen[0].size == (w, h)  # pictures draw on the original, which both views cover
    # several images in one prompt: base views and a newline each (the processor tiles single images only)
    inputs, _ = build_inputs(processor, user_message("?", [smooth_image(300, 200), smooth_image(90, 500)]))
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * (16 + 1)


def test_runtime_layouts_are_the_processors(loaded):
    """A batch of images of many aspect ratios through generate: every span's layout is the one the processor
    counted, and its newlines are kept."""
    model, processor = loaded
    requests = [Request([smooth_image(w, h, i)], "Where is the red part?") for i, (w, h) in enumerate(SIZES)]
    gens = generate_batch(model, processor, requests, make_method("ivc", layer=2), max_new_tokens=2)
    for (w, h), gen in zip(SIZES, gens):
        (span,) = gen.report.spans
        layout = image_layout(model.config, (h, w))
        assert span.layout == layout and span.length == layout.length
        newlines = (layout.newline_index() + span.start).tolist()
        assert set(newlines) <= set(gen.report.kept.tolist())
        assert span.kept == len(newlines) + max(1, round(0.5 * layout.content))


def test_generate_writes_answer_report_and_picture(checkpoint, tmp_path, capsys):
    report, _, width = generate_one(checkpoint, tmp_path, capsys)
    (span,) = report["spans"]
    assert report["pruned"] and report["layer"] == 2  # 16/28 of 4 layers
    assert span["layout"] == {"side": 4, "rows": 6, "cols": 9, "tiled": True} and span["length"] == 16 + 6 * 10
    assert span["kept"] == 6 + 35 and len(span["groups"]["structure"]) == 6  # 50% of 70 content tokens + newlines
    assert span["groups"]["tile_foreground"]  # the base view's foreground mapped onto the mosaic
    assert width > 3 * 200  # the image, the base view, the mosaic


@pytest.mark.parametrize("method", ["ivc", "fastv"])
def test_batch_equals_one_by_one(loaded, method):
    model, processor = loaded
    pruner = make_method(method, layer=2, budget=0.5)
    requests = [Request([smooth_image(300, 200, 1)], "What is it?"),
                Request([smooth_image(120, 260, 2)], "Where is the red part of the picture?"),
                Request([], "Say something."),
                Request([smooth_image(200, 200, 3), smooth_image(400, 120, 4)], "Compare them.")]
    _, batch = batch_and_alone(model, processor, requests, pruner, 5)
    assert batch[0].report.pruned and not batch[2].report.pruned
    assert [s.layout.tiled for s in batch[3].report.spans] == [False, False]  # a multi-image prompt: base views


def test_bench(checkpoint, capsys):
    rc = main(["bench", "--model", str(checkpoint), "--image-tokens", "64", "--repeats", "1", "--warmup", "0",
               "--new-tokens", "3", "--layer", "2", "--json"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["seq_len"] > row["kept_len"] and row["pruned"]["prefill_s"] > 0
    assert row["grid"] == [4, 12]  # 1x3 tiles of 4x4 tokens after the base view


def test_bench_random_shape_at_reduced_width(capsys):
    rc = main(["bench", "--model", "random:llava-onevision-7b", "--set", "hidden_size=64", "--set",
               "intermediate_size=128", "--set", "num_attention_heads=2", "--set", "num_key_value_heads=1", "--set",
               "num_hidden_layers=3", "--set", "vision.num_hidden_layers=1", "--set", "vision.hidden_size=32", "--set",
               "vision.intermediate_size=64", "--set", "vision.num_attention_heads=2", "--set", "vision.image_size=56",
               "--image-tokens", "64", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--json"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["pruned"]["prefill_s"] > 0 and row["seq_len"] > row["kept_len"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return eval_datasets(tmp_path_factory.mktemp("data"))


def test_eval_grounding_mcq_yesno(checkpoint, datasets, tmp_path, capsys):
    out = tmp_path / "run"
    run_eval(checkpoint, datasets, out, capsys, "llava_onevision")
    prompt = json.loads((out / "ground" / "run.json").read_text())["prompt"]
    assert prompt.startswith("Please provide the bounding box coordinate of the region this sentence describes")


def test_lmms_eval_generate_until(checkpoint):
    pytest.importorskip("lmms_eval")
    docs = [{"image": smooth_image(300, 200, 5), "q": "What is it?"}, {"image": smooth_image(150, 300, 6), "q": "Why?"},
            {"image": None, "q": "Hello."}]
    _, reports = lmms_generate(checkpoint, docs)
    assert reports[0]["visual_tokens"] == 76 and reports[0]["visual_tokens"] > reports[0]["visual_kept"] > 0
    assert reports[2]["visual_tokens"] == 0


def test_serve(loaded):
    pytest.importorskip("fastapi")
    model, processor = loaded
    resp, ref = serve_one(model, processor, smooth_image(300, 200, 1), {"layer": 2, "budget": 0.5})
    (span,) = ref.report.spans
    assert resp.pruning["images"] == [{"visual_tokens": span.length, "visual_kept": span.kept}]
