"""Fault injection on evaluation runs (`run_resumable` with a fake predict, no model): kills at random
moments, a full disk at every write, a second writer, damaged files. After each fault the run resumes to
exactly the predictions and counts of an uninterrupted run: nothing lost, duplicated or invented."""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ivcprune.evals import runner
from ivcprune.evals.runner import (
    DamagedRunError,
    RunLockedError,
    RunWriteError,
    atomic_write_text,
    find_runs,
    lock_run_dir,
    run_resumable,
    score_run,
)

# The fake benchmark, shared by the tests and by the scripts they run in other processes: 40 samples, one of
# them a second row of id "5" (skipped: "duplicate index"), one malformed row the reader skipped, and a sample
# whose prediction always raises ("11", reported failed, retried by every run).
FAKE = '''
import time
from types import SimpleNamespace

from ivcprune.evals.grounding_data import SkippedRow

IDS = [str(i) for i in range(40)]
IDS[17] = "5"
BAD = {"11"}
INFO = {"name": "fake", "task": "mcq", "benchmark": "fake", "method": "none"}


def samples(skipped, n=None):
    for i, sid in enumerate(IDS[:n]):
        if i == 3:
            skipped.append(SkippedRow(index="x3", line=5, reason="ValueError: no image"))
        yield SimpleNamespace(id=sid, size=(7 * i) % 5, row=i)


def predict(sample, delay=0.0):
    if sample.id in BAD:
        raise ValueError(f"bad sample {sample.id}")
    time.sleep(delay)
    k = int(sample.id)
    return {"id": sample.id, "task": "mcq", "pred": "AB"[k % 2], "gt": "A", "correct": k % 2 == 0,
            "category": f"c{k % 3}", "row": sample.row}


def run(run_dir, batch_size=1, n=None, delay=0.0, **kw):
    skipped = []
    return run_resumable(samples(skipped, n), None, run_dir, info=INFO, progress=False, skipped=skipped,
                         batch_size=batch_size, predict_batch=lambda batch: [predict(s, delay) for s in batch],
                         order_key=lambda s: s.size, **kw)
'''
fake: dict = {"run_resumable": run_resumable}
exec(compile(FAKE, "fake", "exec"), fake)
run = fake["run"]
N_ROWS, N, N_SKIPPED, N_FAILED = 41, 38, 2, 1  # 40 samples + 1 malformed row; 1 duplicate, 1 malformed; "11"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted run: its records by id and its metrics."""
    d = tmp_path_factory.mktemp("ref") / "run"
    m = run(d)
    return {"records": {r["id"]: r for r in _lines(d)}, "metrics": m}


def _check_final(run_dir: Path, reference: dict) -> None:
    """The run equals the uninterrupted one: each id once, the same records in dataset order, exact counts."""
    recs = _lines(run_dir)
    assert [r["id"] for r in recs] == list(reference["records"])  # no duplicate, dataset order
    assert {r["id"]: r for r in recs} == reference["records"]
    m, ref = _metrics(run_dir), reference["metrics"]
    assert (m["n"], m["n_skipped"], m["n_failed"], m["n_rows"]) == (N, N_SKIPPED, N_FAILED, N_ROWS)
    assert m["n"] + m["n_skipped"] + m["n_failed"] == m["n_rows"]
    assert m["failed_ids"] == ["11"] and m["score"] == ref["score"] and m["n_outside"] == 0
    assert not list(run_dir.glob("predictions.part*")) and not list(run_dir.glob(".*.tmp"))


def _whole_records(run_dir: Path) -> list[dict]:
    """The records of a predictions file after a fault: every line whole, but maybe a last one cut short."""
    path = run_dir / "predictions.jsonl"
    if not path.exists():
        return []
    data = path.read_text()
    lines = data.split("\n")
    if lines[-1]:
        lines = lines[:-1]  # a last line cut by the fault, without its newline
    return [json.loads(x) for x in lines if x]


def test_reference_counts(reference):
    m = reference["metrics"]
    assert (m["n"], m["n_skipped"], m["n_duplicates"], m["n_failed"], m["n_rows"]) == (N, N_SKIPPED, 1, N_FAILED,
                                                                                        N_ROWS)
    assert {"index": "5", "line": None, "reason": "duplicate index"} in m["skipped"]
    assert reference["records"]["5"]["row"] == 5  # the first row of an id is predicted, the second skipped


