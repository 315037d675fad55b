"""The demo ControlNet's trainer (`jaxfuse.demo.train_controlnet`) at a small size: its control
images, its start (diffusers' `from_unet`: the UNet's output unchanged), a few steps, its export."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfuse.config import ControlNetConfig
from jaxfuse.demo import DEMO_MODEL, scenes
from jaxfuse.demo import train_controlnet as tc
from jaxfuse.demo.architecture import IMAGE_SIZE
from jaxfuse.demo.detect import chroma_vectors
from jaxfuse.demo.train import adamw, optimizer_step
from jaxfuse.models.controlnet import ControlNetModel, load_controlnet, skip_channels
from jaxfuse.pipeline import load_pipeline

SIZE = 64  # pixels: 8 x 8 latents


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(DEMO_MODEL, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda _: None)


@pytest.fixture(scope="module")
def start(pipe):
    cfg = tc.controlnet_config(pipe.spec.unet)
    return cfg, tc.init_controlnet(cfg, pipe.denoiser.params, 0)


def sampled(seed: int, count: int) -> list[scenes.Scene]:
    rng = np.random.default_rng(seed)
    return [scenes.sample_scene(rng) for _ in range(count)]


def small_batch(pipe, seed: int):
    """Two scenes' latents (random: no VAE to compile), token ids and control images at SIZE."""
    scene_list = sampled(seed, 2)
    captions = [scenes.caption(scene) for scene in scene_list]
    latents = jax.random.normal(jax.random.key(seed), (2, 4, SIZE // 8, SIZE // 8))
    return (latents, [encoder.token_ids(captions) for encoder in pipe.text.encoders],
            jnp.asarray(tc.control_batch(scene_list, seed, SIZE)))


def test_exact_silhouettes_are_the_shapes_level_on_the_shapes_and_light_off_them():
    rng = np.random.default_rng(0)
    for scene in sampled(1, 20):
        style = dataclasses.replace(scenes.sample_control_style(rng, len(scene.objects)), blur=0.0, noise=0.0,
                                    blobs=(False,) * len(scene.objects))
        image = scenes.control_image(scene, 128, style)
        assert image.shape == (128, 128, 3) and image.dtype == np.float32
        assert (image[..., :1] == image).all() and 0 <= image.min() and image.max() <= 1
        rendered = scenes.render(scene, 128)
        rows, columns = np.mgrid[:128, :128] * 3 // 128
        for obj, level in zip(scene.objects, style.shape_levels):
            # The pixels the object covers wholly (another object may have its colour, in another cell).
            inside = (rendered == scenes.COLOURS[obj.colour]).all(axis=-1) & (
                (rows, columns) == np.array(scenes.cell(obj.position))[:, None, None]).all(axis=0)
            assert inside.sum() > 50 and np.allclose(image[inside, 0], level, atol=1e-6)
        # The muted background, with the objects' faintest antialiased edges.
        outside = np.hypot(*np.moveaxis(chroma_vectors(rendered / 255), -1, 0)) < 0.15
        assert (image[outside, 0] > (max(style.shape_levels) + min(style.background)) / 2).all()
        assert outside.mean() > 0.5


def test_control_images_are_dark_at_every_object_and_light_far_from_them():
    """Random styles (rough blobs, blur), without the noise: every object's middle is darker than
    halfway to the background, every pixel beyond 1.5 radii of all objects (a triangle's corners
    reach 1.41) lighter."""
    rng, size = np.random.default_rng(2), 128
    ys, xs = (np.mgrid[:size, :size] + 0.5) / size
    blobs = 0
    for scene in sampled(3, 40):
        style = dataclasses.replace(scenes.sample_control_style(rng, len(scene.objects)), noise=0.0)
        blobs += sum(style.blobs)
        image = scenes.control_image(scene, size, style)[..., 0]
        halfway = (max(style.shape_levels) + min(style.background)) / 2
        far = np.ones((size, size), bool)
        for obj, placement in zip(scene.objects, scene.placements):
            row, column = scenes.cell(obj.position)
            x, y = (column + 0.5) / 3 + placement.dx, (row + 0.5) / 3 + placement.dy
            assert image[int(y * size), int(x * size)] < halfway
            far &= np.hypot(xs - x, ys - y) > 1.5 * placement.radius
        assert (image[far] > halfway).all()
    assert 15 <= blobs <= 45  # a third of about 80 objects


def test_control_images_are_deterministic_and_noisy_as_their_style_says():
    scene = sampled(4, 1)[0]
    style = scenes.sample_control_style(np.random.default_rng(5), len(scene.objects))
    image = scenes.control_image(scene, 128, style)
    np.testing.assert_array_equal(image, scenes.control_image(scene, 128, style))
    quiet = scenes.control_image(scene, 128, dataclasses.replace(style, noise=0.0))
    assert abs((image - quiet).std() - style.noise) < 0.2 * style.noise
    with pytest.raises(ValueError, match="objects"):
        scenes.control_image(scene, 128, dataclasses.replace(style, blobs=style.blobs + (True,)))


@pytest.mark.slow
def test_the_untrained_controlnet_copies_the_unet_and_leaves_its_output_unchanged(pipe, start):
    cfg, params = start
    unet_params = pipe.denoiser.params
    for name in ("time_embedding", "add_embedding", "conv_in", "down_blocks_2", "mid_block"):
        jax.tree.map(np.testing.assert_array_equal, params[name], unet_params[name])
    zeros = {path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             if tc.zero_at_start(tuple(k.key for k in path))}
    assert len(zeros) == 2 * (len(skip_channels(cfg)) + 1) + 2  # kernel and bias of each, and conv_out's
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path in zeros:
            assert (np.asarray(leaf) == 0).all(), path
        elif path[-1].key == "kernel":  # the embedding's biases start at zero too, as Flax starts them
            assert (np.asarray(leaf) != 0).any(), path

    latents, ids, control = small_batch(pipe, 6)
    t, noise = jnp.array([999, 400]), jax.random.normal(jax.random.key(1), latents.shape)
    net = ControlNetModel(cfg)

    @jax.jit
    def errors(params):
        context, pooled = tc.text_conditioning(pipe, *ids)
        return (tc.noise_error(pipe, net, params, latents, context, pooled, control, t, noise),
                tc.noise_error(pipe, net, None, latents, context, pooled, control, t, noise))

    with_control, alone = errors(params)
    assert np.abs(np.asarray(with_control) - np.asarray(alone)).max() == 0


@pytest.mark.slow
def test_a_few_steps_train_the_zero_convolutions(pipe, start):
    cfg, params = start
    train_cfg = tc.ControlNetTrainConfig(batch=2)
    tx = adamw(1e-3, 1)
    step = optimizer_step(tc.make_loss(pipe, ControlNetModel(cfg), train_cfg), tx)
    state = {"step": 0, "seconds": 0.0, "params": params, "opt": tx.init(params)}
    latents, ids, _ = small_batch(pipe, 7)
    context, pooled = jax.jit(lambda ids: tc.text_conditioning(pipe, *ids))(ids)
    for i in range(3):
        control = jnp.asarray(tc.control_batch(sampled(7, 2), i, SIZE))
        state, loss = step(state, latents, context, pooled, control, jax.random.key(i))
        assert np.isfinite(float(loss)) and float(loss) > 0
    assert int(state["step"]) == 3
    assert np.abs(np.asarray(state["params"]["controlnet_mid_block"]["kernel"])).max() > 0


def test_export_is_a_diffusers_controlnet_folder_jaxfuse_reads_back(start, tmp_path):
    cfg, params = start
    tc.export_controlnet(tmp_path, cfg, params)
    read = ControlNetConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    assert dataclasses.replace(read, unet=dataclasses.replace(read.unet, sample_size=cfg.unet.sample_size)) == cfg
    net, loaded = load_controlnet(tmp_path)
    assert net.cfg.embedding_channels == tc.EMBEDDING_CHANNELS
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, np.float16).astype(np.float32)),
                 loaded, params)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").stat().st_size < 4 * 2**20


