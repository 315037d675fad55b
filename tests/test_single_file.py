"""Single-file SDXL checkpoints (Stability's layout) through jaxfuse's own loader, against diffusers'
`from_single_file` on the same file: the base (fp16 file, float32 compute), the file without its
VAE plus a VAE folder or file, the refiner as a file; the cache of converted files; bad files
refused before anything loads. The files come from `sdxl_single_file`'s writer, which
`test_single_file_writer.py` checks tensor by tensor against diffusers' loader."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from lora_files import peft_file
from safetensors.numpy import save_file

from checkpoints_conversion.convert_diffusers import convert
from jaxfuse.generate import main as generate_main
from jaxfuse.pipeline import load_pipeline
from jaxfuse.single_file import SingleFileError
from jaxfuse.spec import PipelineError, PipelineSpec

HEIGHT, WIDTH = 64, 128  # the refiner's UNet halves the latents three times
REQUEST = dict(prompt="a red circle at the top left", negative_prompt="a blue square", guidance_scale=6.0,
               height=HEIGHT, width=WIDTH, num_inference_steps=5)


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def from_single_file(files, name, cls=StableDiffusionXLPipeline, **kwargs):
    folder = files["refiner" if cls is StableDiffusionXLImg2ImgPipeline else "base"]
    return cls.from_single_file(str(files[name]), config=str(folder), local_files_only=True,
                                torch_dtype=torch.float32, **kwargs)


def quiet(_):
    pass


@pytest.fixture(scope="module")
def base(tiny_single_files, tmp_path_factory):
    return load_pipeline(tiny_single_files["base_file"], cache_dir=tmp_path_factory.mktemp("cache"), log=quiet)


def test_a_single_file_gives_diffusers_image(base, tiny_single_files, noise):
    """fp16 weights in the file, float32 compute; the prompts through CLIP's shipped tokenizer."""
    reference = from_single_file(tiny_single_files, "base_file")
    expected = reference(**REQUEST, latents=torch.from_numpy(noise), output_type="np").images
    ours = base(**REQUEST, latents=noise)
    assert np.abs(ours - expected).max() < 2e-4  # measured 1.2e-5
    assert base.spec.single_file.kind == "sdxl" and base.spec.encoders == ("text_encoder", "text_encoder_2")


@pytest.mark.parametrize("vae", ["vae_file", pytest.param("vae_folder", marks=pytest.mark.slow)])
def test_a_file_without_its_vae_takes_one(tiny_single_files, noise, tmp_path, vae):
    """A VAE in a file of its own (Stability's layout) or a diffusers folder, as diffusers users pass it."""
    path = tiny_single_files["vae_file"] if vae == "vae_file" else tiny_single_files["base"] / "vae"
    with pytest.raises(PipelineError, match="holds no VAE: pass one with --vae"):
        PipelineSpec.read(tiny_single_files["base_file_no_vae"])
    pipe = load_pipeline(tiny_single_files["base_file_no_vae"], vae=path, cache_dir=tmp_path, log=quiet)
    if vae == "vae_file":  # diffusers' own reading of the VAE file (fp16 weights)
        reference_vae = AutoencoderKL.from_single_file(str(path), config=str(tiny_single_files["base"]),
                                                       subfolder="vae", local_files_only=True,
                                                       torch_dtype=torch.float32)
    else:
        reference_vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    reference = from_single_file(tiny_single_files, "base_file_no_vae", vae=reference_vae)
    expected = reference(**REQUEST, latents=torch.from_numpy(noise), output_type="np").images
    ours = pipe(**REQUEST, latents=noise)
    assert np.abs(ours - expected).max() < 2e-4  # measured 9.9e-6 (folder), 1.2e-5 (file)


@pytest.mark.slow
def test_a_refiner_file_finishes_a_base_file(tiny_single_files, noise, tmp_path):
    """Both models as single files: the ensemble equals diffusers' base + refiner from the same files."""
    pipe = load_pipeline(tiny_single_files["base_file"], refiner=tiny_single_files["refiner_file"],
                         cache_dir=tmp_path, log=quiet)
    assert pipe.refiner.spec.single_file.kind == "sdxl-refiner" and pipe.refiner.spec.encoders == ("text_encoder_2",)
    ours = pipe(**REQUEST, latents=noise, refiner_start=0.6, aesthetic_score=7.0)
    latents = from_single_file(tiny_single_files, "base_file")(
        **REQUEST, latents=torch.from_numpy(noise), denoising_end=0.6, output_type="latent").images
    refine = {k: v for k, v in REQUEST.items() if k not in ("height", "width")}
    expected = from_single_file(tiny_single_files, "refiner_file", StableDiffusionXLImg2ImgPipeline)(
        **refine, image=latents, denoising_start=0.6, aesthetic_score=7.0, output_type="np").images
    assert np.abs(ours - expected).max() < 2e-4  # measured 8.8e-6


