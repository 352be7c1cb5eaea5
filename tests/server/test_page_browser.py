"""The /speak page end to end in headless Chromium: it connects, speaks, receives and schedules
audio, shows the stats, and creates a voice from the (fake) microphone.

Needs Debian's ``chromium`` and the ``playwright`` Python package (its bundled driver only; no
browser download): skipped with the reason when either is missing.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

from tests.server.conftest import serve, wav_bytes
from tests.server.fake_engine import FakeEngine, frames_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.async_api import async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)"),
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed (pip install playwright)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         "--autoplay-policy=no-user-gesture-required"]
TEXT = "The page streams this sentence and plays it as it arrives."


@pytest.mark.timeout(60)
async def test_speak_page_speaks_shows_stats_and_records_a_voice():
    # A first chunk 100 ms out: the server's own TTFA is then well above the page's 50 ms playback lead,
    # so a page figure that missed the server's part (measured from a later instant) falls below it.
    async with serve(FakeEngine(chunk_delay=0.1), voices={"anna": wav_bytes(1.0)}, default_voice="anna",
                     noise_model=True, model_name="random:tiny") as client:
        url = f"http://127.0.0.1:{client.port}/speak"
        with tempfile.TemporaryDirectory() as profile:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch_persistent_context(
                    profile, executable_path=CHROMIUM, args=FLAGS, headless=True, timeout=30000,
                    bypass_csp=True)  # the page forbids eval; the test harness needs it
                try:
                    page = browser.pages[0] if browser.pages else await browser.new_page()
                    console: list[str] = []
                    page.on("console", lambda m: console.append(m.text))
                    await page.goto(url)
                    await page.wait_for_function("window.makimaPageReady === true", timeout=10000)
                    assert await page.input_value("#voice") == "anna"
                    assert await page.is_visible("#noise")  # random weights: the page says it is noise
                    assert await page.text_content("#model") == "random:tiny"
                    await page.fill("#text", TEXT)
                    await page.click("#speak")
                    await page.wait_for_function("window.makimaStats.completes >= 1", timeout=10000)
                    s = await page.evaluate("window.makimaStats")
                    assert s["errors"] == [], (s, console)
                    assert s["bytes"] == frames_for(TEXT) * 1920 * 4 and s["chunks"] >= 3
                    assert s["last"]["frames"] == frames_for(TEXT)
                    assert abs(s["scheduledS"] - frames_for(TEXT) * 0.08) < 1e-6  # every chunk went to Web Audio
                    assert (await page.text_content("#ttfa")) == f"{round(s['ttfaMs'])} ms"
                    assert_ttfa_counts_what_the_server_counts(s)
                    assert "speakers" in await page.text_content("#ttfa-means")  # the page says what it measures
                    assert (await page.text_content("#server-ttfa")).endswith(" ms")
                    assert float(await page.text_content("#rtf")) > 0
                    assert (await page.text_content("#audio")).endswith(" s")

                    # A voice from the fake microphone (a beep), embedding-only: no transcript needed.
                    await page.click("#record")
                    await page.wait_for_timeout(1200)
                    await page.click("#record")
                    await page.fill("#voice-name", "Mic Test")
                    await page.check("#xvec")
                    await page.click("#create")
                    await page.wait_for_function("document.getElementById('voice').value === 'mic-test'",
                                                 timeout=10000)
                    await page.click("#speak")
                    await page.wait_for_function("window.makimaStats.completes >= 2", timeout=10000)
                    s = await page.evaluate("window.makimaStats")
                    assert s["errors"] == [] and s["last"]["frames"] == frames_for(TEXT), console
                    assert_ttfa_counts_what_the_server_counts(s)
                finally:
                    await browser.close()


def assert_ttfa_counts_what_the_server_counts(s: dict) -> None:
    """The page's figure runs from sending the text to hearing it; the server's from the text's arrival to
    its audio leaving: the server's interval lies inside the page's, so the page's figure is never lower,
    and hearing comes after arriving."""
    assert s["ttfaMs"] >= s["last"]["ttfa_ms"], s
    assert s["ttfaMs"] > s["arrivalMs"] >= 0, s  # scheduled ahead of now: heard after it arrived


@pytest.mark.timeout(60)
async def test_speak_page_lists_a_custom_voice_models_speakers():
    from engine.api import ModelInfo

    class CustomVoice(FakeEngine):
        model_info = ModelInfo(model_type="custom_voice", model_size="fake", speakers=["eric", "ryan"],
                               takes_instructions=True, clones_voices=False)

    async with serve(CustomVoice(), default_voice="ryan") as client:
        with tempfile.TemporaryDirectory() as profile:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch_persistent_context(
                    profile, executable_path=CHROMIUM, args=FLAGS, headless=True, timeout=30000, bypass_csp=True)
                try:
                    page = browser.pages[0] if browser.pages else await browser.new_page()
                    await page.goto(f"http://127.0.0.1:{client.port}/speak")
                    await page.wait_for_function("window.makimaPageReady === true", timeout=10000)
                    options = await page.eval_on_selector_all("#voice option", "els => els.map(e => e.value)")
                    assert options == ["eric", "ryan"] and await page.input_value("#voice") == "ryan"
                finally:
                    await browser.close()
