"""One sample -> one prediction record: prompts per task and model family, generation, answer extraction.

Prompts follow what the authors' evaluation used (VLMEvalKit's Qwen2-VL / Qwen2.5-VL prompts):

- multiple choice: ``Hint: ...`` (when there is one), ``Question: ...``, ``Options:`` one ``X. text`` per
  line, then "Please select the correct answer from the options above." (the Chinese instruction when
  the prompt is Chinese);
- yes/no: the question plus " Please answer yes or no." unless the question already asks for it (MME);
- grounding: ``grounding.evaluate.PROMPTS`` (JSON ``bbox_2d`` for Qwen2.5-VL, ``<|box_start|>`` in a
  0-1000 frame for Qwen2-VL).

Images are resized within the pixel bounds the authors configured per model and task
(:func:`authors_pixels`; ``--min-pixels`` / ``--max-pixels`` override them). Decoding is greedy. Records carry the raw answer, the extracted prediction, correctness, the visual
tokens kept and the time to the first token (prefill, vision encoder included).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bench import StepClock
from ..inputs import build_inputs, user_message
from ..methods import PruningMethod
from .answers import extract_choice, extract_yes_no
from .benchmarks import Sample

MCQ_INSTRUCTION = {"en": "Please select the correct answer from the options above.", "zh": "请直接回答选项字母。"}
YESNO_SUFFIX = " Please answer yes or no."
DEFAULT_MAX_NEW_TOKENS = {"grounding": 64, "mcq": 32, "yesno": 16}
_PX = 28 * 28  # pixels of one merged visual token


def authors_pixels(config, task: str) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of the images, as the authors' evaluation configured each model.

    Qwen2.5-VL: 4 to 16384 tokens for grounding; for VQA at most 6000 tokens (7B, 28 layers) or 6384
    (3B, 36 layers). Qwen2-VL: 1280 to 16384 tokens. Other models: qwen-vl-utils' defaults (4 to 16384).
    """
    model_type = getattr(config, "model_type", "")
    if model_type == "qwen2_vl":
        return 1280 * _PX, 16384 * _PX
    if model_type == "qwen2_5_vl" and task != "grounding":
        layers = config.get_text_config().num_hidden_layers
        return 4 * _PX, (6384 if layers == 36 else 6000) * _PX
    return 4 * _PX, 16384 * _PX


def mcq_prompt(sample: Sample, family: str = "qwen2_5_vl") -> str:
    """The multiple-choice prompt (same for both Qwen-VL families)."""
    text = f"Hint: {sample.hint}\n" if sample.hint else ""
    text += f"Question: {sample.question}\n"
    if sample.options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in sample.options.items())
        text += MCQ_INSTRUCTION["zh" if re.search("[\u4e00-\u9fff]", text) else "en"]
    return text.rstrip()


def yesno_prompt(sample: Sample, family: str = "qwen2_5_vl") -> str:
    q = sample.question.rstrip()
    return q if re.search(r"yes\s+or\s+no", q, re.I) else q + YESNO_SUFFIX


@dataclass
class Generated:
    text: str
    prefill_s: float
    report: Any
    grid: list[int]  # (t, h, w) patches of the first image
    seen: list[Any]  # the images as the model saw them (resized)


@torch.inference_mode()
def generate_answer(model, processor, images, prompt: str, method: PruningMethod | None, *,
                    max_new_tokens: int, pixels: tuple[int | None, int | None] = (None, None)) -> Generated:
    """Greedy answer to ``prompt`` about ``images`` (resized within ``pixels`` = min, max), under ``method``."""
    from transformers import LogitsProcessorList

    inputs, seen = build_inputs(processor, user_message(prompt, images, min_pixels=pixels[0], max_pixels=pixels[1]))
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    clock = StepClock(device)  # stamps each step once its logits exist; the first one ends prefill
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]))
    t0 = time.perf_counter()
    if method is not None:
        with method(model):
            out = model.generate(**inputs, **kw)
        report = method.last_report
    else:
        out = model.generate(**inputs, **kw)
        report = None
    text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    grid = inputs["image_grid_thw"][0].tolist() if "image_grid_thw" in inputs else [0, 0, 0]
    return Generated(text=text, prefill_s=clock.stamps[0] - t0 if clock.stamps else 0.0, report=report, grid=grid,
                     seen=seen)


