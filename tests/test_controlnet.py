"""SDXL's ControlNet against diffusers on tiny random weights: the model (`ControlNetModel`, its
residuals and the UNet that adds them), the pipelines (`StableDiffusionXLControlNetPipeline` with
one and two ControlNets, start and end, guess mode; `StableDiffusionXLControlNetImg2ImgPipeline`),
and the request's checks."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import our_step_noise
from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from jaxfuse import oracle
from jaxfuse.models.controlnet import load_controlnet
from jaxfuse.models.unet import load_unet
from jaxfuse.pipeline import load_pipeline
from jaxfuse.pipeline.request import Controls
from jaxfuse.spec import PipelineError

HEIGHT, WIDTH = 64, 96
STEPS = 6
REQUEST = dict(prompt="a red circle at the top left", negative_prompt="a blue square", guidance_scale=6.0,
               height=HEIGHT, width=WIDTH, num_inference_steps=STEPS)


def control_images(count: int, height: int = HEIGHT, width: int = WIDTH, seed: int = 3) -> list[np.ndarray]:
    """`count` control images [1, H, W, 3] in [0, 1]: smooth shapes, so a nearest resize keeps them."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(size=(1, height, width, 3)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("case", ["base-like", "refiner-like"])
@pytest.mark.parametrize("settings", [{}, {"controlnet_conditioning_channel_order": "bgr"},
                                      {"global_pool_conditions": True}])
@pytest.mark.parametrize("guess", [False, True])
def test_the_model_equals_diffusers(case, settings, guess, tmp_path):
    """Residuals at a scale per row, in guess mode or not, and the UNet that adds them."""
    config, time_ids = oracle.CASES[case]
    unet = oracle.random_unet(config)
    unet.save_pretrained(tmp_path / "unet")
    net = oracle.build_tiny_controlnet(unet, tmp_path / "controlnet", **settings)
    inputs = oracle.unet_inputs(config, time_ids)
    image = np.random.default_rng(5).uniform(size=(2, 3, 8 * 16, 8 * 24)).astype(np.float32)
    torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    added = {"text_embeds": torch_inputs["text_embeds"], "time_ids": torch_inputs["time_ids"]}
    with torch.no_grad():
        down, middle = net(torch_inputs["sample"], torch_inputs["timesteps"], torch_inputs["encoder_hidden_states"],
                           torch.from_numpy(image), conditioning_scale=0.7, guess_mode=guess,
                           added_cond_kwargs=added, return_dict=False)
        reference = unet(torch_inputs["sample"], torch_inputs["timesteps"], torch_inputs["encoder_hidden_states"],
                         added_cond_kwargs=added, down_block_additional_residuals=down,
                         mid_block_additional_residual=middle).sample.numpy()
    module, params = load_controlnet(tmp_path / "controlnet")
    residuals = module.apply({"params": params}, inputs["sample"], inputs["timesteps"],
                             inputs["encoder_hidden_states"], image, inputs["text_embeds"], inputs["time_ids"],
                             np.float32([0.7, 0.7]), guess)
    for ours, theirs in zip((*residuals.down, residuals.middle), (*down, middle), strict=True):
        ours = np.transpose(np.asarray(ours), (0, 3, 1, 2))
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs.numpy()).max() < 5e-5  # measured at most 4.4e-6
    unet_module, unet_params = load_unet(tmp_path / "unet")
    out = unet_module.apply({"params": unet_params}, inputs["sample"], inputs["timesteps"],
                            inputs["encoder_hidden_states"], inputs["text_embeds"], inputs["time_ids"],
                            control=residuals)
    assert np.abs(np.asarray(out) - reference).max() < 5e-5  # measured 3.3e-6 (base-like)


@pytest.fixture(scope="module")
def controlnet_folders(tiny_sdxl_folder, tmp_path_factory):
    """Two ControlNets of the tiny SDXL pipeline's UNet, saved as diffusers saves them (the second BGR)."""
    root = tmp_path_factory.mktemp("controlnets")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_folder / "unet")
    oracle.build_tiny_controlnet(unet, root / "first", seed=7)
    oracle.build_tiny_controlnet(unet, root / "second", seed=8, controlnet_conditioning_channel_order="bgr")
    return [root / "first", root / "second"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_folder, controlnet_folders, cache):
    """The tiny pipeline with both ControlNets."""
    return load_pipeline(tiny_sdxl_folder, cache_dir=cache, controlnets=controlnet_folders, log=lambda _: None)


@pytest.fixture(scope="module")
def one_net_pipe(tiny_sdxl_folder, controlnet_folders, cache):
    """The tiny pipeline with the first ControlNet alone."""
    return load_pipeline(tiny_sdxl_folder, cache_dir=cache, controlnets=controlnet_folders[:1], log=lambda _: None)


@pytest.fixture(scope="module")
def reference(tiny_sdxl_folder):
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)


def diffusers_controlnets(folders):
    from diffusers import ControlNetModel

    return [ControlNetModel.from_pretrained(folder) for folder in folders]


