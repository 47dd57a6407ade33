"""Runs that survive: resumable, data-parallel, re-scorable; comparison tables across runs.

A run directory holds ``run.json`` (what was run), ``predictions.jsonl`` (one record per sample, appended
as each finishes) and ``metrics.json`` (always recomputed from the predictions alone).

- Resume: a rerun reads every record already written and skips those samples; a last line cut by a
  kill is dropped and its sample redone; nothing is duplicated (the last record of an id wins when
  scoring). A damaged line elsewhere in the predictions is ignored with a warning and its sample redone.
- Accounting: every row this run covers (with ``--limit N`` the first N samples and the malformed rows
  among them; under torchrun all ranks together) is counted once in ``metrics.json``: predicted (``n``,
  now or by an earlier run), skipped (``n_skipped``: malformed, or ``"duplicate index"``: a second row
  with an id already seen) or failed (``n_failed``, ``failed_ids``): ``n + n_skipped + n_failed ==
  n_rows``. Records of rows this run does not cover (a larger ``--limit`` before) stay in the file and
  are left out of the metrics (``n_outside``).
- A sample whose prediction raises (an image the processor refuses, say) is reported with its error in
  ``metrics.json`` (``n_failed``, ``failed``, every id in ``failed_ids``) and retried by the next run;
  the run goes on, unless its first samples all fail afresh (samples that failed in the last run and are
  retried do not count), which is a setup error and stops it.
- Nothing to score (every row malformed, no row, every sample failed): ``score`` is ``null`` with an
  ``error`` saying why; the run raises :class:`NothingToScoreError` after writing ``metrics.json``.
- Files: ``run.json``, ``metrics.json``, merged predictions and ``failed.part*.json`` are written whole
  or not at all (:func:`atomic_write_text`: a temporary file in the folder, fsync, ``os.replace``);
  predictions are appended a batch at a time and synced. A failed write raises :class:`RunWriteError`
  naming the file. A damaged ``metrics.json`` is rebuilt from the predictions with a warning; a damaged
  ``run.json`` is refused (:class:`DamagedRunError`).
- One writer per run directory: :func:`lock_run_dir` (an OS lock on ``.lock``, per rank ``.lock.rank{r}``)
  is held for the whole run; a second writer gets :class:`RunLockedError` naming the holder.
- Batches (``batch_size`` > 1): the samples a process predicts go in batches, sorted by size within
  windows of 8 batches; a batch that raises is predicted again one sample at a time (a bad sample is
  reported alone); records are appended as batches finish and put in dataset order at the end.
- Data-parallel: under ``torchrun`` (``WORLD_SIZE`` > 1) rank ``r`` of ``w`` takes samples
  ``r, r + w, ...`` and appends to ``predictions.part{r}.jsonl``; at the end rank 0 merges the parts into
  ``predictions.jsonl`` in dataset order and scores. Parts left by a killed run are merged by the
  next run, whatever its number of processes. An error on one rank stops every rank (no rank waits
  for ever at a barrier).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..generation import sorted_batches
from .benchmarks import DUPLICATE
from .grounding_data import SkippedRow
from .metrics import read_records, scan_records, score_records

PRED = "predictions.jsonl"
PART_GLOB = "predictions.part*.jsonl"
LOCK = ".lock"  # rank 0's lock file (the one every writer of a run directory takes); rank r > 0: .lock.rank{r}
# fields of metrics.json that describe the last run rather than its predictions (kept by `score`)
RUN_FIELDS = ("n_rows", "n_skipped", "n_duplicates", "skipped", "n_failed", "failed", "failed_ids", "outside_ids",
              "wall_s", "n_new", "world_size")
# a run whose first samples all fail stops with the error (a setup problem, not bad samples)
SYSTEMATIC_FAILURES = 3
# run.json fields that must match when a run directory is resumed
IDENTITY = ("model_path", "benchmark", "source", "task", "method", "budget", "layer", "config", "prompt", "pixels",
            "dtype", "attn_implementation", "seed", "split", "refs", "gt_frame", "boxes", "judge_model",
            "answers", "max_tiles")
CAP = 50  # skipped rows and failures listed in metrics.json (their counts are exact)


class RunLockedError(ValueError):
    """Another process writes this run directory (the CLI prints it as one line)."""


class MissingRunInfoError(ValueError):
    """``ivcprune score`` of predictions whose benchmark nothing names (no ``run.json``, no ``--benchmark``)."""


class NothingToScoreError(ValueError):
    """A run predicted no sample: ``metrics.json`` has ``score: null`` and the reason (``error``)."""


class DamagedRunError(ValueError):
    """``run.json`` of a run directory cannot be read; it records the run's settings, so it is not rebuilt."""