@pytest.mark.slow
def test_a_converted_file_is_cached_by_its_contents(tiny_single_files, noise, tmp_path):
    lines = []
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(tiny_single_files["base_file"].read_bytes())
    first = load_pipeline(copy, cache_dir=tmp_path / "cache", log=lines.append)(**REQUEST, latents=noise)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("model-")
    assert {p.name for p in entries[0].iterdir()} >= {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                       "tokenizer_2", "scheduler", "model_index.json"}
    lines.clear()
    second = load_pipeline(copy, cache_dir=tmp_path / "cache", log=lines.append)(**REQUEST, latents=noise)
    assert any("from the cache" in line for line in lines)
    np.testing.assert_array_equal(first, second)
    os.utime(copy, ns=(0, 0))  # a changed file (here only its times) is a new key: converted again
    load_pipeline(copy, cache_dir=tmp_path / "cache", log=quiet)
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.slow
def test_a_file_converts_to_a_pipeline_folder(tiny_single_files, base, noise, tmp_path):
    """`checkpoints_conversion.convert_diffusers FILE DST`: the folder the cache holds, loadable as it is."""
    dst = convert(tiny_single_files["base_file"], tmp_path / "converted")
    assert PipelineSpec.read(dst).converted
    converted = load_pipeline(dst, log=quiet)
    np.testing.assert_array_equal(converted(**REQUEST, latents=noise), base(**REQUEST, latents=noise))


@pytest.mark.slow
def test_a_lora_fuses_into_a_single_file_model(tiny_single_files, base, noise, tmp_path):
    """A LoRA is planned against the file's own configs (its text encoders' from their shapes): it
    changes the image exactly as it does on the converted folder of the same file."""
    path, _ = peft_file(tiny_single_files["base"], tmp_path)
    with_lora = load_pipeline(tiny_single_files["base_file"], loras=[(path, 0.8)], cache_dir=tmp_path / "cache",
                              log=quiet)(**REQUEST, latents=noise)
    converted = convert(tiny_single_files["base_file"], tmp_path / "converted")
    np.testing.assert_array_equal(with_lora, load_pipeline(converted, loras=[(path, 0.8)], log=quiet)(
        **REQUEST, latents=noise))
    assert np.abs(with_lora - base(**REQUEST, latents=noise)).max() > 1e-2


def write_tensors(path, names_shapes):
    save_file({name: np.zeros(shape, np.float16) for name, shape in names_shapes.items()}, str(path))


def test_bad_files_are_refused_before_anything_loads(tiny_single_files, tmp_path):
    cache = tmp_path / "cache"

    def refused(path, match, error=SingleFileError, **kwargs):
        with pytest.raises(error, match=match):
            load_pipeline(path, cache_dir=cache, log=quiet, **kwargs)
        assert not cache.exists()

    sd15 = tmp_path / "sd15.safetensors"
    write_tensors(sd15, {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                         "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
                         "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)})
    refused(sd15, r"is not SDXL: .* as Stable Diffusion 1.x/2.x files do")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_single_files["base_file"].read_bytes()[:100_000])
    refused(truncated, "truncated or damaged")
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04not to be unpickled")
    refused(pickled, "jaxfuse never unpickles")
    from safetensors.numpy import load_file
    tensors = load_file(str(tiny_single_files["base_file"]))
    missing = tmp_path / "no-clip-l.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("conditioner.embedders.0.")}, str(missing))
    refused(missing, "conditioner.embedders.0")
    refused(tiny_single_files["vae_file"], "is a VAE alone", PipelineError)
    refused(tiny_single_files["base_file"], "holds no VAE tensors", PipelineError,
            vae=tiny_single_files["base_file_no_vae"])


@pytest.mark.slow
def test_the_command_line_takes_a_file_and_a_vae_file(tiny_single_files, tmp_path, capsys):
    output = tmp_path / "image.png"
    code = generate_main(["--model", str(tiny_single_files["base_file_no_vae"]), "--vae",
                          str(tiny_single_files["vae_file"]), "--height", "64", "--width", "64", "--steps", "2",
                          "--output", str(output), "--cache-dir", str(tmp_path / "cache"), "--devices", "1"])
    assert code == 0, capsys.readouterr().err
    settings = json.loads(output.with_suffix(".json").read_text())["settings"]
    assert settings["model"] == str(tiny_single_files["base_file_no_vae"])
