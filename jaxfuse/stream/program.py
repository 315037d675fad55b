"""`Stream`: a stream batch (`jaxfuse.sampling.stream`) on a pipeline, as one compiled call from
frames to images, and as one `lax.scan` over a whole clip for offline video and benchmarks.

Legend: f frames per call, T calls, H/W the image size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfuse import schedulers
from jaxfuse.config import ParallelConfig
from jaxfuse.control_images import Preprocessor, preprocess
from jaxfuse.parallel.mesh import make_mesh, place
from jaxfuse.parallel.slots import slots_mesh
from jaxfuse.pipeline.request import Controls, Request, check_finite, checked_image, checked_scales
from jaxfuse.pipeline.sdxl import SDXLPipeline
from jaxfuse.runtime.programs import CallRecord, Programs
from jaxfuse.sampling import stream
from jaxfuse.sampling.denoiser import Control
from jaxfuse.sampling.stream import RCFG, StreamConfig, StreamGuidance
from jaxfuse.schedulers import PredictionType
from jaxfuse.spec import PipelineError, PipelineSpec, checked_float

STREAM_SCHEDULE_STEPS = 50  # the LCM schedule `t_index_list` indexes (StreamDiffusion's num_inference_steps)


def checked_stream(spec: PipelineSpec, prompt: Any, negative_prompt: Any = None, *, config: StreamConfig,
                   height: int | None, width: int | None, seed: int, guidance_scale: float, delta: float,
                   schedule_steps: int = STREAM_SCHEDULE_STEPS, slot_parallel: bool = False,
                   patch_parallel: ParallelConfig | None = None) -> tuple[Request, schedulers.Schedule]:
    """A `Stream`'s request and schedule, its arguments checked from the model's config alone (no
    weights, no devices), so a command can refuse them before loading anything."""
    parallel = patch_parallel or ParallelConfig()
    if slot_parallel and patch_parallel is not None:
        raise PipelineError("a stream spreads either its slots (slot_parallel) or its images' rows "
                            "(patch_parallel) over devices, not both; choose one.")
    if parallel.cfg_parallel:
        raise PipelineError("a stream's guidance rows stay together (rcfg); drop cfg_parallel.")
    if config.rcfg.uses_residual and spec.scheduler.prediction_type is not PredictionType.EPSILON:
        raise PipelineError(f"rcfg {config.rcfg.value!r} takes the residual noise for the model's negative "
                            "prediction, which needs an epsilon-prediction model; use rcfg 'full' or 'none'.")
    checked_float("guidance_scale", guidance_scale, 0.0)
    checked_float("delta", delta, 0.0)
    # A stream's image is one image at any size: never a canvas of fused views.
    request = Request.parse(spec, prompt, negative_prompt, height=height, width=width, seed=seed, parallel=parallel,
                            tiled=False)
    return request, schedulers.lcm_at(spec.scheduler, schedule_steps, config.t_index_list)


# Attention holds its float32 logits, their exponent and the softmax at once: with this count,
# `call_bytes` is within 11% of XLA's own memory analysis (CPU) of the demo's stream call from 256
# to 1024 pixels, 1 to 16 frames a call, rcfg none, self and full.
ATTENTION_BUFFERS = 3


def call_bytes(spec: PipelineSpec, config: StreamConfig, height: int, width: int) -> int:
    """An estimate of the memory one stream call of `config` at `height` x `width` works in,
    besides the weights and the state, in float32 (the stream's dtype): per image, the larger of
    the VAE's attention over every latent pixel and three full-size activations; per UNet row, the
    larger of its largest attention and three activations of its first level."""
    def attention(tokens: int, heads: int) -> int:
        return ATTENTION_BUFFERS * heads * tokens**2 * 4

    unet, vae, f = spec.unet, spec.vae, config.frame_buffer_size
    h, w = height // spec.vae_factor, width // spec.vae_factor
    image = max(attention(h * w, 1) if vae.mid_block_add_attention else 0,
                3 * height * width * vae.block_out_channels[0] * 4)
    levels = [(level, heads) for level, (kind, heads) in enumerate(zip(unet.down_block_types, unet.num_attention_heads))
              if kind.startswith("CrossAttn")] + [(unet.num_levels - 1, unet.num_attention_heads[-1])]  # + mid block
    row = max([3 * h * w * unet.block_out_channels[0] * 4]
              + [attention((h >> level) * (w >> level), heads) for level, heads in levels])
    unet_rows = {RCFG.FULL: 2 * config.rows, RCFG.INITIALIZE: config.rows + f}.get(config.rcfg, config.rows)
    return f * image + unet_rows * row


@dataclasses.dataclass(frozen=True)
class StreamControl:
    """The pipeline's ControlNets in a stream: every ControlNet steered by the newest frame (its
    `preprocess`ed image), at each step by its scale. Each image in flight reads the newest control
    at each of its steps: the images follow the camera with no delay beyond the stream's own."""

    scales: np.ndarray  # [K, slots]
    preprocess: Preprocessor

    @classmethod
    def of(cls, pipe: SDXLPipeline, config: StreamConfig, scale: Any, preprocess: str) -> StreamControl | None:
        count = len(pipe.denoiser.controlnets)
        preprocess = Preprocessor.named(preprocess)
        if not count:
            return None
        part = Controls((), tuple(checked_scales(scale, count)), (0.0,) * count, (1.0,) * count)
        return cls(part.step_scales(config.slots), preprocess)

    def images(self, frames: np.ndarray) -> np.ndarray:
        """Frames [f, H, W, 3] float32 in [0, 1] -> their control images, the same."""
        if self.preprocess is Preprocessor.NONE:
            return frames
        return np.stack([preprocess(self.preprocess, frame) for frame in frames]).astype(np.float32) / 255

    def conditioning(self, images: jax.Array, dtype: Any) -> Control:
        nchw = jnp.transpose(images, (0, 3, 1, 2)).astype(dtype)
        return Control((nchw,) * self.scales.shape[0], jnp.asarray(self.scales))


