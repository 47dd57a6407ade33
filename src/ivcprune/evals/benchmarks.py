"""Benchmarks on disk: VLMEvalKit TSVs (multiple choice, yes/no, grounding) and lmms-lab RefCOCO parquet.

A benchmark is named by a path (a ``.tsv`` / ``.parquet`` file, or a RefCOCO dataset folder with a
``--split``) or by its name, looked up the way VLMEvalKit and Hugging Face keep them (the suites
``vqa``, ``refcoco`` and ``paper`` name the authors' benchmarks, see :data:`SUITES`):

- ``MMBench_DEV_EN_V11``, ``SEEDBench_IMG``, ``MMStar``, ``RealWorldQA``, ``MME``, ``POPE`` (any case):
  ``NAME.tsv`` in ``--data-dir``, else in ``$LMUData``, else in ``~/LMUData`` (VLMEvalKit's folder);
- ``refcoco_val|testA|testB``, ``refcoco+_val|testA|testB``, ``refcocog_val|test`` (``refcoco_test`` too):
  a grounding TSV of that name in those folders, else the lmms-lab parquet dataset (``RefCOCO``,
  ``RefCOCOplus``, ``RefCOCOg``) under ``--data-dir``, else in the Hugging Face cache (offline).

Every reader yields :class:`Sample` in file order; a malformed row is not yielded but appended to
``skipped`` with its index, line and reason, and the run goes on. A row whose index an earlier row of the
benchmark has is skipped the same way, with the reason ``"duplicate index"`` (a prediction is stored by
id: the second row would replace the first, or be taken for done); so is a RefCOCO object whose
``question_id`` an earlier object has. Every row read is either yielded or in ``skipped``.
"""

from __future__ import annotations

import ast
import csv
import os
import string
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..inputs import EncodedImage, read_image_field
from .answers import PANDAS_NA
from .grounding_data import GroundingItem, SkippedRow, read_grounding_tsv, synthetic_items

TASKS = ("mcq", "yesno", "grounding")
# the reason of a row skipped because an earlier row of the benchmark has its index (id)
DUPLICATE = "duplicate index"

# VLMEvalKit benchmark names -> task; the headline metric of each is documented in evals.metrics.
VQA_BENCHMARKS = {
    "MMBench_DEV_EN_V11": "mcq",
    "MMBench_DEV_EN": "mcq",
    "SEEDBench_IMG": "mcq",
    "MMStar": "mcq",
    "RealWorldQA": "mcq",
    "MME": "yesno",
    "POPE": "yesno",
}
# RefCOCO family: name -> (lmms-lab dataset, split); the eight splits of the paper plus refcoco_test.
REFCOCO_SPLITS = {
    "refcoco_val": ("RefCOCO", "val"),
    "refcoco_testA": ("RefCOCO", "testA"),
    "refcoco_testB": ("RefCOCO", "testB"),
    "refcoco_test": ("RefCOCO", "test"),
    "refcoco+_val": ("RefCOCOplus", "val"),
    "refcoco+_testA": ("RefCOCOplus", "testA"),
    "refcoco+_testB": ("RefCOCOplus", "testB"),
    "refcocog_val": ("RefCOCOg", "val"),
    "refcocog_test": ("RefCOCOg", "test"),
}


@dataclass
class Sample:
    """One question: images, text, ground truth (option letter, ``"Yes"``/``"No"``, or a box)."""

    id: str
    task: str
    images: list[Image.Image | EncodedImage]  # read from files: EncodedImage, decoded when predicted
    question: str
    answer: Any
    options: dict[str, str] = field(default_factory=dict)
    hint: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Benchmark:
    name: str
    task: str
    source: str
    open: Callable[[list[SkippedRow]], Iterator[Any]]  # skipped rows are appended to the list given
    total: int | None = None
    split: str | None = None


# -- images ---------------------------------------------------------------------------------------
def _image_values(raw: str) -> list[str]:
    raw = (raw or "").strip()
    if raw.startswith("["):  # several images: a Python / JSON list literal
        values = ast.literal_eval(raw)
        if not isinstance(values, list) or not values:
            raise ValueError("image list is empty")
        return [str(v) for v in values]
    return [raw]


# -- VLMEvalKit TSV -------------------------------------------------------------------------------
def _open_tsv(path: Path):
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    f = open(path, newline="", encoding="utf-8")
    return f, csv.DictReader(f, delimiter="\t")


def _blank(value: Any) -> bool:
    return value is None or str(value).strip() in ("", "nan", "NaN", "None")


def _missing_option(value: Any) -> bool:
    """An option cell VLMEvalKit reads as no option: one of pandas' default missing-value strings (exactly:
    ``None``, ``NA``, ``N/A``, ``NaN``, ``null``, empty ...), or white space only."""
    return value is None or str(value) in PANDAS_NA or not str(value).strip()


