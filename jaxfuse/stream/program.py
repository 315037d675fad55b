"""`Stream`: a stream batch (`jaxfuse.sampling.stream`) on a pipeline, as one compiled call from
frames to images, and as one `lax.scan` over a whole clip for offline video and benchmarks.

Legend: f frames per call, T calls, H/W the image size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfuse import schedulers
from jaxfuse.config import ParallelConfig
from jaxfuse.models.vae import AutoencoderKL
from jaxfuse.parallel.mesh import make_mesh, place
from jaxfuse.parallel.slots import slots_mesh
from jaxfuse.pipeline import SDXLPipeline, check_finite, vae_mean
from jaxfuse.sampling import stream
from jaxfuse.sampling.stream import StreamConfig, StreamGuidance
from jaxfuse.schedulers import PredictionType
from jaxfuse.spec import PipelineError, checked_image

STREAM_SCHEDULE_STEPS = 50  # the LCM schedule `t_index_list` indexes (StreamDiffusion's num_inference_steps)


class Stream:
    """A running stream: `stream(frames)` takes f frames [f, H, W, 3] (image-to-image; None for
    text-to-image) and returns the f images [f, H, W, 3] float32 in [0, 1] of the frames that
    entered `config.slots - 1` calls before (the first calls return the empty buffer's images).
    `update_prompt` changes the prompt from the next call on, compiling nothing.

    Over devices, either `slot_parallel`: one slot per device, the first `config.slots` devices;
    or `patch_parallel`: every image split by rows over `patch_parallel.devices` devices, in its
    mode (sync equals one device; displaced carries each image's stale context with it, its first
    step as `config.first_step` says). The VAE runs outside the split, on the whole image."""

    def __init__(self, pipe: SDXLPipeline, prompt: str, negative_prompt: str | None = None, *,
                 config: StreamConfig = StreamConfig(), image_to_image: bool = True, height: int | None = None,
                 width: int | None = None, guidance_scale: float = 1.2, delta: float = 1.0, seed: int = 0,
                 schedule_steps: int = STREAM_SCHEDULE_STEPS, slot_parallel: bool = False,
                 patch_parallel: ParallelConfig | None = None):
        parallel = patch_parallel or ParallelConfig()
        if slot_parallel and patch_parallel is not None:
            raise PipelineError("a stream spreads either its slots (slot_parallel) or its images' rows "
                                "(patch_parallel) over devices, not both; choose one.")
        if slot_parallel and len(jax.devices()) < config.slots:
            raise PipelineError(f"slot_parallel puts each of the {config.slots} slots on its own device; "
                                f"{len(jax.devices())} are present; list fewer steps in t_index_list or set "
                                "slot_parallel=False.")
        if parallel.cfg_parallel:
            raise PipelineError("a stream's guidance rows stay together (rcfg); drop cfg_parallel.")
        if config.rcfg.uses_residual and pipe.spec.scheduler.prediction_type is not PredictionType.EPSILON:
            raise PipelineError(f"rcfg {config.rcfg.value!r} takes the residual noise for the model's negative "
                                "prediction, which needs an epsilon-prediction model; use rcfg 'full' or 'none'.")
        self.pipe, self.config, self.image_to_image = pipe, config, image_to_image
        self.request = pipe.spec.request(prompt, negative_prompt, height=height, width=width, seed=seed,
                                         parallel=parallel)
        self.schedule = schedulers.lcm_at(pipe.spec.scheduler, schedule_steps, config.t_index_list)
        self.guidance = StreamGuidance(jnp.float32(guidance_scale), jnp.float32(delta))
        mesh = slots_mesh(config.slots) if slot_parallel else make_mesh(parallel) if patch_parallel else None
        # On a mesh, what the calls read lives on its devices (replicated; the state as it is split).
        self._placed = (lambda tree: tree) if mesh is None else (lambda tree: place(tree, NamedSharding(mesh, P())))
        self.unet_params, self.vae_params = self._placed(pipe.unet_params), self._placed(pipe.vae_params)
        self.cond = self._placed(pipe.conditioning(self.request, negative=True))
        latent_shape = pipe.spec.latent_shape(1, self.request.height, self.request.width)[1:]
        self.state = stream.initial_state(config, latent_shape, seed)
        if mesh is not None:
            self.state = stream.on_mesh(pipe.unet, self.unet_params, config, self.schedule, self.cond,
                                           self.guidance, self.state, mesh, parallel)
        self._program = stream.stream_program(pipe.unet, config, self.schedule, mesh, parallel)
        self._call = jax.jit(self._images, donate_argnums=2)
        self._clip = jax.jit(self._scan, donate_argnums=2)

    @property
    def frame_shape(self) -> tuple[int, int, int, int]:
        return self.config.frame_buffer_size, self.request.height, self.request.width, 3

    def update_prompt(self, prompt: str, negative_prompt: str | None = None) -> None:
        """The prompt of every step from the next call on (the images in flight too, as the
        reference implementation does)."""
        request = self.pipe.spec.request(prompt, negative_prompt, height=self.request.height,
                                         width=self.request.width)
        self.cond = self._placed(self.pipe.conditioning(request, negative=True))
        self.request = request

    def _images(self, unet_params, vae_params, state, cond, guidance, frames):
        """One call: frames [f, H, W, 3] (or None) -> (the next state, images [f, H, W, 3])."""
        pipe = self.pipe
        latents = None
        if frames is not None:
            latents = pipe.unet_latents(pipe.vae_function(vae_mean)(vae_params, pipe.vae_input(frames)))
        state, finished = self._program(unet_params, state, cond, guidance, latents)
        decoded = pipe.vae_function(AutoencoderKL.decode)(vae_params, pipe.vae_latents(finished))
        return state, pipe.images(decoded)

    def _scan(self, unet_params, vae_params, state, cond, guidance, clip):
        """Every call of a clip [T, f, H, W, 3] (or an int32 [T] of call numbers for
        text-to-image) -> (the state after it, images [T, f, H, W, 3])."""
        def call(state, frames):
            return self._images(unet_params, vae_params, state, cond, guidance,
                                frames if self.image_to_image else None)

        return jax.lax.scan(call, state, clip)

    def _frames(self, frames: Any) -> np.ndarray | None:
        """One call's frames checked: [f, H, W, 3] float32 in [0, 1], or None for text-to-image."""
        if not self.image_to_image:
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
        self.state, images = self._call(self.unet_params, self.vae_params, self.state, self.cond,
                                        self.guidance, self._frames(frames))
        return self._checked(images)

    def run(self, clip: Any = None, calls: int | None = None) -> np.ndarray:
        """A whole clip [T, f, H, W, 3] (image-to-image), or `calls` calls (text-to-image), in one
        compiled scan -> images [T, f, H, W, 3]; the stream's state carries on afterwards."""
        if self.image_to_image:
            if clip is None:
                raise PipelineError("this is an image-to-image stream: pass the clip [T, f, H, W, 3].")
            xs = np.stack([self._frames(frames) for frames in clip])
        else:
            if clip is not None or calls is None:
                raise PipelineError("this stream draws from text alone: pass calls=T and no clip.")
            xs = np.arange(calls, dtype=np.int32)
        self.state, images = self._clip(self.unet_params, self.vae_params, self.state, self.cond,
                                        self.guidance, xs)
        return self._checked(images)

    @staticmethod
    def _checked(images: jax.Array) -> np.ndarray:
        images = np.asarray(images)
        check_finite("the stream's images", images, "the model's weights or an overflow in half precision")
        return images
