"""`python -m jaxfuse.stream` given bad inputs, as a new user would give them: each is refused
with one line naming the flag, before the model loads (`load_pipeline` fails here if called), or
read right; two runs into one output cannot both write."""

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxfuse.pipeline import COMPILE_CACHE_ENV
from jaxfuse.sampling.stream import StreamConfig
from jaxfuse.spec import PipelineSpec
from jaxfuse.stream import cli, media
from jaxfuse.stream.program import call_bytes

WIDTH, HEIGHT = 48, 32


def command(argv: list[str]) -> int:
    """The command's exit code, argparse's refusals (SystemExit) included."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture
def base(tiny_sdxl_folder, tmp_path, monkeypatch):
    """The arguments every case shares; loading the model fails the case."""
    def load(*_, **__):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_pipeline", load)
    return ["--model", str(tiny_sdxl_folder), "--cache-dir", str(tmp_path / "cache")]


def frames(folder, count=2, size=(HEIGHT, WIDTH)):
    folder.mkdir(exist_ok=True)
    for i in range(count):
        Image.new("RGB", size[::-1], (40 * i, 90, 200)).save(folder / f"{i:03d}.png")
    return folder


def test_sixteen_bit_grey_frames_are_read_at_their_values(tmp_path):
    (tmp_path / "in").mkdir()
    levels = np.array([[0, 16384], [49152, 65535]], np.uint16).repeat(16, 0).repeat(24, 1)
    Image.fromarray(levels).save(tmp_path / "in" / "0.png")  # mode I;16: Pillow's RGB conversion reads it white
    source = media.frame_source(tmp_path / "in")
    frame = next(source.frames())
    assert source.size == (HEIGHT, WIDTH) and frame.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(frame[..., 0], levels / 65535, atol=1e-7)


@pytest.mark.parametrize("name", ["out.avi", "out.png", "out.gif"])
def test_an_output_it_cannot_write_is_refused_and_no_folder_made(base, tmp_path, capsys, name):
    assert command([*base, "--output", str(tmp_path / name)]) == 2
    assert f"--output {tmp_path / name}: the stream writes a folder of PNGs or a video" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("fps", ["1e9", "1e-9", "0", "-8"])
def test_a_video_rate_it_cannot_keep_is_refused(base, tmp_path, capsys, fps):
    assert command([*base, "--output", str(tmp_path / "out.mp4"), "--fps", fps]) == 2
    assert f"--fps must be a finite number in [0.001, 1000.0], got {float(fps)}" in capsys.readouterr().err


def float_flags() -> list[str]:
    return [a.option_strings[0] for a in cli.build_parser()._actions if a.type in (float, cli.finite_float)]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_a_number_that_is_not_finite(base, tmp_path, capsys, value):
    assert {"--guidance-scale", "--delta", "--fps", "--similarity-threshold"} <= set(float_flags())
    for flag in float_flags():
        assert command([*base, "--output", str(tmp_path / "out"), "--rcfg", "self", f"{flag}={value}"]) == 2, flag
        assert f"argument {flag}: {value} is not a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--t-index", "45", "32"], "t_index_list: [45, 32] must be distinct steps of 0..49 in ascending order"),
    (["--t-index", "10", "50"], "0..49"),
    (["--similarity-threshold", "1.5"], "--similarity-threshold must be a finite number in [0.0, 1.0], got 1.5"),
    (["--max-skips", "-1"], "--max-skips must be at least 0, got -1"),
    (["--height", "100"], "height 100 must be a positive multiple of"),
    (["--height", "136", "--width", "136"], "height 136 must be a positive multiple of"),  # one image, not a canvas
    (["--guidance-scale", "-1"], "guidance_scale must be a finite number at least 0.0, got -1.0"),
    (["--seed", "-1"], "seed must be in 0..4294967295, got -1"),
    (["--frames", "1000001"], "--frames makes 1000001 images, but a folder holds at most 1000000 in name order"),
    (["--frames", "16", "--frame-buffer", "1000"], "--frame-buffer 1000 takes that many frames a call, but there "
     "are 16 (--frames); give --frame-buffer 16 or less."),
])
def test_arguments_the_model_cannot_take_are_refused_before_it_loads(base, tmp_path, capsys, extra, message):
    assert command([*base, "--output", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_frames_the_model_cannot_take_are_refused_before_it_loads(base, tmp_path, capsys):
    run = [*base, "--output", str(tmp_path / "out"), "--input"]
    assert command([*run, str(frames(tmp_path / "odd", size=(36, WIDTH)))]) == 2
    assert "height 36 must be a positive multiple of" in capsys.readouterr().err
    mixed = frames(tmp_path / "mixed")
    Image.new("RGB", (WIDTH, 2 * HEIGHT)).save(mixed / "009.png")
    assert command([*run, str(mixed)]) == 2
    assert f"--input {mixed / '009.png'} is 48x64, but 000.png is 48x32; give frames of one size" in \
        capsys.readouterr().err
    assert command([*run, str(frames(tmp_path / "in")), "--height", "64"]) == 2
    assert "sets the size (48x32); drop --height and --width" in capsys.readouterr().err


def test_a_stream_the_memory_cannot_hold_is_refused_before_the_model_loads(base, tmp_path, capsys):
    out = ["--output", str(tmp_path / "out")]
    assert command([*base, *out, "--frames", "100000", "--frame-buffer", "100000", "--height", "256", "--width",
                    "256"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"--frame-buffer 100000 with 4 --t-index steps and --rcfg none at 256x256 needs about "
                     r"[\d.]+ GiB a call .* more than the [\d.]+ GiB this machine has free; give --frame-buffer \d+ or "
                     "less", err), err
    assert command([*base, *out, "--height", "16384", "--width", "16384"]) == 2
    assert "give smaller frames (--height/--width, or resize --input)" in capsys.readouterr().err
    nine = [str(t) for t in range(0, 45, 5)]
    assert command([*base, *out, "--slot-parallel", "--t-index", *nine]) == 2  # the tests emulate 8 devices
    assert "--slot-parallel with 9 --t-index steps needs 9 devices, but 8 cpu devices are present" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_memory_estimate_grows_with_each_size_argument(tiny_sdxl_folder):
    spec = PipelineSpec.read(tiny_sdxl_folder)
    one = call_bytes(spec, StreamConfig((32, 45), 1, "none"), 256, 256)
    assert call_bytes(spec, StreamConfig((32, 45), 3, "none"), 256, 256) == 3 * one  # frames a call
    assert call_bytes(spec, StreamConfig((32, 45), 1, "full"), 256, 256) > one  # guidance rows
    assert call_bytes(spec, StreamConfig((0, 16, 32, 45), 1, "none"), 256, 256) > one  # steps in flight
    assert call_bytes(spec, StreamConfig((32, 45), 1, "none"), 512, 256) > 2 * one  # attention: more than the area


def test_a_second_run_into_a_held_output_fails_and_the_first_keeps_its_images(base, tmp_path, capsys):
    out = tmp_path / "shared"
    with media.claimed(out, overwrite=False):
        (out / "000000.png").write_bytes(b"the first run's image")
        for extra in ([], ["--overwrite"]):
            assert command([*base, "--output", str(out), *extra]) == 2
            assert (f"--output {out} is being written by another run (it holds {out / '.jaxfuse-stream.lock'}); "
                    "wait for that run to end, or choose another --output.") in capsys.readouterr().err
        with media.claimed(tmp_path / "clip.mp4", overwrite=False):
            assert command([*base, "--output", str(tmp_path / "clip.mp4")]) == 2
            assert f"--output {tmp_path / 'clip.mp4'} is being written by another run" in capsys.readouterr().err
    assert (out / "000000.png").read_bytes() == b"the first run's image"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["shared"]  # no hold left behind


def test_a_killed_run_leaves_no_stale_hold(tmp_path):
    out = tmp_path / "out"
    hold = "import os, sys; from pathlib import Path; from jaxfuse.stream import media\n" \
           "with media.claimed(Path(sys.argv[1]), False): os._exit(0)  # dies holding it, as on SIGKILL"
    subprocess.run([sys.executable, "-c", hold, str(out)], check=True, timeout=120)
    assert (out / ".jaxfuse-stream.lock").exists()  # left on disk, but no process holds it
    with media.claimed(out, overwrite=False):
        pass
    assert list(out.iterdir()) == []


def test_serve_refuses_a_host_or_port_it_cannot_listen_on(base, capsys):
    pytest.importorskip("aiohttp")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert command([*base, "--serve", "--port", str(port)]) == 2
        assert (f"--host 127.0.0.1 --port {port}: cannot listen there (Address already in use); another program "
                "listens there: give another --port, or stop it.") in capsys.readouterr().err
    assert command([*base, "--serve", "--host", "no-such-host.invalid"]) == 2
    assert "--host no-such-host.invalid does not resolve" in capsys.readouterr().err
    assert command([*base, "--serve", "--host", "192.0.2.1"]) == 2  # TEST-NET-1: no machine's own address
    assert "--host 192.0.2.1 is not an address of this machine" in capsys.readouterr().err


def test_the_command_says_how_long_it_compiled_and_the_memory_a_device_needed(tiny_sdxl_folder, tmp_path, capsys):
    assert cli.main(["--model", str(tiny_sdxl_folder), "--cache-dir", str(tmp_path / "cache"), "--frames", "2",
                     "--height", "32", "--width", "32", "--output", str(tmp_path / "out"), "--no-compile-cache"]) == 0
    found = re.search(r"compiling took (\d+\.\d+) s; peak memory per device: stream (\d+\.\d) MiB",
                      capsys.readouterr().err)
    assert found and float(found[1]) > 0 and float(found[2]) > 0


@pytest.mark.slow
def test_a_second_run_loads_the_stream_from_the_compile_cache(tiny_sdxl_folder, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != COMPILE_CACHE_ENV}

    def programs(name: str, *extra: str) -> tuple[int, int] | None:
        result = subprocess.run([sys.executable, "-m", "jaxfuse.stream", "--model", str(tiny_sdxl_folder),
                                 "--cache-dir", str(tmp_path / "cache"), "--frames", "2", "--height", "32", "--width",
                                 "32", "--output", str(tmp_path / name), *extra],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        found = re.search(r"programs: (\d+) compiled, (\d+) loaded from the compile cache", result.stderr)
        return found and (int(found[1]), int(found[2]))

    # The first run converts the weights (programs of its own), without the compile cache.
    assert programs("convert", "--no-compile-cache") is None and not (tmp_path / "cache" / "xla").exists()
    first, second = programs("first"), programs("second")
    assert first[0] > 3
    assert second == (0, sum(first))
