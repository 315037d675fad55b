"""The whole pipeline against diffusers' StableDiffusionXLPipeline on the same tiny random model."""

import itertools
import shutil
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_trees_equal, our_step_noise
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

import jaxfuse
from checkpoints_conversion.convert_diffusers import main as convert
from jaxfuse.models.vae import load_vae
from jaxfuse.parallel.mesh import make_mesh
from jaxfuse.parallel_config import GroupNormMode, Mode, ParallelConfig
from jaxfuse.pipeline import NonFiniteError, load_pipeline
from jaxfuse.pipeline.load import checked_pipeline
from jaxfuse.sampling.image import Direct
from jaxfuse.spec import PipelineError

HEIGHT, WIDTH = 64, 96  # non-square; latents 8x12
STEPS = 8
DIFFUSERS_SCHEDULERS = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler,
                        "euler-ancestral": EulerAncestralDiscreteScheduler, "lcm": LCMScheduler}


@pytest.fixture(scope="module")
def reference(tiny_sdxl_folder):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_folder, tmp_path_factory):
    return load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda _: None)


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def reference_images(reference, scheduler, noise, seed=0, **kwargs):
    """diffusers' images from `noise`; a stochastic sampler's steps draw the noise ours draws
    from `seed` (diffusers draws it inside `scheduler.step`, before counting the step)."""
    reference.scheduler = DIFFUSERS_SCHEDULERS[scheduler].from_config(reference.scheduler.config)
    with our_step_noise(reference.scheduler, seed):
        return reference(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=torch.from_numpy(noise),
                         output_type="np", **kwargs).images


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_images_equal_diffusers(scheduler, pipe, reference, noise):
    kwargs = dict(prompt="a red circle at the top left", negative_prompt="a blue square", guidance_scale=6.0)
    ours = pipe(**kwargs, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=noise, scheduler=scheduler)
    ref = reference_images(reference, scheduler, noise, **kwargs)
    assert ours.shape == ref.shape == (1, HEIGHT, WIDTH, 3)
    assert np.abs(ours - ref).max() < 5e-5  # measured 2.7e-6 (dpmpp-2m) to 5.7e-6 (lcm)


def test_empty_negative_prompt_is_zeros_and_rescale_matches(pipe, reference, noise):
    """SDXL zeroes the unconditional embeddings when no negative prompt is given
    (`force_zeros_for_empty_prompt`); guidance rescale as diffusers does it."""
    kwargs = dict(prompt=["a green star", "a star at the bottom left"], guidance_scale=4.0, guidance_rescale=0.7)
    batch = np.concatenate([noise, noise[:, :, ::-1]])
    ours = pipe(**kwargs, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=batch)
    ref = reference_images(reference, "euler", batch, **kwargs)
    assert np.abs(ours - ref).max() < 2e-5  # measured 2.4e-6