def noise(seed=0, height=HEIGHT, width=WIDTH):
    return np.random.default_rng(seed).standard_normal((1, 4, height // 8, width // 8)).astype(np.float32)


@pytest.mark.parametrize("nets, settings", [
    (1, {}),
    (2, {"controlnet_conditioning_scale": [0.8, 0.5], "control_guidance_start": 0.2, "control_guidance_end": 0.7}),
    pytest.param(1, {"guess_mode": True, "controlnet_conditioning_scale": 0.6}, marks=pytest.mark.slow),
    pytest.param(2, {"guidance_scale": 1.0}, marks=pytest.mark.slow),
])
def test_the_pipeline_equals_diffusers(pipe, one_net_pipe, reference, controlnet_folders, nets, settings):
    nets_used = diffusers_controlnets(controlnet_folders)
    controlnet = nets_used[0] if nets == 1 else nets_used
    theirs = StableDiffusionXLControlNetPipeline(**reference.components, controlnet=controlnet)
    images = control_images(2)
    request = REQUEST | settings
    x = noise()
    given = images[0] if nets == 1 else images
    ours_pipe = pipe if nets == 2 else one_net_pipe
    ours = ours_pipe(**request, control_image=given, latents=x)
    expected = theirs(**request, image=given, latents=torch.from_numpy(x), output_type="np").images
    assert ours.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    # measured 4.2e-6 (one), 3.6e-6 (two, start and end), 3.9e-6 (guess mode), 1.1e-6 (two, no guidance)
    assert np.abs(ours - expected).max() < 5e-5
    plain = ours_pipe(**{k: v for k, v in request.items() if not k.startswith(("control", "guess"))}, latents=x)
    assert np.abs(ours - plain).max() > 1e-2  # the control changed the image


def test_image_to_image_equals_diffusers(one_net_pipe, reference, controlnet_folders):
    from diffusers.pipelines.controlnet import pipeline_controlnet_sd_xl_img2img as module

    one = one_net_pipe
    theirs = StableDiffusionXLControlNetImg2ImgPipeline(**reference.components,
                                                        controlnet=diffusers_controlnets(controlnet_folders)[0])
    picture = np.random.default_rng(4).uniform(size=(1, HEIGHT, WIDTH, 3)).astype(np.float32)
    control = control_images(1)[0]
    x = noise(1)
    # (diffusers' image-to-image ControlNet pipeline's default scale is 0.8, its text-to-image one's 1: named here)
    request = {k: v for k, v in REQUEST.items() if k not in ("height", "width")} | {
        "controlnet_conditioning_scale": 0.9, "control_guidance_end": 0.5}
    ours = one(**request, image=picture, strength=0.6, control_image=control, latents=x)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch, our_step_noise(theirs.scheduler):
        patch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(x))
        patch.setattr(module, "retrieve_latents", lambda output, **_: output.latent_dist.mode())
        expected = theirs(**request, image=torch.from_numpy(picture.transpose(0, 3, 1, 2)), strength=0.6,
                          control_image=control, output_type="np").images
    assert np.abs(ours - expected).max() < 5e-5  # measured 7.0e-6


def test_a_control_image_of_another_size_is_resized_as_diffusers_resizes_it():
    """Arrays by nearest neighbour (as PyTorch's `interpolate`), PIL images with Lanczos."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    array = control_images(1, 40, 50)[0]
    picture = PIL.Image.fromarray((array[0] * 255).astype(np.uint8))
    for given in (array, picture):
        part = Controls.parse(pipe_spec_with_nets(1), RequestStub(), given, 1.0, 0.0, 1.0, False)
        expected = processor.preprocess(given, height=HEIGHT, width=WIDTH).numpy().transpose(0, 2, 3, 1)
        assert part.images[0].shape == (1, HEIGHT, WIDTH, 3)
        assert np.abs(part.images[0] - expected).max() < 1e-6  # exact up to float rounding


class RequestStub:
    height, width, batch, steps_run = HEIGHT, WIDTH, 1, STEPS


def pipe_spec_with_nets(count):
    class Spec:
        controlnets = [None] * count

    return Spec()


def test_the_steps_a_controlnet_counts_are_those_wholly_inside_its_start_and_end():
    part = Controls((np.zeros((1, 8, 8, 3)),), (0.5,), (0.2,), (0.7,))
    assert part.step_scales(6).tolist() == [[0, 0, 0.5, 0.5, 0, 0]]  # the example: steps 2 and 3
    assert Controls((np.zeros((1, 8, 8, 3)),), (1.0,), (0.0,), (1.0,)).step_scales(3).tolist() == [[1, 1, 1]]


def test_requests_the_controlnets_cannot_serve_are_refused(pipe, tiny_sdxl_folder, tmp_path):
    image = control_images(1)[0]
    with pytest.raises(PipelineError, match=r"give one image per ControlNet \(2, in the order they were loaded\)"):
        pipe(**REQUEST, control_image=image)
    with pytest.raises(PipelineError, match="controlnet_conditioning_scale: 3 values for 2 ControlNets"):
        pipe(**REQUEST, control_image=[image, image], controlnet_conditioning_scale=[1, 1, 1])
    with pytest.raises(PipelineError, match="control guidance start 0.6 must be below its end 0.5"):
        pipe(**REQUEST, control_image=[image, image], control_guidance_start=0.6, control_guidance_end=0.5)
    with pytest.raises(PipelineError, match="image must hold finite floats in"):
        pipe(**REQUEST, control_image=[image, image * 255])
    base = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path, log=lambda _: None)
    with pytest.raises(PipelineError, match="control_image needs a ControlNet"):
        base(**REQUEST, control_image=image)


def test_a_controlnet_of_another_model_is_refused_before_loading(tiny_sdxl_folder, tmp_path):
    unet = oracle.random_unet(oracle.BASE_LIKE)
    oracle.build_tiny_controlnet(unet, tmp_path / "other")
    with pytest.raises(PipelineError, match="was made for another model: block_out_channels"):
        load_pipeline(tiny_sdxl_folder, controlnets=[tmp_path / "other"], cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(PipelineError, match="has no config.json"):
        load_pipeline(tiny_sdxl_folder, controlnets=[tmp_path], cache_dir=tmp_path / "cache")
