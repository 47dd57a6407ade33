"""Grounding evaluation (Acc@0.5): predictions.jsonl + metrics.json per run, comparison tables.

Runs are resumable: predictions are appended as they finish, a rerun skips the ids already in the file,
and the metrics are always recomputed from the predictions file alone.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..inputs import build_inputs, user_message
from ..methods import PruningMethod
from .boxes import iou, parse_box
from .data import GroundingItem, SkippedRow

PROMPTS = {
    "qwen2_5_vl": "Locate {ref} in the image and output its bbox coordinates in JSON format.",
    "qwen2_vl": "Output the bounding box of <|object_ref_start|>{ref}<|object_ref_end|> in the image.",
}


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


def done_ids(pred_path: Path) -> set[str]:
    ids = set()
    if pred_path.exists():
        with open(pred_path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    ids.add(str(json.loads(line)["id"]))
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by a crash: that sample is simply redone
    return ids


def score_predictions(pred_path: str | Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics from a predictions file alone (last record per id wins)."""
    records: dict[str, dict] = {}
    with open(pred_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rec = json.loads(line)
                    records[str(rec["id"])] = rec
                except (json.JSONDecodeError, KeyError):
                    continue
    recs = list(records.values())
    n = len(recs)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for r in recs:
        if r.get("kind"):
            by_kind[r["kind"]].append(r["iou"] >= 0.5)
    kept = [r["kept_visual_ratio"] for r in recs if r.get("kept_visual_ratio") is not None]
    metrics = {
        **(info or {}),
        "n": n,
        "accuracy": sum(r["iou"] >= 0.5 for r in recs) / n if n else 0.0,
        "mean_iou": sum(r["iou"] for r in recs) / n if n else 0.0,
        "n_unparseable": sum(r["box"] is None for r in recs),
        "mean_kept_visual_ratio": sum(kept) / len(kept) if kept else 1.0,
        "mean_prefill_s": sum(r.get("prefill_s", 0.0) for r in recs) / n if n else 0.0,
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
    }
    return metrics


class _PrefillClock:
    def __init__(self):
        self.t0 = 0.0
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter() - self.t0
        return scores


@torch.inference_mode()
def predict(model, processor, item: GroundingItem, method: PruningMethod | None, *, style: str, prompt: str,
            max_new_tokens: int = 64) -> dict[str, Any]:
    """Answer one grounding item and score it (IoU in original pixels)."""
    from transformers import LogitsProcessorList

    msgs = user_message(prompt.format(ref=item.ref), [item.image])
    inputs, images = build_inputs(processor, msgs)
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    grid = inputs["image_grid_thw"][0].tolist()
    patch = model.config.vision_config.patch_size
    resized = (grid[2] * patch, grid[1] * patch)
    clock = _PrefillClock()
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]))
    clock.t0 = time.perf_counter()
    if method is not None:
        with method(model):
            out = model.generate(**inputs, **kw)
        rep = method.last_report
    else:
        out = model.generate(**inputs, **kw)
        rep = None
    text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    raw_box = parse_box(text, style)
    box = _to_original(raw_box, style, resized, item.image.size)
    value = iou(box, item.box)
    return {
        "id": item.id,
        "ref": item.ref,
        "answer": text,
        "box_model": list(raw_box) if raw_box else None,
        "box": [round(v, 2) for v in box] if box else None,
        "gt": [round(v, 2) for v in item.box],
        "iou": round(value, 6),
        "hit": value >= 0.5,
        "kind": item.meta.get("kind"),
        "resized": list(resized),
        "visual_tokens": rep.visual_tokens if rep else None,
        "visual_kept": rep.visual_kept if rep else None,
        "kept_visual_ratio": rep.kept_visual_ratio if rep else 1.0,
        "prefill_s": round(clock.first or 0.0, 5),
    }


def run_eval(model, processor, items: Iterable[GroundingItem], method: PruningMethod | None, out_dir: str | Path,
             *, info: dict[str, Any], total: int | None = None, style: str | None = None, prompt: str | None = None,
             max_new_tokens: int = 64, skipped: list[SkippedRow] | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Evaluate into ``out_dir`` (predictions.jsonl, metrics.json); resumes an interrupted run."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    style = style or model.config.model_type
    prompt = prompt or PROMPTS.get(style, PROMPTS["qwen2_5_vl"])
    done = done_ids(pred_path)
    bar = tqdm(total=total, desc=info.get("name", "eval"), unit="sample", disable=not progress, initial=0)
    t0 = time.time()
    with open(pred_path, "a", encoding="utf-8") as f:
        for item in items:
            if item.id in done:
                bar.update(1)
                continue
            rec = predict(model, processor, item, method, style=style, prompt=prompt, max_new_tokens=max_new_tokens)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            bar.update(1)
    bar.close()
    skipped = skipped or []
    info = {**info, "prompt": prompt, "style": style, "n_skipped": len(skipped),
            "skipped": [s.__dict__ for s in skipped[:50]], "wall_s": round(time.time() - t0, 1)}
    metrics = score_predictions(pred_path, info)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


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
EVAL_METHODS = ("none", "ivc", "random", "ivc_only", "no_ivc", "no_foreground")
METHOD_LABELS = {
    "none": "unpruned",
    "ivc": "IVC-Prune",
    "random": "random",
    "ivc_only": "IVC only",
    "no_ivc": "foreground only",
    "no_foreground": "IVC tokens alone",
}


def make_eval_method(name: str, budget: float | None, layer: int | None, **knobs) -> PruningMethod | None:
    """Method for an eval name; ablations are IVC-Prune with ``ablation`` set."""
    from ..methods import IVCPrune, RandomPrune

    if name not in EVAL_METHODS:
        raise ValueError(f"unknown eval method {name!r}; choose from {', '.join(EVAL_METHODS)}")
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if name == "none":
        return None
    if name == "random":
        return RandomPrune(layer=layer, budget=budget, seed=knobs.get("seed", 0))
    knobs.pop("seed", None)
    if name != "ivc":
        knobs["ablation"] = name
    return IVCPrune(layer=layer, budget=budget, **knobs)


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
