"""The playground in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
driven by selenium loads the page, types a prompt, presses Generate, sees the text grow as it
streams, and presses Stop. Screenshots go to ``$TEXTRNN_ARTIFACTS`` (default: the test's tmp dir).

Skipped, with the reason, only where Chromium, its driver or selenium is missing; ``.ci/run``
installs them so that CI runs it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from serve_helpers import chromium, make_run, running, wait_for

pytestmark = pytest.mark.browser

@pytest.fixture
def browser():
    pytest.importorskip("fastapi")
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_streams_text_and_stops(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from textrnn.sampling import Sampler
    from textrnn.serving.app import Limits, create_app

    run_dir = make_run(tmp_path)
    app = create_app({"tiny": Sampler.from_checkpoint(run_dir, "cpu")}, Limits(max_tokens=100_000),
                     chunk_seconds=0.05)
    artifacts = Path(os.environ.get("TEXTRNN_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    with running(app) as url:
        browser.get(url + "/")
        assert "textrnn" in browser.title
        assert wait_for(lambda: Select(browser.find_element(By.ID, "model")).options, timeout=10)
        assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "tiny"
        # slow the page's stream down so that it is seen growing: a long length and the key-press path
        browser.execute_script("document.getElementById('length').max = 100000;"
                               "document.getElementById('length').value = 100000;"
                               "document.getElementById('length').dispatchEvent(new Event('input'));")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("to be or not")
        browser.find_element(By.ID, "generate").click()
        text = browser.find_element(By.ID, "text")
        assert wait_for(lambda: len(text.text) > 0, timeout=10)
        sizes = []
        for _ in range(40):  # bounded: the text must grow between looks
            sizes.append(len(text.text))
            if len(set(sizes)) >= 3:
                break
            time.sleep(0.1)
        assert len(set(sizes)) >= 3 and sizes == sorted(sizes), sizes
        assert browser.find_element(By.ID, "echo").text == "to be or not"
        assert not browser.find_element(By.ID, "stop").get_attribute("disabled")
        browser.save_screenshot(str(artifacts / "playground-streaming.png"))
        browser.find_element(By.ID, "stop").click()
        status = browser.find_element(By.ID, "status")
        assert wait_for(lambda: status.text.startswith("stopped after"), timeout=10), status.text
        stopped_at = len(text.text)
        time.sleep(0.3)
        assert len(text.text) == stopped_at  # nothing more arrives after Stop
        assert browser.find_element(By.ID, "generate").is_enabled()
        browser.save_screenshot(str(artifacts / "playground-stopped.png"))
        health = app.state.slots
        assert wait_for(lambda: health.used == 0, timeout=10)  # the server freed the stream
