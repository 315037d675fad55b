"""`python -m jaxfuse.serve`: flags refused before anything loads or JAX starts (exit 2, one line
naming the fix), the API key from the environment, and the whole command: it compiles before it listens,
serves, and on SIGTERM drains and exits 0."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import free_port

from jaxfuse.serve.cli import API_KEY_ENV, api_key_of, build_parser, main


def serve_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "jaxfuse.serve", *flags]


@pytest.mark.parametrize("flags, message", [
    (["--warm", "250x256"], "width 250 must be a positive multiple of 32"),
    (["--warm", "big"], "--warm big: write a size as WIDTHxHEIGHT"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--steps", "200"], "--steps 200 is above --max-steps 150"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms must be positive"),
    (["--context", "0.5"], "add --mode pcpp"),
    (["--lora", "missing.safetensors"], "missing.safetensors"),
])
def test_bad_flags_exit_2_before_loading(flags, message, tmp_path, capsys):
    assert main([*flags, "--cache-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert message in error and "loading" not in error
    assert error.count("\n") == 1 and error.startswith("error: ")


def test_a_port_in_use_is_refused_before_loading(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["--port", str(taken.getsockname()[1]), "--cache-dir", str(tmp_path)]) == 2
    assert "another program listens there" in capsys.readouterr().err


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key_of(build_parser().parse_args([])) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_of(build_parser().parse_args([])) == "from-env"
    assert api_key_of(build_parser().parse_args(["--api-key", "flag"])) == "flag"


@pytest.mark.slow
def test_the_server_compiles_before_listening_serves_and_exits_0_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    server = subprocess.Popen(serve_command("--devices", "1", "--steps", "2", "--max-batch", "2", "--port", str(port),
                                            "--cache-dir", str(tmp_path)),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any(line.startswith("serving") for line in lines):
            line = server.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert any("compiling batches of 1, 2 image(s) at 2 steps for 256x256 on 1 device(s)" in x for x in lines)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", "/v1/images/generations", json.dumps({"prompt": "a red circle", "n": 2}))
        answer = connection.getresponse()
        assert answer.status == 200 and len(json.loads(answer.read())["data"]) == 2
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
        connection.close()
        assert 'jaxfuse_batches_total{images="2",padded="2"} 1' in metrics
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
        assert server.returncode == 0, output
        assert "stopped after 2 images." in output and "Traceback" not in output
    finally:
        if server.poll() is None:
            server.kill()
