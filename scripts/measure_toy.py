"""Measure the embedded grounding model on the synthetic test split and write its model card.

    python scripts/measure_toy.py [--model DIR] [--n 1000] [--fresh-seed 1] [--out runs/toy] [--jobs 2]

Comparison runs of ``ivcprune eval`` (resumable, each in its own folder under ``--out``):

- methods: unpruned; IVC-Prune, random, IVC only, foreground only at budgets 0.75 / 0.5 / 0.25 (preset K),
  on the test split and on the test split of a generator seed never used in training or tuning;
- layers: IVC-Prune at budget 0.5 with K swept over the model's layers;
- baselines: every other registered method that applies to the model at budgets 0.5 / 0.25 (its own K).

They run side by side (``--jobs``, one thread each); then where the pruning signals land is measured on the
test split (``ivcprune.toy.evaluate.target_hit_rates``), ``DIR/README.md`` (the model card) is written from
the training log and the tables, and the card is printed for the project README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ivcprune.demo import MEASURED_FILE
    from ivcprune.evals import synth
    from ivcprune.models import TOY_DIR
    from ivcprune.toy.card import write_card

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TOY_DIR))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default="runs/toy")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--fresh-seed", type=int, default=1, help="generator seed of the fresh test set")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    layers = cfg["text_config"]["num_hidden_layers"]
    shown = "toy" if Path(args.model).resolve() == TOY_DIR.resolve() else args.model
    from ivcprune.families import get_adapter
    from ivcprune.methods import make_method, method_names
    from ivcprune.models import load_model
    from ivcprune.toy.evaluate import target_hit_rates

    model, processor = load_model(args.model)[:2]
    adapter = get_adapter(model)
    baselines = []
    for name in method_names(with_none=False):
        if name in ("ivc", "random", "ivc_only", "no_ivc", "no_foreground"):
            continue
        try:
            make_method(name).resolve(adapter)
        except ValueError as e:  # refused on this model (e.g. VisionZip without a CLS token): said, not run
            print(f"{name}: not run ({e})")
            continue
        baselines.append(name)
    base = ["ivcprune", "eval", "--model", shown, "--data", "synthetic", "--n", str(args.n), "--quiet",
            "--batch-size", str(args.batch_size)]
    methods = ["--methods", "none,ivc,random,ivc_only,no_ivc", "--budgets", "0.75,0.5,0.25"]
    tables = {
        "Methods and budgets (preset K), test split": base + methods + ["--out", f"{args.out}/methods"],
        f"Methods and budgets (preset K), fresh generator seed {args.fresh_seed}":
            base + methods + ["--seed", str(args.fresh_seed), "--out", f"{args.out}/fresh"],
        "IVC-Prune at budget 0.5, K swept": base + ["--method", "ivc", "--budget", "0.5", "--layers",
                                                     ",".join(str(k) for k in range(1, layers)),
                                                     "--out", f"{args.out}/layers"],
        "Baselines (each at its own default K)": base + ["--methods", ",".join(["none", "ivc", *baselines]),
                                                        "--budgets", "0.5,0.25", "--out", f"{args.out}/baselines"],
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
    samples = [synth.make_sample(0, "test", i) for i in range(args.n)]
    rates = target_hit_rates(model, processor, samples, progress=True)
    commands["hit_rates"] = f"python scripts/measure_toy.py --n {args.n} (first {args.n} test samples, preset K)"
    card = write_card(args.model, results, commands, hit_rates=rates)
    # the test split's methods and budgets: what the demo quotes (without this machine's model path)
    first = [{k: v for k, v in row.items() if k != "model_path"} for row in next(iter(results.values()))]
    (Path(args.model) / MEASURED_FILE).write_text(json.dumps({"rows": first, "hit_rates": rates}, indent=1))
    print(card.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