class RankFailedError(RuntimeError):
    """Another rank of a data-parallel run failed (it prints its own error); this rank stops too."""


class RunWriteError(OSError):
    """A file of a run could not be written (a full disk, say); what was written before is intact."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror} (what was written before is intact)"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def close(self) -> None:
        """End the process group (under torchrun: a clean exit instead of an abort at interpreter exit)."""
        if self.world > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a collective: every rank must call it)."""
        if self.world <= 1:
            return bool(flag)
        import torch
        import torch.distributed as tdist

        device = f"cuda:{self.local_rank}" if tdist.get_backend() == "nccl" else "cpu"  # (a group made elsewhere)
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())


def init_distributed() -> Dist:
    """The process group of a ``torchrun`` launch (gloo: only barriers and flags are exchanged), else one
    process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    return Dist(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def _together(dist: Dist, fn: Callable[[], Any]) -> Any:
    """``fn()`` on this rank, then one collective: if it raised on any rank, every rank raises (the rank
    that failed its own error), instead of the others waiting at the next barrier."""
    error: Exception | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = e
    if dist.any_rank(error is not None):
        if error is not None:
            raise error
        raise RankFailedError(f"rank {dist.rank}: another rank of this run failed (its error is printed above); "
                              f"stopped")
    return result


# -- writing files ----------------------------------------------------------------------------------
_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs folders
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_error(path: Path, e: OSError) -> RunWriteError:
    if isinstance(e, RunWriteError):
        return e
    return RunWriteError(e.errno or errno.EIO, e.strerror or str(e), str(path))


def _atomic_write(path: Path, chunks: Iterable[str]) -> Path:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it, not mkstemp's 0600
            for chunk in chunks:
                _write_all(fd, chunk.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all: a temporary file in the same folder, flushed
    and synced, then ``os.replace``; a reader sees the old file or the new one, never a part. A failure
    (a full disk) leaves the old file as it was and raises :class:`RunWriteError` naming ``path``."""
    return _atomic_write(Path(path), [text])


class _Appender:
    """``path`` opened for appending whole lines, synced after each batch; errors name the file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise _write_error(path, e) from e

    def write(self, lines: list[str]) -> None:
        try:
            _write_all(self.fd, "".join(lines).encode("utf-8"))
            os.fsync(self.fd)
        except OSError as e:  # a part of a line may be on disk: the next run drops it (drop_cut_line)
            raise _write_error(self.path, e) from e

    def close(self) -> None:
        os.close(self.fd)


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(content, None)``, ``(None, None)`` when missing, ``(None, what is wrong)`` when damaged."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None, None
    if not text.strip():
        return None, "empty"
    try:
        data = json.loads(text)
    except ValueError as e:
        return None, f"not JSON: {e}"
    if not isinstance(data, dict):
        return None, f"not a JSON object but {type(data).__name__}"
    return data, None


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run directory (``{}`` when there is none); :class:`DamagedRunError` when it cannot
    be read: it records the run's settings, which the predictions alone do not tell."""
    path = Path(run_dir) / "run.json"
    info, problem = _read_json(path)
    if problem:
        raise DamagedRunError(f"{path} is damaged ({problem}) and cannot be rebuilt: it records the run's settings. "
                              f"Delete it to resume the run with the current settings (or choose another --out)")
    return info or {}