def _visual_fields(gen: Generated) -> dict[str, Any]:
    rep = gen.report
    return {
        "visual_tokens": rep.visual_tokens if rep else None,
        "visual_kept": rep.visual_kept if rep else None,
        "kept_visual_ratio": rep.kept_visual_ratio if rep else 1.0,
        "prefill_s": round(gen.prefill_s, 5),
    }


def save_picture(path, model, sample: Sample, gen: Generated, rec: dict[str, Any]) -> bool:
    """The kept visual tokens of the sample's first image, beside its boxes (grounding: truth green,
    answer magenta) or its answer; ``False`` (nothing written) when nothing was pruned."""
    from ..viz import prediction_picture

    rep = gen.report
    if rep is None or not rep.spans or rep.spans[0].grid is None or not gen.seen:
        return False
    span, seen = rep.spans[0], gen.seen[0]
    vc = model.config.vision_config
    cell = vc.patch_size * vc.spatial_merge_size
    boxes = []
    if sample.task == "grounding":
        ow, oh = sample.images[0].size
        sx, sy = seen.width / ow, seen.height / oh
        for key, color, label in (("gt", (0, 170, 0), "truth"), ("box", (220, 0, 200), "answer")):
            b = rec.get(key)
            boxes.append((None if b is None else (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy), color, label))
        verdict = f"IoU {rec['iou']:.2f}"
    else:
        verdict = f"answer {rec['pred'] or '?'}, truth {rec['gt']}: {'right' if rec['correct'] else 'wrong'}"
    width = max(20, seen.width // 6 - len(verdict) - 4)  # the default font is about 6 px a character
    question = " ".join(sample.question.split())
    question = question if len(question) <= width else question[: width - 3] + "..."
    pic = prediction_picture(seen, span, cell, boxes,
                             (f"{question}  {verdict}", f"kept {span.kept}/{span.length} visual tokens at layer {rep.layer}"))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pic.save(path)
    return True


def predict_sample(model, processor, sample: Sample, method: PruningMethod | None, *, family: str,
                   max_new_tokens: int | None = None, prompt_template: str | None = None,
                   pixels: tuple[int | None, int | None] = (None, None), picture=None) -> dict[str, Any]:
    """Answer one sample and judge it; the record the run's predictions file gets. With ``picture`` (a
    path), a pruned sample's kept tokens are drawn there too (:func:`save_picture`)."""
    rec, gen = _predict(model, processor, sample, method, family=family, max_new_tokens=max_new_tokens,
                        prompt_template=prompt_template, pixels=pixels)
    if picture is not None:
        save_picture(picture, model, sample, gen, rec)
    return rec


def _predict(model, processor, sample: Sample, method: PruningMethod | None, *, family: str,
             max_new_tokens: int | None, prompt_template: str | None, pixels: tuple[int | None, int | None]
             ) -> tuple[dict[str, Any], Generated]:
    if sample.task == "grounding":
        from ..grounding.evaluate import grounding_prompt, grounding_record

        template = prompt_template or grounding_prompt(family)
        gen = generate_answer(model, processor, sample.images, template.format(ref=sample.question), method,
                              max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS["grounding"], pixels=pixels)
        patch = model.config.vision_config.patch_size
        resized = (gen.grid[2] * patch, gen.grid[1] * patch)
        rec = grounding_record(sample.id, sample.question, gen.text, sample.answer, family, resized,
                               sample.images[0].size, kind=sample.meta.get("kind"))
        return {**rec, **_visual_fields(gen)}, gen
    if sample.task == "mcq":
        prompt = mcq_prompt(sample, family)
    elif sample.task == "yesno":
        prompt = yesno_prompt(sample, family)
    else:
        raise ValueError(f"unknown task {sample.task!r}")
    if prompt_template:
        prompt = prompt_template.format(prompt=prompt, question=sample.question)
    gen = generate_answer(model, processor, sample.images, prompt, method,
                          max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS[sample.task], pixels=pixels)
    pred = extract_choice(gen.text, sample.options) if sample.task == "mcq" else extract_yes_no(gen.text)
    rec = {"id": sample.id, "task": sample.task, "answer": gen.text, "pred": pred, "gt": sample.answer,
           "correct": pred == sample.answer}
    rec.update({k: sample.meta[k] for k in ("category", "l2_category", "split", "image_key") if k in sample.meta})
    return {**rec, **_visual_fields(gen)}, gen
