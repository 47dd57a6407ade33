"""The training pipeline of the embedded grounding model (a few steps), and the demo."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from ivcprune.evals import synth
from ivcprune.toy import train as toy


@pytest.fixture(scope="module")
def processor():
    return toy.build_toy_processor(toy.train_tokenizer(512, corpus_size=300))


def test_tokenizer_has_coordinate_tokens_and_special_tokens(processor):
    tok = processor.tokenizer
    # every pixel coordinate is one token; larger numbers split into such pieces
    assert tok.tokenize("[114, 448, 1000") == ["[", "114", ",", "Ġ", "448", ",", "Ġ", "100", "0"]
    answer = synth.format_answer((0, 7, 339, 448), "red circle")
    assert tok.decode(tok.encode(answer)) == answer
    assert toy.number_token_ids(tok)[:3] == tok.convert_tokens_to_ids(["0", "1", "2"])
    for t in ("<|image_pad|>", "<|vision_start|>", "<|im_end|>"):
        assert len(tok.encode(t)) == 1
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}
    text = processor.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|vision_start|><|image_pad|><|vision_end|>x<|im_end|>\n<|im_start|>assistant\n")


def test_training_batch_labels_and_anchors(processor):
    tok = processor.tokenizer
    r = toy.ToyRecipe(batch_size=2, align_steps=1)
    for step in (0, 5):  # an alignment chat, then instruction chats
        samples, turns = toy.stage_batch(r, step)
        b = toy.encode_training_batch(processor, samples, turns)
        assert b["pixel_values"].shape[0] == 2 * 1024 and (b["input_ids"] == tok.convert_tokens_to_ids(
            "<|image_pad|>")).sum() == 2 * 256
        boxes = []
        for row in range(2):
            labelled = b["labels"][row][b["labels"][row] != -100]
            assert tok.decode(labelled) == "".join(t.answer + "<|im_end|>" for t in turns[row])  # replies only
            boxes += [box for t in turns[row] for box in t.boxes]
        # every coordinate of every box written in a reply has an anchor: the token right before its digits
        assert b["box_anchor"].shape[0] == 4 * len(boxes) > 0
        for i, ((row, pos, k), target) in enumerate(zip(b["box_anchor"].tolist(), b["box_target"].tolist())):
            assert k == i % 4
            assert tok.convert_ids_to_tokens(int(b["input_ids"][row, pos + 1])) == str(round(target * synth.IMAGE_SIZE))
        assert [round(t * synth.IMAGE_SIZE) for t in b["box_target"].tolist()] == [v for box in boxes for v in box]
    kinds = [[t.question for t in ts] for ts in toy.stage_batch(r, 0)[1]]
    assert all(sorted(q[:4] for q in qs) == ["List", "What"] for qs in kinds)


def test_alignment_turns_name_and_locate_every_object():
    s = synth.make_sample(0, "train", 3)
    turns = toy.alignment_turns(s, random.Random(0), regions=2)
    listing = next(t for t in turns if t.question == toy.LIST_PROMPT)
    entries = json.loads(listing.answer)
    assert [(e["label"], tuple(e["bbox_2d"])) for e in entries] == [(o.label, o.box) for o in toy.reading_order(s)]
    assert [tuple(e["bbox_2d"]) for e in entries] == listing.boxes and len(entries) == len(s.objects)
    assert sorted(b[1] for b in listing.boxes) == [b[1] for b in listing.boxes]  # top to bottom
    regions = [t for t in turns if t is not listing]
    assert len(regions) == 2
    for t in regions:  # the object at the box named in the question
        box = tuple(json.loads(t.question[t.question.index("["): t.question.index("]") + 1]))
        assert t.answer == next(o.label for o in s.objects if o.box == box) and t.boxes == []


def test_step_data_is_a_function_of_the_step():
    r = toy.ToyRecipe(batch_size=2, align_steps=1)
    a, b = toy.stage_batch(r, 7), toy.stage_batch(r, 7)
    assert [s.id for s in a[0]] == [s.id for s in b[0]] == ["train-14", "train-15"] and a[1] == b[1]
    assert toy.stage_batch(r, 8)[1] != a[1]


def test_confusers_add_same_colour_objects_of_other_shapes_to_training_scenes_only():
    def hard_share(confusers):  # attribute targets with an object of their colour and another shape beside them
        samples = [synth.make_sample(0, "train", 10**6 + i, render_image=False, confusers=confusers)
                   for i in range(300)]
        attr = [s for s in samples if s.kind == "attribute"]
        return sum(any(o.color == s.target.color and o.shape != s.target.shape for o in s.objects)
                   for s in attr) / len(attr)

    plain, hard = hard_share(0.0), hard_share(0.5)
    assert 0.2 < plain < 0.5 and hard > plain + 0.25
    # at 0 the draws are the default stream's, so the benchmark splits and older recipes are unchanged
    for i in range(20):
        a, b = synth.make_sample(0, "test", i, render_image=False), synth.make_sample(0, "test", i, render_image=False,
                                                                                      confusers=0.0)
        assert (a.ref, a.box, a.objects) == (b.ref, b.box, b.objects)
    # the recipe's field reaches stage 2's scenes: at 1, an attribute scene (no twins) is all one colour
    r = toy.ToyRecipe(batch_size=8, align_steps=0, confusers=1.0)
    scenes = [s for step in range(6) for s in toy.stage_batch(r, step)[0] if s.kind == "attribute"]
    assert len(scenes) >= 5 and all(len({o.color for o in s.objects}) == 1 for s in scenes)
    assert any(len({o.color for o in s.objects}) > 1 for step in range(6)
               for s in toy.stage_batch(toy.ToyRecipe(batch_size=8, align_steps=0), step)[0] if s.kind == "attribute")
    with pytest.raises(ValueError, match="confusers"):
        synth.make_sample(0, "train", 0, confusers=1.5)


def test_cell_targets_follow_the_objects():
    s = synth.make_sample(0, "val", 1)
    color, shape, box, has, pos = toy.cell_targets(s)
    assert color.shape == (256,) and box.shape == (256, 4)
    assert bool(has.any()) and bool((color[has] > 0).all()) and bool((color[~has] == 0).all())
    cells = toy.object_cells(s)
    for o in s.objects:
        idx = cells[o.box]
        assert idx.numel() >= 1
        r, c = idx // 16, idx % 16
        cx, cy = (c.float().mean() + 0.5) * 28, (r.float().mean() + 0.5) * 28
        assert abs(cx - (o.box[0] + o.box[2]) / 2) < 28 and abs(cy - (o.box[1] + o.box[3]) / 2) < 28


def _tiny_recipe(**kw):
    return toy.ToyRecipe(vision_steps=2, vision_batch_size=2, steps=4, batch_size=2, eval_every=0, eval_samples=2,
                         warmup_steps=2, layers=2, align_steps=2, checkpoint_every=1, **kw)


def test_train_toy_runs_and_saves_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    summary = toy.train(tmp_path / "ck", _tiny_recipe(), log=lambda m: None)
    assert summary["steps"] == 4 and summary["images"] == 8 and summary["device"] == "cpu"
    log = json.loads((tmp_path / "ck" / "training_log.json").read_text())
    assert log["recipe"]["steps"] == 4 and log["history"][-1]["step"] == 4
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "ck")
    proc = AutoProcessor.from_pretrained(tmp_path / "ck")
    assert model.config.model_type == "qwen2_5_vl" and model.config._attn_implementation == "sdpa"
    assert model.config.image_token_id == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not any("aux" in k or "coord" in k for k in model.state_dict())


def test_train_toy_refuses_an_unseen_accelerator_and_bad_confusers_before_training(tmp_path, monkeypatch, capsys):
    import torch

    from ivcprune.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="device 'cuda'.*no CUDA device"):
        main(["train-toy", "--out", str(tmp_path / "ck"), "--device", "cuda", "--steps", "1"])
    with pytest.raises(SystemExit, match=r"confusers must be in \[0, 1\]"):
        main(["train-toy", "--out", str(tmp_path / "ck"), "--confusers", "2", "--steps", "1"])
    assert not (tmp_path / "ck" / "checkpoint.pt").exists()


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    toy.train(tmp_path / "whole", _tiny_recipe(), log=lambda m: None)
    real = toy.stage_batch

    def crash_at_3(r, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(r, step)

    monkeypatch.setattr(toy, "stage_batch", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        toy.train(tmp_path / "cut", _tiny_recipe(), log=lambda m: None)
    monkeypatch.setattr(toy, "stage_batch", real)
    messages = []  # a resumed run may change how it is watched and stopped (the time budget), not what it learns
    summary = toy.train(tmp_path / "cut", _tiny_recipe(minutes=10**6), log=messages.append)
    assert any("resuming" in m and "step 3" in m for m in messages) and summary["steps"] == 4
    whole, cut = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    with pytest.raises(ValueError, match="another recipe.*lr"):
        toy.train(tmp_path / "cut", _tiny_recipe(lr=5e-4), log=lambda m: None)


def test_demo_writes_pictures(tmp_path, capsys):
    from ivcprune.demo import main

    assert main(["--out", str(tmp_path), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "| test-0 |" in out and "KV cache after prefill" in out
    with Image.open(tmp_path / "sample_0.png") as im:
        assert im.width > 900 and im.height > 448


def test_model_card_has_recipe_curve_and_tables(tmp_path):
    from dataclasses import asdict

    from ivcprune.toy.card import write_card

    recipe = asdict(toy.ToyRecipe(align_steps=100))
    history = [{"step": 300, "images": 2400, "train_seconds": 400.0, "loss": 0.5, "acc": 0.125, "miou": 0.2}]
    (tmp_path / "training_log.json").write_text(json.dumps(
        {"recipe": recipe, "parameters": 1_600_000, "steps": 300, "images": 2400, "train_seconds": 400.0,
         "history": history}))
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 6}, "vision_config": {}}))
    row = {"method": "none", "label": "unpruned", "accuracy": 0.8, "mean_iou": 0.7, "mean_kept_visual_ratio": 1.0,
           "n_unparseable": 1, "n": 10, "accuracy_by_kind": {"attribute": 0.9, "ordinal": 0.5}}
    pruned = {**row, "method": "ivc", "label": "IVC-Prune", "budget": 0.5, "layer": 3, "accuracy": 0.6,
              "mean_kept_visual_ratio": 0.5, "accuracy_by_kind": {"attribute": 0.7}}
    card = write_card(tmp_path, {"Methods": [row, pruned]},
                      {"Methods": "ivcprune eval ...", "train": "ivcprune train-toy"})
    text = card.read_text()
    assert "| 300 | 2400 | 400.0 | 0.5 | 12.5 | 0.200 |" in text  # learning curve row
    assert "| IVC-Prune | 0.5 | 3 | 60.0 | 75.0% |" in text  # relative to unpruned
    assert "| attribute | ordinal |" in text and "| IVC-Prune | 0.5 | 3 | 70.0 | - |" in text
    # the stages as run: 100 alignment steps, then the remaining 200 of the 300 as instructions
    assert "stage 2a, alignment (the whole model): 100 steps" in text and "stage 2b, instructions: 200 steps" in text


def test_soft_bin_loss_prefers_near_misses_and_reports_the_error():
    import torch

    logits = torch.full((3, 449), -20.0)
    for row, guess in enumerate((100, 104, 300)):
        logits[row, guess] = 20.0
    target = torch.full((3,), 100.0)
    losses = [toy.soft_bin_loss(logits[i : i + 1], target[i : i + 1], 3.0) for i in range(3)]
    assert losses[0][0] < losses[1][0] < losses[2][0]  # exact < 4 px off < 200 px off
    assert [round(float(e)) for _, e in losses] == [0, 4, 200]
