"""Answer reading: VLMEvalKit's exact matching (the default) and the lenient mode, row for row.

The expected VLMEvalKit outcomes below were produced by running VLMEvalKit's own ``can_infer`` and
``YOrN_Extraction`` (``vlmeval/utils/matching_util.py``, ``vlmeval/dataset/utils/yorn.py``, commit e8e78f05)
on each answer, outside this repository; ``None`` stands for their ``Z`` / ``Unknown``."""

from __future__ import annotations

import json

import pytest

from ivcprune.cli import main
from ivcprune.evals import extract_choice, extract_yes_no
from ivcprune.evals.benchmarks import read_vqa_tsv
from ivcprune.evals.metrics import score_records

from benchfix import b64_image, write_tsv

OPTS = {"A": "red", "B": "green", "C": "blue", "D": "dark red"}

# answer, VLMEvalKit, lenient
MCQ = [
    ("B", "B", "B"), ("B.", "B", "B"), ("(C) blue", "C", "C"), ("D: dark red", "D", "D"), ("[A]", "A", "A"),
    ("A. red", "A", "A"), ("A", "A", "A"), ("C)", "C", "C"), ("**B**", "B", "B"), ("**B. green**", "B", "B"),
    ("The answer is C.", "C", "C"), ("The correct answer is **B**. Here's why: the leaf is green.", "B", "B"),
    ("Answer: (B)", "B", "B"), ("I choose option D", "D", "D"), ("I think C", "C", "C"),
    ("It is green.", "B", "B"), ("green", "B", "B"), ("Green", "B", "B"),
    ("dark red, clearly", None, "D"),  # "red" and "dark red" both contained: ambiguous for VLMEvalKit
    ("The answer is a dark red one", "A", "D"),  # VLMEvalKit: "answer is a" (case-insensitive) -> A
    ("red", "A", "A"), ("blue.", "C", "C"), ("red or green", None, None), ("A cat sits on a mat", None, None),
    ("Both B and A seem plausible.", None, None),  # two letters: never credited
    ("The answer is A, not B", "A", None),
    ("B. because the leaf in the picture is clearly green", None, "B"),  # the letter is not among the last 4 words
    ("B because it is green", "B", "B"), ("The colour of the car is B", "B", "B"),
    ("The answer is apple", "A", None), ("E", None, None), ("", None, None), ("None", None, None),
    ("N/A", None, None), ("Z", None, None), ("Cannot determine the answer from the image.", None, None),
    ("Failed to obtain answer via API. green", "B", "B"), ("C;", "C", "C"), ("Option: A", "A", "A"),
    ("(A)", "A", "A"), ("A, B", None, None), ("I don't know", None, None), ("I", None, None),
    ("The image shows a red car parked next to a green tree on a sunny day with a blue sky above it", None, None),
    ("答案是B", None, "B"), ("B。", None, "B"), ("答案：B", None, "B"), ("b", None, None),
    ("the answer is b", "B", None), ("The best answer is D. dark red", "D", "D"),
]

# answer, VLMEvalKit, lenient
YES_NO = [
    ("Yes", "Yes", "Yes"), ("yes", "Yes", "Yes"), ("Yes.", "Yes", "Yes"), ("No.", "No", "No"), ("No", "No", "No"),
    ("yes, there is.", "Yes", "Yes"), ("There is no dog", "No", "No"), ("Yes and no", None, None),
    ("Maybe", None, None), ("", None, None), ("Nothing", None, None),
    ("**Yes**", None, "Yes"), ("Yes:", None, "Yes"), ("'yes'", None, "Yes"), ("Yes。", None, "Yes"),
    ('"Yes"', "Yes", "Yes"), ("(yes)", "Yes", "Yes"), ("Yes!", "Yes", "Yes"), ("No, there is not.", "No", "No"),
    ("yes-no", None, None), ("Yes/No", None, None), ("Y", None, None), ("YES", "Yes", "Yes"),
    ("No. There is no cat in the image.", "No", "No"), ("Yes, 1,000 people.", "Yes", "Yes"),
    ("No; none.", "No", "No"), ("Yes?", "Yes", "Yes"), ("no?", "No", "No"), ("None", None, None),
    ("not sure", None, None), ("Yes...", "Yes", "Yes"), ("Yes.No", None, None), ("yes\nno", None, None),
    ("[Yes]", "Yes", "Yes"), ("Yes, there is a dog in the image.", "Yes", "Yes"),
]


@pytest.mark.parametrize("answer, vlmevalkit, lenient", MCQ)
def test_choice_table(answer, vlmevalkit, lenient):
    assert extract_choice(answer, OPTS) == vlmevalkit
    assert extract_choice(answer, OPTS, mode="vlmevalkit") == vlmevalkit
    assert extract_choice(answer, OPTS, mode="lenient") == lenient


@pytest.mark.parametrize("answer, vlmevalkit, lenient", YES_NO)
def test_yes_no_table(answer, vlmevalkit, lenient):
    assert extract_yes_no(answer) == vlmevalkit
    assert extract_yes_no(answer, mode="lenient") == lenient


def test_table_size_and_modes():
    assert len(MCQ) + len(YES_NO) >= 40
    with pytest.raises(ValueError, match="unknown answer mode"):
        extract_choice("A", OPTS, mode="strict")


