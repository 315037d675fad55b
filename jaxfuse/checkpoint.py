"""Model folders on disk: find a model's folder, load its parameters (the converted orbax form, or
safetensors converted by `jaxfuse.weight_conversion`), and save the converted form; imports no
model.

A converted pipeline folder (`save_pipeline`) is a diffusers pipeline folder whose model folders
hold `config.json` and `params/` (orbax) instead of safetensors, plus a manifest of its files;
the pipeline's cache and `python -m checkpoints_conversion.convert_diffusers` both write it, and
every loader reads it. A cache entry is checked against its manifest before it is read
(`read_cache`): a damaged one raises `CacheError`, naming the folder to delete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxfuse.weight_conversion import (
    WEIGHTS_NAME,
    SafetensorsCheckpoint,
    convert_checkpoint,
    find_weight_files,
    listing,
)

CONFIG_NAME = "config.json"
PARAMS_DIR = "params"  # the orbax checkpoint inside a converted folder


class CacheError(OSError):
    """A cache entry that cannot be read back; the message says what is wrong and which folder to delete."""


def component_folder(folder: str | Path, component: str) -> Path:
    """The folder of one model (`unet`, `vae`, ...): `folder` itself when it holds a config,
    else its `component/` subfolder, as in a diffusers pipeline folder."""
    folder = Path(folder).expanduser()
    if not (folder / CONFIG_NAME).is_file() and (folder / component / CONFIG_NAME).is_file():
        folder = folder / component
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_NAME}: pass a diffusers `{component}/` folder (or the pipeline "
            "folder holding one) or a folder made by `python -m checkpoints_conversion.convert_diffusers`."
        )
    return folder


def load_params(folder: Path, abstract: Any, variant: str | None = None, weights_name: str = WEIGHTS_NAME,
                buffers: tuple[str, ...] = (), prefix: str = "") -> Any:
    """The parameter tree `abstract` filled from a converted folder (orbax) or a diffusers /
    transformers one (see `find_weight_files` and `match_checkpoint` for the other arguments)."""
    if (folder / PARAMS_DIR).is_dir():
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore((folder / PARAMS_DIR).absolute(), abstract)
    files = find_weight_files(folder, variant, weights_name)
    return convert_checkpoint(SafetensorsCheckpoint(files), abstract, buffers, prefix)


def save_params(dst: Path, config_text: str, params: Any) -> None:
    """Writes a converted model folder: its config.json and the orbax checkpoint of `params`."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / CONFIG_NAME).write_text(config_text)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((dst / PARAMS_DIR).absolute(), params)


# The parts of an SDXL pipeline folder.
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
# Bump when the converted format changes, so old caches are not read.
CACHE_FORMAT = 2
CACHE_ENV = "JAXFUSE_CACHE"
# In a converted folder: {relative path: {"size", "crc32"}} of every other file, written last.
MANIFEST_NAME = "manifest.json"
# Between an entry's name and its writer's host, pid and a random token: `unet-1a2b.tmp.host.42.9f3c`.
TEMPORARY_MARK = ".tmp."
CHUNK_BYTES = 1 << 20  # stays in the CPU cache between read and checksum: 16 MiB measured 2x slower
# Cache key: files up to this size (configs, index files) are hashed whole; a larger one by its
# stat, its safetensors header and a few samples (see `cache_folder`).
WHOLE_FILE_BYTES = 1 << 20
SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors' own limit
KEY_SAMPLES, SAMPLE_BYTES = 4, 64 << 10


def write_pipeline(folder: Path, dst: Path, params: dict[str, Any]) -> None:
    """The converted form of the diffusers pipeline `folder` at `dst`: model configs + orbax
    params, the rest copied, and last the manifest."""
    for component, tree in params.items():
        save_params(dst / component, (folder / component / CONFIG_NAME).read_text(), tree)
    for component in (*TOKENIZERS, "scheduler"):
        if (folder / component).is_dir():  # the refiner has no first tokenizer
            shutil.copytree(folder / component, dst / component)
    shutil.copy2(folder / "model_index.json", dst / "model_index.json")
    (dst / MANIFEST_NAME).write_text(json.dumps(folder_manifest(dst), indent=1))