def test_the_shipped_controlnet_equals_diffusers_and_puts_the_prompts_shapes_on_the_control(tmp_path):
    """The shipped demo ControlNet, read by jaxfuse and by diffusers: the same image, and the
    caption's colour and shape drawn where the control's dark shape is (the caption names the same
    cell)."""
    import torch
    from diffusers import ControlNetModel as TorchControlNet
    from diffusers import StableDiffusionXLControlNetPipeline

    from jaxfuse.demo import DEMO_CONTROLNET
    from jaxfuse.demo.detect import prompt_accuracy

    scene = scenes.sample_scene(np.random.default_rng(11))
    control = scenes.control_image(scene, IMAGE_SIZE, scenes.ControlStyle(
        (0.2,) * len(scene.objects), (False,) * len(scene.objects), (0.85, 0.8), True, 0.0, 0.0, 0))[None]
    noise = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype(np.float32)
    request = dict(prompt=scenes.caption(scene), num_inference_steps=8, guidance_scale=5.0)
    pipe = load_pipeline(DEMO_MODEL, cache_dir=tmp_path, controlnets=[DEMO_CONTROLNET], log=lambda _: None)
    ours = pipe(**request, control_image=control, latents=noise)
    reference = StableDiffusionXLControlNetPipeline.from_pretrained(
        DEMO_MODEL, controlnet=TorchControlNet.from_pretrained(DEMO_CONTROLNET, torch_dtype=torch.float32),
        torch_dtype=torch.float32)
    expected = reference(**request, image=control, latents=torch.from_numpy(noise), output_type="np").images
    assert np.abs(ours - expected).max() < 2e-5  # measured 1.8e-6
    assert prompt_accuracy(request["prompt"], np.round(ours[0] * 255).astype(np.uint8)) == 1.0
