"""`python -m jaxfuse.stream --serve`: the stream as a live web page.

    python -m jaxfuse.stream --serve                # http://127.0.0.1:8765, the demo model
    pip install "jaxfuse[serve]"                    # aiohttp, the one extra it needs

The page (`page.html`) sends the browser camera's frames (`getUserMedia`) over a WebSocket, shows
the images that come back with their rate and latency, and has a prompt box that changes the
prompt live. The server is image to image: each frame is one stream call's input.

Messages on the socket `/socket`:
- page -> server, binary: an 8-byte little-endian float64 tag (the page's clock when it sent the
  frame, in ms), then the frame as JPEG or PNG; text: {"prompt": "..."}.
- server -> page, binary: the tag of the frame an image comes from, then the image as JPEG
  (the page's latency is its clock minus the tag); text: {"hello": {...the stream's settings}},
  {"prompt": "..."} once a prompt is in use, {"error": "..."} for a prompt that cannot work.

The device loop is `host.run_threaded` on a live source: the newest frame waits in a queue of one
(older ones are dropped and counted), decoding is on the reader thread and JPEG encoding on the
writer thread, so the device only runs the stream. Every socket connected sees every image.
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

from jaxfuse.outputs import pil_image
from jaxfuse.spec import PipelineError
from jaxfuse.stream.host import CLOSED, FrameQueue, RunCounts, SimilarityFilter, run_threaded
from jaxfuse.stream.program import Stream

PAGE = Path(__file__).with_name("page.html")
TAG = struct.Struct("<d")  # the page's float64 tag in front of each frame and image
SEND_TIMEOUT_S = 10.0  # a writer waits this long for the event loop to take an image


class LiveServer:
    """One stream fed by the frames of every connected page."""

    def __init__(self, stream: Stream, similarity: SimilarityFilter | None = None, log: Callable[[str], None] = print):
        if not stream.image_to_image or stream.config.frame_buffer_size != 1:
            raise PipelineError("the live page streams camera frames one at a time: make the stream image to "
                                "image with frame_buffer_size 1.")
        self.stream, self.similarity, self.log = stream, similarity, log
        self.incoming = FrameQueue(1)  # the newest frame from the page: the device takes the latest
        self.sockets: set[web.WebSocketResponse] = set()
        self.prompt: str | None = None  # a new prompt, taken by the device loop before its next call
        self.in_flight: collections.deque[float] = collections.deque()  # tags of the frames in the stream
        self.loop: asyncio.AbstractEventLoop | None = None

    def hello(self) -> dict[str, Any]:
        _, height, width, _ = self.stream.frame_shape
        return {"width": width, "height": height, "prompt": self.stream.request.prompts[0],
                "t_index": list(self.stream.config.t_index_list), "rcfg": self.stream.config.rcfg.value}

    # The device side (threads of `run_threaded`).

    def frames(self) -> Iterator[bytes]:
        while (message := self.incoming.get()) is not CLOSED:
            yield message

    def decode(self, message: bytes) -> tuple[float, np.ndarray]:
        """A frame message -> (its tag, frames [1, H, W, 3] float32 in [0, 1] at the stream's size)."""
        (tag,) = TAG.unpack_from(message)
        _, height, width, _ = self.stream.frame_shape
        with PIL.Image.open(io.BytesIO(message[TAG.size:])) as image:
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), PIL.Image.Resampling.BILINEAR)
            return tag, (np.asarray(image, np.float32) / 255)[None]

    def step(self, item: tuple[float, np.ndarray]) -> tuple[float | None, np.ndarray]:
        """One stream call -> (the tag of the frame whose image leaves, None while the stream
        fills; the image [H, W, 3])."""
        tag, frames = item
        if (prompt := self.prompt) is not None:
            self.prompt = None
            try:
                self.stream.update_prompt(prompt)
                self.send_text({"prompt": prompt})
            except PipelineError as e:
                self.send_text({"error": str(e)})
        self.in_flight.append(tag)
        images = self.stream(frames)
        leaving = self.in_flight.popleft() if len(self.in_flight) == self.stream.config.slots else None
        return leaving, images[0]

    def write(self, result: tuple[float | None, np.ndarray]) -> None:
        tag, image = result
        if tag is None:
            return
        buffer = io.BytesIO()
        pil_image(image).save(buffer, format="JPEG", quality=90)
        self.send(TAG.pack(tag) + buffer.getvalue())

    def send_text(self, message: dict[str, Any]) -> None:
        self.send(json.dumps(message))

    def send(self, data: bytes | str) -> None:
        """`data` to every page, from a device-side thread."""
        asyncio.run_coroutine_threadsafe(self.broadcast(data), self.loop).result(SEND_TIMEOUT_S)

    async def broadcast(self, data: bytes | str) -> None:
        for socket in list(self.sockets):
            try:
                await (socket.send_bytes(data) if isinstance(data, bytes) else socket.send_str(data))
            except ConnectionError:
                self.sockets.discard(socket)

    # The web side (the event loop).

    async def page(self, request: web.Request) -> web.Response:
        return web.FileResponse(PAGE)

    async def socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(max_msg_size=16 * 2**20)
        await socket.prepare(request)
        self.sockets.add(socket)
        await socket.send_json({"hello": self.hello()})
        try:
            async for message in socket:
                if message.type == WSMsgType.BINARY and len(message.data) > TAG.size:
                    self.incoming.put(message.data)
                elif message.type == WSMsgType.TEXT:
                    await self.take_text(socket, message.data)
        finally:
            self.sockets.discard(socket)
        return socket

    async def take_text(self, socket: web.WebSocketResponse, text: str) -> None:
        try:
            prompt = json.loads(text)["prompt"]
        except (ValueError, KeyError, TypeError):
            await socket.send_json({"error": 'a text message is {"prompt": "..."}'})
            return
        if not isinstance(prompt, str):
            await socket.send_json({"error": "the prompt must be a string"})
            return
        self.prompt = prompt

    def application(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/", self.page), web.get("/socket", self.socket)])
        return app

    async def serve(self, host: str, port: int) -> RunCounts | None:
        """Serves the page until SIGTERM or Ctrl-C, or until the device loop fails (its error raised)."""
        self.loop = asyncio.get_running_loop()
        runner = web.AppRunner(self.application())
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self.log(f"serving the stream at http://{host}:{port} (Ctrl-C stops)")
        stop = asyncio.Event()
        self.loop.add_signal_handler(signal.SIGTERM, stop.set)
        similarity = None if self.similarity is None else (lambda item: self.similarity(item[1]))
        device = asyncio.ensure_future(asyncio.to_thread(run_threaded, self.step, self.frames(), self.write,
                                                         similarity, queue_size=1, prepare=self.decode, live=True))
        try:
            await asyncio.wait([device, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.incoming.close()  # ends the device loop if it is still running
            for socket in list(self.sockets):
                await socket.close()
            await runner.cleanup()
        return await device


def serve(stream: Stream, host: str, port: int, similarity: SimilarityFilter | None = None) -> None:
    """Compiles the stream on a grey frame, then serves it until Ctrl-C."""
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    server = LiveServer(stream, similarity, log)
    stream(np.full(stream.frame_shape, 0.5, np.float32))  # compiles before the first page connects
    asyncio.run(server.serve(host, port))
