"""Helpers for the server and browser tests: a tiny run, an app served by uvicorn on a thread
(loopback only), and headless Chromium."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LINES = ["to be or not to be, that is the question.", "a rose by any other name would smell as sweet.",
         "all the world is a stage.", "the lady doth protest too much, methinks."]


def make_run(root: Path, tokenizer: str = "char") -> Path:
    """A tiny run (1x32 LSTM, 20 steps; a char model by default) under ``root/runs/tiny``."""
    from textrnn.config import ModelConfig, TrainConfig
    from textrnn.training import train

    (root / "corpus.txt").write_text("".join(f"{LINES[(n * 7) % 4]} {n % 10}\n" for n in range(300)),
                                     encoding="utf-8")
    result = train([root / "corpus.txt"], root / "runs" / "tiny",
                   ModelConfig(cell="lstm", num_layers=1, hidden_size=32, embedding_dim=16),
                   TrainConfig(max_steps=20, batch_size=8, seq_len=32, eval_every=20, lr=1e-2, warmup_steps=2,
                               device="cpu"), tokenizer=tokenizer)
    return result.run_dir


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) on a thread; yields its base URL, stops it after."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.state.close()
        server.should_exit = True
        thread.join(15)
        sock.close()


def wait_for(condition, timeout: float = 10.0, every: float = 0.02) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(every)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def chromium(window: str = "1100,760", offline: bool = False):
    """Headless Chromium driven by selenium; skips the test where Chromium, its driver or selenium
    is missing. ``offline``: every host but 127.0.0.1 fails to resolve and nothing goes out by
    address either (a dead proxy), so a page can load only from the local server."""
    import pytest

    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={window}", "--force-color-profile=srgb", "--no-first-run"):
        options.add_argument(flag)
    if offline:
        options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
        options.add_argument("--proxy-server=http://127.0.0.1:9")
        options.add_argument("--proxy-bypass-list=127.0.0.1")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(60)
    return driver
