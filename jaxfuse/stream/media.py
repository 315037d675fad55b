"""Where a stream's frames come from and its images go: a folder of images or a video file.

    source = frame_source(Path("clip.mp4"))      # or a folder of PNG/JPEG frames, in name order
    source.size, source.rate                     # (height, width), frames a second (None: a folder)
    for frame in source.frames(): ...            # [H, W, 3] float32 in [0, 1]
    with claimed(Path("out.mp4"), overwrite=False):  # held: a second run into it fails
        with image_sink(Path("out.mp4"), rate=8, overwrite=False) as sink:  # or a folder: 000000.png, ...
            sink.write(index, image)

Video goes through PyAV (FFmpeg), an optional extra: pip install "jaxfuse[video]". A video is
written under a temporary name and moved into place when complete, so an interrupted run leaves
no half file and never replaces one unless asked. A run holds its output for its whole length
(`claimed`), so a second run into the same folder or file fails at once instead of replacing the
first one's images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from jaxfuse.images import read_image
from jaxfuse.outputs import check_writable_folder, pil_image
from jaxfuse.spec import PipelineError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}
# A folder's images are named 000000.png, ...: beyond this many the names grow a digit and their
# name order no longer follows the frames'.
MAX_FOLDER_IMAGES = 10**6


def pyav():
    try:
        import av
    except ImportError as e:
        raise PipelineError('video files need PyAV: pip install "jaxfuse[video]" (or pass a folder of frames).') \
            from e
    return av


@dataclasses.dataclass(frozen=True)
class FrameSource:
    path: Path
    files: tuple[Path, ...]  # a folder's frames; empty for a video
    size: tuple[int, int]  # (height, width) of every frame
    rate: Fraction | None  # a video's frames a second
    count: int  # how many frames; 0 for a video that does not say

    def frames(self) -> Iterator[np.ndarray]:
        """Every frame [H, W, 3] float32 in [0, 1], in order."""
        if self.files:
            yield from (read_image(path, "--input") for path in self.files)
            return
        with pyav().open(str(self.path)) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24").astype(np.float32) / 255


def frame_size(path: Path) -> tuple[int, int]:
    """An image file's (height, width) from its header alone; a file Pillow cannot open fails as
    `read_image` says why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                return image.height, image.width
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError):
        return read_image(path, "--input").shape[:2]