def test_second_load_reads_the_cache(tiny_sdxl_folder, tmp_path):
    messages = []
    first = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path, log=messages.append)
    second = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path, log=messages.append)
    assert "converting" in messages[0] and "cache" in messages[2]
    (converted,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    third = load_pipeline(converted, log=messages.append)  # a converted folder loads as it is
    assert len(messages) == 5
    for a, b, c in zip(*(jax.tree.leaves(p.denoiser.params) for p in (first, second, third))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_converter_writes_what_the_pipeline_and_the_loaders_read(tiny_sdxl_folder, pipe, tmp_path):
    """The command-line converter turns the pipeline folder into a converted one (the cache's
    format), which loads as it is, and one model folder into one the model's loader reads."""
    assert convert([str(tiny_sdxl_folder), str(tmp_path / "pipeline")]) == 0
    messages = []
    converted = load_pipeline(tmp_path / "pipeline", log=messages.append)
    assert not any("convert" in m for m in messages)
    assert_trees_equal(converted.denoiser.params, pipe.denoiser.params)
    assert_trees_equal(converted.text.encoders[1].params, pipe.text.encoders[1].params)
    assert convert([str(tiny_sdxl_folder / "vae"), str(tmp_path / "vae")]) == 0
    assert_trees_equal(load_vae(tmp_path / "vae")[1], pipe.codec.params)


@pytest.mark.slow
def test_bf16_keeps_the_vae_in_float32(tiny_sdxl_folder, tmp_path, noise):
    """SDXL's VAE config says `force_upcast`: in a bf16 pipeline it still runs in float32."""
    pipe = load_pipeline(tiny_sdxl_folder, dtype=jnp.bfloat16, cache_dir=tmp_path, log=lambda _: None)
    assert {x.dtype for x in jax.tree.leaves(pipe.denoiser.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(pipe.codec.params)} == {jnp.dtype(jnp.float32)}
    images = pipe("a red circle", height=HEIGHT, width=WIDTH, num_inference_steps=3, latents=noise)
    assert images.dtype == np.float32 and np.isfinite(images).all()


def test_seeded_noise_is_reproducible(pipe):
    a = pipe("a red square", height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=3)
    b = pipe("a red square", height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=3)
    c = pipe("a red square", height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=70), "height 70 must be a positive multiple of 16 .* nearest valid: 64"),
    (dict(num_inference_steps=0), r"steps must be in 1\.\.1000, got 0"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), r"needs \(1, 4, 8, 12\)"),
    (dict(scheduler="heun"), "heun"),
    (dict(scheduler="lcm", num_inference_steps=51), "LCM takes at most original_inference_steps = 50"),
    (dict(image=np.zeros((64, 96), np.float32)), r"image must be \[H, W, 3\] .* got shape \(64, 96\)"),
    (dict(image=np.full((64, 96, 3), 2.0, np.float32)), r"finite floats in \[0, 1\], got values in \[2.0, 2.0\]"),
    (dict(image=np.zeros((64, 96, 3), np.uint8), height=128), "height 128 differs from the image's 64"),
    (dict(image=np.zeros((64, 96, 3), np.uint8), strength=1.5), r"strength must be a finite number in \[0.0, 1.0\]"),
    (dict(image=np.zeros((64, 96, 3), np.uint8), strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(image=np.zeros((64, 96, 3), np.uint8), strength=0.1, num_inference_steps=8),
     r"runs int\(0.8\) = 0 steps; raise strength to at least 0.125 or the steps to at least 10"),
    (dict(image=np.zeros((70, 96, 3), np.uint8), height=None, width=None), "height 70 must be a positive multiple"),
])
def test_bad_requests_fail_before_compiling(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a red circle", **{"height": HEIGHT, "width": WIDTH, **kwargs})


def test_one_seed_per_image_gives_each_image_its_one_image_run(pipe):
    kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3)
    batch = pipe("a red square", seed=[3, 4], **kwargs)
    assert batch.shape == (2, HEIGHT, WIDTH, 3)
    for image, seed in zip(batch, (3, 4)):
        assert np.abs(image - pipe("a red square", seed=seed, **kwargs)[0]).max() < 3e-5  # measured 2.8e-6


def with_unet_params(pipe, change):
    """The pipeline `load_pipeline` would assemble from `pipe`'s models with the UNet's first
    convolution kernel `change(kernel)`."""
    params = jax.tree.map(lambda x: x, pipe.denoiser.params)
    params["conv_in"]["kernel"] = change(params["conv_in"]["kernel"])
    models = {"unet": (pipe.denoiser.unet, params), "vae": (pipe.codec.vae, pipe.codec.params)}
    return checked_pipeline(pipe.spec, models, pipe.text.encoders, pipe.dtype)


def test_weights_holding_nan_are_named_as_the_pipeline_is_made(pipe):
    with pytest.raises(NonFiniteError, match=r"weights hold NaN or infinity in 1 tensors \(unet/conv_in/kernel\)"):
        with_unet_params(pipe, lambda k: k.at[0, 0, 0, 0].set(jnp.nan))


def test_a_result_that_overflows_is_an_error_not_a_black_image(pipe):
    """Finite weights so large that float32 overflows: the denoised latents hold inf/NaN."""
    huge = with_unet_params(pipe, lambda k: k * 1e38)
    with pytest.raises(NonFiniteError, match="the denoised latents hold .* NaN or infinite values.* UNet's weights"):
        huge("a red circle", height=HEIGHT, width=WIDTH, num_inference_steps=2)


def test_folder_missing_a_part_names_it(tiny_sdxl_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl_folder, broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(PipelineError, match="missing text_encoder_2/config.json"):
        jaxfuse.load_pipeline(broken)


def test_new_prompt_and_seed_reuse_the_compiled_program(pipe):
    """Prompts, seeds and guidance values are data: only a new shape or sampler compiles again."""
    steps = []
    kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3)
    pipe.generate("a red square", seed=1, **kwargs)
    second = pipe.generate("a blue star at the top", seed=2, guidance_scale=7.5, progress=lambda *a: steps.append(a),
                           **kwargs)
    assert second.timings["compile"] == 0.0
    assert steps == [(1, 3), (2, 3), (3, 3)]
    # With progress the host runs the loop one step at a time, through the same program.
    without = pipe.generate("a blue star at the top", seed=2, guidance_scale=7.5, **kwargs)
    np.testing.assert_array_equal(second.images, without.images)
    assert pipe.generate("a red square", height=HEIGHT, width=2 * WIDTH, num_inference_steps=3).timings["compile"] > 0