def count_rows(path: str | Path) -> int:
    """Rows of a TSV (for progress bars; quoted newlines handled)."""
    f, reader = _open_tsv(Path(path))
    with f:
        return sum(1 for _ in reader)


def detect_task(path: str | Path) -> str:
    """Task of a TSV from its name, else from its columns and first answers."""
    path = Path(path)
    stem = path.stem.lower()
    for name, task in VQA_BENCHMARKS.items():
        if stem == name.lower() or stem.startswith(name.lower() + "_"):
            return task
    if stem.startswith("refcoco"):
        return "grounding"
    f, reader = _open_tsv(path)
    with f:
        cols = set(reader.fieldnames or [])
        if {"A", "B"} <= cols:
            return "mcq"
        answers = []
        for row in reader:
            if not _blank(row.get("answer")):
                answers.append(str(row["answer"]).strip().lower())
            if len(answers) >= 20:
                break
    if answers and all(a in ("yes", "no") for a in answers):
        return "yesno"
    if answers and all(len(a.replace(",", " ").split()) >= 4 for a in answers):
        return "grounding"
    raise ValueError(f"{path}: cannot tell the task from its name or columns; pass --task mcq|yesno|grounding")


def read_vqa_tsv(path: str | Path, task: str, skipped: list[SkippedRow] | None = None) -> Iterator[Sample]:
    """Rows of a VLMEvalKit multiple-choice or yes/no TSV.

    Columns: ``index, question, answer`` and ``image`` (base64, a path, a list of either, or -- as
    VLMEvalKit stores repeated images -- the ``index`` of the row that holds the image) or
    ``image_path``; multiple choice adds ``A, B, ...`` and optionally ``hint``; ``category``,
    ``l2-category`` (MMBench) or ``l2_category``, and ``split`` are kept for per-category scores.
    """
    if task not in ("mcq", "yesno"):
        raise ValueError(f"read_vqa_tsv reads mcq or yesno TSVs, not {task!r}")
    path = Path(path)
    skipped = skipped if skipped is not None else []
    images_by_index: dict[str, list[str]] = {}
    f, reader = _open_tsv(path)
    with f:
        cols = reader.fieldnames or []
        missing = {"index", "question", "answer"} - set(cols)
        if missing or not ({"image", "image_path"} & set(cols)):
            need = sorted(missing) + ([] if {"image", "image_path"} & set(cols) else ["image or image_path"])
            raise ValueError(f"{path}: not a VLMEvalKit TSV, missing columns {need}")
        letters = [c for c in string.ascii_uppercase if c in cols]
        if task == "mcq" and len(letters) < 2:
            raise ValueError(f"{path}: a multiple-choice TSV needs option columns A, B, ...")
        seen: set[str] = set()
        for line, row in enumerate(reader, start=2):
            idx = str(row.get("index") or "").strip() or f"line{line}"
            if idx in seen:  # a second row of an index: its prediction would replace the first one's
                skipped.append(SkippedRow(index=idx, line=line, reason=DUPLICATE))
                continue
            seen.add(idx)
            try:
                raw = row.get("image")
                key = idx
                if _blank(raw):
                    if _blank(row.get("image_path")):
                        raise ValueError("no image")
                    values = _image_values(row["image_path"])
                elif str(raw).strip().isdigit() and len(str(raw).strip()) <= 64:
                    key = str(raw).strip()
                    if key not in images_by_index:
                        raise ValueError(f"image refers to row {key}, which holds no image (yet)")
                    values = images_by_index[key]
                else:
                    values = _image_values(raw)
                    images_by_index[idx] = values
                images = [read_image_field(v, path.parent) for v in values]
                question = str(row.get("question") or "").strip()
                if not question:
                    raise ValueError("empty question")
                answer = str(row.get("answer") or "").strip()
                options: dict[str, str] = {}
                if task == "mcq":
                    # as VLMEvalKit (pandas) reads them: "None", "NA", "N/A", "" ... cells are missing options;
                    # the row stays, and an answer naming such an option can never be matched
                    options = {c: str(row[c]).strip() for c in letters if not _missing_option(row.get(c))}
                    if not options:
                        raise ValueError("no options")
                    if answer not in letters:
                        raise ValueError(f"answer {answer!r} is not one of the options {letters}")
                else:
                    low = answer.lower()
                    if low not in ("yes", "no"):
                        raise ValueError(f"answer {answer!r} is not yes/no")
                    answer = low.capitalize()
                if not _blank(row.get("image_path")):
                    key = str(row["image_path"]).strip()
                meta = {k: str(row[k]).strip() for k in ("category", "split") if not _blank(row.get(k))}
                l2 = row.get("l2-category", row.get("l2_category"))  # MMBench spells it with a hyphen
                if not _blank(l2):
                    meta["l2_category"] = str(l2).strip()
                meta["image_key"] = key
                hint = None if _blank(row.get("hint")) else str(row["hint"]).strip()
            except Exception as e:  # noqa: BLE001 - every malformed row is reported, none stops the run
                skipped.append(SkippedRow(index=idx, line=line, reason=f"{type(e).__name__}: {e}"))
                continue
            yield Sample(id=idx, task=task, images=images, question=question, answer=answer, options=options,
                         hint=hint, meta=meta)


