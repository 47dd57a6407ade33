"""An optional LLM judge for multiple-choice and yes/no answers that exact matching cannot read.

As VLMEvalKit does (``vlmeval/dataset/utils/multiple_choice.py`` ``build_prompt``; the yes/no prompt of
``vlmeval/dataset/utils/yorn.py``), a chat model is shown the question, the options and the model's answer
and asked which option the answer means, or that none does (``Z`` / ``Unknown``). The wording here is this
project's own. The judge is asked only about records whose ``pred`` is ``None`` (the extraction of
:mod:`ivcprune.evals.answers` could not read the answer); its raw reply and parsed verdict go to the record's
``judge`` field, the verdict to ``pred``.

Any OpenAI-compatible chat-completions endpoint serves (``--judge URL --judge-model NAME``); the key comes from
``$IVCPRUNE_JUDGE_API_KEY`` or ``$OPENAI_API_KEY`` (none is sent when neither is set). Replies are cached in the
run folder (``judge_cache.jsonl``, keyed by a hash of the judge model and the prompt), so a resumed run never
asks the same question twice. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CACHE = "judge_cache.jsonl"
KEY_VARIABLES = ("IVCPRUNE_JUDGE_API_KEY", "OPENAI_API_KEY")

_MCQ = """You help to match a model's answer to a single-choice question with one of the question's options.
You get the question, its options and the answer. Say which option the answer means. If the answer means
none of the options (or several, or says it cannot tell), say Z. Reply with one uppercase letter only: one of
{letters}, or Z.

Example 1:
Question: What colour is the car?
Options:
A. red
B. blue
C. green
Answer: It looks blue to me.
Your reply: B

Example 2:
Question: What colour is the car?
Options:
A. red
B. blue
C. green
Answer: The image shows a bicycle.
Your reply: Z

Question: {question}
Options:
{options}
Answer: {answer}
Your reply:"""

_YESNO = """You help to match a model's answer to a yes/no question with Yes or No.
You get the question and the answer. Say whether the answer means yes or no. If it means neither (or
cannot tell), say Unknown. Reply with one word only: Yes, No or Unknown.

Example 1:
Question: Is there a dog in the image?
Answer: I can see a dog lying on the sofa.
Your reply: Yes

Example 2:
Question: Is there a dog in the image?
Answer: The picture is too dark to tell.
Your reply: Unknown

Question: {question}
Answer: {answer}
Your reply:"""


class JudgeError(RuntimeError):
    """The judge could not be asked (unreachable, refused, or a reply that is not chat-completions JSON)."""


def judge_prompt(task: str, question: str, answer: str, options: dict[str, str] | None = None) -> str:
    """The judge's prompt for a ``mcq`` or ``yesno`` answer."""
    if task == "mcq":
        opts = options or {}
        return _MCQ.format(letters=", ".join(opts), question=question, answer=answer,
                           options="\n".join(f"{k}. {v}" for k, v in opts.items()))
    if task == "yesno":
        return _YESNO.format(question=question, answer=answer)
    raise ValueError(f"the judge reads multiple-choice and yes/no answers, not {task!r}")


def parse_verdict(task: str, reply: str, options: dict[str, str] | None = None) -> str | None:
    """The verdict in a judge's reply: an option letter / ``Yes`` / ``No``; ``None`` for Z / Unknown or a reply
    that names nothing (or more than one thing)."""
    text = (reply or "").strip()
    if task == "mcq":
        found = {m for m in re.findall(r"\b([A-Z])\b", text) if m in (options or {}) or m == "Z"}
        return found.pop() if len(found) == 1 and "Z" not in found else None
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", text)} & {"yes", "no", "unknown"}
    return words.pop().capitalize() if len(words) == 1 and "unknown" not in words else None


def _key(model: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()


class Judge:
    """A chat-completions judge with a reply cache (``cache``: a JSON-lines file; ``None``: in memory only).
    ``requests`` counts the questions actually sent."""

    def __init__(self, url: str, model: str, *, cache: str | Path | None = None, timeout: float = 60.0,
                 api_key: str | None = None):
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.api_key = api_key if api_key is not None else next(
            (os.environ[v] for v in KEY_VARIABLES if os.environ.get(v)), None)
        self.cache_path = Path(cache) if cache is not None else None
        self.requests = 0
        self._cache: dict[str, str] = {}
        if self.cache_path is not None and self.cache_path.exists():
            for line in self.cache_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self._cache[row["key"]] = row["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a killed run: that question is asked again

    def check(self) -> None:
        """:class:`JudgeError` unless the judge's host accepts a connection (asks nothing)."""
        u = urllib.parse.urlparse(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise JudgeError(f"judge URL {self.url!r} is not an http(s) URL")
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            socket.create_connection((u.hostname, port), timeout=min(self.timeout, 10)).close()
        except OSError as e:
            raise JudgeError(f"judge at {self.url} is unreachable: {e}") from None

    def ask(self, prompt: str) -> str:
        """The judge's reply to ``prompt`` (from the cache when it was asked before)."""
        key = _key(self.model, prompt)
        if key in self._cache:
            return self._cache[key]
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 16,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode("utf-8"))
            reply = data["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            raise JudgeError(f"judge at {self.url} answered HTTP {e.code}: {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise JudgeError(f"judge at {self.url} is unreachable: {getattr(e, 'reason', e)}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"judge at {self.url} gave no chat-completions reply ({type(e).__name__}: {e})") from None
        reply = str(reply)
        self._cache[key] = reply
        if self.cache_path is not None:
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "model": self.model, "reply": reply}) + "\n")
        return reply


def judge_records(judge: Judge, samples: Sequence[Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ask ``judge`` about each multiple-choice / yes-no record whose ``pred`` is ``None``; such a record gets
    ``judge`` (model, raw reply, verdict), and the verdict as ``pred`` (``correct`` updated). Others are left
    as they are."""
    for sample, rec in zip(samples, records, strict=True):
        if rec.get("task") not in ("mcq", "yesno") or rec.get("pred") is not None:
            continue
        options = getattr(sample, "options", None) or {}
        reply = judge.ask(judge_prompt(rec["task"], sample.question, rec.get("answer") or "", options))
        verdict = parse_verdict(rec["task"], reply, options)
        rec["judge"] = {"model": judge.model, "reply": reply, "verdict": verdict}
        rec["pred"] = verdict
        rec["correct"] = verdict is not None and verdict == rec.get("gt")
    return records