def reference_img2img(reference, image, noise, strength, scheduler, **kwargs):
    """diffusers' StableDiffusionXLImg2ImgPipeline on the same modules, taking the VAE's mean (not
    a sample around it) and adding `noise`; a stochastic sampler's steps draw ours (seed 0),
    counted from the first step that runs."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    img2img = StableDiffusionXLImg2ImgPipeline(**reference.components)
    img2img.scheduler = DIFFUSERS_SCHEDULERS[scheduler].from_config(reference.scheduler.config)
    with (mock.patch.object(module, "randn_tensor", lambda shape, **_: torch.from_numpy(noise)),
          mock.patch.object(module, "retrieve_latents", lambda output, **_: output.latent_dist.mode()),
          our_step_noise(img2img.scheduler)):
        return img2img(image=torch.from_numpy(image.transpose(0, 3, 1, 2)), strength=strength,
                       num_inference_steps=STEPS, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def source_image():
    return np.random.default_rng(2).uniform(size=(1, HEIGHT, WIDTH, 3)).astype(np.float32)


# Two strengths; the stochastic sampler's noise counted from the first step that runs (dpmpp-2m's
# first-order first step from an image: tests/test_schedulers.py).
@pytest.mark.parametrize("scheduler, strength", [("euler", 0.5), ("euler", 0.8), ("euler-ancestral", 0.6)])
def test_image_to_image_equals_diffusers(pipe, reference, noise, source_image, scheduler, strength):
    kwargs = dict(prompt="a red circle at the top left", negative_prompt="a blue square", guidance_scale=6.0)
    ours = pipe(**kwargs, image=source_image, strength=strength, num_inference_steps=STEPS, latents=noise,
                scheduler=scheduler)
    ref = reference_img2img(reference, source_image, noise, strength, scheduler, **kwargs)
    assert ours.shape == ref.shape == (1, HEIGHT, WIDTH, 3)
    assert np.abs(ours - ref).max() < 1e-4  # measured 4.7e-6 (euler) to 8.9e-6 (euler-ancestral)
    assert np.abs(ours - source_image).max() > 1e-2  # the image was changed


TALL = 128  # 16 latent rows: 8 patches of 2, which the tiny UNet halves once


@pytest.fixture(scope="module")
def tall_noise():
    return np.random.default_rng(5).standard_normal((1, 4, TALL // 8, WIDTH // 8)).astype(np.float32)


@pytest.fixture(scope="module")
def tall_single(pipe, tall_noise):
    return pipe(**PARALLEL_REQUEST, latents=tall_noise)


PARALLEL_REQUEST = dict(prompt="a star at the top left", negative_prompt="a green circle", guidance_scale=5.5,
                        guidance_rescale=0.3, height=TALL, width=WIDTH, num_inference_steps=4)


@pytest.mark.parametrize("devices, cfg_parallel", [
    (2, False), (4, False), pytest.param(8, False, marks=pytest.mark.slow),
    (2, True), pytest.param(4, True, marks=pytest.mark.slow), pytest.param(8, True, marks=pytest.mark.slow)])
def test_sync_images_equal_single(pipe, tall_noise, tall_single, devices, cfg_parallel):
    """The whole pipeline, VAE decode included, split over the mesh; with cfg_parallel the two
    guidance halves run on two groups of devices/2."""
    parallel = ParallelConfig(devices, Mode.SYNC, cfg_parallel=cfg_parallel)
    images = pipe(**PARALLEL_REQUEST, latents=tall_noise, parallel=parallel)
    assert np.abs(images - tall_single).max() < 5e-5  # measured 4.0e-6


@pytest.mark.parametrize("scheduler, devices", [pytest.param("euler-ancestral", 2, marks=pytest.mark.slow), ("lcm", 4)])
def test_a_stochastic_sampler_in_sync_equals_single(pipe, tall_noise, scheduler, devices):
    """Each device adds its own rows of the whole image's step noise."""
    request = dict(PARALLEL_REQUEST, latents=tall_noise, scheduler=scheduler, seed=3)
    single = pipe(**request)
    images = pipe(**request, parallel=ParallelConfig(devices, Mode.SYNC))
    assert np.abs(images - single).max() < 5e-5  # measured 4.2e-6 to 5.5e-6
    assert np.abs(pipe(**dict(request, seed=4)) - single).max() > 1e-2  # the seed draws the step noise


