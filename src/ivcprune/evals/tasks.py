"""One sample -> one prediction record: prompts per task and model family, generation, answer extraction.

Prompts follow what the authors' evaluation used (VLMEvalKit's Qwen2-VL / Qwen2.5-VL prompts):

- multiple choice: ``Hint: ...`` (when there is one), ``Question: ...``, ``Options:`` one ``X. text`` per
  line, then "Please select the correct answer from the options above." (the Chinese instruction when
  the prompt is Chinese);
- yes/no: the question plus " Please answer yes or no." unless the question already asks for it (MME);
- grounding: the family's ``authors_grounding_prompt`` (``--grounding-prompt authors``) or its
  ``grounding_prompt`` (``ivcprune``) (JSON ``bbox_2d`` for Qwen2.5-VL, ``<|box_start|>`` in a 0-1000 frame for
  Qwen2-VL); answers are read by the ``authors`` or ``lenient`` box parser (``--boxes``).

Images are resized within the pixel bounds the authors configured per model and task
(:func:`authors_pixels`; ``--min-pixels`` / ``--max-pixels`` override them). Decoding is greedy. Records
carry the raw answer, the extracted prediction, correctness, the visual tokens kept and the time to the
first token (prefill, vision encoder included; in a batch, the batch's prefill). Samples are answered in
batches through :mod:`ivcprune.generation` (:func:`predict_samples`; :func:`predict_sample` is the batch
of one); a sample's record does not depend on its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..families import FAMILIES, Family
from ..generation import Request, generate_batch
from ..media import ImageView
from ..methods import PruningMethod
from .answers import DEFAULT_MODE, predictions
from .benchmarks import Sample
from .grounding import grounding_record


def _family(name: str) -> type[Family]:
    return FAMILIES.get(name, Family)


def authors_pixels(config, task: str) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of the images, as the authors' evaluation configured the model's family
    for ``task`` (:meth:`Family.pixel_bounds`; qwen-vl-utils' defaults, 4 to 16384 tokens, elsewhere)."""
    return _family(getattr(config, "model_type", "")).pixel_bounds(config, task)


def mcq_prompt(sample: Sample, family: str = "qwen2_5_vl") -> str:
    """The multiple-choice prompt of ``family`` (a model type)."""
    return _family(family).mcq_prompt(sample.question, sample.options, sample.hint)


def yesno_prompt(sample: Sample, family: str = "qwen2_5_vl") -> str:
    """The yes/no prompt of ``family`` (a model type)."""
    return _family(family).yesno_prompt(sample.question)


@dataclass
class Generated:
    text: str
    prefill_s: float
    report: Any
    grid: list[int]  # (t, h, w) patches of the first image
    seen: list[Any]  # the images as the model saw them (resized; InternVL: the originals, tiled)
    views: list[Any] = field(default_factory=list)  # per image: original pixels -> seen pixels (ivcprune.media)


def generate_answers(model, processor, prompts: Sequence[tuple[Sequence[Any], str]], method: PruningMethod | None,
                     *, max_new_tokens: int, pixels: tuple[int | None, int | None] = (None, None),
                     max_tiles: int | None = None) -> list[Generated]:
    """Greedy answers to ``prompts`` (``(images, text)`` pairs, images resized within ``pixels`` = min,
    max, Qwen-VL; at most ``max_tiles`` tiles each, InternVL) under ``method``, in one batch
    (:func:`ivcprune.generation.generate_batch`): each answer is the one its prompt gets alone."""
    requests = [Request(images, prompt, min_pixels=pixels[0], max_pixels=pixels[1], max_tiles=max_tiles)
                for images, prompt in prompts]
    rows = generate_batch(model, processor, requests, method, max_new_tokens=max_new_tokens)
    return [Generated(text=r.text, prefill_s=0.0 if math.isnan(r.prefill_s) else r.prefill_s, report=r.report,
                      grid=r.grids[0] if r.grids else [0, 0, 0], seen=r.seen, views=r.views) for r in rows]


