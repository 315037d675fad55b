"""The SDXL pipeline, one concern per module:

    sdxl      SDXLPipeline: parse a request, orchestrate (condition, noise, loop, decode)
    request   the request (a core and optional parts: image to image, a canvas) and its result
    text      tokenizing, prompt encoding, negative prompts, micro-conditioning
    codec     the VAE both ways: latent scaling, whole, on a mesh or in tiles
    canvas    where the latents lie: one image, or a canvas's views, regions and their colours
    load      load_pipeline: models, the converted-weights cache, LoRAs, the weights' check;
              start_processes for a multi-host run
"""

from jaxfuse.pipeline.load import load_models, load_pipeline, start_processes
from jaxfuse.pipeline.request import Generation, NonFiniteError, Request, check_finite
from jaxfuse.pipeline.sdxl import SDXLPipeline
from jaxfuse.runtime.programs import COMPILE_CACHE_ENV, use_compile_cache

__all__ = ["COMPILE_CACHE_ENV", "Generation", "NonFiniteError", "Request", "SDXLPipeline", "check_finite",
           "load_models", "load_pipeline", "start_processes", "use_compile_cache"]