def frame_source(path: Path) -> FrameSource:
    """A folder of frames or a video file, checked and measured without decoding it all."""
    if path.is_dir():
        files = tuple(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        if not files:
            raise PipelineError(f"--input {path} holds no PNG or JPEG frames.")
        size = read_image(files[0], "--input").shape[:2]
        for file in files[1:]:  # from the headers alone: a frame of another size fails now, not hours in
            if (other := frame_size(file)) != size:
                raise PipelineError(f"--input {file} is {other[1]}x{other[0]}, but {files[0].name} is "
                                    f"{size[1]}x{size[0]}; give frames of one size.")
        return FrameSource(path, files, size, None, len(files))
    if not path.is_file():
        raise PipelineError(f"--input {path} is neither a folder of frames nor a video file.")
    av = pyav()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise PipelineError(f"--input {path} holds no video stream.")
            video = container.streams.video[0]
            return FrameSource(path, (), (video.height, video.width), video.average_rate, video.frames)
    except av.FFmpegError as e:
        raise PipelineError(f"--input {path} is not a video FFmpeg can read: {e}") from e


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_CODECS


def check_output(path: Path) -> None:
    """Refuses an output the stream cannot write, before any work: a video name on a folder, a
    file where a folder goes, or a new name whose suffix is not a video's (out.avi would become a
    folder)."""
    if is_video(path):
        pyav()
        if path.is_dir():
            raise PipelineError(f"--output {path} is a folder, yet its name ends like a video file; rename one.")
    elif path.is_file():
        raise PipelineError(f"--output {path} is a file; give a folder, or a video file ending in "
                            f"{', '.join(VIDEO_CODECS)}.")
    elif path.suffix and not path.is_dir():
        raise PipelineError(f"--output {path}: the stream writes a folder of PNGs or a video ending in "
                            f"{', '.join(VIDEO_CODECS)}, not {path.suffix} files; give one of those (a new folder "
                            "whose name has a dot in it: make it first).")


@contextlib.contextmanager
def claimed(path: Path, overwrite: bool) -> Iterator[None]:
    """Holds the output `path` (a folder of images or a video file) while the block runs, then
    refuses images or a video already there unless `overwrite`. The hold is an exclusive lock on
    a file inside the folder (beside the video), taken without waiting: a second run into the same
    output fails here, before anything loads, and writes nothing. The system drops the lock when
    the process ends however it ends, so a killed run leaves no stale hold; the file is removed
    when the block ends, as is a folder made here and left empty."""
    video = is_video(path)
    folder = path.parent if video else path
    check_writable_folder(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / (f".{path.name}.lock" if video else ".jaxfuse-stream.lock")
    while True:
        handle = open(lock, "a")  # held open for the block: closing it drops the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise PipelineError(f"--output {path} is being written by another run (it holds {lock}); wait for "
                                "that run to end, or choose another --output.") from None
        try:  # the run before may have removed the file after it was opened here: lock the one on disk
            if os.path.samestat(os.fstat(handle.fileno()), lock.stat()):
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        if video and path.exists() and not overwrite:
            raise PipelineError(f"--output {path} exists; choose another name or give --overwrite.")
        if not video and not overwrite and any(path.glob("*.png")):
            raise PipelineError(f"--output {path} holds images already; choose another folder or give "
                                "--overwrite.")
        yield
    finally:
        lock.unlink()  # while locked: a run that opened it meanwhile sees it gone and tries again
        handle.close()
        for p in made:
            with contextlib.suppress(OSError):  # not empty: it holds what the run wrote
                p.rmdir()


class FolderSink:
    """Images as numbered PNGs in a folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, index: int, image: np.ndarray) -> None:
        pil_image(image).save(self.folder / f"{index:06d}.png")

    def __enter__(self) -> FolderSink:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class VideoSink:
    """Images, in order, as a video file (the codec from its suffix, `VIDEO_CODECS`)."""

    def __init__(self, path: Path, rate: Fraction, overwrite: bool):
        self.av, self.path, self.rate, self.overwrite = pyav(), path, rate, overwrite
        self.partial = path.with_name(f".{path.name}.partial{path.suffix}")
        self.container, self.video, self.count = None, None, 0

    def __enter__(self) -> VideoSink:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = self.av.open(str(self.partial), mode="w")
        return self

    def write(self, index: int, image: np.ndarray) -> None:
        if index != self.count:
            raise RuntimeError(f"a video is written in order: image {index} came after {self.count - 1}.")
        if self.video is None:
            self.video = self.container.add_stream(VIDEO_CODECS[self.path.suffix.lower()], rate=self.rate)
            # yuv420p halves the colour resolution, so both sides must be even: pad by one where odd.
            self.video.height, self.video.width = (side + side % 2 for side in image.shape[:2])
            self.video.pix_fmt = "yuv420p"
        pixels = np.asarray(pil_image(image))
        pixels = np.pad(pixels, ((0, self.video.height - pixels.shape[0]), (0, self.video.width - pixels.shape[1]),
                                 (0, 0)), mode="edge")
        self.container.mux(self.video.encode(self.av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        self.count += 1

    def __exit__(self, exc_type, *exc: Any) -> None:
        try:
            if self.video is not None:
                self.container.mux(self.video.encode())  # flushes the encoder
            self.container.close()
            if exc_type is None and self.count:
                if not self.overwrite and self.path.exists():
                    raise PipelineError(f"--output {self.path} appeared while the stream ran; the video is kept "
                                        f"as {self.partial}.")
                os.replace(self.partial, self.path)
        finally:
            if self.partial.exists() and (exc_type is not None or not self.count):
                self.partial.unlink()


def image_sink(path: Path, rate: Fraction, overwrite: bool) -> FolderSink | VideoSink:
    return VideoSink(path, rate, overwrite) if is_video(path) else FolderSink(path)
