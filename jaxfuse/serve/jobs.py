"""What a client asks the image server for: the JSON bodies of the OpenAI images API and of
A1111's `/sdapi/v1` read into one checked `Job`, or one `BadRequest` naming the field.

    limits = Limits(max_images=4)
    job = openai_job({"prompt": "a red circle", "size": "256x256", "n": 2}, served, limits)
    job = a1111_job({"prompt": "a red circle", "steps": 20, "cfg_scale": 7}, served, limits, image_to_image=False)

A job is n images of one prompt; image i has the seed `seed + i`, so it equals a one-image
request with that seed. Jobs with the same `key` can share one compiled program, so the queue
batches them into one call. Everything is checked here, on the event loop, before the job is
queued: the types, the size against the model and the devices it will be split over, the
limits the server was started with, and finally the whole request (`Request.parse`), so that
nothing a client sends fails on the device.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import numbers
import re
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxfuse.config import ParallelConfig
from jaxfuse.images import ImageError, decode_image
from jaxfuse.pipeline.request import DEFAULT_STEPS, MAX_SEED, Request
from jaxfuse.schedulers import SchedulerKind
from jaxfuse.spec import PipelineError, PipelineSpec

MAX_PROMPT_CHARS = 4000  # CLIP reads 77 tokens; a longer text only costs the tokenizer time
DEFAULT_GUIDANCE = 5.0  # as `generate` and the API
# A1111's names for the samplers jaxfuse has ("Euler a" is its Euler ancestral).
A1111_SAMPLERS = {"Euler": SchedulerKind.EULER, "Euler a": SchedulerKind.EULER_ANCESTRAL,
                  "DDIM": SchedulerKind.DDIM, "DPM++ 2M": SchedulerKind.DPMPP_2M, "LCM": SchedulerKind.LCM}
# OpenAI's fields that change nothing here (its models' options), taken and left alone.
OPENAI_IGNORED = {"quality", "style", "background", "moderation", "output_compression", "user", "safety_identifier"}
OUTPUT_FORMATS = ("png", "jpeg", "webp")
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::[^>]*)?>")  # A1111's way to name a LoRA in the prompt


class BadRequest(ValueError):
    """A request the server refuses: HTTP `status`, the field it names (`param`, None for the
    request as a whole) and why, with the fix."""

    def __init__(self, param: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server, and the steps it runs when it names none (the
    steps the server compiles for before it listens)."""

    steps: int = DEFAULT_STEPS
    max_images: int = 4  # images per request (n, batch_size x n_iter): at most a batch
    max_side: int = 2048  # pixels per side
    max_steps: int = 150
    max_image_pixels: int = 4096 * 4096  # an input picture, refused from its header


