"""ControlNets from the command line: the preprocessors (`jaxfuse.control_images`), the flags end to
end on the tiny SDXL pipeline with a tiny ControlNet (equal to the API), and the flags' errors, each
raised before anything loads."""

import json
import sys

import cv2
import numpy as np
import PIL.Image
import pytest

from jaxfuse import oracle
from jaxfuse.control_images import ControlImageError, Preprocessor, preprocess
from jaxfuse.generate import check_args, main, parse_args
from jaxfuse.outputs import read_settings
from jaxfuse.pipeline import load_pipeline

# Every test runs in its own folder: the command's default output never lands where pytest started.
pytestmark = pytest.mark.usefixtures("in_tmp_path")


def edges_picture(height: int = 72, width: int = 80) -> np.ndarray:
    """uint8 [H, W, 3]: a light ground with a dark rectangle and a coloured disc (clear edges), and
    a faint square whose edges only low thresholds find."""
    picture = np.full((height, width, 3), 220, np.uint8)
    picture[10:40, 8:36] = (30, 40, 50)
    rows, columns = np.mgrid[:height, :width]
    picture[(rows - 48) ** 2 + (columns - 58) ** 2 < 14**2] = (200, 30, 20)
    picture[50:66, 6:22] = 208  # 12 levels below the ground
    return picture


def test_canny_is_opencvs_canny_of_the_rgb_picture_stacked_white_on_black():
    picture = edges_picture()
    edges = preprocess("canny", picture)
    expected = cv2.Canny(picture, 100, 200)  # diffusers' and ControlNet's examples
    assert edges.dtype == np.uint8 and edges.shape == picture.shape
    assert np.array_equal(edges, np.repeat(expected[..., None], 3, axis=-1))
    assert set(np.unique(edges)) == {0, 255} and (edges[..., 0] == 255).sum() > 100  # the shapes' outlines
    # A PIL image and floats in [0, 1] are the same picture.
    assert np.array_equal(preprocess(Preprocessor.CANNY, PIL.Image.fromarray(picture)), edges)
    assert np.array_equal(preprocess("canny", picture / 255), edges)
    # The thresholds are keyword arguments: low ones find the faint square too.
    low = preprocess("canny", picture, low_threshold=10, high_threshold=20)
    assert np.array_equal(low[..., 0], cv2.Canny(picture, 10, 20))
    assert low[50:66, 6:22].any() and not edges[50:66, 6:22].any()


def test_grey_is_the_601_luma_in_three_equal_channels():
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [10, 20, 30]]],
                       np.uint8)
    grey = preprocess("grey", colours)
    assert grey.dtype == np.uint8 and grey.shape == colours.shape
    assert grey[..., 0].tolist() == [[76, 150, 29, 255, 0, 18]]  # round(0.299 R + 0.587 G + 0.114 B)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
    # Pillow's "L" conversion is the same transform in fixed point: at most one level apart.
    picture = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
    pillow = np.asarray(PIL.Image.fromarray(picture).convert("L")).astype(int)
    assert np.abs(preprocess("grey", picture)[..., 0].astype(int) - pillow).max() <= 1


def test_none_is_the_picture_as_it_is():
    picture = edges_picture()
    assert np.array_equal(preprocess("none", picture), picture)
    assert np.array_equal(preprocess("none", PIL.Image.fromarray(picture).convert("RGBA")), picture)
    assert np.array_equal(preprocess("none", picture[..., 0]), np.repeat(picture[..., :1], 3, axis=-1))  # [H, W]


@pytest.mark.parametrize("name, image, options, message", [
    ("sobel", np.zeros((8, 8, 3), np.uint8), {}, "no preprocessor 'sobel'; choose one of canny, grey, none"),
    ("grey", np.zeros((8, 8, 3), np.uint8), {"low_threshold": 5}, "the grey preprocessor takes no option low_thr"),
    ("canny", np.zeros((8, 8, 3), np.uint8), {"sigma": 1}, "takes no option sigma; its options: low_threshold, high"),
    ("canny", np.zeros((8, 8, 3), np.uint8), {"low_threshold": float("nan")}, "low_threshold must be a finite"),
    ("none", np.zeros((8, 8, 4), np.uint8), {}, "must be [H, W, 3] (RGB, channels last) or [H, W], got shape"),
    ("none", np.full((8, 8, 3), 255.0), {}, "finite floats in [0, 1], got values in [255.0, 255.0]"),
])
def test_preprocess_refuses_what_it_cannot_make(name, image, options, message):
    with pytest.raises(ControlImageError) as e:
        preprocess(name, image, **options)
    assert message in str(e.value)


