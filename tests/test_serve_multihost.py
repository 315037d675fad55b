"""The image server (`python -m jaxfuse.serve`) over two local processes of 4 emulated CPU devices
each, joined by `jax.distributed`: process 0 serves HTTP and hands each batch to process 1
(`jaxfuse.serve.hosts.Channel`), and every image equals the one a single process makes with the
same 8 devices. One server is started for the module (its processes compile while the reference
pipeline compiles here); the SIGTERM test stops it, and a test that comes after it starts another.
The messages' protocol itself, in one process: `test_channel_...`."""

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai as openai_client
import pytest
from conftest import free_port
from PIL import Image

from jaxfuse.demo import DEMO_MODEL
from jaxfuse.images import decode_image
from jaxfuse.parallel_config import ParallelConfig
from jaxfuse.pipeline import load_pipeline
from jaxfuse.serve.hosts import HEARTBEAT_S, Channel, Message, padded_length
from jaxfuse.serve.jobs import Job

slow = pytest.mark.slow  # a test of the two-process server

STEPS = 3
SIZE = 256
GUIDANCE = 5.0
PROMPT = "a red circle at the top left"
OTHER_PROMPT = "a blue square at the bottom right"
IMG2IMG_PROMPT = "a yellow star in the centre"
START_TIMEOUT_S = 600  # both processes load the model and compile batches of 1 and 2 (about a minute alone)
REQUEST_TIMEOUT_S = 300  # a request whose program is not warm compiles it first (image to image)
STOP_TIMEOUT_S = 60  # SIGTERM to both exits (measured about 4 s)
# Each device runs the program a single process of 8 devices runs on the same rows, and the
# exchanges between patches only move data: `test_multihost` measures the processes' images
# bit-identical to one process's, and a one-image request's PNG here is 0 levels from the
# reference. What is left is a batch of 2 against single images: XLA's CPU kernels may sum a row
# in another order at another batch size (float32 rounding; in one process, the batch of these two
# prompts is 1.8e-6 from the single images at most), which moves a value across a rounding
# boundary of the PNG's 8 bits now and then (9 of 196,608 values, by 1 level each): at most 1 level.
MAX_LEVELS = 1
# What a traceback, a native crash or an error or warning line of JAX's C++ (glog: "E1206 ...")
# leaves on stderr; process 1 should print none of it.
ALARMING = re.compile(r"Traceback|Fatal Python error|Check failure|Aborted|Segmentation fault|error|exception|"
                      r"warning|SIGTERM|^[EFW]\d{4} ", re.IGNORECASE | re.MULTILINE)
GLOO_NOTE = re.compile(r"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks")


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "JAXFUSE_API_KEY"}  # an open server
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


class Server:
    """The two processes of one server, their stderr in files; `start` again after a stop."""

    def __init__(self, folder):
        self.folder, self.starts = folder, 0
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        self.starts += 1
        self.port, coordinator = free_port(), free_port()
        self.logs = [self.folder / f"start{self.starts}-process{i}.log" for i in range(2)]
        self.procs = []
        for i, log in enumerate(self.logs):
            command = [sys.executable, "-m", "jaxfuse.serve", "--devices", "8", "--mode", "sync", "--steps", str(STEPS),
                       "--port", str(self.port), "--cache-dir", str(self.folder / "cache"), "--warm", f"{SIZE}x{SIZE}",
                       "--max-batch", "2",
                       # A lone request waits this long for company: room for two concurrent ones to meet.
                       "--batch-wait-ms", "400",
                       "--coordinator-address", f"127.0.0.1:{coordinator}", "--num-processes", "2",
                       "--process-id", str(i)]
            with open(log, "w") as stderr:
                self.procs.append(subprocess.Popen(command, env=server_env(), stdin=subprocess.DEVNULL,
                                                   stdout=stderr, stderr=subprocess.STDOUT))
        self.ready = False

    def log(self, process: int) -> str:
        return self.logs[process].read_text()

    def tails(self) -> str:
        return "\n".join(f"--- process {i} (exit {p.poll()}):\n{self.log(i)[-3000:]}" for i, p in enumerate(self.procs))

    @property
    def stopped(self) -> bool:
        return not self.procs or any(p.poll() is not None for p in self.procs)

    def url(self, path: str) -> str:
        """The address of `path`, once process 0 serves (a stopped server started again)."""
        if self.stopped:
            self.kill()
            self.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready:
            if self.stopped:
                pytest.fail(f"a server process exited while starting:\n{self.tails()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start within {START_TIMEOUT_S} s:\n{self.tails()}")
            self.ready = "serving" in self.log(0)
            time.sleep(0.2)
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url(path), json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            pytest.fail(f"{path} answered {e.code}: {e.read()[:1000]!r}\n{self.tails()}")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url(path), timeout=30) as response:
            return response.read().decode()

    def kill(self) -> None:
        for proc in self.procs:  # process 1 takes SIGTERM as JAX's preemption notice: SIGKILL
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-multihost")


