"""SDXL's refiner: diffusers' ensemble of experts (the base's `denoising_end`, the refiner's
`denoising_start`) and the refiner alone for image to image, against diffusers on tiny random
models (`jaxfuse.oracle.build_tiny_refiner`), and over devices against one device."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import our_step_noise
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from jaxfuse.generate import main as generate_main
from jaxfuse.oracle import build_tiny_refiner
from jaxfuse.parallel_config import Mode, ParallelConfig
from jaxfuse.pipeline import load_pipeline
from jaxfuse.spec import PipelineError, PipelineSpec

# The refiner's UNet halves the latents three times: sizes are multiples of 64 (and its patches' rows too).
HEIGHT, WIDTH = 64, 128
STEPS = 8
REQUEST = dict(prompt="a red circle at the top left", negative_prompt="a blue square", guidance_scale=6.0)
DIFFUSERS_SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpmpp-2m": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-refiner")
    build_tiny_refiner(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_folder, refiner_folder, tmp_path_factory):
    return load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path_factory.mktemp("cache"), refiner=refiner_folder,
                         log=lambda _: None)


@pytest.fixture(scope="module")
def references(tiny_sdxl_folder, refiner_folder):
    return (StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder),
            StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder))


def noise(height=HEIGHT, seed=0):
    return np.random.default_rng(seed).standard_normal((1, 4, height // 8, WIDTH // 8)).astype(np.float32)


def test_a_refiner_folder_has_the_second_text_encoder_only(refiner_folder):
    spec = PipelineSpec.read(refiner_folder)
    assert spec.encoders == ("text_encoder_2",) and spec.tokenizers == ("tokenizer_2",)
    assert spec.requires_aesthetics_score and not spec.force_zeros_for_empty_prompt
    assert json.loads((refiner_folder / "model_index.json").read_text())["text_encoder"] == [None, None]


def test_a_refiner_folder_missing_its_tokenizer_names_it(refiner_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(refiner_folder, broken, ignore=shutil.ignore_patterns("tokenizer_2"))
    with pytest.raises(PipelineError, match="missing tokenizer_2/tokenizer_config.json"):
        PipelineSpec.read(broken)


@pytest.mark.parametrize("scheduler, start", [("euler", 0.7), pytest.param("euler", 0.4, marks=pytest.mark.slow),
                                              pytest.param("dpmpp-2m", 0.7, marks=pytest.mark.slow)])
def test_the_ensemble_equals_diffusers(pipe, references, scheduler, start):
    """The base denoises to `denoising_end`, hands its latents as they are to the refiner, which
    finishes from `denoising_start` with its own text encoder and aesthetic scores."""
    base, refiner = references
    for model in references:
        model.scheduler = DIFFUSERS_SCHEDULERS[scheduler].from_config(model.scheduler.config)
    x = noise()
    ours = pipe(**REQUEST, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=x, scheduler=scheduler,
                refiner_start=start, aesthetic_score=7.0, negative_aesthetic_score=2.0)
    latents = base(**REQUEST, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=torch.from_numpy(x),
                   denoising_end=start, output_type="latent").images
    reference = refiner(**REQUEST, image=latents, num_inference_steps=STEPS, denoising_start=start,
                        aesthetic_score=7.0, negative_aesthetic_score=2.0, output_type="np").images
    assert ours.shape == reference.shape == (1, HEIGHT, WIDTH, 3)
    assert np.abs(ours - reference).max() < 5e-5  # measured 2.7e-6 (euler 0.7), 2.6e-6 (0.4), 2.7e-6 (dpmpp-2m)
    alone = pipe(**REQUEST, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=x, scheduler=scheduler)
    assert np.abs(ours - alone).max() > 1e-2  # the refiner changed the image


@pytest.mark.slow
def test_the_refiner_alone_redraws_an_image_as_diffusers_does(refiner_folder, references, tmp_path):
    """Image to image with the refiner alone (its aesthetic micro-conditioning, no first encoder)."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    refiner = references[1]
    refiner.scheduler = EulerDiscreteScheduler.from_config(refiner.scheduler.config)
    only = load_pipeline(refiner_folder, cache_dir=tmp_path, log=lambda _: None)
    image = np.random.default_rng(2).uniform(size=(1, HEIGHT, WIDTH, 3)).astype(np.float32)
    x = noise(seed=1)
    ours = only(**REQUEST, image=image, strength=0.6, num_inference_steps=STEPS, latents=x, aesthetic_score=5.0)
    with (torch.no_grad(),
          pytest.MonkeyPatch.context() as patch, our_step_noise(refiner.scheduler)):
        patch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(x))
        patch.setattr(module, "retrieve_latents", lambda output, **_: output.latent_dist.mode())
        reference = refiner(**REQUEST, image=torch.from_numpy(image.transpose(0, 3, 1, 2)), strength=0.6,
                            num_inference_steps=STEPS, aesthetic_score=5.0, output_type="np").images
    assert np.abs(ours - reference).max() < 5e-5  # measured 5.0e-6
    with pytest.raises(PipelineError, match="refiner_start needs a refiner"):
        only(**REQUEST, image=image, refiner_start=0.5)


