"""``ivcprune serve``'s own flags (the model and pruning flags are the CLI's shared ones) -> :class:`ServeConfig`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .config import Limits, MethodSpec, ServeConfig

_DEFAULT = Limits()


def _positive(kind, *, zero: bool = False):
    def parse(text: str):
        value = kind(text)
        if value < 0 or value == 0 and not zero:
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'above 0'}, got {text}")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("IVCPRUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $IVCPRUNE_API_KEY; none: no key)")
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model as given)")
    g.add_argument("--max-batch-size", type=_positive(int), default=8, help="rows generated together (default 8)")
    g.add_argument("--batch-wait-ms", type=_positive(float, zero=True), default=5.0,
                   help="how long a request waits for others to share its batch (default 5)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--min-pixels", type=_positive(int), default=None,
                   help="Qwen-VL image resize bounds (default: the model's)")
    g.add_argument("--max-pixels", type=_positive(int), default=None)
    g.add_argument("--max-tiles", type=_positive(int), default=None,
                   help="InternVL: tiles per image at most (default: the processor's max_patches)")
    lim = p.add_argument_group("limits (a request beyond them gets a 4xx)")
    lim.add_argument("--max-tokens", type=_positive(int), default=_DEFAULT.max_tokens,
                     help=f"largest max_tokens a request may ask for, and the default (default {_DEFAULT.max_tokens})")
    lim.add_argument("--max-prompt-tokens", type=_positive(int), default=None,
                     help="prompt tokens, images included (default: the model's context length)")
    lim.add_argument("--max-image-pixels", type=_positive(int), default=_DEFAULT.max_image_pixels,
                     help=f"width x height of one image (default {_DEFAULT.max_image_pixels})")
    lim.add_argument("--max-images", type=_positive(int), default=_DEFAULT.max_images,
                     help=f"images per request (default {_DEFAULT.max_images})")
    lim.add_argument("--max-request-bytes", type=_positive(int), default=_DEFAULT.max_request_bytes,
                     help=f"request body size (default {_DEFAULT.max_request_bytes})")
    lim.add_argument("--max-queue", type=_positive(int), default=_DEFAULT.max_queue,
                     help=f"requests waiting for the model; more get 429 (default {_DEFAULT.max_queue})")
    lim.add_argument("--timeout", type=_positive(float), default=_DEFAULT.timeout_s,
                     help=f"seconds per request, arrival to last token; then 504 (default {_DEFAULT.timeout_s:g})")
    lim.add_argument("--allow-local-images", metavar="DIR", default=None,
                     help="accept image paths / file:// URLs under DIR (default: data URLs only)")


def config_from_args(args: argparse.Namespace, *, model_name: str, method: str, knobs: dict[str, Any]) -> ServeConfig:
    folder = args.allow_local_images
    if folder is not None and not Path(folder).is_dir():
        raise ValueError(f"--allow-local-images {folder}: no such folder")
    limits = Limits(max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                    max_request_bytes=args.max_request_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, max_queue=args.max_queue, timeout_s=args.timeout,
                    local_image_dir=Path(folder) if folder else None)
    return ServeConfig(model_name=args.served_model_name or model_name, method=MethodSpec.of(method, knobs),
                       limits=limits, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                       api_key=args.api_key or None, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                       max_tiles=args.max_tiles)
