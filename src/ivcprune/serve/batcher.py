"""Micro-batching: one worker thread owns the model; requests that arrive close together and share a
pruning configuration and sampling settings are answered by one :func:`~ivcprune.generation.generate_batch`.

Each row of a batch gets what it gets alone (the runtime prunes every row in its own coordinates, greedy
decoding is per row), so batching changes latency and throughput, never an answer. Rows may ask for
different ``max_tokens``: the batch runs to the largest and each row is cut to its own, which is what that
row generates alone. Seeded sampling runs alone, right after ``torch.manual_seed(seed)``, so that a seed
gives the same answer whatever else the server is doing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..generation import Generation, generate_batch
from .protocol import ChatJob, cut_at_stop, pruning_summary

log = logging.getLogger("ivcprune.serve")


class QueueFull(Exception):
    """More requests are waiting than the server's ``max_queue``."""


class ShuttingDown(Exception):
    """The server stopped taking requests."""


@dataclass
class Choice:
    text: str
    tokens: list[int]  # generated tokens (cut to the request's max_tokens), end-of-sequence token included
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"


@dataclass
class Result:
    choices: list[Choice]
    prompt_tokens: int  # the row's prompt tokens, from the model's inputs (padding excluded)
    pruning: dict[str, Any]
    batch_rows: int  # rows generated together with this request's (its own included)


# Events a job's ``notify`` receives (called on the worker thread):
#   ("token", choice_index, token_id)   streaming requests only, as each token is generated
#   ("done", Result) or ("error", Exception)   exactly one of them, last
Notify = Callable[[tuple], None]


@dataclass(eq=False)
class Job:
    chat: ChatJob
    notify: Notify
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # timed out or the client left: not started, or its rows stop at the next step
    streamed: bool = False  # some token was sent already (a failed batch is then not retried)

    @property
    def solo(self) -> bool:
        return self.chat.sampling is not None and self.chat.seed is not None

    @property
    def key(self) -> Any:
        """Jobs of one key may share a batch: one pruning configuration, one sampling setting."""
        return ("solo", id(self)) if self.solo else (self.chat.method, self.chat.sampling)


class _Cancelled(StoppingCriteria):
    """Ends the rows of cancelled jobs at the next step (a batch ends when all its rows have)."""

    def __init__(self, rows: list[tuple[Job, int]]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([job.cancelled for job, _ in self.rows], device=input_ids.device)


class _RowStreamer(BaseStreamer):
    """``generate``'s streamer for a whole batch: hands each streaming row's new token to its job, up to
    the row's end-of-sequence token or its own ``max_tokens``."""

    def __init__(self, rows: list[tuple[Job, int]], eos: set[int]):
        self.rows, self.eos = rows, eos
        self.count = [0] * len(rows)
        self.done = [not job.chat.stream for job, _ in rows]

    def put(self, value):
        if value.dim() > 1:  # the prompt, passed once before the first step
            return
        for r, token in enumerate(value.tolist()):
            job, choice = self.rows[r]
            if self.done[r] or job.cancelled:
                continue
            self.count[r] += 1
            self.done[r] = token in self.eos or self.count[r] >= job.chat.max_tokens
            job.streamed = True
            job.notify(("token", choice, token))

    def end(self):
        pass


class Batcher:
    """The model's one worker thread and the queue in front of it."""

    def __init__(self, model, processor, *, max_batch_size: int = 8, wait_s: float = 0.005, max_queue: int = 64,
                 on_batch: Callable[[int], None] | None = None):
        self.model, self.processor = model, processor
        self.max_batch_size, self.wait_s, self.max_queue = max_batch_size, wait_s, max_queue
        self.on_batch = on_batch
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._holds = 0
        self._running = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ivcprune-batcher", daemon=True)

    # -- the HTTP side ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Answer every waiting job, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already (the limit); retry later")
            self._pending.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or end its rows in the running batch."""
        with self._cond:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """No new batch starts inside the block (requests queue up): to line requests up deliberately, e.g.
        in tests, or to pause the model for maintenance."""
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    # -- the worker -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                self._run(jobs)
            finally:
                self._running = 0

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job's key, once its batch is full or it has waited ``wait_s``."""
        with self._cond:
            while True:
                if not self._pending:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                if self._holds and not self._stopping:
                    self._cond.wait()
                    continue
                first = self._pending[0]
                left = first.arrived + self.wait_s - time.monotonic()
                if left > 0 and not (self._stopping or first.solo or self._rows(first.key) >= self.max_batch_size):
                    self._cond.wait(left)
                    continue
                return self._pop(first.key)

    def _rows(self, key) -> int:
        return sum(j.chat.n for j in self._pending if j.key == key)

    def _pop(self, key) -> list[Job]:
        jobs, rows = [], 0
        for job in list(self._pending):
            if job.key == key and rows + job.chat.n <= self.max_batch_size:
                jobs.append(job)
                rows += job.chat.n
                self._pending.remove(job)
        self._running = rows
        return jobs

    def _run(self, jobs: list[Job]) -> None:
        try:
            results = self._generate(jobs)
        except Exception as e:  # a request that breaks its batch must not take the server down
            if len(jobs) > 1 and not any(j.streamed for j in jobs):
                log.warning("a batch of %d requests failed (%s); answering them one by one", len(jobs), e)
                for job in jobs:  # the others still get their answer; the culprit gets the error
                    self._run([job])
                return
            log.exception("generation failed")
            for job in jobs:
                job.notify(("error", e))
            return
        for job, result in zip(jobs, results):
            if not job.cancelled:
                job.notify(("done", result))

    def _generate(self, jobs: list[Job]) -> list[Result]:
        chat = jobs[0].chat
        rows = [(job, i) for job in jobs for i in range(job.chat.n)]
        kwargs: dict[str, Any] = dict(max_new_tokens=max(job.chat.max_tokens for job, _ in rows),
                                      stopping_criteria=StoppingCriteriaList([_Cancelled(rows)]))
        if any(job.chat.stream for job in jobs):
            kwargs["streamer"] = _RowStreamer(rows, self.eos)
        if chat.sampling is not None:
            kwargs.update(do_sample=True, temperature=chat.sampling[0], top_p=chat.sampling[1])
            if chat.seed is not None:  # solo: the seed alone decides the answer
                torch.manual_seed(chat.seed)
        gens = generate_batch(self.model, self.processor, [job.chat.request for job, _ in rows], chat.method.build(),
                              clock=False, **kwargs)
        if self.on_batch is not None:
            self.on_batch(len(rows))
        results, first = [], 0
        for job in jobs:
            results.append(self._result(job, gens[first:first + job.chat.n], len(rows)))
            first += job.chat.n
        return results

    def _result(self, job: Job, gens: list[Generation], batch_rows: int) -> Result:
        g = gens[0]
        return Result(choices=[self._choice(job.chat, gen) for gen in gens], prompt_tokens=int(g.prompt_ids.numel()),
                      pruning=pruning_summary(job.chat.method, g.report, g.prompt_ids, self.image_token_id),
                      batch_rows=batch_rows)

    def _choice(self, chat: ChatJob, gen: Generation) -> Choice:
        tokens, text = gen.tokens, gen.text
        if len(tokens) > chat.max_tokens:  # the batch ran to a longer request's max_tokens
            tokens = tokens[:chat.max_tokens]
            text = self.processor.decode(tokens, skip_special_tokens=True)
        finish = "stop" if tokens and tokens[-1] in self.eos else "length"
        text, hit = cut_at_stop(text, chat.stop)
        return Choice(text=text, tokens=tokens, finish_reason="stop" if hit else finish)