@pytest.mark.slow
def test_progress_counts_the_steps_of_both_models(pipe):
    steps = []
    pipe.generate("a star", height=HEIGHT, width=WIDTH, num_inference_steps=5, refiner_start=0.6,
                  progress=lambda *a: steps.append(a))
    assert steps == [(i, 5) for i in range(1, 6)]


TALL = 128  # 16 latent rows: two patches of 8, which the refiner's UNet halves three times
TALL_REQUEST = dict(REQUEST, height=TALL, width=WIDTH, num_inference_steps=6, refiner_start=0.6,
                    tiled=False)  # 4 native areas: a canvas unless told otherwise


@pytest.fixture(scope="module")
def tall_single(pipe):
    return pipe(**TALL_REQUEST, latents=noise(TALL))


@pytest.mark.slow
@pytest.mark.parametrize("cfg_parallel", [False, True])
def test_the_ensemble_in_sync_equals_one_device(pipe, tall_single, cfg_parallel):
    parallel = ParallelConfig(2, Mode.SYNC, cfg_parallel=cfg_parallel)
    images = pipe(**TALL_REQUEST, latents=noise(TALL), parallel=parallel)
    assert np.abs(images - tall_single).max() < 5e-5  # measured 2.9e-6, 2.9e-6 (cfg-parallel)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.DISPLACED, Mode.PCPP, Mode.NAIVE])
def test_the_ensemble_runs_in_every_patch_mode(pipe, tall_single, mode):
    """Each model's loop warms up its own stale context; the result stays near one device's."""
    images = pipe(**TALL_REQUEST, latents=noise(TALL), parallel=ParallelConfig(2, mode, warmup_steps=1))
    error = np.abs(images - tall_single).mean()
    assert 0 < error < 0.2  # mean error, measured: displaced 8.3e-3, pcpp 8.4e-3, naive 4.0e-2 (random weights)


def test_requests_the_ensemble_cannot_serve_are_refused(pipe, tiny_sdxl_folder, tmp_path):
    kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS)
    with pytest.raises(PipelineError, match="leaves the model steps .* each needs at least one"):
        pipe("a star", refiner_start=0.01, **kwargs)
    with pytest.raises(PipelineError, match="refiner start must be a finite number in"):
        pipe("a star", refiner_start=1.5, **kwargs)
    with pytest.raises(PipelineError, match="the refiner's UNet: width 96 must be a positive multiple of 64"):
        pipe("a star", refiner_start=0.5, height=HEIGHT, width=96)
    with pytest.raises(PipelineError, match="the refiner finishes one image, not a tiled canvas"):
        pipe("a star", refiner_start=0.5, height=256, width=256, tiled=True)
    with pytest.raises(PipelineError, match="aesthetic score must be a finite number in"):
        pipe("a star", aesthetic_score=11.0, **kwargs)
    base = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path, log=lambda _: None)
    with pytest.raises(PipelineError, match="aesthetic scores condition SDXL's refiner only"):
        base("a star", aesthetic_score=5.0, **kwargs)


def test_a_refiner_of_another_latent_space_is_refused_before_loading(tiny_sdxl_folder, refiner_folder, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(refiner_folder, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps(config | {"in_channels": 8, "out_channels": 8}))
    with pytest.raises(PipelineError, match="has 8 latent channels, this model 4"):
        load_pipeline(tiny_sdxl_folder, refiner=other, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before anything was converted


@pytest.mark.slow
def test_the_command_line_runs_the_ensemble(tiny_sdxl_folder, refiner_folder, tmp_path, capsys):
    output = tmp_path / "refined.png"
    code = generate_main(["--model", str(tiny_sdxl_folder), "--refiner", str(refiner_folder), "--height", "64",
                          "--width", "128", "--steps", "4", "--refiner-start", "0.5", "--aesthetic-score", "7",
                          "--output", str(output), "--output-array", str(tmp_path / "refined.npy"),
                          "--cache-dir", str(tmp_path / "cache"), "--devices", "1"])
    assert code == 0, capsys.readouterr().err
    assert "(the refiner's from step 3)" in capsys.readouterr().err
    settings = json.loads(output.with_suffix(".json").read_text())["settings"]
    scores = settings["aesthetic_score"], settings["negative_aesthetic_score"]
    assert settings["refiner_start"] == 0.5 and scores == (7, 2.5)
    assert np.load(tmp_path / "refined.npy").shape == (64, 128, 3)
