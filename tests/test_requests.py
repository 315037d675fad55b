"""Every argument of `SDXLPipeline.generate` is checked before anything runs
(`PipelineSpec.request`): one `PipelineError` that names the argument and the fix."""

import subprocess
import sys

import numpy as np
import pytest

from jaxfuse.parallel_config import ParallelConfig
from jaxfuse.pipeline.request import Request
from jaxfuse.spec import PipelineError, PipelineSpec

HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def spec(tiny_sdxl_folder):
    return PipelineSpec.read(tiny_sdxl_folder)


@pytest.mark.parametrize("prompt, kwargs, message", [
    (123, {}, "prompt must be a string or a non-empty list of strings, got 123"),
    (None, {}, "prompt must be a string or a non-empty list of strings, got None"),
    ([], {}, r"prompt must be a string or a non-empty list of strings, got \[\]"),
    (["a", 1], {}, "prompt must be a string or a non-empty list"),
    ("a", dict(num_inference_steps=2.5), "steps must be an int, got 2.5"),
    ("a", dict(num_inference_steps=100000), r"steps must be in 1\.\.1000, got 100000"),
    ("a", dict(guidance_scale="7"), "guidance scale must be a number, got '7'"),
    ("a", dict(guidance_scale=float("inf")), r"guidance scale must be a finite number at least 0.0, got inf"),
    ("a", dict(guidance_scale=float("nan")), "guidance scale must be a finite number at least 0.0, got nan"),
    ("a", dict(guidance_scale=-5), r"guidance scale must be .* at least 0.0, got -5 \(1 or less turns guidance off\)"),
    ("a", dict(guidance_rescale=float("nan")), r"guidance rescale must be a finite number in \[0.0, 1.0\], got nan"),
    ("a", dict(guidance_rescale=5), r"guidance rescale must be a finite number in \[0.0, 1.0\], got 5"),
    ("a", dict(height=256.0), "height must be an int, got 256.0"),
    ("a", dict(height=0), "height must be at least 1, got 0"),
    ("a", dict(height=-256), "height must be at least 1, got -256"),
    ("a", dict(width=True), "width must be an int, got True"),
    ("a", dict(seed=2**70), r"seed must be in 0\.\.4294967295, got 1180591620717411303424"),
    ("a", dict(seed=-1), r"seed must be in 0\.\.4294967295, got -1"),
    ("a", dict(seed="0"), "seed must be an int, got '0'"),
    ("a", dict(seed=[]), r"seed must be an int or a non-empty list of ints, got \[\]"),
    (["a", "b"], dict(seed=[0, 1, 2]), "3 seeds for 2 prompts"),
    (["a", "b"], dict(negative_prompt=["x", "y", "z"]), "3 negative prompts for 2 prompts"),
    ("a", dict(crops_coords_top_left=(0, 0, 0)), r"crops_coords_top_left must be two ints \(height, width\)"),
    ("a", dict(original_size=(1024, 0)), r"original_size\[1\] must be at least 1, got 0"),
    ("a", dict(scheduler="heun"), "scheduler 'heun' is not one of euler, ddim, dpmpp-2m"),
    ("a", dict(latents=np.full((1, 4, 8, 12), np.nan, np.float32)), "latents hold 384 NaN or infinite values"),
    ("a", dict(latents=np.zeros((1, 4, 8, 12), np.int32)), "latents must hold floats"),
    ("a", dict(parallel="displaced"), "parallel must be a jaxfuse.ParallelConfig"),
    ("a", dict(parallel=ParallelConfig(1000, "sync"), height=256, tiled=False),
     r"height 256 must be a positive multiple of 16000 .*; nearest valid: 16000; or split 256 into 1, 2, 4, 8, 16 "
     r"patches"),
])
def test_a_bad_argument_is_named(spec, prompt, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        Request.parse(spec, prompt, **{"height": HEIGHT, "width": WIDTH, **kwargs})


def test_a_good_request_is_normalised(spec):
    request = Request.parse(spec, "a", seed=[4, 5], negative_prompt="b", crops_coords_top_left=[0, 8],
                            height=HEIGHT, width=WIDTH, num_inference_steps=np.int64(3), guidance_scale=7)
    assert request.prompts == ["a", "a"] and request.negative_prompts == ["b", "b"] and request.seeds == [4, 5]
    assert (request.crops_coords_top_left, request.steps, request.guidance_scale) == ((0, 8), 3, 7.0)
    assert Request.parse(spec, "a").height == spec.default_size


def test_the_command_line_checks_start_no_jax_backend(tiny_sdxl_folder, tmp_path):
    """Across hosts the processes must join before JAX starts a backend, and the checks come first
    (an image, a LoRA file and a sampler's schedule included)."""
    from PIL import Image

    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / "in.png")
    code = (f"from jaxfuse.generate import check_args, parse_args\n"
            f"check_args(parse_args(['--model', {str(tiny_sdxl_folder)!r}, '--image', {str(tmp_path / 'in.png')!r},"
            f" '--scheduler', 'lcm', '--steps', '4', '--output', {str(tmp_path / 'out.png')!r}]))\n"
            "import jax._src.xla_bridge as xb\nprint(sorted(xb._backends))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_names_that_moved_to_the_request_module_still_import_from_spec_with_a_warning():
    import jaxfuse.pipeline.request as request_module
    import jaxfuse.spec as spec_module

    for name in ("Request", "Region", "Tiles", "DEFAULT_STEPS"):
        with pytest.warns(DeprecationWarning, match=f"jaxfuse.spec.{name} moved to jaxfuse.pipeline.request"):
            assert getattr(spec_module, name) is getattr(request_module, name)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        spec_module.Nothing  # noqa: B018


def test_an_argument_no_part_takes_is_named_with_those_a_request_takes(spec):
    with pytest.raises(PipelineError, match="unknown argument strenght; a request takes .*strength"):
        Request.parse(spec, "a", strenght=0.5)
