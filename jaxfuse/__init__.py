"""jaxfuse: DistriFusion-style patch-parallel inference for Stable Diffusion XL in JAX/Flax."""

from jaxfuse.config import UNetConfig
from jaxfuse.models.unet import load_unet
from jaxfuse.pipeline import SDXLPipeline, load_pipeline

__all__ = ["SDXLPipeline", "UNetConfig", "load_pipeline", "load_unet"]
