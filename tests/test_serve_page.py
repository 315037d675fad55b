"""The image server's page (`python -m jaxfuse.serve`, GET /) in a real browser: Debian's Chromium,
headless, driven by Playwright, on the demo model. A prompt typed into the page is generated over
server-sent events: its partial images are shown before the final one, the progress bar moves
with the steps the server reports, and the final image, put at the top of the gallery with its
prompt and seed, holds the prompt's shape in its colour where the prompt says (the demo's
detector reads it). A second prompt, with no seed or steps given, goes above the first; a size
the model cannot make shows the server's error and adds nothing. On a server started with
--api-key the page shows the 401's message until the key is typed, then generates, and keeps the
key across a reload. The first page's screenshot is kept in `test-artifacts/serve_page.png`.

Needs Chromium at /usr/bin/chromium (`apt-get install chromium`; CI installs it).
"""

import base64
import contextlib
import io
import re
import shutil
import sys

import numpy as np
import pytest
from conftest import free_port, page_server
from PIL import Image

from jaxfuse.demo.detect import detect
from jaxfuse.demo.scenes import parse_caption

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu",
    # This machine's network is closed: without these Chromium keeps trying to reach Google's hosts.
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
]
FIRST_PROMPT, SECOND_PROMPT = "a red circle at the top left", "a blue square at the bottom right"
NEGATIVE_PROMPT = "a green triangle"
# The server compiles its default steps before it listens; few steps start it quickly. The first
# prompt asks for more: the demo draws the prompt's shape where it says at 30 to 100 steps (all of
# 10 seeds each; at 4 steps 1 in 4), and 100 steps (~1.4 s here) give the bar several polls to move.
SERVER_STEPS, FIRST_STEPS, FIRST_SEED = 4, 100, 7
API_KEY = "page-test-key"
SERVER_START_S = 240  # loading the demo model and compiling on a busy 2-core machine (~30 s, ~10 s cached)
GENERATION_TIMEOUT_MS = 120_000  # the first request at FIRST_STEPS compiles its programs (~3 s here)
GALLERY_ITEMS = "#gallery figure"

# Kept by the page under test: the order in which partial previews and gallery items appeared,
# and every value the progress bar took (with its text), so that fast updates are not missed.
RECORDER = """() => {
  window.seen = { events: [], progress: [] };
  new MutationObserver(() => seen.events.push(["partial", document.getElementById("preview").src]))
    .observe(document.getElementById("preview"), { attributes: true, attributeFilter: ["src"] });
  new MutationObserver(() => seen.events.push(["final", null]))
    .observe(document.getElementById("gallery"), { childList: true });
  const bar = document.getElementById("progress"), text = document.getElementById("progress-text");
  new MutationObserver(() => seen.progress.push([bar.value, text.textContent]))
    .observe(bar, { attributes: true, attributeFilter: ["value"] });
}"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Converted weights and compiled programs, shared by the module's servers: the second starts
    from the first's cache."""
    return tmp_path_factory.mktemp("serve-page-cache")


@contextlib.contextmanager
def running_server(cache_dir, log, *flags):
    """`python -m jaxfuse.serve` on the demo model in its own process; yields its address once it
    listens, and stops it (SIGTERM, which it must take cleanly) when done."""
    port = free_port()
    command = [sys.executable, "-m", "jaxfuse.serve", "--devices", "1", "--steps", str(SERVER_STEPS),
               "--max-batch", "1", "--port", str(port), "--cache-dir", str(cache_dir), *flags]
    with page_server(command, log, "serving jaxfuse-demo at", SERVER_START_S):
        yield f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def server(cache_dir, tmp_path_factory):
    with running_server(cache_dir, tmp_path_factory.mktemp("open") / "server.log") as address:
        yield address


@pytest.fixture(scope="module")
def keyed_server(cache_dir, tmp_path_factory):
    with running_server(cache_dir, tmp_path_factory.mktemp("keyed") / "server.log", "--api-key", API_KEY) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the browser test needs Debian's Chromium: apt-get install chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own context: empty storage); uncaught script errors fail the test."""
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


def decoded(data_url: str) -> np.ndarray:
    """A data URL's PNG as [H, W, 3] float in [0, 1]."""
    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")) / 255


def named(prompt: str) -> tuple[str, str, str]:
    (obj,) = parse_caption(prompt)
    return obj.colour, obj.shape, obj.position


def gallery_count(page) -> int:
    return page.locator(GALLERY_ITEMS).count()


def generate(page, prompt: str, steps: str = "", seed: str = "", size: str = "256x256", negative: str = ""):
    """Fills the form, presses Generate and waits until the request has ended (the button enabled
    again); returns the request the page sent (Playwright's)."""
    for field, value in (("#prompt", prompt), ("#steps", steps), ("#seed", seed), ("#size", size),
                         ("#negative-prompt", negative)):
        page.fill(field, value)
    with page.expect_request("**/v1/images/generations") as sent:
        page.click("#generate")
    page.wait_for_function("!document.getElementById('generate').disabled", timeout=GENERATION_TIMEOUT_MS)
    return sent.value