def _read_metrics(run_dir: Path, *, warn: bool = True, then: str = f"rebuilt from {PRED}") -> dict[str, Any]:
    """``metrics.json`` of a run (``{}`` when missing; damaged: ``{}`` and a warning naming it)."""
    path = run_dir / "metrics.json"
    old, problem = _read_json(path)
    if problem and warn:
        warnings.warn(f"{path} is damaged ({problem}); {then}", stacklevel=3)
    return old or {}


# -- one writer per run directory -------------------------------------------------------------------
# lock file (real path) -> [fd, depth, pid]: the locks this process holds. POSIX record locks belong to the
# process and go when it closes *any* descriptor of the file: so a lock is taken once per process, counted,
# and its file is never opened again by the holder (not even to read it).
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


def _lock_file(run_dir: Path, rank: int) -> Path:
    return run_dir / (LOCK if rank == 0 else f"{LOCK}.rank{rank}")


def _holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 65536, 0) or b"{}")
        return (f"pid {h['pid']} on {h['host']}, since {h['started']}"
                f"{'' if not h.get('rank') else ', rank ' + str(h['rank'])}: {h['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _acquire(path: Path, run_dir: Path, rank: int = 0) -> bool:
    """Lock ``path`` for this process (reentrant); ``True`` when this call took it (not held before)."""
    key = os.path.realpath(path)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[2] == os.getpid():  # (a forked child does not inherit the lock)
            held[1] += 1
            return False
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            who = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise RunLockedError(f"{run_dir} is being written by another process ({who}); wait for it to end "
                                     f"(or stop it), or choose another --out") from None
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "rank": rank,
                "command": " ".join(sys.argv)}
        with contextlib.suppress(OSError):  # who holds it is information only; the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[key] = [fd, 1, os.getpid()]
        return True


def _release(path: Path) -> None:
    key = os.path.realpath(path)
    with _HELD_GUARD:
        held = _HELD[key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.ftruncate(held[0], 0)
            os.close(held[0])  # closing releases the lock


@contextlib.contextmanager
def _hold(run_dir: Path) -> Iterator[None]:
    """Rank 0's lock of ``run_dir`` for this process alone (no collective): for writers outside a run."""
    path = _lock_file(run_dir, 0)
    _acquire(path, run_dir)
    try:
        yield
    finally:
        _release(path)


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path, dist: Dist | None = None) -> Iterator[Path]:
    """Hold ``run_dir`` (created if missing) as its only writer, for the duration of the ``with`` block.

    An OS lock (``fcntl.lockf``) on ``run_dir/.lock`` (rank r > 0 of a data-parallel run:
    ``.lock.rank{r}``), released by the OS if the process dies; the lock file names the holder (pid,
    host, start time, command line). A directory another process holds raises :class:`RunLockedError`
    naming that process. Reentrant within a process (the CLI may hold it around loading the model and
    :func:`run_resumable` take it again). Under torchrun every rank must call it: if any rank cannot lock,
    every rank raises."""
    dist = dist or Dist()
    run_dir = Path(run_dir)
    path = _lock_file(run_dir, dist.rank)
    error: Exception | None = None
    first = False
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        first = _acquire(path, run_dir, dist.rank)
    except Exception as e:  # noqa: BLE001 - raised below, on every rank
        error = e
    try:
        failed = dist.any_rank(error is not None)
    except BaseException:
        if error is None:
            _release(path)
        raise
    if failed:
        if error is not None:
            raise error
        _release(path)
        raise RunLockedError(f"{run_dir}: another rank of this run could not lock it (its error is printed above)")
    try:
        if first and dist.rank == 0:
            for tmp in run_dir.glob(".*.tmp"):  # left by a writer that died: no writer is at work now
                with contextlib.suppress(OSError):
                    tmp.unlink()
        yield run_dir
    finally:
        _release(path)


# -- predictions ------------------------------------------------------------------------------------
def prediction_files(run_dir: Path) -> list[Path]:
    return [run_dir / PRED, *sorted(run_dir.glob(PART_GLOB))]


