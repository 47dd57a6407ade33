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