# -- (a) kills at random moments --------------------------------------------------------------------
KILLER = '''
import json, os, random, signal, sys, time
from ivcprune.evals.runner import run_resumable
{fake}
run_dir, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
log = []
for r in range(rounds):
    # the first kill early in the run (it cannot have finished); the others anywhere, during the
    # predictions, the merge of batches, the scoring, or after the end
    delay = rng.uniform(0.0, 0.05) if r == 0 else rng.uniform(0.0, 0.3)
    batch_size = rng.choice([1, 4])
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run(run_dir, batch_size=batch_size, delay=0.02)
        except BaseException as e:
            print(repr(e), file=sys.stderr)
            code = 1
        os._exit(code)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    log.append({{"delay": round(delay, 3), "batch_size": batch_size, "killed": os.WIFSIGNALED(status),
                 "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}})
print(json.dumps(log))
'''


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_random_moments_then_resume(tmp_path, reference, seed):
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(fake=FAKE))
    d = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(d), str(seed), "8"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads(proc.stdout.strip().splitlines()[-1])
    assert log[0]["killed"]  # the first kill landed in the middle of the run
    assert all(x["killed"] or x["exit"] == 0 for x in log), (log, proc.stderr[-3000:])  # no run failed
    for rec in _whole_records(d):  # whatever the moment, what is on disk is whole and right
        assert rec == reference["records"][rec["id"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kill leaves nothing to warn about (no damaged line or file)
        run(d)
    _check_final(d, reference)


# -- (b) a full disk ---------------------------------------------------------------------------------
def _full_disk_at(monkeypatch, run_dir: Path, nth: int) -> dict:
    """From the ``nth`` write to a file of ``run_dir`` (lock files aside) on, the disk is full: that write
    stores half its bytes, every later one raises ENOSPC."""
    real = os.write
    state = {"writes": 0}

    def write(fd, data):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if not path.startswith(str(run_dir)) or "/.lock" in path:
            return real(fd, data)
        state["writes"] += 1
        if state["writes"] < nth:
            return real(fd, data)
        if state["writes"] == nth and len(data) > 1:
            return real(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    return state


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell files apart")
@pytest.mark.parametrize("batch_size", [1, 4])
def test_full_disk_at_every_write(tmp_path, monkeypatch, reference, batch_size):
    """A disk that fills at the 1st, 2nd, ... write of a resumed run: the run stops with an error naming
    the file; what the first run wrote (predictions, run.json, metrics.json) is intact; a resume completes."""
    for nth in itertools.count(1):
        d = tmp_path / f"n{nth}"
        run(d, n=20)  # a first run over the first 20 samples...
        before = {p.name: p.read_bytes() for p in (d / "predictions.jsonl", d / "run.json", d / "metrics.json")}
        state = _full_disk_at(monkeypatch, d, nth)
        try:
            run(d, batch_size=batch_size)  # ...resumed over all of them, on a disk that fills
            failed = None
        except RunWriteError as e:
            failed = e
        monkeypatch.undo()
        if failed is None:
            assert state["writes"] < nth  # every write was tried: the run had no more to write
            break
        assert failed.errno == errno.ENOSPC
        assert str(d) in str(failed) and "No space left on device" in str(failed)
        assert (d / "run.json").read_bytes() == before["run.json"]  # (the same settings)
        assert json.loads((d / "metrics.json").read_text())  # whole: the old one or the new one
        old_ids = {json.loads(x)["id"] for x in before["predictions.jsonl"].splitlines()}
        assert old_ids <= {r["id"] for r in _whole_records(d)}  # appended to, or merged whole: none lost
        for rec in _whole_records(d):
            assert rec == reference["records"][rec["id"]]
        assert not list(d.glob(".*.tmp"))
        run(d)  # space again: the resume completes
        _check_final(d, reference)
    assert nth > 2 + 20 // batch_size  # run.json, the appends, metrics.json (and the merge of batches) were hit


def test_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "comparison.md"
    atomic_write_text(path, "old\n")
    assert (path.stat().st_mode & 0o777) == 0o666 & ~runner._UMASK  # as open() creates files, not 0600

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(OSError, match=r"cannot write .*comparison.md: No space left on device"):
        atomic_write_text(path, "new\n" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["comparison.md"]


# -- (c) concurrent writers --------------------------------------------------------------------------
HOLDER = '''
import sys
from ivcprune.evals.runner import lock_run_dir
with lock_run_dir(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()  # until the test closes the pipe
'''


def _locked_elsewhere(path: Path) -> bool:
    """Whether another process than this one holds the lock of ``path`` (asked from a forked child)."""
    pid = os.fork()
    if pid == 0:
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os._exit(0)
        except OSError:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 1


def test_a_second_writer_is_refused_until_the_first_ends(tmp_path, reference):
    d = tmp_path / "run"
    run(d, n=10)
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.name != ".lock"}
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(d)], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for _ in range(2):  # a refused attempt does not break the holder's lock
            with pytest.raises(RunLockedError, match=rf"is being written by another process \(pid {holder.pid} on "
                                                     rf"{socket.gethostname()}, since .*holder.py"):
                run(d)
        with pytest.raises(RunLockedError):
            score_run(d)  # `ivcprune score` writes metrics.json: a writer too
        assert {p.name: p.read_bytes() for p in d.iterdir() if p.name != ".lock"} == before  # nothing touched
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    run(d)
    _check_final(d, reference)
    assert (d / ".lock").read_text() == ""  # released: no holder named


def test_the_lock_is_reentrant_within_a_process(tmp_path, reference):
    d = tmp_path / "run"
    with lock_run_dir(d) as held, lock_run_dir(d):  # the CLI around the model load, then the run: no deadlock
        assert held == d and _locked_elsewhere(d / ".lock")
        run(d)  # takes it a third time
        assert _locked_elsewhere(d / ".lock")  # the run's release did not release the CLI's hold
    assert not _locked_elsewhere(d / ".lock")
    _check_final(d, reference)


RANK = '''
import os, sys
from ivcprune.evals.runner import init_distributed, run_resumable
{fake}
import torch.distributed as tdist
dist = init_distributed()
if os.environ.get("BROKEN_RANK") == str(dist.rank):
    def predict(sample, delay=0.0):  # every sample fails on this rank: a setup error, the run stops
        raise RuntimeError("broken device")
code = 0
try:
    run(sys.argv[1], dist=dist)
except Exception as e:
    print(f"rank {{dist.rank}}: {{type(e).__name__}}: {{e}}", file=sys.stderr)
    code = 3
tdist.destroy_process_group()
sys.exit(code)
'''


def test_every_rank_raises_when_one_cannot_lock_or_fails(tmp_path, reference):
    """Under torchrun each rank locks its own file; if one cannot, every rank raises (none waits at a
    barrier for ever); so do they all when one rank's run fails; then the same launch completes, keeps
    what the failed one predicted, and equals one process."""
    d = tmp_path / "run"
    d.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK.format(fake=FAKE))

    def launch(**env) -> list[subprocess.CompletedProcess]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, str(script), str(d)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**ENV, **env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
        out = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=120)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        return out

    fd = os.open(d / ".lock.rank1", os.O_RDWR | os.O_CREAT)  # another run's rank 1 holds its lock
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rank0, rank1 = launch()
    finally:
        os.close(fd)
    assert (rank0.returncode, rank1.returncode) == (3, 3), (rank0.stderr[-2000:], rank1.stderr[-2000:])
    assert "rank 1: RunLockedError" in rank1.stderr and "is being written by another process" in rank1.stderr
    assert "rank 0: RunLockedError" in rank0.stderr and "another rank of this run could not lock" in rank0.stderr
    assert not (d / "run.json").exists() and not list(d.glob("predictions*"))
    rank0, rank1 = launch(BROKEN_RANK="1")  # an error on one rank stops the other too
    assert (rank0.returncode, rank1.returncode) == (3, 3), (rank0.stderr[-2000:], rank1.stderr[-2000:])
    assert "rank 1: RuntimeError: broken device" in rank1.stderr
    assert "rank 0: RankFailedError: rank 0: another rank of this run failed" in rank0.stderr
    assert not (d / "metrics.json").exists() and (d / "predictions.part0.jsonl").exists()  # rank 0's work kept
    rank0, rank1 = launch()
    assert rank0.returncode == rank1.returncode == 0, (rank0.stderr[-2000:], rank1.stderr[-2000:])
    _check_final(d, reference)
    assert _metrics(d)["world_size"] == 2


