"""The shipped demo model: it loads by SDXL's path, equals diffusers on its own weights and is
what `python -m jaxfuse.generate` runs with no arguments, which draws what the default prompt
asks for; and the training script that made it runs end to end. How well it follows its prompts
over many captions is measured by benchmarks/quality.py."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from conftest import our_step_noise
from PIL import Image

from jaxfuse.demo import DEMO_LCM_LORA, DEMO_MODEL, DEMO_PROMPT
from jaxfuse.demo.architecture import IMAGE_SIZE, demo_architecture
from jaxfuse.demo.detect import prompt_accuracy
from jaxfuse.demo.train import TrainConfig, train
from jaxfuse.generate import main
from jaxfuse.parallel_config import ParallelConfig
from jaxfuse.pipeline import load_pipeline
from jaxfuse.spec import PipelineSpec

MB = 2**20
LCM_REQUEST = dict(prompt=DEMO_PROMPT, num_inference_steps=4, guidance_scale=1.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(DEMO_MODEL, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda _: None)


def test_shipped_model_is_small_and_an_sdxl_pipeline_folder():
    size = sum(p.stat().st_size for p in DEMO_MODEL.rglob("*") if p.is_file())
    assert size <= 30 * MB and DEMO_LCM_LORA.stat().st_size <= 4 * MB
    spec = PipelineSpec.read(DEMO_MODEL)
    arch = demo_architecture(spec.vae.scaling_factor)
    assert (spec.unet, spec.vae) == (arch.unet, arch.vae)
    assert spec.default_size == IMAGE_SIZE and spec.unet.addition_embed_type == "text_time"
    assert spec.vae_factor == 8 and spec.vae.latent_channels == 4


@pytest.mark.slow
def test_shipped_model_generates_a_finite_image_quickly(pipe):
    result = pipe.generate(DEMO_PROMPT, num_inference_steps=4, parallel=ParallelConfig(4, "displaced", 1))
    image = result.images[0]
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(image).all()
    assert image.std() > 0.05  # a picture, not a flat field


def test_shipped_model_equals_diffusers(pipe):
    """The exported folder is a diffusers pipeline: loaded by diffusers, with the same noise, it
    makes the same image as jaxfuse (tokenizers, both encoders, UNet, scheduler and VAE)."""
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(DEMO_MODEL, torch_dtype=torch.float32)
    noise = np.random.default_rng(0).standard_normal((1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)).astype(np.float32)
    kwargs = dict(prompt=DEMO_PROMPT, num_inference_steps=6, guidance_scale=5.0)
    ours = pipe(**kwargs, latents=noise)
    ref = reference(**kwargs, latents=torch.from_numpy(noise), output_type="np").images
    assert np.abs(ours - ref).max() < 5e-5  # measured 5.5e-6


def test_generate_without_arguments_draws_the_default_prompt_on_4_emulated_devices(tmp_path):
    out = tmp_path / "jaxfuse.png"
    assert main(["--output", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert (settings["devices"], settings["mode"], settings["height"]) == (4, "displaced", IMAGE_SIZE)
    assert settings["prompt"] == DEMO_PROMPT
    image = np.asarray(Image.open(out))
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert prompt_accuracy(DEMO_PROMPT, image) == 1.0  # each named shape, in its colour and cell


@pytest.mark.slow
def test_training_runs_resumes_and_exports_a_loadable_model(tmp_path):
    """A few steps of every stage; a second run with more steps resumes from the checkpoints."""
    cfg = TrainConfig(vae_steps=2, vae_batch=2, decoder_steps=2, dataset_size=256, unet_steps=2, unet_batch=4,
                      log_every=1, checkpoint_every=1)
    train(cfg, tmp_path / "work", None, log=lambda _: None)
    lines = []
    longer = TrainConfig(**{**cfg.__dict__, "unet_steps": 3})
    train(longer, tmp_path / "work", tmp_path / "model", log=lines.append)
    assert "unet: resuming at step 2" in lines
    assert not any(line.startswith(("vae step", "decoder step")) for line in lines)
    assert any(line.startswith("unet step 3/3") for line in lines)
    pipe = load_pipeline(tmp_path / "model", cache_dir=tmp_path / "cache", log=lambda _: None)
    image = pipe("a red circle in the centre", num_inference_steps=2)[0]
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(image).all()
    assert jax.tree.leaves(pipe.denoiser.params)[0].dtype == np.float32


@pytest.mark.slow
def test_lcm_distillation_runs_and_exports_a_lora_diffusers_reads(tmp_path):
    """Two steps (resuming is `demo.train`'s loop, tested above); the exported LoRA gives
    diffusers' LCM image on the demo model. The first step's loss is the teacher's one-step
    consistency gap: positive and small."""
    from jaxfuse.demo.train_lcm import LCMConfig
    from jaxfuse.demo.train_lcm import train as train_lcm

    lines = []
    state = train_lcm(LCMConfig(steps=2, batch=2, log_every=1), tmp_path / "run", tmp_path / "lcm.safetensors",
                      log=lines.append)
    assert int(state["step"]) == 2
    first = next(line for line in lines if line.startswith("lcm step 1/2"))
    assert 0 < float(first.split("loss ")[1].split()[0]) < 1

    noise = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype(np.float32)
    pipe = load_pipeline(DEMO_MODEL, cache_dir=tmp_path / "run" / "cache", log=lambda _: None,
                         loras=[(tmp_path / "lcm.safetensors", 1.0)])
    ours = pipe(**LCM_REQUEST, scheduler="lcm", latents=noise)
    assert np.abs(ours - diffusers_lcm_image(tmp_path / "lcm.safetensors", noise)).max() < 2e-5  # measured 1.3e-6


def test_shipped_lcm_lora_equals_diffusers_and_draws_the_default_prompt(tmp_path):
    """The shipped few-step LoRA, read by jaxfuse and by diffusers: the same 4-step image, which
    draws the default prompt."""
    noise = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype(np.float32)
    pipe = load_pipeline(DEMO_MODEL, cache_dir=tmp_path, log=lambda _: None, loras=[(DEMO_LCM_LORA, 1.0)])
    ours = pipe(**LCM_REQUEST, scheduler="lcm", latents=noise)
    assert np.abs(ours - diffusers_lcm_image(DEMO_LCM_LORA, noise)).max() < 2e-5  # measured 1.9e-6
    assert prompt_accuracy(DEMO_PROMPT, np.round(ours[0] * 255).astype(np.uint8)) == 1.0


@pytest.mark.slow
def test_few_step_command_draws_the_default_prompt(tmp_path):
    out = tmp_path / "lcm.png"
    args = ["--lora", "demo-lcm", "--scheduler", "lcm", "--steps", "4", "--guidance-scale", "1"]
    assert main([*args, "--output", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["lora"] == ["demo-lcm"]
    assert prompt_accuracy(DEMO_PROMPT, np.asarray(Image.open(out))) == 1.0


def diffusers_lcm_image(lora: Path, noise: np.ndarray) -> np.ndarray:
    """diffusers' image for `LCM_REQUEST` on the demo model with the LoRA file `lora` fused, from
    the initial noise `noise` and jaxfuse's per-step noise."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(DEMO_MODEL, torch_dtype=torch.float32)
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    reference.load_lora_weights(str(lora.parent), weight_name=lora.name)
    reference.fuse_lora()
    with our_step_noise(reference.scheduler):
        return reference(**LCM_REQUEST, latents=torch.from_numpy(noise), output_type="np").images
