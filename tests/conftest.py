"""Test setup: an emulated 8-device CPU mesh, set before JAX is first imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import contextlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from unittest import mock  # noqa: E402

import jax  # noqa: E402

# Many tests compile the same programs from fresh function objects (the demo pipeline loaded
# again, a train step run twice to test resuming); a compilation cache for the session compiles
# each program once.
_xla_cache = tempfile.mkdtemp(prefix="jaxfuse-test-xla-")
atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _xla_cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.extend.core import ClosedJaxpr, Jaxpr  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """The tiny random SDXL pipeline (`jaxfuse.oracle.build_tiny_sdxl`) saved once per session."""
    from jaxfuse.oracle import build_tiny_sdxl

    path = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl(path)
    return path


@pytest.fixture(scope="session")
def tiny_single_files(tmp_path_factory):
    """Tiny SDXL base and refiner folders with 64-wide heads (`sdxl_single_file`), and single files
    written from them (fp16, Stability's layout): the base, the base without its VAE, the refiner,
    the VAE alone."""
    from sdxl_single_file import build_tiny_base, build_tiny_refiner, write_single_file, write_single_file_vae

    root = tmp_path_factory.mktemp("sdxl-single-file")
    paths = {"base": root / "base", "refiner": root / "refiner"}
    build_tiny_base(paths["base"])
    build_tiny_refiner(paths["refiner"])
    paths |= {name: root / f"{name}.safetensors" for name in ("base_file", "base_file_no_vae", "refiner_file",
                                                             "vae_file")}
    write_single_file(paths["base"], paths["base_file"])
    write_single_file(paths["base"], paths["base_file_no_vae"], vae=False)
    write_single_file(paths["refiner"], paths["refiner_file"])
    write_single_file_vae(paths["base"] / "vae", paths["vae_file"])
    return paths


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    """The test runs in its own folder: nothing lands where pytest was started. A module asks for
    it for all its tests with `pytestmark = pytest.mark.usefixtures("in_tmp_path")`."""
    monkeypatch.chdir(tmp_path)


@contextlib.contextmanager
def page_server(command: list[str], log, ready: str, start_s: float):
    """A command serving a page (`python -m jaxfuse.serve`, `jaxfuse.stream --serve`) in its own
    process, its output in `log`; yields once `ready` is in the log, then stops it with SIGTERM,
    which it must take cleanly (exit 0), and kills it if it does not."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stderr=out, stdout=out, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + start_s
        while ready not in log.read_text():
            assert process.poll() is None, f"the server stopped:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
            time.sleep(0.5)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scaled_random_params(abstract, seed: int, spread: float):
    """Random weights made on the host for an abstract parameter tree (compiling `init` takes
    longer than many tests): kernels N(0, 1/fan in), norm scales 1 + spread N(0, 1), every other
    leaf spread N(0, 1), so activations keep their size through a deep network."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return x / np.sqrt(np.prod(leaf.shape[:-1]))
        return 1 + spread * x if name == "scale" else spread * x

    return jax.tree_util.tree_map_with_path(draw, abstract)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with one empty data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def assert_matches(ours, reference, tol: float) -> None:
    """Every |ours - reference| <= tol x max |reference| (`reference` an array or a torch tensor)."""
    reference = np.asarray(reference.detach() if hasattr(reference, "detach") else reference)
    np.testing.assert_allclose(np.asarray(ours), reference, atol=tol * np.abs(reference).max(), rtol=0)


def assert_trees_equal(a, b) -> None:
    """Two pytrees with the same structure and bit-identical leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def sub_jaxprs(eqn):
    """The jaxprs nested in one equation (a scan's body, a shard_map's, a pjit's)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item


def count_primitive(jaxpr, name) -> int:
    """How many equations of primitive `name` a jaxpr holds, its sub-jaxprs' included."""
    return sum((eqn.primitive.name == name) + sum(count_primitive(sub, name) for sub in sub_jaxprs(eqn))
               for eqn in jaxpr.eqns)


class CountingRunner:
    """Runs each program as `sampling.image.Direct` does, and keeps each distinct one's name and
    UNet bodies (its convolutions)."""

    def __init__(self):
        from jaxfuse.sampling.image import Direct

        self.direct = Direct()
        self.convolutions = {}

    def run(self, name, fn, *args, donate=None):
        if name not in self.convolutions:
            self.convolutions[name] = count_primitive(jax.make_jaxpr(fn)(*args).jaxpr, "conv_general_dilated")
        return self.direct.run(name, fn, *args, donate=donate)

    def replicated(self, name, tree, mesh):
        return self.direct.replicated(name, tree, mesh)


@contextlib.contextmanager
def our_step_noise(scheduler, seed: int | Sequence[int] = 0):
    """While active, diffusers' stochastic `scheduler` (Euler ancestral, LCM) draws inside `step`
    the noise jaxfuse draws from `seed` (one for the batch, or one per image) for the same step,
    counted from the first step that runs (`begin_index` in image-to-image)."""
    import torch

    from jaxfuse import schedulers

    keys = schedulers.noise_keys([seed] if isinstance(seed, int) else seed)

    def draw(shape, **_):
        i = scheduler.step_index - (scheduler.begin_index or 0)
        return torch.from_numpy(np.array(schedulers.step_noise(keys, i, shape)))

    with mock.patch.object(sys.modules[type(scheduler).__module__], "randn_tensor", draw):
        yield
