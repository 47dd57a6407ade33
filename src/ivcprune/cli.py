"""``ivcprune`` command line: generate, bench, eval, score, compare, train-toy, serve."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from . import __version__


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="local checkpoint path, hub id, 'toy' (the embedded grounding model), or random:NAME "
                        "(random weights, e.g. random:qwen2.5-vl-7b)")
    g.add_argument("--dtype", default="auto", help="auto (checkpoint dtype), bfloat16, float16, float32")
    g.add_argument("--attn", default=None, choices=["sdpa", "eager", "flash_attention_2"],
                   help="attention implementation (default: transformers' choice)")
    g.add_argument("--device-map", default=None, help="e.g. auto, cuda, cpu (default: cuda if available, else cpu)")
    g.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="random:NAME models only: override a text config field (or vision.FIELD)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _check_pixels(args) -> None:
    lo, hi = getattr(args, "min_pixels", None), getattr(args, "max_pixels", None)
    if lo is not None and hi is not None and lo > hi:
        raise SystemExit(f"ivcprune: error: --min-pixels {lo} is above --max-pixels {hi}")


def _model_type(spec: str) -> str | None:
    """``model_type`` of a local checkpoint folder, from its config.json alone (``None`` when not known)."""
    try:
        return json.loads((Path(spec) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _check_family_flags(args, model_type: str | None) -> None:
    """Image flags the model's family takes: ``--min/max-pixels`` (Qwen-VL resizing), ``--max-tiles`` (InternVL)."""
    from .media import media_for

    if model_type is None:
        return
    media = media_for(model_type)
    if getattr(args, "max_tiles", None) is not None and not media.tiled:
        raise SystemExit(f"ivcprune: error: --max-tiles applies to tiled-image models (InternVL), not {model_type}")
    given = [f for f in ("min_pixels", "max_pixels") if getattr(args, f, None) is not None]
    if given and not media.pixel_bounds:
        raise SystemExit(f"ivcprune: error: --{given[0].replace('_', '-')} applies to Qwen-VL models (qwen-vl-utils "
                         f"resizing); the {model_type} processor sizes images itself")


def _check_writable(path: str | None) -> None:
    """``--out`` can be created and written, checked before the model loads."""
    if not path:
        return
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-check.{os.getpid()}"  # one per process: torchrun ranks check at once
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"ivcprune: error: --out {path} is not writable: {e.strerror or e}") from None


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_bool(text: str) -> bool:
    if text.lower() not in _BOOLS:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return _BOOLS[text.lower()]


def _knob_type(f):
    kind = str(f.type)
    if "bool" in kind:
        return _parse_bool
    return float if "float" in kind else int if "int" in kind else str


def _method_knobs() -> dict[str, Any]:
    """Every knob of every registered method, by name: the field that defines it (first one wins)."""
    from .methods import REGISTRY, knob_fields

    knobs: dict[str, Any] = {}
    for entry in REGISTRY.values():
        for f in knob_fields(entry.cls):
            knobs.setdefault(f.name, f)
    return knobs


def _add_method_args(p: argparse.ArgumentParser, default: str = "ivc") -> None:
    """``--method`` and one flag per knob of the registered methods (from their dataclass fields)."""
    from .methods import method_names

    g = p.add_argument_group("pruning (unset knobs take the method's default or the model's paper preset)")
    g.add_argument("--method", default=default, choices=list(method_names()))
    for name, f in _method_knobs().items():
        flag = f.metadata.get("flag", "--" + name.replace("_", "-"))
        g.add_argument(flag, dest=f"knob_{name}", type=_knob_type(f), default=None, metavar=None if
                       f.metadata.get("choices") else name.upper(), choices=f.metadata.get("choices"),
                       help=f.metadata.get("help"))


def _given_knobs(args, method: str, *, strict: bool = True) -> dict[str, Any]:
    """Knob flags given on the command line; ``strict=False`` keeps only those ``method`` has."""
    from .methods import REGISTRY, knob_fields

    given = {k[5:]: v for k, v in vars(args).items() if k.startswith("knob_") and v is not None}
    if not strict and method in REGISTRY:
        own = {f.name for f in knob_fields(REGISTRY[method].cls)}
        given = {k: v for k, v in given.items() if k in own}
    return given


