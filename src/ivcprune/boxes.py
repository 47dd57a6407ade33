"""Parsing grounding answers, and box geometry.

Qwen2.5-VL answers ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` (often inside a ```json fence, often
as a list) in pixels of the resized image; Qwen2-VL answers ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``
in a 0-1000 frame; LLaVA-1.5 a bare ``[x1, y1, x2, y2]`` in 0-1 of the image padded to a square (format
``list``); InternVL ``<ref>...</ref><box>[[x1, y1, x2, y2]]</box>`` in a 0-1000 frame (``ref_box``; the
``<ref>`` / ``<box>`` tags are special tokens, often decoded away). The same parser serves the project's own
model and real checkpoints. The frames are mapped to original pixels by :mod:`ivcprune.evals.grounding`.

Two parsers (``BOX_PARSERS``):

- ``authors`` (the default, the paper protocol): what the IVC-Prune authors' VLMEvalKit fork accepts
  (``vlmeval/vlm/qwen2_vl/model.py`` / ``vlm/ivcp/qwen2_5_ivcp.py``: ``extract_bbox_coordinates`` and
  ``extract_and_normalize_coordinates``): the first ``"bbox_2d":`` (quoted key, colon right after it) followed by
  ``[x1, y1, x2, y2]`` of unsigned integers (spaces only after the commas) for Qwen2.5-VL; the first
  ``(x1,y1),(x2,y2)`` of unsigned integers without any space for Qwen2-VL. Corners are kept as written (a swapped
  box has IoU 0, as in their ``bbox_overlaps``); anything else is a miss (they answer ``[0, 0, 0, 0]``).
  InternVL (``vlmeval/vlm/internvl/internvl_chat_grounding.py``, ``extract_and_normalize_coordinates``): the
  first ``[`` (or ``[[``) followed by four comma-separated fields up to a ``]`` on one line, each read as a
  float (any field that is not one makes the answer a miss), corners as written; the frame rule that goes
  with it (four coordinates summing to under 4 are taken as 0-1 already) is applied where boxes are mapped.
  LLaVA: the authors evaluated no LLaVA grounding, so ``authors`` reads LLaVA's lists as ``lenient`` does.
- ``lenient``: this project's parser: floats, signs, spaces, ``bbox``/unquoted keys, JSON lists, bare
  ``[a, b, c, d]`` lists, swapped corners put in order.
"""

from __future__ import annotations

import json
import re

Box = tuple[float, float, float, float]

_NUM = r"-?\d+(?:\.\d+)?"
_BBOX_KEY = re.compile(r'"?bbox_2d"?\s*:\s*\[\s*(' + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*("
                       + _NUM + r")\s*\]")
_QWEN2_BOX = re.compile(r"\(\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\)\s*,\s*\(\s*(" + _NUM + r")\s*,\s*(" + _NUM
                        + r")\s*\)")
_FOUR = re.compile(r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]")


def _ordered(vals) -> Box | None:
    x1, y1, x2, y2 = (float(v) for v in vals)
    if x2 < x1:
        x1, x2 = x2, x1
    if y2 < y1:
        y1, y2 = y2, y1
    return (x1, y1, x2, y2)


def _from_json(text: str) -> Box | None:
    body = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", body, re.S)
    if fence:
        body = fence.group(1).strip()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return None
    items = data if isinstance(data, list) else [data]
    for item in items:
        if isinstance(item, dict):
            b = item.get("bbox_2d", item.get("bbox"))
            if isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b):
                return _ordered(b)
    return None


def parse_qwen25_box(text: str) -> Box | None:
    """First box of a Qwen2.5-VL grounding answer, in the answer's pixel frame; ``None`` if there is none."""
    if not isinstance(text, str):
        return None
    box = _from_json(text)
    if box is not None:
        return box
    m = _BBOX_KEY.search(text)  # truncated or otherwise invalid JSON around a complete bbox_2d
    if m:
        return _ordered(m.groups())
    m = _FOUR.search(text)
    return _ordered(m.groups()) if m else None