def merge_parts(run_dir: Path, *, reorder: bool = False) -> None:
    """Fold ``predictions.part*.jsonl`` into ``predictions.jsonl`` (dataset order, one record per id);
    ``reorder`` also puts a ``predictions.jsonl`` written out of order (batches sorted by size) in order,
    and rewrites one with damaged lines or several records of an id (the last one is kept)."""
    parts = sorted(run_dir.glob(PART_GLOB))
    if not parts and not reorder:
        return
    scan = scan_records(prediction_files(run_dir))
    records = list(scan.records.values())
    positions = [r.get("pos", float("inf")) for r in records]
    if not parts and positions == sorted(positions) and not scan.bad_lines and not scan.replaced:
        return
    records.sort(key=lambda r: r.get("pos", float("inf")))
    _atomic_write(run_dir / PRED, _json_lines(records))
    for p in parts:  # after the merged file is in place: a kill in between leaves copies, not losses
        p.unlink()


def _json_lines(records: list[dict[str, Any]], block: int = 1000) -> Iterator[str]:
    for i in range(0, len(records), block):
        yield "".join(json.dumps(r) + "\n" for r in records[i:i + block])


def drop_cut_line(path: Path) -> None:
    """Repair the end of a predictions file so that appended records start on a line of their own: a last
    line a kill cut short is truncated; a whole record that only lacks its newline gets it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        try:
            tail = json.loads(data[start:])
            whole = isinstance(tail, dict) and "id" in tail
        except ValueError:
            whole = False
        if whole:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def check_identity(run_dir: Path, info: dict[str, Any]) -> None:
    """Refuse ``run_dir`` when it holds predictions of another run: a field of :data:`IDENTITY` that both its
    ``run.json`` and ``info`` (all of a run's settings, or the part known so far) have differs."""
    has_predictions = any(p.exists() and p.stat().st_size for p in prediction_files(run_dir))
    try:
        old = read_run_info(run_dir)
    except DamagedRunError:
        if not has_predictions:
            return  # nothing to protect: the run starts over and writes run.json anew
        raise
    diff = [k for k in IDENTITY if k in old and k in info and old[k] != info[k]]
    if diff and has_predictions:
        raise ValueError(f"{run_dir} holds predictions of another run ({', '.join(diff)} differ: "
                         f"{ {k: old[k] for k in diff} } vs { {k: info[k] for k in diff} }); "
                         f"choose another --out or delete it")


def _check_record(sample: Any, rec: Any) -> dict[str, Any]:
    """``sample``'s record, checked: a dict with the sample's id (set when missing) that JSON can write.
    Anything else raises: a failure of that sample, not of the run."""
    if not isinstance(rec, dict):
        raise TypeError(f"the prediction of sample {sample.id} is a {type(rec).__name__}, not a dict")
    if "id" in rec and str(rec["id"]) != str(sample.id):
        raise ValueError(f"the record predicted for sample {sample.id} has the id {rec['id']}")
    rec.setdefault("id", str(sample.id))
    json.dumps(rec)  # TypeError for what JSON cannot write
    return rec


def run_resumable(samples: Iterable[Any], predict: Callable[[Any], dict[str, Any]] | None, run_dir: str | Path, *,
                  info: dict[str, Any], total: int | None = None, progress: bool = True, dist: Dist | None = None,
                  skipped: list | None = None, batch_size: int = 1,
                  predict_batch: Callable[[list[Any]], list[dict[str, Any]]] | None = None,
                  order_key: Callable[[Any], Any] | None = None) -> dict[str, Any] | None:
    """Predict every sample not yet in ``run_dir`` and score the run.

    ``samples`` yield objects with an ``id``; ``predict`` returns the sample's record, ``predict_batch``
    the records of a list of samples (either may be left out). ``skipped``: the rows the reader of
    ``samples`` skipped (filled as it reads; counted in ``n_rows`` and ``n_skipped``). With ``batch_size``
    > 1 the samples this process predicts go in batches: each window of 8 batches' worth of samples is
    sorted by ``order_key`` (e.g. image sizes: less padding) and cut into batches; a batch that raises is
    predicted again one sample at a time, so that a bad sample is reported alone. Records are appended as
    each batch finishes and put in dataset order at the end. Returns the metrics (``None`` on ranks other
    than 0 of a data-parallel run).

    Holds :func:`lock_run_dir` throughout (:class:`RunLockedError` if another process writes ``run_dir``).
    Raises :class:`NothingToScoreError` (after writing ``metrics.json``) when no sample has a prediction,
    :class:`DamagedRunError` for an unreadable ``run.json`` beside predictions, :class:`RunWriteError`
    when a file cannot be written."""
    if predict is None and predict_batch is None:
        raise ValueError("run_resumable needs predict or predict_batch")
    dist = dist or Dist()
    run_dir = Path(run_dir)
    with lock_run_dir(run_dir, dist):
        return _run_locked(samples, predict, run_dir, info=info, total=total, progress=progress, dist=dist,
                           skipped=skipped if skipped is not None else [], batch_size=batch_size,
                           predict_batch=predict_batch, order_key=order_key)


def _run_locked(samples, predict, run_dir: Path, *, info, total, progress, dist: Dist, skipped: list, batch_size,
                predict_batch, order_key) -> dict[str, Any] | None:
    from tqdm.auto import tqdm

    target = run_dir / (PRED if dist.world == 1 else f"predictions.part{dist.rank}.jsonl")

    def prepare() -> set[str]:  # on every rank, so that a refusal stops them all
        check_identity(run_dir, info)
        drop_cut_line(target)
        old = _read_metrics(run_dir, warn=dist.rank == 0, then=f"this run rebuilds it from {PRED}")
        return {str(i) for i in old.get("failed_ids") or []}

    known_bad = _together(dist, prepare)  # samples that failed in the last run: retried, not "fresh" failures
    _together(dist, lambda: dist.rank == 0 and atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2)))
    done = set(read_records(prediction_files(run_dir), warn=dist.rank == 0))
    desc = " ".join(str(info[k]) for k in ("benchmark", "name") if info.get(k)) or "eval"
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress or dist.rank != 0)
    t0 = time.time()
    state = {"new": 0, "rows": 0, "fresh_failed": 0}
    seen: set[str] = set()  # ids of the rows this run covers
    duplicates: list[SkippedRow] = []
    failed: list[dict[str, Any]] = []

    def mine() -> Iterator[tuple[int, Any]]:  # (pos, sample) this process predicts; the others pass by
        for pos, sample in enumerate(samples):
            state["rows"] += 1
            sid = str(sample.id)
            if sid in seen:  # every rank sees every row: all agree on duplicates
                duplicates.append(SkippedRow(index=sid, line=None, reason=DUPLICATE))
                bar.update(1)
                continue
            seen.add(sid)
            if pos % dist.world != dist.rank or sid in done:
                bar.update(1)
                continue
            yield pos, sample

    def one(sample) -> dict[str, Any]:
        rec = predict(sample) if predict is not None else predict_batch([sample])[0]
        return _check_record(sample, rec)

    def written(out: _Appender, batch: list[tuple[int, Any, dict[str, Any]]]) -> None:
        lines = []
        for pos, _, rec in batch:
            rec["pos"] = pos
            lines.append(json.dumps(rec) + "\n")
        out.write(lines)  # then, and only then, they are done
        done.update(str(sample.id) for _, sample, _ in batch)
        state["new"] += len(batch)

    key = (lambda ps: order_key(ps[1])) if order_key is not None else None

    def predict_all() -> None:
        out = _Appender(target)
        try:
            for batch in sorted_batches(mine(), batch_size, key=key):
                batch = [ps for _, ps in batch]
                records = None
                if len(batch) > 1:
                    try:
                        records = (predict_batch([s for _, s in batch]) if predict_batch is not None
                                   else [predict(s) for _, s in batch])
                        records = [_check_record(s, r) for (_, s), r in zip(batch, records, strict=True)]
                    except Exception:  # noqa: BLE001 - retried one by one below, where a bad sample shows
                        records = None
                        _release_cuda_memory()
                if records is not None:
                    written(out, [(pos, s, rec) for (pos, s), rec in zip(batch, records, strict=True)])
                    bar.update(len(batch))
                    continue
                for pos, sample in batch:
                    bar.update(1)
                    try:
                        rec = one(sample)
                    except Exception as e:  # noqa: BLE001 - one bad sample must not end a long run
                        fresh = str(sample.id) not in known_bad
                        if fresh and state["new"] == 0 and state["fresh_failed"] + 1 >= SYSTEMATIC_FAILURES:
                            raise  # every sample fails: a setup error, not a bad sample
                        state["fresh_failed"] += fresh
                        failed.append({"id": str(sample.id), "pos": pos, "error": f"{type(e).__name__}: {e}"})
                        _release_cuda_memory()  # an out-of-memory sample must not starve the next ones
                        continue
                    written(out, [(pos, sample, rec)])
        finally:
            out.close()
            bar.close()
        if dist.world > 1:  # rank 0 reports every rank's failures
            atomic_write_text(run_dir / f"failed.part{dist.rank}.json", json.dumps(failed))

    _together(dist, predict_all)
    if dist.rank != 0:
        return None
    if dist.world > 1:
        failed = [x for r in range(dist.world) for x in json.loads((run_dir / f"failed.part{r}.json").read_text())]
    for p in run_dir.glob("failed.part*.json"):  # (a killed run's too)
        p.unlink()
    merge_parts(run_dir, reorder=True)  # batches, or a killed batched run before, append out of order
    rows_skipped = [*skipped, *duplicates]
    failed.sort(key=lambda x: x["pos"])
    extra = {"n_rows": state["rows"] + len(skipped), "n_skipped": len(rows_skipped),
             "n_duplicates": sum(s.reason == DUPLICATE for s in rows_skipped),
             "skipped": [s.__dict__ for s in rows_skipped[:CAP]], "n_failed": len(failed), "failed": failed[:CAP],
             "failed_ids": [x["id"] for x in failed], "wall_s": round(time.time() - t0, 1), "n_new": state["new"],
             "world_size": dist.world}
    metrics = _score(run_dir, extra, covered=seen)
    if metrics["score"] is None:
        raise NothingToScoreError(f"{run_dir}: {metrics['error']}")
    return metrics


