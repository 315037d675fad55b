"""The live server (`jaxfuse.stream.serve`) through aiohttp's test client, on a stand-in stream
(no model, so each test takes about a second): nothing a page sends stops it, a page that never
reads holds up no one, each page's latency is on its own clock, and every page learns the prompt
in use. The page itself, in a browser on the demo model: `test_stream_page.py`."""

import asyncio
import contextlib
import io
import json
import math
import socket
import types

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402
from conftest import png_declaring  # noqa: E402

from jaxfuse.sampling.stream import StreamConfig  # noqa: E402
from jaxfuse.spec import PipelineError  # noqa: E402
from jaxfuse.stream.serve import OUTBOX, TAG, LiveServer  # noqa: E402

SIZE = 64
REFUSED = "a prompt the stand-in refuses"
TIMEOUT_S = 60  # a whole test; each takes about a second


class StandInStream:
    """The server's side of `Stream` without a model: image to image, two steps in flight, each
    call hands back the frames that entered the call before (zeros at first)."""

    image_to_image = True
    config = StreamConfig((0, 32), rcfg="none")
    frame_shape = (1, SIZE, SIZE, 3)

    def __init__(self, size: int = SIZE):
        self.frame_shape = (1, size, size, 3)
        self.request = types.SimpleNamespace(prompts=["a red circle at the top left"])
        self.previous, self.calls = np.zeros(self.frame_shape, np.float32), 0

    def update_prompt(self, prompt: str) -> None:
        if prompt == REFUSED:
            raise PipelineError("the stand-in refuses this prompt.")
        self.request = types.SimpleNamespace(prompts=[prompt])

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        self.calls += 1
        images, self.previous = self.previous, frames
        return images


class PageClient:
    """A page's socket: the images and the text messages it received, in order."""

    def __init__(self, ws):
        self.ws, self.texts = ws, []

    async def send_frame(self, tag: float, frame: bytes) -> None:
        await self.ws.send_bytes(TAG.pack(tag) + frame)

    async def receive(self) -> tuple[float, np.ndarray] | dict:
        message = await self.ws.receive()
        if isinstance(message.data, bytes):
            (tag,) = TAG.unpack_from(message.data)
            return tag, np.asarray(Image.open(io.BytesIO(message.data[TAG.size:])))
        self.texts.append(json.loads(message.data))
        return self.texts[-1]

    async def image(self) -> tuple[float, np.ndarray]:
        """The next image (tag, [H, W, 3] uint8), the texts before it kept in `texts`."""
        while isinstance(received := await self.receive(), dict):
            pass
        return received

    async def text(self, key: str) -> dict:
        """The next text message that holds `key` (images before it skipped)."""
        while not (isinstance(received := await self.receive(), dict) and key in received):
            pass
        return received


@contextlib.asynccontextmanager
async def live_server(stream: StandInStream):
    """The server's app on a local port with its device loop running: (server, a client, the
    running loop's task)."""
    server = LiveServer(stream, log=lambda _: None)
    stop = asyncio.Event()
    async with TestClient(TestServer(server.application())) as client:
        running = asyncio.ensure_future(server.run(stop))
        try:
            yield server, client, running
        finally:
            stop.set()
            await running


async def connect(client) -> PageClient:
    page = PageClient(await client.ws_connect("/socket"))
    await page.text("hello")
    return page


async def until(condition, timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(test) -> None:
    asyncio.run(asyncio.wait_for(test, TIMEOUT_S))


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    return encoded(Image.fromarray(pixels), "PNG")


def jpeg(pixels: np.ndarray) -> bytes:
    return encoded(Image.fromarray(pixels), "JPEG")


def grey(value: int, size: int = SIZE) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


BAD_FRAMES = {
    "half a JPEG": (jpeg(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), np.uint8))[:1000],
                    "a frame from the page cannot be decoded"),
    "random bytes": (np.random.default_rng(1).bytes(2000), "a frame from the page is not an image file"),
    "a 20000 x 20000 PNG": (png_declaring(20000, 20000), "a frame from the page: its header declares more than"),
    "a 5000 x 5000 PNG": (png_declaring(5000, 5000), "a frame from the page: 5000x5000 is 25,000,000 pixels"),
}