def test_the_page_streams_previews_and_progress_into_a_gallery(server, page, request):
    artifacts = request.config.rootpath / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page.goto(server)
    assert page.title() == "jaxfuse"
    assert page.input_value("#size") == "256x256"
    labels = {"Prompt": "prompt", "Negative prompt": "negative-prompt", "Size (WxH)": "size", "Steps": "steps",
              "Seed": "seed", "API key": "api-key", "progress": "progress"}
    for label, field in labels.items():  # what a screen reader names each field
        assert page.get_by_label(label, exact=True).get_attribute("id") == field
    page.evaluate(RECORDER)

    sent = generate(page, FIRST_PROMPT, steps=str(FIRST_STEPS), seed=str(FIRST_SEED)).post_data_json
    assert sent == {"prompt": FIRST_PROMPT, "size": "256x256", "seed": FIRST_SEED, "steps": FIRST_STEPS,
                    "stream": True, "partial_images": 2}
    assert page.is_hidden("#error")
    seen = page.evaluate("seen")
    kinds = [kind for kind, _ in seen["events"]]
    print(f"events: {kinds}; progress seen: {seen['progress']}")
    assert kinds[-1] == "final" and kinds.count("final") == 1
    assert kinds.count("partial") == 2  # the previews asked for came, all before the final image
    for _, url in seen["events"][:-1]:
        assert decoded(url).shape == (256, 256, 3)
    values = [value for value, _ in seen["progress"]]
    assert values == sorted(values) and values[-1] == 1  # one request: its bar only goes forward, to full
    moving = [(value, text) for value, text in seen["progress"] if 0 < value < 1]
    assert moving, seen["progress"]  # at least one poll caught the steps on their way
    for value, text in moving:
        step, steps = map(int, re.fullmatch(r"step (\d+)/(\d+)", text).groups())
        assert steps == FIRST_STEPS and value == pytest.approx(step / steps)
    assert seen["progress"][-1] == [1, "done"]

    assert gallery_count(page) == 1
    assert page.inner_text(f"{GALLERY_ITEMS} figcaption") == f"{FIRST_PROMPT} \u00b7 seed {FIRST_SEED} \u00b7 256x256"
    image = decoded(page.get_attribute(f"{GALLERY_ITEMS} img", "src"))
    assert image.shape == (256, 256, 3)
    found = {(obj.colour, obj.shape, obj.position) for obj in detect(image)}
    print(f"detected in the final image: {found}")
    assert named(FIRST_PROMPT) in found
    assert page.is_hidden("#preview-figure")

    # No seed and no steps: the page draws the seed (and shows it), the server runs its default steps.
    sent = generate(page, SECOND_PROMPT, negative=NEGATIVE_PROMPT).post_data_json
    assert "steps" not in sent and sent["negative_prompt"] == NEGATIVE_PROMPT
    assert isinstance(sent["seed"], int) and 0 <= sent["seed"] < 2**32 - 16
    assert gallery_count(page) == 2
    captions = page.locator(f"{GALLERY_ITEMS} figcaption").all_inner_texts()
    assert captions == [f"{SECOND_PROMPT} \u00b7 seed {sent['seed']} \u00b7 256x256",
                        f"{FIRST_PROMPT} \u00b7 seed {FIRST_SEED} \u00b7 256x256"]  # the newest first
    assert decoded(page.get_attribute(f"{GALLERY_ITEMS} img >> nth=0", "src")).shape == (256, 256, 3)

    # A size the model cannot make: the server's message, naming the size, and no new image.
    generate(page, FIRST_PROMPT, size="250x256")
    error = page.inner_text("#error")
    print(f"bad size: {error}")
    assert page.is_visible("#error") and error.startswith("size 250x256:") and "multiple of" in error
    assert gallery_count(page) == 2 and page.inner_text("#progress-text") == ""
    page.screenshot(path=artifacts / "serve_page.png", full_page=True)


def test_the_page_sends_the_api_key_it_keeps(keyed_server, page):
    page.goto(keyed_server)
    generate(page, SECOND_PROMPT)
    error = page.inner_text("#error")
    print(f"without the key: {error}")
    assert page.is_visible("#error") and error.startswith("a valid API key is needed")
    assert gallery_count(page) == 0

    page.fill("#api-key", API_KEY)
    sent = generate(page, SECOND_PROMPT)
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert page.is_hidden("#error") and gallery_count(page) == 1
    page.reload()  # the key is kept in the browser's storage
    assert page.input_value("#api-key") == API_KEY
