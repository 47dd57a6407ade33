"""Benchmark readers (VLMEvalKit TSVs, lmms-lab RefCOCO parquet), answer extraction and metrics by hand."""

from __future__ import annotations

import base64
import json

import pytest

from ivcprune.evals.answers import extract_choice, extract_yes_no
from ivcprune.evals.benchmarks import detect_task, load_benchmark, read_refcoco_parquet, read_vqa_tsv
from ivcprune.evals.metrics import mcq_metrics, score_records, yesno_metrics
from ivcprune.evals.tasks import mcq_prompt, yesno_prompt
from ivcprune.inputs import EncodedImage

from benchfix import b64_image, mmbench_tsv, mme_tsv, pope_tsv, refcoco_parquet, write_tsv

OPTS = {"A": "red", "B": "green", "C": "blue", "D": "dark red"}


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("B.", "B"), ("(C) blue", "C"), ("D: dark red", "D"), ("[A]", "A"),
    ("The answer is C.", "C"), ("Answer: (B)", "B"), ("I choose option D", "D"), ("I think C", "C"),
    ("A. red", "A"), ("It is green.", "B"), ("dark red, clearly", "D"),  # the longer option text wins
    ("A cat sits on a mat", None),  # the article is not a choice
    ("The answer is a dark red one", "D"), ("red or green", None), ("", None), ("E", None), ("A or B", None),
])
def test_extract_choice(answer, expected):
    assert extract_choice(answer, OPTS, mode="lenient") == expected  # lenient rules; the default: test_answers.py


@pytest.mark.parametrize("answer, expected", [
    ("Yes", "Yes"), ("yes, there is.", "Yes"), ("No.", "No"), ("There is no dog", "No"), ("Yes and no", None),
    ("Maybe", None), ("", None), ("Nothing", None),
])
def test_extract_yes_no(answer, expected):
    assert extract_yes_no(answer, mode="lenient") == expected


def test_prompts_follow_vlmevalkit():
    from ivcprune.evals.benchmarks import Sample

    s = Sample(id="1", task="mcq", images=[], question="What colour?", answer="A", options={"A": "red", "B": "blue"},
               hint="Look closely.")
    assert mcq_prompt(s) == ("Hint: Look closely.\nQuestion: What colour?\nOptions:\nA. red\nB. blue\n"
                             "Please select the correct answer from the options above.")
    y = Sample(id="2", task="yesno", images=[], question="Is there a cat?", answer="Yes")
    assert yesno_prompt(y) == "Is there a cat? Please answer yes or no."
    y.question = "Is there a cat? Please answer yes or no."  # MME asks already
    assert yesno_prompt(y) == y.question


def test_mcq_tsv_references_circular_and_malformed(tmp_path):
    path = mmbench_tsv(tmp_path)
    assert detect_task(path) == "mcq"
    skipped = []
    samples = list(read_vqa_tsv(path, "mcq", skipped))
    assert [s.id for s in samples] == ["0", "1", "2", "1000000", "1000001"]
    assert samples[0].hint == "It is a flat colour." and samples[1].hint is None
    assert samples[1].options == {"A": "circle", "B": "square"}  # blank option columns dropped
    # circular copies reuse the image of the row they point at
    assert all(isinstance(s.images[0], EncodedImage) for s in samples)  # decoded only when predicted
    assert samples[3].images[0].load().tobytes() == samples[0].images[0].load().tobytes()
    assert samples[3].meta["image_key"] == "0" and samples[3].meta["category"] == "attribute"
    assert samples[2].meta["l2_category"] == "reasoning"  # MMBench's column is l2-category
    assert [(s.index, s.line) for s in skipped] == [("3", 7), ("4", 8)]
    assert "not one of the options" in skipped[0].reason and "row 77" in skipped[1].reason


def test_yesno_tsvs(tmp_path):
    mme, pope = mme_tsv(tmp_path), pope_tsv(tmp_path)
    assert detect_task(mme) == detect_task(pope) == "yesno"
    skipped = []
    rows = list(read_vqa_tsv(mme, "yesno", skipped))
    assert len(rows) == 6 and [s.answer for s in rows[:2]] == ["Yes", "No"]
    assert rows[1].meta["image_key"] == "existence/0.png"  # image_path groups the two questions of an image
    assert len(skipped) == 1 and skipped[0].index == "99"
    skipped = []
    rows = list(read_vqa_tsv(pope, "yesno", skipped))
    assert len(rows) == 6 and rows[0].answer == "Yes" and rows[0].meta["category"] == "adversarial"
    assert skipped[0].index == "50" and "no image" in skipped[0].reason


