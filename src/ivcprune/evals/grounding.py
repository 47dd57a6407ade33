"""Grounding (Acc@0.5): judging one answer in the family's box format and frame, and the grounding table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..boxes import iou, parse_box
from ..families import family_class
from .metrics import grounding_metrics, read_records


def to_original(box, style: str, resized_wh: tuple[int, int], original_wh: tuple[int, int]):
    """A box in the answer frame of family ``style`` (a model type) -> original image pixels. Frames
    (``box_frame``): ``pixels`` of the resized image (``resized_wh``), ``1000`` (0-1000 of the original image),
    ``square1`` (0-1 of the original image padded to a centred square of side max(W, H): LLaVA-1.5's)."""
    if box is None:
        return None
    W, H = original_wh
    frame = family_class(style).box_frame
    if frame == "square1":
        side = max(W, H)
        dx, dy = (side - W) / 2.0, (side - H) / 2.0
        return (box[0] * side - dx, box[1] * side - dy, box[2] * side - dx, box[3] * side - dy)
    if frame == "1000":
        sx, sy = W / 1000.0, H / 1000.0
    else:
        sx, sy = W / resized_wh[0], H / resized_wh[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def authors_to_original(box, style: str, resized_wh: tuple[int, int], original_wh: tuple[int, int]):
    """:func:`to_original` as the authors' evaluation maps boxes (``Grounding_COCO.evaluate`` of their
    VLMEvalKit fork): Qwen2-VL boxes are divided by 1000; then a box whose coordinates are all <= 1.1 is
    taken as normalised and multiplied by the original width / height. Any other Qwen2-VL box (a coordinate
    over 1100) stays as divided, compared with pixels (a miss in practice); any other Qwen2.5-VL box is in
    pixels (of the resized image, mapped to the original here: IoU is the same in either frame). So an
    integer Qwen2.5-VL box of 0s and 1s only is read as the whole-image fraction, as theirs is.

    InternVL (``ref_box``, ``vlmeval/vlm/internvl/internvl_chat_grounding.py``): a box whose four coordinates
    sum to 4 or more is divided by 1000, a smaller one is taken as 0-1 already; then the same rule. LLaVA
    (``square1``): the authors evaluated no LLaVA grounding; mapped as :func:`to_original` maps it."""
    if box is None:
        return None
    family = family_class(style)
    if family.box_frame == "square1":
        return to_original(box, style, resized_wh, original_wh)
    W, H = original_wh
    frame_1000 = family.box_frame == "1000"
    if family.box_format == "ref_box" and sum(box) < 4:
        v = tuple(box)
    else:
        v = tuple(c / 1000.0 for c in box) if frame_1000 else tuple(box)
    if all(c <= 1.1 for c in v):
        return (v[0] * W, v[1] * H, v[2] * W, v[3] * H)
    return v if frame_1000 else to_original(box, style, resized_wh, original_wh)


def grounding_record(sample_id: str, ref: str, text: str, gt, style: str, resized_wh: tuple[int, int],
                     original_wh: tuple[int, int], kind: str | None = None, parser: str = "authors"
                     ) -> dict[str, Any]:
    """Judge one grounding answer: parse the box in the model's frame (``parser``: ``authors`` or
    ``lenient``, :mod:`ivcprune.boxes`), map it to original pixels, IoU. ``hit`` is decided on the IoU the
    record holds (unrounded), the one the score counts."""
    raw_box = parse_box(text, family_class(style).box_format, parser)
    mapping = authors_to_original if parser == "authors" else to_original
    box = mapping(raw_box, style, resized_wh, original_wh)
    value = iou(box, gt)
    return {
        "id": sample_id,
        "task": "grounding",
        "ref": ref,
        "answer": text,
        "box_model": list(raw_box) if raw_box else None,
        "box": [round(v, 2) for v in box] if box else None,
        "gt": [round(v, 2) for v in gt],
        "iou": value,
        "hit": value >= 0.5,
        "boxes": parser,
        "kind": kind,
        "resized": list(resized_wh),
    }


def score_predictions(pred_path: str | Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics from a predictions file alone (last record per id wins)."""
    recs = list(read_records([Path(pred_path)]).values())
    return {**(info or {}), **grounding_metrics(recs)}


def run_cells(r: dict[str, Any]) -> str:
    """The leading cells of a run's table row: method label, budget and K ("-" for the unpruned run)."""
    pruned = r.get("method") != "none"
    budget, layer = (r.get("budget"), r.get("layer")) if pruned else ("-", "-")
    return f"| {r.get('label', r.get('method'))} | {budget} | {layer} |"


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """One table over several runs; relative accuracy against the unpruned run when there is one; prefill ms
    is the mean time to the first token per sample (vision encoder included; a batch's prefill when batched)."""
    base = next((r for r in rows if r.get("method") == "none"), None)
    lines = [
        "| method | budget | K | Acc@0.5 | rel. to unpruned | mean IoU | kept visual | unparseable | n | prefill ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = f"{100 * r['accuracy'] / base['accuracy']:.1f}%" if base and base["accuracy"] else "n/a"
        prefill = r.get("mean_prefill_s")
        lines.append(
            f"{run_cells(r)} {100 * r['accuracy']:.1f} | {rel} "
            f"| {r['mean_iou']:.3f} | {100 * r['mean_kept_visual_ratio']:.1f}% | {r['n_unparseable']} | {r['n']} "
            f"| {'-' if prefill is None else f'{1000 * prefill:.1f}'} |"
        )
    return "\n".join(lines)
