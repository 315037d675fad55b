"""Where a stream's frames come from and its images go: a folder of images or a video file.

    source = frame_source(Path("clip.mp4"))      # or a folder of PNG/JPEG frames, in name order
    source.size, source.rate                     # (height, width), frames a second (None: a folder)
    for frame in source.frames(): ...            # [H, W, 3] float32 in [0, 1]
    with image_sink(Path("out.mp4"), rate=8, overwrite=False) as sink:  # or a folder: 000000.png, ...
        sink.write(index, image)

Video goes through PyAV (FFmpeg), an optional extra: pip install "jaxfuse[video]". A video is
written under a temporary name and moved into place when complete, so an interrupted run leaves
no half file and never replaces one unless asked.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from jaxfuse.generate import read_image
from jaxfuse.outputs import pil_image
from jaxfuse.spec import PipelineError, checked_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}


def pyav():
    try:
        import av
    except ImportError as e:
        raise PipelineError('video files need PyAV: pip install "jaxfuse[video]" (or pass a folder of frames).') \
            from e
    return av


def read_frame(path: Path) -> np.ndarray:
    """An image file -> [H, W, 3] float32 in [0, 1]."""
    return checked_image(read_image(path, "--input"), 1)[0]


@dataclasses.dataclass(frozen=True)
class FrameSource:
    path: Path
    files: tuple[Path, ...]  # a folder's frames; empty for a video
    size: tuple[int, int]  # (height, width) of the first frame
    rate: Fraction | None  # a video's frames a second

    def frames(self) -> Iterator[np.ndarray]:
        """Every frame [H, W, 3] float32 in [0, 1], in order."""
        if self.files:
            yield from (read_frame(path) for path in self.files)
            return
        with pyav().open(str(self.path)) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24").astype(np.float32) / 255


def frame_source(path: Path) -> FrameSource:
    """A folder of frames or a video file, checked and measured without decoding it all."""
    if path.is_dir():
        files = tuple(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        if not files:
            raise PipelineError(f"--input {path} holds no PNG or JPEG frames.")
        return FrameSource(path, files, read_frame(files[0]).shape[:2], None)
    if not path.is_file():
        raise PipelineError(f"--input {path} is neither a folder of frames nor a video file.")
    av = pyav()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise PipelineError(f"--input {path} holds no video stream.")
            video = container.streams.video[0]
            return FrameSource(path, (), (video.height, video.width), video.average_rate)
    except av.FFmpegError as e:
        raise PipelineError(f"--input {path} is not a video FFmpeg can read: {e}") from e


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_CODECS


def check_output(path: Path, overwrite: bool) -> None:
    """Refuses an output that would replace images or a video unless `overwrite`, before any work."""
    if is_video(path):
        pyav()
        if path.is_dir():
            raise PipelineError(f"--output {path} is a folder, yet its name ends like a video file; rename one.")
        if path.exists() and not overwrite:
            raise PipelineError(f"--output {path} exists; choose another name or give --overwrite.")
    elif path.is_file():
        raise PipelineError(f"--output {path} is a file; give a folder, or a video file ending in "
                            f"{', '.join(VIDEO_CODECS)}.")
    elif path.exists() and not overwrite and any(path.glob("*.png")):
        raise PipelineError(f"--output {path} holds images already; choose another folder or give --overwrite.")


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