def _method_from_args(args, name: str | None = None, **overrides):
    from .methods import make_method

    name = name or args.method
    knobs = {**_given_knobs(args, name, strict=name == args.method), **overrides}
    try:
        return make_method(name, **knobs)
    except TypeError as e:
        raise SystemExit(f"ivcprune: error: {e}") from None


def _load(args, local_rank: int | None = None):
    import torch

    from .models import load_model

    default = "cuda" if local_rank is None else f"cuda:{local_rank}"
    device_map = args.device_map or (default if torch.cuda.is_available() else None)
    overrides = _check_overrides(args)
    return load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device_map=device_map,
                      overrides=overrides)


def _check_overrides(args) -> dict[str, Any]:
    """``--set`` pairs, checked against the random model's config fields (before anything is built)."""
    from .models import check_overrides, parse_overrides

    overrides = parse_overrides(getattr(args, "overrides", None))
    if overrides and not args.model.startswith("random:"):
        raise SystemExit("ivcprune: error: --set only applies to random:NAME models")
    if overrides:
        check_overrides(args.model.split(":", 1)[1], overrides)
    return overrides


def _fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def cmd_generate(args) -> int:
    from .bench import _fmt_bytes
    from .generation import Request, generate_batch

    args.model = _resolve_model_spec(args.model)
    method = _method_from_args(args)
    _check_pixels(args)
    for path in args.image:  # everything that needs no model is checked before it loads
        if not os.path.exists(path) and not path.startswith(("http://", "https://", "data:")):
            raise SystemExit(f"ivcprune: error: image not found: {path}")
    if args.model.startswith("random:"):
        raise SystemExit("ivcprune: error: random:NAME models have no tokenizer or processor; use `ivcprune bench`")
    _check_family_flags(args, _model_type(args.model))
    _check_writable(args.out)
    model, processor = _load(args)
    _check_family_flags(args, model.config.model_type)
    request = Request(args.image, args.prompt, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                      max_tiles=args.max_tiles)
    gen: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens)
    if args.do_sample:
        gen.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        import torch

        torch.manual_seed(args.seed)
    variants = [("unpruned", None)] if (method is None or args.compare) else []
    if method is not None:
        variants.append((method.name, method))
    results = {}
    for name, m in variants:  # the generation path of every front door, a batch of one
        (row,) = generate_batch(model, processor, [request], m, **gen)
        results[name] = (row, row.text)
    out = {name: {"answer": ans, "prefill_s": r.prefill_s, "decode_ms_per_token": r.timing.decode_ms_per_token,
                  "new_tokens": len(r.tokens), "kv_bytes": r.kv_bytes, "kv_tokens": r.kv_tokens,
                  "report": r.report.to_dict() if r.report is not None else None}
           for name, (r, ans) in results.items()}
    if args.out:
        _save_generation(Path(args.out), args.prompt, results, out)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if len(results) == 1:
        (name, (run, answer)), = results.items()
        print(answer)
        if run.report is not None:
            print()
            print(method.last_report.summary())
        return 0
    names = list(results)
    print(_fmt_row([""] + names))
    print("|" + "---|" * (len(names) + 1))
    rows = [
        ("answer", lambda r, a: a),
        ("prefill s", lambda r, a: f"{r.prefill_s:.3f}"),
        ("decode ms/token", lambda r, a: "n/a" if r.timing.decode_ms_per_token is None
            else f"{r.timing.decode_ms_per_token:.1f}"),
        ("KV cache (prompt)", lambda r, a: f"{_fmt_bytes(r.kv_bytes)} ({r.kv_tokens} tokens)"),
        ("visual tokens kept", lambda r, a: "all" if r.report is None else
            f"{r.report.visual_kept}/{r.report.visual_tokens}"),
    ]
    for label, fn in rows:
        print(_fmt_row([label] + [fn(*results[n]) for n in names]))
    if method is not None and method.last_report is not None:
        print()
        print(method.last_report.summary())
    return 0


def _save_generation(folder: Path, prompt: str, results: dict[str, Any], out: dict[str, Any]) -> None:
    """``generate --out``: ``answer.txt`` (the last variant's answer: the pruned one), ``report.json`` (what
    ``--json`` prints) and ``kept_tokens_{i}.png`` per image of the pruned run (the image as the model saw it,
    its visual tokens by kind)."""
    from .evals.runner import atomic_write_text
    from .viz import report_pictures

    row, answer = list(results.values())[-1]
    atomic_write_text(folder / "answer.txt", answer + "\n")
    atomic_write_text(folder / "report.json", json.dumps(out, indent=2))
    if row.report is not None:
        for i, pic in enumerate(report_pictures(row.report, row.seen, row.views, " ".join(prompt.split()))):
            pic.save(folder / f"kept_tokens_{i}.png")