def grounding_samples(items: Iterator[GroundingItem]) -> Iterator[Sample]:
    for it in items:
        yield Sample(id=it.id, task="grounding", images=[it.image], question=it.ref, answer=it.box, meta=it.meta)


# -- RefCOCO parquet (lmms-lab) -------------------------------------------------------------------
def _parquet_files(root: Path, split: str | None) -> list[Path]:
    if root.is_file():
        return [root]
    if split is None:
        raise ValueError(f"{root} is a dataset folder: name a split (--split val|testA|testB|test)")
    files = sorted(p for p in root.rglob("*.parquet") if p.name.split("-")[0] == split or p.stem == split)
    if not files:
        found = sorted({p.name.split("-")[0] for p in root.rglob("*.parquet")})
        raise ValueError(f"{root}: no parquet files for split {split!r} (found splits: {', '.join(found) or 'none'})")
    return files


def read_refcoco_parquet(path: str | Path, split: str | None = None, refs: str = "all",
                         skipped: list[SkippedRow] | None = None) -> Iterator[Sample]:
    """Referring expressions of an lmms-lab RefCOCO / RefCOCO+ / RefCOCOg parquet split.

    Each row is one object: ``image`` (``{"bytes", "path"}``), ``bbox`` as COCO ``[x, y, w, h]`` in
    image pixels, ``answer`` the list of its referring expressions, ``question_id``. With ``refs="all"``
    every expression is one sample (id ``question_id#j``), as the usual RefCOCO protocol counts them;
    ``refs="first"`` keeps the first expression of each object.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from e
    if refs not in ("all", "first"):
        raise ValueError(f"refs must be 'all' or 'first', got {refs!r}")
    skipped = skipped if skipped is not None else []
    root = Path(path)
    seen: set[str] = set()  # question ids of the split (over all its files)
    for file in _parquet_files(root, split):
        pf = pq.ParquetFile(file)
        missing = {"image", "bbox", "answer"} - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"{file}: not an lmms-lab RefCOCO parquet, missing columns {sorted(missing)}")
        row_no = 0
        for batch in pf.iter_batches(batch_size=64):
            for row in batch.to_pylist():
                row_no += 1
                qid = str(row.get("question_id") or f"{file.stem}:{row_no}")
                if qid in seen:  # its expressions would have the ids of the first row's
                    skipped.append(SkippedRow(index=qid, line=row_no, reason=DUPLICATE))
                    continue
                seen.add(qid)
                try:
                    img = row["image"]
                    if isinstance(img, dict) and img.get("bytes"):
                        image = EncodedImage(data=img["bytes"])
                    elif isinstance(img, dict) and img.get("path"):
                        image = read_image_field(img["path"], file.parent)
                    else:
                        raise ValueError("no image bytes or path")
                    x, y, w, h = (float(v) for v in row["bbox"])
                    if w <= 0 or h <= 0:
                        raise ValueError(f"empty box {row['bbox']}")
                    expressions = row["answer"]
                    if isinstance(expressions, str):
                        expressions = [expressions]
                    expressions = [str(e).strip() for e in expressions or [] if str(e).strip()]
                    if not expressions:
                        raise ValueError("no referring expression")
                except Exception as e:  # noqa: BLE001
                    skipped.append(SkippedRow(index=qid, line=row_no, reason=f"{type(e).__name__}: {e}"))
                    continue
                box = (x, y, x + w, y + h)
                for j, ref in enumerate(expressions[:1] if refs == "first" else expressions):
                    yield Sample(id=f"{qid}#{j}", task="grounding", images=[image], question=ref, answer=box,
                                 meta={"source": file.name})


# -- resolving names --------------------------------------------------------------------------------
def _search_dirs(data_dir: str | None) -> list[Path]:
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get("LMUData"):
        dirs.append(Path(os.environ["LMUData"]))
    dirs.append(Path.home() / "LMUData")
    return dirs


def _find_tsv(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.suffix.lower() == ".tsv" and p.stem.lower() == name.lower():
                return p
    return None


def _find_refcoco_dataset(dataset: str, data_dir: str | None) -> Path | None:
    for d in ([Path(data_dir)] if data_dir else []):
        for cand in (d / dataset, d / "lmms-lab" / dataset, d / f"lmms-lab___{dataset}", d):
            if cand.is_dir() and any(cand.rglob("*.parquet")) and (cand != d or d.name.lower() == dataset.lower()):
                return cand
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(f"lmms-lab/{dataset}", repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache
        return None


def canonical_name(name: str) -> str:
    low = name.lower().replace("refcocoplus", "refcoco+")
    for known in [*VQA_BENCHMARKS, *REFCOCO_SPLITS]:
        if low == known.lower():
            return known
    return name


def known_names() -> list[str]:
    return [*VQA_BENCHMARKS, *REFCOCO_SPLITS]


# The benchmarks of the authors' evaluation (METHOD.md), by group.
SUITES = {
    "vqa": ["SEEDBench_IMG", "MMBench_DEV_EN_V11", "MMStar", "RealWorldQA", "MME", "POPE"],
    "refcoco": ["refcoco_val", "refcoco_testA", "refcoco_testB", "refcoco+_val", "refcoco+_testA",
                "refcoco+_testB", "refcocog_val", "refcocog_test"],
}
SUITES["paper"] = SUITES["vqa"] + SUITES["refcoco"]


def expand_data(spec: str) -> list[str]:
    """A ``--data`` comma list with suite names (``vqa``, ``refcoco``, ``paper``) expanded, each entry once."""
    out: list[str] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        for name in SUITES.get(item.lower(), [item]):
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("--data names no benchmark")
    return out


def load_benchmark(data: str, *, task: str | None = None, split: str | None = None, data_dir: str | None = None,
                   n: int | None = None, seed: int = 0, gt_frame: str = "original", refs: str = "all") -> Benchmark:
    """Resolve ``data`` (a path, a benchmark name, or ``synthetic``) to a :class:`Benchmark`."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if data == "synthetic":
        split = split or "test"
        count = 1000 if n is None else n
        return Benchmark(f"synthetic_{split}", "grounding", "synthetic",
                         lambda skipped: grounding_samples(synthetic_items(count, seed=seed, split=split)), count,
                         split)
    path = Path(data)
    name = canonical_name(data)
    if not path.exists():
        dirs = _search_dirs(data_dir)
        tsv = _find_tsv(name, dirs)
        if tsv is not None:
            path = tsv
        elif name in REFCOCO_SPLITS:
            dataset, rsplit = REFCOCO_SPLITS[name]
            root = _find_refcoco_dataset(dataset, data_dir)
            if root is None:
                raise FileNotFoundError(
                    f"{name}: neither {name}.tsv in {', '.join(map(str, dirs))} nor the lmms-lab/{dataset} parquet "
                    f"dataset (--data-dir DIR with DIR/{dataset}, or the Hugging Face cache) was found; download "
                    f"it with `huggingface-cli download lmms-lab/{dataset} --repo-type dataset --local-dir "
                    f"DIR/{dataset}`")
            return Benchmark(name, "grounding", str(root),
                             lambda skipped: read_refcoco_parquet(root, rsplit, refs, skipped), split=rsplit)
        elif name in VQA_BENCHMARKS:
            raise FileNotFoundError(f"{name}: {name}.tsv not found in {', '.join(map(str, dirs))} (VLMEvalKit's "
                                    f"TSV; pass --data-dir or set LMUData)")
        else:
            raise FileNotFoundError(f"data not found: {data} (a .tsv/.parquet file, a RefCOCO dataset folder, "
                                    f"'synthetic', or one of {', '.join(known_names())})")
    if path.is_dir() or path.suffix.lower() == ".parquet":
        if task not in (None, "grounding"):
            raise ValueError(f"{path}: parquet datasets are RefCOCO grounding data, not {task}")
        bench_name = f"{path.stem if path.is_file() else path.name}{'_' + split if split else ''}"
        return Benchmark(canonical_name(bench_name.replace("RefCOCOplus", "refcoco+")), "grounding", str(path),
                         lambda skipped: read_refcoco_parquet(path, split, refs, skipped), split=split)
    task = task or detect_task(path)
    bench_name = canonical_name(path.stem)
    if task == "grounding":
        return Benchmark(bench_name, task, str(path),
                         lambda skipped: grounding_samples(read_grounding_tsv(path, gt_frame=gt_frame,
                                                                              skipped=skipped)))
    return Benchmark(bench_name, task, str(path), lambda skipped: read_vqa_tsv(path, task, skipped))