@pytest.fixture(scope="module")
def server(folder):
    server = Server(folder)
    server.start()  # compiles while the tests compute their references
    yield server
    server.kill()


@pytest.fixture(scope="module")
def reference(folder):
    """image(prompt, seed, **image to image) -> the single-process image, [H, W, 3] float32 (a text
    to image one made once)."""
    pipe = load_pipeline(DEMO_MODEL, cache_dir=folder / "cache", log=lambda _: None)
    made = {}

    def make(prompt: str, seed: int, **arguments) -> np.ndarray:
        return pipe(prompt, num_inference_steps=STEPS, seed=seed, guidance_scale=GUIDANCE,
                    parallel=ParallelConfig(8, "sync"), **arguments)[0]

    def image(prompt: str, seed: int, **arguments) -> np.ndarray:
        if arguments:
            return make(prompt, seed, **arguments)
        if (prompt, seed) not in made:
            made[prompt, seed] = make(prompt, seed)
        return made[prompt, seed]
    return image


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def levels_apart(png_b64: str, reference: np.ndarray) -> np.ndarray:
    """|a served PNG - the reference as a PNG holds it|, in 8-bit levels, [H, W, 3]."""
    served = decoded(png_b64).astype(np.int32)
    expected = np.round(reference * 255).astype(np.int32)
    assert served.shape == expected.shape == (SIZE, SIZE, 3)
    return np.abs(served - expected)


def measured(what: str, apart: np.ndarray) -> int:
    """The largest difference, reported with how many values differ (pytest -s shows it)."""
    print(f"{what}: {apart.max()} level(s) at most from the single-process image, {np.count_nonzero(apart)} of "
          f"{apart.size:,} values differ")
    return int(apart.max())


def openai(server: Server, prompt: str, seed: int = 5) -> str:
    answer = server.post("/v1/images/generations", {"prompt": prompt, "size": f"{SIZE}x{SIZE}", "seed": seed})
    assert answer["size"] == f"{SIZE}x{SIZE}" and len(answer["data"]) == 1
    return answer["data"][0]["b64_json"]


def batches(server: Server, images: int) -> float:
    """Device calls of `images` images so far (Prometheus' counter; 0 before any)."""
    match = re.search(rf'^jaxfuse_batches_total{{images="{images}",padded="{images}"}} (\S+)$',
                      server.get("/metrics"), re.MULTILINE)
    return float(match[1]) if match else 0.0


@slow
def test_openai_request_equals_one_process_image(server, reference):
    expected = reference(PROMPT, 5)
    assert measured("OpenAI request", levels_apart(openai(server, PROMPT), expected)) <= MAX_LEVELS
    assert "serving" in server.log(0) and "serving" not in server.log(1)  # only process 0 listens and logs


@slow
def test_concurrent_requests_run_as_one_batch_each_equal_to_its_own_image(server, reference):
    expected = [reference(PROMPT, 5), reference(OTHER_PROMPT, 5)]
    before = batches(server, 2)
    with ThreadPoolExecutor(2) as pool:
        served = list(pool.map(lambda prompt: openai(server, prompt), [PROMPT, OTHER_PROMPT]))
    assert batches(server, 2) == before + 1  # the two met in one call of 2
    for i, (image, e) in enumerate(zip(served, expected)):
        assert measured(f"request {i + 1} of 2 in one batch", levels_apart(image, e)) <= MAX_LEVELS
    assert decoded(served[0]).tolist() != decoded(served[1]).tolist()  # each row its own prompt