def cmd_bench(args) -> int:
    from .bench import bench_markdown, run_bench, save_bench
    from .families import UnsupportedModelError, get_adapter

    if args.methods:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        method = {n: _method_from_args(args, n) for n in names if n != "none"}  # unpruned is always measured
        if not method:
            raise SystemExit("ivcprune: error: --methods needs at least one method besides none")
    else:
        method = _method_from_args(args, "ivc" if args.method == "none" else args.method)
    args.model = _resolve_model_spec(args.model)
    _check_writable(args.out)
    _check_overrides(args)
    model, processor = _load(args)
    for m in (method.values() if isinstance(method, dict) else [method]):
        try:
            m.resolve(get_adapter(model))
        except UnsupportedModelError as e:
            raise SystemExit(f"ivcprune: error: {m.name}: {e}") from None
    result = run_bench(model, processor, method, image_tokens=args.image_tokens, batch_sizes=args.batch_size,
                       new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup, model_name=args.model,
                       progress=not args.json)
    if args.out:
        j, m = save_bench(result, args.out)
        print(f"wrote {j} and {m}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else bench_markdown(result))
    return 0


def _resolve_model_spec(spec: str) -> str:
    from .models import resolve_model_spec

    try:
        return resolve_model_spec(spec)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"ivcprune: error: {e}") from None


def _float_list(text: str | None):
    return [None] if not text else [float(x) for x in text.split(",")]


def _int_list(text: str | None):
    return [None] if not text else [int(x) for x in text.split(",")]


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(name))


def _eval_runs(args, benches, built) -> list[tuple[Any, str, str, Any, Path]]:
    """``(benchmark, run name, method name, method, run folder)`` of every run of the command."""
    out = Path(args.out)
    runs = []
    for bench in benches:
        bench_dir = out / bench.name if len(benches) > 1 else out
        for name, m, _, _, method in built:
            runs.append((bench, name, m, method, bench_dir if len(built) == 1 else bench_dir / name))
    return runs


def cmd_eval(args) -> int:
    from .evals.benchmarks import expand_data, load_benchmark
    from .evals.plan import grid
    from .evals.runner import check_identity, init_distributed, lock_run_dir
    from .methods import method_names

    spec, args.model = args.model, _resolve_model_spec(args.model)
    methods = args.methods.split(",") if args.methods else [args.method]
    budgets = _float_list(args.budgets) if args.budgets else [args.knob_budget]
    layers = _int_list(args.layers) if args.layers else [args.knob_layer]
    for m in methods:
        if m not in method_names():
            raise SystemExit(f"ivcprune: error: unknown method {m!r}; choose from {', '.join(method_names())}")
    # each method takes the knobs it has (bad values fail here, before the model loads)
    built = [(name, m, b, k, _method_from_args(args, m, budget=b, layer=k))
             for name, m, b, k in grid(methods, budgets, layers)]
    benches, missing = [], []
    try:
        names = expand_data(args.data)
    except ValueError as e:
        raise SystemExit(f"ivcprune: error: {e}") from None
    for data in names:  # every benchmark is found before the model loads; all missing ones are named at once
        try:
            benches.append(load_benchmark(data, task=args.task, split=args.split, data_dir=args.data_dir, n=args.n,
                                          seed=args.seed, gt_frame=args.gt_frame, refs=args.refs))
        except FileNotFoundError as e:
            missing.append(str(e))
    if missing:
        raise SystemExit(f"{len(missing)} of {len(names)} benchmarks not found:\n" + "\n".join(missing))
    _check_pixels(args)
    _check_family_flags(args, _model_type(args.model))
    _check_judge(args)
    _check_writable(args.out)
    dist = init_distributed()
    if dist.world > 1 and args.device_map == "auto":
        raise SystemExit("--device-map auto spreads one model over all GPUs: run it as one process; under torchrun "
                         "each rank takes the GPU of its LOCAL_RANK")
    runs = _eval_runs(args, benches, built)
    with contextlib.ExitStack() as held:  # every run folder: checked and locked before the model loads
        for bench, _, m, _, run_dir in runs:
            # the settings known without the model; all of them are checked again when the run starts
            check_identity(run_dir, {"model_path": args.model, "benchmark": bench.name, "source": bench.source,
                                     "task": bench.task, "method": m})
            held.enter_context(lock_run_dir(run_dir, dist))
        model, processor = _load(args, dist.local_rank if dist.world > 1 else None)
        if processor is None:
            raise SystemExit("eval needs a checkpoint with a processor (random:NAME models have none)")
        _check_family_flags(args, model.config.model_type)
        rows, errors = _run_evals(args, spec, model, processor, runs, dist, single_bench=len(benches) == 1)
    if dist.rank == 0:
        _write_comparison(args, rows, several=len(built) > 1 or len(benches) > 1, grounding_only=len(benches) == 1)
    dist.close()
    for e in errors:
        print(f"ivcprune: error: {e}", file=sys.stderr)
    return 1 if errors else 0


