"""Every front door on Gemma 3, as on the other families: a tiny checkpoint saved with transformers' real
Gemma3Processor (built offline), its chat format and image expansion, pan-and-scan crops through the processor,
``ivcprune generate`` with pictures, batches equal to one-by-one, ``bench`` (checkpoint and ``random:``),
``eval`` on grounding + multiple choice + yes/no, lmms-eval's ``generate_until`` and ``serve``."""

from __future__ import annotations

import json

import pytest
import torch

from ivcprune.cli import main
from ivcprune.generation import Request
from ivcprune.inputs import build_inputs, user_message
from ivcprune.methods import make_method
from ivcprune.models import load_model, save_tiny_checkpoint
from ivcprune.tiny import build_gemma3_processor

from frontdoors import batch_and_alone, eval_datasets, generate_one, lmms_generate, run_eval, serve_one, smooth_image
from reference import masked_reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3", "tiny-gemma3", init_std=0.15)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(str(checkpoint))


def test_tiny_processor_expands_images_as_the_config_expects(loaded):
    model, processor = loaded
    cfg = model.config
    assert type(processor).__name__ == "Gemma3Processor"
    tok = processor.tokenizer
    assert (tok.boi_token, tok.eoi_token, tok.image_token) == \
        ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
    assert (tok.boi_token_id, tok.eoi_token_id, tok.image_token_id) == \
        (cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id)
    messages = [{"role": "system", "content": "Be brief."}, *user_message("What is it?", [smooth_image(150, 100)])]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<start_of_turn>user\nBe brief.\n\n<start_of_image>What is it?<end_of_turn>\n<start_of_turn>model\n"
    inputs, seen = build_inputs(processor, messages)
    ids = inputs["input_ids"][0].tolist()
    first = ids.index(cfg.boi_token_id)
    assert ids[first + 1:first + 18] == [cfg.image_token_id] * 16 + [cfg.eoi_token_id]
    assert torch.equal(inputs["token_type_ids"][0], (inputs["input_ids"][0] == cfg.image_token_id).long())
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32) and seen[0].size == (32, 32)


def test_pan_and_scan_crops_through_the_processor(loaded):
    """The processor's pan-and-scan: the image and each crop their own span (a 4x4 grid each), pruned exactly."""
    model, _ = loaded
    processor = build_gemma3_processor(32, 16)
    messages = user_message("Describe it.", [smooth_image(240, 60, 4)])
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[smooth_image(240, 60, 4)], do_pan_and_scan=True,
                       pan_and_scan_min_crop_size=8, return_tensors="pt")
    crops = inputs["pixel_values"].shape[0] - 1
    assert crops >= 2
    method = make_method("ivc", layer=2, budget=0.5)
    with torch.no_grad(), method(model):
        logits = model(**inputs).logits[0]
    rep = method.last_report
    assert [(s.length, s.kept, s.grid) for s in rep.spans] == [(16, 8, (1, 4, 4))] * (crops + 1)
    with torch.no_grad(), masked_reference(model, rep.kept, 2):
        ref = model(**inputs).logits[0]
    torch.testing.assert_close(logits, ref[rep.kept], atol=2e-4, rtol=1e-4)


def test_generate_writes_answer_report_and_picture(checkpoint, tmp_path, capsys):
    report, _, width = generate_one(checkpoint, tmp_path, capsys)
    span = report["spans"][0]
    assert report["pruned"] and report["layer"] == 2 and span["grid"] == [1, 4, 4] and span["kept"] == 8
    assert width > 2 * 32


@pytest.mark.parametrize("name", ["ivc", "fastv", "pdrop"])
def test_batch_equals_one_by_one(loaded, name):
    model, processor = loaded
    method = make_method(name, layer=2, budget=0.5) if name != "pdrop" else make_method(name)
    requests = [Request([smooth_image(300, 200, 1)], "What is it?"),
                Request([], "Say something."),
                Request([smooth_image(200, 200, 3), smooth_image(400, 120, 4)], "Compare the two pictures, please.")]
    _, batch = batch_and_alone(model, processor, requests, method, 12)
    assert batch[0].report.pruned and not batch[1].report.pruned and len(batch[2].report.spans) == 2


def test_bench_checkpoint_and_random(checkpoint, capsys):
    rc = main(["bench", "--model", str(checkpoint), "--image-tokens", "16", "--repeats", "1", "--warmup", "0",
               "--new-tokens", "3", "--layer", "2", "--json"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["seq_len"] > row["kept_len"] and row["pruned"]["prefill_s"] > 0 and row["grid"] == [4, 4]
    # the 12B's shapes, narrowed and shortened (two decoder layers: one sliding, one global with the 1:1 pattern)
    rc = main(["bench", "--model", "random:gemma-3-12b", "--set", "hidden_size=64", "--set", "intermediate_size=128",
               "--set", "num_attention_heads=2", "--set", "num_key_value_heads=1", "--set", "head_dim=32",
               "--set", "num_hidden_layers=2", "--set", "sliding_window_pattern=2",
               "--set", "vision.num_hidden_layers=1", "--set", "vision.hidden_size=32",
               "--set", "vision.intermediate_size=64", "--set", "vision.num_attention_heads=2",
               "--set", "vision.image_size=224", "--image-tokens", "256", "--repeats", "1", "--warmup", "0",
               "--new-tokens", "2", "--layer", "1", "--json"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["grid"] == [16, 16] and row["seq_len"] > row["kept_len"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return eval_datasets(tmp_path_factory.mktemp("data"))


def test_eval_grounding_mcq_yesno(checkpoint, datasets, tmp_path, capsys):
    run_eval(checkpoint, datasets, tmp_path / "run", capsys, "gemma3")


def test_lmms_eval_generate_until(checkpoint):
    pytest.importorskip("lmms_eval")
    docs = [{"image": smooth_image(300, 200, 5), "q": "What is it?"}, {"image": None, "q": "Hello."}]
    _, reports = lmms_generate(checkpoint, docs)
    assert reports[0]["visual_tokens"] == 16 and reports[0]["visual_kept"] == 8 and reports[1]["visual_tokens"] == 0


def test_serve_answers_are_the_generation_paths(loaded):
    pytest.importorskip("fastapi")
    model, processor = loaded
    resp, _ = serve_one(model, processor, smooth_image(300, 200, 7), {"layer": 2, "budget": 0.5}, max_batch_size=2)
    assert resp.pruning["images"] == [{"visual_tokens": 16, "visual_kept": 8}]
