"""The image server's HTTP side (aiohttp): the OpenAI images API, A1111's `/sdapi/v1` subset,
health, metrics and a page, on one event loop; the device runs on its own thread (`worker`).

Every request to a generation endpoint is read within `body_timeout_s` (a client that sends its
body slowly holds up only itself), checked whole (`jobs`), then queued; its client waits for its
images, at most `timeout_s` from arrival. A client that goes away takes its job out of the
queue. Every error is JSON, OpenAI's shape, with the field it names:
{"error": {"message": ..., "type": "invalid_request_error", "param": "size", "code": null}}.
With an API key, every endpoint but `/health` and the page itself wants
`Authorization: Bearer KEY` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from jaxfuse.outputs import pil_image
from jaxfuse.serve.jobs import BadRequest, Job, Limits, Served, a1111_job, openai_job
from jaxfuse.serve.queue import JobQueue, QueueFull, Stopped, Ticket
from jaxfuse.serve.worker import GenerationFailed, Worker

PAGE = Path(__file__).with_name("page.html")
OPEN_PATHS = {"/health", "/"}  # no API key needed: the page asks for one and sends it with each call
BODY_TIMEOUT_S = 30.0
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Refused(Exception):
    """An answer other than images: HTTP `status`, a message, and the field it names."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.headers = status, param, kind, headers or {}


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def encoded(image: np.ndarray, output_format: str = "png") -> str:
    """An image [H, W, 3] float32 in [0, 1] as base64 PNG (or JPEG, WebP)."""
    buffer = io.BytesIO()
    pil_image(image).save(buffer, format=output_format.upper())
    return base64.b64encode(buffer.getvalue()).decode()


async def encoded_all(images: list[np.ndarray], output_format: str = "png") -> list[str]:
    """`encoded` on a thread: a 1024x1024 PNG takes up to 0.1 s, which would hold up every other
    client on the event loop."""
    return await asyncio.to_thread(lambda: [encoded(image, output_format) for image in images])


