"""Runs that survive: resumable, data-parallel, re-scorable; comparison tables across runs.

A run directory holds ``run.json`` (what was run), ``predictions.jsonl`` (one record per sample, appended
as each finishes) and ``metrics.json`` (always recomputed from the predictions alone).

- Resume: a rerun reads every record already written and skips those samples; a last line cut by a
  kill is dropped and its sample redone; nothing is duplicated (the last record of an id wins when
  scoring).
- A sample whose prediction raises (an image the processor refuses, say) is reported with its error in
  ``metrics.json`` (``n_failed``, ``failed``) and retried by the next run; the run goes on, unless its
  first samples all fail, which is a setup error and stops it.
- Batches (``batch_size`` > 1): the samples a process predicts go in batches, sorted by size within
  windows of 8 batches; a batch that raises is predicted again one sample at a time (a bad sample is
  reported alone); records are appended as batches finish and put in dataset order at the end.
- Data-parallel: under ``torchrun`` (``WORLD_SIZE`` > 1) rank ``r`` of ``w`` takes samples
  ``r, r + w, ...`` and appends to ``predictions.part{r}.jsonl``; at the end rank 0 merges the parts into
  ``predictions.jsonl`` in dataset order and scores. Parts left by a killed run are merged by the
  next run, whatever its number of processes.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..generation import sorted_batches
from .metrics import read_records, score_records

PRED = "predictions.jsonl"
PART_GLOB = "predictions.part*.jsonl"
# run.json fields that must match when a run directory is resumed
# fields of metrics.json that describe the last run rather than its predictions (kept by `score`)
RUN_FIELDS = ("n_skipped", "skipped", "n_failed", "failed", "wall_s", "n_new", "world_size")
# a run whose first samples all fail stops with the error (a setup problem, not bad samples)
SYSTEMATIC_FAILURES = 3
IDENTITY = ("model_path", "benchmark", "source", "task", "method", "budget", "layer", "config", "prompt", "pixels",
            "dtype", "attn_implementation")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()


def init_distributed() -> Dist:
    """The process group of a ``torchrun`` launch (gloo: only barriers are needed), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    return Dist(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def prediction_files(run_dir: Path) -> list[Path]:
    return [run_dir / PRED, *sorted(run_dir.glob(PART_GLOB))]


def merge_parts(run_dir: Path, *, reorder: bool = False) -> None:
    """Fold ``predictions.part*.jsonl`` into ``predictions.jsonl`` (dataset order, one record per id);
    ``reorder`` also puts a ``predictions.jsonl`` written out of order (batches sorted by size) in order."""
    parts = sorted(run_dir.glob(PART_GLOB))
    if not parts and not reorder:
        return
    records = list(read_records(prediction_files(run_dir)).values())
    positions = [r.get("pos", float("inf")) for r in records]
    if not parts and positions == sorted(positions):
        return
    records.sort(key=lambda r: r.get("pos", float("inf")))
    tmp = run_dir / (PRED + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, run_dir / PRED)
    for p in parts:
        p.unlink()


def drop_cut_line(path: Path) -> None:
    """Truncate a last line a kill cut short, so that appended records start on a line of their own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def _check_identity(run_dir: Path, info: dict[str, Any]) -> None:
    path = run_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in IDENTITY if k in old and k in info and old[k] != info[k]]
        if diff and any(p.exists() and p.stat().st_size for p in prediction_files(run_dir)):
            raise ValueError(f"{run_dir} holds predictions of another run ({', '.join(diff)} differ: "
                             f"{ {k: old[k] for k in diff} } vs { {k: info[k] for k in diff} }); "
                             f"choose another --out or delete it")


def run_resumable(samples: Iterable[Any], predict: Callable[[Any], dict[str, Any]] | None, run_dir: str | Path, *,
                  info: dict[str, Any], total: int | None = None, progress: bool = True, dist: Dist | None = None,
                  skipped: list | None = None, batch_size: int = 1,
                  predict_batch: Callable[[list[Any]], list[dict[str, Any]]] | None = None,
                  order_key: Callable[[Any], Any] | None = None) -> dict[str, Any] | None:
    """Predict every sample not yet in ``run_dir`` and score the run.

    ``samples`` yield objects with an ``id``; ``predict`` returns the sample's record, ``predict_batch``
    the records of a list of samples (either may be left out). With ``batch_size`` > 1 the samples this
    process predicts go in batches: each window of 8 batches' worth of samples is sorted by ``order_key``
    (e.g. image sizes: less padding) and cut into batches; a batch that raises is predicted again one
    sample at a time, so that a bad sample is reported alone. Records are appended as each batch
    finishes and put in dataset order at the end. Returns the metrics (``None`` on ranks other than 0 of
    a data-parallel run)."""
    from tqdm.auto import tqdm

    if predict is None and predict_batch is None:
        raise ValueError("run_resumable needs predict or predict_batch")
    dist = dist or Dist()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_identity(run_dir, info)  # on every rank, so that a refusal stops them all
    dist.barrier()
    if dist.rank == 0:
        (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    dist.barrier()
    done = set(read_records(prediction_files(run_dir)))
    target = run_dir / (PRED if dist.world == 1 else f"predictions.part{dist.rank}.jsonl")
    drop_cut_line(target)
    desc = " ".join(str(info[k]) for k in ("benchmark", "name") if info.get(k)) or "eval"
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress or dist.rank != 0)
    t0 = time.time()
    state = {"new": 0}
    failed: list[dict[str, Any]] = []

    def mine() -> Iterator[tuple[int, Any]]:  # (pos, sample) this process predicts; the others pass by
        for pos, sample in enumerate(samples):
            if pos % dist.world != dist.rank or str(sample.id) in done:
                bar.update(1)
                continue
            yield pos, sample

    def one(sample) -> dict[str, Any]:
        return predict(sample) if predict is not None else predict_batch([sample])[0]

    def write(f, pos: int, sample, rec: dict[str, Any]) -> None:
        rec["pos"] = pos
        f.write(json.dumps(rec) + "\n")
        f.flush()
        done.add(str(sample.id))
        state["new"] += 1

    key = (lambda ps: order_key(ps[1])) if order_key is not None else None
    with open(target, "a", encoding="utf-8") as f:
        for batch in sorted_batches(mine(), batch_size, key=key):
            batch = [ps for _, ps in batch]
            records = None
            if len(batch) > 1:
                try:
                    records = (predict_batch([s for _, s in batch]) if predict_batch is not None
                               else [predict(s) for _, s in batch])
                except Exception:  # noqa: BLE001 - retried one by one below, where a bad sample shows
                    _release_cuda_memory()
            if records is not None:
                for (pos, sample), rec in zip(batch, records, strict=True):
                    write(f, pos, sample, rec)
                bar.update(len(batch))
                continue
            for pos, sample in batch:
                bar.update(1)
                try:
                    rec = one(sample)
                except Exception as e:  # noqa: BLE001 - one bad sample must not end a long run
                    if state["new"] == 0 and len(failed) + 1 >= SYSTEMATIC_FAILURES:
                        raise  # every sample fails: a setup error, not a bad sample
                    failed.append({"id": str(sample.id), "pos": pos, "error": f"{type(e).__name__}: {e}"})
                    _release_cuda_memory()  # an out-of-memory sample must not starve the next ones
                    continue
                write(f, pos, sample, rec)
    bar.close()
    new = state["new"]
    if dist.world > 1:  # rank 0 reports every rank's failures
        (run_dir / f"failed.part{dist.rank}.json").write_text(json.dumps(failed))
    dist.barrier()
    if dist.rank != 0:
        return None
    if dist.world > 1:
        failed = [x for r in range(dist.world) for x in json.loads((run_dir / f"failed.part{r}.json").read_text())]
        for r in range(dist.world):
            (run_dir / f"failed.part{r}.json").unlink()
    merge_parts(run_dir, reorder=True)  # batches, or a killed batched run before, append out of order
    skipped = skipped or []
    failed.sort(key=lambda x: x["pos"])
    extra = {"n_skipped": len(skipped), "skipped": [s.__dict__ for s in skipped[:50]],
             "n_failed": len(failed), "failed": failed[:50],
             "wall_s": round(time.time() - t0, 1), "n_new": new, "world_size": dist.world}
    return score_run(run_dir, extra)


def _release_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_run(run_dir: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Recompute ``metrics.json`` of a run from its predictions (``ivcprune score``)."""
    run_dir = Path(run_dir)
    files = prediction_files(run_dir)
    if not any(p.exists() for p in files):
        raise FileNotFoundError(f"{run_dir}: no {PRED} (not a run directory)")
    info: dict[str, Any] = {}
    if (run_dir / "run.json").exists():
        info = json.loads((run_dir / "run.json").read_text())
    old: dict[str, Any] = {}
    if (run_dir / "metrics.json").exists():
        old = json.loads((run_dir / "metrics.json").read_text())
    records = list(read_records(files).values())
    task = info.get("task") or (records[0].get("task", "grounding") if records else "grounding")
    kept_extra = {k: old[k] for k in RUN_FIELDS if k in old}
    metrics = {**info, "task": task, **kept_extra, **(extra or {}),
               **score_records(records, task, info.get("benchmark"))}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# -- comparison across runs --------------------------------------------------------------------------
def run_dirs(path: str | Path, marker: str) -> list[Path]:
    """Run directories at ``path`` or up to two levels below it, recognised by a file matching ``marker``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such run directory: {p}")
    if any(p.glob(marker)):
        return [p]
    return sorted({q.parent for q in [*p.glob(f"*/{marker}"), *p.glob(f"*/*/{marker}")]})


def find_runs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """metrics.json of the runs under each path (the path itself, or up to two levels below)."""
    found: list[Path] = []
    for p in paths:
        dirs = run_dirs(p, "metrics.json")
        if not dirs:
            raise FileNotFoundError(f"{p}: no metrics.json here or below (run `ivcprune score` on it?)")
        found.extend(d / "metrics.json" for d in dirs)
    runs = []
    for m in found:
        rec = json.loads(m.read_text())
        rec["_dir"] = str(m.parent)
        runs.append(rec)
    return runs


def _config_key(r: dict[str, Any]) -> tuple:
    if r.get("method") == "none":
        return ("none", None, None)
    return (r.get("label", r.get("method")), r.get("budget"), r.get("layer"))


def _fmt_score(value: float, benchmark: str) -> str:
    return f"{value:.1f}" if not benchmark.upper().startswith("MME") else f"{value:.0f}"


def compare_table(runs: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown: one row per method configuration, per benchmark its score and its score relative to the
    unpruned run of that benchmark (and model); the mean relative score, kept ratio and prefill time."""
    models = sorted({str(r.get("model", "?")) for r in runs})
    benches = list(dict.fromkeys(str(r.get("benchmark") or r.get("data") or "?") for r in runs))
    base = {(str(r.get("model", "?")), str(r.get("benchmark") or r.get("data") or "?")): r["score"]
            for r in runs if r.get("method") == "none"}  # the last unpruned run of a benchmark and model
    rows: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        model = str(r.get("model", "?"))
        key = (model, *_config_key(r))
        row = rows.setdefault(key, {"model": model, "method": r.get("label", r.get("method")),
                                    "budget": r.get("budget"), "layer": r.get("layer"), "scores": {},
                                    "relative": {}, "kept": {}, "prefill_s": {}, "dirs": {}})
        bench = str(r.get("benchmark") or r.get("data") or "?")
        if bench in row["dirs"]:
            warnings.warn(f"{bench}: {row['dirs'][bench]} and {r.get('_dir')} are runs of the same configuration; "
                          f"the table shows the latter", stacklevel=2)
        row["dirs"][bench] = r.get("_dir")
        row["scores"][bench] = r["score"]
        b = base.get((model, bench))
        if b:
            row["relative"][bench] = r["score"] / b
        row["kept"][bench] = r.get("mean_kept_visual_ratio", 1.0)
        row["prefill_s"][bench] = r.get("mean_prefill_s", 0.0)
    order = sorted(rows, key=lambda k: (k[0], k[1] != "none", str(k[1]), -(k[2] or 0), k[3] or 0))
    head = (["model"] if len(models) > 1 else []) + ["method", "budget", "K"] + benches + \
        ["rel. avg", "kept visual", "prefill ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out_rows = []
    for k in order:
        row = rows[k]
        cells = [row["model"]] if len(models) > 1 else []
        pruned = k[1] != "none"
        cells += [str(row["method"]), str(row["budget"]) if pruned else "-", str(row["layer"]) if pruned else "-"]
        for bench in benches:
            if bench not in row["scores"]:
                cells.append("")
                continue
            s = _fmt_score(row["scores"][bench], bench)
            rel = row["relative"].get(bench)
            cells.append(f"{s} ({100 * rel:.1f}%)" if pruned and rel is not None else s)
        rels = list(row["relative"].values())
        rel_avg = sum(rels) / len(rels) if rels else None
        cells.append(f"{100 * rel_avg:.1f}%" if rel_avg is not None else "n/a")
        kept = sum(row["kept"].values()) / len(row["kept"])
        prefill = 1000 * sum(row["prefill_s"].values()) / len(row["prefill_s"])
        cells += [f"{100 * kept:.1f}%", f"{prefill:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
        out_rows.append({"model": row["model"], "method": row["method"], "budget": row["budget"] if pruned else None,
                         "layer": row["layer"] if pruned else None, "scores": row["scores"],
                         "relative": row["relative"], "relative_average": rel_avg, "mean_kept_visual_ratio": kept,
                         "mean_prefill_ms": prefill})
    return "\n".join(lines), out_rows
