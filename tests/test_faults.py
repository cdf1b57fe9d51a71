"""Faults and load: kill -9 mid-ingest, two ingests at once, reads during an ingest, a damaged index,
a full disk and a read-only home. Real processes, a real Chroma on disk and the light real embedder."""

from __future__ import annotations

import ctypes
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from ragqa.chain import QA
from ragqa.config import Settings
from ragqa.index import Index

from .conftest import LIGHT_EMBEDDER, assert_one_line_error, fresh_chroma, make_settings, run_cli

KILL_TRIALS = 12
CLI = [sys.executable, "-c", "from ragqa.cli import main; main()"]


def _lines(topic: str, n: int, marker: str = "") -> str:
    """Mixed Chinese/English lines, each short enough that every chunk holds whole lines (and the marker)."""
    return "".join(
        f"{marker}第{i}条：{topic}的研究表明效率提高会改变总需求。Note {i} on {topic}: efficiency and demand.\n"
        for i in range(n)
    )


def _before_docs(docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "a.txt").write_text(_lines("杰文斯悖论", 30), encoding="utf-8")
    (docs / "b.md").write_text("# 专家混合\n\n" + _lines("专家混合模型", 30), encoding="utf-8")
    (docs / "c.txt").write_text(_lines("水资源管理", 30), encoding="utf-8")


def _change(docs: Path, extra: int = 60) -> None:
    """Modify one file, delete one, add one: the states before and after differ in files and counts."""
    (docs / "b.md").write_text("# Mixture of experts\n\n" + _lines("路由与负载均衡", 40), encoding="utf-8")
    (docs / "c.txt").unlink()
    (docs / "d.txt").write_text(_lines("碳排放交易", extra), encoding="utf-8")


def _settings(index: Path, models_dir: Path) -> Settings:
    return make_settings(index=index, models=models_dir, embedder=LIGHT_EMBEDDER, chunk_size=200, chunk_overlap=40)


def _env(settings: Settings) -> dict[str, str]:
    return {
        "RAGQA_INDEX": str(settings.index_dir), "RAGQA_MODELS": str(settings.models_dir),
        "RAGQA_EMBEDDER": LIGHT_EMBEDDER, "RAGQA_CHUNK_SIZE": "200", "RAGQA_CHUNK_OVERLAP": "40",
    }


State = tuple[int, frozenset[str]]


def _state(settings: Settings, embedder) -> State:
    """(live chunks, file names) as a fresh reader sees them; also checks that dense retrieval works."""
    fresh_chroma()
    idx = Index(settings, embedder=embedder)
    chunks = idx.load_chunks()
    if chunks:
        hits = idx.dense_search(embedder.embed_query("杰文斯悖论 efficiency and demand"), 3)
        assert hits and all(h[0] in chunks for h in hits)
    return len(chunks), frozenset(Path(c.source).name for c in chunks.values())


def _built(root: Path, models_dir: Path, embedder) -> tuple[Path, Settings, State]:
    docs = root / "docs"
    _before_docs(docs)
    settings = _settings(root / "idx", models_dir)
    Index(settings, embedder=embedder).ingest([docs])
    state = _state(settings, embedder)
    fresh_chroma()
    return docs, settings, state


def _cli(*args: str, env: dict[str, str], preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**os.environ, **env},
                          preexec_fn=preexec_fn, timeout=600)


