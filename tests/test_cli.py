"""The command line on a tiny checkpoint saved to disk (loaded exactly like a downloaded one)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ivcprune.bench import expected_ratios, llm_flops
from ivcprune.cli import main
from ivcprune.models import random_config, save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(d / "model", init_std=0.15)
    img = d / "img.png"
    Image.new("RGB", (320, 224), (20, 180, 60)).save(img)
    return d / "model", img


def test_generate_compare_json(checkpoint, capsys):
    model, img = checkpoint
    rc = main(["generate", "--model", str(model), "--image", str(img), "--prompt", "What colour is it?",
               "--max-new-tokens", "5", "--compare", "--json", "--layer", "2", "--budget", "0.25"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"unpruned", "ivc"}
    rep = out["ivc"]["report"]
    assert rep["layer"] == 2 and rep["pruned"]
    assert rep["visual_kept"] == round(0.25 * rep["visual_tokens"])
    assert out["ivc"]["kv_tokens"] == rep["kept_len"] < out["unpruned"]["kv_tokens"] == rep["seq_len"]
    assert out["ivc"]["kv_bytes"] < out["unpruned"]["kv_bytes"]
    assert out["unpruned"]["report"] is None


def test_generate_text_table(checkpoint, capsys):
    model, img = checkpoint
    rc = main(["generate", "--model", str(model), "--image", str(img), "--prompt", "Describe.",
               "--max-new-tokens", "3", "--compare", "--method", "random", "--budget", "0.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| answer |" in text and "| KV cache (prompt) |" in text and "random at layer" in text


def test_generate_errors(checkpoint, capsys, tmp_path):
    model, img = checkpoint
    with pytest.raises(SystemExit, match="image not found"):
        main(["generate", "--model", str(model), "--image", str(tmp_path / "nope.png"), "--prompt", "x"])
    rc = main(["generate", "--model", str(model), "--image", str(img), "--prompt", "x", "--layer", "9"])
    assert rc == 2
    assert "out of range" in capsys.readouterr().err
    rc = main(["generate", "--model", str(model), "--image", str(img), "--prompt", "x", "--budget", "1.5"])
    assert rc == 2
    assert "budget must be in (0, 1]" in capsys.readouterr().err


def test_bench_random_weights(tmp_path, capsys):
    rc = main(["bench", "--model", "random:tiny-qwen2.5-vl", "--image-tokens", "64", "--repeats", "2",
               "--warmup", "0", "--new-tokens", "4", "--layer", "2", "--json", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    (row,) = res["rows"]
    assert row["image_tokens"] == 64 and row["kept_len"] == row["seq_len"] - 32
    assert row["ratios"]["kv_bytes"] == pytest.approx(row["kept_len"] / row["seq_len"], rel=1e-6)
    assert 0 < row["expected"]["llm_prefill_flop_ratio"] < 1
    for name in ("unpruned", "pruned"):
        assert row[name]["prefill_s"] > 0 and row[name]["decode_ms_per_token"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "| 64 |" in md and "LLM prefill" in md
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["seq_len"] == row["seq_len"]


def test_flop_model_by_hand():
    cfg = random_config("tiny-qwen2.5-vl")  # h=64, 4 heads x 16, 2 kv heads, ffn 128, 4 layers
    per_token = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    n = 10
    assert llm_flops(cfg, [n]) == n * per_token + 2 * n * (n + 1) * 64
    r = expected_ratios(cfg, seq_len=100, kept_len=50, layer=2)
    full = 4 * (100 * per_token + 2 * 100 * 101 * 64)
    pruned = 2 * (100 * per_token + 2 * 100 * 101 * 64) + 2 * (50 * per_token + 2 * 50 * 51 * 64)
    assert r["llm_prefill_flop_ratio"] == pytest.approx(pruned / full)
    assert r["kv_ratio"] == pytest.approx(0.5)


def test_bench_several_methods_in_one_run(tmp_path, capsys):
    rc = main(["bench", "--model", "random:tiny-llava-1.5", "--set", "num_hidden_layers=8", "--repeats", "1",
               "--warmup", "0", "--new-tokens", "2", "--image-tokens", "64", "--budget", "0.5", "--json",
               "--methods", "fastv,pdrop,divprune,visionzip", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["fastv", "pdrop", "divprune", "visionzip"] and res["methods"] == list(rows)
    assert len({r["unpruned"]["prefill_s"] for r in rows.values()}) == 1  # one unpruned run for all
    for r in rows.values():
        assert r["kept_len"] < r["seq_len"] and r["ratios"]["kv_bytes"] < 1
    # FLOP expectation at one final budget: cutting before layer 0 saves most, one cut at K=2 next, PDrop's
    # gradual stages least
    exp = {name: r["expected"]["llm_prefill_flop_ratio"] for name, r in rows.items()}
    assert exp["divprune"] < exp["fastv"] < exp["pdrop"] < 1
    assert [s[0] for s in rows["pdrop"]["stages"]] == [2, 4, 6]
    assert "| pdrop |" in (tmp_path / "bench.md").read_text()


def test_bench_refuses_a_method_the_model_cannot_run(capsys):
    with pytest.raises(SystemExit, match="visionzip: .*CLS"):
        main(["bench", "--model", "random:tiny-qwen2.5-vl", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
              "--image-tokens", "16", "--methods", "fastv,visionzip"])


def test_eval_reports_a_method_the_model_cannot_run_and_runs_the_others(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["eval", "--model", "toy", "--data", "synthetic", "--n", "3", "--methods", "none,visionzip,fastv",
               "--budgets", "0.5", "--out", str(out), "--quiet"])
    assert rc == 1
    assert "visionzip cannot run on this model" in capsys.readouterr().err
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["none", "fastv"]
    assert not (out / "visionzip-b0.5" / "predictions.jsonl").exists()
