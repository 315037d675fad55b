"""SDXL's ControlNet against diffusers on tiny random weights: the model (`ControlNetModel`, its
residuals and the UNet that adds them), the pipelines (`StableDiffusionXLControlNetPipeline` with
one and two ControlNets, start and end, guess mode; `StableDiffusionXLControlNetImg2ImgPipeline`),
and the request's checks."""

import functools

import jax
import jax.numpy as jnp
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
from stream_reference import DELTA, SCALE, T_INDEX, alone

from jaxfuse import oracle, schedulers
from jaxfuse.models.controlnet import load_controlnet
from jaxfuse.models.unet import load_unet
from jaxfuse.parallel_config import Mode, ParallelConfig
from jaxfuse.pipeline import load_pipeline
from jaxfuse.pipeline.request import Controls, Request
from jaxfuse.sampling import stream
from jaxfuse.sampling.denoiser import Control
from jaxfuse.sampling.image import Direct
from jaxfuse.sampling.stream import StreamConfig, StreamGuidance
from jaxfuse.spec import PipelineError
from jaxfuse.stream import Stream
from jaxfuse.stream.cli import main as stream_main

HEIGHT, WIDTH = 64, 96
STEPS = 6
REQUEST = dict(prompt="a red circle at the top left", negative_prompt="a blue square", guidance_scale=6.0,
               height=HEIGHT, width=WIDTH, num_inference_steps=STEPS)


def control_images(count: int, height: int = HEIGHT, width: int = WIDTH, seed: int = 3) -> list[np.ndarray]:
    """`count` control images [1, H, W, 3] in [0, 1]: smooth shapes, so a nearest resize keeps them."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(size=(1, height, width, 3)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("case, settings, guess", [
    ("base-like", {}, False), pytest.param("refiner-like", {}, False, marks=pytest.mark.slow), ("base-like", {}, True),
    ("base-like", {"controlnet_conditioning_channel_order": "bgr"}, False),
    ("refiner-like", {"global_pool_conditions": True}, True)])
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


TALL = 128  # 16 latent rows: 2 a device on 8 devices, which the tiny UNet halves once
TALL_REQUEST = dict(REQUEST, height=TALL, width=64, controlnet_conditioning_scale=[1.0, 0.7],
                    control_guidance_end=0.8)


@pytest.fixture(scope="module")
def tall_single(pipe):
    return pipe(**TALL_REQUEST, control_image=control_images(2, TALL, 64), latents=noise(height=TALL, width=64))


@pytest.mark.parametrize("devices, cfg_parallel", [(2, False), pytest.param(4, False, marks=pytest.mark.slow),
                                                   pytest.param(8, False, marks=pytest.mark.slow),
                                                   pytest.param(4, True, marks=pytest.mark.slow)])
def test_sync_over_devices_equals_one_device(pipe, tall_single, devices, cfg_parallel):
    """The control images split by rows as the latents; every ControlNet layer exchanges fresh context."""
    images = pipe(**TALL_REQUEST, control_image=control_images(2, TALL, 64), latents=noise(height=TALL, width=64),
                  parallel=ParallelConfig(devices, Mode.SYNC, cfg_parallel=cfg_parallel))
    assert np.abs(images - tall_single).max() < 5e-5  # measured 5.0e-6 (2), 4.3e-6 (4), 3.8e-6 (8), 3.2e-6 (2 x 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.DISPLACED, Mode.PCPP])
def test_approximate_modes_stay_near_one_device(pipe, tall_single, mode):
    """The ControlNets carry stale context of their own; the result stays as near one device as the UNet's."""
    images = pipe(**TALL_REQUEST, control_image=control_images(2, TALL, 64), latents=noise(height=TALL, width=64),
                  parallel=ParallelConfig(2, mode, warmup_steps=1))
    error = np.abs(images - tall_single).mean()
    assert 0 < error < 0.1  # mean error, measured: displaced 1.1e-2, pcpp 1.1e-2 (random weights)


