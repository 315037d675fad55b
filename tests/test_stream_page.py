"""The live page (`python -m jaxfuse.stream --serve`) in a real browser: Debian's Chromium, headless,
driven by Playwright, with Chromium's fake camera as the image-to-image input. The page loads,
images arrive over the socket with their rate and latency, and a prompt typed into the box changes
what the images draw (the demo's detector reads them). The page's screenshot is kept in
`test-artifacts/stream_page.png`.

Needs Chromium at /usr/bin/chromium (`apt-get install chromium`; CI installs it).
"""

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jaxfuse.demo.detect import prompt_accuracy

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    # This machine's network is closed: without these Chromium keeps trying to reach Google's hosts.
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
]
FIRST_PROMPT, SECOND_PROMPT = "a red circle at the top left", "a yellow star at the top right"
SERVER_START_S = 240  # loading the demo model and compiling the stream on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """`--serve` on the demo model in its own process; yields its address once it listens."""
    port = free_port()
    # Steps 0 and 32 of the 50-step LCM schedule: the first from pure noise, so the prompt decides
    # what is drawn and the detector can read it; the camera frame still tints the image.
    command = [sys.executable, "-m", "jaxfuse.stream", "--serve", "--port", str(port), "--t-index", "0", "32",
               "--prompt", FIRST_PROMPT, "--cache-dir", str(tmp_path / "cache")]
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stderr=out, stdout=out, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + SERVER_START_S
        while "serving the stream at" not in log.read_text():
            assert process.poll() is None, f"the server stopped:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()  # SIGTERM stops it cleanly


def shown_image(page) -> np.ndarray:
    """The image the page shows now: [H, W, 3] float in [0, 1]."""
    url = page.evaluate("document.getElementById('output').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))).convert("RGB")) / 255


def wait_for_images(page, count: int) -> None:
    page.wait_for_function(f"Number(document.getElementById('images').textContent) >= {count}", timeout=60_000)


def test_the_live_page_streams_the_camera_and_takes_a_new_prompt(server, request):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the browser test needs Debian's Chromium: apt-get install chromium"
    artifacts = request.config.rootpath / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server)
            wait_for_images(page, 4)
            assert page.inner_text("#status") == "streaming"
            assert page.input_value("#prompt") == FIRST_PROMPT
            assert float(page.inner_text("#fps")) > 0 and float(page.inner_text("#latency")) > 0
            assert prompt_accuracy(FIRST_PROMPT, shown_image(page)) == 1.0

            page.fill("#prompt", SECOND_PROMPT)
            page.press("#prompt", "Enter")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('prompt in use')",
                                   timeout=30_000)
            # Two images in flight (two steps) were begun before the change: wait past them.
            wait_for_images(page, int(page.inner_text("#images")) + 3)
            image = shown_image(page)
            assert prompt_accuracy(SECOND_PROMPT, image) == 1.0
            assert prompt_accuracy(FIRST_PROMPT, image) < 1.0
            page.screenshot(path=artifacts / "stream_page.png")
            assert not errors, errors
        finally:
            browser.close()