@dataclasses.dataclass(frozen=True)
class Served:
    """What the server runs: the model's spec and name, the layout a size is split over, and the
    LoRAs fused into it (by name)."""

    spec: PipelineSpec
    model: str
    layout: Callable[[int, int], ParallelConfig]  # (height, steps that run) -> the devices' layout
    loras: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Job:
    """n images of one prompt, checked against the model and the server's limits."""

    prompt: str
    negative_prompt: str | None
    n: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int  # image i's seed is seed + i
    scheduler: str
    image: np.ndarray | None = None  # image to image: the picture [H, W, 3] float32 in [0, 1]
    strength: float | None = None
    previews: int = 0  # images of the latents on the way, sent before the final ones
    output_format: str = "png"

    @property
    def key(self) -> tuple:
        """What jobs must share to run in one call: the programs' shapes and the request's core."""
        return (self.height, self.width, self.steps, self.scheduler, self.guidance_scale,
                self.negative_prompt is None, self.strength)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def preview_steps(self, steps_run: int) -> frozenset[int]:
        """The steps after which a preview is sent: `previews` spread evenly before the last."""
        return frozenset(max(1, (i + 1) * steps_run // (self.previews + 1)) for i in range(self.previews)) - {steps_run}

    def describe(self) -> dict[str, Any]:
        """The job as JSON (the image apart): what a result's info repeats, what other processes are sent."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "image"}


# --- field readers: each raises BadRequest naming its field --------------------------------------------------------


def text(body: dict, name: str, default: str | None = None, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(name, f"{name} is required: a string.")
        return default
    if not isinstance(value, str):
        raise BadRequest(name, f"{name} must be a string, got {type(value).__name__}.")
    if len(value) > MAX_PROMPT_CHARS:
        raise BadRequest(name, f"{name} holds {len(value):,} characters; at most {MAX_PROMPT_CHARS:,}.")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise BadRequest(name, f"{name} holds a lone surrogate (\\ud800 to \\udfff): send valid Unicode.") from None
    return value


def integer(body: dict, name: str, default: int, low: int, high: int, why: str = "") -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadRequest(name, f"{name} must be an integer, got {value!r}.")
    if not low <= value <= high:
        raise BadRequest(name, f"{name} must be in [{low}, {high}]{why}, got {value}.")
    return int(value)


def number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise BadRequest(name, f"{name} must be a finite number, got {value!r}.")
    if not low <= value <= high:
        raise BadRequest(name, f"{name} must be in [{low:g}, {high:g}], got {value:g}.")
    return float(value)


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(name, f"{name} must be true or false, got {value!r}.")
    return value


def choice(body: dict, name: str, default: str, choices: Any) -> str:
    value = body.get(name, default)
    if value not in choices:
        raise BadRequest(name, f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}.")
    return value


def seed(body: dict, name: str, limits: Limits) -> int:
    """A seed; absent, None or -1 (A1111's "random"): a random one. Room is left above it for
    the seeds `seed + i` of a request's other images."""
    value, highest = body.get(name), MAX_SEED - (limits.max_images - 1)
    if value is None or value == -1:
        return secrets.randbelow(highest + 1)
    return integer(body, name, 0, 0, highest, " (-1: random)")


def size(value: Any, served: Served, limits: Limits, name: str = "size") -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" (or "auto": the model's size) -> (height, width)."""
    native = served.spec.default_size
    if value is None or value == "auto":
        return native, native
    match = re.fullmatch(r"(\d+)x(\d+)", value) if isinstance(value, str) else None
    if match is None:
        raise BadRequest(name, f"{name} must be \"WIDTHxHEIGHT\" in pixels, e.g. \"{native}x{native}\", or \"auto\"; "
                               f"got {value!r}.")
    width, height = int(match[1]), int(match[2])
    return checked_size(height, width, served, limits, name)


def checked_size(height: int, width: int, served: Served, limits: Limits, name: str,
                 names: tuple[str, str] | None = None) -> tuple[int, int]:
    """A size the model makes within the server's limit, the error naming `name` (or, with
    `names`, the field of the side that is wrong: A1111's height and width)."""
    for side, field in zip((height, width), names or (name, name)):
        if not 1 <= side <= limits.max_side:
            raise BadRequest(field, f"{name}: each side must be in [1, {limits.max_side}] pixels, got "
                                    f"{width}x{height}.")
    try:  # the devices' split is checked with the whole request (`checked_job`)
        served.spec.check_size(height, width)
    except PipelineError as e:
        field = name if names is None else names[height % served.spec.size_multiple == 0]
        raise BadRequest(field, f"{name} {width}x{height}: {e}") from None
    return height, width


def picture(value: Any, name: str, limits: Limits) -> np.ndarray:
    """A base64 image (optionally a data URL, as A1111's clients send them) -> [H, W, 3] float32."""
    if not isinstance(value, str):
        raise BadRequest(name, f"{name} must be a base64-encoded PNG, JPEG or WebP string.")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(name, f"{name} is not valid base64.") from None
    try:
        return decode_image(raw, name, limits.max_image_pixels)
    except ImageError as e:
        raise BadRequest(name, str(e)) from None


def prompt_without_loras(prompt: str, served: Served, name: str = "prompt") -> str:
    """The prompt with A1111's `<lora:NAME:WEIGHT>` tags taken out, each NAME one the server has
    fused (a LoRA is fused into the weights at start, so a request cannot add one)."""
    for tag in LORA_TAG.findall(prompt):
        check_lora(tag, served, name)
    return LORA_TAG.sub("", prompt).strip()


def check_lora(lora: str, served: Served, name: str) -> None:
    if lora not in served.loras:
        loaded = ", ".join(sorted(served.loras)) or "none"
        raise BadRequest(name, f"LoRA {lora!r} is not loaded: LoRAs are fused into the weights when the server "
                               f"starts (--lora), so a request cannot add one. Loaded: {loaded}.")


def checked_job(job: Job, served: Served) -> Job:
    """The whole request checked as the pipeline will run it (`Request.parse` on the layout the
    size is split over), so nothing about it fails later on the device."""
    try:
        request = Request.parse(served.spec, job.prompt, job.negative_prompt, height=job.height, width=job.width,
                                num_inference_steps=job.steps, guidance_scale=job.guidance_scale,
                                seed=job.seeds, scheduler=job.scheduler, image=job.image,
                                strength=job.strength if job.strength is not None else 1.0)
        request.spread(served.spec, served.layout(job.height, request.steps_run))
    except (PipelineError, ValueError) as e:
        raise BadRequest(None, str(e)) from None
    return job


def unknown_fields(body: dict, known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(unknown[0], f"unknown field{'s' * (len(unknown) > 1)} {', '.join(unknown)}; this endpoint "
                                     f"takes {', '.join(sorted(known))}.")


# --- the two APIs --------------------------------------------------------------------------------------------------


OPENAI_FIELDS = {"prompt", "model", "n", "size", "response_format", "output_format", "stream", "partial_images",
                 "negative_prompt", "steps", "guidance_scale", "seed", "scheduler", "lora"} | OPENAI_IGNORED


def openai_job(body: Any, served: Served, limits: Limits) -> tuple[Job, bool]:
    """`POST /v1/images/generations`'s body -> (the job, whether to stream it as server-sent events)."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the body must be a JSON object.")
    unknown_fields(body, OPENAI_FIELDS)
    model = body.get("model")
    if model is not None and model != served.model:
        raise BadRequest("model", f"model {model!r} is not served here; this server runs {served.model!r} "
                                  "(GET /v1/models), or leave model out.")
    choice(body, "response_format", "b64_json", ("b64_json",))
    for lora in body.get("lora") or []:
        check_lora(lora if isinstance(lora, str) else repr(lora), served, "lora")
    stream = boolean(body, "stream", False)
    previews = integer(body, "partial_images", 0, 0, 3)
    if previews and not stream:
        raise BadRequest("partial_images", "partial_images are sent as server-sent events: add \"stream\": true.")
    height, width = size(body.get("size"), served, limits)
    job = Job(prompt=prompt_without_loras(text(body, "prompt", required=True), served),
              negative_prompt=text(body, "negative_prompt"),
              n=integer(body, "n", 1, 1, limits.max_images, " (this server's --max-batch)"),
              height=height, width=width,
              steps=integer(body, "steps", limits.steps, 1, limits.max_steps),
              guidance_scale=number(body, "guidance_scale", DEFAULT_GUIDANCE, 0.0, 100.0),
              seed=seed(body, "seed", limits),
              scheduler=choice(body, "scheduler", "euler", [k.value for k in SchedulerKind]),
              previews=previews, output_format=choice(body, "output_format", "png", OUTPUT_FORMATS))
    return checked_job(job, served), stream


def a1111_job(body: Any, served: Served, limits: Limits, image_to_image: bool) -> Job:
    """`POST /sdapi/v1/txt2img` or `img2img`'s body, in A1111's field names, -> the job. Fields
    of A1111's that change nothing here (save_images, send_images, ...) are left alone, as A1111
    leaves the ones it does not know."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the body must be a JSON object.")
    image, strength = None, None
    native = served.spec.default_size
    if image_to_image:
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise BadRequest("init_images", "init_images must be a list of one base64 image (the picture to redraw).")
        image = picture(images[0], "init_images", limits)
        height, width = checked_size(*image.shape[:2], served, limits, "init_images")
        strength = number(body, "denoising_strength", 0.75, 0.0, 1.0)
        if strength == 0:
            raise BadRequest("denoising_strength", "denoising_strength must be above 0 (0 returns the image).")
    else:
        height, width = checked_size(integer(body, "height", native, 1, limits.max_side),
                                     integer(body, "width", native, 1, limits.max_side), served, limits, "size",
                                     ("height", "width"))
    batch = integer(body, "batch_size", 1, 1, limits.max_images)
    n = batch * integer(body, "n_iter", 1, 1, limits.max_images)
    if n > limits.max_images:
        raise BadRequest("n_iter", f"batch_size x n_iter = {n} images; this server makes at most "
                                   f"{limits.max_images} per request (--max-batch).")
    sampler = choice(body, "sampler_name", "Euler", A1111_SAMPLERS)
    job = Job(prompt=prompt_without_loras(text(body, "prompt", default=""), served),
              negative_prompt=text(body, "negative_prompt") or None, n=n, height=height, width=width,
              steps=integer(body, "steps", limits.steps, 1, limits.max_steps),
              guidance_scale=number(body, "cfg_scale", 7.0, 0.0, 100.0), seed=seed(body, "seed", limits),
              scheduler=A1111_SAMPLERS[sampler].value, image=image, strength=strength)
    return checked_job(job, served)
