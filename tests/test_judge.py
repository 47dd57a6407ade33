"""The LLM judge (against a local stand-in chat-completions server), the authors' box parser, one IoU value,
the grounding prompts and `score` without run.json."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from ivcprune.boxes import parse_box
from ivcprune.evals.grounding import grounding_record
from ivcprune.evals.judge import Judge, JudgeError, judge_records, parse_verdict
from ivcprune.evals.metrics import grounding_metrics
from ivcprune.evals.runner import MissingRunInfoError, score_run
from ivcprune.families import family_class


@pytest.fixture
def server():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            prompt = body["messages"][0]["content"]
            reply = "B" if "Options:" in prompt else "No"
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    httpd.shutdown()


def _batch():
    opts = {"A": "red", "B": "blue"}
    samples = [SimpleNamespace(question="Colour?", options=opts), SimpleNamespace(question="Colour?", options=opts),
               SimpleNamespace(question="A dog?", options={})]
    recs = [{"task": "mcq", "answer": "A", "pred": "A", "gt": "B", "correct": False},
            {"task": "mcq", "answer": "looks bluish", "pred": None, "gt": "B", "correct": False},
            {"task": "yesno", "answer": "hard to say, probably not", "pred": None, "gt": "No", "correct": False}]
    return samples, recs


def test_judge_asks_only_unreadable_and_caches(server, tmp_path):
    url, seen = server
    samples, recs = _batch()
    judge = Judge(url, "judge-x", cache=tmp_path / "judge_cache.jsonl")
    judge.check()
    judge_records(judge, samples, recs)
    assert len(seen) == 2 and judge.requests == 2 and seen[0]["model"] == "judge-x"
    assert "judge" not in recs[0] and recs[0]["pred"] == "A"
    assert recs[1]["judge"] == {"model": "judge-x", "reply": "B", "verdict": "B"} and recs[1]["correct"]
    assert recs[2]["pred"] == "No" and recs[2]["correct"]
    again = Judge(url, "judge-x", cache=tmp_path / "judge_cache.jsonl")  # a resumed run
    samples, recs2 = _batch()
    judge_records(again, samples, recs2)
    assert again.requests == 0 and len(seen) == 2 and recs2[1]["pred"] == "B"


def test_judge_unreachable_is_a_clear_error(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    judge = Judge(f"http://127.0.0.1:{port}", "m", timeout=2)
    with pytest.raises(JudgeError, match="unreachable"):
        judge.check()
    with pytest.raises(JudgeError, match="unreachable"):
        judge.ask("x")


def test_verdicts():
    opts = {"A": "x", "B": "y"}
    assert parse_verdict("mcq", " C", opts) is None and parse_verdict("mcq", "Z", opts) is None
    assert parse_verdict("mcq", "A", opts) == "A" and parse_verdict("mcq", "A or B", opts) is None
    assert parse_verdict("yesno", "Yes.", {}) == "Yes" and parse_verdict("yesno", "Unknown", {}) is None


@pytest.mark.parametrize("text,authors,lenient", [
    ('{"bbox_2d": [1, 2, 30, 40]}', (1, 2, 30, 40), (1, 2, 30, 40)),
    ('{"bbox_2d": [ 1, 2, 30, 40 ]}', None, (1, 2, 30, 40)),
    ('{"bbox_2d" : [1, 2, 30, 40]}', None, (1, 2, 30, 40)),
    ('{"bbox_2d": [1.5, 2, 30, 40]}', None, (1.5, 2, 30, 40)),
    ('{"bbox": [1, 2, 30, 40]}', None, (1, 2, 30, 40)),
    ('[1, 2, 30, 40]', None, (1, 2, 30, 40)),
    ('{"bbox_2d": [30, 40, 1, 2]}', (30, 40, 1, 2), (1, 2, 30, 40)),
])
def test_authors_parser_qwen25(text, authors, lenient):
    assert parse_box(text, "bbox_2d", "authors") == authors
    assert parse_box(text, "bbox_2d", "lenient") == lenient


def test_authors_parser_qwen2_and_rescale():
    assert parse_box("<|box_start|>(1,2),(300,400)<|box_end|>", "box_tokens", "authors") == (1, 2, 300, 400)
    assert parse_box("(1, 2),(300,400)", "box_tokens", "authors") is None
    # an integer Qwen2.5-VL box of 0s and 1s is read as a fraction of the image, as the authors' evaluate does
    rec = grounding_record("a", "x", '{"bbox_2d": [0, 0, 1, 1]}', (0, 0, 64, 48), "qwen2_5_vl", (64, 48), (64, 48))
    assert rec["hit"] and rec["boxes"] == "authors"
    # a Qwen2-VL coordinate over 1100 leaves the box normalised: a miss
    rec = grounding_record("a", "x", "(0,0),(1200,1000)", (0, 0, 64, 48), "qwen2_vl", (64, 48), (64, 48))
    assert not rec["hit"]


def test_one_iou_value_at_the_boundary():
    # IoU 0.4999996: rounded to 6 digits it was 0.5 (a hit for the score) while the record said miss
    gt = (0.0, 0.0, 1_000_000.0, 1.0)
    box = (0.0, 0.0, 499_999.6, 1.0)
    rec = grounding_record("a", "x", json.dumps({"bbox_2d": list(box)}), gt, "qwen2_5_vl", (1_000_000, 1),
                           (1_000_000, 1), parser="lenient")
    assert 0.49999 < rec["iou"] < 0.5 and rec["hit"] is False
    assert grounding_metrics([rec])["accuracy"] == 0.0
    assert grounding_metrics([{**rec, "iou": 0.5, "hit": False}])["accuracy"] == 0.0


def test_grounding_prompts():
    q25, q2 = family_class("qwen2_5_vl"), family_class("qwen2_vl")
    assert q25.grounding_prompts()["authors"] == "\nLocate {ref} and output the bbox coordinates in JSON format."
    assert q2.grounding_prompts()["authors"] == "\n<|object_ref_start|>Detect {ref}<|object_ref_end|>"
    assert q2.grounding_ref(q2.authors_grounding_prompt, "The Red Car.") == "the red car"
    assert q2.grounding_ref(q2.grounding_prompt, "The Red Car.") == "The Red Car."
    assert q25.grounding_prompts()["ivcprune"] == q25.grounding_prompt


def test_score_without_run_json_refuses(tmp_path):
    rec = {"id": "1", "task": "yesno", "answer": "Yes", "pred": "Yes", "gt": "Yes", "correct": True,
           "category": "existence", "image_key": "1"}
    (tmp_path / "predictions.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(MissingRunInfoError, match="--benchmark"):
        score_run(tmp_path)
    m = score_run(tmp_path, given={"benchmark": "MME"})
    assert m["benchmark"] == "MME" and "mme_total" in m
