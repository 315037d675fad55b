"""Convert diffusers weights (safetensors) to jaxfuse's converted form (orbax), once.

    python -m checkpoints_conversion.convert_diffusers SRC_PIPELINE_DIR DST_DIR [--dtype bfloat16]
    python -m checkpoints_conversion.convert_diffusers SRC_MODEL.safetensors DST_DIR [--dtype bfloat16]
    python -m checkpoints_conversion.convert_diffusers SRC_MODEL_DIR DST_DIR [--variant fp16]

A diffusers SDXL pipeline folder, or a single-file checkpoint in Stability's layout (with its VAE,
`jaxfuse.single_file`), becomes a converted pipeline folder, written by the same writer
as the pipeline's cache, which `python -m jaxfuse.generate --model DST_DIR` and
`jaxfuse.load_pipeline(DST_DIR)` load as they are. One model folder (`unet/`, `vae/`,
`text_encoder/`, `text_encoder_2/`, told apart by its config) becomes its config.json plus orbax
params, which `jaxfuse.load_unet` (or `load_vae`, `load_text_encoder`) reads. The reading,
matching and writing are `jaxfuse.checkpoint`'s: a checkpoint that does not fit, or holds NaN or
infinity, is refused with the tensors listed. The destination is checked before anything is read.

Exit codes: every jaxfuse command's (`jaxfuse.commands`); 0 is converted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxfuse import checkpoint
from jaxfuse.commands import run_command
from jaxfuse.models.clip import load_text_encoder
from jaxfuse.models.unet import load_unet
from jaxfuse.models.vae import load_vae
from jaxfuse.outputs import check_writable_folder
from jaxfuse.pipeline.load import load_models, save_converted
from jaxfuse.spec import PipelineSpec

# A model folder's kind, by its config's diffusers `_class_name` or transformers `architectures`.
MODEL_LOADERS = {"UNet2DConditionModel": load_unet, "AutoencoderKL": load_vae, "CLIPTextModel": load_text_encoder,
                 "CLIPTextModelWithProjection": load_text_encoder}


def convert(src: str | Path, dst: str | Path, dtype: Any = jnp.float32, variant: str | None = None) -> Path:
    """Converts the pipeline or model folder `src` into the new folder `dst` (module docstring)."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    check_writable_folder(dst)  # a file at or above `dst`, or a folder that takes no new file
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder (nothing was written).")
    if (src / "model_index.json").is_file() or src.is_file():
        if variant:
            raise ValueError("--variant applies to one model folder; a pipeline folder or single file is read as "
                             "it is (an fp16 file is taken when it is a model's only weights).")
        spec = PipelineSpec.read(src)
        save_converted(spec, dst, load_models(spec, src, dtype))
        return dst
    config_path = src / checkpoint.CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{src} holds neither model_index.json (a pipeline folder) nor "
                                f"{checkpoint.CONFIG_NAME} (a model folder).")
    config = json.loads(config_path.read_text())
    kinds = [config.get("_class_name"), *config.get("architectures", [])]
    loader = next((MODEL_LOADERS[k] for k in kinds if k in MODEL_LOADERS), None)
    if loader is None:
        raise ValueError(f"{config_path} describes a {' / '.join(filter(None, kinds)) or 'model of no named class'}; "
                         f"jaxfuse converts {', '.join(MODEL_LOADERS)}.")
    _, params = loader(src, dtype, dtype, variant)
    checkpoint.save_params(dst, config_path.read_text(), params)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m checkpoints_conversion.convert_diffusers",
        description="Convert a diffusers SDXL pipeline folder, or one model folder, into jaxfuse's orbax form.",
    )
    parser.add_argument("src", help="a diffusers SDXL pipeline folder, a single-file SDXL checkpoint (.safetensors), "
                                    "or one model folder (unet/, vae/, ...)")
    parser.add_argument("dst", help="new folder for the converted pipeline or model")
    parser.add_argument("--variant", choices=["fp16"], help="one model folder: read its *.fp16.safetensors")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype the parameters are stored in (a VAE that says force_upcast stays float32)")
    args = parser.parse_args(argv)

    def work() -> None:
        start = time.perf_counter()
        dst = convert(args.src, args.dst, jnp.dtype(args.dtype), args.variant)
        print(f"converted {args.src} -> {dst} in {time.perf_counter() - start:.1f} s")

    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
