"""What a pipeline folder holds and what a request to it may ask, checked from the folder's small
config files alone, before any weight is loaded or anything is compiled."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp

from jaxfuse import schedulers
from jaxfuse.checkpoint import CONFIG_NAME, MODEL_COMPONENTS, PARAMS_DIR, TOKENIZERS
from jaxfuse.config import ParallelConfig, UNetConfig, VAEConfig


class PipelineError(ValueError):
    """A model folder or a request the pipeline cannot serve; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline folder holds, read from its small config files alone, so a request can
    be checked before any weight is loaded."""

    folder: Path
    unet: UNetConfig
    vae: VAEConfig
    scheduler: schedulers.SchedulerConfig
    force_zeros_for_empty_prompt: bool
    converted: bool  # every model folder holds orbax params already

    @classmethod
    def read(cls, folder: str | Path) -> PipelineSpec:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise PipelineError(f"{folder} is not a folder; pass a diffusers SDXL pipeline folder.")
        wanted = ["model_index.json", "scheduler/scheduler_config.json",
                  *(f"{c}/{CONFIG_NAME}" for c in MODEL_COMPONENTS),
                  *(f"{t}/tokenizer_config.json" for t in TOKENIZERS)]
        missing = [name for name in wanted if not (folder / name).is_file()]
        if missing:
            raise PipelineError(f"{folder} is not an SDXL pipeline folder: missing {', '.join(missing)}.")

        def config(name):
            return json.loads((folder / name).read_text())

        return cls(
            folder=folder,
            unet=UNetConfig.from_diffusers(config(f"unet/{CONFIG_NAME}")),
            vae=VAEConfig.from_diffusers(config(f"vae/{CONFIG_NAME}")),
            scheduler=schedulers.SchedulerConfig.from_diffusers(config("scheduler/scheduler_config.json")),
            force_zeros_for_empty_prompt=bool(config("model_index.json").get("force_zeros_for_empty_prompt", True)),
            converted=all((folder / c / PARAMS_DIR).is_dir() for c in MODEL_COMPONENTS),
        )

    @property
    def vae_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this."""
        return self.vae_factor * self.unet.downsample_factor

    @property
    def default_size(self) -> int:
        return (self.unet.sample_size or 128) * self.vae_factor

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, self.unet.in_channels, height // self.vae_factor, width // self.vae_factor)

    def check_request(self, height: int, width: int, num_steps: int, batch: int = 1,
                      latents_shape: tuple[int, ...] | None = None, patches: int = 1) -> None:
        """One clear error for a request that cannot run. Split over `patches` devices, the
        latent height must divide into equal patches that the UNet can halve at every level."""
        for name, size, f in (("height", height, self.size_multiple * patches), ("width", width, self.size_multiple)):
            if size <= 0 or size % f:
                why = (f"VAE factor {self.vae_factor} x UNet factor {self.unet.downsample_factor}"
                       + (f" x {patches} patches" if name == "height" and patches > 1 else ""))
                nearest = " or ".join(str(v) for v in (size // f * f, (size // f + 1) * f) if v > 0)
                raise PipelineError(f"{name} {size} must be a positive multiple of {f} ({why}); "
                                    f"nearest valid: {nearest}.")
        if num_steps < 1:
            raise PipelineError(f"steps must be at least 1, got {num_steps}.")
        expected = self.latent_shape(batch, height, width)
        if latents_shape is not None and tuple(latents_shape) != expected:
            raise PipelineError(f"latents have shape {tuple(latents_shape)}; {height}x{width} with batch "
                                f"{batch} needs {expected} (diffusers layout, unscaled noise).")

    def largest_layout(self, height: int, wanted: int, layout: Callable[[int], ParallelConfig],
                       cfg_parallel: bool = False) -> ParallelConfig:
        """`layout(n)` for the most devices n <= `wanted` whose patches the image's rows divide
        into (even counts only with `cfg_parallel`): the device-count policy when none is named."""
        for devices in range(wanted, 0, -1):
            if cfg_parallel and devices % 2:
                continue
            parallel = layout(devices)  # a setting it refuses is wrong at any count
            if height % (self.size_multiple * parallel.patches) == 0:
                return parallel
        raise PipelineError(f"no device count up to {wanted} splits a height of {height} (--cfg-parallel needs "
                            "an even count); name one with --devices.")

    def dtypes(self, dtype: jnp.dtype) -> dict[str, jnp.dtype]:
        """Each model's dtype. The VAE stays in float32 when its config says `force_upcast`
        (SDXL's VAE overflows in half precision)."""
        vae_dtype = jnp.dtype(jnp.float32) if self.vae.force_upcast else dtype
        return {"unet": dtype, "vae": vae_dtype, "text_encoder": dtype, "text_encoder_2": dtype}