def _release_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _nothing_reason(m: dict[str, Any]) -> str:
    """Why a run has no score, from its counts: what happened to its rows."""
    n_rows, n_skipped, n_failed = m.get("n_rows"), m.get("n_skipped") or 0, m.get("n_failed") or 0
    if n_rows is None and not n_skipped and not n_failed:
        return f"no sample was predicted: {PRED} holds no record of this run"
    if not n_rows:
        return "no sample was predicted: the input has no rows"
    parts = []
    if n_failed:
        e = (m.get("failed") or [{}])[0]
        parts.append(f"{n_failed} failed (e.g. {e.get('id')}: {e.get('error')})")
    dup = m.get("n_duplicates") or 0
    malformed = n_skipped - dup
    listed = [s for s in m.get("skipped") or [] if s.get("reason") != DUPLICATE]
    if malformed:
        eg = f" (e.g. row {listed[0]['index']}: {listed[0]['reason']})" if listed else ""
        parts.append(f"{malformed} rows skipped as malformed{eg}")
    if dup:
        parts.append(f"{dup} rows skipped as a duplicate index")
    text = "no sample was predicted: " + ", ".join(parts)
    if malformed == n_rows and m.get("task"):
        text += f"; is this data of the task {m['task']!r} (--task)?"
    return text


