"""``ivcprune serve``: an OpenAI-compatible chat-completions server over the one generation path, with
per-request pruning and micro-batching (``pip install 'ivcprune[serve]'``).

    from ivcprune.serve import ServeConfig, ServerThread
    with ServerThread(model, processor, ServeConfig(model_name="toy")) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="-").chat.completions.create(...)

The web framework is imported only when a server starts, so the core install never needs it.
"""

from __future__ import annotations

from .config import Limits, MethodSpec, ServeConfig
from .options import add_arguments, config_from_args

EXTRA_HINT = "the server needs its extra packages: pip install 'ivcprune[serve]'"


def check_installed() -> None:
    """ImportError with the install hint when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError(EXTRA_HINT) from None


def __getattr__(name: str):
    # the runner imports uvicorn: loaded on first use, never by `import ivcprune.serve`
    if name in ("ServerThread", "run_server"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)


__all__ = ["Limits", "MethodSpec", "ServeConfig", "ServerThread", "add_arguments", "check_installed",
           "config_from_args", "run_server", "EXTRA_HINT"]
