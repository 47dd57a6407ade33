"""The server's settings: limits, batching and the default pruning method (plain data, no web framework)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..methods import make_method


@dataclass(frozen=True)
class MethodSpec:
    """A pruning configuration by name and knobs (hashable: requests that share one share a batch)."""

    name: str = "none"
    knobs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, knobs: dict[str, Any] | None = None) -> MethodSpec:
        given = {k: v for k, v in (knobs or {}).items() if v is not None}
        return cls(name, tuple(sorted(given.items())))

    def build(self):
        """A fresh method object (``None`` for ``none``): one per batch, so per-thread reports never mix."""
        return make_method(self.name, **dict(self.knobs))


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is answered with a 4xx before it reaches the model."""

    max_image_pixels: int = 4096 * 4096  # decoded image (width x height), checked from the header first
    max_images: int = 8  # over all turns of a request
    max_request_bytes: int = 20 * 2**20  # the JSON body, base64 images included
    max_prompt_tokens: int | None = None  # images included; None: the model's context length
    max_tokens: int = 512  # the largest max_tokens a request may ask for (and the default)
    max_queue: int = 64  # requests waiting for the model; more get 429
    timeout_s: float = 120.0  # per request, from arrival to its last token
    local_image_dir: Path | None = None  # file paths / file:// URLs allowed only under this folder


@dataclass(frozen=True)
class ServeConfig:
    model_name: str  # the id clients send as `model`
    method: MethodSpec = field(default_factory=MethodSpec)  # used when a request names no pruning
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 8  # rows (requests x n) generated together
    batch_wait_ms: float = 5.0  # how long the oldest waiting request waits for others to join its batch
    api_key: str | None = None
    min_pixels: int | None = None  # Qwen-VL image resize bounds (None: the model's defaults)
    max_pixels: int | None = None
    max_tiles: int | None = None  # InternVL: tiles per image at most (None: the processor's limit)
