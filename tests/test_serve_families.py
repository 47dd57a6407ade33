"""``ivcprune serve`` on LLaVA-1.5 and InternVL (tiny checkpoints with their real processors): the server is
family-agnostic, its answers and pruning summaries are the generation path's, alone and batched."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from ivcprune.generation import Request, generate_batch  # noqa: E402
from ivcprune.methods import make_method  # noqa: E402
from ivcprune.models import load_model, save_tiny_checkpoint  # noqa: E402
from ivcprune.serve import MethodSpec, ServeConfig, ServerThread  # noqa: E402

from conftest import FAMILIES  # noqa: E402

NAMES = {family: FAMILIES[family] for family in ("llava", "internvl")}
KNOBS = {"layer": 2, "budget": 0.5}
pytestmark = [pytest.mark.filterwarnings("ignore:the LLaVA-1.5 preset uses the union rule"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module", params=list(NAMES))
def served(request, tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / request.param, NAMES[request.param], init_std=0.15)
    model, processor = load_model(str(path))
    config = ServeConfig("tiny", MethodSpec.of("ivc", KNOBS), max_batch_size=4)
    with ServerThread(model, processor, config) as srv:
        yield model, processor, srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0)


def image(width: int, height: int, seed: int) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


CASES = [([image(300, 200, 1)], "What is it?"), ([image(120, 260, 2), image(200, 200, 3)], "Compare them.")]


def ask(client, images, text, **kw):
    content = [*({"type": "image_url", "image_url": {"url": url(im)}} for im in images), {"type": "text", "text": text}]
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=6,
                                          **kw)


@pytest.mark.parametrize("pruning", ["ivc", "none"])
def test_answers_and_summaries_are_the_generation_paths(served, pruning):
    model, processor, srv, client = served
    method = make_method("ivc", **KNOBS) if pruning == "ivc" else None
    refs = [generate_batch(model, processor, [Request(ims, text)], method, max_new_tokens=6)[0] for ims, text in CASES]
    extra = {"extra_body": {"pruning": {"method": "none"}}} if pruning == "none" else {}  # else the server's
    with ThreadPoolExecutor(2) as pool, srv.batcher.hold():  # both in one batch
        futures = [pool.submit(ask, client, ims, text, **extra) for ims, text in CASES]
        while srv.batcher.waiting < 2:
            time.sleep(0.005)
    for future, ref in zip(futures, refs):
        resp = future.result()
        assert resp.choices[0].message.content == ref.text
        assert resp.usage.prompt_tokens == ref.prompt_ids.numel() and resp.usage.completion_tokens == len(ref.tokens)
        images = resp.pruning["images"]
        if ref.report is not None:
            assert images == [{"visual_tokens": s.length, "visual_kept": s.kept} for s in ref.report.spans]
        else:
            assert sum(i["visual_tokens"] for i in images) == int((ref.prompt_ids == model.config.image_token_id).sum())
        assert len(images) == len(ref.seen)
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, *CASES[0], stream=True) if c.choices)
    assert streamed == ask(client, *CASES[0]).choices[0].message.content
