"""The files a generation writes, checked before any work and written so that nothing is lost.

Each image gets a PNG, a JSON file of its settings and timings beside it, and optionally the
float32 array (.npy). Several images are numbered: `name-0.png`, `name-1.png`, ... The PNG holds
its settings too, as JSON in a text chunk that `read_settings` reads back:

    from jaxfuse.outputs import read_settings
    read_settings("jaxfuse.png")["prompt"]

Every path is checked at once, before the model loads (`check_outputs`); each file is written
under a temporary name of its own in its folder and then moved into place (replacing a file only
when asked to), so an interrupted run or a full disk leaves any file that was there as it was. A
new file gets the mode the umask gives, as any file a program creates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

# The PNG text chunk holding the settings as JSON.
SETTINGS_CHUNK = "jaxfuse"


class OutputError(ValueError):
    """An output path the run cannot write; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """The files of one image."""

    png: Path
    json: Path
    array: Path | None

    @property
    def paths(self) -> list[Path]:
        return [self.png, self.json] + ([self.array] if self.array else [])


def numbered(path: Path, index: int, count: int) -> Path:
    """`path` itself for a single image; `name-<index>.suffix` for one of several."""
    return path if count == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")


def image_files(png: Path, array: Path | None, count: int) -> list[ImageFiles]:
    """The files of `count` images written to `png` (and `array`): each name ends in what its
    file is, so that no file is written under a name other than the one given."""
    if png.suffix.lower() != ".png":
        raise OutputError(f"--output {png} must end in .png.")
    if array is not None and array.suffix.lower() != ".npy":
        raise OutputError(f"--output-array {array} must end in .npy (a numpy array file), e.g. "
                          f"{array.with_suffix('.npy')}.")
    return [ImageFiles(numbered(png, i, count), numbered(png, i, count).with_suffix(".json"),
                       array and numbered(array, i, count)) for i in range(count)]


def check_outputs(files: Sequence[ImageFiles], overwrite: bool) -> None:
    """Raises `OutputError` unless every file can be written: none a folder, none present
    already without `overwrite`, each one's folder writable (or creatable)."""
    paths = [p for f in files for p in f.paths]
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise OutputError(f"{', '.join(folders)} is a folder; name a file inside it, e.g. {folders[0]}/image.png.")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        verb = "exists" if len(existing) == 1 else "exist"
        raise OutputError(f"{', '.join(existing)} already {verb}; choose another --output or pass --overwrite.")
    for folder in sorted({p.parent for p in paths}):
        check_writable_folder(folder)


def check_writable_folder(folder: Path) -> None:
    """The nearest existing folder on the way to `folder` is a folder that takes a new file (tried,
    since permission bits do not tell: root ignores them, read-only mounts refuse anyway)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot write into {folder}: {existing} is a file, not a folder.")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise OutputError(f"cannot write into {existing} ({e.strerror or e}); choose an output folder you can "
                          "write to.") from e


def write_atomically(path: Path, write: Callable[[Any], None], overwrite: bool) -> None:
    """`write(file)` into a temporary file beside `path`, then moved to `path`; without
    `overwrite`, a file that appeared at `path` since the checks (another run writing the same
    name) is kept and this raises FileExistsError naming it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
    # Not mkstemp: its file's mode, 0600, would become the output's; os.open's mode passes through the umask.
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails if `path` exists: never replaces it
            except FileExistsError:
                raise FileExistsError(f"{path} appeared while this run was writing it (another run writing the "
                                      "same file?); it is kept: choose another --output, or pass "
                                      "--overwrite.") from None
    finally:
        temporary.unlink(missing_ok=True)


def pil_image(image: np.ndarray) -> Image.Image:
    """An image [H, W, 3] float32 in [0, 1] as 8-bit RGB."""
    return Image.fromarray(np.round(image * 255).astype(np.uint8))


def write_image(files: ImageFiles, image: np.ndarray, settings: dict[str, Any], timings: dict[str, float],
                overwrite: bool = False) -> None:
    """The image [H, W, 3] float32 in [0, 1] as PNG (with `settings` in a text chunk), the JSON of
    `settings` and `timings`, and the array when asked for; existing files are replaced only
    with `overwrite`."""
    text = json.dumps(settings, allow_nan=False)  # settings are checked finite: NaN is a bug, not JSON
    info = PngImagePlugin.PngInfo()
    info.add_text(SETTINGS_CHUNK, text)
    if isinstance(settings.get("prompt"), str):
        info.add_text("Description", settings["prompt"])
    info.add_text("Software", "jaxfuse")
    pixels = pil_image(image)
    write_atomically(files.png, lambda f: pixels.save(f, format="PNG", pnginfo=info), overwrite)
    record = {"settings": settings, "timings_s": {k: round(v, 3) for k, v in timings.items()}}
    write_atomically(files.json, lambda f: f.write(json.dumps(record, indent=2, allow_nan=False).encode()), overwrite)
    if files.array is not None:
        write_atomically(files.array, lambda f: np.save(f, image.astype(np.float32)), overwrite)


def read_settings(png: str | Path) -> dict[str, Any]:
    """The settings a jaxfuse PNG was made with (prompt, seed, model, size, sampler, parallel
    layout, ...), as written by `write_image`."""
    with Image.open(png) as image:
        text = image.text.get(SETTINGS_CHUNK)
    if text is None:
        raise OutputError(f"{png} holds no jaxfuse settings (no {SETTINGS_CHUNK!r} text chunk).")
    return json.loads(text)
