"""Batches through every front door, over the one generation path (:mod:`ivcprune.generation`): a batch
of left-padded prompts (different image sizes and counts, rows without images) gives every row exactly
what it gets alone; ``eval --batch-size 4`` writes the records ``--batch-size 1`` writes; ``bench
--batch-size`` measures batches of identical-shape prompts."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ivcprune.cli import main
from ivcprune.evals import tasks
from ivcprune.evals.benchmarks import Sample
from ivcprune.evals.grounding_data import GroundingItem, write_grounding_tsv
from ivcprune.evals.synth import make_sample
from ivcprune.families import UnsupportedModelError, get_adapter
from ivcprune.generation import Request, generate_batch, sorted_batches
from ivcprune.inputs import build_batch_inputs, build_inputs, stack_inputs, user_message
from ivcprune.methods import make_method, method_names
from ivcprune.models import load_model, random_config, resolve_model_spec, synthetic_inputs, tiny_model


@pytest.fixture(scope="module")
def toy():
    return load_model(resolve_model_spec("toy"))


def _requests() -> list[Request]:
    s = [make_sample(0, "test", i) for i in range(5)]
    return [
        Request([s[0].image], s[0].question),
        Request([s[1].image.resize((300, 220))], s[1].question),  # another size: another token count
        Request([], "Say something."),  # no image: the runtime's no-op row
        Request([s[2].image.resize((200, 330)), s[3].image], s[2].question),  # two images
        Request([s[4].image], s[4].question, max_pixels=200 * 200),  # pixel bounds of its own
    ]


@pytest.mark.parametrize("name", method_names())
def test_batch_equals_one_by_one(toy, name):
    model, processor = toy
    method = make_method(name, budget=0.5) if name != "none" else None
    if method is not None:
        try:
            method.resolve(get_adapter(model))
        except UnsupportedModelError as e:  # e.g. VisionZip: the embedded model is a Qwen2.5-VL
            pytest.skip(f"{name} refuses the embedded model: {e}")
    requests = _requests()
    alone = [generate_batch(model, processor, [r], method, max_new_tokens=12)[0] for r in requests]
    batch = generate_batch(model, processor, requests, method, max_new_tokens=12)
    assert len(batch) == len(requests)
    for a, b in zip(alone, batch, strict=True):
        assert b.tokens == a.tokens and b.text == a.text
        assert torch.equal(b.prompt_ids, a.prompt_ids)
        assert b.grids == a.grids and [im.size for im in b.seen] == [im.size for im in a.seen]
        assert (b.kv_tokens, b.kv_bytes) == (a.kv_tokens, a.kv_bytes)
        if method is None:
            assert a.report is None and b.report is None
            continue
        assert torch.equal(b.report.kept, a.report.kept) and b.report.seq_len == a.report.seq_len
        assert [(s.start, s.length, s.kept, s.grid) for s in b.report.spans] == \
            [(s.start, s.length, s.kept, s.grid) for s in a.report.spans]
        for sa, sb in zip(a.report.spans, b.report.spans, strict=True):
            assert sa.groups.keys() == sb.groups.keys()
            assert all(torch.equal(sa.groups[k], sb.groups[k]) for k in sa.groups)
    assert batch[0].text  # the model answers something
    assert len(batch[3].grids) == 2 and batch[3].grids[1] == [1, 32, 32] and batch[2].grids == []
    assert batch[1].grids != batch[0].grids  # rows of different lengths: the batch is padded
    if method is not None:
        assert batch[0].report.pruned and not batch[2].report.pruned


def test_build_inputs_is_the_batch_of_one(toy):
    _, processor = toy
    s = [make_sample(0, "test", i) for i in range(2)]
    conversations = [user_message(s[0].question, [s[0].image]), user_message("Hi.", [s[1].image.resize((280, 196))])]
    batch, seen_batch = build_batch_inputs(processor, conversations)
    mask = batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    assert lengths[0] != lengths[1] and mask[:, -1].all()
    assert not mask[lengths.index(min(lengths)), 0]  # the shorter row is padded on the left
    first = 0
    for row, conversation in enumerate(conversations):
        alone, seen = build_inputs(processor, conversation)
        n = lengths[row]
        assert torch.equal(batch["input_ids"][row, -n:], alone["input_ids"][0])
        assert torch.equal(batch["image_grid_thw"][row], alone["image_grid_thw"][0])
        pixels = alone["pixel_values"]
        assert torch.equal(batch["pixel_values"][first:first + pixels.shape[0]], pixels)
        first += pixels.shape[0]
        assert [im.size for im in seen] == [im.size for im in seen_batch[row]]


def test_stack_inputs_and_sorted_batches():
    cfg = random_config("tiny-qwen2.5-vl")
    rows = [synthetic_inputs(cfg, 16, seed=s)[0] for s in range(3)]
    batch = stack_inputs(rows)
    assert batch["input_ids"].shape[0] == 3 and torch.equal(batch["input_ids"][2], rows[2]["input_ids"][0])
    assert batch["image_grid_thw"].shape[0] == 3
    with pytest.raises(ValueError, match="one prompt length"):
        stack_inputs([rows[0], synthetic_inputs(cfg, 64)[0]])
    sizes = [3, 1, 2, 1, 3, 2, 5]
    # batches of 2 within windows of 2 x 2 items, each window sorted (stably) by the key
    got = [[i for i, _ in b] for b in sorted_batches(sizes, 2, key=lambda x: x, window=2)]
    assert got == [[1, 3], [2, 0], [5, 4], [6]]
    assert [[i for i, _ in b] for b in sorted_batches(sizes, 1, key=lambda x: x)] == [[i] for i in range(7)]
    with pytest.raises(ValueError, match="at least 1"):
        list(sorted_batches(sizes, 0))


# -- eval --------------------------------------------------------------------------------------------------
VOLATILE = ("prefill_s",)


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def _eval(out, data, *extra):
    return main(["eval", "--model", "toy", "--data", data, "--out", str(out), "--max-new-tokens", "28", "--quiet",
                 *extra])


MIXED_SIZES = ((448, 448), (600, 300), (300, 600), (520, 390))  # 256, 276, 276 and 234 visual tokens


@pytest.fixture(scope="module")
def mixed_tsv(tmp_path_factory):
    """Grounding TSV of synthetic samples at four image sizes, interleaved (batches need sorting); the toy
    processor brings every image to 448 x 448 pixels of area, so the aspect ratios make the token counts."""
    items = []
    for i in range(10):
        s = make_sample(0, "test", i)
        w, h = MIXED_SIZES[i % 4]
        x1, y1, x2, y2 = s.target.box
        box = (x1 * w / 448, y1 * h / 448, x2 * w / 448, y2 * h / 448)
        items.append(GroundingItem(id=f"m{i}", image=s.image.resize((w, h)), ref=s.question, box=box))
    return write_grounding_tsv(tmp_path_factory.mktemp("mixed") / "mixed.tsv", items)


def test_eval_batch_size_4_equals_1(mixed_tsv, tmp_path):
    args = ("--methods", "none,ivc", "--budgets", "0.5")
    assert _eval(tmp_path / "b1", "synthetic", "--n", "10", *args) == 0
    assert _eval(tmp_path / "b4", "synthetic", "--n", "10", *args, "--batch-size", "4") == 0
    assert _eval(tmp_path / "m1", str(mixed_tsv), *args) == 0
    assert _eval(tmp_path / "m4", str(mixed_tsv), *args, "--batch-size", "4") == 0
    for one, four in (("b1", "b4"), ("m1", "m4")):
        for run in ("none", "ivc-b0.5"):
            r1, r4 = _records(tmp_path / one / run), _records(tmp_path / four / run)
            assert len(r1) == 10 and r4 == r1  # record for record, in dataset order
            m1 = json.loads((tmp_path / one / run / "metrics.json").read_text())
            m4 = json.loads((tmp_path / four / run / "metrics.json").read_text())
            assert m4["score"] == m1["score"] and m4["batch_size"] == 4 and m1["batch_size"] == 1
    assert {r["visual_tokens"] for r in _records(tmp_path / "m4" / "ivc-b0.5")} == {256, 276, 234}
    assert all(r["visual_kept"] == r["visual_tokens"] // 2 for r in _records(tmp_path / "m4" / "ivc-b0.5"))


def test_eval_batch_with_a_bad_sample(mixed_tsv, tmp_path, monkeypatch):
    """A batch that raises is predicted again one sample at a time: the bad sample fails alone, the others
    get the records they get in batches; the next run retries it (and resumes a batched run)."""
    real = tasks.generate_answers
    calls = []
    state = {"refuse": True}

    def refusing(model, processor, prompts, method, **kw):  # refuses the 600 x 300 images (m1, m5, m9)
        calls.append(len(prompts))
        if state["refuse"] and any(images[0].size == (600, 300) for images, _ in prompts):
            raise ValueError("absurd aspect ratio")
        return real(model, processor, prompts, method, **kw)

    monkeypatch.setattr(tasks, "generate_answers", refusing)
    out = tmp_path / "bad"
    assert _eval(out, str(mixed_tsv), "--batch-size", "4", "--limit", "8") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["n_failed"]) == (6, 2)  # m1 and m5 fail alone
    assert [f["id"] for f in m["failed"]] == ["m1", "m5"]
    assert m["failed"][0]["error"] == "ValueError: absurd aspect ratio"
    # the window of 8 sorted by size: 300 x 600 (m2, m6) and 600 x 300 (m1, m5) first; that batch raised and
    # went again one by one
    assert calls == [4, 1, 1, 1, 1, 4]
    state["refuse"] = False
    assert _eval(out, str(mixed_tsv), "--batch-size", "4") == 0  # retries the two, adds the last two
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["n_failed"], m["n_new"]) == (10, 0, 4)
    monkeypatch.setattr(tasks, "generate_answers", real)
    assert _eval(tmp_path / "ref", str(mixed_tsv)) == 0
    assert _records(out) == _records(tmp_path / "ref")


def test_predict_samples_equals_predict_sample(toy):
    model, processor = toy
    method = make_method("ivc", budget=0.5)
    synth = [make_sample(0, "test", j) for j in range(3)]
    samples = [Sample(id=str(i), task="grounding", images=[s.image.resize((392 - 56 * i, 448))], question=s.question,
                      answer=s.target.box) for i, s in enumerate(synth)]
    one = [tasks.predict_sample(model, processor, s, method, family="qwen2_5_vl", max_new_tokens=12) for s in samples]
    many = tasks.predict_samples(model, processor, samples, method, family="qwen2_5_vl", max_new_tokens=12)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in VOLATILE} for r in recs]  # noqa: E731
    assert strip(many) == strip(one)


# -- bench ---------------------------------------------------------------------------------------------------
def test_bench_batch_rows_generate_what_they_generate_alone():
    from ivcprune.bench import measure_generate

    model = tiny_model("tiny-qwen2.5-vl", init_std=0.15)
    method = make_method("ivc", layer=2, budget=0.5)
    rows = [synthetic_inputs(model.config, 64, seed=s)[0] for s in range(3)]
    for m in (None, method):
        batch = measure_generate(model, stack_inputs(rows), m, max_new_tokens=5)
        if m is not None:
            assert [r.visual_kept for r in m.last_reports] == [32, 32, 32]
        alone = [measure_generate(model, r, m, max_new_tokens=5) for r in rows]
        assert batch.rows_tokens == [a.tokens for a in alone]
        assert batch.batch_size == 3 and batch.generated_tokens == 15
        assert batch.kv_bytes_prompt == sum(a.kv_bytes_prompt for a in alone)
        assert batch.kv_tokens_prompt == alone[0].kv_tokens_prompt


def test_bench_cli_batch_sizes(tmp_path, capsys):
    rc = main(["bench", "--model", "random:tiny-qwen2.5-vl", "--image-tokens", "64", "--batch-size", "1", "3",
               "--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--layer", "2", "--json", "--out",
               str(tmp_path)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["batch_sizes"] == [1, 3] and res["method"] == "ivc K=2 budget=0.5"
    one, three = res["rows"]
    assert (one["batch_size"], three["batch_size"]) == (1, 3) and one["seq_len"] == three["seq_len"]
    assert one["kept_len"] == three["kept_len"] == one["seq_len"] - 32
    for name in ("unpruned", "pruned"):
        # the whole batch's KV cache: three rows of one shape
        assert three[name]["kv_bytes"] == 3 * one[name]["kv_bytes"]
        for r in (one, three):
            v = r[name]
            assert v["samples_per_s"] == pytest.approx(r["batch_size"] / v["total_s"])
            assert v["tokens_per_s"] == pytest.approx(3 * r["batch_size"] / v["total_s"])
    for r in (one, three):
        throughput = r["pruned"]["samples_per_s"] / r["unpruned"]["samples_per_s"]
        assert r["ratios"]["samples_per_s"] == pytest.approx(throughput)
        assert r["ratios"]["kv_bytes"] == pytest.approx(r["kept_len"] / r["seq_len"], rel=1e-6)
    md = (tmp_path / "bench.md").read_text()
    assert "| visual tokens | batch |" in md and "| 64 | 3 | 106 → 74 |" in md and "samples/s" in md


def test_generate_cli_is_the_batch_of_one(toy, tmp_path, capsys):
    model, processor = toy
    s = make_sample(0, "test", 7)
    path = tmp_path / "img.png"
    s.image.save(path)
    assert main(["generate", "--model", "toy", "--image", str(path), "--prompt", s.question, "--max-new-tokens", "12",
                 "--compare", "--json", "--budget", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    image = Image.open(path).convert("RGB")
    for name, method in (("unpruned", None), ("ivc", make_method("ivc", budget=0.5))):
        (row,) = generate_batch(model, processor, [Request([image], s.question)], method, max_new_tokens=12)
        assert out[name]["answer"] == row.text and out[name]["kv_tokens"] == row.kv_tokens
        assert out[name]["new_tokens"] == len(row.tokens)