def _is_toy(args) -> bool:
    from .models import TOY_DIR

    return Path(args.model).resolve() == TOY_DIR.resolve()


def _grounding_prompt(args) -> str:
    """``--grounding-prompt``; by default the authors' prompts, except for the embedded model, which was
    trained on this project's prompt (the authors' wording takes its Acc@0.5 from 22.7 to 3.7)."""
    return args.grounding_prompt or ("ivcprune" if _is_toy(args) else "authors")


def _boxes(args) -> str:
    """``--boxes``; by default the authors' parser, except for the embedded model (its own conventions)."""
    return args.boxes or ("lenient" if _is_toy(args) else "authors")


def _check_judge(args) -> None:
    """--judge needs --judge-model and a reachable host (checked before the model loads; nothing is asked)."""
    if not getattr(args, "judge", None):
        return
    from .evals.judge import Judge, JudgeError

    if not args.judge_model:
        raise SystemExit("ivcprune: error: --judge needs --judge-model NAME")
    try:
        Judge(args.judge, args.judge_model).check()
    except JudgeError as e:
        raise SystemExit(f"ivcprune: error: {e}") from None


def _run_evals(args, spec: str, model, processor, runs, dist, *, single_bench: bool):
    """Run every ``(benchmark, name, method name, method, folder)``; ``(metrics of rank 0, errors)``. A run with
    nothing to score is reported and the others go on."""
    from .bench import environment
    from .evals.benchmarks import count_rows
    from .evals.judge import CACHE as JUDGE_CACHE
    from .evals.judge import Judge, judge_records
    from .evals.runner import NothingToScoreError, run_resumable
    from .evals.tasks import authors_pixels, predict_samples, sample_size
    from .families import UnsupportedModelError, family_class, get_adapter
    from .media import media_for
    from .methods import method_label

    family = args.style or model.config.model_type
    env = environment(model)  # dtype and attention must match to resume a run; the rest is recorded
    rows, errors = [], []
    for bench, name, m, method, run_dir in runs:
        if bench.total is None and bench.source.lower().endswith(".tsv") and not args.quiet and dist.rank == 0:
            bench.total = count_rows(bench.source)  # rows, malformed ones included
        try:
            resolved = method.resolve(get_adapter(model)) if method is not None else {}
        except UnsupportedModelError as e:  # e.g. VisionZip on a tower without CLS: the other runs go on
            errors.append(f"{bench.name} {name}: {m} cannot run on this model: {e}")
            continue
        prompt = args.prompt_template
        if bench.task == "grounding" and prompt is None:
            prompt = family_class(family).grounding_prompts()[_grounding_prompt(args)]
        lo, hi = authors_pixels(model.config, bench.task)
        pixels = (args.min_pixels or lo, args.max_pixels or hi)
        if not media_for(model.config.model_type).pixel_bounds:  # the processor sizes images (LLaVA, InternVL)
            pixels = (None, None)
        model_family = family_class(model.config.model_type)  # InternVL: the authors' tile limit by default
        max_tiles = args.max_tiles or getattr(model_family, "max_tiles", None)
        info = {"name": name, "model": spec, "model_path": args.model,
                "data": args.data if single_bench else bench.name, "benchmark": bench.name, "source": bench.source,
                "task": bench.task, "method": m, "label": method_label(m),
                "budget": resolved.get("budget") if method else None,
                "layer": resolved.get("layer") if method else None, "config": resolved, "style": family,
                "prompt": prompt, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                "seed": args.seed if bench.source == "synthetic" else None,
                "pixels": list(pixels) if pixels[0] is not None else None,
                "max_tiles": max_tiles,
                "refs": args.refs, "gt_frame": args.gt_frame, "boxes": _boxes(args), "answers": args.answers,
                "grounding_prompt": _grounding_prompt(args) if args.prompt_template is None else "template",
                "judge_model": args.judge_model if args.judge else None, "judge_url": args.judge,
                "split": bench.split, "dtype": env["dtype"], "attn_implementation": env["attn_implementation"],
                "environment": {**env, "world_size": dist.world}}
        skipped: list = []

        # pictures of the kept tokens: the first --pictures samples this process predicts (rank 0
        # only), counting those a run before drew; unpruned runs have none to draw
        pictures = run_dir / "pictures"
        drawn = len(list(pictures.glob("*.png"))) if pictures.is_dir() else 0
        budget = {"left": max(0, args.pictures - drawn) if method is not None and dist.rank == 0 else 0}

        judge = Judge(args.judge, args.judge_model, cache=run_dir / JUDGE_CACHE) if args.judge else None

        def predict(batch, method=method, prompt=prompt, pixels=pixels, pictures=pictures, budget=budget,
                    judge=judge, max_tiles=max_tiles):
            paths = []
            for sample in batch:  # a picture for each sample while the budget lasts
                paths.append(pictures / f"{_file_safe(sample.id)}.png" if budget["left"] > len(paths) else None)
            recs = predict_samples(model, processor, batch, method, family=family,
                                   max_new_tokens=args.max_new_tokens, prompt_template=prompt, pixels=pixels,
                                   pictures=paths, boxes=_boxes(args), answers=args.answers, max_tiles=max_tiles)
            if judge is not None:  # only answers exact matching could not read (pred None)
                judge_records(judge, batch, recs)
            budget["left"] -= sum(1 for p in paths if p is not None and p.exists())
            return recs

        samples, total = bench.open(skipped), bench.total
        if args.limit is not None:
            samples = itertools.islice(samples, args.limit)
            total = args.limit if total is None else min(total, args.limit)
        try:
            metrics = run_resumable(samples, None, run_dir, info=info, total=total, progress=not args.quiet,
                                    dist=dist, skipped=skipped, batch_size=args.batch_size, predict_batch=predict,
                                    order_key=sample_size)
        except NothingToScoreError as e:  # reported at the end; the other runs go on
            errors.append(f"{bench.name} {name}: {e}")
            continue
        if metrics is None:  # not rank 0
            continue
        rows.append(metrics)
        _print_run(bench.name, name, metrics, skipped, run_dir)
    return rows, errors


