"""`python -m jaxfuse.generate` end to end on the tiny model, and its errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxfuse.generate import main
from jaxfuse.parallel.mesh import emulate_cpu_devices


@pytest.fixture(scope="module")
def folder(tiny_sdxl_folder):
    return tiny_sdxl_folder


def run(folder, tmp_path, *extra):
    return main(["--model", str(folder), "--prompt", "a blue triangle", "--height", "48", "--width", "64",
                 "--steps", "3", "--cache-dir", str(tmp_path / "cache"), *extra])


def test_writes_png_json_and_array(folder, tmp_path):
    np.save(tmp_path / "noise.npy", np.random.default_rng(1).standard_normal((1, 4, 6, 8)).astype(np.float32))
    out = tmp_path / "out" / "image.png"
    assert run(folder, tmp_path, "--output", str(out), "--output-array", str(tmp_path / "image.npy"),
               "--latents", str(tmp_path / "noise.npy"), "--scheduler", "ddim") == 0
    array = np.load(tmp_path / "image.npy")
    assert array.shape == (48, 64, 3) and array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    png = np.asarray(Image.open(out))
    assert png.shape == (48, 64, 3)
    assert np.abs(png.astype(np.float32) - array * 255).max() <= 0.5 + 1e-3
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["settings"]["scheduler"] == "ddim" and meta["settings"]["steps"] == 3
    assert set(meta["timings_s"]) == {"encode", "compile", "denoise", "decode"}


def test_existing_output_is_kept(folder, tmp_path, capsys):
    out = tmp_path / "image.png"
    out.write_bytes(b"precious")
    assert run(folder, tmp_path, "--output", str(out)) == 2
    assert "already exist" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("extra, message", [
    (["--height", "40"], "height 40 must be a positive multiple of 16"),
    (["--devices", "8", "--height", "96"], "height 96 must be a positive multiple of 128"),
    (["--devices", "16", "--height", "256"], "--devices 16 but only 8 cpu devices are present"),
    (["--devices", "4", "--mode", "displaced", "--warmup-steps", "0"], "at least one synchronous warm-up step"),
    (["--latents", "missing.npy"], "no such file"),
    (["--context", "0.5"], "add --mode pcpp"),
    (["--mode", "pcpp", "--context", "1.5"], "must be in [0, 1], got 1.5"),
])
def test_bad_input_is_one_clear_error(folder, tmp_path, capsys, extra, message):
    assert run(folder, tmp_path, "--output", str(tmp_path / "x.png"), *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_wrong_latents_shape(folder, tmp_path, capsys):
    np.save(tmp_path / "noise.npy", np.zeros((1, 4, 8, 8), np.float32))
    assert run(folder, tmp_path, "--output", str(tmp_path / "x.png"), "--latents", str(tmp_path / "noise.npy")) == 2
    assert "needs (1, 4, 6, 8)" in capsys.readouterr().err


def test_not_a_pipeline_folder(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    assert "missing model_index.json" in capsys.readouterr().err


def test_unknown_scheduler_is_refused_by_the_command_line():
    result = subprocess.run([sys.executable, "-m", "jaxfuse.generate", "--scheduler", "heun"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'heun'" in result.stderr


def test_parallel_run_writes_its_settings(folder, tmp_path):
    """pcpp over the default 4 emulated devices; the settings record its context (the default
    mode on several devices, displaced, is checked on the demo model)."""
    out = tmp_path / "patches.png"
    assert run(folder, tmp_path, "--output", str(out), "--mode", "pcpp", "--context", "0.5", "--warmup-steps", "1",
               "--height", "128") == 0
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert (settings["mode"], settings["context"], settings["devices"]) == ("pcpp", 0.5, 4)


def test_cpu_devices_are_emulated_only_when_not_already_set(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert emulate_cpu_devices(4)
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
    assert not emulate_cpu_devices(8)  # the user's (or the first) setting stands
    assert not emulate_cpu_devices(1)
