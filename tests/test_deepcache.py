"""DeepCache (`jaxfuse.step_cache`) against diffusers with DeepCache's own `DeepCacheSDHelper` on a
tiny random SDXL-shaped pipeline (`sdxl_single_file.build_tiny_base`: three levels of two layers,
so its branches are numbered as SDXL's), alone, in image to image and over devices."""

import json
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import CountingRunner
from DeepCache import DeepCacheSDHelper
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from jaxfuse import schedulers
from jaxfuse.generate import main as generate_main
from jaxfuse.parallel.mesh import make_mesh
from jaxfuse.parallel_config import Mode, ParallelConfig
from jaxfuse.pipeline import load_pipeline
from jaxfuse.pipeline.request import Request
from jaxfuse.sampling.image import Direct, Loop, denoise
from jaxfuse.sampling.plan import Plan
from jaxfuse.sampling.step import Guidance, Sampling
from jaxfuse.spec import PipelineError
from jaxfuse.step_cache import DeepCache, quadratic_steps

HEIGHT, WIDTH, STEPS = 64, 64, 7
REQUEST = dict(prompt="a red circle at the top left", negative_prompt="a blue square", guidance_scale=6.0,
               height=HEIGHT, width=WIDTH, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def folder(tiny_single_files):
    return tiny_single_files["base"]


@pytest.fixture(scope="module")
def pipe(folder, tmp_path_factory):
    return load_pipeline(folder, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda _: None)


@pytest.fixture(scope="module")
def reference(folder):
    return StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def with_helper(pipeline, interval, branch, run):
    """`run()` with DeepCache's helper on `pipeline` (enabled afresh: its step counter and cache
    outlive a call)."""
    helper = DeepCacheSDHelper(pipe=pipeline)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return run()
    finally:
        helper.disable()


@pytest.mark.parametrize("interval, branch", [pytest.param(2, 0, marks=pytest.mark.slow), (3, 4),
                                              pytest.param(2, 8, marks=pytest.mark.slow)])
def test_deepcache_equals_diffusers_with_deepcache_helper(pipe, reference, noise, interval, branch):
    ours = pipe(**REQUEST, latents=noise, deepcache=interval, deepcache_branch=branch)
    expected = with_helper(reference, interval, branch, lambda: reference(
        **REQUEST, latents=torch.from_numpy(noise), output_type="np").images)
    uncached = pipe(**REQUEST, latents=noise)
    assert np.abs(ours - expected).max() < 5e-5  # measured 5.3e-6 to 6.6e-6 (branches 0, 1, 2, 4, 8)
    assert np.abs(ours - uncached).max() > 1e-2  # the cache changed the image


@pytest.mark.slow
def test_image_to_image_caches_from_its_first_step(pipe, reference, noise):
    """The helper counts from the first step that runs: that step is full."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    image = np.random.default_rng(2).uniform(size=(1, HEIGHT, WIDTH, 3)).astype(np.float32)
    ours = pipe(**REQUEST, image=image, strength=0.6, latents=noise, deepcache=2, deepcache_branch=3)
    img2img = StableDiffusionXLImg2ImgPipeline(**reference.components)
    request = {k: v for k, v in REQUEST.items() if k not in ("height", "width")}
    with (mock.patch.object(module, "randn_tensor", lambda shape, **_: torch.from_numpy(noise)),
          mock.patch.object(module, "retrieve_latents", lambda output, **_: output.latent_dist.mode())):
        expected = with_helper(img2img, 2, 3, lambda: img2img(
            **request, image=torch.from_numpy(image.transpose(0, 3, 1, 2)), strength=0.6, output_type="np").images)
    assert np.abs(ours - expected).max() < 1e-4  # measured 8.5e-6


@pytest.fixture(scope="module")
def single_cached(pipe, noise):
    return pipe(**REQUEST, latents=noise, deepcache=3, deepcache_branch=4)


@pytest.mark.parametrize("devices, cfg_parallel", [(2, False), pytest.param(4, True, marks=pytest.mark.slow)])
def test_deepcache_in_sync_equals_one_device(pipe, noise, single_cached, devices, cfg_parallel):
    """A shallow step exchanges what its layers need; the kept features are each device's rows."""
    parallel = ParallelConfig(devices, Mode.SYNC, cfg_parallel=cfg_parallel)
    images = pipe(**REQUEST, latents=noise, deepcache=3, deepcache_branch=4, parallel=parallel)
    assert np.abs(images - single_cached).max() < 1e-4  # measured 7.7e-6 (2 devices), 5.3e-6 (2 x 2, cfg-parallel)


@pytest.mark.slow
def test_displaced_with_the_cache_stays_as_near_as_without(pipe, noise, single_cached):
    """Displaced's error against one device is about what it is without the cache (pcpp and naive
    are measured in benchmarks/deepcache_quality.py)."""
    parallel = ParallelConfig(2, Mode.DISPLACED, warmup_steps=1)
    cached = np.abs(pipe(**REQUEST, latents=noise, deepcache=3, deepcache_branch=4, parallel=parallel)
                    - single_cached).mean()
    uncached = np.abs(pipe(**REQUEST, latents=noise, parallel=parallel) - pipe(**REQUEST, latents=noise)).mean()
    assert 0 < cached < 2 * uncached  # mean errors measured: 1.9e-2 cached, 3.0e-2 uncached (random weights)


@pytest.mark.slow
def test_each_kind_of_step_compiles_once(pipe, noise):
    """Displaced on 2 devices, N = 3 over 8 steps (full at 0, 3, 6): one warm-up step (synchronous,
    full) and displaced full and shallow steps: three step programs, at most two per patch mode,
    the shallow one holding fewer convolutions, whatever the number of steps."""
    parallel = ParallelConfig(2, Mode.DISPLACED, warmup_steps=1)
    plan = Plan.of(parallel, 8, DeepCache(3, 4))
    assert [k.cache.full for k in plan.kinds] == [True, False, False, True, False, False, True, False]
    loop = Loop(Sampling(True, False, parallel), plan, make_mesh(parallel))
    cond = pipe.text.conditioning(Direct(), Request.parse(pipe.spec, "a star", height=HEIGHT, width=WIDTH))
    schedule = schedulers.make_schedule("euler", pipe.spec.scheduler, 8)
    runner = CountingRunner()
    denoise(loop, pipe.denoiser, np.asarray(noise), cond, schedule, Guidance(np.float32(5), np.float32(0)),
            schedulers.noise_keys([0]), runner, progress=lambda *_: None)  # stepwise: programs called again
    steps = {name[-1]: count for name, count in runner.convolutions.items() if name[0] == "steps"}
    assert len(steps) == 3
    by_mode = {}
    for kind in steps:
        by_mode.setdefault(kind.patch, []).append(kind)
    assert all(len(kinds) <= 2 for kinds in by_mode.values())
    full = [count for kind, count in steps.items() if kind.cache.full]
    shallow = [count for kind, count in steps.items() if not kind.cache.full]
    assert min(full) > max(shallow) > 0


def test_the_quadratic_schedule_picks_deepcache_original_steps():
    """Values of DeepCache's original SDXL pipeline's `sample_from_quad_center` (run on its code)."""
    assert quadratic_steps(50, 10, 15, 1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert quadratic_steps(50, 17, 15, 1.2) == [0, 3, 6, 9, 11, 14, 15, 18, 21, 24, 26, 30, 33, 36, 39, 43, 46]
    assert quadratic_steps(25, 9, 10, 1.4) == [0, 3, 6, 8, 10, 12, 15, 18, 21]
    assert quadratic_steps(20, 7, 5, 1.2) == [0, 3, 5, 7, 10, 13, 16]
    assert quadratic_steps(50, 10, 0, 1.4) == [0, 1, 5, 9, 13, 18, 24, 30, 36, 43]
    assert DeepCache(5, schedule="quadratic").full_steps(50) == {0, 5, 9, 13, 17, 21, 26, 31, 37, 43}


def test_settings_a_run_cannot_take_are_refused(pipe):
    with pytest.raises(PipelineError, match="deepcache branch must be in 0..8"):
        pipe("a star", deepcache=2, deepcache_branch=9)
    with pytest.raises(PipelineError, match="deepcache interval must be at least 1"):
        pipe("a star", deepcache=0)
    with pytest.raises(PipelineError, match="deepcache schedule 'cubic' is not one of uniform, quadratic"):
        pipe("a star", deepcache=2, deepcache_schedule="cubic")


@pytest.mark.slow
def test_a_canvas_keeps_each_view_its_own_features(tiny_sdxl_folder, tmp_path):
    """Three views of a 64 x 160 canvas (the tiny pipeline: two levels of one layer, branches 0..3)
    over two groups of two devices equal one device with the cache (each view's features are kept
    with its own state), and the cache changes the canvas."""
    canvas = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path, log=lambda _: None)
    kwargs = dict(prompt="a red circle", height=64, width=160, num_inference_steps=4, tile_stride=48)
    one = canvas(**kwargs, deepcache=2, deepcache_branch=1)
    spread = canvas(**kwargs, deepcache=2, deepcache_branch=1, parallel=ParallelConfig(2, "sync"), view_devices=2)
    assert np.abs(spread - one).max() < 3e-5  # measured 2.9e-6
    assert np.abs(one - canvas(**kwargs)).max() > 1e-2


@pytest.mark.slow
def test_the_command_line_takes_deepcache(folder, tmp_path, capsys):
    output = tmp_path / "cached.png"
    code = generate_main(["--model", str(folder), "--height", "64", "--width", "64", "--steps", "4", "--deepcache",
                          "2", "--deepcache-branch", "3", "--output", str(output), "--cache-dir",
                          str(tmp_path / "cache"), "--devices", "1"])
    assert code == 0, capsys.readouterr().err
    assert "4 euler steps (2 of them every layer: DeepCache, branch 3) on" in capsys.readouterr().err
    settings = json.loads(output.with_suffix(".json").read_text())["settings"]
    assert (settings["deepcache"], settings["deepcache_branch"]) == (2, 3)
