"""jaxfuse: DistriFusion-style patch-parallel inference for Stable Diffusion XL in JAX/Flax.

The public API, imported on first use (so `import jaxfuse` stays light):

    load_pipeline, SDXLPipeline, start_processes   jaxfuse.pipeline
    Request, Region, Generation      jaxfuse.pipeline.request (a request checked; what it returns)
    use_compile_cache                jaxfuse.runtime.programs
    read_settings                    jaxfuse.outputs (the settings a PNG was made with)
    load_unet                        jaxfuse.models.unet
    UNetConfig, VAEConfig            jaxfuse.config
    TextEncoderConfig                jaxfuse.text_encoder_config
    ParallelConfig, Mode, GroupNormMode   jaxfuse.parallel_config
    SchedulerKind                    jaxfuse.scheduler_config
    Stream                           jaxfuse.stream (live generation, StreamDiffusion)
    StreamConfig, RCFG               jaxfuse.sampling.stream
"""

import importlib

_PUBLIC = {
    "load_pipeline": "jaxfuse.pipeline",
    "SDXLPipeline": "jaxfuse.pipeline",
    "start_processes": "jaxfuse.pipeline",
    "Request": "jaxfuse.pipeline.request",
    "Region": "jaxfuse.pipeline.request",
    "Generation": "jaxfuse.pipeline.request",
    "use_compile_cache": "jaxfuse.runtime.programs",
    "read_settings": "jaxfuse.outputs",
    "load_unet": "jaxfuse.models.unet",
    "ParallelConfig": "jaxfuse.parallel_config",
    "Mode": "jaxfuse.parallel_config",
    "GroupNormMode": "jaxfuse.parallel_config",
    "UNetConfig": "jaxfuse.config",
    "VAEConfig": "jaxfuse.config",
    "TextEncoderConfig": "jaxfuse.text_encoder_config",
    "SchedulerKind": "jaxfuse.scheduler_config",
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