CANVAS = dict(REQUEST, height=64, width=160, tile_stride=32, controlnet_conditioning_scale=[1.0, 0.5])


@pytest.fixture(scope="module")
def canvas_single(pipe):
    return pipe(**CANVAS, control_image=control_images(2, 64, 160), latents=noise(width=160))


@pytest.mark.parametrize("view_devices, patches", [(2, 1), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_a_canvas_crops_the_control_per_view_over_devices_as_on_one(pipe, canvas_single, view_devices, patches):
    images = pipe(**CANVAS, control_image=control_images(2, 64, 160), latents=noise(width=160),
                  view_devices=view_devices, parallel=ParallelConfig(view_devices * patches, Mode.SYNC))
    assert np.abs(images - canvas_single).max() < 5e-5  # measured 3.7e-6 (2 x 1), 5.4e-6 (2 x 2)
    plain = pipe(**{k: v for k, v in CANVAS.items() if not k.startswith("control")}, latents=noise(width=160))
    assert np.abs(canvas_single - plain).max() > 1e-2  # the control changed the canvas


STREAM_SIZE = (32, 48)


def controlled_unet(pipe, image):
    """The UNet on one image [C, h, w] at timestep t with the pipeline's first ControlNet steered by
    `image` [1, 3, H, W] at its full scale: `test_stream.alone`'s model, controlled."""
    net = pipe.denoiser.controlnets[0]
    apply_net, apply_unet = jax.jit(net.module.apply), jax.jit(pipe.denoiser.unet.apply)

    def run(x, t, cond, row):
        text = dict(text_embeds=cond.text_embeds[row:row + 1], time_ids=cond.time_ids[row:row + 1])
        context, t = cond.context[row:row + 1], jnp.full((1,), t)
        residuals = apply_net({"params": net.params}, x[None], t, context, image, **text)
        return apply_unet({"params": pipe.denoiser.params}, x[None], t, context, **text, control=residuals)[0]

    return run


@pytest.mark.parametrize("n, rcfg", [pytest.param(2, "none", marks=pytest.mark.slow), (2, "full"),
                                     pytest.param(4, "initialize", marks=pytest.mark.slow)])
def test_each_stream_image_leaves_as_if_denoised_alone_under_its_control(one_net_pipe, n, rcfg):
    """Every row of the stream's batch reads the control (the newest frame's) at its own slot's scale."""
    height, width = STREAM_SIZE
    config = StreamConfig(T_INDEX[n], 1, rcfg)
    schedule = schedulers.lcm_at(one_net_pipe.spec.scheduler, 50, config.t_index_list)
    request = Request.parse(one_net_pipe.spec, "a red circle", "a blue square", height=height, width=width)
    image = jnp.asarray(control_images(1, height, width)[0].transpose(0, 3, 1, 2))
    cond = one_net_pipe.text.conditioning(Direct(), request, negative=True)
    cond = cond.replace(control=Control((image,), jnp.ones((1, n), jnp.float32)))
    call = jax.jit(functools.partial(stream.stream_step, config=config, schedule=schedule, cond=cond,
                                     guidance=StreamGuidance(jnp.float32(SCALE), jnp.float32(DELTA))))
    state = stream.initial_state(config, (4, height // 8, width // 8), seed=3)
    entered, left = [], []
    for _ in range(n + 1):
        entered.append(stream.entering_latents(config, schedule, state, None))
        state, finished = call(one_net_pipe.denoiser, state=state, frame=None)
        left.append(np.asarray(finished))
    slot_noise = np.asarray(state.noise).reshape(n, 1, 4, height // 8, width // 8)
    unet = controlled_unet(one_net_pipe, image)
    for k in range(2):
        expected = alone(unet, config, schedule, cond, entered[k][0][0], entered[k][1][0], slot_noise[:, 0])
        error = float(np.abs(left[k + n - 1][0] - expected).max() / np.abs(expected).max())
        assert error < 3e-5  # of the image's max; measured 3.7e-7 (2, none), 6.0e-7 (2, full), 3.1e-6 (4, initialize)


def test_a_stream_takes_each_frame_as_its_control_and_compiles_once(one_net_pipe):
    """A text-to-image stream steered by its frames: a new frame and a new prompt compile nothing,
    and the control moves the image (scale 0 leaves the UNet's alone)."""
    height, width = STREAM_SIZE
    frames = np.stack(control_images(3, height, width))  # [3, 1, H, W, 3]: three calls of one frame
    kwargs = dict(config=StreamConfig((32, 45), 1, "none"), image_to_image=False, height=height, width=width)
    steered = Stream(one_net_pipe, "a red circle", **kwargs)
    assert steered.takes_frames
    images = [steered(frames[0]), steered(frames[1])]
    steered.update_prompt("a blue square")
    images.append(steered(frames[2]))
    assert len(steered.programs) == 1
    unsteered = Stream(one_net_pipe, "a red circle", controlnet_conditioning_scale=0.0, **kwargs)
    plain = [unsteered(frames[0]), unsteered(frames[1])]
    assert np.abs(images[1] - plain[1]).max() > 1e-2
    with pytest.raises(PipelineError, match="an image-to-image stream: pass frames"):
        steered()


@pytest.mark.slow
def test_the_stream_command_steers_with_each_frame(one_net_pipe, tiny_sdxl_folder, controlnet_folders, tmp_path):
    """`python -m jaxfuse.stream --controlnet`: the frames, Canny-preprocessed, steer the stream; equal to the API."""
    height, width = STREAM_SIZE
    frames = (np.stack(control_images(2, height, width))[:, 0] * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    for i, frame in enumerate(frames):
        PIL.Image.fromarray(frame).save(tmp_path / "in" / f"frame{i}.png")
    args = ["--model", str(tiny_sdxl_folder), "--cache-dir", str(tmp_path / "cache"), "--prompt", "a red circle",
            "--controlnet", str(controlnet_folders[0]), "--controlnet-scale", "0.8", "--control-preprocess", "canny"]
    assert stream_main([*args, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 0
    written = np.stack([np.asarray(PIL.Image.open(tmp_path / "out" / f"{i:06d}.png")) for i in range(2)])
    live = Stream(one_net_pipe, "a red circle", config=StreamConfig((32, 45), 1, "none"), height=height,
                  width=width, controlnet_conditioning_scale=0.8, control_preprocess="canny")
    expected = live.run(np.concatenate([frames, frames[-1:]])[:, None])[1:, 0]  # fed once more to let the last out
    assert np.abs(written / 255 - expected).max() <= 0.5 / 255 + 1e-5  # PNG rounding


def test_the_stream_command_names_a_controlnet_it_cannot_use(tiny_sdxl_folder, controlnet_folders, tmp_path,
                                                            capsys):
    base = ["--model", str(tiny_sdxl_folder), "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "o")]
    assert stream_main([*base, "--frames", "2", "--controlnet", str(controlnet_folders[0])]) == 2
    assert "--controlnet is steered by the frames: give --input" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    PIL.Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    assert stream_main([*base, "--input", str(tmp_path / "in"), "--controlnet", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before anything was converted


@pytest.mark.slow
def test_deepcache_skips_the_residuals_of_the_layers_it_skips(pipe, tall_single):
    """A shallow step adds the ControlNets' residuals to the skips it makes only; over devices as on one."""
    cached = dict(TALL_REQUEST, control_image=control_images(2, TALL, 64), latents=noise(height=TALL, width=64),
                  deepcache=2, deepcache_branch=1)
    one = pipe(**cached)
    two = pipe(**cached, parallel=ParallelConfig(2, Mode.SYNC))
    assert np.abs(two - one).max() < 5e-5  # measured 4.9e-6
    assert 1e-3 < np.abs(one - tall_single).mean() < 0.1  # the cache's own approximation; measured 1.1e-2
