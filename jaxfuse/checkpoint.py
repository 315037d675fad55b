"""Model weights on disk: find, read (safetensors only), match against a model's abstract
parameter tree, convert, and save or load the converted (orbax) form; imports no model.

The mapping is one rule: a checkpoint name `a.0.b.weight` is the Flax path `a_0/b/<leaf>`, where
the leaf is whatever the model has there (`kernel` for linear and convolution weights, `scale`
for norm weights, `embedding` for embedding tables), and the tensor takes the target leaf's
layout: a convolution weight [O, I, kh, kw] becomes HWIO, a linear weight [O, I] becomes [I, O].
The expected tree comes from the model itself (`jax.eval_shape`, passed in by the model's
loader), and conversion fails, listing every difference, unless each tensor lands on exactly one
parameter of the same shape and every parameter is filled; it fails too, listing the tensors, on
a value that is NaN or infinite (in the file, or once cast to a narrower dtype).

Weights are read with `safetensors` only; pickled `.bin`/`.ckpt` files are refused, never loaded.

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
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from safetensors import SafetensorError, safe_open

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
PARAMS_DIR = "params"  # the orbax checkpoint inside a converted folder
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
MAX_LISTED = 20
# Flax's names for what PyTorch calls `weight`: linear/convolution, norm, embedding table.
WEIGHT_LEAVES = ("kernel", "scale", "embedding")


class ConversionError(ValueError):
    """A checkpoint that does not fit the model, or a weight file that cannot be read; the message
    lists every mismatch or names the file."""


class CacheError(OSError):
    """A cache entry that cannot be read back; the message says what is wrong and which folder to delete."""


def find_weight_files(folder: Path, variant: str | None = None, weights_name: str = WEIGHTS_NAME) -> list[Path]:
    """The safetensors files of `folder`: one file, or the shards named by its index.

    `weights_name` is the file stem: `diffusion_pytorch_model` for diffusers models, `model` for
    transformers ones. Without `variant`, the full-precision file is preferred and the `fp16`
    variant taken when it is the only one.
    """
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        stem = f"{weights_name}.{v}" if v else weights_name
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shard files that are not there: {missing}")
            return [folder / s for s in shards]
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ConversionError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); jaxfuse never unpickles "
            "files. Convert them to safetensors first with the diffusers or transformers class its "
            "config.json names: CLASS.from_pretrained(SRC).save_pretrained(DST, safe_serialization=True)."
        )
    wanted = f"{weights_name}.{variant}.safetensors" if variant else f"{weights_name}.safetensors"
    raise FileNotFoundError(f"{folder} has no {wanted} (nor a sharded .safetensors.index.json).")


def open_safetensors(path: Path):
    """`safe_open(path)`, failing with a `ConversionError` that names the file: safetensors' own
    error ("header too large", "incomplete metadata") says neither which file nor what to do."""
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise ConversionError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; "
                              "download it again, or save it again from the original model.") from None


class SafetensorsCheckpoint:
    """The tensors of some safetensors files, read one at a time; shapes known without reading."""

    def __init__(self, files: list[Path]):
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            with open_safetensors(path) as f:
                for key in f.keys():
                    self.files[key] = path
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        with open_safetensors(self.files[key]) as f:
            return f.get_tensor(key)


def flax_path(key: str) -> tuple[str, ...]:
    """`down_blocks.0.attentions.1.proj_in.weight` -> (`down_blocks_0`, `attentions_1`, `proj_in`, `weight`)."""
    path: list[str] = []
    for part in key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def flax_axes(ndim: int, leaf: str) -> tuple[int, ...]:
    """The transpose taking a PyTorch tensor to the layout of the Flax leaf it fills."""
    if leaf == "kernel" and ndim == 4:
        return (2, 3, 1, 0)  # convolution [O, I, kh, kw] -> [kh, kw, I, O]
    if leaf == "kernel" and ndim == 2:
        return (1, 0)  # linear [O, I] -> [I, O]
    return tuple(range(ndim))


# Module names that end in `_<digits>` in diffusers itself rather than by the `.N` renaming.
UNDERSCORE_NAMES = ("linear_1", "linear_2")


def checkpoint_name(path: tuple[str, ...]) -> str:
    """The inverse of `flax_path` for a parameter: (`down_blocks_0`, `resnets_1`, `conv1`,
    `kernel`) -> `down_blocks.0.resnets.1.conv1.weight`."""
    *module, leaf = path
    parts = [part if part in UNDERSCORE_NAMES else re.sub(r"_(\d+)$", r".\1", part) for part in module]
    return ".".join([*parts, "weight" if leaf in WEIGHT_LEAVES else leaf])


def export_checkpoint(params: Any) -> dict[str, np.ndarray]:
    """A Flax parameter tree -> {checkpoint name: tensor in PyTorch's layout}, the inverse of
    `convert_checkpoint` (as numpy arrays, in the parameters' dtype)."""
    tensors = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        tensors[checkpoint_name(path)] = value.transpose(np.argsort(flax_axes(value.ndim, path[-1])))
    return tensors


def match_checkpoint(shapes: Mapping[str, tuple[int, ...]], abstract: Any, buffers: tuple[str, ...] = (),
                     prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Checkpoint name -> the Flax path it fills, for a parameter tree `abstract` (leaves with a
    `.shape`). Raises `ConversionError` listing every missing, unused and wrong-shaped tensor.

    `buffers`: last name parts of tensors that are not parameters and are skipped (e.g. the
    `position_ids` some CLIP checkpoints carry). `prefix`: a leading module name that some
    checkpoints leave out of every name (transformers 5 saves `CLIPTextModel` without
    `text_model.`); when no name starts with it, it is put in front of each.
    """
    targets = traverse_util.flatten_dict(abstract)
    add_prefix = bool(prefix) and not any(key.startswith(f"{prefix}.") for key in shapes)
    plan: dict[str, tuple[str, ...]] = {}
    unused: list[str] = []
    wrong_shape: dict[tuple[str, ...], str] = {}
    for key in sorted(shapes):
        *module, name = flax_path(f"{prefix}.{key}" if add_prefix else key)
        if name in buffers:
            continue
        if name == "weight":  # PyTorch's one name for what Flax calls by the layer's kind
            name = next((n for n in WEIGHT_LEAVES if (*module, n) in targets), "kernel")
        path = (*module, name)
        if path not in targets:
            unused.append(key)
            continue
        shape = tuple(shapes[key][i] for i in flax_axes(len(shapes[key]), name))
        if shape != tuple(targets[path].shape):
            wrong_shape[path] = (
                f"{key}: checkpoint {tuple(shapes[key])} gives {shape}, "
                f"model {'/'.join(path)} expects {tuple(targets[path].shape)}"
            )
            continue
        plan[key] = path
    filled = set(plan.values()) | set(wrong_shape)
    missing = ["/".join(p) for p in targets if p not in filled]
    if missing or unused or wrong_shape:
        raise ConversionError(
            "the checkpoint does not match the model config:"
            + listing("missing in checkpoint (model parameters no tensor fills)", missing)
            + listing("unused in checkpoint (tensors the model has no parameter for)", unused)
            + listing("wrong shape", list(wrong_shape.values()))
        )
    return plan


def convert_checkpoint(checkpoint: SafetensorsCheckpoint, abstract: Any, buffers: tuple[str, ...] = (),
                       prefix: str = "") -> Any:
    """The parameter tree `abstract` (ShapeDtypeStruct leaves) filled from `checkpoint`; every
    name and shape is checked before any tensor is read (see `match_checkpoint`), and every value
    after: NaN or infinity, in the file or from a dtype too narrow for a value, is refused."""
    plan = match_checkpoint(checkpoint.shapes, abstract, buffers, prefix)
    targets = traverse_util.flatten_dict(abstract)
    params, nonfinite, overflow = {}, [], []
    for key, path in plan.items():
        source = checkpoint.read(key).transpose(flax_axes(len(checkpoint.shapes[key]), path[-1]))
        dtype = jnp.dtype(targets[path].dtype)
        with np.errstate(over="ignore"):  # a value beyond the dtype's range becomes infinity: listed below
            tensor = source.astype(dtype)
        if not np.isfinite(tensor).all():
            if np.isfinite(source).all():
                overflow.append(f"{key} in {checkpoint.files[key]}, as {dtype}")
            else:
                nonfinite.append(f"{key} in {checkpoint.files[key]}")
        params[path] = jnp.asarray(tensor)
    if nonfinite or overflow:
        raise ConversionError("the checkpoint's values must be finite, or every image it makes is NaN:"
                              + listing("tensors holding NaN or infinity (the file is damaged: restore it from its "
                                        "original copy)", nonfinite)
                              + listing("tensors with values beyond their dtype's range (convert to float32)",
                                        overflow))
    return traverse_util.unflatten_dict(params)


def listing(title: str, items: list[str]) -> str:
    """A titled, counted list of at most MAX_LISTED items for an error message ("" when empty)."""
    if not items:
        return ""
    shown = "".join(f"\n    {item}" for item in items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {title}: {len(items)}{shown}{more}"


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
        shutil.copytree(folder / component, dst / component)
    shutil.copy2(folder / "model_index.json", dst / "model_index.json")
    (dst / MANIFEST_NAME).write_text(json.dumps(folder_manifest(dst), indent=1))


def save_pipeline(folder: Path, dst: Path, params: dict[str, Any]) -> None:
    """A converted pipeline folder at `dst` (see `write_pipeline`), written under a name of its
    own (host, pid, random token) and renamed into place in one step: a reader sees the whole
    folder or none, and writers at the same time never share files. Temporary copies that killed
    runs of this host left behind are deleted first."""
    remove_abandoned_copies(dst)
    temporary = dst.with_name(f"{dst.name}{TEMPORARY_MARK}{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        write_pipeline(folder, temporary, params)
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


def cache_folder(folder: Path, dtype: Any, cache_dir: str | Path | None = None) -> Path:
    """Where the converted copy of the pipeline `folder` in `dtype` is cached: named by a hash of
    every model file, without reading the gigabytes of its tensors.

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
    for component in MODEL_COMPONENTS:
        for path in sorted((folder / component).iterdir()):
            if path.is_file():
                digest.update(f"{component}/{path.name}".encode())
                add_file_key(digest, path)
    return Path(cache_dir or default_cache_dir()) / f"{folder.name}-{digest.hexdigest()[:16]}"
