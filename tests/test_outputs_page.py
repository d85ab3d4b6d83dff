"""The page's outputs panel (``clients/web/outputs.js``) in headless Chromium: hidden where the server
allows no outputs; where it does, a recording added from the panel goes live, shows its state, stops
from its button and leaves a playable MP4 of the stream. Everything on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import av
import pytest
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings

from ditstream.bench.harness import ServerThread

CHROMIUM = os.environ.get("DITSTREAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
KEY = "outputs-page-key-123"

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):  # scripts/install --test installs it: its absence is a broken install
        pytest.fail(f"no Chromium at {CHROMIUM}", pytrace=False)
    pytest.skip(reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def test_the_outputs_panel_records_a_session_and_hides_where_outputs_are_off(tmp_path: Path):
    record = tmp_path / "record"
    record.mkdir()
    allowed = Settings(model="null", api_keys=[KEY], default_width=128, default_height=128, outputs=["file"],
                       record_dir=str(record))
    off = Settings(model="null", default_width=128, default_height=128)
    with ServerThread(create_app(allowed, null_runner())) as srv, \
            ServerThread(create_app(off, null_runner())) as srv_off, \
            playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.goto(srv_off.url + "/?source=pattern")
            page.wait_for_function("document.readyState === 'complete'")
            page.wait_for_load_state("networkidle")  # the panel's probe of GET /v1/outputs has answered
            assert page.is_hidden("#outputs"), "the panel shows on a server without outputs"

            page = browser.new_page()
            page.goto(srv.url + "/?source=pattern")
            assert page.is_hidden("#outputs"), "the panel shows before the key opens GET /v1/outputs"
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_selector("#outputs", state="visible", timeout=30_000)
            page.click("#start")
            page.wait_for_function("window.ditstream.stats.received >= 3", timeout=60_000)
            page.fill("#output-url", "file:page.mp4")
            page.click("#output-add")
            page.wait_for_function("document.querySelector('#outputs-list li[data-state=live]')", timeout=30_000)
            assert "file:page.mp4 — live" in page.inner_text("#outputs-list")
            page.wait_for_function("window.ditstream.stats.received >= 15", timeout=60_000)
            page.click("#outputs-list li button")  # Stop: DELETE, the recording closed
            page.wait_for_function("!document.querySelector('#outputs-list li')", timeout=30_000)
            assert page.inner_text("#outputs-message") == ""
            page.click("#start")
        finally:
            browser.close()
    with av.open(str(record / "page.mp4")) as mp4:
        frames = [f.to_ndarray(format="rgb24") for f in mp4.decode(video=0)]
    assert len(frames) >= 3 and frames[0].shape == (128, 128, 3)
    assert frames[-1].std() > 10, "the recording is blank: the pattern's circle should show"
