"""Grounding datasets: the synthetic benchmark and VLMEvalKit grounding TSVs (RefCOCO-style).

Every source yields :class:`GroundingItem` with the ground-truth box in the **original image's pixels**;
evaluation converts predictions to that frame, whatever frame the model answers in.
"""

from __future__ import annotations

import base64
import csv
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..boxes import Box
from ..inputs import EncodedImage, as_rgb, read_image_field
from . import synth

# TSV ground-truth frames: original pixels, or the authors' Qwen2.5-VL variant where both sides were
# rounded to multiples of 28 before the box was scaled (round(side / 28) * 28).
GT_FRAMES = ("original", "resized28")


@dataclass
class GroundingItem:
    id: str
    image: Image.Image | EncodedImage  # EncodedImage when read from a file: decoded when predicted
    ref: str  # referring expression
    box: Box  # ground truth, original image pixels
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


@dataclass
class SkippedRow:
    index: str
    line: int
    reason: str


def synthetic_items(n: int, seed: int = 0, split: str = "test", start: int = 0) -> Iterator[GroundingItem]:
    for s in synth.make_split(seed, split, n, start):
        yield GroundingItem(id=s.id, image=s.image, ref=s.ref, box=tuple(float(v) for v in s.box),
                            meta={"kind": s.kind, "source": "synthetic", "seed": seed, "split": split})


def _resized28(side: int) -> int:
    return max(28, int(round(side / 28)) * 28)


def read_grounding_tsv(path: str | Path, gt_frame: str = "original", skipped: list[SkippedRow] | None = None
                       ) -> Iterator[GroundingItem]:
    """Rows of a VLMEvalKit grounding TSV: ``index, image, question, answer, width, height`` (any order).

    ``image`` is base64 or a path (relative to the TSV's folder); ``answer`` is ``"x1 y1 x2 y2"`` (the
    first box when several are listed) in the frame ``gt_frame``. Malformed rows are not yielded; they
    are appended to ``skipped`` with their index and the reason.
    """
    if gt_frame not in GT_FRAMES:
        raise ValueError(f"gt_frame must be one of {GT_FRAMES}, got {gt_frame!r}")
    path = Path(path)
    skipped = skipped if skipped is not None else []
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = {"index", "image", "question", "answer"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a grounding TSV, missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            idx = (row.get("index") or "").strip() or f"line{line}"
            try:
                image = read_image_field(row["image"] or "", path.parent)
                nums = [float(v) for v in (row["answer"] or "").replace(",", " ").split()]
                if len(nums) < 4 or len(nums) % 4:
                    raise ValueError(f"answer {row['answer']!r} is not 'x1 y1 x2 y2'")
                box = tuple(nums[:4])
                w, h = image.size
                if row.get("width") and row.get("height"):
                    tw, th = int(float(row["width"])), int(float(row["height"]))
                    if (tw, th) != (w, h):
                        raise ValueError(f"width/height {tw}x{th} do not match the image {w}x{h}")
                if gt_frame == "resized28":
                    sx, sy = w / _resized28(w), h / _resized28(h)
                    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
                if not (box[2] > box[0] and box[3] > box[1]):
                    raise ValueError(f"empty box {box}")
                question = (row["question"] or "").strip()
                if not question:
                    raise ValueError("empty question")
            except Exception as e:  # noqa: BLE001 - every malformed row is reported, none stops the run
                skipped.append(SkippedRow(index=idx, line=line, reason=f"{type(e).__name__}: {e}"))
                continue
            yield GroundingItem(id=idx, image=image, ref=question, box=box, meta={"source": path.name})


def write_grounding_tsv(path: str | Path, items, gt_frame: str = "original", image_paths: bool = False) -> Path:
    """Write items as a grounding TSV (used for fixtures and for exporting the synthetic benchmark)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "answer", "width", "height"])
        for it in items:
            image = as_rgb(it.image)
            width, height = image.size
            box = it.box
            if gt_frame == "resized28":
                sx, sy = _resized28(width) / width, _resized28(height) / height
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            if image_paths:
                name = f"{it.id}.png"
                image.save(path.parent / name)
                image_field = name
            else:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                image_field = base64.b64encode(buf.getvalue()).decode()
            w.writerow([it.id, image_field, it.ref, " ".join(f"{v:g}" for v in box), width, height])
    return path
