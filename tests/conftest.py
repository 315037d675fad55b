"""Test setup: an emulated 8-device CPU mesh, set before JAX is first imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

# Many tests compile the same programs from fresh function objects (the demo pipeline loaded
# again, a train step run twice to test resuming); a compilation cache for the session compiles
# each program once.
_xla_cache = tempfile.mkdtemp(prefix="jaxfuse-test-xla-")
atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _xla_cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
