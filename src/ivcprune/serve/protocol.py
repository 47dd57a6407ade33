"""OpenAI chat-completions requests -> :class:`~ivcprune.generation.Request` plus generation settings, and the
answers back: parsing, validation against the server's limits, errors in OpenAI's JSON shape.

No web framework here: the HTTP layer calls :func:`parse_chat` off the event loop, since it
decodes images and counts the prompt's tokens.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..families import get_adapter
from ..generation import Request, prepare_requests
from ..inputs import user_message
from .config import Limits, MethodSpec, ServeConfig

# Request fields this server cannot honour: refused rather than silently ignored.
UNSUPPORTED = ("tools", "functions", "logit_bias", "response_format", "audio", "prediction", "logprobs",
               "top_logprobs")


class APIError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: a well-formed request whose values the server refuses."""
    return APIError(400, message, param=param, code=code)


def malformed(message: str, param: str | None = None) -> APIError:
    """422: a request that does not have the chat-completions shape (missing field, wrong JSON type)."""
    return APIError(422, message, param=param, code="invalid_type")


@dataclass
class ChatJob:
    """One parsed chat-completions request: what to generate and how."""

    request: Request
    method: MethodSpec
    max_tokens: int
    n: int = 1
    sampling: tuple[float, float] | None = None  # (temperature, top_p); None: greedy
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    prompt_tokens: int = 0  # counted while parsing (the limit); the response counts again from the outputs


# -- fields ---------------------------------------------------------------------------------------------

