"""Running the app: in the foreground (``ivcprune serve``; SIGINT / SIGTERM stop it gracefully) or on a
background thread (tests, the load test, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from .app import create_app
from .config import ServeConfig


def _uvicorn_config(app, config: ServeConfig, *, host: str, port: int, log_level: str) -> uvicorn.Config:
    # in-flight requests end by their own timeout; a shutdown waits for them a little longer than that
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                          timeout_graceful_shutdown=config.limits.timeout_s + 5)


def run_server(model, processor, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:
    """Serve until interrupted; on SIGINT / SIGTERM the listener closes, requests in flight are answered,
    then the worker stops."""
    app = create_app(model, processor, config)
    uvicorn.Server(_uvicorn_config(app, config, host=host, port=port, log_level=log_level)).run()


class ServerThread:
    """The server on ``host`` and an ephemeral port, on a background thread; ``url`` once started.
    :meth:`stop` shuts it down as a signal would (in-flight requests are answered first)."""

    def __init__(self, model, processor, config: ServeConfig, *, host: str = "127.0.0.1", log_level: str = "warning"):
        self.app = create_app(model, processor, config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(_uvicorn_config(self.app, config, host=host, port=0, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="ivcprune-server")

    @property
    def batcher(self):
        return self.app.state.server.batcher

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float | None = 60.0) -> None:
        """Graceful: stop listening, answer what is in flight, stop the worker; returns when done."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
