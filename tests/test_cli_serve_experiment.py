"""`mythos experiment` and `mythos serve` through the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def mythos(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "openmythos.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_experiment_smoke_writes_its_report(tmp_path):
    out = tmp_path / "exp"
    done = mythos("experiment", "depth-extrapolation", "--smoke", "true", "--threads", "1",
                  "--out_dir", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "# depth-extrapolation" in done.stdout
    assert json.loads((out / "results.json").read_text())["config"]["smoke"] is True


@pytest.mark.slow
def test_experiment_errors_name_the_problem():
    done = mythos("experiment", "nope")
    assert done.returncode == 2 and "unknown experiment 'nope'" in done.stderr
    done = mythos("experiment", "stability", "--stepz", "3")
    assert done.returncode == 2 and "no field 'stepz'" in done.stderr


def test_serve_names_an_address_it_cannot_listen_on_before_loading(monkeypatch):
    import socket

    import openmythos.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model loaded before the address was checked"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on --host '127.0.0.1' --port {port}: Address already in use"):
            cli.serve_command("run", None, False, "127.0.0.1", port, 8)
    if socket.has_ipv6:  # an IPv6 host is tried as uvicorn will listen on it (AF_INET refused it)
        cli._check_address("::1", 0)


@pytest.mark.slow
def test_serve_needs_a_model():
    done = mythos("serve", "--preset", "tiny")
    assert done.returncode == 2 and "--random-init" in done.stderr
    done = mythos("serve", "--checkpoint", str(Path("/nonexistent/run")))
    assert done.returncode == 2
