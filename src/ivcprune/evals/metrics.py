"""Metrics of a run, computed from its prediction records alone.

Every metrics dict has ``score``, the benchmark's headline number (0-100, except MME):

- grounding: Acc@0.5 (IoU >= 0.5 with the ground-truth box), in %;
- multiple choice: accuracy in %; MMBench TSVs that carry VLMEvalKit's circular copies (index + k * 1e6)
  score a question right only when every rotation of it is right (``circular_accuracy``), as VLMEvalKit;
- MME: perception + cognition, each the sum over its subtasks of accuracy + accuracy+ (both questions of
  an image right), in points (max 2000 + 800);
- POPE and other yes/no sets: F1 of "yes" over all rows, in % (accuracy, precision, recall and the
  same per split / category are reported too); a row listed under several splits (``"popular,random"``)
  counts once in each split and once per split overall, as VLMEvalKit counts it.

No record, no score: every metric function returns ``score: None`` (and ``None`` for its other means)
for an empty list, so that a run that predicted nothing never shows a number in a table.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .answers import MODES, predictions

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
CIRCULAR_OFFSET = 1_000_000


@dataclass
class Scan:
    """What the prediction files hold: ``records`` by id (the last one of an id wins), the lines that are
    no record (``bad_lines``: ``"path:line"``; a last line a kill cut short is not one of them: it is
    expected, and dropped silently) and how many records an id later in the files replaced."""

    records: dict[str, dict]
    bad_lines: list[str] = field(default_factory=list)
    replaced: int = 0


def scan_records(paths: list[Path]) -> Scan:
    """Read prediction files (JSON lines with an ``id``): see :class:`Scan`."""
    scan = Scan({})
    for p in paths:
        p = Path(p)
        if not p.exists():
            continue
        lines = p.read_bytes().split(b"\n")
        for no, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key = str(rec["id"])
            except (ValueError, KeyError, TypeError, IndexError):  # UnicodeDecodeError is a ValueError
                if no < len(lines):  # a line ended by a newline, yet no record: damage, not a kill
                    scan.bad_lines.append(f"{p}:{no}")
                continue
            if key in scan.records:
                scan.replaced += 1
                del scan.records[key]  # the last record of an id wins, and takes its place in the order
            scan.records[key] = rec
    return scan


def read_records(paths: list[Path], *, warn: bool = True) -> dict[str, dict]:
    """Records of prediction files by id (the last one of an id wins; a last line cut by a crash is
    ignored; a damaged line elsewhere is ignored with a warning: its sample is not done, so the next run
    of the evaluation predicts it again)."""
    scan = scan_records(paths)
    if scan.bad_lines and warn:
        more = f" and {len(scan.bad_lines) - 3} more" if len(scan.bad_lines) > 3 else ""
        warnings.warn(f"{', '.join(scan.bad_lines[:3])}{more}: not a prediction record (damaged line), ignored; "
                      f"the next run of the evaluation predicts its sample again", stacklevel=2)
    return scan.records


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _common(recs: list[dict]) -> dict[str, Any]:
    kept = [r["kept_visual_ratio"] for r in recs if r.get("kept_visual_ratio") is not None]
    return {
        "n": len(recs),
        "mean_kept_visual_ratio": _mean(kept) if kept else 1.0 if recs else None,
        "mean_prefill_s": _mean(r.get("prefill_s", 0.0) for r in recs) if recs else None,
    }


def _nothing(**fields) -> dict[str, Any]:
    """Metrics of no record: no score (a mean over nothing is no number), nothing that could enter a table."""
    return {**_common([]), "accuracy": None, "score": None, "n_unparseable": 0, **fields}


def _hit(r: dict) -> bool:
    """A grounding record's hit as the record decided it (``hit``), from its IoU in older records."""
    return bool(r["hit"]) if "hit" in r else r["iou"] >= 0.5


