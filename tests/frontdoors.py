"""Shared drivers of the per-family front-door tests: the same eval, lmms-eval and server checks run on every
family's tiny checkpoint (each test file keeps its family-specific assertions)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ivcprune.cli import main
from ivcprune.evals.grounding_data import GroundingItem, write_grounding_tsv
from ivcprune.generation import Request, generate_batch
from ivcprune.methods import make_method

from benchfix import mmbench_tsv, mme_tsv

BENCHES = (("ground", "grounding"), ("MMBench_DEV_EN_V11", "mcq"), ("MME", "yesno"))


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth random content (coarse noise, bilinear): every part of the image looks different."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (4, 5, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.BILINEAR)


def eval_datasets(root: Path) -> list[Path]:
    """A grounding TSV (two items), MMBench and MME files under ``root``."""
    items = [GroundingItem(id=f"g{i}", image=smooth_image(280, 200, 10 + i), ref=f"the part {i}",
                           box=(20.0, 30.0, 150.0, 120.0)) for i in range(2)]
    return [write_grounding_tsv(root / "ground.tsv", items), mmbench_tsv(root), mme_tsv(root)]


def run_eval(checkpoint, datasets, out: Path, capsys, style: str, *, processor_sized: bool = True
             ) -> dict[str, tuple[dict, dict]]:
    """``ivcprune eval`` of IVC-Prune (K=2, 50%) on the three tasks with one picture each; checks what every
    family shares (``processor_sized``: no pixel bounds of ours) and returns ``bench -> (metrics, run info)``."""
    rc = main(["eval", "--model", str(checkpoint), "--data", ",".join(map(str, datasets)), "--method", "ivc",
               "--layer", "2", "--budget", "0.5", "--limit", "3", "--max-new-tokens", "4", "--pictures", "1",
               "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    runs = {}
    for bench, task in BENCHES:
        m = json.loads((out / bench / "metrics.json").read_text())
        assert m["task"] == task and m["score"] is not None and m["n"] + m["n_skipped"] + m["n_failed"] == m["n_rows"]
        assert m["n_failed"] == 0 and 0 < m["mean_kept_visual_ratio"] < 1
        info = json.loads((out / bench / "run.json").read_text())
        assert info["style"] == style
        if processor_sized:
            assert info["pixels"] is None  # the processor sizes the images
        assert len(list((out / bench / "pictures").glob("*.png"))) == 1
        runs[bench] = (m, info)
    return runs


def lmms_generate(checkpoint, docs: list[dict], batch_size: int = 2) -> tuple[list[str], list[dict]]:
    """lmms-eval's ``generate_until`` through ivcprune's model class (IVC-Prune, K=2, 50%) on ``docs``
    (``{"image": PIL image or None, "q": question}``): the answers and the pruning reports in doc order."""
    from lmms_eval.api.instance import Instance

    from ivcprune.integrations.lmms_eval import IVCPruneLMM

    lm = IVCPruneLMM(pretrained=str(checkpoint), method="ivc", layer=2, budget=0.5, batch_size=batch_size)
    lm.task_dict = {"t": {"test": docs}}

    def visual(doc):
        return [doc["image"]] if doc["image"] is not None else []

    requests = [Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
                         arguments=(d["q"], {"max_new_tokens": 4, "until": ["\n\n"]}, visual, i, "t", "test"))
                for i, d in enumerate(docs)]
    answers = lm.generate_until(requests)
    assert len(answers) == len(docs) and all(isinstance(a, str) for a in answers)
    return answers, sorted(lm.reports, key=lambda r: r["doc_id"])


def serve_one(model, processor, image: Image.Image, knobs: dict, **config):
    """One chat request with ``image`` to the server (real ``openai`` client on loopback) and the same request
    through :func:`ivcprune.generation.generate_batch`: ``(response, reference)``; their texts must agree."""
    import openai

    from ivcprune.serve import MethodSpec, ServeConfig, ServerThread

    buf = io.BytesIO()
    image.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    ref = generate_batch(model, processor, [Request([image], "What is it?")], make_method("ivc", **knobs),
                         max_new_tokens=6)[0]
    with ServerThread(model, processor, ServeConfig("tiny", MethodSpec.of("ivc", knobs), **config)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0)
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
        resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                              max_tokens=6)
    assert resp.choices[0].message.content == ref.text
    return resp, ref


def generate_one(checkpoint, tmp_path: Path, capsys, *flags: str) -> tuple[dict, str, int]:
    """``ivcprune generate --out`` with IVC-Prune on one 300x200 image (plus ``flags``): the report, what was
    printed, and the width of the kept-tokens picture."""
    image = tmp_path / "img.png"
    smooth_image(300, 200).save(image)
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", "What is it?",
               "--method", "ivc", *flags, "--max-new-tokens", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "visual tokens" in printed
    with Image.open(out / "kept_tokens_0.png") as pic:
        width = pic.width
    return json.loads((out / "report.json").read_text())["ivc"]["report"], printed, width


def batch_and_alone(model, processor, requests: list[Request], method, max_new_tokens: int):
    """``requests`` generated one by one and as one batch: each row equals its request alone (tokens, prompt,
    kept positions, span reports). Returns ``(alone, batch)``."""
    import torch

    alone = [generate_batch(model, processor, [r], method, max_new_tokens=max_new_tokens)[0] for r in requests]
    batch = generate_batch(model, processor, requests, method, max_new_tokens=max_new_tokens)
    for a, b in zip(alone, batch, strict=True):
        assert b.tokens == a.tokens and torch.equal(b.prompt_ids, a.prompt_ids)
        assert torch.equal(b.report.kept, a.report.kept)
        assert [s.to_dict() for s in b.report.spans] == [s.to_dict() for s in a.report.spans]
    return alone, batch