@pytest.mark.parametrize("content, message", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_a_frame_that_cannot_be_decoded_is_dropped_counted_and_named_to_its_sender(content, message):
    async def test():
        async with live_server(StandInStream()) as (server, client, running):
            sender, other = await connect(client), await connect(client)
            await sender.send_frame(1.0, png(grey(10)))
            await until(lambda: server.stream.calls == 1)
            await sender.send_frame(2.0, content)
            assert (await sender.text("error"))["error"].startswith(message)
            assert await sender.text("bad_frames") == await other.text("bad_frames") == {"bad_frames": 1}
            assert not any("error" in text for text in other.texts)
            for tag, value in [(3.0, 30), (4.0, 40)]:  # the stream goes on: frame 1's image, then frame 3's
                await other.send_frame(tag, png(grey(value)))
                _, image = await sender.image()
                _, same = await other.image()
                assert np.array_equal(image, same)
            assert image.mean() == 30
            assert not running.done()
            late = await client.ws_connect("/socket")
            assert (await late.receive_json())["hello"]["bad_frames"] == 1

    run(test())


def test_a_frame_too_short_to_hold_a_tag_is_named():
    async def test():
        async with live_server(StandInStream()) as (server, client, running):
            page = await connect(client)
            await page.ws.send_bytes(b"\x00" * 5)
            assert (await page.text("error"))["error"] == ("a frame of 5 bytes is not a frame: send an 8-byte tag, "
                                                          "then the JPEG or PNG.")
            assert not running.done()

    run(test())


def test_a_page_that_never_reads_holds_up_no_one():
    async def test():
        size = 256  # noise JPEGs of ~60 kB (59 kB measured), so that the silent page's buffers fill quickly
        async with live_server(StandInStream(size)) as (server, client, running):
            silent = socket.socket()
            silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it takes in little, then nothing
            silent.setblocking(False)
            await asyncio.get_running_loop().sock_connect(silent, (client.host, client.port))
            await asyncio.get_running_loop().sock_sendall(silent, (
                "GET /socket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            await until(lambda: len(server.pages) == 1)
            page = await connect(client)
            rng = np.random.default_rng(0)
            await page.send_frame(0.0, jpeg(rng.integers(0, 256, (size, size, 3), np.uint8)))
            await until(lambda: server.stream.calls == 1)
            # 200 images of ~60 kB: 12 MB. The silent page's socket buffers filled at image 59 (measured;
            # ~3.5 MB on Linux's loopback), where before this change every page waited, then the server stopped.
            for tag in range(1, 201):
                await page.send_frame(float(tag), jpeg(rng.integers(0, 256, (size, size, 3), np.uint8)))
                assert (await page.image())[0] == tag - 1
            assert not running.done()
            # The silent page's own messages were dropped, not waited for: its queue is full.
            assert sorted(len(p.outbox) for p in server.pages) == [0, OUTBOX]
            silent.close()

    run(test())


def test_each_page_measures_latency_on_its_own_clock():
    async def test():
        async with live_server(StandInStream()) as (server, client, running):
            first, second = await connect(client), await connect(client)
            # Two pages' clocks: the second page opened 99 s after the first.
            senders = [(first, 100_000.0 + k) if k % 2 == 0 else (second, 1_000.0 + k) for k in range(7)]
            await first.send_frame(senders[0][1], png(grey(0)))
            await until(lambda: server.stream.calls == 1)
            for k in range(1, 7):  # frame k's call hands out frame k - 1's image, with its tag to its page alone
                page, tag = senders[k]
                await page.send_frame(tag, png(grey(k)))
                origin, sent_at = senders[k - 1]
                for receiver in (first, second):
                    received, _ = await receiver.image()
                    assert received == sent_at if receiver is origin else math.isnan(received)

    run(test())


def test_every_page_learns_the_prompt_in_use_and_only_the_sender_its_error():
    async def test():
        async with live_server(StandInStream()) as (server, client, running):
            sender, other = await connect(client), await connect(client)
            await sender.ws.send_str(json.dumps({"prompt": "a blue square in the centre"}))
            await sender.send_frame(1.0, png(grey(0)))  # the device takes a new prompt before its next call
            for page in (sender, other):
                assert await page.text("prompt") == {"prompt": "a blue square in the centre"}
            late = await client.ws_connect("/socket")
            assert (await late.receive_json())["hello"]["prompt"] == "a blue square in the centre"

            await sender.ws.send_str(json.dumps({"prompt": REFUSED}))
            await sender.send_frame(2.0, png(grey(0)))
            assert await sender.text("error") == {"error": "the stand-in refuses this prompt."}
            await sender.ws.send_str("not JSON")
            assert await sender.text("error") == {"error": 'a text message is {"prompt": "..."}'}
            await sender.ws.send_str(json.dumps({"prompt": 3}))
            assert await sender.text("error") == {"error": "the prompt must be a string"}
            await sender.ws.send_str('{"prompt": "a red \\ud800"}')  # the demo's tokenizer raised TypeError on it
            assert (await sender.text("error"))["error"].startswith("the prompt holds a lone surrogate")
            await other.send_frame(3.0, png(grey(0)))
            await other.image()  # frame 2's image, after the refusal was sent
            assert not any("error" in text for text in other.texts)
            assert server.stream.request.prompts == ["a blue square in the centre"]
            assert not running.done()

    run(test())


def test_a_frame_is_read_at_its_real_values_and_resized_to_the_stream():
    server = LiveServer(StandInStream(), log=lambda _: None)
    half = Image.fromarray(np.full((SIZE // 2, SIZE * 2), 32768, np.uint16))  # 16-bit grey at 0.5
    tag, frames = server.decode(TAG.pack(7.0) + encoded(half, "PNG"))
    assert tag == 7.0 and frames.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(frames, 32768 / 65535, atol=1e-6)  # measured: exact to float32 rounding