def test_canny_without_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now fails as if it were not installed
    with pytest.raises(ControlImageError, match=r'canny preprocessor needs OpenCV: pip install "jaxfuse\[control\]"'):
        preprocess("canny", edges_picture())
    assert preprocess("grey", edges_picture()).shape == (72, 80, 3)  # the others need no OpenCV


# --- the command line -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet(tiny_sdxl_folder, tmp_path_factory):
    """A tiny ControlNet of the tiny SDXL pipeline's UNet, saved as diffusers saves one."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("controlnet") / "net"
    oracle.build_tiny_controlnet(UNet2DConditionModel.from_pretrained(tiny_sdxl_folder / "unet"), folder, seed=7)
    return folder


@pytest.fixture
def control_picture(tmp_path):
    """A 72x80 PNG with clear edges (resized to the 64x64 output by the request)."""
    path = tmp_path / "control.png"
    PIL.Image.fromarray(edges_picture()).save(path)
    return path


def cli(folder, tmp_path, *extra):
    return ["--model", str(folder), "--prompt", "a red circle", "--height", "64", "--width", "64", "--steps", "2",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "x.png"), *extra]


@pytest.mark.slow
def test_the_command_line_equals_the_api(tiny_sdxl_folder, controlnet, control_picture, tmp_path, capsys):
    """56 s on a CPU: the command (converts and compiles) and the API (compiles again)."""
    out = tmp_path / "x.png"
    flags = ["--controlnet", str(controlnet), "--control-image", str(control_picture), "--control-preprocess", "canny",
             "--controlnet-scale", "0.7", "--control-guidance-start", "0.0", "--control-guidance-end", "0.6"]
    flags += ["--devices", "1", "--output-array", str(tmp_path / "x.npy")]  # one device: the API's default
    assert main(cli(tiny_sdxl_folder, tmp_path, *flags)) == 0
    assert "2 euler steps with 1 ControlNet (canny) on cpu" in capsys.readouterr().err
    pipe = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", controlnets=[controlnet], log=lambda _: None)
    control = PIL.Image.fromarray(preprocess("canny", PIL.Image.open(control_picture)))
    expected = pipe.generate("a red circle", height=64, width=64, num_inference_steps=2, control_image=control,
                             controlnet_conditioning_scale=0.7, control_guidance_end=0.6).images[0]
    assert np.abs(np.load(tmp_path / "x.npy") - expected).max() < 1e-6  # measured 0.0 (one device, as the API)
    plain = pipe.generate("a red circle", height=64, width=64, num_inference_steps=2).images[0]
    assert np.abs(expected - plain).max() > 1e-2  # the control changed the image
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert read_settings(out) == settings
    assert {k: settings[k] for k in ("controlnet", "control_image", "controlnet_scale", "control_guidance_start",
                                     "control_guidance_end", "control_preprocess", "guess_mode")} == {
        "controlnet": [str(controlnet)], "control_image": [str(control_picture)], "controlnet_scale": [0.7],
        "control_guidance_start": 0.0, "control_guidance_end": 0.6, "control_preprocess": "canny", "guess_mode": False}


@pytest.mark.parametrize("extra, scales, guess", [
    (["--controlnet-scale", "0.5"], (0.5, 0.5), False),  # one scale for all
    (["--controlnet-scale", "0.5", "--controlnet-scale", "0.8", "--guess-mode"], (0.5, 0.8), True),
    ([], (1.0, 1.0), False),
])
def test_the_flags_make_the_request(tiny_sdxl_folder, controlnet, control_picture, tmp_path, extra, scales, guess):
    """Two ControlNets in order, with their images (greyed), scales, start and end; nothing loads."""
    grey = tmp_path / "grey.png"
    PIL.Image.fromarray(np.full((64, 64, 3), (200, 30, 20), np.uint8)).save(grey)
    args = parse_args(cli(tiny_sdxl_folder, tmp_path, "--controlnet", str(controlnet), "--controlnet", str(controlnet),
                          "--control-image", str(control_picture), "--control-image", str(grey),
                          "--control-preprocess", "grey", "--control-guidance-start", "0.25", *extra))
    plan = check_args(args)
    control = plan.request.control
    assert [path for path, _ in plan.spec.controlnets] == [controlnet, controlnet]
    assert (control.scales, control.starts, control.ends, control.guess) == (scales, (0.25, 0.25), (1.0, 1.0), guess)
    assert [image.shape for image in control.images] == [(1, 64, 64, 3)] * 2
    np.testing.assert_allclose(control.images[1], 80 / 255, atol=1e-6)  # round(0.299 x 200 + 0.587 x 30 + 0.114 x 20)
    assert not (tmp_path / "cache").exists()


def failure(capsys, argv, message):
    """The command fails with exit code 2 and one `error:` line naming `message`, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    assert message in err, err


