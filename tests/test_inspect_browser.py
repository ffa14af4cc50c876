"""The inspect report and the playground's probability view in a real browser (headless Chromium,
as in test_serve_browser.py, whose ``browser`` fixture this uses): the report loads, picking a unit
recolours the text, hovering shows the top predictions. Screenshots go to ``$TEXTRNN_ARTIFACTS``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from serve_helpers import make_run, running, wait_for
from test_serve_browser import browser  # noqa: F401 - the fixture

pytestmark = pytest.mark.browser


def _artifacts(tmp_path: Path) -> Path:
    artifacts = Path(os.environ.get("TEXTRNN_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    return artifacts


def _hover(browser, element) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(element).perform()


def test_inspect_report_recolours_by_unit_and_shows_predictions(browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    from conftest import invoke

    run_dir = make_run(tmp_path)
    (tmp_path / "sample.txt").write_text("to be or not to be, (that) is the question.\n" * 12)
    assert invoke("inspect", run_dir, tmp_path / "sample.txt", "--out", tmp_path / "r.html").code == 0
    browser.get((tmp_path / "r.html").as_uri())
    assert wait_for(lambda: browser.execute_script("return document.body.dataset.ready") == "1", timeout=10)
    spans = browser.find_elements(By.CSS_SELECTOR, "#text span")
    assert len(spans) == len((tmp_path / "sample.txt").read_text())
    before = [s.value_of_css_property("background-color") for s in spans[:60]]
    _hover(browser, spans[7])
    tip = browser.find_element(By.ID, "tip")
    assert wait_for(lambda: tip.is_displayed(), timeout=5)
    assert "the model expected" in tip.text and "%" in tip.text and "bits" in tip.text
    browser.save_screenshot(str(_artifacts(tmp_path) / "inspect-surprisal.png"))
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    assert {c.get_attribute("data-feature") for c in cards} >= {"position in line", "word start"}
    button = cards[0].find_element(By.TAG_NAME, "button")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)  # clear of the sticky header
    button.click()
    assert browser.execute_script("return document.body.dataset.colouredBy").startswith("unit ")
    after = [s.value_of_css_property("background-color") for s in spans[:60]]
    assert after != before and len(set(after)) > 5  # coloured by the unit now, not by surprisal
    browser.save_screenshot(str(_artifacts(tmp_path) / "inspect-unit.png"))


def test_playground_colours_tokens_by_probability(browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    from textrnn.sampling import Sampler
    from textrnn.serving.app import create_app

    app = create_app({"tiny": Sampler.from_checkpoint(make_run(tmp_path), "cpu")}, chunk_seconds=0.01)
    with running(app) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "probabilities").click()
        browser.find_element(By.ID, "generate").click()
        status = browser.find_element(By.ID, "status")
        assert wait_for(lambda: "characters in" in status.text, timeout=20), status.text
        spans = browser.find_elements(By.CSS_SELECTOR, "#text span")
        assert len(spans) == 500 and len({s.value_of_css_property("background-color") for s in spans}) > 5
        _hover(browser, spans[3])
        tip = browser.find_element(By.ID, "tip")
        assert wait_for(lambda: tip.is_displayed(), timeout=5)
        assert tip.text.count("%") == 6  # the token's probability and the top 5
        browser.save_screenshot(str(_artifacts(tmp_path) / "playground-probabilities.png"))