# -- (d) damaged files -------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", '{"n": 38, "score": 5', "[1, 2]"])
def test_damaged_metrics_json_is_rebuilt_with_a_warning(tmp_path, reference, content):
    d = tmp_path / "run"
    run(d)
    for rebuild in (score_run, lambda d: find_runs([d]), run):  # `score`, `compare`, a resume
        (d / "metrics.json").write_text(content)
        with pytest.warns(UserWarning, match=rf"{d / 'metrics.json'} is damaged"):
            rebuild(d)
        assert _metrics(d)["score"] == reference["metrics"]["score"] and _metrics(d)["n"] == N
    _check_final(d, reference)  # the resume counts the rows again (what the damaged file said of them is lost)


@pytest.mark.parametrize("content", ["", '{"name": "fake", "task": "mc'])
def test_damaged_run_json_is_refused_by_name(tmp_path, reference, content, capsys):
    from ivcprune.cli import main

    d = tmp_path / "run"
    run(d, n=10)
    (d / "run.json").write_text(content)
    for action in (run, score_run):
        with pytest.raises(DamagedRunError, match=rf"{d / 'run.json'} is damaged .*Delete it to resume the run "
                                                  "with the current settings"):
            action(d)
    assert main(["score", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.json is damaged" in err and "Traceback" not in err
    (d / "run.json").unlink()  # as the error says
    run(d)
    _check_final(d, reference)
    fresh = tmp_path / "fresh"  # a damaged run.json beside no prediction is simply written anew
    fresh.mkdir()
    (fresh / "run.json").write_text(content)
    run(fresh)
    _check_final(fresh, reference)


def test_a_damaged_line_in_the_middle_is_ignored_and_its_sample_redone(tmp_path, reference):
    d = tmp_path / "run"
    run(d)
    lines = (d / "predictions.jsonl").read_text().splitlines()
    lines[7] = lines[7][: len(lines[7]) // 2]  # e.g. a disk error in an older version, then more appends
    (d / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"predictions.jsonl:8: not a prediction record"):
        m = score_run(d)
    assert m["n"] == N - 1  # scored without it...
    with pytest.warns(UserWarning, match=r"predictions.jsonl:8"):
        m = run(d)
    assert m["n_new"] == 1  # ...and predicted again by the next run
    _check_final(d, reference)  # the file rewritten whole, in order, the damaged line gone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score_run(d)


def test_several_lines_of_an_id_count_once_the_last_wins(tmp_path, reference):
    d = tmp_path / "run"
    run(d)
    first = dict(reference["records"]["0"])
    with open(d / "predictions.jsonl", "a") as f:  # e.g. two runs' files concatenated by hand
        f.write(json.dumps({**first, "pred": "B", "correct": False}) + "\n")
        f.write(json.dumps(first) + "\n")
        f.write(json.dumps({**first, "pred": "B", "correct": False}) + "\n")
    m = score_run(d)
    assert m["n"] == N and m["n"] + m["n_skipped"] + m["n_failed"] == m["n_rows"]
    assert m["accuracy"] < reference["metrics"]["accuracy"]  # the last line of "0" (a wrong answer) counts
    run(d)  # the next run keeps one line per id, the last
    recs = _lines(d)
    assert [r["id"] for r in recs] == list(reference["records"])
    assert recs[0]["pred"] == "B"


def test_an_unterminated_whole_last_record_is_kept(tmp_path, reference):
    d = tmp_path / "run"
    run(d, n=10)
    data = (d / "predictions.jsonl").read_bytes()
    (d / "predictions.jsonl").write_bytes(data.rstrip(b"\n"))  # whole, but its newline never written
    assert run(d)["n_new"] == N - 10  # the 10th sample is not predicted again
    _check_final(d, reference)