def _print_run(bench: str, name: str, metrics: dict[str, Any], skipped: list, run_dir: Path) -> None:
    if skipped:
        print(f"{bench} {name}: skipped {len(skipped)} rows, e.g. row {skipped[0].index}: {skipped[0].reason}",
              file=sys.stderr)
    if metrics["n_failed"]:
        print(f"{bench} {name}: {metrics['n_failed']} samples failed (retried by the next run), e.g. "
              f"{metrics['failed'][0]['id']}: {metrics['failed'][0]['error']}", file=sys.stderr)
    kept = 100 * metrics["mean_kept_visual_ratio"]
    print(f"{bench} {name}: score {metrics['score']:.1f}  kept {kept:.1f}%  n {metrics['n']}  -> {run_dir}",
          file=sys.stderr)


def _write_comparison(args, rows: list[dict[str, Any]], *, several: bool, grounding_only: bool) -> None:
    """The table of the command's runs: printed, and written (atomically) when there are several."""
    from .evals.grounding import comparison_markdown
    from .evals.runner import atomic_write_text, compare_table

    if not rows:
        return
    if grounding_only and all(r["task"] == "grounding" for r in rows):
        table = comparison_markdown(rows)
    else:
        table, _ = compare_table(rows)
    if several:
        out = Path(args.out)
        atomic_write_text(out / "comparison.md", table + "\n")
        atomic_write_text(out / "comparison.json", json.dumps(rows, indent=2))
    print(table)


