"""Load test of ``ivcprune serve`` on loopback, against the embedded toy model; stops by itself.

Starts ``ivcprune serve --model toy`` in a subprocess, computes the expected answer of every distinct prompt
with the one generation path (``generate_batch``, each prompt alone, in this process), then sends
``--requests`` requests at ``--concurrency`` with the ``openai`` client, unpruned and pruned in turn. Every
answer must equal its prompt's expected answer (nothing lost, nothing mixed up); the exit status is 1
otherwise. Prints one markdown table: p50 / p95 latency and throughput per pruning setting (and server
batch limit), and the mean batch size the server formed (from its /metrics).

    python scripts/load_test.py                      # 200 requests at concurrency 16, unpruned vs IVC 50%
    python scripts/load_test.py --max-batch-size 1 8   # also without micro-batching, one server each
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per pruning setting")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    ap.add_argument("--distinct", type=int, default=32, help="distinct prompts (synthetic test images) cycled over")
    ap.add_argument("--budget", type=float, default=0.5, help="IVC-Prune budget of the pruned run")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch-size", type=int, nargs="+", default=[8],
                    help="the server's --max-batch-size (several: one server each, e.g. 1 8)")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="the server's --batch-wait-ms")
    return ap.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, max_batch_size: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ivcprune", "serve", "--model", "toy", "--port", str(port), "--log-level", "warning",
           "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-queue", str(max(64, args.concurrency)), "--max-tokens", str(args.max_tokens)]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def prompts(n: int):
    """``[(question, image data URL, image)]`` of the synthetic test split."""
    from ivcprune.evals.synth import make_sample

    out = []
    for i in range(n):
        s = make_sample(0, "test", i)
        buf = io.BytesIO()
        s.image.save(buf, "PNG")
        out.append((s.question, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), s.image))
    return out


def expected(items, settings, max_tokens: int) -> dict[str, list[str]]:
    """Each prompt's answer alone, through the one generation path, per pruning setting."""
    from ivcprune.generation import Request, generate_batch
    from ivcprune.methods import make_method
    from ivcprune.models import load_model, resolve_model_spec

    model, processor = load_model(resolve_model_spec("toy"), dtype="float32")
    refs = {}
    for label, pruning in settings:
        method = make_method(pruning["method"], **{k: v for k, v in pruning.items() if k != "method"})
        refs[label] = [generate_batch(model, processor, [Request([img], q)], method, max_new_tokens=max_tokens)[0].text
                       for q, _, img in items]
    return refs


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def batches(metrics: dict[str, float]) -> tuple[float, float]:
    """(batches, rows) so far."""
    sizes = {int(k.split('"')[1]): v for k, v in metrics.items() if k.startswith("ivcprune_batches_total{")}
    return sum(sizes.values()), sum(r * n for r, n in sizes.items())


def run_phase(client, items, refs, pruning, *, requests: int, concurrency: int, max_tokens: int):
    """Send ``requests`` requests, ``concurrency`` at a time; per request ((latency s, correct, completion tokens,
    pruning summary), None) or (None, error), and the wall time."""

    def one(k: int):
        q, url, _ = items[k % len(items)]
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(model="toy", max_tokens=max_tokens, extra_body={"pruning": pruning},
                                               messages=[{"role": "user", "content": content}])
        except openai.APIError as e:
            return None, f"{type(e).__name__}: {e}"
        ok = r.choices[0].message.content == refs[k % len(items)]
        return (time.perf_counter() - t0, ok, r.usage.completion_tokens, r.pruning), None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    return results, time.perf_counter() - t0


def row(label, results, wall, before, after) -> tuple[list[str], int]:
    done = [r for r, err in results if r is not None]
    errors = [err for r, err in results if err is not None]
    wrong = sum(1 for r in done if not r[1])
    lat = sorted(r[0] for r in done)
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan")
    n_batches, rows = (a - b for a, b in zip(batches(after), batches(before)))
    kept = sum(r[3]["visual_kept"] for r in done) / max(1, sum(r[3]["visual_tokens"] for r in done))
    cells = [label, str(len(results)), str(len(done) - wrong), str(wrong), str(len(errors)),
             f"{statistics.median(lat):.3f}" if lat else "-", f"{p95:.3f}", f"{len(done) / wall:.1f}",
             f"{sum(r[2] for r in done) / wall:.0f}", f"{100 * kept:.0f}%", f"{rows / max(1, n_batches):.1f}"]
    for err in errors[:3]:
        print(f"  {label}: {err}", file=sys.stderr)
    return cells, wrong + len(errors)


def measure(args, items, refs, settings, max_batch_size: int) -> tuple[list[list[str]], int]:
    """One server with ``max_batch_size``: a table row per pruning setting, and the failures."""
    port = free_port()
    server = start_server(args, port, max_batch_size)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
    rows, bad = [], 0
    try:
        for label, pruning in settings:
            kw = dict(concurrency=args.concurrency, max_tokens=args.max_tokens)
            run_phase(client, items, refs[label], pruning, requests=args.concurrency, **kw)  # warm-up, not counted
            before = scrape(url)
            results, wall = run_phase(client, items, refs[label], pruning, requests=args.requests, **kw)
            cells, failures = row(label, results, wall, before, scrape(url))
            rows.append([cells[0], str(max_batch_size), *cells[1:]])
            bad += failures
    finally:
        server.send_signal(signal.SIGTERM)  # graceful: in-flight requests are answered first
        server.wait(60)
    return rows, bad


def main(argv=None) -> int:
    args = parse_args(argv)
    pruned = (f"IVC-Prune {args.budget:g}", {"method": "ivc", "budget": args.budget})
    settings = [("unpruned", {"method": "none"}), pruned]
    items = prompts(args.distinct)
    refs = expected(items, settings, args.max_tokens)
    header = ["pruning", "max batch", "requests", "correct", "mixed up", "lost", "p50 s", "p95 s", "req/s",
              "tokens/s", "visual kept", "mean batch"]
    lines, bad = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)], 0
    for size in args.max_batch_size:
        rows, failures = measure(args, items, refs, settings, size)
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        bad += failures
    print(f"\n{args.requests} requests per row at concurrency {args.concurrency}, embedded toy model (CPU), server "
          f"--batch-wait-ms {args.batch_wait_ms:g}, {args.distinct} distinct prompts, max_tokens {args.max_tokens}\n")
    print("\n".join(lines))
    print(f"\n{'FAIL' if bad else 'OK'}: {bad} requests lost or mixed up")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