def test_tsv_by_path_and_image_lists(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "a.png")
    path = write_tsv(tmp_path / "custom.tsv", ["index", "question", "answer", "A", "B", "image"], [
        [7, "Which?", "A", "x", "y", "a.png"],
        [8, "Two images?", "B", "x", "y", str([b64_image((9, 9, 9)), "a.png"])],
        [9, "Missing file?", "A", "x", "y", "nowhere.png"],
        [10, "Not an image?", "A", "x", "y", base64.b64encode(b"plain text, no image").decode()],
    ])
    skipped = []
    rows = list(read_vqa_tsv(path, detect_task(path), skipped))
    assert [len(r.images) for r in rows] == [1, 2] and rows[0].images[0].size == (64, 48)
    assert rows[1].images[1].load().getpixel((0, 0)) == (1, 2, 3) and rows[1].images[0].size == (224, 196)
    # a missing file or bytes that are no image are caught where the row is read, not when predicted
    assert [s.index for s in skipped] == ["9", "10"] and "FileNotFoundError" in skipped[0].reason
    assert "UnidentifiedImageError" in skipped[1].reason


def test_refcoco_parquet(tmp_path):
    root = refcoco_parquet(tmp_path)
    skipped = []
    rows = list(read_refcoco_parquet(root, "val", "all", skipped))
    assert [r.id for r in rows] == ["val-0#0", "val-0#1", "val-1#0"]
    assert rows[0].answer == (20.0, 30.0, 120.0, 110.0)  # COCO x, y, w, h -> corners
    assert rows[0].question == "the left block" and rows[0].images[0].size == (320, 240)
    assert skipped[0].index == "val-bad" and "empty box" in skipped[0].reason
    assert [r.id for r in read_refcoco_parquet(root, "val", "first")] == ["val-0#0", "val-1#0"]
    with pytest.raises(ValueError, match="found splits: testA, val"):
        list(read_refcoco_parquet(root, "testB"))
    with pytest.raises(ValueError, match="name a split"):
        list(read_refcoco_parquet(root))


def test_names_resolve(tmp_path, monkeypatch):
    mme_tsv(tmp_path / "lmu")
    refcoco_parquet(tmp_path / "hf", "RefCOCOplus", splits=("testB",))
    monkeypatch.setenv("LMUData", str(tmp_path / "lmu"))
    b = load_benchmark("mme")
    assert (b.name, b.task) == ("MME", "yesno")
    b = load_benchmark("refcoco+_testB", data_dir=str(tmp_path / "hf"))
    assert (b.name, b.task, b.split) == ("refcoco+_testB", "grounding", "testB")
    assert len(list(b.open([]))) == 3
    with pytest.raises(FileNotFoundError, match="huggingface-cli download lmms-lab/RefCOCOg"):
        load_benchmark("refcocog_val", data_dir=str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="POPE.tsv not found"):
        load_benchmark("POPE", data_dir=str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="data not found"):
        load_benchmark("nothing-here")


def test_suites_expand_and_missing_benchmarks_are_named_together(tmp_path, monkeypatch):
    from ivcprune.cli import main
    from ivcprune.evals.benchmarks import expand_data

    assert expand_data("vqa") == ["SEEDBench_IMG", "MMBench_DEV_EN_V11", "MMStar", "RealWorldQA", "MME", "POPE"]
    paper = expand_data("paper")
    assert len(paper) == 14 and paper[6:] == ["refcoco_val", "refcoco_testA", "refcoco_testB", "refcoco+_val",
                                             "refcoco+_testA", "refcoco+_testB", "refcocog_val", "refcocog_test"]
    assert expand_data("MME, vqa,synthetic") == ["MME", "SEEDBench_IMG", "MMBench_DEV_EN_V11", "MMStar",
                                                 "RealWorldQA", "POPE", "synthetic"]  # each once
    with pytest.raises(ValueError, match="no benchmark"):
        expand_data(" , ")
    # two of the six VQA TSVs exist: the four others are named in one error, before any model loads
    mme_tsv(tmp_path / "lmu")
    pope_tsv(tmp_path / "lmu")
    monkeypatch.setenv("LMUData", str(tmp_path / "lmu"))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "no/such-model", "--data", "vqa", "--out", str(tmp_path / "o")])
    msg = str(e.value)
    assert msg.startswith("4 of 6 benchmarks not found")
    assert all(f"{n}.tsv not found" in msg for n in ("SEEDBench_IMG", "MMBench_DEV_EN_V11", "MMStar", "RealWorldQA"))


def test_mcq_metrics_by_hand():
    recs = [  # question 0 right in both rotations, question 1 right once: circular 1/2, vanilla 3/4
        {"id": "0", "pred": "A", "correct": True, "category": "x"},
        {"id": "1000000", "pred": "B", "correct": True, "category": "x"},
        {"id": "1", "pred": None, "correct": False, "category": "y"},
        {"id": "1000001", "pred": "A", "correct": True, "category": "y"},
    ]
    m = mcq_metrics(recs)
    assert m["accuracy"] == 0.75 and m["circular_accuracy"] == 0.5 and m["score"] == 50.0
    assert m["n_questions"] == 2 and m["n_unparseable"] == 1
    assert m["accuracy_by_category"] == {"x": 1.0, "y": 0.5}
    assert m["circular_accuracy_by_category"] == {"x": 1.0, "y": 0.0}
    assert mcq_metrics(recs[:1] + recs[2:3])["score"] == 50.0  # no circular copies: plain accuracy


def _yn(i, pred, gt, cat, key=None):
    return {"id": str(i), "pred": pred, "gt": gt, "correct": pred == gt, "category": cat, "image_key": key}


