"""Counters and histograms for ``GET /metrics``, in Prometheus' text format (written by hand: a few series
need no client library)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, count in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {_num(self.sum)}", f"{name}_count {total}"]


class Metrics:
    """Thread-safe: the HTTP side and the batcher's worker both record."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.latency = Histogram(LATENCY_BUCKETS)  # chat completions answered, arrival to last byte
        self.tokens = {"prompt": 0, "completion": 0}
        self.visual = {"in": 0, "kept": 0}
        self.batches: dict[int, int] = defaultdict(int)  # rows per batch -> batches

    def request(self, endpoint: str, status: int, seconds: float | None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None:
                self.latency.observe(seconds)

    def answered(self, prompt: int, completion: int, visual_in: int, visual_kept: int) -> None:
        with self._lock:
            self.tokens["prompt"] += prompt
            self.tokens["completion"] += completion
            self.visual["in"] += visual_in
            self.visual["kept"] += visual_kept

    def batch(self, rows: int) -> None:
        with self._lock:
            self.batches[rows] += 1

    def render(self, waiting: int, running: int) -> str:
        with self._lock:
            lines = _family("ivcprune_requests_total", "counter", "HTTP requests by endpoint and status")
            lines += [f'ivcprune_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += _family("ivcprune_request_seconds", "histogram", "chat completion latency, arrival to last byte")
            lines += self.latency.lines("ivcprune_request_seconds")
            lines += _family("ivcprune_tokens_total", "counter", "tokens of answered requests")
            lines += [f'ivcprune_tokens_total{{kind="{k}"}} {v}' for k, v in self.tokens.items()]
            lines += _family("ivcprune_visual_tokens_total", "counter", "visual tokens of answered requests: in the "
                             "prompt, and kept by pruning")
            lines += [f'ivcprune_visual_tokens_total{{kind="{k}"}} {v}' for k, v in self.visual.items()]
            lines += _family("ivcprune_batches_total", "counter", "generate calls by batch size (rows)")
            lines += [f'ivcprune_batches_total{{rows="{r}"}} {n}' for r, n in sorted(self.batches.items())]
        lines += _family("ivcprune_queue_waiting", "gauge", "requests waiting for the model")
        lines += [f"ivcprune_queue_waiting {waiting}"]
        lines += _family("ivcprune_batch_running_rows", "gauge", "rows in the batch being generated")
        lines += [f"ivcprune_batch_running_rows {running}"]
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _num(value: float) -> str:
    return repr(float(value))
