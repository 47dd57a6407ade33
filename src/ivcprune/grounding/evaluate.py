"""Grounding evaluation (Acc@0.5): prompts and answer frames of each family, the per-sample record, the
method grid and the grounding comparison table. Runs themselves (resume, data-parallel, scoring) are
:mod:`ivcprune.evals.runner`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..evals.benchmarks import Sample
from ..evals.metrics import grounding_metrics, read_records
from ..evals.runner import run_resumable
from ..evals.tasks import predict_sample
from ..methods import PruningMethod
from .boxes import iou, parse_box
from .data import GroundingItem, SkippedRow

PROMPTS = {
    "qwen2_5_vl": "Locate {ref} in the image and output its bbox coordinates in JSON format.",
    "qwen2_vl": "Output the bounding box of <|object_ref_start|>{ref}<|object_ref_end|> in the image.",
}


def grounding_prompt(family: str) -> str:
    """The grounding prompt template (``{ref}``) of a model family; Qwen2.5-VL's for other families."""
    return PROMPTS.get(family, PROMPTS["qwen2_5_vl"])


def _to_original(box, style: str, resized_wh: tuple[int, int], original_wh: tuple[int, int]):
    """Model-frame box -> original image pixels."""
    if box is None:
        return None
    W, H = original_wh
    if style == "qwen2_vl":
        sx, sy = W / 1000.0, H / 1000.0
    else:
        sx, sy = W / resized_wh[0], H / resized_wh[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def grounding_record(sample_id: str, ref: str, text: str, gt, style: str, resized_wh: tuple[int, int],
                     original_wh: tuple[int, int], kind: str | None = None) -> dict[str, Any]:
    """Judge one grounding answer: parse the box in the model's frame, map it to original pixels, IoU."""
    raw_box = parse_box(text, style)
    box = _to_original(raw_box, style, resized_wh, original_wh)
    value = iou(box, gt)
    return {
        "id": sample_id,
        "task": "grounding",
        "ref": ref,
        "answer": text,
        "box_model": list(raw_box) if raw_box else None,
        "box": [round(v, 2) for v in box] if box else None,
        "gt": [round(v, 2) for v in gt],
        "iou": round(value, 6),
        "hit": value >= 0.5,
        "kind": kind,
        "resized": list(resized_wh),
    }


def score_predictions(pred_path: str | Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics from a predictions file alone (last record per id wins)."""
    recs = list(read_records([Path(pred_path)]).values())
    return {**(info or {}), **grounding_metrics(recs)}


def predict(model, processor, item: GroundingItem, method: PruningMethod | None, *, style: str, prompt: str,
            max_new_tokens: int = 64) -> dict[str, Any]:
    """Answer one grounding item and score it (IoU in original pixels)."""
    sample = Sample(id=item.id, task="grounding", images=[item.image], question=item.ref, answer=item.box,
                    meta=item.meta)
    return predict_sample(model, processor, sample, method, family=style, max_new_tokens=max_new_tokens,
                          prompt_template=prompt)


def run_eval(model, processor, items: Iterable[GroundingItem], method: PruningMethod | None, out_dir: str | Path,
             *, info: dict[str, Any], total: int | None = None, style: str | None = None, prompt: str | None = None,
             max_new_tokens: int = 64, skipped: list[SkippedRow] | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Evaluate grounding items into ``out_dir`` (predictions.jsonl, metrics.json); resumes an interrupted run."""
    style = style or model.config.model_type
    prompt = prompt or grounding_prompt(style)
    info = {"task": "grounding", **info, "prompt": prompt, "style": style}
    return run_resumable(items, lambda it: predict(model, processor, it, method, style=style, prompt=prompt,
                                                   max_new_tokens=max_new_tokens),
                         out_dir, info=info, total=total, progress=progress, skipped=skipped)


def run_cells(r: dict[str, Any]) -> str:
    """The leading cells of a run's table row: method label, budget and K ("-" for the unpruned run)."""
    pruned = r.get("method") != "none"
    return f"| {r.get('label', r.get('method'))} | {r.get('budget') if pruned else '-'} | {r.get('layer') if pruned else '-'} |"


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """One table over several runs; relative accuracy against the unpruned run when there is one."""
    base = next((r for r in rows if r.get("method") == "none"), None)
    lines = [
        "| method | budget | K | Acc@0.5 | rel. to unpruned | mean IoU | kept visual | unparseable | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = f"{100 * r['accuracy'] / base['accuracy']:.1f}%" if base and base["accuracy"] else "n/a"
        lines.append(
            f"{run_cells(r)} {100 * r['accuracy']:.1f} | {rel} "
            f"| {r['mean_iou']:.3f} | {100 * r['mean_kept_visual_ratio']:.1f}% | {r['n_unparseable']} | {r['n']} |"
        )
    return "\n".join(lines)


# -- method grid (comparison mode) -----------------------------------------------------------------
def grid(methods: list[str], budgets: list[float | None], layers: list[int | None]):
    """(run name, method, budget, layer) for every combination; the unpruned run once."""
    runs = []
    for m in methods:
        if m == "none":
            runs.append(("none", m, None, None))
            continue
        for b in budgets:
            for k in layers:
                parts = [m]
                if b is not None:
                    parts.append(f"b{b:g}")
                if k is not None and len(layers) > 1:
                    parts.append(f"k{k}")
                runs.append(("-".join(parts), m, b, k))
    return runs
