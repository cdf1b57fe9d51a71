"""The test harness itself: `running_server` starts a server, waits for it, and always stops it."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest

from .conftest import free_port, running_server


def test_running_server_waits_for_http_and_stops_the_server(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with running_server(cmd, url, tmp_path / "server.log", timeout=60) as proc:
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
    assert proc.poll() is not None  # stopped on the way out


def test_a_server_that_dies_fails_with_its_log(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('cannot bind'); sys.exit(3)"]
    with pytest.raises(AssertionError, match="exited with 3 before it was ready(.|\n)*cannot bind"):
        with running_server(cmd, f"http://127.0.0.1:{free_port()}/", tmp_path / "server.log", timeout=60):
            pass
