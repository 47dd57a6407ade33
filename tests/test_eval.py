"""`ivcprune eval` mechanics: files, resume, metrics by hand, frames, comparison table."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ivcprune.cli import main
from ivcprune.evals.grounding import comparison_markdown, score_predictions, to_original
from ivcprune.evals.grounding_data import GroundingItem, write_grounding_tsv
from ivcprune.evals.plan import grid
from ivcprune.methods import make_method
from ivcprune.models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalckpt") / "model"
    save_tiny_checkpoint(d, init_std=0.15)
    return d


def test_metrics_by_hand(tmp_path):
    recs = [
        {"id": "a", "iou": 0.9, "box": [0, 0, 1, 1], "kind": "attribute", "kept_visual_ratio": 0.5, "prefill_s": 0.1},
        {"id": "b", "iou": 0.4, "box": [0, 0, 1, 1], "kind": "attribute", "kept_visual_ratio": 0.5, "prefill_s": 0.3},
        {"id": "c", "iou": 0.0, "box": None, "kind": "relation", "kept_visual_ratio": 0.25, "prefill_s": 0.2},
        {"id": "a", "iou": 0.6, "box": [0, 0, 1, 1], "kind": "attribute", "kept_visual_ratio": 0.5, "prefill_s": 0.1},
    ]
    p = tmp_path / "predictions.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"id\": \"broken")  # a line cut by a crash
    m = score_predictions(p, {"method": "ivc"})
    assert m["n"] == 3  # last record per id wins, the cut line is ignored
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["mean_iou"] == pytest.approx((0.6 + 0.4 + 0.0) / 3)
    assert m["n_unparseable"] == 1
    assert m["mean_kept_visual_ratio"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert m["accuracy_by_kind"] == {"attribute": 0.5, "relation": 0.0}
    assert m["method"] == "ivc"


def test_frames():
    # Qwen2.5-VL answers in resized pixels, Qwen2-VL in 0-1000
    assert to_original((10, 20, 30, 40), "qwen2_5_vl", (200, 100), (400, 300)) == (20, 60, 60, 120)
    assert to_original((100, 500, 300, 1000), "qwen2_vl", (0, 0), (640, 480)) == pytest.approx((64, 240, 192, 480))
    assert to_original(None, "qwen2_vl", (1, 1), (1, 1)) is None


def test_grid_and_methods():
    runs = grid(["none", "ivc", "random"], [0.5, 0.25], [None])
    assert [r[0] for r in runs] == ["none", "ivc-b0.5", "ivc-b0.25", "random-b0.5", "random-b0.25"]
    assert make_method("none", budget=0.5, layer=2) is None
    assert make_method("no_ivc", budget=0.5, layer=2).ablation == "no_ivc"
    assert make_method("random", budget=0.5, layer=2, seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown method"):
        make_method("fast-v", budget=0.5, layer=2)
    with pytest.raises(ValueError, match="fixes ablation"):
        make_method("no_ivc", ablation="ivc_only")
    md = comparison_markdown([
        {"method": "none", "label": "unpruned", "accuracy": 0.8, "mean_iou": 0.7, "mean_kept_visual_ratio": 1.0,
         "n_unparseable": 0, "n": 10},
        {"method": "ivc", "label": "IVC-Prune", "budget": 0.5, "layer": 3, "accuracy": 0.76, "mean_iou": 0.66,
         "mean_kept_visual_ratio": 0.5, "n_unparseable": 1, "n": 10},
    ])
    assert "| IVC-Prune | 0.5 | 3 | 76.0 | 95.0% | 0.660 | 50.0% | 1 | 10 |" in md


def test_eval_synthetic_writes_and_resumes(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_ckpt), "--data", "synthetic", "--n", "3", "--method", "ivc", "--layer", "2",
            "--budget", "0.5", "--out", str(out), "--max-new-tokens", "4", "--quiet"]
    assert main(args) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3
    rec = json.loads(lines[0])
    assert set(rec) >= {"id", "answer", "box", "iou", "visual_kept", "visual_tokens", "kind"}
    assert rec["visual_kept"] == 128 and rec["visual_tokens"] == 256
    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "mean_iou", "n", "method", "budget", "layer", "mean_kept_visual_ratio", "model",
                "n_unparseable"):
        assert key in m
    assert m["n"] == 3 and m["method"] == "ivc" and m["budget"] == 0.5 and m["layer"] == 2
    assert m["mean_kept_visual_ratio"] == pytest.approx(0.5)
    # a rerun skips what is done; a larger n adds only the new samples
    assert main(args) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    assert main([*args[:6], "5", *args[7:]]) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 5


def test_eval_tsv_comparison_and_malformed(tiny_ckpt, tmp_path, capsys):
    items = [GroundingItem(id=f"r{i}", image=Image.new("RGB", (280, 224), (200, 20 * i, 0)), ref=f"the block {i}",
                           box=(10.0, 10.0, 120.0, 100.0)) for i in range(2)]
    tsv = write_grounding_tsv(tmp_path / "data.tsv", items)
    with open(tsv, "a") as f:
        f.write("bad\tnot-base64\tthe thing\t1 2 3 4\t10\t10\n")
    out = tmp_path / "cmp"
    rc = main(["eval", "--model", str(tiny_ckpt), "--data", str(tsv), "--methods", "none,ivc,random",
               "--budgets", "0.5,0.25", "--layer", "2", "--out", str(out), "--max-new-tokens", "3", "--quiet"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "skipped 1 rows, e.g. row bad" in captured.err
    table = (out / "comparison.md").read_text()
    assert table.count("\n") == 2 + 5  # header, rule, 5 runs
    for name in ("none", "ivc-b0.5", "ivc-b0.25", "random-b0.5", "random-b0.25"):
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["n"] == 2 and m["n_skipped"] == 1 and m["skipped"][0]["index"] == "bad"
    assert json.loads((out / "random-b0.25" / "metrics.json").read_text())["mean_kept_visual_ratio"] == pytest.approx(
        0.25, abs=0.02)


def test_eval_errors(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit, match="data not found"):
        main(["eval", "--model", str(tiny_ckpt), "--data", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "o")])
    rc = main(["eval", "--model", str(tiny_ckpt), "--data", "synthetic", "--method", "ivc", "--budget", "0",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "budget" in capsys.readouterr().err