@pytest.mark.parametrize("extra, message", [
    (["--control-image", "{picture}"], "--control-image needs a ControlNet to read it: add --controlnet FOLDER"),
    (["--controlnet", "{net}"], "--controlnet needs a control image to read: add one --control-image IMAGE per"),
    (["--controlnet", "{net}", "--controlnet", "{net}", "--control-image", "{picture}"],
     "2 --controlnet folders but 1 --control-image; give one control image per ControlNet, in the same order"),
    (["--controlnet", "{net}", "--control-image", "{picture}", "--controlnet-scale", "1", "--controlnet-scale", "2"],
     "--controlnet-scale given 2 times for 1 ControlNet; give one scale for all, or one per --controlnet"),
    (["--controlnet-scale", "0.5"], "--controlnet-scale sets how a ControlNet steers the image; add --controlnet"),
    (["--guess-mode"], "--guess-mode sets how a ControlNet steers the image; add --controlnet FOLDER and"),
    (["--control-preprocess", "canny"], "--control-preprocess sets how a ControlNet steers the image"),
    (["--control-guidance-end", "0.5"], "--control-guidance-end sets how a ControlNet steers the image"),
    (["--controlnet", "{net}", "--control-image", "missing.png"], "--control-image missing.png: no such file"),
    (["--controlnet", "{tmp}", "--control-image", "{picture}"], "has no config.json: pass a diffusers ControlNet"),
    (["--controlnet", "{net}", "--control-image", "{picture}", "--control-guidance-start", "0.6",
      "--control-guidance-end", "0.5"], "control guidance start 0.6 must be below its end 0.5"),
    (["--controlnet", "{net}", "--control-image", "{picture}", "--control-guidance-end", "1.5"],
     "control guidance end must be a finite number in [0.0, 1.0], got 1.5"),
])
def test_bad_control_input_is_one_clear_error_before_loading(tiny_sdxl_folder, controlnet, control_picture, tmp_path,
                                                             capsys, extra, message):
    names = {"{net}": str(controlnet), "{picture}": str(control_picture), "{tmp}": str(tmp_path)}
    failure(capsys, cli(tiny_sdxl_folder, tmp_path, *[names.get(value, value) for value in extra]), message)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "x.png").exists()


def test_a_control_image_that_is_not_a_picture_is_named(tiny_sdxl_folder, controlnet, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not a picture")
    failure(capsys, cli(tiny_sdxl_folder, tmp_path, "--controlnet", str(controlnet), "--control-image",
                        str(tmp_path / "notes.png")),
            f"--control-image {tmp_path / 'notes.png'} is not an image file Pillow can read")
    assert not (tmp_path / "cache").exists()


def test_canny_without_opencv_fails_before_loading(tiny_sdxl_folder, controlnet, control_picture, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    failure(capsys, cli(tiny_sdxl_folder, tmp_path, "--controlnet", str(controlnet), "--control-image",
                        str(control_picture), "--control-preprocess", "canny"),
            'the canny preprocessor needs OpenCV: pip install "jaxfuse[control]".')
    assert not (tmp_path / "cache").exists()
