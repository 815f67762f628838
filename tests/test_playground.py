"""The playground page at `/`: its static files and headers, then the page itself in a real headless
Chromium (Selenium, the system browser and driver) against the service on loopback: generate an adapter,
compare two inputs side by side, route, search and delete in the library, a 422 shown as a message.

`HYPERLORA_PLAYGROUND_URL=http://127.0.0.1:8000` runs the browser tests against a running service (e.g.
`make serve`) instead of the tiny one, and then writes the README's screenshot, `results/playground.png`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from serve_fixtures import TASKS, free_port, running_service, tiny_service

API_KEY = "playground-key-42"
INSTALL = ("install the browser with `apt-get install -y chromium chromium-driver` (Debian) and Selenium with "
           "`pip install -e '.[dev]'`; `.ci/run` does both")
RESULTS = Path(__file__).resolve().parents[1] / "results"
EXTERNAL_URL = os.environ.get("HYPERLORA_PLAYGROUND_URL")
RECORD_FETCHES = """window.sent = []; const f = window.fetch;
window.fetch = (path, init) => { window.sent.push([path, init && init.body]); return f(path, init); };"""


# ---- the static files, without a browser ------------------------------------------------------------


@pytest.fixture(scope="module")
def static_client():
    from serve import playground

    app = FastAPI()
    playground.add_routes(app)
    with TestClient(app) as c:
        yield c


def test_page_and_assets_are_served_with_a_strict_csp(static_client):
    page = static_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    html = page.text
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handlers break the CSP"
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline scripts break the CSP"
    assert "style=" not in html and "http://" not in html and "https://" not in html  # nothing fetched elsewhere
    for asset, ctype in (("playground.js", "javascript"), ("api.js", "javascript"), ("playground.css", "css")):
        r = static_client.get(f"/static/{asset}")
        assert r.status_code == 200 and ctype in r.headers["content-type"], asset
        assert f"/static/{asset}" in html or asset == "api.js"
    assert static_client.get("/static/missing.js").status_code == 404


# ---- the page in Chromium ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver():
    """A headless Chromium through the system chromedriver; skipped, saying how to install, when absent."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"Selenium is not installed: {INSTALL}")
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    chromedriver = shutil.which("chromedriver")
    if browser is None or chromedriver is None:
        pytest.skip(f"no Chromium or chromedriver on PATH: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, to catch CSP violations
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    d = webdriver.Chrome(options=options, service=Service(chromedriver))
    yield d
    d.quit()


@pytest.fixture(scope="module")
def service(tmp_path_factory, driver):
    """(base url, API key or None): a running service, or the tiny one started here for this module."""
    if EXTERNAL_URL:
        yield EXTERNAL_URL.rstrip("/"), None
        return
    pytest.importorskip("ray")
    port = free_port()
    cfg, _ = tiny_service(tmp_path_factory.mktemp("playground"), port)
    with running_service(cfg, port, API_KEY) as url:
        yield url, API_KEY


def _wait(driver, cond, timeout=180):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: cond(d))


