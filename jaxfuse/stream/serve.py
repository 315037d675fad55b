"""`python -m jaxfuse.stream --serve`: the stream as a live web page.

    python -m jaxfuse.stream --serve                # http://127.0.0.1:8765, the demo model
    pip install "jaxfuse[serve]"                    # aiohttp, the one extra it needs

The page (`page.html`) sends the browser camera's frames (`getUserMedia`) over a WebSocket, shows
the images that come back with their rate and latency, shows the prompt in use, and has a prompt
box that changes the prompt live. The server is image to image: each frame is one stream call's
input.

Messages on the socket `/socket`:
- page -> server, binary: an 8-byte little-endian float64 tag (the page's clock when it sent the
  frame, in ms), then the frame as JPEG or PNG; text: {"prompt": "..."}.
- server -> page, binary: a tag, then the image as JPEG. The tag is that of the frame the image
  comes from when the frame was this page's, NaN when it was another page's (whose tag is on
  that page's clock), so each page's latency is its own clock minus its own send time. Text:
  {"hello": {...the stream's settings, the prompt in use}}, {"prompt": "..."} to every page once a
  prompt is in use, {"bad_frames": n} to every page when a frame cannot be decoded, and
  {"error": "..."} to the page whose frame or prompt cannot work.

The device loop is `host.run_threaded` on a live source: the newest frame waits in a queue of one
(older ones are dropped and counted), decoding is on the reader thread and JPEG encoding on the
writer thread, so the device only runs the stream. Every page connected sees every image. Nothing
a page sends stops the server: a frame that cannot be decoded is dropped, counted and its sender
told, and each page has its own short queue of messages to it, so a page that reads slowly or not
at all loses its own images and holds up no one.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import signal
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from aiohttp import WSMsgType, web

from jaxfuse.commands import peak_memory_text
from jaxfuse.images import ImageError, decode_image
from jaxfuse.outputs import pil_image
from jaxfuse.spec import PipelineError
from jaxfuse.stream.host import CLOSED, FrameQueue, RunCounts, SimilarityFilter, run_threaded
from jaxfuse.stream.program import Stream

PAGE = Path(__file__).with_name("page.html")
TAG = struct.Struct("<d")  # the page's float64 tag in front of each frame and image
NOT_YOURS = float("nan")  # the tag of an image sent to a page that did not send its frame
OUTBOX = 4  # messages waiting for one page; beyond this its oldest is dropped
MAX_FRAME_PIXELS = 4096 * 4096  # above any camera's frame (4K is 8.3M); a float copy of it is 200 MB
CLOSE_TIMEOUT_S = 2.0  # how long closing a page waits for its answer (a page that does not read never answers)
# What `--serve` on the demo model can show, on the page and in the README (measured in issue 30).
DEMO_NOTE = ("The demo model knows only coloured shapes on a plain background. Its ControlNet (the --serve "
             "default) reads the camera in grey: the camera's dark shapes say where the shapes go, the prompt "
             "decides their colours and shapes.")


class Page:
    """A connected page: its socket and the messages waiting for it, sent by a task of its own.
    At most OUTBOX wait, the oldest dropped, so a page that reads slowly loses its own images
    and nobody waits for it."""

    def __init__(self, socket: web.WebSocketResponse):
        self.socket = socket
        self.outbox: collections.deque[bytes | str] = collections.deque(maxlen=OUTBOX)
        self.waiting = asyncio.Event()

    def put(self, message: bytes | dict[str, Any]) -> None:
        self.outbox.append(message if isinstance(message, bytes) else json.dumps(message))
        self.waiting.set()

    async def send_all(self) -> None:
        """Sends what `put` queues until the socket closes."""
        try:
            while True:
                await self.waiting.wait()
                self.waiting.clear()
                while self.outbox:
                    message = self.outbox.popleft()
                    await (self.socket.send_bytes(message) if isinstance(message, bytes) else
                           self.socket.send_str(message))
        except ConnectionError:  # the page went away; its handler ends too
            pass


class LiveServer:
    """One stream fed by the frames of every connected page."""

    def __init__(self, stream: Stream, similarity: SimilarityFilter | None = None, note: str | None = None,
                 log: Callable[[str], None] = print):
        if not stream.image_to_image or stream.config.frame_buffer_size != 1:
            raise PipelineError("the live page streams camera frames one at a time: make the stream image to "
                                "image with frame_buffer_size 1.")
        self.stream, self.similarity, self.note, self.log = stream, similarity, note, log
        self.incoming = FrameQueue(1)  # (page, message): the newest frame of any page, the device takes the latest
        self.pages: set[Page] = set()
        # The newest prompt sent and its page, taken by the device loop before its next call (a
        # deque's append and popleft are atomic between threads).
        self.prompts: collections.deque[tuple[Page, str]] = collections.deque(maxlen=1)
        self.in_flight: collections.deque[tuple[Page, float]] = collections.deque()  # the frames in the stream
        self.bad_frames = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def hello(self) -> dict[str, Any]:
        _, height, width, _ = self.stream.frame_shape
        return {"width": width, "height": height, "prompt": self.stream.request.prompts[0],
                "t_index": list(self.stream.config.t_index_list), "rcfg": self.stream.config.rcfg.value,
                "bad_frames": self.bad_frames, "note": self.note}

    # The device side (threads of `run_threaded`).

    def on_loop(self, function: Callable[..., None], *args: Any) -> None:
        """`function(*args)` on the event loop, from a device-side thread, waiting for nothing."""
        self.loop.call_soon_threadsafe(function, *args)

    def frames(self) -> Iterator[tuple[Page, float, np.ndarray]]:
        """The pages' frames decoded, on the reader thread: (page, tag, frames [1, H, W, 3]). One
        that cannot be decoded is dropped and counted, and its page told why."""
        while (item := self.incoming.get()) is not CLOSED:
            page, message = item
            try:
                tag, frames = self.decode(message)
            except ImageError as e:
                self.bad_frames += 1
                self.on_loop(self.bad_frame, page, str(e), self.bad_frames)
                continue
            yield page, tag, frames

    def decode(self, message: bytes) -> tuple[float, np.ndarray]:
        """A frame message -> (its tag, frames [1, H, W, 3] float32 in [0, 1] at the stream's size)."""
        if len(message) <= TAG.size:
            raise ImageError(f"a frame of {len(message)} bytes is not a frame: send an 8-byte tag, then the "
                             "JPEG or PNG.")
        (tag,) = TAG.unpack_from(message)
        image = decode_image(message[TAG.size:], "a frame from the page", MAX_FRAME_PIXELS)
        _, height, width, _ = self.stream.frame_shape
        if image.shape[:2] != (height, width):  # each channel as a float image: 16-bit frames keep their values
            image = np.stack([np.asarray(PIL.Image.fromarray(channel).resize((width, height),
                                                                             PIL.Image.Resampling.BILINEAR))
                              for channel in np.moveaxis(image, -1, 0)], axis=-1)
        return tag, image[None]

    def step(self, item: tuple[Page, float, np.ndarray]) -> tuple[tuple[Page, float] | None, np.ndarray]:
        """One stream call -> (the page and tag of the frame whose image leaves, None while the
        stream fills; the image [H, W, 3])."""
        page, tag, frames = item
        if self.prompts:
            sender, prompt = self.prompts.popleft()
            try:
                self.stream.update_prompt(prompt)
                self.on_loop(self.broadcast, {"prompt": prompt})
            except PipelineError as e:
                self.on_loop(sender.put, {"error": str(e)})
        self.in_flight.append((page, tag))
        images = self.stream(frames)
        leaving = self.in_flight.popleft() if len(self.in_flight) == self.stream.config.slots else None
        return leaving, images[0]

    def write(self, result: tuple[tuple[Page, float] | None, np.ndarray]) -> None:
        leaving, image = result
        if leaving is None:
            return
        buffer = io.BytesIO()
        pil_image(image).save(buffer, format="JPEG", quality=90)
        self.on_loop(self.send_image, *leaving, buffer.getvalue())

    # The web side (the event loop).

    def broadcast(self, message: dict[str, Any]) -> None:
        for page in self.pages:
            page.put(message)

    def bad_frame(self, sender: Page, error: str, count: int) -> None:
        sender.put({"error": error})
        self.broadcast({"bad_frames": count})

    def send_image(self, origin: Page, tag: float, jpeg: bytes) -> None:
        for page in self.pages:
            page.put(TAG.pack(tag if page is origin else NOT_YOURS) + jpeg)

    async def page(self, request: web.Request) -> web.Response:
        return web.FileResponse(PAGE)

    async def socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(max_msg_size=16 * 2**20, timeout=CLOSE_TIMEOUT_S)
        await socket.prepare(request)
        page = Page(socket)
        sending = asyncio.ensure_future(page.send_all())
        self.pages.add(page)
        page.put({"hello": self.hello()})
        try:
            async for message in socket:
                if message.type == WSMsgType.BINARY:
                    self.incoming.put((page, message.data))
                elif message.type == WSMsgType.TEXT:
                    self.take_text(page, message.data)
        finally:
            self.pages.discard(page)
            sending.cancel()
        return socket

    def take_text(self, page: Page, text: str) -> None:
        try:
            prompt = json.loads(text)["prompt"]
        except (ValueError, KeyError, TypeError):
            page.put({"error": 'a text message is {"prompt": "..."}'})
            return
        if not isinstance(prompt, str):
            page.put({"error": "the prompt must be a string"})
            return
        try:
            prompt.encode()  # JSON's escapes can make a lone surrogate, which the tokenizer raises on
        except UnicodeEncodeError:
            page.put({"error": "the prompt holds a lone surrogate (\\ud800 to \\udfff): send valid Unicode text"})
            return
        self.prompts.append((page, prompt))

    def application(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/", self.page), web.get("/socket", self.socket)])
        return app

    async def run(self, stop: asyncio.Event) -> RunCounts:
        """Runs the device loop on the pages' frames until `stop` is set, or until the loop fails
        (its error raised); closes the pages' sockets."""
        self.loop = asyncio.get_running_loop()
        similarity = None if self.similarity is None else (lambda item: self.similarity(item[2]))
        device = asyncio.ensure_future(asyncio.to_thread(run_threaded, self.step, self.frames(), self.write,
                                                         similarity, queue_size=1, live=True))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([device, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            self.incoming.close()  # ends the device loop if it is still running
            for page in list(self.pages):
                await page.socket.close(drain=False)  # draining would wait on a page that does not read
        return await device

    async def serve(self, host: str, port: int) -> RunCounts:
        """Serves the page until SIGTERM or Ctrl-C, or until the device loop fails (its error raised)."""
        runner = web.AppRunner(self.application())
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self.log(f"serving the stream at http://{host}:{port} (Ctrl-C stops)")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            return await self.run(stop)
        finally:
            await runner.cleanup()


def serve(stream: Stream, host: str, port: int, similarity: SimilarityFilter | None = None,
          note: str | None = None) -> None:
    """Compiles the stream on a grey frame, then serves it until Ctrl-C; `note` is shown on the page."""
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    server = LiveServer(stream, similarity, note, log)
    stream(np.full(stream.frame_shape, 0.5, np.float32))  # compiles before the first page connects
    log(f"compiling took {stream.record.compile_seconds:.2f} s; {peak_memory_text(stream.record.memory)}")
    asyncio.run(server.serve(host, port))