def _get(body: dict, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    """``body[name]`` of one of ``kinds`` (``bool`` is no number), 422 otherwise; ``default`` when absent."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise malformed(f"'{name}' must be {what}, got {type(value).__name__}", name)
    return value


def _number(body: dict, name: str, lo: float, hi: float, default: float | None) -> float | None:
    value = _get(body, name, (int, float), "a number", default)
    if value is not None and not lo <= value <= hi:
        raise bad(f"'{name}' must be in [{lo}, {hi}], got {value}", name)
    return value


def _max_tokens(body: dict, limits: Limits) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _get(body, name, (int,), "an integer", limits.max_tokens)
    if value < 1:
        raise bad(f"'{name}' must be at least 1, got {value}", name)
    if value > limits.max_tokens:
        raise bad(f"'{name}' is {value}, above this server's limit of {limits.max_tokens}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    stops = [value] if isinstance(value, str) else value or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise malformed("'stop' must be a string or a list of strings", "stop")
    if len(stops) > 4:
        raise bad(f"'stop' takes at most 4 strings, got {len(stops)}", "stop")
    return tuple(s for s in stops if s)


def _sampling(body: dict) -> tuple[tuple[float, float] | None, int | None]:
    """``((temperature, top_p) or None for greedy, seed)``; temperature left out or 0 is greedy."""
    temperature = _number(body, "temperature", 0.0, 2.0, 0.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    seed = _get(body, "seed", (int,), "an integer")
    if top_p == 0:
        raise bad("'top_p' must be above 0", "top_p")
    return ((float(temperature), float(top_p)) if temperature > 0 else None), seed


def _refuse_unsupported(body: dict) -> None:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}) and not (name == "response_format" and
                                                                 body[name] == {"type": "text"}):
            raise bad(f"'{name}' is not supported by this server", name)
    if body.get("tool_choice") not in (None, "none"):
        raise bad("'tool_choice' is not supported by this server", "tool_choice")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), "a number", 0) != 0:
            raise bad(f"'{name}' is not supported by this server (only 0)", name)


# -- pruning --------------------------------------------------------------------------------------------

def parse_pruning(value: Any, default: MethodSpec) -> MethodSpec:
    """The request's ``pruning`` field: absent -> the server's; ``"none"`` / ``{"method": NAME, knobs...}``
    -> that method with those knobs only; ``{knobs...}`` without a method -> the server's method and knobs,
    overridden by these."""
    if value is None:
        return default
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, dict):
        raise malformed("'pruning' must be an object such as {\"method\": \"ivc\", \"budget\": 0.3}", "pruning")
    knobs = {k: v for k, v in value.items() if k != "method"}
    for k, v in knobs.items():
        if v is not None and not isinstance(v, (int, float, str, bool)):
            raise bad(f"pruning knob '{k}' must be a number, string or boolean", "pruning")
    if "method" not in value:
        return MethodSpec.of(default.name, {**dict(default.knobs), **knobs})
    if not isinstance(value["method"], str):
        raise malformed("'pruning.method' must be a method name", "pruning")
    return MethodSpec.of(value["method"], knobs)


def check_method(spec: MethodSpec, model) -> None:
    """Build ``spec`` and resolve it against the model (unknown method or knob, bad value, K out of range):
    400 here rather than a failed batch later."""
    try:
        method = spec.build()
        if method is not None:
            with warnings.catch_warnings():  # a preset by analogy warns; that is no error of the request
                warnings.simplefilter("ignore")
                method.resolve(get_adapter(model))
    except (TypeError, ValueError) as e:
        raise bad(f"pruning: {e}", "pruning") from None


# -- images ---------------------------------------------------------------------------------------------

def decode_image(url: str, limits: Limits) -> Image.Image:
    """An image part's URL -> RGB image: data URLs always, local paths only under the allowed folder,
    remote URLs never (the server fetches nothing on a client's behalf)."""
    if url.startswith("data:"):
        return _open_image(_data_url_bytes(url), limits, "image data URL")
    if url.startswith(("http://", "https://")):
        raise bad("remote image URLs are refused (the server fetches nothing): send the image as a data URL "
                  "(data:image/png;base64,...)", "messages")
    path = url[len("file://"):] if url.startswith("file://") else url
    if "://" in path:
        raise bad(f"image URL scheme {url.split('://', 1)[0]!r} is not supported: send a data URL", "messages")
    return _open_image(_local_file(path, limits.local_image_dir, limits.max_request_bytes), limits, "image file")


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad("image data URL must look like data:image/png;base64,...", "messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad("image data URL is not valid base64", "messages") from None


def _local_file(path: str, allowed: Path | None, max_bytes: int) -> bytes:
    if allowed is None:
        raise bad("local image paths are refused: start the server with --allow-local-images DIR, or send a data "
                  "URL", "messages")
    root = Path(os.path.realpath(allowed))
    target = Path(os.path.realpath(root / path))  # an absolute path replaces root; symlinks resolved
    if root != target and root not in target.parents:
        raise bad("image path is outside the folder allowed by --allow-local-images", "messages")
    try:
        size = target.stat().st_size
        if size > max_bytes:
            raise APIError(413, f"image file is {size} bytes, above the limit of {max_bytes}", param="messages",
                           code="image_too_large")
        return target.read_bytes()
    except OSError:
        raise bad(f"image file not found under the allowed folder: {path}", "messages") from None


def _open_image(data: bytes, limits: Limits, what: str) -> Image.Image:
    too_large = f"{what} has more pixels than the limit of {limits.max_image_pixels}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size  # from the header: nothing decoded yet
            if w * h > limits.max_image_pixels:
                raise APIError(413, f"{too_large} ({w}x{h})", param="messages", code="image_too_large")
            return im.convert("RGB")
    except Image.DecompressionBombError:  # PIL's own guard, far above any sensible limit
        raise APIError(413, too_large, param="messages", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise bad(f"{what} is not an image this server can read ({type(e).__name__})", "messages") from None


# -- messages -------------------------------------------------------------------------------------------

@dataclass
class Turn:
    role: str
    text: str
    images: list[Image.Image]


def _parts(content: Any, role: str, limits: Limits, budget: list[int]) -> tuple[str, list[Image.Image]]:
    """A message's content -> (text parts joined by newlines, images in order)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise malformed(f"{role} message content must be a string or a list of parts", "messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(_image_part(part, role, limits, budget))
        elif kind in ("text", None):
            raise malformed("each content part must be {\"type\": \"text\", \"text\": ...} or {\"type\": "
                            "\"image_url\", \"image_url\": {\"url\": ...}}", "messages")
        else:
            raise bad(f"content part type {kind!r} is not supported (text and image_url only)", "messages")
    return "\n".join(texts), images


def _image_part(part: dict, role: str, limits: Limits, budget: list[int]) -> Image.Image:
    if role != "user":
        raise bad(f"images are accepted in user messages only, not in {role} messages", "messages")
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise malformed("an image_url part needs {\"image_url\": {\"url\": \"data:...\"}}", "messages")
    budget[0] -= 1
    if budget[0] < 0:
        raise bad(f"too many images: at most {limits.max_images} per request", "messages")
    return decode_image(url, limits)


def parse_messages(messages: Any, limits: Limits) -> tuple[str | None, list[Turn]]:
    """``(system prompt, turns)``: system / developer messages first (joined), then user and assistant
    turns, the last one from the user."""
    if not isinstance(messages, list) or not messages:
        raise malformed("'messages' must be a non-empty list", "messages")
    system, turns, budget = [], [], [limits.max_images]
    for msg in messages:
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            if role in ("tool", "function"):
                raise bad(f"{role} messages are not supported", "messages")
            raise malformed("each message needs a role: system, developer, user or assistant", "messages")
        if msg.get("tool_calls"):
            raise bad("tool calls are not supported", "messages")
        text, images = _parts(msg.get("content") or "", role, limits, budget)
        if role in ("system", "developer"):
            if turns:
                raise bad("system messages must come before the conversation", "messages")
            system.append(text)
        else:
            turns.append(Turn(role, text, images))
    if not turns or turns[-1].role != "user":
        raise bad("the last message must be from the user", "messages")
    return "\n".join(system) if system else None, turns


def build_request(system: str | None, turns: list[Turn], config: ServeConfig) -> Request:
    """Turns -> one :class:`Request`: the last user turn is the request, earlier turns its history."""
    bounds = {"min_pixels": config.min_pixels, "max_pixels": config.max_pixels}
    history = [user_message(t.text, t.images, **bounds)[0] if t.role == "user"
               else {"role": "assistant", "content": t.text} for t in turns[:-1]]
    last = turns[-1]
    return Request(last.images, last.text, system_prompt=system, history=history, max_tiles=config.max_tiles,
                   **bounds)


def count_prompt_tokens(processor, model, request: Request) -> int:
    """The request's prompt tokens, images included, from the inputs generation builds for it."""
    try:
        prepared = prepare_requests(model, processor, [request])
    except (ValueError, TypeError) as e:  # e.g. an image too small or too elongated for the processor
        raise bad(f"the model's processor refused the request: {e}", "messages") from None
    return int(prepared.inputs["input_ids"].shape[1])


def context_length(model) -> int:
    return int(getattr(model.config.get_text_config(), "max_position_embeddings", 32768))


# -- the whole request ----------------------------------------------------------------------------------

def parse_chat(body: Any, config: ServeConfig, model, count_tokens: Callable[[Request], int]) -> ChatJob:
    """A chat-completions body -> :class:`ChatJob`, or :class:`APIError` (4xx) naming what is wrong;
    ``count_tokens`` counts a request's prompt tokens (see :func:`count_prompt_tokens`)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model_id = _get(body, "model", (str,), "a string")
    if model_id is None:
        raise malformed("'model' is required", "model")
    if model_id != config.model_name:
        raise APIError(404, f"model {model_id!r} is not served here; this server serves {config.model_name!r}",
                       param="model", code="model_not_found")
    _refuse_unsupported(body)
    limits = config.limits
    n = _get(body, "n", (int,), "an integer", 1)
    if not 1 <= n <= config.max_batch_size:
        raise bad(f"'n' must be in [1, {config.max_batch_size}], got {n}", "n")
    sampling, seed = _sampling(body)
    stream = _get(body, "stream", (bool,), "a boolean", False)
    options = _get(body, "stream_options", (dict,), "an object", {})
    max_tokens, stop = _max_tokens(body, limits), _stop(body)
    spec = parse_pruning(body.get("pruning"), config.method)
    check_method(spec, model)
    request = build_request(*parse_messages(body.get("messages"), limits), config)
    prompt_tokens = count_tokens(request)
    cap = limits.max_prompt_tokens or context_length(model)
    if prompt_tokens > cap:
        raise bad(f"the prompt has {prompt_tokens} tokens (images included), above this server's limit of {cap}",
                  "messages", code="context_length_exceeded")
    return ChatJob(request=request, method=spec, max_tokens=max_tokens, n=n, sampling=sampling, seed=seed, stop=stop,
                   stream=stream, include_usage=bool(options.get("include_usage")), prompt_tokens=prompt_tokens)


# -- answers --------------------------------------------------------------------------------------------

def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop string (not included), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def visual_runs(prompt_ids, token_id: int | None) -> list[int]:
    """Lengths of the runs of ``token_id`` in a prompt: the visual tokens of each image, unpruned."""
    runs, run = [], 0
    for t in [*prompt_ids.tolist(), None]:
        if token_id is not None and t == token_id:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    return runs


def pruning_summary(spec: MethodSpec, report, prompt_ids, image_token_id: int | None) -> dict[str, Any]:
    """The response's ``pruning`` field: the method asked for, and per image the visual tokens in / kept."""
    out: dict[str, Any] = {"method": spec.name, "knobs": dict(spec.knobs)}
    if report is None:
        images = [{"visual_tokens": n, "visual_kept": n} for n in visual_runs(prompt_ids, image_token_id)]
    else:
        out.update(layer=report.layer, budget=report.config.get("budget"), reason=report.reason)
        images = [{"visual_tokens": s.length, "visual_kept": s.kept} for s in report.spans if s.kind == "image"]
    out.update(visual_tokens=sum(i["visual_tokens"] for i in images),
               visual_kept=sum(i["visual_kept"] for i in images), images=images)
    return out


class StreamText:
    """The text of one streamed choice, piece by piece: each token's piece is what can be sent for sure
    (no partial character, nothing that may turn out to start a stop string); :meth:`rest` completes it to
    the final text, so the pieces always add up to the non-streamed answer."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()):
        self.decode, self.stops = decode, stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # a stop string minus its last character
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text, self.stopped = cut_at_stop(self.decode(self.tokens), self.stops)
        end = len(text) if self.stopped else len(text.rstrip("\ufffd")) - self.hold
        piece = text[len(self.sent):end] if text.startswith(self.sent) else ""
        self.sent += piece
        return piece

    def rest(self, final: str) -> str:
        if not final.startswith(self.sent):  # cannot happen with prefix-stable decoding; never resend text
            return ""
        return final[len(self.sent):]


def completion_body(result, *, ident: str, created: int, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object, with ``pruning`` beside ``usage``."""
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                "finish_reason": c.finish_reason} for i, c in enumerate(result.choices)]
    return {"id": ident, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(result), "pruning": result.pruning}


def usage(result) -> dict[str, int]:
    completion = sum(len(c.tokens) for c in result.choices)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def chunk(choices: list[dict[str, Any]], *, ident: str, created: int, model: str, **extra: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object."""
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **extra}


def delta(index: int, content: str | None = None, *, role: str | None = None,
          finish_reason: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if role is not None:
        d["role"] = role
    if content is not None:
        d["content"] = content
    return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish_reason}