def _score(run_dir: Path, extra: dict[str, Any] | None, covered: set[str] | None,
           given: dict[str, Any] | None = None, answers: str | None = None) -> dict[str, Any]:
    files = prediction_files(run_dir)
    info = {**read_run_info(run_dir), **(given or {})}
    old = _read_metrics(run_dir)
    records = read_records(files)
    if covered is None:  # `score`: the rows the last run covered, as far as metrics.json tells
        outside = [k for k in old.get("outside_ids") or [] if k in records]
    else:
        outside = [k for k in records if k not in covered]
        if outside:
            warnings.warn(f"{run_dir}: {len(outside)} records of {PRED} are of rows this run did not read (e.g. id "
                          f"{outside[0]}: a larger --limit or n before?); kept there, left out of metrics.json",
                          stacklevel=3)
    left_out = set(outside)
    recs = [r for k, r in records.items() if k not in left_out]
    task = info.get("task") or (recs[0].get("task", "grounding") if recs else "grounding")
    kept_extra = {k: old[k] for k in RUN_FIELDS if k in old}
    metrics = {**info, "task": task, **kept_extra, **(extra or {}), "n_outside": len(outside),
               "outside_ids": outside, **score_records(recs, task, info.get("benchmark"), answers)}
    if not outside:
        del metrics["outside_ids"]
    if not recs:
        metrics["score"] = None
        metrics["error"] = _nothing_reason(metrics)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def score_run(run_dir: str | Path, extra: dict[str, Any] | None = None, given: dict[str, Any] | None = None,
              answers: str | None = None) -> dict[str, Any]:
    """Recompute ``metrics.json`` of a run from its predictions (``ivcprune score``).

    The fields that describe the last run (:data:`RUN_FIELDS`: counts of rows, skipped, failed) are kept
    from the old ``metrics.json``; a damaged one is rebuilt with a warning naming it (those fields are
    then lost). ``score`` is ``None``, with ``error`` saying why, when there is no record. Takes the run's
    lock (:class:`RunLockedError` while a run writes the directory). ``given`` (``benchmark``, ``task``) stands in
    for, or overrides, those fields of ``run.json``; without ``run.json`` the benchmark must be given (MME and
    POPE are both yes/no and scored differently): :class:`MissingRunInfoError` otherwise. ``answers``: read
    multiple-choice / yes-no answers again under this mode (default: each record's own)."""
    run_dir = Path(run_dir)
    files = prediction_files(run_dir)
    if not any(p.exists() for p in files):
        raise FileNotFoundError(f"{run_dir}: no {PRED} (not a run directory)")
    if not (given or {}).get("benchmark") and not read_run_info(run_dir).get("benchmark"):
        raise MissingRunInfoError(f"{run_dir}: no run.json (or no benchmark in it) to tell which benchmark these "
                                  "predictions are of, and so how to score them; name it: --benchmark NAME (and "
                                  "--task grounding|mcq|yesno when the records do not say)")
    with _hold(run_dir):
        return _score(run_dir, extra, covered=None, given=given, answers=answers)


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
        rec, problem = _read_json(m)
        if problem:  # left by a crash or an older version: the predictions tell it again
            if not any(p.exists() for p in prediction_files(m.parent)):
                warnings.warn(f"{m} is damaged ({problem}) and there is no {PRED} beside it to rebuild it from; "
                              f"the run is left out", stacklevel=2)
                continue
            warnings.warn(f"{m} is damaged ({problem}); rebuilt from {PRED}", stacklevel=2)
            rec = score_run(m.parent)
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
    unpruned run of that benchmark (and model); the mean relative score, kept ratio and prefill time. A run
    without a score (``score`` null: nothing was predicted) is left out, with a warning saying why."""
    usable = []
    for r in runs:
        if r.get("score") is None:
            warnings.warn(f"{r.get('_dir') or r.get('name') or r.get('benchmark')}: no score "
                          f"({r.get('error') or 'none in metrics.json'}); left out of the table", stacklevel=2)
            continue
        usable.append(r)
    runs = usable
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
        kept, prefill = r.get("mean_kept_visual_ratio"), r.get("mean_prefill_s")
        row["kept"][bench] = 1.0 if kept is None else kept
        row["prefill_s"][bench] = 0.0 if prefill is None else prefill
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