def _open(driver, url: str, width: int = 1280, height: int = 800) -> None:
    """Load the page with a viewport of width x height (the window's own frame added)."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])
    driver.get(url + "/")
    _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")


def _css(driver, selector):
    return driver.find_element("css selector", selector)


def _type(driver, selector: str, text: str) -> None:
    field = _css(driver, selector)
    field.clear()
    if text:
        field.send_keys(text)


def _visible_text(driver, selector: str) -> str:
    el = _css(driver, selector)
    return el.text if el.is_displayed() else ""


def _save_page(driver, path: Path) -> None:
    """A PNG of the whole page at the current width (Chromium's DevTools screenshot beyond the viewport)."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))


def _screenshot_dir(tmp_path: Path) -> Path:
    """results/ for a real service (the README's screenshot); the test's own directory for the tiny one."""
    return RESULTS if EXTERNAL_URL else tmp_path


def test_generate_then_compare_base_and_adapted(driver, service, tmp_path):
    url, _ = service
    _open(driver, url)
    assert "base model" in _css(driver, "#service-status").text
    generators = [o.get_attribute("value") for o in driver.find_elements("css selector", "#generator option")]
    assert "t2l" in generators
    strategies = [o.get_attribute("value") for o in driver.find_elements("css selector", "#strategy option")]
    assert _css(driver, "#strategy-field").is_displayed() == _has_strategy(url) == bool(strategies)

    # an empty description: the API's 422, shown as a readable message, and no result
    _type(driver, "#description", "")
    _css(driver, "#generate-btn").click()
    error = _wait(driver, lambda d: _visible_text(d, "#generate-error"))
    assert error.startswith("422") and "description" in error
    assert not _css(driver, "#generate-result").is_displayed()

    description = "Classify the sentiment of a product review as positive or negative."
    _type(driver, "#description", description)
    _css(driver, "#generate-btn").click()
    result = _wait(driver, lambda d: _visible_text(d, "#generate-result"))
    assert not _css(driver, "#generate-error").is_displayed()
    assert re.search(r"Adapter\s+\S+", result) and re.search(r"\d+ ms round trip", result) and "Path" in result
    assert "Adapter:" in _css(driver, "#compare-adapter").text

    inputs = ["I loved this phone, the battery lasts for days.", "It broke after a week and nobody answered my emails."]
    _type(driver, "#inputs", "\n".join(inputs))
    _css(driver, "#max-tokens").clear()
    _css(driver, "#max-tokens").send_keys("24")
    driver.execute_script(RECORD_FETCHES)
    _css(driver, "#compare-btn").click()
    cells = _wait(driver, lambda d: (cs := d.find_elements("css selector", "#compare-rows .answer"))
                  and all(c.get_attribute("data-state") in ("done", "error") for c in cs) and cs)
    sent = [json.loads(body) for path, body in driver.execute_script("return window.sent") if
            path == "/v1/chat/completions"]
    adapter_id = re.search(r"Adapter\s+(\S+)", result).group(1)
    assert sorted((b["model"], b["messages"][0]["content"]) for b in sent) == sorted(
        (model, f"{description}\n\n{x}") for x in inputs for model in (_base_model(url), adapter_id))
    assert all(b["stream"] is True and len(b["messages"]) == 1 for b in sent)  # same user turn for both
    rows = driver.find_elements("css selector", "#compare-rows .pair")
    assert [r.find_element("css selector", ".input").text for r in rows] == inputs
    assert len(cells) == 4
    for cell in cells:
        assert cell.get_attribute("data-state") == "done", cell.text
        assert int(cell.get_attribute("data-chars") or 0) > 0  # streamed text arrived
        assert cell.find_element("css selector", ".text").text.strip()
    labels = [c.find_element("css selector", ".label").text.lower() for c in cells]
    assert labels[0].startswith("base") and labels[1] == "adapted"

    _type(driver, "#route-input", inputs[0])  # the router's view of the same input, for the screenshot
    _css(driver, "#route-btn").click()
    _wait(driver, lambda d: d.find_elements("css selector", "#route-result li, #route-result .note"))
    assert not _css(driver, "#route-error").is_displayed()
    _save_page(driver, _screenshot_dir(tmp_path) / "playground.png")
    console = [e["message"] for e in driver.get_log("browser")]
    assert not [m for m in console if "Content Security Policy" in m or "Uncaught" in m], console


def test_route_search_and_delete(driver, service, tmp_path):
    url, key = service
    body = {"description": "Reply like a pirate would, arr.", "save": True}  # saved: the library lists it
    body |= {"strategy": "generate"} if _has_strategy(url) else {}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    made = httpx.post(f"{url}/v1/adapters", json=body, headers=headers, timeout=60).json()["adapters"][0]
    _open(driver, url)

    sample = TASKS["french"][1][0]
    _type(driver, "#route-input", sample)
    _css(driver, "#route-btn").click()
    routed = _wait(driver, lambda d: d.find_elements("css selector", "#route-result li")
                   or d.find_elements("css selector", "#route-result .note"))
    if not EXTERNAL_URL:  # the tiny library's French adapter is keyed by this very input
        assert "Translate English sentences into French." in routed[0].text
        assert re.search(r"weight \d\.\d{3} · score \d\.\d{3}", routed[0].text)

    _type(driver, "#library-search", "pirate would")
    items = _wait(driver, lambda d: d.find_elements("css selector", "#library-list li"))
    assert [i.get_attribute("data-id") for i in items] == [made["id"]]
    assert re.match(r"1 of \d+ adapters", _css(driver, "#library-count").text)
    link = items[0].find_element("css selector", "a").get_attribute("href")
    assert link.endswith(f"/v1/adapters/{made['id']}/download")
    assert httpx.get(link, timeout=60).headers["content-type"] == "application/gzip"

    if key:  # a wrong key: the 401 as a message, the adapter still there
        _type(driver, "#api-key", "not-the-key")
        _delete_first(driver)
        assert _wait(driver, lambda d: _visible_text(d, "#library-error")).startswith("401")
        assert httpx.get(f"{url}/v1/adapters/{made['id']}", timeout=30).status_code == 200
    _type(driver, "#api-key", key or "")
    _delete_first(driver)
    _wait(driver, lambda d: not d.find_elements("css selector", "#library-list li"))
    assert not _css(driver, "#library-error").is_displayed()
    assert httpx.get(f"{url}/v1/adapters/{made['id']}", timeout=30).status_code == 404


def _base_model(url: str) -> str:
    return httpx.get(f"{url}/healthz", timeout=30).json()["base_model"]


def _has_strategy(url: str) -> bool:
    body = httpx.get(f"{url}/openapi.json", timeout=30).json()["components"]["schemas"]
    return "strategy" in body.get("GenerateAdaptersRequest", {}).get("properties", {})


def _delete_first(driver) -> None:
    button = _css(driver, "#library-list li button[data-action='delete']")
    button.click()
    assert button.text == "Confirm delete"
    button.click()


def test_phone_width_has_one_column_and_no_sideways_scroll(driver, service, tmp_path):
    from selenium.webdriver.common.keys import Keys

    url, _ = service
    _open(driver, url, width=390, height=844)
    width = driver.execute_script("return window.innerWidth")
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width
    left = {s: _css(driver, s).rect["x"] for s in ("#generate-card", "#route-card", "#library-card")}
    assert len(set(left.values())) == 1, left  # the cards are stacked
    assert _css(driver, "#generate-card").rect["width"] <= width

    first = _wait(driver, lambda d: d.find_elements("css selector", "#library-list li"))[0]
    first.find_element("css selector", "button[data-action='use']").click()  # a library adapter, then compare
    assert first.find_element("css selector", ".desc").get_attribute("title").startswith(
        _css(driver, "#description").get_attribute("value"))
    _type(driver, "#inputs", "Good morning, how are you?")
    _css(driver, "#inputs").send_keys(Keys.CONTROL, Keys.ENTER)  # = Compare
    cells = _wait(driver, lambda d: (cs := d.find_elements("css selector", "#compare-rows .answer"))
                  and all(c.get_attribute("data-state") == "done" for c in cs) and cs)
    assert cells[0].rect["x"] == cells[1].rect["x"] and cells[0].rect["y"] < cells[1].rect["y"]  # stacked too
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width
    driver.execute_script("arguments[0].scrollIntoView()", _css(driver, "#compare-card"))
    assert driver.save_screenshot(str(_screenshot_dir(tmp_path) / "playground-phone.png"))
