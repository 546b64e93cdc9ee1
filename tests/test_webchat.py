"""The chat page at `/` in headless Chromium (Debian's `chromium`, driven by Playwright).

Install once: `apt-get install -y chromium` (Playwright only drives it; it never downloads a browser).
"""
from __future__ import annotations

import shutil

import httpx
import pytest

from barkgpt.params import BARKS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python driver)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def test_chat_page_streams_a_reply(browser, bark_server, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 600})
    streamed = []
    page.on("response", lambda r: streamed.append(r.headers.get("content-type", ""))
            if r.url.endswith("/v1/chat/completions") else None)
    page.goto(bark_server + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'bark-q8_0'", timeout=10000)
    # the input hint is the served model's own (from /v1/models), not the page's default
    hint = httpx.get(bark_server + "/v1/models").json()["data"][0]["input_hint"]
    assert "speak" in hint and page.get_attribute("#input", "placeholder") == hint
    for turn, text in enumerate(["Who is a good dog?", "Speak again!"], start=1):
        page.fill("#input", text)
        page.press("#input", "Enter")
        page.wait_for_selector(f".msg.assistant:nth-of-type({2 * turn})[data-state=done]", timeout=15000)
    replies = page.locator(".msg.assistant").all_inner_texts()
    assert len(replies) == 2
    for reply in replies:
        words = reply.removeprefix("BarkGPT: ").split()
        assert words and all(w in BARKS for w in words), reply
    assert page.locator(".msg.user").all_inner_texts() == ["You: Who is a good dog?", "You: Speak again!"]
    assert streamed and all(t.startswith("text/event-stream") for t in streamed)

    shot = tmp_path / "chat.png"  # kept by pytest under its basetemp, for a person to look at
    page.screenshot(path=str(shot), full_page=True)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size[0] == 900 and img.size[1] >= 600
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20  # not blank: text and borders were drawn
    # the reply text colour (#8a3b00) is on screen: the reply is visible, not just in the DOM
    box = page.locator(".msg.assistant").first.bounding_box()
    crop = img.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"])))
    near = [c for _, c in crop.getcolors(maxcolors=1 << 20) if abs(c[0] - 0x8A) < 40 and abs(c[1] - 0x3B) < 40
            and c[2] < 60]
    assert near, "no reply-coloured pixels where the reply is"
    page.close()


def test_chat_page_shows_server_errors(browser, bark_server):
    page = browser.new_page()
    page.goto(bark_server + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'bark-q8_0'", timeout=10000)
    page.evaluate("model = 'no-such-model'")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error", timeout=10000)
    assert "not served here" in page.locator(".msg.error").inner_text()
    page.close()
