"""The image server (`jaxfuse.serve`) on the demo model, in this process: the official `openai`
client, A1111's endpoints, batching, previews, metrics, the API key, and what careless or
hostile clients send (malformed JSON, wrong types, sizes that do not divide, too many images,
a 50 MB body, a slow client, 200 requests at once, a client that leaves, a request that times
out); draining when the server stops. Images are compared with the pipeline's own after the
PNG's 8-bit rounding."""

import asyncio
import base64
import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from PIL import Image

from jaxfuse.commands import bound_sockets
from jaxfuse.config import ParallelConfig
from jaxfuse.demo import DEMO_MODEL
from jaxfuse.pipeline import load_pipeline
from jaxfuse.pipeline.request import NonFiniteError, Request
from jaxfuse.pipeline.sdxl import Preview
from jaxfuse.serve import app
from jaxfuse.serve.jobs import Limits, Served
from jaxfuse.serve.queue import JobQueue
from jaxfuse.serve.worker import Worker

STEPS = 3
PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(DEMO_MODEL, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda _: None)


class Server:
    """An `ImageServer` over `pipe` on a free port, served by `app.serve` on a thread of its own
    (its event loop; the device thread is the server's own); `stop` drains it as SIGTERM does."""

    def __init__(self, pipe, max_queue=64, max_batch=4, batch_wait_s=0.05, timeout_s=600.0, api_key=None,
                 max_body_bytes=2**20, body_timeout_s=30.0, warm=True):
        self.sockets, self.logs = bound_sockets("127.0.0.1", 0), []
        self.port = self.sockets[0].getsockname()[1]
        served = Served(pipe.spec, "jaxfuse-demo", lambda height, steps: ParallelConfig())
        self.queue = JobQueue(max_queue, max_batch, batch_wait_s)
        self.worker = Worker(pipe, served, self.queue)
        if warm:
            self.worker.warm([(256, 256)], STEPS)
        self.server = app.ImageServer(served, Limits(steps=STEPS, max_images=max_batch), self.queue, self.worker,
                                      api_key, timeout_s, max_body_bytes, body_timeout_s)
        started = threading.Event()

        async def main():
            self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
            started.set()
            await app.serve(self.server, self.sockets, self.logs.append, self.stop_event)

        self.thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self.thread.start()
        started.wait(10)
        deadline = time.monotonic() + 30
        while call(self.port, "GET", "/health")[0] != 200:
            assert time.monotonic() < deadline, self.logs
            time.sleep(0.05)

    def stop(self):
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(60)
        assert not self.thread.is_alive()

    def metric(self, name):
        lines = call(self.port, "GET", "/metrics")[2].splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def call(port, method, path, body=None, headers=None, timeout=120):
    """(status, headers, text) of one HTTP request; a dict body is sent as JSON."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    try:
        connection.request(method, path, data, headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    except ConnectionError:
        return 0, {}, ""
    finally:
        connection.close()


def generate(port, **body):
    status, _, text = call(port, "POST", "/v1/images/generations", {"prompt": PROMPT, **body})
    assert status == 200, text
    return [decoded(item["b64_json"]) for item in json.loads(text)["data"]]


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def reference(pipe, prompt=PROMPT, seed=0, **kwargs) -> np.ndarray:
    """The pipeline's own image as 8-bit, as the server's PNG holds it."""
    image = pipe(prompt, num_inference_steps=STEPS, seed=seed, guidance_scale=5.0, **kwargs)[0]
    return np.round(image * 255).astype(int)


# A batch of several rows runs other matrix shapes than a batch of one: measured at most 1 level of 255
# apart after rounding (a value that lands near .5); the images are otherwise equal.
ROUNDING = 1


@pytest.fixture(scope="module")
def server(pipe):
    running = Server(pipe)
    yield running
    running.stop()


# --- the APIs ----------------------------------------------------------------------------------------------------


def test_the_openai_client_gets_each_image_of_a_request_as_its_seed_makes_it_alone(server, pipe):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["jaxfuse-demo"]
    result = client.images.generate(model="jaxfuse-demo", prompt=PROMPT, n=2, size="256x256",
                                     extra_body={"seed": 7})
    assert result.size == "256x256" and len(result.data) == 2
    assert [item.model_extra["seed"] for item in result.data] == [7, 8]  # ours, beside OpenAI's fields
    for i, item in enumerate(result.data):
        image = decoded(item.b64_json)
        assert image.shape == (256, 256, 3)
        assert np.abs(image - reference(pipe, seed=7 + i)).max() <= ROUNDING


def test_streaming_sends_the_partial_images_then_the_final_one(server, pipe):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    events = list(client.images.generate(prompt=PROMPT, stream=True, partial_images=2, extra_body={"seed": 3}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = decoded(events[-1].b64_json)
    assert np.abs(final - reference(pipe, seed=3)).max() <= ROUNDING
    # The previews are the latents after steps 1 and 2 of 3: nearer the final image as the noise goes,
    # not copies of it (measured mean differences 44.5 and 1.8 levels).
    first, second = (np.abs(decoded(e.b64_json) - final).mean() for e in events[:2])
    assert first > 10 and 10 > second > 0.2


def test_a_preview_after_the_last_step_is_the_image(pipe):
    """`Preview` decodes the latents as the loop leaves them: after the last step, the result."""
    shown = {}
    request = Request.parse(pipe.spec, PROMPT, num_inference_steps=STEPS, seed=0)
    images = pipe.run(request, preview=Preview(frozenset({1, STEPS}), shown.__setitem__)).images
    assert sorted(shown) == [1, STEPS]
    np.testing.assert_array_equal(shown[STEPS], images)
    assert np.abs(shown[1] - images).mean() > 0.02  # measured 0.1: one step in, still noise


def test_a1111_txt2img_img2img_and_the_model_list(server, pipe):
    status, _, text = call(server.port, "POST", "/sdapi/v1/txt2img",
                           {"prompt": PROMPT, "steps": STEPS, "cfg_scale": 5, "seed": 11, "sampler_name": "Euler",
                            "batch_size": 2, "save_images": False})
    assert status == 200, text
    answer = json.loads(text)
    info = json.loads(answer["info"])
    assert (info["seed"], info["all_seeds"], info["width"], info["height"]) == (11, [11, 12], 256, 256)
    assert len(answer["images"]) == 2 and answer["parameters"]["cfg_scale"] == 5
    assert np.abs(decoded(answer["images"][1]) - reference(pipe, seed=12)).max() <= ROUNDING

    picture = io.BytesIO()
    Image.fromarray(reference(pipe, seed=11).astype(np.uint8)).save(picture, format="PNG")
    status, _, text = call(server.port, "POST", "/sdapi/v1/img2img",
                           {"init_images": ["data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()],
                            "denoising_strength": 0.7, "prompt": "a blue square at the bottom right",
                            "steps": STEPS, "cfg_scale": 5, "seed": 2})
    assert status == 200, text
    expected = pipe("a blue square at the bottom right", num_inference_steps=STEPS, seed=2, guidance_scale=5.0,
                    image=reference(pipe, seed=11).astype(np.uint8), strength=0.7)[0]
    assert np.abs(decoded(json.loads(text)["images"][0]) - np.round(expected * 255)).max() <= ROUNDING

    status, _, text = call(server.port, "GET", "/sdapi/v1/sd-models")
    assert status == 200 and json.loads(text)[0]["model_name"] == "jaxfuse-demo"


def test_progress_follows_the_batch_on_the_device(server):
    seen = []
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, server.port, steps=40, seed=1)
        while not running.done():
            progress = json.loads(call(server.port, "GET", "/sdapi/v1/progress")[2])
            seen.append((progress["progress"], progress["state"]["sampling_step"], progress["state"]["sampling_steps"]))
            time.sleep(0.02)
        running.result()
    during = [s for s in seen if 0 < s[0] < 1]
    assert during, seen[:5]
    assert all(total == 40 and abs(p - step / 40) < 1e-9 for p, step, total in during)
    assert [p for p, _, _ in during] == sorted(p for p, _, _ in during)


def test_requests_that_share_a_program_share_a_call_and_get_their_own_images(pipe):
    server = Server(pipe, batch_wait_s=1.0)
    try:
        prompts = [PROMPT, "a blue square at the bottom right", "a yellow star in the centre"]
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda p: generate(server.port, prompt=p, seed=4)[0], prompts))
        assert server.metric('jaxfuse_batches_total{images="3",padded="4"}') == 1
        for prompt, image in zip(prompts, results):
            assert np.abs(image - reference(pipe, prompt, seed=4)).max() <= ROUNDING
        compiles = server.metric("jaxfuse_compiles_total")
        generate(server.port, n=2, seed=1)
        assert server.metric("jaxfuse_compiles_total") == compiles  # every batch size was compiled before listening
    finally:
        server.stop()


# --- careless and hostile clients ----------------------------------------------------------------------------------

BAD_BODIES = [
    # (body, the field the error names)
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": PROMPT, "n": "2"}, "n"),
    ({"prompt": PROMPT, "n": 9}, "n"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "size": "250x256"}, "size"),
    ({"prompt": PROMPT, "size": "big"}, "size"),
    ({"prompt": PROMPT, "size": "99999x256"}, "size"),
    ({"prompt": PROMPT, "steps": 2.5}, "steps"),
    ({"prompt": PROMPT, "steps": 10_000}, "steps"),
    ({"prompt": PROMPT, "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": PROMPT, "seed": -5}, "seed"),
    ({"prompt": PROMPT, "seed": 2**32 - 1}, "seed"),  # no room for the seeds of a batch above it
    ({"prompt": PROMPT, "scheduler": "karras"}, "scheduler"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"prompt": PROMPT, "partial_images": 2}, "partial_images"),
    ({"prompt": PROMPT, "response_format": "url"}, "response_format"),
    ({"prompt": PROMPT, "model": "dall-e-3"}, "model"),
    ({"prompt": PROMPT, "colour": "red"}, "colour"),
    ({"prompt": PROMPT, "lora": ["pixel-art"]}, "lora"),
    ({"prompt": PROMPT + " <lora:pixel-art:0.8>"}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
]


@pytest.mark.parametrize("body, field", BAD_BODIES, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_BODIES)])
def test_a_bad_openai_request_is_a_400_naming_its_field(server, body, field):
    status, headers, text = call(server.port, "POST", "/v1/images/generations", body)
    assert status == 400 and headers["Content-Type"].startswith("application/json"), text
    error = json.loads(text)["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"


A1111_BAD = [
    ("txt2img", {"prompt": PROMPT, "width": 200}, "width"),
    ("txt2img", {"prompt": PROMPT, "height": 250, "width": 200}, "height"),
    ("txt2img", {"prompt": PROMPT, "height": 9999}, "height"),
    ("txt2img", {"prompt": PROMPT, "sampler_name": "Heun"}, "sampler_name"),
    ("txt2img", {"prompt": PROMPT, "batch_size": 2, "n_iter": 3}, "n_iter"),
    ("txt2img", {"prompt": PROMPT, "cfg_scale": None, "steps": "20"}, "steps"),
    ("img2img", {"prompt": PROMPT}, "init_images"),
    ("img2img", {"prompt": PROMPT, "init_images": ["not base64!"]}, "init_images"),
    ("img2img", {"prompt": PROMPT, "init_images": [base64.b64encode(b"not an image").decode()]}, "init_images"),
]


@pytest.mark.parametrize("endpoint, body, field", A1111_BAD, ids=[f"{e}-{f}" for e, _, f in A1111_BAD])
def test_a_bad_a1111_request_is_a_400_naming_its_field(server, endpoint, body, field):
    status, _, text = call(server.port, "POST", f"/sdapi/v1/{endpoint}", body)
    assert status == 400 and json.loads(text)["error"]["param"] == field, text


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]", b""], ids=["malformed", "binary", "list",
                                                                                   "empty"])
def test_a_body_that_is_not_a_json_object_is_a_400(server, body):
    status, _, text = call(server.port, "POST", "/v1/images/generations", body)
    assert status == 400 and "JSON" in json.loads(text)["error"]["message"], text


def test_a_50_mb_body_is_refused_and_the_server_goes_on(server):
    body = json.dumps({"prompt": "x" * (50 * 2**20)}).encode()
    status, _, text = call(server.port, "POST", "/v1/images/generations", body)
    assert status == 413 and "--max-body-mb" in json.loads(text)["error"]["message"]
    # Without a Content-Length (chunked), the limit holds as the body is read.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/images/generations", iter([body[i:i + 2**20] for i in range(0, len(body), 2**20)]),
                       encode_chunked=True)
    assert connection.getresponse().status == 413
    connection.close()
    assert len(generate(server.port)) == 1


def test_unknown_paths_and_methods_answer_json(server):
    for method, path, status in (("GET", "/nowhere", 404), ("GET", "/v1/images/generations", 405)):
        answer = call(server.port, method, path)
        assert answer[0] == status and "error" in json.loads(answer[2])


def test_a_slow_client_holds_up_only_itself(pipe):
    server = Server(pipe, body_timeout_s=2.0)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            start = time.monotonic()
            assert len(generate(server.port)) == 1  # served while the slow body trickles
            assert time.monotonic() - start < 2.0
            slow.settimeout(10)
            answer = slow.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 2 s" in answer
    finally:
        server.stop()


def test_200_requests_at_once_each_get_an_image_or_a_429_with_retry_after(pipe):
    server = Server(pipe, max_queue=16, batch_wait_s=0.01)
    try:
        def one(i):
            return call(server.port, "POST", "/v1/images/generations", {"prompt": PROMPT, "seed": i}, timeout=300)

        with ThreadPoolExecutor(200) as pool:
            answers = list(pool.map(one, range(200)))
        statuses = [a[0] for a in answers]
        assert set(statuses) <= {200, 429}, {s for s in statuses if s not in (200, 429)}
        assert statuses.count(200) >= 16 and statuses.count(429) > 0
        assert all(int(a[1]["Retry-After"]) >= 1 for a in answers if a[0] == 429)
        assert all(len(json.loads(a[2])["data"]) == 1 for a in answers if a[0] == 200)
        assert server.metric("jaxfuse_images_total") == statuses.count(200)
        assert server.metric("jaxfuse_queue_length") == 0
        assert call(server.port, "GET", "/health")[0] == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_a_client_that_leaves_takes_its_request_out_of_the_queue(pipe):
    server = Server(pipe, batch_wait_s=0.0)
    try:
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(generate, server.port, steps=60, seed=1)  # holds the device
            while not server.worker.running:
                time.sleep(0.01)
            with socket.create_connection(("127.0.0.1", server.port)) as leaving:
                body = json.dumps({"prompt": PROMPT, "steps": 2, "seed": 2}).encode()
                leaving.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
                deadline = time.monotonic() + 10
                while len(server.queue) == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            deadline = time.monotonic() + 10
            while len(server.queue):  # gone before the device is free
                assert time.monotonic() < deadline and not long.done()
                time.sleep(0.01)
            long.result()
        time.sleep(0.2)
        assert server.metric("jaxfuse_batches_total") == 1  # the leaver's job never ran
    finally:
        server.stop()


@pytest.mark.slow
def test_a_request_past_its_timeout_is_a_504_and_leaves_the_queue(pipe):
    server = Server(pipe, timeout_s=1.0, batch_wait_s=0.0)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, server.port, "POST", "/v1/images/generations", {"prompt": PROMPT, "steps": 80})
            while not server.worker.running:
                time.sleep(0.01)
            status, _, text = call(server.port, "POST", "/v1/images/generations", {"prompt": PROMPT})
            assert status == 504 and "--timeout" in text
            assert len(server.queue) == 0
            assert first.result()[0] == 504  # its batch runs to the end; its client has stopped waiting
    finally:
        server.stop()


def test_a_failed_batch_is_a_500_naming_why_and_the_server_goes_on(server, monkeypatch):
    calls = []

    def failing(request, progress=None, preview=None):
        calls.append(request)
        raise NonFiniteError("the denoised latents hold 3 NaN values; the likely cause is the UNet's weights")

    monkeypatch.setattr(server.worker.pipe, "run", failing)
    status, _, text = call(server.port, "POST", "/v1/images/generations", {"prompt": PROMPT})
    assert status == 500 and "NaN" in json.loads(text)["error"]["message"] and calls
    monkeypatch.undo()
    assert len(generate(server.port)) == 1


def test_an_api_key_guards_every_endpoint_but_health_and_the_page(pipe):
    server = Server(pipe, api_key="s3cret", warm=False)
    try:
        for path in ("/metrics", "/v1/models", "/sdapi/v1/progress", "/sdapi/v1/sd-models"):
            assert call(server.port, "GET", path)[0] == 401
            assert call(server.port, "GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
            assert call(server.port, "GET", path, headers={"Authorization": "Bearer s3cret"})[0] == 200
        status, _, text = call(server.port, "POST", "/v1/images/generations", {"prompt": PROMPT})
        assert status == 401 and json.loads(text)["error"]["type"] == "authentication_error"
        assert call(server.port, "GET", "/health")[0] == 200 and call(server.port, "GET", "/")[0] == 200
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="s3cret", max_retries=0)
        assert len(client.images.generate(prompt=PROMPT).data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="nope",
                          max_retries=0).images.generate(prompt=PROMPT)
    finally:
        server.stop()


def test_stopping_finishes_the_running_batch_and_answers_the_queued_503(pipe):
    server = Server(pipe, batch_wait_s=0.0, max_batch=1)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(call, server.port, "POST", "/v1/images/generations", {"prompt": PROMPT, "steps": 40})
        while not server.worker.running:
            time.sleep(0.01)
        queued = [pool.submit(call, server.port, "POST", "/v1/images/generations", {"prompt": PROMPT, "seed": i})
                  for i in range(2)]
        while len(server.queue) < 2:
            time.sleep(0.01)
        server.stop()
        assert running.result()[0] == 200
        assert [q.result()[0] for q in queued] == [503, 503]
    assert call(server.port, "GET", "/health")[0] == 0  # no longer listening
    assert server.logs[-1] == "stopped after 1 images."