# ---- kill -9 ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_nine_at_random_points_leaves_a_consistent_index(tmp_path: Path, models_dir: Path,
                                                              light_embedder) -> None:
    """12 ingests killed at seeded random moments spread over a whole run (start-up, embedding, commit, GC):
    each leaves exactly the old or the new state, retrievable, and a re-run completes it."""
    docs, settings, before = _built(tmp_path / "measure", models_dir, light_embedder)
    _change(docs)
    t0 = time.monotonic()
    run = _cli("ingest", str(docs), env=_env(settings))
    duration = time.monotonic() - t0  # only spreads the kill moments; nothing is asserted on it
    assert run.returncode == 0, run.stderr
    after = _state(settings, light_embedder)
    assert before != after and before[1] == {"a.txt", "b.md", "c.txt"} and after[1] == {"a.txt", "b.md", "d.txt"}

    rng = random.Random(6)
    outcomes: Counter[str] = Counter()
    for i in range(KILL_TRIALS):
        docs, settings, state = _built(tmp_path / f"trial{i}", models_dir, light_embedder)
        assert state == before
        _change(docs)
        delay = duration * (i + rng.random()) / KILL_TRIALS  # stratified: every tenth of the run gets kills
        log = tmp_path / f"trial{i}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([*CLI, "ingest", str(docs)], env={**os.environ, **_env(settings)},
                                    stdout=subprocess.DEVNULL, stderr=err)
            try:
                proc.wait(timeout=delay)
                killed = False
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                killed = True
        state = _state(settings, light_embedder)
        assert state in (before, after), (i, delay, state, log.read_text())
        embedding_seen = "embedding " in log.read_text()
        outcomes[
            "finished before the kill" if not killed
            else "killed after the commit" if state == after
            else "killed while embedding/writing" if embedding_seen
            else "killed while starting/scanning"
        ] += 1
        report = Index(settings, embedder=light_embedder).ingest([docs])
        assert report.chunks_total == after[0]
        assert _state(settings, light_embedder) == after
        assert Index(settings, embedder=light_embedder).store._collection.count() == after[0]  # orphans collected
        fresh_chroma()
    print(f"\nkill -9 trials survived: {sum(outcomes.values())}/{KILL_TRIALS} "
          f"(full run {duration:.1f} s): {dict(outcomes)}")
    assert sum(outcomes.values()) == KILL_TRIALS


# ---- concurrency -----------------------------------------------------------------------------------
def _wait_for_line(stream, needle: str, timeout: float = 300) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen += line
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never appeared; got: {seen}")