def generate_answer(model, processor, images, prompt: str, method: PruningMethod | None, *,
                    max_new_tokens: int, pixels: tuple[int | None, int | None] = (None, None)) -> Generated:
    """Greedy answer to ``prompt`` about ``images`` (resized within ``pixels`` = min, max), under ``method``."""
    return generate_answers(model, processor, [(images, prompt)], method, max_new_tokens=max_new_tokens,
                            pixels=pixels)[0]


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
    from ..viz import DISPLAY_SIDE, prediction_picture

    rep = gen.report
    if rep is None or not rep.spans or not gen.seen or \
            (rep.spans[0].grid is None and rep.spans[0].tiles is None and rep.spans[0].layout is None):
        return False
    span, seen = rep.spans[0], gen.seen[0]
    view = gen.views[0] if gen.views else None
    boxes = []
    if sample.task == "grounding":  # boxes in original pixels, drawn where they land on the image as seen
        ow, oh = sample.images[0].size
        if view is None:
            view = ImageView((ow, oh), seen.size, (seen.width / ow, seen.height / oh))
        for key, color, label in (("gt", (0, 170, 0), "truth"), ("box", (220, 0, 200), "answer")):
            b = rec.get(key)
            boxes.append((view.box(b), color, label))
        verdict = f"IoU {rec['iou']:.2f}"
    else:
        verdict = f"answer {rec['pred'] or '?'}, truth {rec['gt']}: {'right' if rec['correct'] else 'wrong'}"
    shown = min(seen.width, DISPLAY_SIDE) if span.grid is None else seen.width  # tiled originals are shrunk
    width = max(20, shown // 6 - len(verdict) - 4)  # the default font is about 6 px a character
    question = " ".join(sample.question.split())
    question = question if len(question) <= width else question[: width - 3] + "..."
    pic = prediction_picture(seen, span, None, boxes,
                             (f"{question}  {verdict}",
                              f"kept {span.kept}/{span.length} visual tokens at layer {rep.layer}"),
                             tiles=view.tiles if view is not None else None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pic.save(path)
    return True


def predict_sample(model, processor, sample: Sample, method: PruningMethod | None, *, family: str,
                   max_new_tokens: int | None = None, prompt_template: str | None = None,
                   pixels: tuple[int | None, int | None] = (None, None), picture=None,
                   answers: str = DEFAULT_MODE) -> dict[str, Any]:
    """Answer one sample and judge it; the record the run's predictions file gets. With ``picture`` (a
    path), a pruned sample's kept tokens are drawn there too (:func:`save_picture`)."""
    return predict_samples(model, processor, [sample], method, family=family, max_new_tokens=max_new_tokens,
                           prompt_template=prompt_template, pixels=pixels, pictures=[picture], answers=answers)[0]


# answer length per task where --max-new-tokens is not given
DEFAULT_MAX_NEW_TOKENS = {"grounding": 64, "mcq": 32, "yesno": 16}


def predict_samples(model, processor, samples: Sequence[Sample], method: PruningMethod | None, *, family: str,
                    max_new_tokens: int | None = None, prompt_template: str | None = None,
                    pixels: tuple[int | None, int | None] = (None, None), pictures: Sequence[Any] | None = None,
                    boxes: str = "authors", answers: str = DEFAULT_MODE, max_tiles: int | None = None
                    ) -> list[dict[str, Any]]:
    """:func:`predict_sample` for several samples, answered in batches (one per answer length); every
    record equals the one its sample gets alone (timings aside). ``pictures``: a path or ``None`` per
    sample; ``answers``: the answer-reading mode (:mod:`ivcprune.evals.answers`); ``max_tiles``: InternVL's
    tiles per image at most."""
    tiles = {} if max_tiles is None else {"max_tiles": max_tiles}  # (only tiled models take the argument)
    prompts = [sample_prompt(s, family, prompt_template) for s in samples]
    limits = [max_new_tokens or DEFAULT_MAX_NEW_TOKENS[s.task] for s in samples]
    gens: list[Generated | None] = [None] * len(samples)
    for limit in dict.fromkeys(limits):
        rows = [i for i, n in enumerate(limits) if n == limit]
        outs = generate_answers(model, processor, [(samples[i].images, prompts[i]) for i in rows], method,
                                max_new_tokens=limit, pixels=pixels, **tiles)
        for i, gen in zip(rows, outs, strict=True):
            gens[i] = gen
    records = []
    for i, (sample, gen) in enumerate(zip(samples, gens, strict=True)):
        rec = sample_record(model, sample, gen, family, boxes, answers)
        if pictures is not None and pictures[i] is not None:
            save_picture(pictures[i], model, sample, gen, rec)
        records.append(rec)
    return records


def sample_prompt(sample: Sample, family: str, prompt_template: str | None = None) -> str:
    """The prompt text of a sample (the task's prompt, through ``prompt_template`` when given)."""
    if sample.task == "grounding":
        template = prompt_template or _family(family).grounding_prompts()["authors"]
        return template.format(ref=_family(family).grounding_ref(template, sample.question))
    if sample.task == "mcq":
        prompt = mcq_prompt(sample, family)
    elif sample.task == "yesno":
        prompt = yesno_prompt(sample, family)
    else:
        raise ValueError(f"unknown task {sample.task!r}")
    if prompt_template:
        prompt = prompt_template.format(prompt=prompt, question=sample.question)
    return prompt


def sample_record(model, sample: Sample, gen: Generated, family: str, boxes: str = "authors",
                  answers: str = DEFAULT_MODE) -> dict[str, Any]:
    """Judge a sample's answer: the record of the predictions file (grounding answers read by the ``boxes``
    parser). Multiple choice and yes/no: ``pred`` under the mode ``answers``, ``pred_vlmevalkit`` /
    ``pred_lenient`` under each mode, ``answers`` and, for multiple choice, the ``options`` (so that
    ``score`` can read the raw ``answer`` again)."""
    if sample.task == "grounding":
        if gen.views:  # the size of the image as seen (Qwen-VL: the resized image, whose pixels its boxes use)
            resized = tuple(gen.views[0].seen_size)
        else:
            patch = model.config.vision_config.patch_size
            resized = (gen.grid[2] * patch, gen.grid[1] * patch)
        rec = grounding_record(sample.id, sample.question, gen.text, sample.answer, family, resized,
                               sample.images[0].size, kind=sample.meta.get("kind"), parser=boxes)
        return {**rec, **_visual_fields(gen)}
    preds = predictions(sample.task, gen.text, sample.options, answers)
    rec = {"id": sample.id, "task": sample.task, "answer": gen.text, **preds, "gt": sample.answer,
           "correct": preds["pred"] == sample.answer}
    if sample.task == "mcq":
        rec["options"] = dict(sample.options)
    rec.update({k: sample.meta[k] for k in ("category", "l2_category", "split", "image_key") if k in sample.meta})
    return {**rec, **_visual_fields(gen)}


def sample_size(sample: Sample) -> tuple:
    """Sort key that puts samples of equal image sizes next to each other (batches with little padding);
    reads image headers only."""
    sizes = tuple(tuple(im.size) for im in sample.images)
    return (len(sizes), sum(w * h for w, h in sizes), sizes)
