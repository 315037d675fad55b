"""jaxfuse: DistriFusion-style patch-parallel inference for Stable Diffusion XL in JAX/Flax.

The public API, imported on first use (so `import jaxfuse` stays light):

    load_pipeline, SDXLPipeline, use_compile_cache   jaxfuse.pipeline
    read_settings                    jaxfuse.outputs (the settings a PNG was made with)
    load_unet                        jaxfuse.models.unet
    ParallelConfig, Mode, GroupNormMode, UNetConfig, VAEConfig, TextEncoderConfig   jaxfuse.config
    SchedulerKind                    jaxfuse.schedulers
    Stream                           jaxfuse.stream (live generation, StreamDiffusion)
    StreamConfig, RCFG               jaxfuse.sampling.stream
"""

import importlib

_PUBLIC = {
    "load_pipeline": "jaxfuse.pipeline",
    "SDXLPipeline": "jaxfuse.pipeline",
    "use_compile_cache": "jaxfuse.pipeline",
    "read_settings": "jaxfuse.outputs",
    "load_unet": "jaxfuse.models.unet",
    "ParallelConfig": "jaxfuse.config",
    "Mode": "jaxfuse.config",
    "GroupNormMode": "jaxfuse.config",
    "UNetConfig": "jaxfuse.config",
    "VAEConfig": "jaxfuse.config",
    "TextEncoderConfig": "jaxfuse.config",
    "SchedulerKind": "jaxfuse.schedulers",
    "Stream": "jaxfuse.stream",
    "StreamConfig": "jaxfuse.sampling.stream",
    "RCFG": "jaxfuse.sampling.stream",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'jaxfuse' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__():
    return __all__
