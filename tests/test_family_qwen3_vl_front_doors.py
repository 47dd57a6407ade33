"""Every front door on Qwen3-VL (dense and MoE): tiny checkpoints saved with transformers' real Qwen3VLProcessor
(16-pixel patches, frame timestamps, ``mm_token_type_ids``), ``ivcprune generate`` with pictures, batches (images,
several images, a video, no image) equal to one-by-one, ``bench``, ``eval`` on grounding + multiple choice +
yes/no, lmms-eval's ``generate_until``, the server; grounding answers in Qwen3-VL's 0-1000 JSON frame."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ivcprune.boxes import parse_box
from ivcprune.cli import main
from ivcprune.evals.grounding import authors_to_original, grounding_record, to_original
from ivcprune.families import FAMILIES as REGISTERED
from ivcprune.generation import Request
from ivcprune.inputs import build_inputs, user_message
from ivcprune.methods import make_method
from ivcprune.models import load_model, save_tiny_checkpoint

from frontdoors import batch_and_alone, eval_datasets, generate_one, lmms_generate, run_eval, serve_one, smooth_image

NAMES = {"qwen3_vl": "tiny-qwen3-vl", "qwen3_vl_moe": "tiny-qwen3-vl-moe"}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {family: save_tiny_checkpoint(root / name, name, init_std=0.15) for family, name in NAMES.items()}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {family: load_model(str(path)) for family, path in checkpoints.items()}


def frames(n: int = 4, seed: int = 0) -> list[Image.Image]:
    return [smooth_image(96, 64, seed + i) for i in range(n)]


def test_processor_expands_images_and_videos_as_the_model_expects(loaded):
    model, processor = loaded["qwen3_vl"]
    assert type(processor).__name__ == "Qwen3VLProcessor" and processor.image_processor.patch_size == 16
    messages = user_message("What is it?", [smooth_image(300, 200)], [frames()])
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")  # no default system turn
    inputs, seen = build_inputs(processor, messages, image_patch_size=16, model_type="qwen3_vl")
    ids = inputs["input_ids"][0]
    (g,) = inputs["image_grid_thw"].tolist()
    assert int((ids == model.config.image_token_id).sum()) == g[0] * g[1] * g[2] // 4
    assert seen[0].size == (g[2] * 16, g[1] * 16)  # qwen-vl-utils' resize to multiples of 32 pixels
    (v,) = inputs["video_grid_thw"].tolist()
    decoded = processor.tokenizer.decode(ids)
    assert v[0] == 2 and decoded.count(" seconds>") == 2  # two temporal patches, each after its timestamp
    mm = inputs["mm_token_type_ids"][0]
    assert torch.equal(mm == 1, ids == model.config.image_token_id)
    assert torch.equal(mm == 2, ids == model.config.video_token_id)
    with torch.no_grad():
        model(**inputs)  # the model accepts it as it is


@pytest.mark.parametrize("family", list(NAMES))
def test_generate_writes_answer_report_and_picture(family, checkpoints, tmp_path, capsys):
    report, printed, width = generate_one(checkpoints[family], tmp_path, capsys, "--budget", "0.5")
    assert printed.startswith((tmp_path / "out" / "answer.txt").read_text()[:-1] + "\n\n")
    span = report["spans"][0]
    assert report["pruned"] and report["layer"] == 3  # the preset: after DeepStack's additions
    assert "by analogy" in report["config"]["preset"]
    assert span["grid"] == [1, 6, 9] and span["kept"] == 27  # 300x200 -> 288x192 pixels, 32 per token
    assert width > 2 * 192


@pytest.mark.parametrize("family", list(NAMES))
def test_batch_equals_one_by_one(family, loaded):
    model, processor = loaded[family]
    method = make_method("ivc", layer=2, budget=0.5)  # before DeepStack's last addition: the cut follows it
    requests = [Request([smooth_image(300, 200, 1)], "What is it?"),
                Request([], "Say something."),
                Request([smooth_image(200, 200, 3), smooth_image(400, 120, 4)], "Compare them."),
                Request([], "What happens?", videos=[frames(4, 5)])]
    _, batch = batch_and_alone(model, processor, requests, method, 5)
    assert batch[0].report.pruned and not batch[1].report.pruned and len(batch[2].report.spans) == 2
    assert [s.kind for s in batch[3].report.spans] == ["video", "video"]  # one span per frame


@pytest.mark.parametrize("family", list(NAMES))
def test_bench(family, checkpoints, capsys):
    rc = main(["bench", "--model", str(checkpoints[family]), "--image-tokens", "64", "--repeats", "1", "--warmup", "0",
               "--new-tokens", "3", "--layer", "2", "--json"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["seq_len"] > row["kept_len"] and row["pruned"]["prefill_s"] > 0


def test_bench_random_reduced(capsys):
    rc = main(["bench", "--model", "random:qwen3-vl-30b-a3b", "--set", "num_hidden_layers=4", "--set", "hidden_size=64",
               "--set", "num_attention_heads=2", "--set", "num_key_value_heads=1", "--set", "head_dim=32",
               "--set", "moe_intermediate_size=16", "--set", "num_experts=8", "--set", "num_experts_per_tok=2",
               "--set", "vision.depth=4", "--set", "vision.hidden_size=32", "--set", "vision.intermediate_size=64",
               "--set", "vision.num_heads=2", "--image-tokens", "16", "--repeats", "1", "--warmup", "0",
               "--new-tokens", "2", "--json"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["seq_len"] > row["kept_len"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return eval_datasets(tmp_path_factory.mktemp("data"))


def test_eval_grounding_mcq_yesno(checkpoints, datasets, tmp_path, capsys):
    out = tmp_path / "run"
    run_eval(checkpoints["qwen3_vl"], datasets, out, capsys, "qwen3_vl", processor_sized=False)
    prompt = json.loads((out / "ground" / "run.json").read_text())["prompt"]
    assert prompt == "Locate {ref} in the image and output its bbox coordinates in JSON format."


def test_lmms_eval_generate_until(checkpoints):
    pytest.importorskip("lmms_eval")
    docs = [{"image": smooth_image(300, 200, 5), "q": "What is it?"}, {"image": smooth_image(150, 300, 6), "q": "Why?"},
            {"image": None, "q": "Hello."}]
    _, reports = lmms_generate(checkpoints["qwen3_vl_moe"], docs)
    assert reports[0]["visual_tokens"] > reports[0]["visual_kept"] > 0 and reports[2]["visual_tokens"] == 0


def test_serve(loaded):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    model, processor = loaded["qwen3_vl"]
    resp, ref = serve_one(model, processor, smooth_image(300, 200, 7), {"layer": 2, "budget": 0.5}, max_batch_size=2)
    assert resp.pruning["images"] == [{"visual_tokens": s.length, "visual_kept": s.kept} for s in ref.report.spans]


# -- boxes in Qwen3-VL's 0-1000 frame --------------------------------------------------------------------------
def test_family_box_format_and_frame():
    for family in NAMES:
        cls = REGISTERED[family]
        assert (cls.box_format, cls.box_frame, cls.image_patch_size) == ("bbox_2d", "1000", 16)


@pytest.mark.parametrize("text", [
    '```json\n[\n\t{"bbox_2d": [100, 500, 300, 1000], "label": "the dog"}\n]\n```',
    '{"bbox_2d": [100, 500, 300, 1000], "label": "the dog"}',
])
@pytest.mark.parametrize("parser", ["authors", "lenient"])
def test_grounding_answers_in_the_1000_frame(text, parser):
    assert parse_box(text, "bbox_2d", parser) == (100, 500, 300, 1000)
    # 0-1000 of the original image, whatever size the model saw
    assert to_original((100, 500, 300, 1000), "qwen3_vl", (288, 224), (640, 480)) == pytest.approx((64, 240, 192, 480))
    assert authors_to_original((100, 500, 300, 1000), "qwen3_vl_moe", (288, 224), (640, 480)) == \
        pytest.approx((64, 240, 192, 480))
    rec = grounding_record("s", "the dog", text, (64, 240, 192, 480), "qwen3_vl", (288, 224), (640, 480),
                           parser=parser)
    assert rec["hit"] and rec["iou"] == pytest.approx(1.0) and rec["box_model"] == [100, 500, 300, 1000]
