"""Benchmark fixtures in the on-disk formats the evaluation reads: VLMEvalKit TSVs (multiple choice with
circular copies and image references, MME, POPE) and lmms-lab RefCOCO parquet, malformed rows included."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

from PIL import Image


def b64_image(color, size=(224, 196)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    return path


def mmbench_tsv(folder: Path) -> Path:
    """3 questions, 2 with a circular copy (index + 1e6, options rotated, image by reference), 2 bad rows."""
    head = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    rows = [
        [0, "What colour is the picture?", "It is a flat colour.", "red", "green", "blue", "black", "A",
         "attribute", "perception", b64_image((220, 10, 10))],
        [1, "Which shape is shown?", "", "circle", "square", "", "", "B", "shape", "perception",
         b64_image((10, 200, 10))],
        [2, "How many objects?", "", "one", "two", "three", "", "C", "count", "reasoning", b64_image((10, 10, 200))],
        [1000000, "What colour is the picture?", "It is a flat colour.", "black", "red", "green", "blue", "B",
         "attribute", "perception", "0"],
        [1000001, "Which shape is shown?", "", "square", "circle", "", "", "A", "shape", "perception", "1"],
        [3, "Broken answer?", "", "yes", "no", "", "", "E", "count", "reasoning", b64_image((0, 0, 0))],
        [4, "Dangling image?", "", "yes", "no", "", "", "A", "count", "reasoning", "77"],
    ]
    return write_tsv(folder / "MMBench_DEV_EN_V11.tsv", head, rows)


def mme_tsv(folder: Path) -> Path:
    """3 images x 2 questions (yes / no) over a perception and a cognition subtask, 1 bad row."""
    head = ["index", "category", "image_path", "question", "answer", "image"]
    rows = []
    for i, (cat, color) in enumerate([("existence", (250, 250, 0)), ("existence", (0, 250, 250)),
                                      ("code_reasoning", (250, 0, 250))]):
        rows.append([2 * i, cat, f"{cat}/{i}.png", f"Is there a square in image {i}? Please answer yes or no.", "Yes",
                     b64_image(color)])
        rows.append([2 * i + 1, cat, f"{cat}/{i}.png", f"Is there a dog in image {i}? Please answer yes or no.", "No",
                     str(2 * i)])
    rows.append([99, "existence", "existence/9.png", "Is it? Please answer yes or no.", "Maybe", b64_image((1, 2, 3))])
    return write_tsv(folder / "MME.tsv", head, rows)


def pope_tsv(folder: Path) -> Path:
    """2 questions in each POPE split, 1 row without an image."""
    head = ["index", "question", "answer", "category", "image"]
    rows = []
    for j, split in enumerate(["adversarial", "popular", "random"]):
        img = b64_image((40 * j, 100, 150))
        rows.append([2 * j, "Is there a person in the image?", "yes", split, img])
        rows.append([2 * j + 1, "Is there a car in the image?", "no", split, img])
    rows.append([50, "Is there a cat in the image?", "yes", "random", ""])
    return write_tsv(folder / "POPE.tsv", head, rows)


def refcoco_parquet(root: Path, dataset: str = "RefCOCO", splits=("val", "testA")) -> Path:
    """lmms-lab layout: ``root/dataset/data/{split}-00000-of-00001.parquet``; 2 objects (3 expressions) per
    split and one object with an empty box."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / dataset / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(splits):
        rows = []
        for i in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (320, 240), (30 + 60 * i, 90, 30 * s)).save(buf, format="JPEG")
            rows.append({"question_id": f"{split}-{i}", "image": {"bytes": buf.getvalue(), "path": f"{i}.jpg"},
                         "question": "Please carefully observe the area circled in the image.",
                         "answer": ["the left block", "block on the left"] if i == 0 else ["the big one"],
                         "bbox": [20.0 + 10 * i, 30.0, 100.0, 80.0], "file_name": f"{i}.jpg"})
        rows.append({"question_id": f"{split}-bad", "image": {"bytes": rows[0]["image"]["bytes"], "path": "x.jpg"},
                     "question": "q", "answer": ["nothing"], "bbox": [5.0, 5.0, 0.0, 10.0], "file_name": "x.jpg"})
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000-of-00001.parquet")
    return root / dataset
