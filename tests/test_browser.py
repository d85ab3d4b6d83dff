"""The browser page, driven by headless Chromium with a fake camera, receives and shows frames.

Chromium comes from the system (``/usr/bin/chromium``, or ``DITSTREAM_CHROMIUM``); its
``--use-fake-device-for-media-stream`` camera feeds ``getUserMedia``. The screenshot is written
under ``$DITSTREAM_ARTIFACTS`` (default: the test's tmp dir).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings

from ditstream.bench.harness import ServerThread

CHROMIUM = os.environ.get("DITSTREAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        "--disable-background-networking"]
KEY = "browser-key-123"

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not Path(CHROMIUM).exists():
    # scripts/test installs Chromium, so in CI its absence is a broken install, not a reason to skip.
    if os.environ.get("CI"):
        pytest.fail(f"no Chromium at {CHROMIUM}: scripts/install --test should have installed it",
                    pytrace=False)
    pytest.skip(reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    # A TURN URL the page must pick up (nothing listens there: on loopback the host candidates connect).
    settings = Settings(model="null", api_keys=[KEY], default_width=256, default_height=256,
                        webrtc_turn_urls=["turn:127.0.0.1:3478?transport=udp"], webrtc_turn_secret="turn-secret")
    with ServerThread(create_app(settings, null_runner())) as srv:
        yield srv


def assert_txt2img_g2g(page) -> None:
    """txt2img outputs are server-made (``ts`` = server wall clock): the page's figure must be a
    plausible latency, not a difference of two unrelated clocks (it once showed −1795979671284 ms)."""
    # After the page's burst of pings has fixed the clock offset, a fresh server-made output:
    page.wait_for_function("window.ditstream.pongs >= 8", timeout=30_000)
    received = page.evaluate("window.ditstream.stats.received")
    page.wait_for_function(f"window.ditstream.stats.received > {received} "
                           "&& window.ditstream.stats.latencyKind === 'server'", timeout=30_000)
    g2g = page.evaluate("window.ditstream.stats.latencyMs")
    assert 0 < g2g < 60_000, g2g
    page.wait_for_function("document.getElementById('latency').textContent !== '–'")
    assert 0 <= float(page.inner_text("#latency")) < 60_000


@pytest.mark.parametrize("source", ["webcam", "pattern"])
def test_page_streams_the_camera_and_shows_output(server, source, tmp_path):
    artifacts = Path(os.environ.get("DITSTREAM_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(server.url + "/")
            page.select_option("#source", source)
            page.fill("#key", KEY)
            page.fill("#prompt", "a watercolor painting of a city at night")
            page.click("#start")
            page.wait_for_function("window.ditstream.stats.received >= 20", timeout=60_000)
            stats = page.evaluate("({...window.ditstream.stats, source: window.ditstream.source.constructor.name})")
            assert stats["source"] == ("CameraSource" if source == "webcam" else "PatternSource"), (stats, console)
            assert stats["errors"] == [], stats["errors"]
            assert page.inner_text("#status") == "live"
            # The output canvas shows a real picture (not blank) of the stream's size.
            pixels = page.evaluate("""() => {
                const c = document.getElementById('output');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let sum = 0, sq = 0; for (let i = 0; i < d.length; i += 4) { sum += d[i + 1]; sq += d[i + 1] ** 2; }
                const n = d.length / 4; return {w: c.width, h: c.height, mean: sum / n, var: sq / n - (sum / n) ** 2};
            }""")
            assert (pixels["w"], pixels["h"]) == (256, 256)
            assert pixels["var"] > 10, f"output canvas looks blank: {pixels}"
            assert float(page.inner_text("#fps")) > 0
            # img2img glass-to-glass: timed from the page's own send of the answered frame.
            page.wait_for_function("window.ditstream.stats.latencyKind === 'sent'")
            assert 0 < page.evaluate("window.ditstream.stats.latencyMs") < 60_000
            page.wait_for_timeout(300)  # let the readouts refresh once more for the screenshot
            shot = artifacts / f"page-{source}.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if source == "pattern":  # txt2img: the page stops sending and the server paces the output
                page.select_option("#mode", "txt2img")
                page.wait_for_function("window.ditstream.config && window.ditstream.config.mode === 'txt2img'")
                sent, received = page.evaluate("[window.ditstream.stats.sent, window.ditstream.stats.received]")
                page.wait_for_function(f"window.ditstream.stats.received >= {received + 10}", timeout=30_000)
                assert page.evaluate("window.ditstream.stats.sent") <= sent + 2  # frames already in flight
                assert_txt2img_g2g(page)
            page.click("#start")  # stop: the socket closes cleanly
            page.wait_for_function("!window.ditstream.running")
            assert int(page.inner_text("#received")) >= 20  # the counters stay readable after Stop
            # Start again: every counter starts from zero (read in the same task as the click, before
            # any message of the new socket can arrive), then counts this stream only.
            fresh = page.evaluate("""() => {
                document.getElementById('start').click();
                const ids = ['fps', 'latency', 'server-ms', 'received', 'sent', 'skipped', 'dropped'];
                return {stats: {...window.ditstream.stats, errors: window.ditstream.stats.errors.length},
                        shown: Object.fromEntries(ids.map((id) => [id, document.getElementById(id).textContent]))};
            }""")
            assert fresh["stats"] == {"sent": 0, "received": 0, "skipped": 0, "dropped": 0, "fps": 0,
                                      "latencyMs": None, "latencyKind": None, "serverMs": None, "errors": 0}, fresh
            assert fresh["shown"] == {"fps": "0.0", "latency": "–", "server-ms": "–", "received": "0", "sent": "0",
                                      "skipped": "0", "dropped": "0"}, fresh
            page.wait_for_function("window.ditstream.running && window.ditstream.stats.received >= 5", timeout=30_000)
            assert page.inner_text("#status") == "live"
            if source == "pattern":  # still in txt2img: the new stream's figure is plausible too
                assert_txt2img_g2g(page)
            page.click("#start")
            page.wait_for_function("!window.ditstream.running")
        finally:
            browser.close()


@pytest.fixture(scope="module")
def demo_server():
    """What a new user runs: ``ditstream serve`` on the built-in demo model (no keys, no size flags)."""
    from ditstream.engine.config import ModelConfig
    from ditstream.engine.runner import EngineRunner

    runner = EngineRunner.from_config(ModelConfig(model="demo", device="cpu", dtype="fp32"))
    with ServerThread(create_app(Settings(model="demo"), runner)) as srv:
        yield srv


def test_first_run_on_the_demo_shows_the_prompt_drawn(demo_server):
    """The page takes the demo's defaults (prompt, size, strength) from the server before Start, and
    the test pattern through img2img at those defaults comes out as the prompt's shape and colours."""
    import json

    import numpy as np
    from ditstream.engine.demo import dataset as ds
    from ditstream.engine.demo.evaluator import read_image
    from ditstream.engine.loader import DEMO_MODEL_DIR

    defaults = json.loads((DEMO_MODEL_DIR / "ditstream.json").read_text())["defaults"]
    shape, colour, background = next(c for c in ds.all_captions() if ds.caption_for(*c) == defaults["prompt"])
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(demo_server.url + "/?source=pattern")
            page.wait_for_function("document.getElementById('prompt').value !== ''")
            assert page.input_value("#prompt") == defaults["prompt"]
            assert float(page.input_value("#strength")) == pytest.approx(defaults["strength"])
            assert page.input_value("#steps") == str(defaults["steps"])
            assert page.inner_text("#input-info") == f"{defaults['width']}×{defaults['height']}"
            page.click("#start")
            page.wait_for_function("window.ditstream.stats.received >= 5", timeout=60_000)
            assert page.evaluate("window.ditstream.config.prompt") == defaults["prompt"]
            rgba = page.evaluate("""() => {
                const c = document.getElementById('output');
                return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
            }""")
            w, h, data = rgba
            assert (w, h) == (defaults["width"], defaults["height"])
            image = np.asarray(data, np.uint8).reshape(h, w, 4)[..., :3]
            r = read_image(image)
            assert (r.shape, r.colour, r.background) == (shape, colour, background), r
            assert page.evaluate("window.ditstream.stats.errors") == []
            page.click("#start")
            page.wait_for_function("!window.ditstream.running")
        finally:
            browser.close()