def test_long_answer_text_rule_and_missing_options():
    # an answer longer than twice the options' texts is not matched by text
    assert extract_choice("it is green " * 10, {"A": "red", "B": "green"}) is None
    # an option left out (a "None" cell) is never the answer
    assert extract_choice("C", {"A": "red", "B": "green"}) is None


def _rec(i, answer, gt, task="mcq", mode="vlmevalkit", **kw):
    from ivcprune.evals.answers import predictions

    preds = predictions(task, answer, OPTS if task == "mcq" else None, mode)
    return {"id": str(i), "task": task, "answer": answer, **preds, "gt": gt, "correct": preds["pred"] == gt,
            **({"options": OPTS} if task == "mcq" else {}), **kw}


def test_metrics_count_unparseable_under_both_modes():
    recs = [_rec(0, "B", "B"), _rec(1, "dark red, clearly", "D"), _rec(2, "Both B and A seem plausible.", "B")]
    m = score_records(recs, "mcq")
    assert (m["n_unparseable"], m["n_unparseable_vlmevalkit"], m["n_unparseable_lenient"]) == (2, 2, 1)
    assert m["answers"] == "vlmevalkit" and m["accuracy"] == pytest.approx(1 / 3)
    lenient = score_records(recs, "mcq", answers="lenient")  # the raw answers read again
    assert lenient["n_unparseable"] == 1 and lenient["accuracy"] == pytest.approx(2 / 3)
    yn = [_rec(0, "**Yes**", "Yes", "yesno"), _rec(1, "No.", "No", "yesno")]
    m = score_records(yn, "yesno")
    assert (m["n_unparseable"], m["n_unparseable_vlmevalkit"], m["n_unparseable_lenient"]) == (1, 1, 0)
    # a judge's verdict on an answer no rule reads survives the reading again
    judged = _rec(3, "**Yes**", "Yes", "yesno", judge={"verdict": "Yes"})
    judged.update(pred="Yes", correct=True)
    assert score_records([judged], "yesno")["accuracy"] == 1.0


def _none_tsv(folder):
    head = ["index", "question", "A", "B", "C", "D", "answer", "category", "image"]
    img = b64_image((200, 30, 30))
    rows = [
        [0, "Which colour?", "red", "green", "None", "None", "A", "c", img],
        [1, "Which one is missing?", "red", "green", "None", "", "C", "c", "0"],  # the answer is a None cell
        [2, "Which text?", "NA", "N/A", "blue", "null", "B", "c", "0"],
        [3, "Literal?", " None", "none", "nan", "NaN", "B", "c", "0"],
    ]
    return write_tsv(folder / "SEEDBench_IMG.tsv", head, rows)


def test_none_option_cells_are_missing_options_rows_kept(tmp_path):
    skipped = []
    samples = list(read_vqa_tsv(_none_tsv(tmp_path), "mcq", skipped))
    assert skipped == [] and [s.id for s in samples] == ["0", "1", "2", "3"]
    assert samples[0].options == {"A": "red", "B": "green"}
    assert samples[1].options == {"A": "red", "B": "green"} and samples[1].answer == "C"
    assert samples[2].options == {"C": "blue"}  # "NA", "N/A", "null": missing as pandas reads them
    assert samples[3].options == {"A": "None", "B": "none"}  # not pandas' missing strings exactly
    assert extract_choice("C", samples[1].options) is None  # always wrong


def test_answers_flag_end_to_end(tmp_path, scripted_answers, capsys):
    data = _none_tsv(tmp_path / "d")
    answers = ["**A. red, since the whole picture is clearly red here**", "C", "blue", "Both B and A"]

    def run(out, *extra):
        scripted_answers[:] = list(answers)
        assert main(["eval", "--model", "toy", "--data", str(data), "--out", str(out), "--quiet", *extra]) == 0
        recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        return json.loads((out / "metrics.json").read_text()), {r["id"]: r for r in recs}

    m, recs = run(tmp_path / "v")
    assert json.loads((tmp_path / "v" / "run.json").read_text())["answers"] == "vlmevalkit"
    # row 0: the letter is not among the last 4 words, the answer too long for the texts; row 1: "C" is a
    # missing option; row 2: "blue" is C, but the answer is B, a "N/A" cell; row 3: two letters
    assert [recs[i]["pred"] for i in "0123"] == [None, None, "C", None]
    assert (m["n"], m["accuracy"], m["n_unparseable"], m["n_unparseable_lenient"]) == (4, 0.0, 3, 2)
    assert recs["1"]["pred_lenient"] is None and recs["0"]["pred_lenient"] == "A"
    m2, recs2 = run(tmp_path / "l", "--answers", "lenient")
    assert recs2["0"]["pred"] == "A" and recs2["0"]["answers"] == "lenient"
    assert (m2["accuracy"], m2["n_unparseable"], m2["n_unparseable_vlmevalkit"]) == (0.25, 2, 3)
    # a resumed run under the other mode is refused
    assert main(["eval", "--model", "toy", "--data", str(data), "--out", str(tmp_path / "v"), "--quiet",
                 "--answers", "lenient"]) != 0
    assert "answers differ" in capsys.readouterr().err
    # score reads the stored raw answers again: under the run's mode by default, or the one asked
    assert main(["score", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "metrics.json").read_text())["accuracy"] == 0.0
    assert main(["score", str(tmp_path / "v"), "--answers", "lenient"]) == 0
    m3 = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert (m3["accuracy"], m3["answers"], m3["n_unparseable"]) == (0.25, "lenient", 2)
