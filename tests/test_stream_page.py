"""The live page (`python -m jaxfuse.stream --serve`) in a real browser: Debian's Chromium, headless,
driven by Playwright, its fake camera playing a camera-like video (a dark square on a light
background), on the settings the page starts with (the demo steered by its ControlNet). The page
loads, images arrive over the socket with their rate and latency, the prompt's colour and shape
are drawn where the camera's dark square is (the demo's detector reads them), a prompt typed into
the box replaces them there and the first prompt's shape goes, a second page measures its latency on its
own clock and shows the prompt in use, and a frame that cannot be decoded is counted on both pages.
The first page's screenshot is kept in `test-artifacts/stream_page.png`.

Needs Chromium at /usr/bin/chromium (`apt-get install chromium`; CI installs it).
"""

import base64
import io
import shutil
import sys
import time

import numpy as np
import pytest
from conftest import free_port, page_server
from PIL import Image

from jaxfuse.demo.detect import detect
from jaxfuse.demo.scenes import parse_caption

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    # This machine's network is closed: without these Chromium keeps trying to reach Google's hosts.
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
]
FIRST_PROMPT, SECOND_PROMPT = "a red circle at the top left", "a yellow star at the top right"
CAMERA_CELL = "bottom left"  # where the camera's dark square is, and neither prompt puts its shape
SERVER_START_S = 240  # loading the demo model and compiling the stream on a busy 2-core machine
CAMERA_SIDE = 256  # the demo stream's size, so the page's centre crop takes the whole video
MAX_LATENCY_MS = 10_000  # measured 199-277 ms; reading the other page's clock put it ~20,000 ms off


def camera_video(path) -> str:
    """A still camera-like video for Chromium's fake camera (Y4M, 4:2:0): a dark square in the bottom
    left cell (`CAMERA_CELL`) on a light grey background."""
    luma = np.full((CAMERA_SIDE, CAMERA_SIDE), 200, np.uint8)
    third = CAMERA_SIDE // 3
    luma[2 * third + 20:3 * third - 20, 20:third - 20] = 30
    chroma = np.full((CAMERA_SIDE // 2, CAMERA_SIDE // 2), 128, np.uint8)  # no colour
    frame = b"FRAME\n" + luma.tobytes() + chroma.tobytes() * 2
    path.write_bytes(f"YUV4MPEG2 W{CAMERA_SIDE} H{CAMERA_SIDE} F10:1 Ip A1:1 C420jpeg\n".encode() + frame * 10)
    return str(path)


@pytest.fixture
def server(tmp_path):
    """`--serve` on the demo model in its own process, at its default steps; yields its address
    once it listens."""
    port = free_port()
    command = [sys.executable, "-m", "jaxfuse.stream", "--serve", "--port", str(port), "--prompt", FIRST_PROMPT,
               "--cache-dir", str(tmp_path / "cache")]
    with page_server(command, tmp_path / "server.log", "serving the stream at", SERVER_START_S):
        yield f"http://127.0.0.1:{port}/"


def shown_image(page) -> np.ndarray:
    """The image the page shows now: [H, W, 3] float in [0, 1]."""
    url = page.evaluate("document.getElementById('output').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))).convert("RGB")) / 255


def drawn(image: np.ndarray) -> set[tuple[str, str, str]]:
    """(colour, shape, position) of every object the demo's detector finds."""
    return {(obj.colour, obj.shape, obj.position) for obj in detect(image)}


def named(prompt: str) -> tuple[str, str, str]:
    (obj,) = parse_caption(prompt)
    return obj.colour, obj.shape, obj.position


def on_camera(prompt: str) -> tuple[str, str, str]:
    """The prompt's colour and shape where the camera's dark square is: the ControlNet says where."""
    return (*named(prompt)[:2], CAMERA_CELL)


def shown_count(page, element: str) -> int:
    return int(page.inner_text(element))


def wait_for_images(page, count: int) -> None:
    page.wait_for_function(f"Number(document.getElementById('images').textContent) >= {count}", timeout=60_000)


def latencies(page, count: int) -> list[float]:
    """The latency the page shows after each of its next `count` images, in ms."""
    shown = []
    for _ in range(count):
        wait_for_images(page, shown_count(page, "#images") + 1)
        shown.append(float(page.inner_text("#latency")))
    return shown


def test_the_live_page_streams_the_camera_and_draws_a_typed_prompt(server, request, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the browser test needs Debian's Chromium: apt-get install chromium"
    artifacts = request.config.rootpath / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    camera = f"--use-file-for-fake-video-capture={camera_video(tmp_path / 'camera.y4m')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[*CHROMIUM_FLAGS, camera])
        try:
            errors = []
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server)
            opened = time.monotonic()
            wait_for_images(page, 4)
            assert page.inner_text("#status") == "streaming"
            assert page.input_value("#prompt") == page.inner_text("#prompt-in-use") == FIRST_PROMPT
            assert "steps 0 32" in page.inner_text("#settings")  # the demo's --serve default
            assert "the camera's dark shapes say where the shapes go" in page.inner_text("#note")
            assert float(page.inner_text("#fps")) > 0
            assert on_camera(FIRST_PROMPT) in drawn(shown_image(page))

            page.fill("#prompt", SECOND_PROMPT)
            page.press("#prompt", "Enter")
            page.wait_for_function(f"document.getElementById('prompt-in-use').textContent === {SECOND_PROMPT!r}",
                                   timeout=30_000)
            # Two images in flight (two steps) were begun before the change: wait past them.
            wait_for_images(page, shown_count(page, "#images") + 3)
            found = drawn(shown_image(page))
            assert on_camera(SECOND_PROMPT) in found  # the typed prompt's colour and shape, where the camera says
            assert not any(obj[:2] == named(FIRST_PROMPT)[:2] for obj in found)  # and the first prompt's are gone
            page.screenshot(path=artifacts / "stream_page.png")

            # A second page, its clock ~20 s behind the first's: each page's latency on its own clock.
            time.sleep(max(0.0, 20 - (time.monotonic() - opened)))
            second = browser.new_page()
            second.on("pageerror", lambda error: errors.append(str(error)))
            second.goto(server)
            wait_for_images(second, 4)
            assert second.inner_text("#prompt-in-use") == SECOND_PROMPT
            for shown in (page, second):
                assert all(0 < latency < MAX_LATENCY_MS for latency in latencies(shown, 8))

            # A frame that cannot be decoded: its page is told, both count it, the stream goes on. It is
            # sent until one is read: a newer camera frame can replace it in the queue of one first.
            second.evaluate("window.badFrames = setInterval(() => socket.send(new Uint8Array(20)), 200)")
            second.wait_for_function(
                "document.getElementById('status').textContent.startsWith('a frame from the page is not')")
            second.evaluate("clearInterval(window.badFrames)")
            for shown in (page, second):
                shown.wait_for_function("Number(document.getElementById('bad-frames').textContent) >= 1")
            wait_for_images(page, shown_count(page, "#images") + 2)
            assert not errors, errors
        finally:
            browser.close()
