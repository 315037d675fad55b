"""jaxfuse: DistriFusion-style patch-parallel inference for Stable Diffusion XL in JAX/Flax."""

from checkpoints_conversion.convert_diffusers import load_unet
from jaxfuse.config import UNetConfig

__all__ = ["UNetConfig", "load_unet"]
