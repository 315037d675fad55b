"""The output files: numbered names, the settings in the PNG, and writes that never lose a file."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from jaxfuse.outputs import ImageFiles, OutputError, image_files, read_settings, write_atomically, write_image

IMAGE = np.linspace(0, 1, 4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3)


# Every test runs in its own folder: nothing lands where pytest was started.
pytestmark = pytest.mark.usefixtures("in_tmp_path")


def test_files_are_numbered_only_for_several_images():
    one, = image_files(Path("a/x.png"), Path("a/arr.npy"), 1)
    assert one == ImageFiles(Path("a/x.png"), Path("a/x.json"), Path("a/arr.npy"))
    two = image_files(Path("a/x.png"), Path("a/arr.npy"), 2)
    assert [f.png.name for f in two] == ["x-0.png", "x-1.png"] and two[1].array == Path("a/arr-1.npy")


@pytest.mark.parametrize("name", ["x.png", "arr", "arr.np"])
def test_an_array_is_written_under_the_name_given_or_refused(name):
    """numpy.save adds .npy to a name without it: x.png became x.png.npy, unannounced."""
    with pytest.raises(OutputError, match=rf"--output-array {name} must end in .npy \(a numpy array file\)"):
        image_files(Path("x.png"), Path(name), 1)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask):
    """Not the temporary file's 0600: a new file, and one replaced with overwrite, get 0666 less the umask."""
    files = ImageFiles(tmp_path / "x.png", tmp_path / "x.json", tmp_path / "x.npy")
    previous = os.umask(umask)
    try:
        write_image(files, IMAGE, {}, {})
        modes = {stat.S_IMODE(p.stat().st_mode) for p in files.paths}
        write_image(files, IMAGE, {}, {}, overwrite=True)
        modes |= {stat.S_IMODE(p.stat().st_mode) for p in files.paths}
    finally:
        os.umask(previous)
    assert modes == {0o666 & ~umask}


def test_settings_round_trip_through_the_png(tmp_path):
    files = ImageFiles(tmp_path / "x.png", tmp_path / "x.json", tmp_path / "x.npy")
    settings = {"prompt": "ein Stern über dem Meer", "seed": 4294967295, "guidance_scale": 5.0, "context": None}
    write_image(files, IMAGE, settings, {"denoise": 1.23456})
    assert read_settings(files.png) == settings
    np.testing.assert_array_equal(np.load(files.array), IMAGE)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_image(files, IMAGE, {"guidance_scale": float("nan")}, {}, overwrite=True)


def test_a_file_that_appeared_since_the_checks_is_kept(tmp_path):
    """Another run writing the same name meanwhile: its file is kept, and the error names the file,
    not this run's temporary one."""
    path = tmp_path / "x.json"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match=rf"^{path} appeared while this run was writing it \(another run "
                                              r"writing the same file\?\); it is kept") as e:
        write_atomically(path, lambda f: f.write(b"new"), overwrite=False)
    assert ".partial" not in str(e.value)
    assert path.read_text() == "precious" and sorted(tmp_path.iterdir()) == [path]
    write_atomically(path, lambda f: f.write(b"new"), overwrite=True)
    assert path.read_text() == "new"


def test_a_write_that_fails_halfway_leaves_the_old_file(tmp_path):
    path = tmp_path / "x.npy"
    path.write_text("precious")

    def fail(f):
        f.write(b"half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, fail, overwrite=True)
    assert path.read_text() == "precious" and sorted(tmp_path.iterdir()) == [path]