def cmd_score(args) -> int:
    from .evals.runner import MissingRunInfoError, compare_table, run_dirs, score_run

    dirs = []
    for p in args.run_dir:
        try:
            found = run_dirs(p, "predictions*.jsonl")
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
        if not found:
            raise SystemExit(f"{p}: no predictions.jsonl here or below")
        dirs.extend(found)
    given = {k: v for k, v in (("benchmark", args.benchmark), ("task", args.task)) if v}
    if given.get("benchmark"):
        from .evals.benchmarks import canonical_name

        given["benchmark"] = canonical_name(given["benchmark"])
    try:
        results = [score_run(d, given=given, answers=args.answers) for d in dirs]
    except MissingRunInfoError as e:
        raise SystemExit(f"ivcprune: error: {e}") from None
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for d, m in zip(dirs, results):
        score = f"{m['score']:.2f}" if m.get("score") is not None else f"none ({m.get('error', 'nothing to score')})"
        print(f"{d}: {m.get('benchmark') or m.get('data')} {m.get('label', m.get('method'))}: score {score} "
              f"n {m['n']}", file=sys.stderr)
    table, _ = compare_table([{**m, "_dir": str(d)} for d, m in zip(dirs, results)])
    print(table)
    return 0


def cmd_compare(args) -> int:
    from .evals.runner import atomic_write_text, compare_table, find_runs

    try:
        runs = find_runs(args.run_dir)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    table, rows = compare_table(runs)
    if args.out:
        atomic_write_text(args.out, table + "\n")
    print(json.dumps(rows, indent=2) if args.json else table)
    return 0


def cmd_train_toy(args) -> int:
    from dataclasses import fields

    from .toy.train import ToyRecipe, train

    recipe = ToyRecipe(**{f.name: getattr(args, f.name) for f in fields(ToyRecipe) if getattr(args, f.name, None)
                          is not None})
    try:
        summary = train(args.out, recipe, log=lambda m: print(m, flush=True), resume=not args.no_resume,
                        device=args.device)
    except ValueError as e:
        raise SystemExit(f"ivcprune: error: {e}") from None
    last = summary["history"][-1]
    print(f"trained {summary['steps']} steps ({summary['images']} images) in {summary['train_seconds']:.0f}s; "
          f"val Acc@0.5 {100 * last['acc']:.1f} on {recipe.eval_samples} samples -> {args.out}")
    return 0


