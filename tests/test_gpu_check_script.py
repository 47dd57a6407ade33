"""scripts/gpu_check.py runs end to end on the CPU (--quick: tiny shapes, sdpa and eager) and reports all PASS.

The GPU run itself needs a lent GPU machine (scripts/gpu_check.sh says how); this keeps the script from
rotting between such runs: every section, the markdown layout and the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
CHECKS = {
    "pruning is active", "prefill logits of kept tokens", "greedy tokens, 8 steps", "decode logits",
    "KV length of every layer", "kept sets, batched vs alone", "greedy tokens, 4 steps", "logits, batched vs alone",
    "KV length of every layer (batch)",
}


def _run(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (out / "gpu_check.md").read_text(), json.loads((out / "gpu_check.json").read_text())


def _table(md: str, header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").replace("\\|", "/").split("|")])
    return rows


def _equivalence_rows(md: str) -> list[list[str]]:
    return _table(md, "| dtype | family | attn | check | metric | value | status | note |")


def test_quick_float32_run_passes_every_section(tmp_path):
    md, data = _run(tmp_path, "--dtype", "float32")
    for heading in ("# IVC-Prune GPU check", "## Equivalence", "## Bench", "### batch 1", "### batch 2"):
        assert heading in md.splitlines(), heading
    assert "- device: cpu" in md and "transformers" in md and "attention implementations tried: sdpa, eager" in md

    rows = _equivalence_rows(md)
    seen = {(r[1], r[2]): set() for r in rows}
    for dtype, family, attn, check, _metric, _value, status, _note in rows:
        assert dtype == "float32"
        assert status == "PASS", (family, attn, check)
        seen[(family, attn)].add(check)
    assert set(seen) == {(f, a) for f in FAMILIES for a in ("sdpa", "eager")}  # every registered family
    assert all(checks == CHECKS for checks in seen.values()), seen

    bench = _table(md, "| visual tokens | batch | status | seconds | note |")
    assert {(r[0], r[1]) for r in bench} == {("16", "1"), ("16", "2"), ("64", "1"), ("64", "2")}
    assert all(r[2] == "PASS" for r in bench), bench
    assert md.count("| visual tokens | batch | seq → kept |") == 2  # the bench's own table, once per batch size

    assert data["counts"] == {"PASS": len(rows) + len(bench), "FAIL": 0, "SKIP": 0}
    assert {r["batch_size"] for res in data["bench"] for r in res["rows"]} == {1, 2}


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_quick_half_precision_equivalence_passes_within_tolerance(tmp_path, dtype):
    md, data = _run(tmp_path, "--dtype", dtype, "--skip-bench")
    rows = _equivalence_rows(md)
    assert len(rows) == 2 * len(FAMILIES) * len(CHECKS)  # every family x (sdpa, eager) x check
    assert all(r[0] == dtype and r[6] == "PASS" for r in rows), [r for r in rows if r[6] != "PASS"]
    assert f"tolerance {dtype}: 5% of the logits' scale" in md
    assert data["counts"]["FAIL"] == 0