def test_page_transport_switch_streams_over_webrtc(server):
    """Transport WebRTC: the page publishes its canvas over WHIP, plays the output over WHEP and sends
    its settings on the ``control`` data channel; Stop ends the session on the server."""
    pytest.importorskip("aiortc")
    state = server.app.state.ditstream
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(server.url + "/")
            page.select_option("#source", "pattern")
            page.select_option("#transport", "webrtc")
            page.fill("#key", KEY)
            page.click("#start")
            page.wait_for_function("window.ditstream.stats.received >= 20", timeout=60_000)
            assert page.inner_text("#status") == "live", (page.inner_text("#message"), console)
            assert page.evaluate("window.ditstream.ws") is None  # no WebSocket involved
            ice = page.evaluate("window.ditstream.rtc.pub.getConfiguration().iceServers")
            assert ice[0]["urls"] == ["turn:127.0.0.1:3478?transport=udp"], ice  # from /v1/webrtc/ice-servers
            assert ice[0]["username"].endswith(":ditstream") and ice[0]["credential"], ice
            assert len(state.webrtc) == 1 and state.metrics.streams_by_transport.labels("webrtc")._value.get() == 1
            page.select_option("#steps", "3")  # over the data channel; the reply updates the page's config
            page.wait_for_function("window.ditstream.config && window.ditstream.config.steps === 3", timeout=30_000)
            assert next(iter(state.webrtc.values())).config.steps == 3
            page.wait_for_function("document.getElementById('output').width === 256", timeout=30_000)
            pixels = page.evaluate("""() => {
                const c = document.getElementById('output');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let sum = 0, sq = 0; for (let i = 0; i < d.length; i += 4) { sum += d[i]; sq += d[i] ** 2; }
                const n = d.length / 4; return {h: c.height, var: sq / n - (sum / n) ** 2};
            }""")
            assert pixels["h"] == 256 and pixels["var"] > 10, pixels  # the echoed red circle, not a blank
            assert page.evaluate("window.ditstream.stats.errors") == []
            page.click("#start")  # Stop: the page DELETEs its session
            page.wait_for_function("!window.ditstream.running")
            page.wait_for_function("fetch('/metrics').then(r => r.text()).then(t => "
                                   "t.includes('ditstream_streams_by_transport{transport=\"webrtc\"} 0.0'))",
                                   timeout=30_000)
            assert state.admission.streams.in_use == 0 and not state.webrtc
        finally:
            browser.close()


