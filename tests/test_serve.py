"""``ivcprune serve``: the real ``openai`` client against the server on 127.0.0.1 (embedded toy model).

Answers are compared with the one generation path (``generate_batch`` alone, and ``ivcprune generate``);
batching is made deterministic with the batcher's ``hold()`` (requests line up, then go as one batch)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402

from ivcprune.cli import main  # noqa: E402
from ivcprune.evals.synth import make_sample  # noqa: E402
from ivcprune.generation import Request, generate_batch  # noqa: E402
from ivcprune.inputs import user_message  # noqa: E402
from ivcprune.methods import make_method  # noqa: E402
from ivcprune.models import TOY_DIR, load_model  # noqa: E402
from ivcprune.serve import Limits, MethodSpec, ServeConfig, ServerThread  # noqa: E402

KEY = "test-key"
MAX_TOKENS = 48  # the server's cap and default; the toy answers in about 26 tokens


@pytest.fixture(scope="module")
def toy():
    if not (TOY_DIR / "config.json").exists():
        pytest.skip("the embedded toy model is missing")
    return load_model(str(TOY_DIR), dtype="float32")


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    return tmp_path_factory.mktemp("images")


def config(allowed, **kw) -> ServeConfig:
    limits = Limits(max_image_pixels=448 * 448 * 2, max_images=4, max_request_bytes=2 * 2**20, max_prompt_tokens=1000,
                    max_tokens=MAX_TOKENS, max_queue=4, timeout_s=kw.pop("timeout_s", 60.0), local_image_dir=allowed)
    return ServeConfig("toy", MethodSpec.of("ivc"), limits, max_batch_size=4, batch_wait_ms=5, api_key=KEY, **kw)


@pytest.fixture(scope="module")
def server(toy, allowed):
    with ServerThread(*toy, config(allowed)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def sample(i: int):
    return make_sample(0, "test", i)


def data_url(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                        {"type": "text", "text": text}]}


def ask(client, i: int = 0, **kw):
    s = sample(i)
    return client.chat.completions.create(model="toy", messages=[user(s.question, data_url(s.image))], **kw)


def alone(toy, request: Request, method: str = "ivc", max_new_tokens: int = MAX_TOKENS, **knobs):
    """What the one generation path answers for this request alone."""
    model, processor = toy
    (row,) = generate_batch(model, processor, [request], make_method(method, **knobs), max_new_tokens=max_new_tokens)
    return row


def one(i: int) -> Request:
    return Request([sample(i).image], sample(i).question)


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


# -- answers --------------------------------------------------------------------------------------------

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["toy"]
    assert client.models.retrieve("toy").id == "toy"
    health = httpx.get(server.url + "/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("pruning, method, knobs", [
    (None, "ivc", {}),  # the server's method
    ({"method": "none"}, "none", {}),
    ({"method": "random", "seed": 3, "budget": 0.5}, "random", {"seed": 3, "budget": 0.5}),
])
def test_answer_equals_generate_batch(toy, client, pruning, method, knobs):
    extra = {"extra_body": {"pruning": pruning}} if pruning else {}
    resp = ask(client, 1, **extra)
    ref = alone(toy, one(1), method, **knobs)
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == ref.prompt_ids.numel()
    assert resp.usage.completion_tokens == len(ref.tokens)
    summary = resp.pruning
    assert summary["method"] == method and len(summary["images"]) == 1
    kept = ref.report.visual_kept if ref.report is not None else 256
    assert summary["visual_tokens"] == 256 and summary["visual_kept"] == kept


def test_answer_equals_cli_generate(toy, client, tmp_path, capsys):
    s = sample(2)
    path = tmp_path / "img.png"
    s.image.save(path)
    assert main(["generate", "--model", "toy", "--image", str(path), "--prompt", s.question, "--method", "ivc",
                 "--max-new-tokens", str(MAX_TOKENS), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["ivc"]
    resp = ask(client, 2)
    assert resp.choices[0].message.content == cli["answer"]
    assert resp.pruning["visual_kept"] == cli["report"]["visual_kept"]


def test_budget_override_shows_in_summary(client):
    for pruning, kept in [({"budget": 0.25}, 64), ({"method": "random", "budget_tokens": 10}, 10),
                          ({"method": "none"}, 256), ("none", 256)]:
        resp = ask(client, 0, extra_body={"pruning": pruning})
        assert resp.pruning["visual_kept"] == kept and resp.pruning["images"] == [
            {"visual_tokens": 256, "visual_kept": kept}], pruning
    assert ask(client, 0, extra_body={"pruning": {"budget": 0.25}}).pruning["budget"] == 0.25


def stream_text(client, i: int = 0, **kw):
    chunks = list(ask(client, i, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("kw", [{}, {"extra_body": {"pruning": {"budget": 0.25}}}, {"stop": ['", "bbox']},
                                {"max_tokens": 7}])
def test_stream_adds_up_to_the_answer(client, kw):
    full = ask(client, 3, **kw)
    text, chunks = stream_text(client, 3, **kw)
    assert text == full.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == full.choices[0].finish_reason
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.pruning == full.pruning
    assert len(chunks) > 3  # token by token, not one piece


def test_stream_include_usage(client):
    _, chunks = stream_text(client, 0, stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0


def test_max_tokens_and_stop(toy, client):
    resp = ask(client, 4, max_tokens=5)
    ref = alone(toy, one(4), max_new_tokens=5)
    assert resp.choices[0].message.content == ref.text and resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5
    full = alone(toy, one(4)).text
    resp = ask(client, 4, stop=['"bbox', "never"])
    assert resp.choices[0].message.content == full[:full.index('"bbox')]
    assert resp.choices[0].finish_reason == "stop"


def test_multi_turn_with_system_prompt(toy, client):
    s, t = sample(5), sample(6)
    first = alone(toy, Request([s.image], s.question)).text
    messages = [{"role": "system", "content": "You locate objects."}, user(s.question, data_url(s.image)),
                {"role": "assistant", "content": first}, user(t.question, data_url(t.image))]
    resp = client.chat.completions.create(model="toy", messages=messages)
    history = [user_message(s.question, [s.image])[0], {"role": "assistant", "content": first}]
    ref = alone(toy, Request([t.image], t.question, system_prompt="You locate objects.", history=history))
    assert resp.choices[0].message.content == ref.text
    assert [i["visual_kept"] for i in resp.pruning["images"]] == [128, 128]


def test_n_choices(toy, client):
    resp = ask(client, 0, n=2)
    ref = alone(toy, one(0))
    assert [c.message.content for c in resp.choices] == [ref.text] * 2 and [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 2 * len(ref.tokens)
    texts = ["", ""]
    for ch in ask(client, 0, n=2, stream=True):
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [ref.text] * 2


def test_seeded_sampling_is_reproducible_and_equals_the_cli(client, tmp_path, capsys):
    kw = dict(temperature=1.0, top_p=0.9, seed=7)
    a, b = ask(client, 1, **kw), ask(client, 1, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    path = tmp_path / "img.png"
    sample(1).image.save(path)
    assert main(["generate", "--model", "toy", "--image", str(path), "--prompt", sample(1).question, "--do-sample",
                 "--temperature", "1.0", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", str(MAX_TOKENS),
                 "--json"]) == 0
    assert a.choices[0].message.content == json.loads(capsys.readouterr().out)["ivc"]["answer"]
    assert ask(client, 1, **{**kw, "seed": 8}).choices[0].message.content != a.choices[0].message.content


def test_local_images_only_under_the_allowed_folder(client, allowed, tmp_path):
    s = sample(0)
    s.image.save(allowed / "a.png")
    s.image.save(tmp_path / "outside.png")
    via_data = ask(client, 0).choices[0].message.content
    for url in ["a.png", f"file://{allowed / 'a.png'}"]:
        resp = client.chat.completions.create(model="toy", messages=[user(s.question, url)])
        assert resp.choices[0].message.content == via_data
    for url in [str(tmp_path / "outside.png"), "../outside.png", "missing.png"]:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="toy", messages=[user(s.question, url)])


# -- concurrency ----------------------------------------------------------------------------------------

def lined_up(server, client, calls):
    """Run ``calls`` (thunks) at once while the batcher holds, then release: they batch as they can."""
    with ThreadPoolExecutor(len(calls)) as pool, server.batcher.hold():
        futures = [pool.submit(c) for c in calls]
        wait_for(lambda: server.batcher.waiting == len(calls) or any(f.done() for f in futures))
    return [f.result() for f in futures]


def test_concurrent_requests_are_batched_and_not_mixed(toy, server, client):
    refs = [alone(toy, one(i)).text for i in range(4)]
    before = metric(server, 'ivcprune_batches_total{rows="4"}')
    answers = lined_up(server, client, [lambda i=i: ask(client, i) for i in range(4)])
    assert [a.choices[0].message.content for a in answers] == refs
    assert len(set(refs)) == 4
    assert metric(server, 'ivcprune_batches_total{rows="4"}') == before + 1


def test_batches_group_by_pruning_configuration(toy, server, client):
    plans = [(0, {"budget": 0.25}), (1, {"method": "none"}), (2, {"budget": 0.25}), (3, {"method": "none"})]
    refs = [alone(toy, one(i), "none" if p.get("method") else "ivc", **({} if p.get("method") else p)).text
            for i, p in plans]
    before = metric(server, 'ivcprune_batches_total{rows="2"}')
    answers = lined_up(server, client, [lambda i=i, p=p: ask(client, i, extra_body={"pruning": p}) for i, p in plans])
    assert [a.choices[0].message.content for a in answers] == refs
    assert [a.pruning["visual_kept"] for a in answers] == [64, 256, 64, 256]
    assert metric(server, 'ivcprune_batches_total{rows="2"}') == before + 2


def test_different_max_tokens_share_a_batch(toy, server, client):
    answers = lined_up(server, client, [lambda: ask(client, 0, max_tokens=4), lambda: ask(client, 1)])
    assert answers[0].choices[0].message.content == alone(toy, one(0), max_new_tokens=4).text
    assert answers[1].choices[0].message.content == alone(toy, one(1)).text


def test_full_queue_answers_429_then_recovers(server, client):
    with ThreadPoolExecutor(4) as pool, server.batcher.hold():
        futures = [pool.submit(ask, client, i) for i in range(4)]
        wait_for(lambda: server.batcher.waiting == 4)
        with pytest.raises(openai.RateLimitError) as e:
            ask(client, 0)
        assert "busy" in e.value.message
    assert all(f.result().choices[0].finish_reason == "stop" for f in futures)
    assert ask(client, 0).choices[0].finish_reason == "stop"


# -- refusals -------------------------------------------------------------------------------------------

def good_body(**kw) -> dict:
    s = sample(0)
    return {"model": "toy", "messages": [user(s.question, data_url(s.image))], **kw}


def png_bytes(size) -> str:
    from PIL import Image

    return data_url(Image.new("RGB", size))


def chat(*messages) -> dict:
    return {"model": "toy", "messages": list(messages)}


ASSISTANT_IMAGE = {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}

# case: (body, status, a fragment of the error message)
BAD = {
    "no messages": ({"model": "toy"}, 422, "'messages'"),
    "messages not a list": ({"model": "toy", "messages": "hi"}, 422, "'messages'"),
    "unknown role": (chat({"role": "robot", "content": "hi"}), 422, "role"),
    "content a number": (chat({"role": "user", "content": 3}), 422, "content"),
    "part without type": (chat({"role": "user", "content": [{"text": "x"}]}), 422, "part"),
    "max_tokens a string": (good_body(max_tokens="10"), 422, "'max_tokens'"),
    "no model": ({"messages": [user("hi")]}, 422, "'model'"),
    "unknown model": (good_body(model="gpt-4o"), 404, "not served"),
    "remote image": (chat(user("x", "https://example.com/a.png")), 400, "remote"),
    "bad base64": (chat(user("x", "data:image/png;base64,@@@")), 400, "base64"),
    "not an image": (chat(user("x", "data:image/png;base64,aGVsbG8=")), 400, "not an image"),
    "audio part": (chat({"role": "user", "content": [{"type": "input_audio"}]}), 400, "input_audio"),
    "last turn assistant": (chat(user("x"), {"role": "assistant", "content": "y"}), 400, "last message"),
    "image from assistant": (chat(ASSISTANT_IMAGE, user("x")), 400, "user messages only"),
    "system after a turn": (chat(user("x"), {"role": "system", "content": "s"}, user("y")), 400, "system"),
    "unknown method": (good_body(pruning={"method": "magic"}), 400, "unknown method"),
    "budget out of range": (good_body(pruning={"budget": 2}), 400, "budget"),
    "unknown knob": (good_body(pruning={"method": "random", "rule": "fill"}), 400, "no knob"),
    "layer out of range": (good_body(pruning={"layer": 99}), 400, "out of range"),
    "max_tokens above the cap": (good_body(max_tokens=MAX_TOKENS + 1), 400, "limit"),
    "temperature out of range": (good_body(temperature=5), 400, "temperature"),
    "n above the batch": (good_body(n=9), 400, "'n'"),
    "tools": (good_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "not supported"),
    "too many images": (chat(user("x", *[png_bytes((28, 28))] * 5)), 400, "too many images"),
    "prompt too long": (chat(user("x", *[png_bytes((448, 448))] * 4)), 400, "limit of 1000"),
    "image too large": (chat(user("x", png_bytes((700, 700)))), 413, "pixels"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_its_status(server, case):
    body, status, fragment = BAD[case]
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] and "\n" not in error["message"]


def test_raw_refusals_and_the_server_keeps_serving(server, client):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=auth).status_code == 400
    assert httpx.post(url + "/v1/chat/completions", json=[1], headers=auth).status_code == 400
    big = httpx.post(url + "/v1/chat/completions", content=b"x" * (3 * 2**20), headers=auth)
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing", headers=auth).status_code == 404
    assert httpx.get(url + "/v1/chat/completions", headers=auth).json()["error"]["message"]
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
        r = httpx.post(url + "/v1/chat/completions", json=good_body(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[user("x")])
    assert ask(client, 0).choices[0].finish_reason == "stop"


def test_metrics(server, client):
    ask(client, 0)
    text = httpx.get(server.url + "/metrics").text
    assert 'ivcprune_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert metric(server, "ivcprune_request_seconds_count") >= 1
    prompt, completion = (metric(server, f'ivcprune_tokens_total{{kind="{k}"}}') for k in ("prompt", "completion"))
    assert prompt > completion > 0
    assert 0 < metric(server, 'ivcprune_visual_tokens_total{kind="kept"}') < metric(
        server, 'ivcprune_visual_tokens_total{kind="in"}')


# -- timeouts and shutdown (servers of their own) ---------------------------------------------------------

def test_timeout_504_and_the_server_goes_on(toy, allowed):
    with ServerThread(*toy, config(allowed, timeout_s=0.5)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        with srv.batcher.hold():
            with pytest.raises(openai.APIStatusError) as e:
                ask(c, 0)
            assert e.value.status_code == 504 and srv.batcher.waiting == 0  # the waiting job was dropped
        assert ask(c, 0).choices[0].finish_reason == "stop"


def test_a_client_that_leaves_frees_its_place(server, client):
    impatient = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=0.5)
    with server.batcher.hold():
        with pytest.raises(openai.APITimeoutError):
            ask(impatient, 0)
        wait_for(lambda: server.batcher.waiting == 0)  # dropped from the queue without reaching the model
    assert ask(client, 0).choices[0].finish_reason == "stop"


def test_graceful_shutdown_answers_in_flight_requests(toy, allowed):
    srv = ServerThread(*toy, config(allowed)).start()
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    ref = alone(toy, one(0)).text
    with ThreadPoolExecutor(2) as pool:
        with srv.batcher.hold():
            futures = [pool.submit(ask, c, 0), pool.submit(ask, c, 0, stream=True)]
            wait_for(lambda: srv.batcher.waiting == 2)
            stopper = threading.Thread(target=srv.stop)
            stopper.start()

            def refused():
                try:
                    httpx.get(srv.url + "/health", timeout=1)
                except httpx.TransportError:
                    return True
                return False

            wait_for(refused)  # no longer listening, while both requests wait for the model
        assert futures[0].result().choices[0].message.content == ref
        assert "".join(ch.choices[0].delta.content or "" for ch in futures[1].result() if ch.choices) == ref
    stopper.join(30)
    assert not srv.thread.is_alive() and not srv.batcher._thread.is_alive()


# -- command line ---------------------------------------------------------------------------------------

def test_cli_builds_the_config_and_serves(monkeypatch, allowed):
    import ivcprune.serve.runner as runner

    seen = {}
    monkeypatch.setattr(runner, "run_server", lambda model, processor, cfg, **kw: seen.update(cfg=cfg, **kw))
    assert main(["serve", "--model", "toy", "--budget", "0.3", "--port", "9", "--api-key", "k", "--max-tokens", "32",
                 "--allow-local-images", str(allowed), "--max-batch-size", "2"]) == 0
    cfg = seen["cfg"]
    assert cfg.model_name == "toy" and cfg.method == MethodSpec.of("ivc", {"budget": 0.3}) and cfg.api_key == "k"
    assert cfg.limits.max_tokens == 32 and cfg.limits.local_image_dir == allowed and cfg.max_batch_size == 2
    assert seen["port"] == 9 and seen["host"] == "127.0.0.1"


def test_cli_without_the_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "toy"])
    assert "pip install 'ivcprune[serve]'" in str(e.value) and "\n" not in str(e.value)


def test_sigterm_lets_the_stream_in_flight_finish(toy):
    """The real command in a subprocess: SIGTERM while a stream is in flight; the stream still completes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ivcprune", "serve", "--model", "toy", "--port", str(port),
                             "--log-level", "warning"], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, proc.stderr.read()
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60)
        c = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        stream = ask(c, 0, stream=True, max_tokens=MAX_TOKENS)
        pieces = [next(stream).choices[0].delta.content]
        proc.send_signal(signal.SIGTERM)
        pieces += [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
        assert "".join(pieces) == alone(toy, one(0)).text
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