def cmd_serve(args) -> int:
    from . import serve

    try:
        serve.check_installed()
    except ImportError as e:
        raise SystemExit(f"ivcprune: error: {e}") from None
    name, args.model = args.model, _resolve_model_spec(args.model)
    if args.model.startswith("random:"):
        raise SystemExit("ivcprune: error: random:NAME models have no tokenizer or processor; serve a checkpoint")
    _method_from_args(args)  # bad knobs fail here, before the model loads
    _check_pixels(args)
    _check_family_flags(args, _model_type(args.model))
    config = serve.config_from_args(args, model_name=name, method=args.method,
                                    knobs=_given_knobs(args, args.method))
    model, processor = _load(args)
    _check_family_flags(args, model.config.model_type)
    serve.run_server(model, processor, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .families import SUPPORTED_MODEL_TYPES

    parser = argparse.ArgumentParser(prog="ivcprune", description="IVC-Prune visual token pruning for VLMs")
    parser.add_argument("--version", action="version", version=f"ivcprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about images, pruned (and unpruned with --compare)")
    _add_model_args(g)
    _add_method_args(g)
    g.add_argument("--image", action="append", required=True, help="image path or URL (repeat for several)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive, default=128)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--min-pixels", type=_positive, default=None, help="Qwen-VL: resize images to at least this "
                                                                         "many pixels (qwen-vl-utils)")
    g.add_argument("--max-pixels", type=_positive, default=None, help="Qwen-VL: ... and at most this many")
    g.add_argument("--max-tiles", type=_positive, default=None,
                   help="InternVL: tiles per image at most (default: the processor's max_patches)")
    g.add_argument("--compare", action="store_true", help="also run unpruned and compare side by side")
    g.add_argument("--json", action="store_true", help="print JSON instead of text")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="also write answer.txt, report.json (what --json prints) and kept_tokens_N.png (per image "
                        "of the pruned run: the image as the model saw it, its visual tokens by kind)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="unpruned vs pruned: prefill, decode, memory, KV cache, FLOP expectation")
    _add_model_args(b)
    _add_method_args(b)
    b.add_argument("--image-tokens", type=_positive, nargs="+", default=[1024],
                   help="visual tokens per image after merging (one or more sizes)")
    b.add_argument("--new-tokens", type=_positive, default=32, help="tokens generated per run (forced length)")
    b.add_argument("--repeats", type=_positive, default=5)
    b.add_argument("--warmup", type=_non_negative, default=1)
    b.add_argument("--batch-size", type=_positive, nargs="+", default=[1],
                   help="prompts of one shape generated together (one or more sizes): throughput in samples/s and "
                        "generated tokens/s, unpruned vs pruned")
    b.add_argument("--methods", default=None,
                   help="several methods compared in one run, e.g. ivc,fastv,pdrop,divprune (each interleaved with "
                        "the unpruned run; knob flags apply to the methods that have them)")
    b.add_argument("--out", default=None, help="directory for bench.json and bench.md")
    b.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="benchmarks (grounding, multiple choice, yes/no), pruned and unpruned; "
                                    "resumable, data-parallel under torchrun")
    _add_model_args(e)
    _add_method_args(e, default="none")
    e.add_argument("--data", required=True,
                   help="comma list of: 'synthetic', a VLMEvalKit TSV, an lmms-lab RefCOCO parquet file or folder, "
                        "or a benchmark name (MMBench_DEV_EN_V11, SEEDBench_IMG, MMStar, RealWorldQA, MME, POPE, "
                        "refcoco_val/testA/testB, refcoco+_val/testA/testB, refcocog_val/test), or a suite: "
                        "vqa (the six VQA benchmarks), refcoco (the eight RefCOCO splits), paper (both)")
    e.add_argument("--data-dir", default=None,
                   help="folder with benchmark TSVs / RefCOCO datasets (default: $LMUData, ~/LMUData, HF cache)")
    e.add_argument("--task", default=None, choices=["grounding", "mcq", "yesno"],
                   help="task of a TSV whose name does not tell (default: from the name and columns)")
    e.add_argument("--split", default=None,
                   help="synthetic: train|val|test (default test); RefCOCO folder: val|test|testA|testB")
    e.add_argument("--refs", default="all", choices=["all", "first"],
                   help="RefCOCO parquet: every referring expression of an object, or its first")
    e.add_argument("--num-samples", "--n", dest="n", type=_positive, default=1000,
                   help="synthetic: number of samples (under torchrun spell it --num-samples: torchrun takes --n for "
                        "its own options)")
    e.add_argument("--pictures", type=_non_negative, default=0, metavar="N",
                   help="draw the kept visual tokens of the first N predicted samples of each pruned run "
                        "(RUN_DIR/pictures/ID.png: the image as the model saw it, boxes or answer, tokens by kind)")
    e.add_argument("--limit", type=_positive, default=None,
                   help="only the first N samples of each benchmark (a quick look; a later run with a larger "
                        "limit or none resumes)")
    e.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    e.add_argument("--gt-frame", default="original", choices=["original", "resized28"],
                   help="grounding TSV boxes in original pixels, or the authors' Qwen2.5-VL variant (sides rounded "
                        "to 28)")
    e.add_argument("--methods", default=None,
                   help="comparison: comma list of method names (none for the unpruned model)")
    e.add_argument("--budgets", default=None, help="comparison: comma list of budgets")
    e.add_argument("--layers", default=None, help="comparison: comma list of K")
    e.add_argument("--style", default=None, choices=list(SUPPORTED_MODEL_TYPES),
                   help="prompt and answer format (default: the model's family)")
    e.add_argument("--prompt-template", default=None,
                   help="grounding: prompt with {ref}; multiple choice / yes-no: with {prompt} (the built prompt) "
                        "and/or {question}")
    e.add_argument("--boxes", default=None, choices=["authors", "lenient"],
                   help="grounding answers: read as the IVC-Prune authors' evaluation did (default: well-formed "
                        "integer boxes only, anything else a miss; README, Comparability) or by this project's "
                        "lenient parser (the default of --model toy)")
    e.add_argument("--grounding-prompt", default=None, choices=["authors", "ivcprune"],
                   help="grounding prompt: the authors' evaluation's (default) or this project's (the default of "
                        "--model toy, which was trained on it); --prompt-template overrides both")
    e.add_argument("--judge", default=None, metavar="URL",
                   help="OpenAI-compatible chat-completions endpoint asked about multiple-choice / yes-no answers "
                        "exact matching cannot read (key: $IVCPRUNE_JUDGE_API_KEY or $OPENAI_API_KEY); replies "
                        "cached in RUN_DIR/judge_cache.jsonl")
    e.add_argument("--judge-model", default=None, metavar="NAME", help="the judge's model name")
    e.add_argument("--max-new-tokens", type=_positive, default=None,
                   help="default: 64 grounding, 32 multiple choice, 16 yes/no")
    e.add_argument("--min-pixels", type=_positive, default=None,
                   help="resize images to at least this many pixels (default: the authors' setting for the model "
                        "and task, see README)")
    e.add_argument("--max-pixels", type=_positive, default=None,
                   help="... and at most this many (default: the authors')")
    e.add_argument("--max-tiles", type=_positive, default=None,
                   help="InternVL: tiles per image at most (default: 6, the authors' setting)")
    e.add_argument("--out", required=True, help="output directory (resumed if it holds predictions)")
    e.add_argument("--batch-size", type=_positive, default=1,
                   help="samples answered together (left-padded; each answer equals its batch-of-one answer); "
                        "each window of 8 batches is sorted by image size to limit padding")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--answers", default="vlmevalkit", choices=["vlmevalkit", "lenient"],
                   help="multiple-choice / yes-no answer reading: VLMEvalKit's exact matching (default, comparable "
                        "to published numbers) or ivcprune's lenient rules; records keep both")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("score", help="recompute metrics.json of runs from their predictions alone")
    s.add_argument("run_dir", nargs="+", help="run directories (or folders holding them)")
    s.add_argument("--json", action="store_true", help="print the metrics as JSON")
    s.add_argument("--answers", default=None, choices=["vlmevalkit", "lenient"],
                   help="read the stored raw answers again under this mode (default: each run's own mode)")
    s.add_argument("--benchmark", default=None, metavar="NAME",
                   help="the benchmark of predictions without their run.json (required then: MME and POPE are scored "
                        "differently); overrides run.json's")
    s.add_argument("--task", default=None, choices=["grounding", "mcq", "yesno"],
                   help="the task, where neither run.json nor the records tell")
    s.set_defaults(func=cmd_score)

    c = sub.add_parser("compare", help="one markdown table over runs: score and relative score per benchmark")
    c.add_argument("run_dir", nargs="+", help="run directories (or folders holding them)")
    c.add_argument("--out", default=None, help="also write the table to this file")
    c.add_argument("--json", action="store_true", help="print the rows as JSON")
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("train-toy", help="train the embedded grounding model from scratch (2 CPU cores, under 4 hours; "
                                         "resumable: run the same command again after an interruption)")
    t.add_argument("--out", required=True, help="output checkpoint directory (holds checkpoint.pt while training)")
    t.add_argument("--no-resume", action="store_true", help="start from scratch even if --out holds a checkpoint")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--data-seed", type=int, default=None)
    t.add_argument("--minutes", type=float, default=None, help="training wall-clock budget (validation excluded)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--align-steps", type=int, default=None, help="alignment steps (object lists, region captions) "
                                                                  "before the instruction steps")
    t.add_argument("--confusers", type=float, default=None,
                   help="hard negatives in stage-2 scenes: chance that an object copies a placed one's colour with "
                        "another shape (0-1)")
    t.add_argument("--checkpoint-every", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--eval-every", type=int, default=None)
    t.add_argument("--eval-samples", type=int, default=None)
    t.add_argument("--device", default="cpu", help="cpu (the reference: the shipped model is a CPU run) or an "
                                                   "accelerator such as cuda; a checkpoint resumes on either")
    t.set_defaults(func=cmd_train_toy)

    v = sub.add_parser("serve", help="OpenAI-compatible chat-completions server with pruning and micro-batching "
                                     "(pip install 'ivcprune[serve]')")
    _add_model_args(v)
    _add_method_args(v)
    from .serve.options import add_arguments as add_serve_args  # plain argparse: no web framework imported

    add_serve_args(v)
    v.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .evals.runner import RankFailedError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        resume = " (run the same command again to resume: finished predictions are kept)" \
            if args.command == "eval" else ""
        print(f"ivcprune: interrupted{resume}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, OSError, RankFailedError) as e:
        print(f"ivcprune: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """An error's message on one line (library errors can span several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:3]) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