@pytest.fixture(scope="module")
def demo_lora_server(demo_lora_generator):
    """``ditstream serve --lora swap=demo:0``: the demo model with its adapter, off by default."""
    from ditstream.engine.core import EngineCore
    from ditstream.engine.runner import EngineRunner

    g = demo_lora_generator
    runner = EngineRunner(EngineCore(g.components, g.backend, g.prompts))
    runner.info = {"model": "demo", "backend": "torch", "device": "cpu", "size_multiple": 8,
                   "defaults": g.components.defaults, "loras": dict(g.components.loras)}
    with ServerThread(create_app(Settings(model="demo"), runner)) as srv:
        yield srv


def _read_output(page):
    import numpy as np
    from ditstream.engine.demo.evaluator import read_image

    w, h, data = page.evaluate("""() => {
        const c = document.getElementById('output');
        return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
    }""")
    return read_image(np.asarray(data, np.uint8).reshape(h, w, 4)[..., :3])


def _settle(page, frames: int = 8) -> None:
    """Wait until ``frames`` more outputs arrived (those in flight finish with the old settings)."""
    n = page.evaluate("window.ditstream.stats.received")
    page.wait_for_function(f"window.ditstream.stats.received >= {n + frames}", timeout=60_000)


def test_live_controls_blend_transition_feedback_temporal_and_lora(demo_lora_server):
    """The second row of controls sends the live-control fields: a prompt blend, a transition, feedback
    and the demo adapter's scale; the evaluator reads each effect off the output canvas."""
    first = ("circle", "blue", "white")
    second = ("circle", "yellow", "black")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(demo_lora_server.url + "/?source=pattern")
            page.wait_for_selector("#lora-swap")  # one slider per adapter of /v1/models
            assert float(page.input_value("#lora-swap")) == 0.0
            page.fill("#prompt", ds_caption(first))
            page.fill("#prompt2", ds_caption(second))
            page.click("#start")
            page.wait_for_function("window.ditstream.stats.received >= 3", timeout=60_000)
            # A blend: half of each prompt, mixed in embedding space.
            page.fill("#blend", "0.5")
            page.wait_for_function("Array.isArray(window.ditstream.config.prompt)")
            assert page.evaluate("window.ditstream.config.prompt") == [
                {"text": ds_caption(first), "weight": 0.5}, {"text": ds_caption(second), "weight": 0.5}]
            page.fill("#blend", "1")
            page.wait_for_function("window.ditstream.config.prompt.length === 1")
            _settle(page)
            r = _read_output(page)
            assert (r.colour, r.background) == second[1:], r
            # A transition: the next change glides over 6 frames, then the output is the first prompt's.
            page.fill("#transition", "6")
            page.dispatch_event("#transition", "change")
            page.wait_for_function("window.ditstream.config.transition_frames === 6")
            page.fill("#blend", "0")
            page.wait_for_function("typeof window.ditstream.config.prompt === 'string'")
            _settle(page, 14)
            r = _read_output(page)
            assert (r.colour, r.background) == first[1:], r
            # The adapter's scale (the slider /v1/models made): the demo adapter swaps the colours.
            page.fill("#transition", "0")
            page.dispatch_event("#transition", "change")
            page.wait_for_function("window.ditstream.config.transition_frames === 0")
            page.fill("#lora-swap", "1")
            page.wait_for_function("window.ditstream.config.loras && window.ditstream.config.loras.swap === 1")
            _settle(page)
            r = _read_output(page)
            assert (r.colour, r.background) == (first[2], first[1]), r
            # Feedback reaches the stream's config.
            page.fill("#feedback", "0.3")
            page.wait_for_function("window.ditstream.config.feedback === 0.3")
            _settle(page, 3)
            # Attention memory and the motion switch (issue 26): applied, and frames keep coming.
            page.fill("#temporal", "0.5")
            page.wait_for_function("window.ditstream.config.temporal === 0.5")
            page.check("#motion-adaptive")
            page.wait_for_function("window.ditstream.config.motion_adaptive === true")
            _settle(page, 3)
            assert page.evaluate("window.ditstream.stats.errors") == []
            page.click("#start")
            page.wait_for_function("!window.ditstream.running")
        finally:
            browser.close()


def ds_caption(c: tuple[str, str, str]) -> str:
    from ditstream.engine.demo import dataset as ds

    return ds.caption_for(*c)
