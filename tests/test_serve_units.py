"""The server's pieces without HTTP or a model: batch forming, a failing request in a batch, streamed text,
stop strings, pruning overrides, metrics text."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")

from ivcprune.generation import Request  # noqa: E402
from ivcprune.serve import batcher as batcher_mod  # noqa: E402
from ivcprune.serve.batcher import Batcher, Job, QueueFull  # noqa: E402
from ivcprune.serve.config import MethodSpec  # noqa: E402
from ivcprune.serve.metrics import Metrics  # noqa: E402
from ivcprune.serve.protocol import APIError, ChatJob, StreamText, cut_at_stop, parse_pruning, visual_runs  # noqa: E402

EOS = 2
FAKE_MODEL = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=EOS),
                             config=SimpleNamespace(image_token_id=9))


class FakeProcessor:
    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(96 + t) for t in tokens if t != EOS)


def fake_generate(model, processor, requests, method, *, max_new_tokens, clock, **kw):
    """Each request's prompt is its answer's tokens; a prompt "boom" breaks the whole batch."""
    if any(r.prompt == "boom" for r in requests):
        raise RuntimeError("boom")
    out = []
    for r in requests:
        tokens = [int(c) for c in r.prompt.split()][:max_new_tokens]
        out.append(SimpleNamespace(tokens=tokens, text=FakeProcessor().decode(tokens), report=None,
                                   prompt_ids=torch.tensor([1, 9, 9, 1])))
    fake_generate.calls.append([r.prompt for r in requests])
    return out


@pytest.fixture
def batcher(monkeypatch):
    fake_generate.calls = []
    monkeypatch.setattr(batcher_mod, "generate_batch", fake_generate)
    b = Batcher(FAKE_MODEL, FakeProcessor(), max_batch_size=3, wait_s=0.001, max_queue=6)
    b.start()
    yield b
    b.stop(5)


def job(prompt: str, events: list, method="ivc", max_tokens=8, **kw) -> Job:
    chat = ChatJob(Request(prompt=prompt), MethodSpec.of(method), max_tokens=max_tokens, **kw)
    return Job(chat, events.append)


def test_batches_group_by_key_in_arrival_order_up_to_the_limit(batcher):
    events = {name: [] for name in "abcdef"}
    with batcher.hold():
        jobs = [job("1 2", events["a"]), job("3 2", events["b"], "none"), job("4 5 2", events["c"]),
                job("6 2", events["d"], n=2), job("7 2", events["e"], "none"), job("8 2", events["f"])]
        for j in jobs:
            batcher.submit(j)
    batcher.stop(5)
    # the oldest job's key first (ivc: a, c, and f, since d's two rows would overflow 3), then b and e, then d
    assert fake_generate.calls == [["1 2", "4 5 2", "8 2"], ["3 2", "7 2"], ["6 2", "6 2"]]
    done = {k: v[-1] for k, v in events.items()}
    assert done["c"][1].choices[0].text == "de" and done["c"][1].choices[0].finish_reason == "stop"
    assert [c.text for c in done["d"][1].choices] == ["f", "f"] and done["d"][1].batch_rows == 2
    assert done["a"][1].pruning["images"] == [{"visual_tokens": 2, "visual_kept": 2}]


def test_rows_are_cut_to_their_own_max_tokens(batcher):
    short, long = [], []
    with batcher.hold():
        batcher.submit(job("1 3 4 5", short, max_tokens=2))
        batcher.submit(job("1 3 4 5", long, max_tokens=8))
    wait = time.monotonic() + 5
    while not (short and long) and time.monotonic() < wait:
        time.sleep(0.01)
    assert (short[-1][1].choices[0].text, short[-1][1].choices[0].finish_reason) == ("ac", "length")
    assert (long[-1][1].choices[0].text, long[-1][1].choices[0].finish_reason) == ("acde", "length")
    assert fake_generate.calls == [["1 3 4 5"] * 2]


def test_a_request_that_breaks_its_batch_fails_alone(batcher):
    good, bad = [], []
    with batcher.hold():
        batcher.submit(job("1 2", good))
        batcher.submit(job("boom", bad))
    batcher.stop(5)
    assert good[-1][0] == "done" and bad[-1][0] == "error"
    assert fake_generate.calls == [["1 2"]]  # the batch failed, then each ran alone


def test_seeded_sampling_runs_alone_and_the_queue_is_bounded(batcher):
    events = []
    with batcher.hold():
        for _ in range(2):
            batcher.submit(job("1 2", events, sampling=(1.0, 1.0), seed=3))
        for _ in range(4):
            batcher.submit(job("1 2", events))
        with pytest.raises(QueueFull):
            batcher.submit(job("1 2", events))
    batcher.stop(5)
    assert [len(c) for c in fake_generate.calls] == [1, 1, 3, 1]


def test_cancelled_jobs_leave_the_queue(batcher):
    events = []
    with batcher.hold():
        j = job("1 2", events)
        batcher.submit(j)
        batcher.cancel(j)
        assert batcher.waiting == 0
    batcher.stop(5)
    assert events == [] and fake_generate.calls == []


def test_stream_text_holds_back_partial_characters_and_stop_prefixes():
    pieces = {(1,): "a", (1, 2): "a\ufffd", (1, 2, 3): "aé", (1, 2, 3, 4): "aéST", (1, 2, 3, 4, 5): "aéSTOPx"}
    text = StreamText(lambda toks: pieces[tuple(toks)], ("STOP",))
    sent = [text.add(t) for t in (1, 2, 3, 4, 5)]
    assert "".join(sent) == "aé" and text.stopped
    assert text.rest(cut_at_stop("aéSTOPx", ("STOP",))[0]) == ""
    plain = StreamText(lambda toks: pieces[tuple(toks)])
    assert [plain.add(t) for t in (1, 2, 3)] == ["a", "", "é"]


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abcXdeY", ("Y", "X")) == ("abc", True)
    assert cut_at_stop("abc", ("Z",)) == ("abc", False)


def test_pruning_overrides():
    server = MethodSpec.of("ivc", {"layer": 3, "budget": 0.5})
    assert parse_pruning(None, server) == server
    assert parse_pruning({"budget": 0.3}, server) == MethodSpec.of("ivc", {"layer": 3, "budget": 0.3})
    assert parse_pruning({"method": "ivc", "budget": 0.3}, server) == MethodSpec.of("ivc", {"budget": 0.3})
    assert parse_pruning("none", server) == MethodSpec.of("none")
    for bad in ([1], {"budget": [1]}, {"method": 3}):
        with pytest.raises(APIError):
            parse_pruning(bad, server)


def test_visual_runs_count_each_image():
    assert visual_runs(torch.tensor([1, 9, 9, 9, 1, 9, 9, 4]), 9) == [3, 2]
    assert visual_runs(torch.tensor([1, 2]), None) == []


def test_metrics_text_is_prometheus():
    m = Metrics()
    m.request("/v1/chat/completions", 200, 0.3)
    m.request("/v1/chat/completions", 400, None)
    m.batch(4)
    text = m.render(waiting=2, running=4)
    assert 'ivcprune_request_seconds_bucket{le="0.25"} 0' in text
    assert 'ivcprune_request_seconds_bucket{le="0.5"} 1' in text and "ivcprune_request_seconds_count 1" in text
    assert 'ivcprune_requests_total{endpoint="/v1/chat/completions",status="400"} 1' in text
    assert 'ivcprune_batches_total{rows="4"} 1' in text and "ivcprune_queue_waiting 2" in text
    assert all(line.startswith("#") or len(line.split()) == 2 for line in text.strip().splitlines())


def test_stop_finishes_waiting_jobs(batcher):
    events = []
    with batcher.hold():
        batcher.submit(job("1 2", events))
        stopper = threading.Thread(target=batcher.stop)
        stopper.start()  # stopping overrides the hold: waiting jobs are answered first
        stopper.join(5)
    assert events[-1][0] == "done"