def parse_qwen2_box(text: str) -> Box | None:
    """First box of a Qwen2-VL answer ``(x1,y1),(x2,y2)``, in its 0-1000 frame; ``None`` if there is none."""
    if not isinstance(text, str):
        return None
    m = _QWEN2_BOX.search(text)
    return _ordered(m.groups()) if m else None


def parse_list_box(text: str) -> Box | None:
    """First ``[x1, y1, x2, y2]`` of an answer (LLaVA-1.5's boxes, InternVL's inside ``<box>[[...]]</box>``;
    numbers with signs and decimals, any spacing), corners put in order; ``None`` if there is none."""
    if not isinstance(text, str):
        return None
    m = _FOUR.search(text)
    return _ordered(m.groups()) if m else None


PARSERS = {"bbox_2d": parse_qwen25_box, "box_tokens": parse_qwen2_box, "list": parse_list_box,
           "ref_box": parse_list_box}

# the authors' patterns (re-stated, not copied): integers only, the exact spacing their regexes allow
_AUTHORS_BBOX = re.compile(r'"bbox_2d":\s*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\]')
_AUTHORS_QWEN2 = re.compile(r"\((\d+),(\d+)\),\((\d+),(\d+)\)")


def authors_qwen25_box(text: str) -> Box | None:
    """Qwen2.5-VL box as the authors' evaluation reads it: the first well-formed integer ``"bbox_2d": [...]``,
    corners as written; ``None`` (their ``[0, 0, 0, 0]``, a miss) otherwise."""
    m = _AUTHORS_BBOX.search(text) if isinstance(text, str) else None
    return tuple(float(v) for v in m.groups()) if m else None


def authors_qwen2_box(text: str) -> Box | None:
    """Qwen2-VL box as the authors' evaluation reads it: the first ``(x1,y1),(x2,y2)`` of integers with no
    space, in its 0-1000 frame, corners as written; ``None`` otherwise."""
    m = _AUTHORS_QWEN2.search(text) if isinstance(text, str) else None
    return tuple(float(v) for v in m.groups()) if m else None


# InternVL's four fields: from the first run of "[" to the first "]" on the line, split at the first three commas
_AUTHORS_INTERNVL = re.compile(r"\[+(.*?),(.*?),(.*?),(.*?)\]")


def authors_internvl_box(text: str) -> Box | None:
    """InternVL box as the authors' evaluation reads it: the first bracketed four fields (see the module
    notes), each a float, corners as written, in the answer's frame; ``None`` (their ``[0, 0, 0, 0]``, a miss)
    when there is none or a field is no number."""
    m = _AUTHORS_INTERNVL.search(text) if isinstance(text, str) else None
    if not m:
        return None
    try:
        return tuple(float(v) for v in m.groups())
    except ValueError:
        return None


AUTHORS_PARSERS = {"bbox_2d": authors_qwen25_box, "box_tokens": authors_qwen2_box, "list": parse_list_box,
                   "ref_box": authors_internvl_box}
BOX_PARSERS = {"authors": AUTHORS_PARSERS, "lenient": PARSERS}


def parse_box(text: str, box_format: str = "bbox_2d", parser: str = "lenient") -> Box | None:
    """Parse an answer in a box format (a family's ``box_format``): ``bbox_2d`` (JSON, Qwen2.5-VL),
    ``box_tokens`` (``(x1,y1),(x2,y2)``, Qwen2-VL), ``list`` (``[x1, y1, x2, y2]``, LLaVA-1.5) or ``ref_box``
    (``<box>[[x1, y1, x2, y2]]</box>``, InternVL), with the ``lenient`` or the ``authors`` parser."""
    if parser not in BOX_PARSERS:
        raise ValueError(f"unknown box parser {parser!r}; choose from {', '.join(BOX_PARSERS)}")
    if box_format not in PARSERS:
        raise ValueError(f"unknown box format {box_format!r}; choose from {', '.join(PARSERS)}")
    return BOX_PARSERS[parser][box_format](text)


def scale_box(box: Box, sx: float, sy: float) -> Box:
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def iou(a: Box | None, b: Box | None) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0 when either is missing or empty."""
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