def test_image_encode_on_four_devices_equals_one(pipe, tall_noise):
    image = np.random.default_rng(3).uniform(size=(1, TALL, WIDTH, 3)).astype(np.float32)
    single = pipe.codec.encode(Direct(), image, 2)
    split = pipe.codec.encode(Direct(), image, 2, make_mesh(ParallelConfig(4, Mode.SYNC)))
    assert single.shape == (2, 4, TALL // 8, WIDTH // 8)
    assert np.abs(np.asarray(split) - np.asarray(single)).max() < 1e-5 * np.abs(np.asarray(single)).max()  # 8.0e-7
    request = dict(PARALLEL_REQUEST, latents=tall_noise, image=image, strength=0.75, height=None)
    images = pipe(**request, parallel=ParallelConfig(4, Mode.SYNC))
    assert np.abs(images - pipe(**request)).max() < 5e-5  # measured 5.1e-6


@pytest.mark.parametrize("mode", [Mode.DISPLACED, pytest.param(Mode.PCPP, marks=pytest.mark.slow)])
def test_warmup_covering_every_step_equals_single(pipe, tall_noise, tall_single, mode):
    parallel = ParallelConfig(4, mode, warmup_steps=4, gn=GroupNormMode.SYNC)
    images = pipe(**PARALLEL_REQUEST, latents=tall_noise, parallel=parallel)
    assert np.abs(images - tall_single).max() < 5e-5  # measured 3.2e-6


@pytest.mark.slow
def test_pcpp_images_lie_between_displaced_and_naive(pipe, tall_noise, tall_single):
    """Each of the 4 patches sees less of the image than in displaced mode and more than in
    naive mode, and the image moves away from single accordingly."""
    def error(mode, **kwargs):
        images = pipe(**PARALLEL_REQUEST, latents=tall_noise, parallel=ParallelConfig(4, mode, 1, **kwargs))
        return np.abs(images - tall_single).mean()

    assert error(Mode.DISPLACED) < error(Mode.PCPP, context=0.3) < error(Mode.NAIVE)


@pytest.mark.slow
def test_group_norm_choices_order_by_the_freshness_of_their_statistics(pipe, tall_noise, tall_single):
    """One warm-up step, then 3 displaced ones on 4 patches. `sync`'s statistics are the whole
    image's of this step (only halos and keys and values are stale): its image is the nearest to
    single; `stale`'s are all the previous step's: the farthest. `corrected` and DistriFusion's
    correction freshen the own patch's share of them, `separate` uses it alone: both lie between.
    Each choice gives its own image."""
    images = {gn: pipe(**PARALLEL_REQUEST, latents=tall_noise, parallel=ParallelConfig(4, Mode.DISPLACED, 1, gn=gn))
              for gn in GroupNormMode}
    error = {gn: np.abs(image - tall_single).mean() for gn, image in images.items()}
    # measured (EPYC), mean |image - single|: sync 1.312e-2, corrected-distrifusion 1.324e-2,
    # separate 1.474e-2, corrected 1.547e-2, stale 3.062e-2
    between = [gn for gn in GroupNormMode if gn not in (GroupNormMode.SYNC, GroupNormMode.STALE)]
    assert error[GroupNormMode.SYNC] < min(error[gn] for gn in between)
    assert max(error[gn] for gn in between) < error[GroupNormMode.STALE]
    for a, b in itertools.combinations(GroupNormMode, 2):
        assert np.abs(images[a] - images[b]).max() > 3e-3, (a, b)  # measured 3.2e-2 (sync, distrifusion) and more


@pytest.mark.slow
def test_group_norm_choice_does_not_matter_when_every_step_is_a_warmup_step(pipe, tall_noise, tall_single):
    """Warm-up steps are synchronous: their statistics are fresh whatever `gn` says."""
    images = [pipe(**PARALLEL_REQUEST, latents=tall_noise, parallel=ParallelConfig(4, Mode.DISPLACED, 4, gn=gn))
              for gn in GroupNormMode]
    for image in images[1:]:
        np.testing.assert_array_equal(image, images[0])  # measured: bit-identical
    assert np.abs(images[0] - tall_single).max() < 5e-5  # measured 3.1e-6


def test_naive_images_differ_from_single(pipe, tall_noise, tall_single):
    images = pipe(**PARALLEL_REQUEST, latents=tall_noise, parallel=ParallelConfig(4, Mode.NAIVE))
    assert np.abs(images - tall_single).max() > 1e-2


def test_height_the_mesh_cannot_split_lists_valid_heights(pipe):
    with pytest.raises(PipelineError, match=r"height 96 must be a positive multiple of 128 \(.* x 8 patches\); "
                                            r"nearest valid: 128"):
        pipe("a red circle", height=96, width=WIDTH, parallel=ParallelConfig(8, Mode.SYNC))


# Four requests of other sizes, step counts, samplers and layouts, for one pipeline shared by threads.
CONCURRENT = [
    dict(prompt="a red circle", seed=1, num_inference_steps=2),
    dict(prompt="a blue square", seed=2, num_inference_steps=3, scheduler="dpmpp-2m", height=TALL,
         parallel=ParallelConfig(2, "sync")),
    dict(prompt="a green star", seed=3, num_inference_steps=5, height=TALL,
         parallel=ParallelConfig(4, "displaced", warmup_steps=2)),
    dict(prompt="a yellow star", seed=4, num_inference_steps=4, guidance_scale=1.0,
         image=np.random.default_rng(4).uniform(size=(HEIGHT, WIDTH, 3)).astype(np.float32), strength=0.75),
]


def test_four_threads_sharing_a_pipeline_each_get_their_own_progress_timings_and_images(pipe):
    """Each call keeps its progress, timings and memory in a record of its own: four requests at
    once, each callback hears its own steps only, and each image is the one the request makes alone."""
    from concurrent.futures import ThreadPoolExecutor

    request = dict(width=WIDTH, height=HEIGHT)
    alone = [pipe.generate(**{**request, **kwargs}) for kwargs in CONCURRENT]
    heard = [[] for _ in CONCURRENT]
    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        together = list(pool.map(lambda i: pipe.generate(**{**request, **CONCURRENT[i]},
                                                         progress=lambda *step: heard[i].append(step)),
                                 range(len(CONCURRENT))))
    for kwargs, steps, one, both in zip(CONCURRENT, heard, alone, together):
        run = int(kwargs["num_inference_steps"] * kwargs.get("strength", 1))
        assert steps == [(k, run) for k in range(1, run + 1)]
        assert np.abs(both.images - one.images).max() <= 1e-6  # measured 0: the same programs on the same inputs
        assert set(both.timings) >= {"compile", "encode", "denoise", "decode"} and both.memory["steps"] > 0
        assert both.timings["compile"] == 0  # the runs alone compiled every program, once


@pytest.fixture(scope="module")
def other_vae(tiny_sdxl_folder, tmp_path_factory):
    """A VAE of the tiny model's shape with other weights, saved by diffusers (a fixed VAE in place
    of a model's own, as SDXL's fp16-fix VAE is)."""
    from diffusers import AutoencoderKL

    from jaxfuse.oracle import perturbed

    folder = tmp_path_factory.mktemp("other-vae")
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_sdxl_folder / "vae"))
    perturbed(vae, seed=9).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("strength", [None, pytest.param(0.75, marks=pytest.mark.slow)])