class Stream:
    """A running stream: `stream(frames)` takes f frames [f, H, W, 3] (image-to-image; None for
    text-to-image) and returns the f images [f, H, W, 3] float32 in [0, 1] of the frames that
    entered `config.slots - 1` calls before (the first calls return the empty buffer's images).
    `update_prompt` changes the prompt from the next call on, compiling nothing. With the
    pipeline's ControlNets, every frame is also the control image (`StreamControl`): a text-to-
    image stream then takes frames too, for its control alone.

    Over devices, either `slot_parallel`: one slot per device, the first `config.slots` devices;
    or `patch_parallel`: every image split by rows over `patch_parallel.devices` devices, in its
    mode (sync equals one device; displaced carries each image's stale context with it, its first
    step as `config.first_step` says). The VAE runs outside the split, on the whole image."""

    def __init__(self, pipe: SDXLPipeline, prompt: str, negative_prompt: str | None = None, *,
                 config: StreamConfig = StreamConfig(), image_to_image: bool = True, height: int | None = None,
                 width: int | None = None, guidance_scale: float = 1.2, delta: float = 1.0, seed: int = 0,
                 schedule_steps: int = STREAM_SCHEDULE_STEPS, slot_parallel: bool = False,
                 patch_parallel: ParallelConfig | None = None, controlnet_conditioning_scale: Any = 1.0,
                 control_preprocess: str = "none"):
        self.request, self.schedule = checked_stream(
            pipe.spec, prompt, negative_prompt, config=config, height=height, width=width, seed=seed,
            guidance_scale=guidance_scale, delta=delta, schedule_steps=schedule_steps, slot_parallel=slot_parallel,
            patch_parallel=patch_parallel)
        if slot_parallel and len(jax.devices()) < config.slots:
            raise PipelineError(f"slot_parallel puts each of the {config.slots} slots on its own device; "
                                f"{len(jax.devices())} are present; list fewer steps in t_index_list or set "
                                "slot_parallel=False.")
        self.pipe, self.config, self.image_to_image = pipe, config, image_to_image
        self.control = StreamControl.of(pipe, config, controlnet_conditioning_scale, control_preprocess)
        parallel = patch_parallel or ParallelConfig()
        self.guidance = StreamGuidance(jnp.float32(guidance_scale), jnp.float32(delta))
        mesh = slots_mesh(config.slots) if slot_parallel else make_mesh(parallel) if patch_parallel else None
        # On a mesh, what the calls read lives on its devices (replicated; the state as it is split).
        self._placed = (lambda tree: tree) if mesh is None else (lambda tree: place(tree, NamedSharding(mesh, P())))
        # The stream's programs are its own (they close over its settings); what it compiled and the
        # peak memory per device of its calls are in `record`.
        self.programs, self.record = Programs(), CallRecord()
        self.denoiser, self.vae_params = self._placed(pipe.denoiser), self._placed(pipe.codec.params)
        self.cond = self._placed(pipe.text.conditioning(pipe.programs.for_call(self.record), self.request,
                                                        negative=True))
        latent_shape = pipe.spec.latent_shape(1, self.request.height, self.request.width)[1:]
        self.state = stream.initial_state(config, latent_shape, seed)
        if mesh is not None:
            self.state = stream.on_mesh(self.denoiser, config, self.schedule, self.cond, self.guidance, self.state,
                                        mesh, parallel)
        self._program = stream.stream_program(config, self.schedule, mesh, parallel)

    @property
    def frame_shape(self) -> tuple[int, int, int, int]:
        return self.config.frame_buffer_size, self.request.height, self.request.width, 3

    def update_prompt(self, prompt: str, negative_prompt: str | None = None) -> None:
        """The prompt of every step from the next call on (the images in flight too, as the
        reference implementation does)."""
        request = Request.parse(self.pipe.spec, prompt, negative_prompt, height=self.request.height,
                                width=self.request.width, tiled=False)
        self.cond = self._placed(self.pipe.text.conditioning(self.pipe.programs.for_call(self.record), request,
                                                             negative=True))
        self.request = request

    def _images(self, denoiser, vae_params, state, cond, guidance, frames, controls=None):
        """One call: frames [f, H, W, 3] (or None) and their control images (None without
        ControlNets) -> (the next state, images [f, H, W, 3])."""
        codec = self.pipe.codec
        latents = codec.encode_latents(vae_params, frames) if self.image_to_image else None
        if controls is not None:
            cond = cond.replace(control=self.control.conditioning(controls, cond.context.dtype))
        state, finished = self._program(denoiser, state, cond, guidance, latents)
        return state, codec.decode_images(vae_params, finished)

    def _scan(self, denoiser, vae_params, state, cond, guidance, clip):
        """Every call of a clip (frames [T, f, H, W, 3] and their control images, or an int32 [T]
        of call numbers for text-to-image) -> (the state after it, images [T, f, H, W, 3])."""
        def call(state, frames):
            if isinstance(frames, tuple):
                return self._images(denoiser, vae_params, state, cond, guidance, *frames)
            return self._images(denoiser, vae_params, state, cond, guidance, None)

        return jax.lax.scan(call, state, clip)

    @property
    def takes_frames(self) -> bool:
        """Each call takes frames: to redraw (image to image) or to steer the ControlNets."""
        return self.image_to_image or self.control is not None

    def _inputs(self, frames: Any) -> tuple:
        """One call's frames checked, and their control images: () for text-to-image."""
        frames = self._frames(frames)
        if frames is None:
            return ()
        return frames, None if self.control is None else self.control.images(frames)

    def _frames(self, frames: Any) -> np.ndarray | None:
        """One call's frames checked: [f, H, W, 3] float32 in [0, 1], or None for text-to-image."""
        if not self.takes_frames:
            if frames is not None:
                raise PipelineError("this stream draws from text alone (image_to_image=False): pass no frames.")
            return None
        f, height, width, _ = self.frame_shape
        if frames is None:
            raise PipelineError(f"this is an image-to-image stream: pass frames [{f}, {height}, {width}, 3].")
        frames = checked_image(frames, f)
        if frames.shape != (f, height, width, 3):
            raise PipelineError(f"frames must be [{f}, {height}, {width}, 3] (the stream's frame_buffer_size and "
                                f"size), got {frames.shape}; resize them or make the stream at their size.")
        return frames

    def __call__(self, frames: Any = None) -> np.ndarray:
        inputs = self._inputs(frames) or (None,)
        self.state, images = self.programs.run("stream", self._images, self.denoiser, self.vae_params, self.state,
                                               self.cond, self.guidance, *inputs, donate=2, record=self.record)
        return self._checked(images)

    def run(self, clip: Any = None, calls: int | None = None) -> np.ndarray:
        """A whole clip [T, f, H, W, 3] (image-to-image), or `calls` calls (text-to-image), in one
        compiled scan -> images [T, f, H, W, 3]; the stream's state carries on afterwards."""
        if self.takes_frames:
            if clip is None:
                raise PipelineError("this is an image-to-image stream: pass the clip [T, f, H, W, 3].")
            xs = jax.tree.map(lambda *calls: np.stack(calls), *(self._inputs(frames) for frames in clip))
        else:
            if clip is not None or calls is None:
                raise PipelineError("this stream draws from text alone: pass calls=T and no clip.")
            xs = np.arange(calls, dtype=np.int32)
        self.state, images = self.programs.run("clip", self._scan, self.denoiser, self.vae_params, self.state,
                                               self.cond, self.guidance, xs, donate=2, record=self.record)
        return self._checked(images)

    @staticmethod
    def _checked(images: jax.Array) -> np.ndarray:
        images = np.asarray(images)
        check_finite("the stream's images", images, "the model's weights or an overflow in half precision")
        return images
