"""``textrnn serve``: trained runs behind an OpenAI-compatible HTTP API, with a playground page.

``app.py`` holds the FastAPI app and its request checks, ``batcher.py`` the dynamic batcher (one
sampling loop per model), ``static/`` the playground. This module loads the runs and runs uvicorn.
Needs the ``serve`` extra: ``pip install 'textrnn[serve]'``.
"""

from __future__ import annotations

import ipaddress
import os
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
          api_key: str | None = None, limits=None, device: str = "auto", chunk_seconds: float = 0.05,
          threads: int | None = None, log: Callable[[str], None] = lambda message: None) -> None:
    """Serve the runs until Ctrl-C or SIGTERM; streams in flight then end with an error event."""
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
        def handle_exit(self, sig, frame) -> None:  # end the streams first, so that connections can close
            app.state.close()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            access_log=False)
    log(f"serving {', '.join(samplers)} on http://{host}:{port}/ (playground /, API /v1, docs /docs)")
    Server(config).run()
