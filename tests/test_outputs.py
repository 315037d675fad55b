"""The output files: numbered names, the settings in the PNG, and writes that never lose a file."""

from pathlib import Path

import numpy as np
import pytest

from jaxfuse.outputs import ImageFiles, image_files, read_settings, write_atomically, write_image

IMAGE = np.linspace(0, 1, 4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3)


def test_files_are_numbered_only_for_several_images():
    one, = image_files(Path("a/x.png"), Path("a/arr"), 1)
    assert one == ImageFiles(Path("a/x.png"), Path("a/x.json"), Path("a/arr.npy"))
    two = image_files(Path("a/x.png"), Path("a/arr.npy"), 2)
    assert [f.png.name for f in two] == ["x-0.png", "x-1.png"] and two[1].array == Path("a/arr-1.npy")


def test_settings_round_trip_through_the_png(tmp_path):
    files = ImageFiles(tmp_path / "x.png", tmp_path / "x.json", tmp_path / "x.npy")
    settings = {"prompt": "ein Stern über dem Meer", "seed": 4294967295, "guidance_scale": 5.0, "context": None}
    write_image(files, IMAGE, settings, {"denoise": 1.23456})
    assert read_settings(files.png) == settings
    np.testing.assert_array_equal(np.load(files.array), IMAGE)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_image(files, IMAGE, {"guidance_scale": float("nan")}, {}, overwrite=True)


def test_a_file_that_appeared_since_the_checks_is_kept(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        write_atomically(path, lambda f: f.write(b"new"), overwrite=False)
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