def test_mme_scores_by_hand():
    recs = [_yn(0, "Yes", "Yes", "existence", "e0"), _yn(1, "No", "No", "existence", "e0"),  # image e0: both right
            _yn(2, "Yes", "Yes", "existence", "e1"), _yn(3, "Yes", "No", "existence", "e1"),  # e1: one right
            _yn(4, None, "Yes", "code_reasoning", "c0"), _yn(5, "No", "No", "code_reasoning", "c0")]
    m = yesno_metrics(recs, "MME")
    # existence: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; code_reasoning: acc 50, acc+ 0 -> 50
    assert m["mme_subtasks"]["existence"]["score"] == pytest.approx(125.0)
    assert m["mme_perception"] == pytest.approx(125.0) and m["mme_cognition"] == pytest.approx(50.0)
    assert m["score"] == pytest.approx(175.0) and m["n_unparseable"] == 1


def test_pope_metrics_by_hand():
    recs = [_yn(0, "Yes", "Yes", "random"), _yn(1, "Yes", "No", "random"), _yn(2, "No", "Yes", "popular"),
            _yn(3, "No", "No", "popular"), _yn(4, "Yes", "Yes", "popular"), _yn(5, None, "No", "adversarial")]
    m = score_records(recs, "yesno", "POPE")
    # yes predicted: 3 (2 right); yes truth: 3 -> precision 2/3, recall 2/3, F1 2/3
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["score"] == pytest.approx(100 * 2 / 3) and m["accuracy"] == pytest.approx(3 / 6)
    assert m["yes_ratio"] == pytest.approx(0.5)
    assert m["by_category"]["popular"]["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert m["by_category"]["adversarial"]["accuracy"] == 0.0


def test_authors_pixel_bounds():
    from ivcprune.evals.tasks import authors_pixels
    from ivcprune.models import random_config

    px = 28 * 28
    assert authors_pixels(random_config("qwen2.5-vl-7b"), "mcq") == (4 * px, 6000 * px)
    assert authors_pixels(random_config("qwen2.5-vl-3b"), "yesno") == (4 * px, 6384 * px)
    assert authors_pixels(random_config("qwen2.5-vl-7b"), "grounding") == (4 * px, 16384 * px)
    assert authors_pixels(random_config("qwen2-vl-7b"), "mcq") == (1280 * px, 16384 * px)


def test_pope_rows_shared_between_splits_count_in_each():
    recs = [_yn(0, "Yes", "Yes", "popular,random"), _yn(1, "Yes", "No", "random"), _yn(2, "No", "No", "adversarial")]
    m = score_records(recs, "yesno", "POPE")
    assert m["by_category"]["popular"]["n"] == 1 and m["by_category"]["random"]["n"] == 2
    # overall over the exploded rows: yes predicted 3 (2 right), yes truth 2 -> precision 2/3, recall 1
    assert (m["n"], m["n_scored"]) == (3, 4) and m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0
    assert m["score"] == pytest.approx(100 * 0.8)


def test_a_second_row_of_an_index_is_skipped_and_reported(tmp_path):
    """A prediction is stored by id: a TSV row (or RefCOCO object) whose id an earlier one has would replace
    its prediction or be taken for done. It is skipped with its line and the reason "duplicate index"."""
    path = write_tsv(tmp_path / "dup.tsv", ["index", "question", "answer", "image"], [
        [1, "Is it red?", "yes", b64_image((200, 0, 0))],
        [2, "Is it green?", "no", b64_image((200, 0, 0))],
        [1, "Is it blue?", "no", b64_image((0, 0, 200))],
    ])
    skipped = []
    rows = list(read_vqa_tsv(path, "yesno", skipped))
    assert [(r.id, r.question) for r in rows] == [("1", "Is it red?"), ("2", "Is it green?")]
    assert [(s.index, s.line, s.reason) for s in skipped] == [("1", 4, "duplicate index")]

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = refcoco_parquet(tmp_path)
    file = root / "data" / "val-00000-of-00001.parquet"
    table = pq.read_table(file)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), file)  # object val-0 once more
    skipped = []
    rows = list(read_refcoco_parquet(root, "val", "all", skipped))
    assert [r.id for r in rows] == ["val-0#0", "val-0#1", "val-1#0"]
    assert [(s.index, s.line, s.reason) for s in skipped][1:] == [("val-0", 4, "duplicate index")]


@pytest.mark.parametrize("task, benchmark", [("grounding", None), ("mcq", None), ("yesno", "POPE"), ("yesno", "MME")])
def test_no_record_no_score(task, benchmark):
    """Every metric copes with zero records, and none turns nothing into a number a table would show."""
    from ivcprune.evals.metrics import grounding_metrics, mme_scores

    m = score_records([], task, benchmark)
    assert m["n"] == 0 and m["score"] is None and m["accuracy"] is None and m["mean_kept_visual_ratio"] is None
    json.dumps(m)
    for fn in (grounding_metrics, mcq_metrics, yesno_metrics):
        assert fn([])["score"] is None
    assert mme_scores([])["mme_total"] == 0 and yesno_metrics([], "MME")["score"] is None