def test_a_vae_in_place_of_the_models_own_equals_diffusers_with_it(tiny_sdxl_folder, reference, pipe, noise,
                                                                   source_image, other_vae, tmp_path, strength):
    """Text to image (the VAE decodes) and image to image (it encodes too) with the other VAE, as
    diffusers makes them with that VAE in the pipeline; both differ from the model's own VAE's."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    ours = load_pipeline(tiny_sdxl_folder, vae=other_vae, cache_dir=tmp_path, log=lambda _: None)
    with_other = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder,
                                                           vae=AutoencoderKL.from_pretrained(other_vae))
    kwargs = dict(prompt="a red circle at the top left", guidance_scale=6.0)
    if strength is None:
        request = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=noise)
        ref = reference_images(with_other, "euler", noise, **kwargs)
    else:
        request = dict(image=source_image, strength=strength, num_inference_steps=STEPS, latents=noise)
        ref = reference_img2img(with_other, source_image, noise, strength, "euler", **kwargs)
    images = ours(**kwargs, **request)
    assert np.abs(images - ref).max() < 5e-5  # measured 2.2e-6 (text to image), 2.5e-6 (image to image)
    assert np.abs(images - pipe(**kwargs, **request)).max() > 1e-2  # not the model's own VAE


def test_a_vae_that_cannot_serve_the_model_is_refused_before_anything_loads(tiny_sdxl_folder, tmp_path):
    with pytest.raises(PipelineError, match=f"the VAE {tmp_path} holds no config.json: pass a diffusers VAE folder"):
        load_pipeline(tiny_sdxl_folder, vae=tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL", "latent_channels": 16}')
    with pytest.raises(PipelineError, match="makes latents of 16 channels; this model's UNet reads 4"):
        load_pipeline(tiny_sdxl_folder, vae=tmp_path)