def init_picture() -> bytes:
    """A 256x256 PNG: a gradient with a dark square."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    pixels = np.stack([x, y, 1 - x * y], axis=-1)
    pixels[64:160, 96:192] = 0.1
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@slow
def test_a1111_image_to_image_crosses_the_processes(server, reference):
    png = init_picture()
    body = {"init_images": [base64.b64encode(png).decode()], "denoising_strength": 0.5, "prompt": IMG2IMG_PROMPT,
            "steps": STEPS, "cfg_scale": 5, "seed": 1}
    with ThreadPoolExecutor(1) as pool:  # the server compiles its image-to-image programs as this process does
        served = pool.submit(server.post, "/sdapi/v1/img2img", body)
        picture = decode_image(png, "init")  # what the server reads from the request
        expected = reference(IMG2IMG_PROMPT, 1, image=picture, strength=0.5)
        answer = served.result()
    assert len(answer["images"]) == 1
    info = json.loads(answer["info"])
    assert (info["denoising_strength"], info["seed"], info["width"], info["height"]) == (0.5, 1, SIZE, SIZE)
    # Process 1 denoises half the rows: a picture that reached it wrong would show there.
    assert measured("A1111 img2img", levels_apart(answer["images"][0], expected)) <= MAX_LEVELS


@slow
def test_streamed_previews_are_decoded_in_every_process(server, reference):
    """A preview is a decode every process runs: process 1 runs it too, or the collectives part ways."""
    client = openai_client.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
    events = list(client.images.generate(prompt=PROMPT, size=f"{SIZE}x{SIZE}", stream=True, partial_images=2,
                                         extra_body={"seed": 5}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert measured("streamed", levels_apart(events[-1].b64_json, reference(PROMPT, 5))) <= MAX_LEVELS
    assert not server.stopped, server.tails()


@slow
def test_a_request_after_an_idle_pause_works(server, reference):
    expected = reference(PROMPT, 5)
    server.url("/")  # started
    time.sleep(3 * HEARTBEAT_S + 1)  # idle: process 0 sends "idle" about every HEARTBEAT_S
    assert not server.stopped, server.tails()
    assert measured("after an idle pause", levels_apart(openai(server, PROMPT), expected)) <= MAX_LEVELS


@slow
def test_sigterm_drains_and_both_processes_exit_0(server, reference):
    expected = reference(PROMPT, 5)
    server.url("/")
    answer: dict = {}

    def request():
        try:
            answer["image"] = openai(server, PROMPT)
        except BaseException as e:  # noqa: BLE001 -- reported below
            answer["error"] = e

    client = threading.Thread(target=request)
    client.start()
    deadline, running = time.monotonic() + REQUEST_TIMEOUT_S, False
    while client.is_alive() and not running and time.monotonic() < deadline:
        state = json.loads(server.get("/sdapi/v1/progress"))["state"]
        running = state["sampling_steps"] > 0  # a step done: the batch is on the devices
        time.sleep(0.01)

    start = time.monotonic()
    server.procs[0].send_signal(signal.SIGTERM)
    try:
        codes = [proc.wait(timeout=max(1.0, start + STOP_TIMEOUT_S - time.monotonic())) for proc in server.procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the processes did not exit within {STOP_TIMEOUT_S} s of SIGTERM:\n{server.tails()}")
    seconds = time.monotonic() - start
    client.join(timeout=30)
    print(f"SIGTERM {'during a batch' if running else 'after the batch'}: both processes exited in {seconds:.1f} s")
    assert codes == [0, 0], server.tails()

    # The batch on the devices was finished and answered before the processes stopped.
    assert "error" not in answer, f"{answer['error']!r}\n{server.tails()}"
    assert measured("drained at SIGTERM", levels_apart(answer["image"], expected)) <= MAX_LEVELS
    log0 = server.log(0)
    assert "stopping: finishing the batch" in log0 and "stopped after" in log0
    own = [line for line in server.log(1).splitlines() if line.strip() and not GLOO_NOTE.match(line)]
    assert not ALARMING.search("\n".join(own)), server.log(1)[-3000:]


class Sent(Channel):
    """Process 0's side: keeps what each broadcast sends."""

    def __init__(self):
        self.sent: list[np.ndarray] = []

    def broadcast(self, value: np.ndarray) -> np.ndarray:
        self.sent.append(np.array(value))
        return value


class Received(Channel):
    """Another process's side: each broadcast gets what process 0 sent, and must ask for the same
    shape and dtype (else the processes would run different collectives and hang or crash)."""

    def __init__(self, sent: list[np.ndarray]):
        self.sent = list(sent)

    def broadcast(self, value: np.ndarray) -> np.ndarray:
        sent = self.sent.pop(0)
        assert (value.shape, value.dtype) == (sent.shape, sent.dtype)
        return sent


def test_channel_hands_every_message_and_picture_over_whole():
    rng = np.random.default_rng(0)
    picture = rng.random((64, 96, 3))  # float64: sent as the float32 the receivers expect
    jobs = (Job("a snowman \u2603 at night", None, 1, 64, 96, 3, 5.0, 7, "euler"),
            Job("x" * 5000, "blurry", 2, 64, 96, 4, 7.5, 9, "ddim", image=picture, strength=0.5, previews=1),
            Job("", None, 1, 64, 96, 3, 5.0, 0, "euler", image=picture[:32], strength=None))
    for message in [Message("idle"), Message("stop"), Message("batch", jobs), Message("batch", jobs[:1])]:
        sender = Sent()
        sender.send(message)
        assert sender.sent[1].size == padded_length(int(sender.sent[0][0]))  # a few padded sizes
        receiver = Received(sender.sent)
        received = receiver.receive()
        assert not receiver.sent  # every broadcast sent was received
        assert received.kind == message.kind and len(received.jobs) == len(message.jobs)
        for got, job in zip(received.jobs, message.jobs):
            assert got.describe() == job.describe()
            if job.image is None:
                assert got.image is None
            else:
                np.testing.assert_array_equal(got.image, job.image.astype(np.float32))
