"""jaxfuse: DistriFusion-style patch-parallel inference for Stable Diffusion XL in JAX/Flax."""

from jaxfuse.config import UNetConfig
from jaxfuse.models.unet import load_unet

__all__ = ["UNetConfig", "load_unet"]
