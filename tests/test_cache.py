"""The converted-weights cache: damage found on read, writers at the same time, a key that follows content."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_equal

from jaxfuse import checkpoint
from jaxfuse.checkpoint import CacheError
from jaxfuse.pipeline import load_models, load_pipeline
from jaxfuse.spec import PipelineSpec

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def quiet(_):
    pass


@pytest.fixture(scope="module")
def cached(tiny_sdxl_folder, tmp_path_factory):
    """A cache folder holding the tiny pipeline's converted entry."""
    cache = tmp_path_factory.mktemp("cache")
    load_pipeline(tiny_sdxl_folder, cache_dir=cache, log=quiet)
    return cache


@pytest.fixture(scope="module")
def direct(tiny_sdxl_folder):
    """Each model's params converted from the safetensors, without the cache."""
    models = load_models(PipelineSpec.read(tiny_sdxl_folder), tiny_sdxl_folder, jnp.float32)
    return {name: params for name, (_, params) in models.items()}


def loaded_params(pipe) -> dict:
    return {"unet": pipe.denoiser.params, "vae": pipe.codec.params, "text_encoder": pipe.text.encoders[0].params,
            "text_encoder_2": pipe.text.encoders[1].params}


def snapshot(folder) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def largest_unet_data_file(entry):
    return max((p for p in (entry / "unet" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(entry):
    data = largest_unet_data_file(entry)
    os.truncate(data, data.stat().st_size // 2)


def zero(entry):
    data = largest_unet_data_file(entry)
    data.write_bytes(bytes(data.stat().st_size))


def remove_params(entry):
    shutil.rmtree(entry / "unet" / "params")


def break_metadata_behind_the_manifest(entry):
    """Damage the manifest does not see (it is written anew): orbax's own read fails. (Damaged
    tensor data would fail the same way, but orbax then leaves coroutines that complain, as
    warnings, during later tests.)"""
    (entry / "unet" / "params" / "_METADATA").write_text("{")
    manifest = checkpoint.folder_manifest(entry)
    del manifest[checkpoint.MANIFEST_NAME]
    (entry / checkpoint.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, what", [
    (truncate, "wrong size: 1"),
    (zero, "wrong checksum"),
    (remove_params, "missing: "),
    (break_metadata_behind_the_manifest, "cannot be restored"),
], ids=["truncated", "zeroed", "params-removed", "restore-fails"])
def test_damaged_entry_says_what_and_what_to_delete(tiny_sdxl_folder, cached, tmp_path, damage, what):
    cache = tmp_path / "cache"
    shutil.copytree(cached, cache)
    (entry,) = cache.iterdir()
    damage(entry)
    before = snapshot(entry)
    with pytest.raises(CacheError, match=what) as e:
        load_pipeline(tiny_sdxl_folder, cache_dir=cache, log=quiet)
    assert f"delete {entry} and run again" in str(e.value)
    assert snapshot(entry) == before  # left as it was for the user to see, not rewritten
    assert list(cache.iterdir()) == [entry]


# Waits until all loaders have imported JAX, so that each finds the cache empty and converts.
LOADER = """
import os, sys, time
from pathlib import Path
from jaxfuse.pipeline import load_pipeline
folder, cache, barrier, count = sys.argv[1:]
Path(barrier, str(os.getpid())).touch()
while len(os.listdir(barrier)) < int(count):
    time.sleep(0.01)
load_pipeline(folder, cache_dir=cache, log=print)
"""


@pytest.mark.slow
def test_three_processes_convert_into_one_entry(tiny_sdxl_folder, direct, tmp_path):
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    count = 3
    source_before = folder_digest(tiny_sdxl_folder)
    loaders = [subprocess.Popen([sys.executable, "-c", LOADER, tiny_sdxl_folder, cache, barrier, str(count)],
                                env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(count)]
    outputs = [loader.communicate(timeout=300)[0] for loader in loaders]
    assert [loader.returncode for loader in loaders] == [0] * count, outputs
    assert all("converting" in out for out in outputs), outputs  # they raced: none found an entry
    (entry,) = cache.iterdir()  # one entry, no temporary copies left
    assert (entry / checkpoint.MANIFEST_NAME).is_file()
    messages = []
    pipe = load_pipeline(tiny_sdxl_folder, cache_dir=cache, log=messages.append)
    assert "from the cache" in messages[0]
    assert_trees_equal(loaded_params(pipe), direct)
    assert folder_digest(tiny_sdxl_folder) == source_before  # the user's model folder is untouched


def folder_digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_abandoned_copies_of_dead_writers_are_removed(tmp_path):
    """A killed writer's copy goes; a live writer's, another host's and the entry itself stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dst = tmp_path / "model-0123"
    names = {"dead": f"{dst.name}.tmp.{host}.{dead.stdout.strip()}.00ff00ff",
             "live": f"{dst.name}.tmp.{host}.{os.getpid()}.00ff00ff",
             "elsewhere": f"{dst.name}.tmp.other-host.{dead.stdout.strip()}.00ff00ff", "entry": dst.name}
    for name in names.values():
        (tmp_path / name).mkdir()
    checkpoint.remove_abandoned_copies(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in ("live", "elsewhere", "entry"))


def overwrite_tensor(path, name, edit):
    """Rewrites the float32 tensor `name` of a safetensors file in place: same size, same header."""
    with path.open("r+b") as f:
        header_length = int.from_bytes(f.read(8), "little")
        record = json.loads(f.read(header_length))[name]
        assert record["dtype"] == "F32"
        start, end = (8 + header_length + offset for offset in record["data_offsets"])
        f.seek(start)
        values = np.frombuffer(f.read(end - start), np.float32)
        f.seek(start)
        f.write(edit(values).astype(np.float32).tobytes())


def test_tensor_edited_in_place_is_converted_again(tiny_sdxl_folder, tmp_path):
    """Same name, size and mtime, other bytes: the next load converts again and sees them."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_sdxl_folder, folder)
    first = load_pipeline(folder, cache_dir=tmp_path / "cache", log=quiet)
    weights = folder / UNET_WEIGHTS
    before = weights.stat()
    overwrite_tensor(weights, "conv_in.weight", lambda w: w + 1)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    messages = []
    second = load_pipeline(folder, cache_dir=tmp_path / "cache", log=messages.append)
    assert "converting" in messages[0]
    second_kernel, first_kernel = (p.denoiser.params["conv_in"]["kernel"] for p in (second, first))
    np.testing.assert_array_equal(second_kernel, first_kernel + 1)


def test_key_follows_ctime(tiny_sdxl_folder, tmp_path):
    """A status change alone (here a chmod to the same mode) gives a new key: ctime is what no
    user tool can set back after an edit."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_sdxl_folder, folder)
    weights = folder / UNET_WEIGHTS
    key = checkpoint.cache_folder(folder, jnp.float32, tmp_path)
    assert checkpoint.cache_folder(folder, jnp.float32, tmp_path) == key
    ctime = weights.stat().st_ctime_ns
    time.sleep(0.05)  # the kernel's file clock ticks every few ms
    os.chmod(weights, weights.stat().st_mode)
    assert weights.stat().st_ctime_ns != ctime
    assert checkpoint.cache_folder(folder, jnp.float32, tmp_path) != key


def test_a_cache_that_cannot_be_written_costs_only_a_warning(tiny_sdxl_folder, direct):
    """/sys takes no new folder, not even from root: the model still loads, and the log says why
    the next run converts again."""
    messages = []
    pipe = load_pipeline(tiny_sdxl_folder, cache_dir="/sys/jaxfuse-cache", log=messages.append)
    assert_trees_equal(loaded_params(pipe), direct)
    assert any(m.startswith("warning: the converted weights could not be cached") for m in messages), messages