class ImageServer:
    """The HTTP endpoints over a queue and its worker; `draining` once the server stops."""

    def __init__(self, served: Served, limits: Limits, queue: JobQueue, worker: Worker, api_key: str | None = None,
                 timeout_s: float = 600.0, max_body_bytes: int = 16 * 2**20, body_timeout_s: float = BODY_TIMEOUT_S):
        self.served, self.limits, self.queue, self.worker = served, limits, queue, worker
        self.metrics = worker.metrics
        self.api_key, self.timeout_s = api_key, timeout_s
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.draining = False

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self.errors, self.authorized])
        app.add_routes([
            web.get("/", self.page), web.get("/health", self.health), web.get("/metrics", self.metrics_text),
            web.get("/v1/models", self.models), web.post("/v1/images/generations", self.openai_generations),
            web.post("/sdapi/v1/txt2img", self.txt2img), web.post("/sdapi/v1/img2img", self.img2img),
            web.get("/sdapi/v1/progress", self.progress), web.get("/sdapi/v1/sd-models", self.sd_models)])
        return app

    # --- middlewares ---------------------------------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """Every refusal as a JSON error; aiohttp's own (404, 405, 413) too."""
        try:
            return await handler(request)
        except Refused as e:
            return web.json_response(error_body(str(e), e.param, e.kind), status=e.status, headers=e.headers)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message = e.text if e.status != 413 else (f"the body is larger than this server's "
                                                      f"{self.max_body_bytes:,} bytes (--max-body-mb).")
            return web.json_response(error_body(message), status=e.status)

    @web.middleware
    async def authorized(self, request: web.Request, handler):
        if self.api_key is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise Refused(401, "a valid API key is needed: send the header \"Authorization: Bearer KEY\".",
                              kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    # --- reading and queueing ------------------------------------------------------------------------------------

    async def body(self, request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise Refused(413, f"the body is {request.content_length:,} bytes, more than this server's "
                               f"{self.max_body_bytes:,} (--max-body-mb).")
        try:
            data = await asyncio.wait_for(request.read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refused(408, f"the body did not arrive within {self.body_timeout_s:g} s.") from None
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise Refused(400, f"the body is not valid JSON: {e}.") from None

    def submit(self, job: Job, on_preview=None) -> Ticket:
        if self.draining:
            raise Refused(503, "the server is stopping; try another or later.", kind="server_error")
        try:
            return self.queue.submit(job, on_preview)
        except QueueFull as e:
            self.metrics.answered(429)
            raise Refused(429, str(e), kind="rate_limit_error",
                          headers={"Retry-After": str(e.retry_after_s)}) from None
        except Stopped as e:
            raise Refused(503, str(e), kind="server_error") from None

    async def images(self, ticket: Ticket) -> list[np.ndarray]:
        """The ticket's images, waiting at most what is left of the timeout; the ticket leaves the
        queue if its client goes away (this task cancelled) or the time runs out."""
        left = self.timeout_s - (self.queue.clock() - ticket.arrived)
        try:
            images = await asyncio.wait_for(asyncio.wrap_future(ticket.future), max(left, 0))
        except asyncio.TimeoutError:
            self.metrics.answered(504)
            raise Refused(504, f"no result within this server's {self.timeout_s:g} s (--timeout).",
                          kind="server_error") from None
        except Stopped as e:
            self.metrics.answered(503)
            raise Refused(503, str(e), kind="server_error") from None
        except GenerationFailed as e:
            self.metrics.answered(500)
            raise Refused(500, f"the generation failed: {e}", kind="server_error") from None
        finally:
            self.queue.forget(ticket)
        self.metrics.answered(200, self.queue.clock() - ticket.arrived, len(images))
        return images

    def checked(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except BadRequest as e:
            self.metrics.answered(e.status)
            raise Refused(e.status, str(e), e.param) from None

    # --- OpenAI --------------------------------------------------------------------------------------------------

    async def openai_generations(self, request: web.Request) -> web.StreamResponse:
        body = await self.body(request)
        job, stream = self.checked(lambda: openai_job(body, self.served, self.limits))
        if stream:
            return await self.openai_stream(request, job)
        images = await self.images(self.submit(job))
        return web.json_response({"created": int(time.time()), "output_format": job.output_format,
                                  "size": f"{job.width}x{job.height}",
                                  "data": [{"b64_json": data, "seed": seed}
                                           for data, seed in zip(await encoded_all(images, job.output_format),
                                                                 job.seeds)]})

    async def openai_stream(self, request: web.Request, job: Job) -> web.StreamResponse:
        """Server-sent events as OpenAI's API sends them: a partial image for each preview asked
        for, then each image completed; a failure after the events started is an "error" event."""
        loop, previews = asyncio.get_running_loop(), asyncio.Queue()
        ticket = self.submit(job, lambda index, images: loop.call_soon_threadsafe(previews.put_nowait,
                                                                                  (index, images)))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        common = {"background": "opaque", "output_format": job.output_format, "quality": "auto",
                  "size": f"{job.width}x{job.height}"}

        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        result = asyncio.ensure_future(self.images(ticket))
        try:
            while not result.done() or not previews.empty():
                waiting = asyncio.ensure_future(previews.get())
                await asyncio.wait([result, waiting], return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    continue
                index, images = waiting.result()
                await send("image_generation.partial_image",
                           {"type": "image_generation.partial_image",
                            "b64_json": (await encoded_all(images[:1], job.output_format))[0],
                            "partial_image_index": index, "created_at": int(time.time()), **common})
            for data, seed in zip(await encoded_all(result.result(), job.output_format), job.seeds):
                await send("image_generation.completed",
                           {"type": "image_generation.completed", "b64_json": data,
                            "seed": seed, "created_at": int(time.time()), **common,
                            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                      "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}})
        except Refused as e:
            await send("error", error_body(str(e), e.param, e.kind))
        except ConnectionResetError:  # the client left; its job left the queue with `result`
            return response
        finally:
            result.cancel()
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.served.model, "object": "model",
                                                              "created": 0, "owned_by": "jaxfuse"}]})

    # --- A1111 ---------------------------------------------------------------------------------------------------

    async def txt2img(self, request: web.Request) -> web.Response:
        return await self.a1111(request, image_to_image=False)

    async def img2img(self, request: web.Request) -> web.Response:
        return await self.a1111(request, image_to_image=True)

    async def a1111(self, request: web.Request, image_to_image: bool) -> web.Response:
        body = await self.body(request)
        job = self.checked(lambda: a1111_job(body, self.served, self.limits, image_to_image))
        images = await self.images(self.submit(job))
        info = {"prompt": job.prompt, "negative_prompt": job.negative_prompt or "", "seed": job.seed,
                "all_seeds": job.seeds, "width": job.width, "height": job.height, "steps": job.steps,
                "cfg_scale": job.guidance_scale, "sampler_name": job.scheduler, "denoising_strength": job.strength,
                "sd_model_name": self.served.model}
        parameters = {k: v for k, v in body.items() if k != "init_images"}
        return web.json_response({"images": await encoded_all(images), "parameters": parameters,
                                  "info": json.dumps(info)})

    async def progress(self, request: web.Request) -> web.Response:
        """A1111's progress: the batch on the device now (0 when none), its eta, and the queue."""
        running = self.worker.running
        step, total = (running[0].step, running[0].total) if running else (0, 0)
        done = step / total if total else 0.0
        elapsed = time.monotonic() - self.worker.started
        eta = elapsed / done - elapsed if done else 0.0
        return web.json_response({"progress": done, "eta_relative": eta, "current_image": None, "textinfo": None,
                                  "state": {"sampling_step": step, "sampling_steps": total,
                                            "job_count": len(self.queue) + bool(running), "interrupted": False,
                                            "skipped": False}})

    async def sd_models(self, request: web.Request) -> web.Response:
        model = self.served.model
        return web.json_response([{"title": model, "model_name": model, "hash": None, "sha256": None,
                                   "filename": str(self.served.spec.folder), "config": None}])

    # --- the rest --------------------------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGE)

    async def health(self, request: web.Request) -> web.Response:
        status = "stopping" if self.draining else "ok"
        return web.json_response({"status": status, "model": self.served.model}, status=503 if self.draining else 200)

    async def metrics_text(self, request: web.Request) -> web.Response:
        text = self.metrics.exposition(len(self.queue), self.worker.pipe.programs.compiles)
        return web.Response(body=text.encode(), headers={"Content-Type": PROMETHEUS_TYPE})


async def serve(server: ImageServer, sockets: list[socket.socket], log: Callable[[str], None],
                stop: asyncio.Event | None = None) -> None:
    """Serves until SIGTERM or Ctrl-C (or `stop` set, when given; or until the device thread
    fails, its error raised), then drains: new requests get 503, the batch on the device finishes
    and is answered, the queued requests get 503, the other processes are told to stop."""
    runner = web.AppRunner(server.application(), handler_cancellation=True, access_log=None)
    await runner.setup()
    for listener in sockets:  # bound already (`commands.bound_sockets`)
        await web.SockSite(runner, listener).start()
    if stop is None:
        stop = asyncio.Event()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signal_number, stop.set)
    device = asyncio.ensure_future(asyncio.to_thread(server.worker.serve))
    stopping = asyncio.ensure_future(stop.wait())
    host, port = sockets[0].getsockname()[:2]
    log(f"serving {server.served.model} at http://{host}:{port} (OpenAI: /v1/images/generations, A1111: /sdapi/v1, "
        "the page: /; SIGTERM or Ctrl-C stops)")
    try:
        await asyncio.wait([device, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        server.draining = True
        for ticket in server.queue.stop():
            if ticket.future.set_running_or_notify_cancel():
                ticket.future.set_exception(Stopped("the server is stopping; this request did not run."))
        log("stopping: finishing the batch on the device...")
        await device  # the running batch answered; raises if the device thread failed
        await runner.cleanup()  # waits for the handlers to send their answers
    log(f"stopped after {server.metrics.images} images.")
