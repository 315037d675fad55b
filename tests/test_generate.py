"""`python -m jaxfuse.generate` end to end on the tiny model, and its errors."""

import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from jaxfuse.commands import attention_logits, finite_float
from jaxfuse.generate import build_parser, check_args, main, parse_args
from jaxfuse.generate import seeds as image_seeds
from jaxfuse.outputs import read_settings
from jaxfuse.parallel.mesh import emulate_cpu_devices
from jaxfuse.pipeline import COMPILE_CACHE_ENV, Request, load_pipeline
from jaxfuse.runtime import memory
from jaxfuse.spec import DEFAULT_STEPS

# Every test runs in its own folder, so the command's default output (jaxfuse.png in the current
# folder) never meets, or leaves, a file where pytest was started.
pytestmark = pytest.mark.usefixtures("in_tmp_path")


def cli(folder, tmp_path, *extra):
    return ["--model", str(folder), "--prompt", "a blue triangle", "--height", "48", "--width", "64",
            "--steps", "3", "--cache-dir", str(tmp_path / "cache"), *extra]


def run(folder, tmp_path, *extra):
    return main(cli(folder, tmp_path, *extra))


def test_writes_png_json_and_array(tiny_sdxl_folder, tmp_path):
    np.save(tmp_path / "noise.npy", np.random.default_rng(1).standard_normal((1, 4, 6, 8)).astype(np.float32))
    out = tmp_path / "out" / "image.png"  # folders that do not exist yet are made
    assert run(tiny_sdxl_folder, tmp_path, "--output", str(out),
               "--output-array", str(tmp_path / "arrays" / "image.npy"),
               "--latents", str(tmp_path / "noise.npy"), "--scheduler", "ddim") == 0
    array = np.load(tmp_path / "arrays" / "image.npy")
    assert array.shape == (48, 64, 3) and array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    png = np.asarray(Image.open(out))
    assert png.shape == (48, 64, 3)
    assert np.abs(png.astype(np.float32) - array * 255).max() <= 0.5 + 1e-3
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["settings"]["scheduler"] == "ddim" and meta["settings"]["steps"] == 3
    assert set(meta["timings_s"]) == {"encode", "compile", "denoise", "decode"}
    # The PNG carries the same settings, for whoever the image is shared with.
    assert read_settings(out) == meta["settings"]
    assert Image.open(out).text["Description"] == "a blue triangle"


