"""The web export in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
opens the exported folder from a local static server, with every other host unreachable, types a
prompt, presses Generate, sees the text grow, presses Stop; and textrnn.js's greedy text in the
page is ``textrnn generate --temperature 0``'s, for an LSTM and a GRU. Screenshots go to
``$TEXTRNN_ARTIFACTS`` (default: the test's tmp dir).

Skipped, with the reason, only where Chromium, its driver, selenium or the onnxruntime-web files
are missing; ``.ci/run`` installs Chromium and ``make test`` fetches the runtime, so CI runs it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import invoke
from serve_helpers import CHROMEDRIVER, CHROMIUM, chromium, wait_for
from test_web import exports  # noqa: F401 (the trained runs and their exports, made once)

from textrnn.web import static_server

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.browser

def page_ready(browser) -> bool:
    """Wait until the page has loaded its model (True) or said it could not (False)."""
    state = "return document.body.dataset.ready || (document.getElementById('about').className === 'error' && 'no')"
    return wait_for(lambda: browser.execute_script(state), timeout=30) and \
        browser.execute_script("return document.body.dataset.ready") == "true"


@pytest.fixture(scope="session")
def web_exports(exports):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    return exports


@pytest.fixture(scope="module")
def browser():
    driver = chromium("1000,720", offline=True)
    try:
        yield driver
    finally:
        driver.quit()


GREEDY = """
const done = arguments[arguments.length - 1];
import("./textrnn.js").then(async ({ TextRNN }) => {
  const model = await TextRNN.load("./");
  done({ text: await model.generate({ prompt: arguments[0], length: 500, temperature: 0 }) });
}).catch((error) => done({ error: String(error.message || error) }));
"""


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_greedy_text_in_chromium_is_the_text_of_textrnn_generate(web_exports, browser, cell):
    run, out = web_exports[cell]
    prompt = "the dog "
    python = invoke("generate", "--checkpoint", run, "--prompt", prompt, "--length", "500", "--temperature", "0")
    assert python.code == 0, python.stderr
    with static_server(out) as url:
        browser.get(url + "/index.html")
        assert page_ready(browser), browser.find_element("id", "about").text
        answer = browser.execute_async_script(GREEDY, prompt)
    assert "error" not in answer, answer
    assert answer["text"] == python.stdout[len(prompt):].rstrip("\n")


def test_the_page_generates_streams_and_stops_offline(web_exports, browser):
    from selenium.webdriver.common.by import By

    _, out = web_exports["lstm"]
    artifacts = Path(os.environ.get("TEXTRNN_ARTIFACTS", out.parent))
    artifacts.mkdir(parents=True, exist_ok=True)
    with static_server(out) as url:
        browser.get(url + "/")
        assert page_ready(browser), browser.find_element(By.ID, "about").text
        assert "LSTM 2x48" in browser.find_element(By.ID, "about").text
        # a long sample, so that it is seen growing and is still running when Stop is pressed
        browser.execute_script("const l = document.getElementById('length'); l.max = 1000000; l.value = 1000000;"
                               "l.dispatchEvent(new Event('input'));")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("the cat ")
        browser.find_element(By.ID, "generate").click()
        output = browser.find_element(By.ID, "output")
        assert wait_for(lambda: len(output.text) > len("the cat ") + 5, timeout=20)
        sizes = []
        for _ in range(50):  # bounded: the text must grow between looks
            sizes.append(len(output.text))
            if len(set(sizes)) >= 3:
                break
            time.sleep(0.1)
        assert len(set(sizes)) >= 3 and sizes == sorted(sizes), sizes
        assert output.text.startswith("the cat ")
        assert "chars/s" in browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(artifacts / "web-generating.png"))
        browser.find_element(By.ID, "stop").click()
        assert wait_for(lambda: browser.find_element(By.ID, "stop").get_attribute("disabled"), timeout=10)
        stopped = len(output.text)
        time.sleep(0.5)
        assert len(output.text) == stopped  # it stopped
        assert not browser.find_element(By.ID, "generate").get_attribute("disabled")
        origin = browser.execute_script("return location.origin")
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(name.endswith(".wasm") for name in loaded), loaded
    assert all(name.startswith(origin + "/") for name in loaded), loaded


def test_a_cdn_export_offline_says_it_cannot_load(web_exports, browser, tmp_path):
    run, _ = web_exports["gru"]
    out = tmp_path / "cdn"
    assert invoke("export", run, "--format", "web", "--runtime", "cdn", "--out", out).code == 0
    with static_server(out) as url:
        browser.get(url + "/")
        about = browser.find_element("id", "about")
        assert wait_for(lambda: "could not load" in about.text, timeout=30), about.text