@pytest.mark.slow
def test_a_second_ingest_is_refused_while_one_runs(tmp_path: Path, models_dir: Path, light_embedder) -> None:
    docs, settings, before = _built(tmp_path, models_dir, light_embedder)
    _change(docs)
    first = subprocess.Popen([*CLI, "ingest", str(docs)], env={**os.environ, **_env(settings)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stderr is not None
        _wait_for_line(first.stderr, "embedding ")
        first.send_signal(signal.SIGSTOP)  # frozen mid-write, holding the writer lock: no race on timing
        second = run_cli("ingest", str(docs), env=_env(settings))
        assert_one_line_error(second, "another ingest is running", str(settings.index_dir))
        assert _state(settings, light_embedder) == before  # a reader meanwhile sees the old index, whole
    finally:
        first.send_signal(signal.SIGCONT)
    rest = first.communicate(timeout=300)[1]
    assert first.returncode == 0, rest
    after = _state(settings, light_embedder)
    assert after[1] == {"a.txt", "b.md", "d.txt"} and after != before


@pytest.mark.slow
def test_retrieval_during_an_ingest_sees_one_whole_version(tmp_path: Path, models_dir: Path,
                                                           light_embedder) -> None:
    """Every file changes from v1 to v2 while readers retrieve in a loop: each result set is all v1 or
    all v2, never a mix, never an error; also while the writer is frozen mid-write."""
    docs = tmp_path / "docs"
    docs.mkdir()
    topics = ["杰文斯悖论", "mixture of experts", "水资源管理"]
    for n, topic in enumerate(topics):
        (docs / f"f{n}.txt").write_text(_lines(topic, 20, marker="VERSIONONE "), encoding="utf-8")
    settings = _settings(tmp_path / "idx", models_dir)
    Index(settings, embedder=light_embedder).ingest([docs])
    fresh_chroma()
    for n, topic in enumerate(topics):
        (docs / f"f{n}.txt").write_text(_lines(topic, 80, marker="VERSIONTWO "), encoding="utf-8")

    questions = ["杰文斯悖论是什么？", "How are experts routed in a mixture of experts?", "水资源 efficiency"]

    def read(i: int) -> str:
        fresh_chroma()  # a new reader each time, as each `ragqa ask` is a new process
        answer = QA(settings, index=Index(settings, embedder=light_embedder)).ask(
            questions[i % len(questions)], retrieval_only=True)
        assert answer.hits
        versions = set()
        for hit in answer.hits:
            marks = {m for m in ("VERSIONONE", "VERSIONTWO") if m in hit.chunk.text}
            assert len(marks) == 1, hit.chunk.text
            versions |= marks
        assert len(versions) == 1, [h.chunk.text[:40] for h in answer.hits]
        return versions.pop()

    seen: Counter[str] = Counter()
    proc = subprocess.Popen([*CLI, "ingest", str(docs)], env={**os.environ, **_env(settings)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        _wait_for_line(proc.stderr, "embedding ")
        proc.send_signal(signal.SIGSTOP)  # new vectors partly written, nothing committed: readers see v1
        for i in range(3):
            assert read(i) == "VERSIONONE"
            seen["v1 while the writer was frozen mid-write"] += 1
    finally:
        proc.send_signal(signal.SIGCONT)
    i = 0
    while proc.poll() is None:
        seen[f"{read(i)} while the ingest ran"] += 1
        i += 1
    assert proc.wait() == 0, proc.stderr.read()
    for j in range(3):
        assert read(j) == "VERSIONTWO"
    print(f"\nreads during ingest: {dict(seen)}")


# ---- a damaged index ---------------------------------------------------------------------------------
def _hnsw_file(index_dir: Path) -> Path:
    files = sorted(index_dir.glob("chroma/*/data_level0.bin"))
    assert files and files[0].stat().st_size > 0, list(index_dir.rglob("*"))
    return files[0]


DAMAGE = {
    "state.sqlite truncated": lambda d: os.truncate(d / "state.sqlite", 1000),
    "chroma.sqlite3 truncated": lambda d: os.truncate(d / "chroma" / "chroma.sqlite3", 4096),
    "chroma.sqlite3 overwritten": lambda d: d.joinpath("chroma", "chroma.sqlite3").write_bytes(b"garbage!" * 512),
    "HNSW segment truncated": lambda d: os.truncate(_hnsw_file(d), 100),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_index_says_rebuild_and_rebuild_recovers(tmp_path: Path, models_dir: Path, light_embedder,
                                                         damage: str) -> None:
    docs, settings, before = _built(tmp_path, models_dir, light_embedder)
    if damage.startswith("HNSW"):
        # Chroma answers a small collection from its log; its HNSW files are read once there are a few hundred.
        (docs / "e.txt").write_text(_lines("深度学习", 500), encoding="utf-8")
        Index(settings, embedder=light_embedder).ingest([docs])
        before = _state(settings, light_embedder)
        fresh_chroma()
    DAMAGE[damage](settings.index_dir)
    env = {**_env(settings), "RAGQA_MODEL": "qwen2.5-coder-0.5b-instruct", "RAGQA_MAX_TOKENS": "8"}
    for args in (("ingest", str(docs)), ("ask", "杰文斯悖论是什么？")):
        proc = _cli(*args, env=env)
        if damage.startswith("HNSW") and proc.returncode == 0:
            # Chroma can serve a collection from its log and rebuild the segment; then nothing was lost.
            assert "Traceback" not in proc.stderr and _state(settings, light_embedder) == before
            continue
        assert_one_line_error(proc, str(settings.index_dir), "ragqa ingest --rebuild")
    fixed = _cli("ingest", "--rebuild", str(docs), env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert _state(settings, light_embedder) == before


# ---- full disk, read-only home -----------------------------------------------------------------------
def _file_size_limit(limit: int) -> Callable[[], None]:
    """RLIMIT_FSIZE: writes past `limit` bytes fail with EFBIG (CPython ignores SIGXFSZ), like a full disk."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _without_root_override() -> None:
    """Tests run as root, who writes anywhere: drop the capabilities that bypass file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; fails harmlessly when not root
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: the exec'd child cannot regain them


@pytest.fixture
def readonly_dir(tmp_path: Path):
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    probe = subprocess.run([sys.executable, "-c", f"open({str(d / 'probe')!r}, 'w')"],
                           preexec_fn=_without_root_override, capture_output=True)
    if probe.returncode == 0:
        d.chmod(0o755)
        pytest.skip("cannot make a read-only folder here: writes still succeed")
    yield d
    d.chmod(0o755)


@pytest.mark.slow
def test_full_disk_on_first_ingest_leaves_no_index(tmp_path: Path, models_dir: Path) -> None:
    docs = tmp_path / "docs"
    _before_docs(docs)
    settings = _settings(tmp_path / "idx", models_dir)
    proc = _cli("ingest", str(docs), env=_env(settings), preexec_fn=_file_size_limit(64 * 1024))
    assert_one_line_error(proc, "is the disk full?", str(settings.index_dir))
    assert not Index(settings).exists()  # nothing half-written under the final name
    assert not (settings.index_dir / "chroma").exists()


@pytest.mark.slow
def test_full_disk_on_reingest_keeps_the_previous_index(tmp_path: Path, models_dir: Path, light_embedder) -> None:
    docs, settings, before = _built(tmp_path, models_dir, light_embedder)
    _change(docs, extra=600)  # enough new vectors to grow Chroma's files past the limit
    limit = max(p.stat().st_size for p in settings.index_dir.rglob("*") if p.is_file()) + 4096
    proc = _cli("ingest", str(docs), env=_env(settings), preexec_fn=_file_size_limit(limit))
    assert_one_line_error(proc, "is the disk full?")
    assert _state(settings, light_embedder) == before
    again = _cli("ingest", str(docs), env=_env(settings))  # space is back: the ingest completes
    assert again.returncode == 0, again.stderr
    assert _state(settings, light_embedder)[1] == {"a.txt", "b.md", "d.txt"}


@pytest.mark.slow
def test_read_only_home(tmp_path: Path, models_dir: Path, light_embedder, readonly_dir: Path) -> None:
    docs, settings, before = _built(tmp_path / "ok", models_dir, light_embedder)
    env = {**_env(settings), "RAGQA_HOME": str(readonly_dir), "RAGQA_INDEX": ""}  # the default: HOME/index
    fresh = _cli("ingest", str(docs), env=env, preexec_fn=_without_root_override)
    assert_one_line_error(fresh, "not writable", str(readonly_dir / "index"))
    assert not (readonly_dir / "index").exists()

    fetch = _cli("models", "fetch", "smollm2-135m-instruct", env={"RAGQA_MODELS": str(readonly_dir)},
                 preexec_fn=_without_root_override)
    assert_one_line_error(fetch, "not writable", str(readonly_dir))
    assert list(readonly_dir.iterdir()) == []

    # An existing index that has become read-only: the re-ingest is refused in one line, the index is intact.
    _change(docs)
    for p in [settings.index_dir, *settings.index_dir.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        proc = _cli("ingest", str(docs), env=_env(settings), preexec_fn=_without_root_override)
        assert_one_line_error(proc, "not writable")
        # Reading needs SQLite's WAL side files, which a read-only folder cannot hold: one line, too.
        asked = _cli("ask", "杰文斯悖论是什么？", env={**_env(settings), "RAGQA_MODEL": "qwen2.5-coder-0.5b-instruct"},
                     preexec_fn=_without_root_override)
        assert_one_line_error(asked, str(settings.index_dir))
    finally:
        for p in [settings.index_dir, *settings.index_dir.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert _state(settings, light_embedder) == before
