"""`ivcprune eval / score / compare` end to end on the embedded model: every benchmark format, metrics by
hand, resume after a crash, 2-process data parallelism equal to 1 process, comparison tables; every row
accounted for once (duplicates, --limit), runs with nothing to score, failed samples retried (faults:
test_faults.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ivcprune.cli import main
from ivcprune.evals import tasks
from ivcprune.evals.grounding_data import SkippedRow
from ivcprune.evals.runner import RUN_FIELDS, NothingToScoreError, compare_table, find_runs, merge_parts, run_resumable

from benchfix import mmbench_tsv, mme_tsv, pope_tsv, refcoco_parquet

VOLATILE = ("prefill_s",)  # timings differ between runs; everything else must not


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("benchdata")
    return {"mmbench": mmbench_tsv(d), "mme": mme_tsv(d), "pope": pope_tsv(d), "refcoco": refcoco_parquet(d)}


def _eval(out, data, *extra):
    return main(["eval", "--model", "toy", "--data", data, "--out", str(out), "--max-new-tokens", "6", "--quiet",
                 *extra])


def test_every_format_end_to_end(data, tmp_path, capsys):
    out = tmp_path / "all"
    spec = ",".join(str(data[k]) for k in ("mmbench", "mme", "pope", "refcoco"))
    assert _eval(out, spec, "--split", "val", "--methods", "none,ivc", "--budgets", "0.5") == 0
    err = capsys.readouterr().err
    expected = {"MMBench_DEV_EN_V11": ("mcq", 5, 2), "MME": ("yesno", 6, 1), "POPE": ("yesno", 6, 1),
                "refcoco_val": ("grounding", 3, 1)}
    for bench, (task, n, n_skipped) in expected.items():
        assert f"{bench} none: skipped {n_skipped} " in err
        for run in ("none", "ivc-b0.5"):
            m = json.loads((out / bench / run / "metrics.json").read_text())
            assert (m["task"], m["n"], m["n_skipped"], m["benchmark"]) == (task, n, n_skipped, bench)
            recs = _records(out / bench / run)
            assert len({r["id"] for r in recs}) == n == len(recs)
            assert [r["pos"] for r in recs] == sorted(r["pos"] for r in recs)
            if run == "ivc-b0.5":
                assert m["mean_kept_visual_ratio"] == pytest.approx(0.5, abs=0.01)
                assert all(r["visual_kept"] == r["visual_tokens"] // 2 for r in recs)
                assert (m["budget"], m["layer"]) == (0.5, 3)  # the toy model's preset K
            else:
                assert m["mean_kept_visual_ratio"] == 1.0
    table = (out / "comparison.md").read_text()
    assert "| method | budget | K | MMBench_DEV_EN_V11 | MME | POPE | refcoco_val | rel. avg |" in table
    assert len(table.strip().splitlines()) == 4
    # the unpruned answers are the model's own greedy answers to the documented prompts
    rec = _records(out / "POPE" / "none")[0]
    assert rec["gt"] == "Yes" and rec["category"] == "adversarial"


def test_metrics_from_scripted_answers(data, tmp_path, scripted_answers):
    """The scoring path on known answers: MME acc / acc+, circular MMBench, POPE F1, by hand."""
    scripted_answers[:] = ["Yes", "No", "Yes.", "yes", "I don't know", "No"]
    assert _eval(tmp_path / "mme", str(data["mme"])) == 0
    m = json.loads((tmp_path / "mme" / "metrics.json").read_text())
    # existence: 3/4 right, 1 of 2 images fully right -> 75 + 50; code_reasoning: 1/2, 0 of 1 -> 50 + 0
    assert m["mme_perception"] == pytest.approx(125.0) and m["mme_cognition"] == pytest.approx(50.0)
    assert m["score"] == pytest.approx(175.0) and m["n_unparseable"] == 1

    scripted_answers[:] = ["A", "The answer is B", "two", "B. red", "circle"]
    assert _eval(tmp_path / "mmb", str(data["mmbench"])) == 0
    m = json.loads((tmp_path / "mmb" / "metrics.json").read_text())
    preds = [r["pred"] for r in _records(tmp_path / "mmb")]
    assert preds == ["A", "B", "B", "B", "B"]  # "two" is option B's text; "circle" is B in the rotated copy
    assert m["accuracy"] == pytest.approx(3 / 5) and m["circular_accuracy"] == pytest.approx(1 / 3)
    assert m["score"] == pytest.approx(100 / 3)

    scripted_answers[:] = ["Yes", "Yes", "No", "No", "Yes, there is", "no"]
    assert _eval(tmp_path / "pope", str(data["pope"])) == 0
    m = json.loads((tmp_path / "pope" / "metrics.json").read_text())
    # yes predicted 3 (2 right), yes truth 3: precision = recall = F1 = 2/3
    assert m["score"] == pytest.approx(200 / 3) and m["accuracy"] == pytest.approx(4 / 6)
    assert m["by_category"]["adversarial"]["precision"] == 0.5 and m["by_category"]["random"]["f1"] == 1.0
    assert not scripted_answers


def test_resume_after_crash(data, tmp_path, monkeypatch, capsys):
    ref, out = tmp_path / "ref", tmp_path / "crashed"
    args = ("--method", "ivc", "--budget", "0.5")
    assert _eval(ref, str(data["pope"]), *args) == 0
    calls = {"n": 0}
    real = tasks.generate_answers

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) in the middle of the fourth sample
        return real(*a, **kw)

    monkeypatch.setattr(tasks, "generate_answers", dying)
    assert _eval(out, str(data["pope"]), *args) == 130  # the CLI says how to resume
    monkeypatch.setattr(tasks, "generate_answers", real)
    assert len(_records(out)) == 3
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "3", "task": "yesno", "ans')  # the line a kill cut short
    calls["n"] = 0
    assert _eval(out, str(data["pope"]), *args) == 0
    done = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]  # all whole
    assert sorted(r["id"] for r in done) == sorted(r["id"] for r in _records(ref))  # nothing lost or doubled
    assert json.loads((out / "metrics.json").read_text())["n"] == 6
    assert json.loads((out / "metrics.json").read_text())["n_new"] == 3
    # the resumed run's predictions equal an uninterrupted run's
    by_id = {r["id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in done}
    assert by_id == {r["id"]: r for r in _records(ref)}
    # resuming into a run of another configuration (method, or the model's dtype) is refused
    assert _eval(out, str(data["pope"]), "--method", "ivc", "--budget", "0.25") == 2
    capsys.readouterr()
    assert _eval(out, str(data["pope"]), *args, "--dtype", "bfloat16") == 2
    assert "holds predictions of another run (dtype differ" in capsys.readouterr().err
    env = json.loads((out / "run.json").read_text())["environment"]
    assert (env["dtype"], env["world_size"]) == ("float32", 1) and {"torch", "transformers", "ivcprune"} <= set(env)


def test_limit_then_resume_the_rest(data, tmp_path, monkeypatch):
    from ivcprune.inputs import EncodedImage

    decoded = []  # images are decoded only for the samples predicted, not for those done already
    real = EncodedImage.load
    monkeypatch.setattr(EncodedImage, "load", lambda self: decoded.append(self) or real(self))
    out = tmp_path / "lim"
    assert _eval(out, str(data["mmbench"]), "--limit", "2") == 0
    assert [r["id"] for r in _records(out)] == ["0", "1"] and len(decoded) == 2
    assert _eval(out, str(data["mmbench"])) == 0
    assert [r["id"] for r in _records(out)] == ["0", "1", "2", "1000000", "1000001"]
    assert json.loads((out / "metrics.json").read_text())["n_new"] == 3 and len(decoded) == 5


def test_pictures_of_the_kept_tokens(data, tmp_path):
    from PIL import Image

    out = tmp_path / "pics"
    args = ("--split", "val", "--methods", "none,ivc", "--budgets", "0.5", "--pictures", "2")
    assert _eval(out, str(data["refcoco"]), *args, "--limit", "1") == 0
    assert _eval(out, str(data["refcoco"]), *args) == 0  # the resumed run draws the one picture left
    assert not (out / "none" / "pictures").exists()  # nothing pruned, nothing to draw
    pics = sorted((out / "ivc-b0.5" / "pictures").glob("*.png"))
    assert [p.name for p in pics] == ["val-0_0.png", "val-0_1.png"]  # ids made file-safe ("#" -> "_")
    rec = next(r for r in _records(out / "ivc-b0.5") if r["id"] == "val-0#0")
    w, h = rec["resized"]  # two panels of the image as the model saw it, titles above, the legend below
    assert Image.open(pics[0]).size == (2 * w + 24, h + 18 + 16 + 22)
    # multiple choice: the answer and the truth in the title instead of boxes
    assert _eval(tmp_path / "mcq", str(data["mmbench"]), "--method", "ivc", "--pictures", "1", "--limit", "2") == 0
    assert [p.name for p in (tmp_path / "mcq" / "pictures").glob("*.png")] == ["0.png"]


def test_score_recomputes_from_predictions(data, tmp_path, capsys):
    out = tmp_path / "s"
    assert _eval(out, str(data["mme"]), "--method", "random", "--budget", "0.5") == 0
    before = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()
    capsys.readouterr()
    assert main(["score", str(out), "--json"]) == 0
    after = json.loads((out / "metrics.json").read_text())
    # everything but the fields that describe the last run (lost with the file) comes back
    assert {k: v for k, v in after.items() if k not in RUN_FIELDS} == \
        {k: v for k, v in before.items() if k not in RUN_FIELDS}
    assert json.loads(capsys.readouterr().out)[0]["mme_total"] == before["mme_total"]


def test_merge_parts_of_a_killed_parallel_run(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "predictions.jsonl").write_text(json.dumps({"id": "a", "pos": 0}) + "\n")
    (run / "predictions.part0.jsonl").write_text(json.dumps({"id": "c", "pos": 2}) + "\n" + '{"id": "e", "p')
    (run / "predictions.part1.jsonl").write_text(json.dumps({"id": "b", "pos": 1}) + "\n")
    merge_parts(run)
    assert [json.loads(x)["id"] for x in (run / "predictions.jsonl").read_text().splitlines()] == ["a", "b", "c"]
    assert not list(run.glob("predictions.part*"))


def test_two_processes_equal_one(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    spec = f"{data['mmbench']},{data['refcoco']}"
    args = ["--split", "val", "--methods", "none,ivc", "--budgets", "0.5"]
    assert _eval(one, spec, *args) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ivcprune",
           "eval", "--model", "toy", "--data", spec, "--out", str(two), "--max-new-tokens", "6", "--quiet", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for bench in ("MMBench_DEV_EN_V11", "refcoco_val"):
        for run in ("none", "ivc-b0.5"):
            assert _records(two / bench / run) == _records(one / bench / run)
            m1 = json.loads((one / bench / run / "metrics.json").read_text())
            m2 = json.loads((two / bench / run / "metrics.json").read_text())
            assert m2["world_size"] == 2 and m2["score"] == m1["score"] and m2["n"] == m1["n"]
            # every row counted once, all ranks together
            assert (m2["n_rows"], m2["n_skipped"], m2["n_failed"]) == (m1["n_rows"], m1["n_skipped"], 0)
            assert m2["n"] + m2["n_skipped"] + m2["n_failed"] == m2["n_rows"]
            assert not list((two / bench / run).glob("predictions.part*"))


def _metrics(d: Path, **kw):
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(kw))


def test_compare_table(tmp_path, capsys):
    base = dict(model="m", n=10, mean_prefill_s=0.1)
    _metrics(tmp_path / "a" / "MME" / "none", **base, benchmark="MME", method="none", label="unpruned", score=1500.0,
             mean_kept_visual_ratio=1.0)
    _metrics(tmp_path / "a" / "MME" / "ivc", **base, benchmark="MME", method="ivc", label="IVC-Prune", budget=0.5,
             layer=16, score=1485.0, mean_kept_visual_ratio=0.5)
    _metrics(tmp_path / "b" / "POPE" / "none", **base, benchmark="POPE", method="none", label="unpruned", score=80.0,
             mean_kept_visual_ratio=1.0)
    _metrics(tmp_path / "b" / "POPE" / "ivc", **base, benchmark="POPE", method="ivc", label="IVC-Prune", budget=0.5,
             layer=16, score=84.0, mean_kept_visual_ratio=0.5)
    table, rows = compare_table(find_runs([tmp_path / "a", tmp_path / "b"]))
    lines = table.splitlines()
    assert lines[0] == "| method | budget | K | MME | POPE | rel. avg | kept visual | prefill ms |"
    assert lines[2] == "| unpruned | - | - | 1500 | 80.0 | 100.0% | 100.0% | 100.0 |"
    assert lines[3] == "| IVC-Prune | 0.5 | 16 | 1485 (99.0%) | 84.0 (105.0%) | 102.0% | 50.0% | 100.0 |"
    assert rows[1]["relative_average"] == pytest.approx(1.02)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t.md")]) == 0
    assert capsys.readouterr().out.strip() == table == (tmp_path / "t.md").read_text().strip()
    # the same configuration twice: a warning, and each benchmark counted once in the averages
    _metrics(tmp_path / "c" / "MME" / "ivc", **base, benchmark="MME", method="ivc", label="IVC-Prune", budget=0.5,
             layer=16, score=1470.0, mean_kept_visual_ratio=0.5)
    with pytest.warns(UserWarning, match="same configuration"):
        _, rows = compare_table(find_runs([tmp_path / "a", tmp_path / "b", tmp_path / "c"]))
    assert rows[1]["scores"] == {"MME": 1470.0, "POPE": 84.0} and rows[1]["relative_average"] == pytest.approx(1.015)
    with pytest.raises(SystemExit, match="no metrics.json"):
        main(["compare", str(tmp_path)])  # runs are looked for at most two levels down (these are three)


def test_failing_samples_are_reported_and_retried(data, tmp_path, monkeypatch):
    real = tasks.generate_answers
    state = {"calls": 0}

    def flaky(model, processor, prompts, method, **kw):
        state["calls"] += 1
        if state["calls"] in (3, 5):  # the 3rd and 5th samples: e.g. images the processor refuses
            raise ValueError("absurd aspect ratio")
        return real(model, processor, prompts, method, **kw)

    monkeypatch.setattr(tasks, "generate_answers", flaky)
    out = tmp_path / "f"
    assert _eval(out, str(data["pope"])) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["n_failed"]) == (4, 2) and [f["pos"] for f in m["failed"]] == [2, 4]
    assert m["failed"][0]["error"] == "ValueError: absurd aspect ratio"
    state["calls"] = 100  # the next run retries only the failed samples, which now pass
    assert _eval(out, str(data["pope"])) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["n_failed"], m["n_new"]) == (6, 0, 2)

    def broken(*a, **kw):
        raise RuntimeError("wrong setup")

    monkeypatch.setattr(tasks, "generate_answers", broken)  # every sample fails: the error surfaces
    with pytest.raises(RuntimeError, match="wrong setup"):
        main(["eval", "--model", "toy", "--data", str(data["mme"]), "--out", str(tmp_path / "g"), "--quiet"])


def _accounted(m: dict) -> bool:
    return m["n"] + m["n_skipped"] + m["n_failed"] == m["n_rows"]


def test_every_row_is_accounted_for_once(data, tmp_path, capsys):
    """A TSV with a second row of an index, malformed rows, --limit, and a --limit run over a folder that
    holds more: each row predicted, skipped (with its reason) or failed, once."""
    tsv = tmp_path / "MMBench_DEV_EN_V11.tsv"
    lines = data["mmbench"].read_text().splitlines(keepends=True)
    dup = next(x for x in lines if x.startswith("2\t")).replace("How many objects?", "How many things?")
    tsv.write_text("".join(lines) + dup)  # row 9: index 2 again
    out = tmp_path / "dup"
    assert _eval(out, str(tsv)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["n_skipped"], m["n_duplicates"], m["n_failed"], m["n_rows"]) == (5, 3, 1, 0, 8) and _accounted(m)
    assert {"index": "2", "line": 9, "reason": "duplicate index"} in m["skipped"]
    assert next(r for r in _records(out) if r["id"] == "2")["category"] == "count"  # the first row of index 2
    assert [r["id"] for r in _records(out)] == ["0", "1", "2", "1000000", "1000001"]
    # a quick look at the first 2 samples of a folder that holds all 5: those 2 are the run's rows
    with pytest.warns(UserWarning, match="3 records of predictions.jsonl are of rows this run did not read"):
        assert _eval(out, str(tsv), "--limit", "2") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["n_rows"], m["n_new"], m["n_outside"]) == (2, 2, 0, 3) and _accounted(m)
    assert len(_records(out)) == 5  # kept in the file, left out of the metrics
    capsys.readouterr()
    assert main(["score", str(out), "--json"]) == 0  # `score` keeps the last run's rows
    assert json.loads(capsys.readouterr().out)[0]["n"] == 2
    assert _eval(out, str(tsv)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["n_rows"], m["n_new"], m["n_outside"]) == (5, 8, 0, 0) and _accounted(m)


class _S:
    def __init__(self, sid, payload=None):
        self.id, self.payload = sid, payload


def _fake_predict(s):
    if str(s.id).startswith("bad"):
        raise ValueError(f"cannot read {s.id}")
    return {"id": s.id, "task": "mcq", "pred": "A", "gt": "A", "correct": True, "payload": s.payload}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_second_row_of_an_id_is_skipped_not_predicted(tmp_path, batch_size):
    """Rows of one id in one batch were both predicted (the second replaced the first); in one at a time
    the second was taken for done and vanished. Now: the first is predicted, the second skipped."""
    samples = [_S("a", 1), _S("b", 2), _S("a", 3), _S("c", 4), _S("a", 5)]
    batches = []

    def predict_batch(batch):
        batches.append([s.id for s in batch])
        return [_fake_predict(s) for s in batch]

    m = run_resumable(samples, None, tmp_path / "r", info={"task": "mcq"}, progress=False, batch_size=batch_size,
                      predict_batch=predict_batch)
    assert (m["n"], m["n_skipped"], m["n_rows"]) == (3, 2, 5) and _accounted(m)
    assert [s["reason"] for s in m["skipped"]] == ["duplicate index"] * 2
    recs = [json.loads(x) for x in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["payload"]) for r in recs] == [("a", 1), ("b", 2), ("c", 4)]
    assert sorted(i for b in batches for i in b) == ["a", "b", "c"]


def test_records_of_another_sample_are_refused(tmp_path):
    """A predict that answers for the wrong sample (or not JSON) fails that sample; nothing is invented."""
    def predict(s):
        if s.id == "x":
            return {"id": "y", "task": "mcq", "correct": True}
        if s.id == "z":
            return {"id": "z", "task": "mcq", "correct": True, "blob": object()}
        return {"task": "mcq", "pred": "A", "gt": "A", "correct": True}  # no id: the sample's

    m = run_resumable([_S("w"), _S("x"), _S("y"), _S("z")], predict, tmp_path / "r", info={"task": "mcq"},
                      progress=False)
    assert (m["n"], m["n_failed"], m["n_rows"]) == (2, 2, 4) and m["failed_ids"] == ["x", "z"]
    assert "has the id y" in m["failed"][0]["error"] and "not JSON serializable" in m["failed"][1]["error"]


@pytest.mark.parametrize("rows, skipped, reason", [
    ([], [], "no sample was predicted: the input has no rows"),
    ([], [SkippedRow(str(i), i + 2, "ValueError: answer 'A' is not yes/no") for i in range(12)],
     "no sample was predicted: 12 rows skipped as malformed (e.g. row 0: ValueError: answer 'A' is not yes/no); "
     "is this data of the task 'yesno' (--task)?"),
    ([_S("bad1"), _S("bad2")], [SkippedRow("q", 2, "ValueError: no image")],
     "no sample was predicted: 2 failed (e.g. bad1: ValueError: cannot read bad1), 1 rows skipped as malformed "
     "(e.g. row q: ValueError: no image)"),
])
def test_nothing_to_score_is_an_error_not_a_score(tmp_path, rows, skipped, reason):
    d = tmp_path / "r"
    with pytest.raises(NothingToScoreError, match=re.escape(reason)):
        run_resumable(rows, _fake_predict, d, info={"task": "yesno", "benchmark": "POPE", "method": "none"},
                      progress=False, skipped=list(skipped))
    m = json.loads((d / "metrics.json").read_text())  # written first
    assert m["score"] is None and m["error"] == reason and m["n"] == 0 and _accounted(m)
    with pytest.warns(UserWarning, match="no score .*left out of the table"):
        table, out_rows = compare_table(find_runs([d]))
    assert out_rows == [] and len(table.splitlines()) == 2


def test_wrong_task_fails_the_command_and_stays_out_of_tables(data, tmp_path, capsys):
    out = tmp_path / "wrong"
    assert _eval(out, str(data["mmbench"]), "--task", "yesno") != 0  # every row malformed for yes/no
    err = capsys.readouterr().err
    assert "no sample was predicted: 7 rows skipped as malformed (e.g. row 0: ValueError: answer 'A' is not " \
           "yes/no)" in err and "Traceback" not in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["score"] is None and m["n_rows"] == 7 and "error" in m
    with pytest.warns(UserWarning, match="no score .*left out of the table"):
        assert main(["compare", str(out)]) == 0
    assert "| method |" in capsys.readouterr().out


def test_known_bad_samples_do_not_stop_the_resume(tmp_path):
    """The first-samples-fail guard counts fresh failures only: a resume that retries samples that failed
    before (and fail again) completes; failures of new samples, with nothing predicted, still stop it."""
    d = tmp_path / "r"
    rows = [_S(i) for i in ("a", "bad1", "bad2", "bad3", "b")]
    m = run_resumable(rows, _fake_predict, d, info={"task": "mcq"}, progress=False)
    assert (m["n"], m["n_failed"], m["failed_ids"]) == (2, 3, ["bad1", "bad2", "bad3"])
    m = run_resumable(rows, _fake_predict, d, info={"task": "mcq"}, progress=False)  # raised before
    assert (m["n"], m["n_failed"], m["n_new"], m["failed_ids"]) == (2, 3, 0, ["bad1", "bad2", "bad3"])
    assert _accounted(m)
    more = [*rows, *(_S(f"bad{i}") for i in range(4, 7))]  # three new samples that fail: a setup error
    with pytest.raises(ValueError, match="cannot read bad6"):
        run_resumable(more, _fake_predict, d, info={"task": "mcq"}, progress=False)
    # every failed id is kept (the list of errors is capped)
    many = [_S("ok"), *(_S(f"bad{i}") for i in range(60))]
    m = run_resumable(many, _fake_predict, tmp_path / "many", info={"task": "mcq"}, progress=False)
    assert (m["n_failed"], len(m["failed"]), len(m["failed_ids"])) == (60, 50, 60) and _accounted(m)
    m = run_resumable(many, _fake_predict, tmp_path / "many", info={"task": "mcq"}, progress=False)
    assert (m["n_failed"], m["n_new"]) == (60, 0)


def test_a_resume_with_known_bad_samples_completes_every_method(data, tmp_path, monkeypatch, capsys):
    real = tasks.generate_answers

    def no_cars(model, processor, prompts, method, **kw):  # 3 of the 6 POPE samples always fail
        if any("car" in text for _, text in prompts):
            raise ValueError("unreadable image")
        return real(model, processor, prompts, method, **kw)

    monkeypatch.setattr(tasks, "generate_answers", no_cars)
    out = tmp_path / "bad"
    args = ("--methods", "none,ivc", "--budgets", "0.5")
    for attempt in range(2):  # the second run only retries the three, which fail again
        assert _eval(out, str(data["pope"]), *args) == 0
        err = capsys.readouterr().err
        for run in ("none", "ivc-b0.5"):
            m = json.loads((out / run / "metrics.json").read_text())
            assert (m["n"], m["n_failed"], m["n_new"]) == (3, 3, 3 if attempt == 0 else 0) and _accounted(m)
            assert m["failed_ids"] == ["1", "3", "5"]
            assert f"POPE {run}: 3 samples failed" in err