def grounding_metrics(recs: list[dict]) -> dict[str, Any]:
    if not recs:
        return _nothing(mean_iou=None, accuracy_by_kind={})
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for r in recs:
        if r.get("kind"):
            by_kind[r["kind"]].append(_hit(r))
    acc = _mean(_hit(r) for r in recs)
    return {
        **_common(recs),
        "accuracy": acc,
        "score": 100 * acc,
        "mean_iou": _mean(r["iou"] for r in recs),
        "n_unparseable": sum(r.get("box") is None for r in recs),
        "accuracy_by_kind": {k: _mean(v) for k, v in sorted(by_kind.items())},
    }


def _by(recs: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        if r.get(key):
            groups[str(r[key])].append(r)
    return dict(sorted(groups.items()))


def mcq_metrics(recs: list[dict]) -> dict[str, Any]:
    if not recs:
        return _nothing(accuracy_by_category={})
    acc = _mean(r["correct"] for r in recs)
    out = {
        **_common(recs),
        "accuracy": acc,
        **_unparseable(recs),
        "accuracy_by_category": {k: _mean(r["correct"] for r in v) for k, v in _by(recs, "category").items()},
    }
    if any(r.get("l2_category") for r in recs):
        out["accuracy_by_l2_category"] = {k: _mean(r["correct"] for r in v)
                                          for k, v in _by(recs, "l2_category").items()}
    ids = [r["id"] for r in recs]
    if all(str(i).isdigit() for i in ids) and any(int(i) >= CIRCULAR_OFFSET for i in ids):
        groups: dict[int, list[dict]] = defaultdict(list)
        for r in recs:
            groups[int(r["id"]) % CIRCULAR_OFFSET].append(r)
        # one record per question: right only if every rotation is right (VLMEvalKit's per-category
        # tables of MMBench count these too)
        questions = [{**min(v, key=lambda r: int(r["id"])), "correct": all(r["correct"] for r in v)}
                     for v in groups.values()]
        out["circular_accuracy"] = _mean(q["correct"] for q in questions)
        out["n_questions"] = len(groups)
        for key in ("category", "l2_category"):
            if any(q.get(key) for q in questions):
                out[f"circular_accuracy_by_{key}"] = {k: _mean(q["correct"] for q in v)
                                                      for k, v in _by(questions, key).items()}
        out["score"] = 100 * out["circular_accuracy"]
    else:
        out["score"] = 100 * acc
    return out


def _yes_no_stats(recs: list[dict]) -> dict[str, float]:
    tp = sum(r["pred"] == "Yes" and r["gt"] == "Yes" for r in recs)
    fp = sum(r["pred"] == "Yes" and r["gt"] == "No" for r in recs)
    fn = sum(r["pred"] != "Yes" and r["gt"] == "Yes" for r in recs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(recs), "accuracy": _mean(r["correct"] for r in recs), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": _mean(r["pred"] == "Yes" for r in recs)}


def mme_scores(recs: list[dict]) -> dict[str, Any]:
    """MME: per subtask accuracy + accuracy+ (x100); perception and cognition sums; total."""
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        by_cat[r.get("category") or "?"][str(r.get("image_key") or r["id"])].append(bool(r["correct"]))
    sub = {}
    for cat, images in sorted(by_cat.items()):
        acc = _mean(c for v in images.values() for c in v)
        acc_plus = _mean(all(v) for v in images.values())
        sub[cat] = {"accuracy": 100 * acc, "accuracy_plus": 100 * acc_plus, "score": 100 * (acc + acc_plus)}
    perception = sum(v["score"] for k, v in sub.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in sub.items() if k in MME_COGNITION)
    return {"mme_perception": perception, "mme_cognition": cognition, "mme_total": perception + cognition,
            "mme_subtasks": sub}


def _explode_categories(recs: list[dict]) -> list[dict]:
    """One record per category of a comma-separated ``category`` (POPE shares a question between splits,
    ``"popular,random"``): counted once in each, and in the overall figures once per split, as VLMEvalKit."""
    out = []
    for r in recs:
        cats = [c.strip() for c in str(r.get("category") or "").split(",") if c.strip()]
        out.extend([{**r, "category": c} for c in cats] if len(cats) > 1 else [r])
    return out


def yesno_metrics(recs: list[dict], benchmark: str | None = None) -> dict[str, Any]:
    if not recs:
        return _nothing(n_scored=0, precision=None, recall=None, f1=None, yes_ratio=None, by_category={})
    samples = recs
    if not (benchmark or "").upper().startswith("MME"):
        recs = _explode_categories(recs)
    stats = _yes_no_stats(recs)
    out = {**_common(samples), **{k: v for k, v in stats.items() if k != "n"}, "n_scored": stats["n"],
           **_unparseable(samples)}
    groups = _by(recs, "category")
    out["by_category"] = {k: _yes_no_stats(v) for k, v in groups.items()}
    if (benchmark or "").upper().startswith("MME"):
        out.update(mme_scores(recs))
        out["score"] = out["mme_total"]
    else:
        out["score"] = 100 * stats["f1"]
        if groups:
            out["mean_f1_over_categories"] = _mean(v["f1"] for v in out["by_category"].values())
    return out


def reread_answers(recs: list[dict], task: str, mode: str | None = None) -> list[dict]:
    """Records with ``pred`` / ``pred_<mode>`` / ``correct`` extracted again from their raw ``answer`` under
    ``mode`` (default: the mode the record was made under, ``answers``). Records that cannot be read again
    are kept as they are: those of before the modes (no ``answers``) when no mode is asked, multiple-choice
    records without their ``options``. An answer no rule reads keeps the LLM judge's verdict (``judge``)."""
    if task not in ("mcq", "yesno"):
        return recs
    out = []
    for r in recs:
        m = mode or r.get("answers")
        if m is None or "answer" not in r or (task == "mcq" and not isinstance(r.get("options"), dict)):
            out.append(r)
            continue
        preds = predictions(task, r["answer"], r.get("options"), m)
        if preds["pred"] is None and isinstance(r.get("judge"), dict):  # the LLM judge's verdict, where asked
            preds["pred"] = r["judge"].get("verdict")
        out.append({**r, **preds, "correct": preds["pred"] is not None and preds["pred"] == r.get("gt")})
    return out


def _unparseable(recs: list[dict]) -> dict[str, Any]:
    """``n_unparseable`` (the mode each record was scored under) and ``n_unparseable_<mode>`` for every mode
    where the records carry it; ``answers``: the mode(s) of the records."""
    out: dict[str, Any] = {"n_unparseable": sum(r.get("pred") is None for r in recs)}
    for m in MODES:
        if recs and all(f"pred_{m}" in r for r in recs):
            out[f"n_unparseable_{m}"] = sum(r[f"pred_{m}"] is None for r in recs)
    modes = sorted({str(r.get("answers")) for r in recs if r.get("answers")})
    if modes:
        out["answers"] = modes[0] if len(modes) == 1 else ",".join(modes)
    return out


def score_records(recs: list[dict], task: str, benchmark: str | None = None,
                  answers: str | None = None) -> dict[str, Any]:
    """Metrics of records of one task (``grounding``, ``mcq`` or ``yesno``); no record gives ``score``
    ``None`` (and ``n`` 0), never a number. Multiple-choice and yes/no answers are read again from the raw
    ``answer`` (:func:`reread_answers`) under ``answers`` (else each record's own mode)."""
    recs = reread_answers(recs, task, answers)
    if task == "grounding":
        return grounding_metrics(recs)
    if task == "mcq":
        return mcq_metrics(recs)
    if task == "yesno":
        return yesno_metrics(recs, benchmark)
    raise ValueError(f"unknown task {task!r}")