def write_model(folder: Path, dst: Path, params: Any) -> None:
    """The converted form of one model's folder (a ControlNet's) at `dst`: its config + orbax
    params, and last the manifest."""
    save_params(dst, (folder / CONFIG_NAME).read_text(), params)
    (dst / MANIFEST_NAME).write_text(json.dumps(folder_manifest(dst), indent=1))


def save_pipeline(folder: Path, dst: Path, params: Any, write: Callable[[Path, Path, Any], None] = write_pipeline
                  ) -> None:
    """A converted pipeline folder at `dst` (see `write_pipeline`; `write_model` for one model's
    folder), written under a name of its own (host, pid, random token) and renamed into place in
    one step: a reader sees the whole folder or none, and writers at the same time never share
    files. Temporary copies that killed runs of this host left behind are deleted first."""
    remove_abandoned_copies(dst)
    temporary = dst.with_name(f"{dst.name}{TEMPORARY_MARK}{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        write(folder, temporary, params)
        move_into_place(temporary, dst)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # still there after a failure or a lost race


def move_into_place(temporary: Path, dst: Path) -> None:
    """Renames `temporary` to `dst`, unless another writer renamed its copy there first: that one
    is kept, since someone may be reading it already."""
    try:
        temporary.rename(dst)  # rename(2): atomic; replaces an empty folder, fails on a non-empty one
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not (dst / MANIFEST_NAME).is_file():
            raise CacheError(damaged(dst, f"it exists without its {MANIFEST_NAME}")) from None


def remove_abandoned_copies(dst: Path) -> None:
    """Deletes the temporary copies of `dst` whose writer, a process of this host, is gone. A
    live writer's copy is kept, and so is every other host's: process ids are per host."""
    pattern = re.compile(rf"{re.escape(dst.name + TEMPORARY_MARK)}(?P<host>.+)\.(?P<pid>\d+)\.[0-9a-f]+")
    for path in dst.parent.glob(f"{dst.name}{TEMPORARY_MARK}*"):
        owner = pattern.fullmatch(path.name)
        if owner and owner["host"] == socket.gethostname() and not process_alive(int(owner["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def file_crc32(path: Path) -> int:
    """The CRC-32 of a file's bytes."""
    crc, buffer = 0, bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while size := f.readinto(buffer):
            crc = zlib.crc32(view[:size], crc)
    return crc


def crc32s(paths: Iterable[Path]) -> list[int]:
    """`file_crc32` of each path, several files at once (zlib and file reads release the GIL).

    CRC-32, not a cryptographic hash: it is there to catch a truncated, zeroed or bit-rotted file,
    not an attacker (who could rewrite the manifest as well). Measured on one core, 1 MiB chunks:
    zlib.crc32 2.1 GB/s, sha256 1.07, blake2b 0.87, md5 0.67 (3.4 s per 7 GB against sha256's
    6.5 s). Files from the page cache, on 2 cores: 5.4 GB/s, 1.3 s per 7 GB SDXL entry; read from
    disk it costs what the disk does, and leaves the files in the page cache orbax reads next.
    """
    with ThreadPoolExecutor() as pool:
        return list(pool.map(file_crc32, paths))


def folder_manifest(folder: Path) -> dict[str, dict[str, int]]:
    """{path relative to `folder`: {"size", "crc32"}} of every file under it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "crc32": crc}
            for p, crc in zip(files, crc32s(files))}


def damaged(entry: Path, what: str) -> str:
    return f"the cache entry {entry} is damaged: {what}\ndelete {entry} and run again (the model is converted anew)."


def verify_cache(entry: Path) -> None:
    """Raises `CacheError` unless every file the entry's manifest lists is there with its size and CRC-32."""
    try:
        manifest = json.loads((entry / MANIFEST_NAME).read_text())
    except (OSError, ValueError) as e:
        raise CacheError(damaged(entry, f"its {MANIFEST_NAME} cannot be read ({e})")) from None
    differences = manifest_differences(entry, manifest)
    if differences:
        raise CacheError(damaged(entry, f"its files differ from its {MANIFEST_NAME}:{differences}"))


def manifest_differences(entry: Path, manifest: dict[str, dict[str, int]]) -> str:
    """The files of `entry` that differ from `manifest`, listed (empty when none does). Sizes are
    compared first, so that a missing or truncated file costs no reading."""
    missing, wrong_size = [], []
    for name, record in manifest.items():
        path = entry / name
        if not path.is_file():
            missing.append(name)
        elif (size := path.stat().st_size) != record["size"]:
            wrong_size.append(f"{name}: {size} bytes, {record['size']} when written")
    if missing or wrong_size:
        return listing("missing", missing) + listing("wrong size", wrong_size)
    crcs = crc32s(entry / name for name in manifest)
    wrong_crc = [name for (name, record), crc in zip(manifest.items(), crcs) if crc != record["crc32"]]
    return listing("wrong checksum (same size, other bytes)", wrong_crc)


def read_cache(entry: Path, load: Callable[[Path], Any]) -> Any:
    """`load(entry)` once `verify_cache` passes; any failure to load it raises `CacheError`."""
    verify_cache(entry)
    try:
        return load(entry)
    # orbax reports a TensorStore read error as a bare Exception; whatever fails here, the files
    # are the ones that were written, so the entry (or a format change CACHE_FORMAT missed) is at fault.
    except Exception as e:
        first_line = str(e).partition("\n")[0][:160]  # orbax appends pages of TensorStore spec
        raise CacheError(damaged(entry, f"it cannot be restored ({type(e).__name__}: {first_line})")) from e


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxfuse")


def add_file_key(digest: Any, path: Path) -> None:
    """Feeds what identifies one file's contents into `digest` (see `cache_folder`)."""
    stat = path.stat()
    digest.update(f"{stat.st_size} {stat.st_mtime_ns} {stat.st_ctime_ns}".encode())
    with path.open("rb") as f:
        if stat.st_size <= WHOLE_FILE_BYTES:
            digest.update(f.read())
            return
        if path.suffix == ".safetensors":  # 8 bytes of header length, then the JSON header
            digest.update(f.read(min(int.from_bytes(f.read(8), "little"), SAFETENSORS_MAX_HEADER)))
        for i in range(KEY_SAMPLES):
            f.seek((stat.st_size - SAMPLE_BYTES) * i // (KEY_SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))


def cache_folder(model: Path, dtype: Any, cache_dir: str | Path | None = None) -> Path:
    """Where the converted copy of the pipeline folder, model folder or single file `model` in `dtype` is cached:
    named by a hash of every model file, without reading the gigabytes of its tensors.

    A file counts by its name, size, modification time and status-change time (ctime). Any write
    sets ctime to now, and no user tool sets it back (`touch` and `os.utime` set mtime, and move
    ctime forward), so a file edited in place with its size and mtime restored still gets a new
    key; a chmod, a hard link or a copy of the folder gets a new key too: one needless conversion.
    Small files (configs) are hashed whole; a large one adds its safetensors header (tensor names,
    dtypes, shapes, offsets) and a few 64 KiB samples, which catch a same-size file swapped in on
    a filesystem that does not keep ctime (some FUSE and network mounts).
    """
    dtype = jnp.dtype(dtype)
    digest = hashlib.sha256(f"{CACHE_FORMAT} {dtype.name}".encode())
    if model.is_file():
        digest.update(model.name.encode())
        add_file_key(digest, model)
    # A pipeline's model folders (the refiner has 3 of the 4), or one model's folder itself (a ControlNet's).
    folders = [""] if (model / CONFIG_NAME).is_file() else filter(lambda c: (model / c).is_dir(), MODEL_COMPONENTS)
    for component in folders:
        for path in sorted((model / component).iterdir()):
            if path.is_file():
                digest.update(f"{component}/{path.name}".encode())
                add_file_key(digest, path)
    name = model.stem if model.is_file() else model.name
    return Path(cache_dir or default_cache_dir()) / f"{name}-{digest.hexdigest()[:16]}"