@pytest.mark.slow
def test_several_images_are_one_batch_with_numbered_files(tiny_sdxl_folder, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert run(tiny_sdxl_folder, tmp_path, "--output", str(out), "--num-images", "2", "--seed", "5",
               "--guidance-scale", "1") == 0
    assert "generating 2 images of 64x48" in capsys.readouterr().err
    for i, seed in enumerate((5, 6)):
        settings = read_settings(tmp_path / f"x-{i}.png")
        assert (settings["seed"], settings["image"], settings["images"]) == (seed, i, 2)
        assert json.loads((tmp_path / f"x-{i}.json").read_text())["settings"] == settings
    assert not out.exists()


@pytest.mark.parametrize("argv, seeds", [([], [0]), (["--seed", "7"], [7]), (["--num-images", "3"], [0, 1, 2]),
                                         (["--seed", "3", "--seed", "9"], [3, 9]),
                                         (["--seed", "3", "--seed", "9", "--num-images", "2"], [3, 9])])
def test_seeds_of_a_batch(argv, seeds):
    assert image_seeds(parse_args(argv)) == seeds


def test_help_shows_every_flag_and_each_default_once(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    parser_help = capsys.readouterr().out
    assert all(action.help for action in build_parser()._actions)
    blocks = re.split(r"\n  (?=--)", parser_help)[1:]
    assert len(blocks) == len(vars(parse_args([])))  # every flag but -h, --help
    for block in blocks:
        assert block.count("default") <= 1, f"{block.split()[0]} shows its default twice"
    assert "(default: 30)" in parser_help and "(default: 5.0)" in parser_help and "default: None" not in parser_help


def test_the_command_line_and_the_api_default_to_the_same_steps():
    api_default = inspect.signature(Request.parse).parameters["num_inference_steps"].default
    assert parse_args([]).steps == api_default == DEFAULT_STEPS == 30


def test_existing_output_is_kept(tiny_sdxl_folder, tmp_path, capsys):
    out = tmp_path / "image.png"
    out.write_bytes(b"precious")
    assert run(tiny_sdxl_folder, tmp_path, "--output", str(out)) == 2
    assert "already exist" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def failure(capsys, code, argv, *messages):
    """Runs the command; asserts its exit code, that stderr names each message on one `error:`
    line, and that no traceback is printed."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    for message in messages:
        assert message in err, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--height", "40"], "height 40 must be a positive multiple of 16"),
    (["--devices", "8", "--height", "96"], "height 96 must be a positive multiple of 128"),
    (["--devices", "16", "--height", "256"], "--devices 16 but only 8 cpu devices are present"),
    (["--devices", "4", "--mode", "displaced", "--warmup-steps", "0"], "at least one synchronous warm-up step"),
    (["--latents", "missing.npy"], "no such file"),
    (["--context", "0.5"], "add --mode pcpp"),
    (["--mode", "pcpp", "--context", "1.5"], "must be in [0, 1], got 1.5"),
    # Inputs that once gave a silent wrong result.
    (["--guidance-scale", "-5"], "guidance scale must be a finite number at least 0.0, got -5.0"),
    (["--guidance-rescale", "5"], "guidance rescale must be a finite number in [0.0, 1.0], got 5.0"),
    (["--height", "0"], "height must be at least 1, got 0"),
    (["--height", "-256"], "height must be at least 1, got -256"),
    (["--devices", "4", "--mode", "displaced", "--warmup-steps", "50"],
     "--warmup-steps 50 covers all 3 steps that run, so no step would run displaced"),
    # Inputs that once failed late, with a traceback.
    (["--steps", "100000"], "steps must be in 1..1000, got 100000"),
    (["--seed", "1180591620717411303424"], "seed must be in 0..4294967295, got 1180591620717411303424"),
    (["--devices", "1000", "--height", "256", "--tiles", "off"], "or split 256 into 1, 2, 4, 8, 16 patches"),
    (["--num-images", "0"], "--num-images must be at least 1, got 0"),
    (["--output", "."], "--output . must end in .png"),
    (["--num-images", "3", "--seed", "1", "--seed", "2"], "--seed given 2 times for --num-images 3"),
    (["--strength", "0.5"], "--strength sets how much of an --image is redrawn; add --image"),
    (["--image", "missing.png"], "--image missing.png: no such file"),
    (["--vae", "no-vae-here"], "the VAE no-vae-here holds no config.json: pass a diffusers VAE folder"),
    (["--scheduler", "lcm", "--steps", "60"], "LCM takes at most original_inference_steps = 50 steps, got 60"),
    (["--lora", "missing.safetensors:0.5"], "LoRA missing.safetensors: no such file"),
    (["--lora", "style.ckpt"], "LoRA style.ckpt: a pickled file (.ckpt) can run code when read and is refused"),
    (["--lora", "style.safetensors:nan"], "--lora style.safetensors:nan: the weight must be a finite number"),
    (["--lora", "demo-lcm:abc"], "--lora demo-lcm:abc: the weight 'abc' after the colon is not a number; write "
                                 "FILE:WEIGHT, e.g. demo-lcm:0.8."),
    (["--lora", "gone:abc"], "LoRA gone:abc: no such file"),  # no file before the colon: the whole value is named
    (["--output-array", "x.png"], "--output-array x.png must end in .npy (a numpy array file), e.g. x.npy."),
    # A tiled canvas (the tiny model's native size is 64).
    (["--view-patches", "2"], "--view-patches splits the views of a tiled canvas; add --tiles on"),
    (["--region", "a red circle"], 'must be "PROMPT@X0,Y0,X1,Y1"'),
    (["--region", "a red circle@0,0,999,48", "--height", "64"], "box 0,0,999,48 must satisfy 0 <= x0 < x1 <= 64"),
    (["--tile-stride", "32"], "a tiled canvas's height must be at least the model's native 64"),
    (["--tile-stride", "12", "--height", "64", "--width", "128"], "tile stride 12 must be a multiple of 8"),
    (["--tiles", "on", "--height", "64", "--devices", "4", "--view-patches", "3", "--mode", "sync"],
     "--view-patches 3 must divide the 4 devices"),
    (["--tiles", "on", "--height", "64", "--view-patches", "8", "--mode", "sync"],
     "height 64 must be a positive multiple of 128"),  # a view's rows over 8 devices, before anything loads
])
def test_bad_input_is_one_clear_error(tiny_sdxl_folder, tmp_path, capsys, extra, message):
    failure(capsys, 2, cli(tiny_sdxl_folder, tmp_path, "--output", str(tmp_path / "x.png"), *extra), message)
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def picture(tmp_path):
    """A 48x64 RGB PNG, the size `cli` asks for."""
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (48, 64, 3), np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_image_to_image_from_the_command_line(tiny_sdxl_folder, tmp_path, picture):
    out = tmp_path / "out.png"
    assert run(tiny_sdxl_folder, tmp_path, "--image", str(picture), "--strength", "0.7", "--output", str(out)) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["settings"]["init_image"] == str(picture) and meta["settings"]["strength"] == 0.7
    assert set(meta["timings_s"]) == {"encode", "compile", "encode_image", "denoise", "decode"}
    pipe = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None)
    expected = pipe("a blue triangle", image=np.asarray(Image.open(picture)), strength=0.7, num_inference_steps=3)
    assert np.abs(np.asarray(Image.open(out)) / 255 - expected[0]).max() <= 0.5 / 255 + 1e-5  # PNG rounding


@pytest.mark.parametrize("extra, message", [
    (["--height", "64"], "height 64 differs from the image's 48; leave it out"),
    (["--strength", "0.1"], "strength 0.1 of 3 steps runs int(0.3) = 0 steps"),
    (["--devices", "4", "--mode", "displaced", "--warmup-steps", "2", "--strength", "0.7"],
     "--warmup-steps 2 covers all 2 steps that run"),
])
def test_bad_image_to_image_input(tiny_sdxl_folder, tmp_path, capsys, picture, extra, message):
    failure(capsys, 2, cli(tiny_sdxl_folder, tmp_path, "--image", str(picture), *extra), message)


@pytest.mark.slow
def test_a_lora_from_the_command_line(tiny_sdxl_folder, tmp_path):
    lora = tmp_path / "style.safetensors"
    rng = np.random.default_rng(6)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v"
    save_numpy({f"{name}.lora_down.weight": rng.standard_normal((2, 64), np.float32),
                f"{name}.lora_up.weight": rng.standard_normal((64, 2), np.float32)}, lora)
    out = tmp_path / "out.png"
    assert run(tiny_sdxl_folder, tmp_path, "--lora", f"{lora}:0.25", "--output", str(out)) == 0
    assert read_settings(out)["lora"] == [f"{lora}:0.25"]
    pipe = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None, loras=[(lora, 0.25)])
    expected = pipe("a blue triangle", height=48, width=64, num_inference_steps=3)
    assert np.abs(np.asarray(Image.open(out)) / 255 - expected[0]).max() <= 0.5 / 255 + 1e-5  # PNG rounding
    plain = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None)
    assert np.abs(plain("a blue triangle", height=48, width=64, num_inference_steps=3) - expected).max() > 1e-2


def test_a_file_that_is_not_an_image_is_named(tiny_sdxl_folder, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not a picture")
    failure(capsys, 2, cli(tiny_sdxl_folder, tmp_path, "--image", str(tmp_path / "notes.png")),
            f"--image {tmp_path / 'notes.png'} is not an image file Pillow can read")


def test_a_truncated_image_is_named(tiny_sdxl_folder, tmp_path, capsys, picture):
    cut = tmp_path / "cut.png"
    cut.write_bytes(picture.read_bytes()[:2000])
    failure(capsys, 2, cli(tiny_sdxl_folder, tmp_path, "--image", str(cut)), f"--image {cut} cannot be decoded")


def test_a_16_bit_grey_image_is_read_at_its_values_not_as_white(tiny_sdxl_folder, tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((48, 64), 30000, np.uint16)).save(path)
    request = check_args(parse_args(cli(tiny_sdxl_folder, tmp_path, "--image", str(path), "--strength", "0.7"))).request
    np.testing.assert_allclose(request.image_to_image.image, np.full((1, 48, 64, 3), 30000 / 65535), rtol=1e-6)


FLOAT_FLAGS = [action.option_strings[0] for action in build_parser()._actions if action.type is finite_float]


def test_every_float_flag_takes_finite_numbers_only():
    assert not [action.option_strings for action in build_parser()._actions if action.type is float]
    assert sorted(FLOAT_FLAGS) == ["--aesthetic-score", "--bootstrap", "--context", "--control-guidance-end",
                                   "--control-guidance-start", "--controlnet-scale", "--deepcache-power",
                                   "--guidance-rescale", "--guidance-scale", "--negative-aesthetic-score",
                                   "--refiner-start", "--strength"]


@pytest.mark.parametrize("value, message", [("nan", "nan is not a finite number"),
                                            ("inf", "inf is not a finite number"), ("abc", "'abc' is not a number")])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_a_float_flag_refuses_what_is_not_a_finite_number(capsys, flag, value, message):
    """Even where nothing else checks it (--bootstrap without --region, --context before the
    devices are known), NaN and infinity are refused as the flag is read."""
    with pytest.raises(SystemExit) as e:
        main([flag, value])
    assert e.value.code == 2
    assert f"error: argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--num-images", "1000000000000"], "the pixels of 1000000000000 images of 64x48 take 34,332,275.4 GiB as float32"),
    (["--height", "1000000", "--width", "1000000"], "the pixels of 1 image of 1000000x1000000 take 11,175.9 GiB"),
])
def test_images_the_host_cannot_hold_are_refused_at_once(tiny_sdxl_folder, tmp_path, capsys, monkeypatch, extra,
                                                         message):
    monkeypatch.setattr(memory, "host_memory", lambda: 16 << 30)
    start = time.perf_counter()
    failure(capsys, 2, cli(tiny_sdxl_folder, tmp_path, "--output", str(tmp_path / "x.png"), *extra), message,
            "more than this machine's 16.0 GiB of memory; make fewer images per run (--num-images) or smaller ones")
    assert time.perf_counter() - start < 10  # neither 10^12 seeds nor file names were listed


def test_a_step_no_device_can_hold_is_refused_before_loading(tiny_sdxl_folder, tmp_path, capsys, monkeypatch):
    """An untiled 4096² image: its attention logits alone exceed a device (8 CPU devices sharing 16 GiB)."""
    monkeypatch.setattr(memory, "host_memory", lambda: 16 << 30)
    err = failure(capsys, 2, cli(tiny_sdxl_folder, tmp_path, "--output", str(tmp_path / "x.png"),
                                 "--height", "4096", "--width", "4096", "--tiles", "off", "--devices", "1"),
                  "one UNet step on 1 image of 4096x4096 needs",
                  "a device for its attention logits alone (float32 [2, ",
                  "more than the 2.0 GiB a cpu device holds", "(--devices) or make a canvas of views (--tiles on).")
    assert "loading" not in err and "converting" not in err


def test_a_canvas_step_holds_one_view_whatever_the_canvas_size(tiny_sdxl_folder, tmp_path):
    """What bounds a step is the views' size: canvases of any size keep working."""
    def logits(*extra):
        plan = check_args(parse_args(cli(tiny_sdxl_folder, tmp_path, "--devices", "1", *extra)))
        return attention_logits(plan.spec, plan.request, plan.parallel)

    canvas = logits("--height", "128", "--width", "128", "--tiles", "on")
    assert logits("--height", "8192", "--width", "8192", "--tiles", "on") == canvas
    untiled = logits("--height", "128", "--width", "128", "--tiles", "off")
    assert math.prod(untiled) == 16 * math.prod(canvas)  # the tokens of an image twice the view's side


def test_latents_holding_nan_or_text_are_refused(tiny_sdxl_folder, tmp_path, capsys):
    noise = np.zeros((1, 4, 6, 8), np.float32)
    noise[0, 1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", noise)
    (tmp_path / "text.npy").write_text("0.1 0.2 0.3\n")
    out = str(tmp_path / "x.png")
    failure(capsys, 2, cli(tiny_sdxl_folder, tmp_path, "--output", out, "--latents", str(tmp_path / "nan.npy")),
            "latents hold 1 NaN or infinite values")
    failure(capsys, 2, cli(tiny_sdxl_folder, tmp_path, "--output", out, "--latents", str(tmp_path / "text.npy")),
            f"--latents {tmp_path / 'text.npy'} is not a .npy array file; write one with numpy.save.")


@pytest.mark.parametrize("case", ["array without suffix", "output is a folder", "unwritable folder",
                                  "folder is a file"])
def test_every_output_is_checked_before_anything_loads(tiny_sdxl_folder, tmp_path, capsys, case):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "arr.npy").write_bytes(b"precious")
    (tmp_path / "afile").write_bytes(b"precious")
    argv, message = {
        "array without suffix": (["--output", f"{tmp_path}/o/x.png", "--output-array", f"{tmp_path}/o/arr"],
                                 f"--output-array {tmp_path}/o/arr must end in .npy"),
        "output is a folder": (["--output", f"{tmp_path}/o/sub.png"], "is a folder; name a file inside it"),
        # /sys takes no new file, not even from root (CI runs as root, which ignores permission bits).
        "unwritable folder": (["--output", "/sys/x.png"], "cannot write into /sys"),
        "folder is a file": (["--output", f"{tmp_path}/afile/x.png"], "afile is a file, not a folder"),
    }[case]
    (tmp_path / "o" / "sub.png").mkdir()
    failure(capsys, 2, cli(tiny_sdxl_folder, tmp_path, *argv), message)
    assert (tmp_path / "o" / "arr.npy").read_bytes() == b"precious" and not (tmp_path / "o" / "x.png").exists()
    assert (tmp_path / "afile").read_bytes() == b"precious"


def broken_copy(folder, tmp_path, change):
    """A copy of the pipeline `folder` that `change(copy)` damages."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    change(copy)
    return copy


@pytest.mark.parametrize("change, message", [
    (lambda m: (m / "unet" / "config.json").write_text("{\n"), "unet/config.json is not valid JSON"),
    (lambda m: (m / "tokenizer" / "vocab.json").unlink(), "missing tokenizer/vocab.json"),
    (lambda m: (m / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00"),
     "diffusion_pytorch_model.safetensors"),
])
def test_a_damaged_model_folder_is_named(tiny_sdxl_folder, tmp_path, capsys, change, message):
    model = broken_copy(tiny_sdxl_folder, tmp_path, change)
    out = tmp_path / "x.png"
    failure(capsys, 2, ["--model", str(model), "--output", str(out), "--cache-dir", str(tmp_path / "cache")], message)
    assert not out.exists()


def test_weights_holding_nan_fail_before_denoising(tiny_sdxl_folder, tmp_path, capsys):
    def poison(model):
        path = model / "unet" / "diffusion_pytorch_model.safetensors"
        tensors = load_file(path)
        tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
        save_file(tensors, path)

    model = broken_copy(tiny_sdxl_folder, tmp_path, poison)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    err = failure(capsys, 2, cli(model, tmp_path, "--output", str(tmp_path / "x.png")),
                  "the checkpoint's values must be finite", f"holding NaN or infinity (the file is damaged: restore it "
                  f"from its original copy): 1\n    conv_in.weight in {weights}")
    assert "denoising [" not in err and not (tmp_path / "x.png").exists() and not (tmp_path / "cache").exists()


def test_a_lora_weight_that_overflows_the_unet_is_named(tiny_sdxl_folder, tmp_path, capsys):
    """A finite weight that leaves the fused kernels finite but makes the UNet's result overflow:
    the LoRA and its weight are named, and a float32 run is not told to try float32."""
    lora = tmp_path / "style.safetensors"
    rng = np.random.default_rng(6)
    save_numpy({"lora_unet_conv_out.lora_down.weight": rng.standard_normal((2, 32, 3, 3), np.float32),
                "lora_unet_conv_out.lora_up.weight": rng.standard_normal((4, 2, 1, 1), np.float32)}, lora)
    code = main(["--model", str(tiny_sdxl_folder), "--height", "48", "--width", "64", "--steps", "2", "--devices", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--lora", f"{lora}:1e37", "--dtype", "float32",
                 "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"the likely cause is the LoRA {lora} at weight 1e+37 (try a weight nearer 1) or the UNet's weights." in err
    assert "--dtype float32" not in err.splitlines()[-1]


def test_wrong_latents_shape(tiny_sdxl_folder, tmp_path, capsys):
    np.save(tmp_path / "noise.npy", np.zeros((1, 4, 8, 8), np.float32))
    assert run(tiny_sdxl_folder, tmp_path, "--output", str(tmp_path / "x.png"),
               "--latents", str(tmp_path / "noise.npy")) == 2
    assert "needs (1, 4, 6, 8)" in capsys.readouterr().err


def test_not_a_pipeline_folder(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    assert "missing model_index.json" in capsys.readouterr().err


def test_unknown_scheduler_is_refused_by_the_command_line():
    result = subprocess.run([sys.executable, "-m", "jaxfuse.generate", "--scheduler", "heun"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'heun'" in result.stderr


@pytest.mark.slow
def test_parallel_run_writes_its_settings(tiny_sdxl_folder, tmp_path):
    """pcpp over the default 4 emulated devices; the settings record its context (the default
    mode on several devices, displaced, is checked on the demo model)."""
    out = tmp_path / "patches.png"
    assert run(tiny_sdxl_folder, tmp_path, "--output", str(out), "--mode", "pcpp", "--context", "0.5",
               "--warmup-steps", "1", "--height", "128") == 0
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert (settings["mode"], settings["context"], settings["devices"]) == ("pcpp", 0.5, 4)


def test_cpu_devices_are_emulated_only_when_not_already_set(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert emulate_cpu_devices(4)
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
    assert not emulate_cpu_devices(8)  # the user's (or the first) setting stands
    assert not emulate_cpu_devices(1)


@pytest.mark.slow
def test_a_second_run_loads_every_program_from_the_compile_cache(tiny_sdxl_folder, tmp_path):
    """Two processes with the same command: the second compiles nothing (counted by JAX's
    persistent-cache events, recorded in the settings); --no-compile-cache keeps no cache."""
    env = {k: v for k, v in os.environ.items() if k != COMPILE_CACHE_ENV}

    def counts(name, *extra):
        command = [sys.executable, "-m", "jaxfuse.generate",
                   *cli(tiny_sdxl_folder, tmp_path, "--output", str(tmp_path / name)), *extra]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return read_settings(tmp_path / name)["compile_cache"]

    # The first run converts the weights (programs of its own), without the compile cache.
    assert counts("convert.png", "--no-compile-cache") is None and not (tmp_path / "cache" / "xla").exists()
    first, second = counts("first.png"), counts("second.png")
    assert first["compiled"] > 3  # measured 26 programs
    assert second == {"compiled": 0, "loaded": first["compiled"] + first["loaded"]}
