"""Measure the embedded grounding model on the synthetic test split and write its model card.

    python scripts/measure_toy.py [--model DIR] [--n 1000] [--out runs/toy] [--jobs 2]

Two comparison runs of ``ivcprune eval`` (resumable, each in its own folder under ``--out``):

- methods: unpruned; IVC-Prune, random, IVC only, foreground only at budgets 0.75 / 0.5 / 0.25 (preset K);
- layers: IVC-Prune at budget 0.5 with K swept over the model's layers.

They run side by side (``--jobs``, one thread each), then ``DIR/README.md`` (the model card) is written
from the training log and both tables, and the tables are printed for the project README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ivcprune.models import TOY_DIR
    from ivcprune.toy.card import write_card

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TOY_DIR))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default="runs/toy")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    layers = cfg["text_config"]["num_hidden_layers"]
    shown = "toy" if Path(args.model).resolve() == TOY_DIR.resolve() else args.model
    base = ["ivcprune", "eval", "--model", shown, "--data", "synthetic", "--n", str(args.n), "--quiet"]
    tables = {
        "Methods and budgets (preset K)": base + ["--methods", "none,ivc,random,ivc_only,no_ivc",
                                                   "--budgets", "0.75,0.5,0.25", "--out", f"{args.out}/methods"],
        "IVC-Prune at budget 0.5, K swept": base + ["--method", "ivc", "--budget", "0.5", "--layers",
                                                     ",".join(str(k) for k in range(1, layers)),
                                                     "--out", f"{args.out}/layers"],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1" if args.jobs > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    cmds = [[sys.executable, "-m", "ivcprune", *c[1:]] for c in tables.values()]
    running: list[subprocess.Popen] = []
    for cmd in cmds:
        if len(running) >= args.jobs:
            if running.pop(0).wait() != 0:
                raise SystemExit("an evaluation failed")
        running.append(subprocess.Popen(cmd, env=env))
    if any(p.wait() != 0 for p in running):
        raise SystemExit("an evaluation failed")

    results = {}
    for name, cmd in tables.items():
        out = Path(cmd[cmd.index("--out") + 1])
        results[name] = json.loads((out / "comparison.json").read_text())
    commands = {name: " ".join(cmd) for name, cmd in tables.items()}
    commands["train"] = "ivcprune train-toy --out DIR"
    card = write_card(args.model, results, commands)
    print(card.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
