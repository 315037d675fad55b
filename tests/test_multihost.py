"""Multi-host generation: two local processes of 4 emulated CPU devices each, joined by
`jax.distributed` over loopback, run one 8-device mesh."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import free_port

from jaxfuse.demo import DEMO_MODEL, DEMO_PROMPT
from jaxfuse.parallel.mesh import ProcessJoinError, ProcessLayout, initialize_processes
from jaxfuse.parallel_config import ParallelConfig, ParallelError
from jaxfuse.pipeline import load_pipeline

STEPS = 3


def generate_command(tmp_path, process: int, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxfuse.generate", "--steps", str(STEPS), "--devices", "8",
            "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process),
            "--output", str(tmp_path / f"process{process}.png"),
            "--output-array", str(tmp_path / f"process{process}.npy"), "--cache-dir", str(tmp_path / "cache"), *extra]


def process_env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def run_two_processes(tmp_path, *extra: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = [subprocess.Popen(generate_command(tmp_path, i, port, *extra), env=process_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results


def one_process_image(tmp_path, parallel: ParallelConfig) -> np.ndarray:
    """The image `run_two_processes` makes, made in this one process of 8 devices."""
    pipe = load_pipeline(DEMO_MODEL, cache_dir=tmp_path / "cache", log=lambda _: None)
    return pipe(DEMO_PROMPT, num_inference_steps=STEPS, seed=0, parallel=parallel)[0]


@pytest.mark.slow
def test_sync_over_two_processes_equals_one_process_with_eight_devices(tmp_path):
    results = run_two_processes(tmp_path, "--mode", "sync")
    image = np.load(tmp_path / "process0.npy")
    # Only process 0 writes files and reports progress.
    assert not (tmp_path / "process1.png").exists() and not (tmp_path / "process1.npy").exists()
    assert "denoising" in results[0].stderr and "denoising" not in results[1].stderr
    settings = json.loads((tmp_path / "process0.json").read_text())["settings"]
    assert (settings["processes"], settings["devices"], settings["mode"]) == (2, 8, "sync")

    # Each device runs the same program on the same rows, and the patches' exchanges only move data
    # (all_gather, ppermute): measured bit-identical (EPYC).
    np.testing.assert_array_equal(image, one_process_image(tmp_path, ParallelConfig(8, "sync")))


@pytest.mark.slow
def test_displaced_over_two_processes_equals_one_process_with_eight_devices(tmp_path):
    """The stale context crosses the processes as it crosses one process's devices."""
    run_two_processes(tmp_path, "--mode", "displaced", "--warmup-steps", "1")
    image = np.load(tmp_path / "process0.npy")
    settings = json.loads((tmp_path / "process0.json").read_text())["settings"]
    assert (settings["processes"], settings["mode"]) == (2, "displaced")
    # measured bit-identical (EPYC), as in sync; the image is 0.55 away from single's (max abs)
    np.testing.assert_array_equal(image, one_process_image(tmp_path, ParallelConfig(8, "displaced", 1)))


# What a Python traceback or a native crash (JAX's SIGABRT, a segfault) leaves on stderr.
CRASH_MARKERS = ("Traceback", "Fatal Python error", "*** Begin stack trace", "Check failure", "Aborted",
                 "Segmentation fault")


def run_process_that_cannot_join(tmp_path, process: int, port: int) -> str:
    """Runs one process of a two-process run that cannot join, with a 3 s timeout; checks that it
    ends with exit status 1 (the environment), one `error: ` line, no crash and no file. Returns
    that line."""
    start = time.perf_counter()
    result = subprocess.run(generate_command(tmp_path, process, port, "--process-timeout", "3"),
                            env=process_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert time.perf_counter() - start < 60
    assert not any(marker in result.stderr for marker in CRASH_MARKERS), result.stderr[-3000:]
    assert not (tmp_path / f"process{process}.png").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture
def silent_port():
    """A loopback port whose server accepts connections and never answers: not a JAX coordinator."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # the server was shut down
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    for connection in held:
        connection.close()


def test_a_process_that_cannot_reach_the_coordinator_fails_clearly(tmp_path):
    port = free_port()  # nothing listens there
    error = run_process_that_cannot_join(tmp_path, 1, port)
    assert f"could not join the others through the coordinator at 127.0.0.1:{port} within 3 s" in error


def test_process_0_whose_peers_never_come_fails_clearly(tmp_path):
    port = free_port()
    error = run_process_that_cannot_join(tmp_path, 0, port)
    assert f"the other 1 process did not join process 0 at 127.0.0.1:{port} within 3 s" in error
    assert "--num-processes 2" in error


def test_a_process_whose_coordinator_address_is_another_server_fails_clearly(tmp_path, silent_port):
    error = run_process_that_cannot_join(tmp_path, 1, silent_port)
    assert f"coordinator at 127.0.0.1:{silent_port} within 3 s" in error and "something listens" in error


def test_process_0_on_a_taken_port_fails_clearly(tmp_path, silent_port):
    error = run_process_that_cannot_join(tmp_path, 0, silent_port)
    assert f"port {silent_port} is taken on this host" in error


def test_join_failures_are_process_join_errors():
    # Without a coordinator the failure comes before JAX is touched, so it runs in this process.
    with pytest.raises(ProcessJoinError, match="could not join the others"):
        initialize_processes(ProcessLayout(f"127.0.0.1:{free_port()}", 2, 1, timeout_s=1))


@pytest.mark.parametrize("layout, message", [
    (dict(coordinator_address="127.0.0.1:1234"), "--num-processes, --process-id missing"),
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0), "must be HOST:PORT"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), "must be in 0..1"),
    (dict(coordinator_address="127.0.0.1:99999", num_processes=2, process_id=0), "must be HOST:PORT"),
])
def test_process_layout_errors_name_the_fix(layout, message):
    with pytest.raises(ParallelError, match=message):
        ProcessLayout(**layout)


def test_cli_checks_the_process_layout_before_starting(tmp_path, capsys):
    from jaxfuse.generate import main

    out = tmp_path / "x.png"
    assert main(["--output", str(out), "--process-id", "1"]) == 2
    assert "--coordinator-address, --num-processes missing" in capsys.readouterr().err
    assert main(["--output", str(out), "--devices", "6", "--coordinator-address", "127.0.0.1:1234",
                 "--num-processes", "4", "--process-id", "0"]) == 2
    assert "must divide evenly among --num-processes 4" in capsys.readouterr().err
    assert main(["--output", str(out), "--devices", "6", "--coordinator-address", "127.0.0.1:1234",
                 "--num-processes", "4", "--process-id", "0", "--height", "1024", "--width", "1024"]) == 2
    assert "must divide evenly among --num-processes 4" in capsys.readouterr().err  # a canvas too
    assert not out.exists()
