"""``textrnn serve``: trained runs behind an OpenAI-compatible HTTP API, with a playground page.

``app.py`` holds the FastAPI app and its request checks, ``batcher.py`` the dynamic batcher (one
sampling loop per model), ``static/`` the playground. This module loads the runs and runs uvicorn.
Needs the ``serve`` extra: ``pip install 'textrnn[serve]'``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ConfigError

__all__ = ["serve", "load_samplers", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` listens on this machine only (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_samplers(run_dirs: Sequence[str | os.PathLike], device: str = "auto", precision: str = "auto") -> dict:
    """A ``Sampler`` per run directory, named by the directory's name (names must differ)."""
    from ..sampling import Sampler

    samplers = {}
    for run_dir in run_dirs:
        name = Path(run_dir).resolve().name
        if name in samplers:
            raise ConfigError(f"{run_dir}: two served runs are both named {name!r}; rename one directory")
        samplers[name] = Sampler.from_checkpoint(run_dir, device, precision)
    if not samplers:
        raise ConfigError("give at least one run directory to serve")
    return samplers


def serve(run_dirs: Sequence[str | os.PathLike], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, limits=None, device: str = "auto", chunk_seconds: float = 0.02,
          threads: int | None = 1, log: Callable[[str], None] = lambda message: None) -> int | None:
    """Serve the runs until Ctrl-C or SIGTERM; streams in flight then end with an error event.

    ``threads`` is torch's thread count for sampling (None: torch's default). One is the default:
    batches of a few dozen streams gain little from a second thread, whose spinning takes the core
    that HTTP needs (32 clients on 2 cores: 1.8x the chars/s of 2 threads, BENCHMARKS.md).
    Returns the signal that stopped the server (None if it stopped by itself).
    """
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise ConfigError(f"textrnn serve needs the serve extra: pip install 'textrnn[serve]' ({exc})") from None
    samplers = load_samplers(run_dirs, device)
    app = create_app(samplers, limits, api_key, chunk_seconds, threads)
    if not is_loopback(host):
        log(f"warning: listening on {host}, beyond this machine"
            + ("" if api_key else "; anyone who can reach it can use it (set --api-key)"))

    class Server(uvicorn.Server):
        stopped_by: int | None = None

        def handle_exit(self, sig, frame) -> None:  # end the streams first, so that connections can close
            self.stopped_by = sig
            app.state.close()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn's, without raising the signal again at the end: the caller decides the exit code."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            access_log=False)
    log(f"serving {', '.join(samplers)} on http://{host}:{port}/ (playground /, API /v1, docs /docs)")
    server = Server(config)
    server.run()
    return server.stopped_by
