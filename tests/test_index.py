import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragqa.config import Settings
from ragqa.errors import RagqaError
from ragqa.index import Index, tokenize
from ragqa.ingest import load_text

from .conftest import CORPUS, LIGHT_EMBEDDER, assert_one_line_error, make_settings, run_cli


def test_tokenize_chinese_and_english() -> None:
    tokens = tokenize("杰文斯悖论（Jevons Paradox）是什么？The COAL question")
    assert "杰文斯" in tokens or "杰文斯悖论" in tokens
    assert {"jevons", "paradox", "coal", "question"} <= set(tokens)
    assert "？" not in tokens and "是" not in tokens and "the" not in tokens


_JIEBA_CHECK = """
import sys
import jieba
import ragqa.index as ix
jieba.dt.tmp_dir = sys.argv[1]
ix.load_jieba()
fast, fast_total = dict(jieba.dt.FREQ), jieba.dt.total
jieba.dt.initialized = False
jieba.dt.initialize()  # jieba's own way, from its marshal cache or dict.txt
assert jieba.dt.FREQ == fast and jieba.dt.total == fast_total, "dictionaries differ"
print(len(fast))
"""


def test_jieba_dictionary_cache_is_jiebas_own_dictionary(tmp_path: Path) -> None:
    """The faster dictionary copy (index.load_jieba) must hold exactly what jieba loads itself: built by the first
    process, read by the second, and a damaged copy is rebuilt, never used."""

    def run() -> str:
        proc = subprocess.run([sys.executable, "-c", _JIEBA_CHECK, str(tmp_path)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    assert int(run()) > 400_000
    (cache,) = tmp_path.glob("ragqa-jieba-*.npz")
    built = cache.stat().st_mtime_ns
    run()  # loads the copy: the file is not rewritten
    assert cache.stat().st_mtime_ns == built
    cache.write_bytes(cache.read_bytes()[:1000])  # truncated
    run()
    assert cache.stat().st_size > 1000 and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_corpus_index_offsets_and_no_change_reingest(corpus_settings: Settings, embedder) -> None:
    idx = Index(corpus_settings, embedder=embedder)
    chunks = idx.load_chunks()
    texts = {p: load_text(Path(p)) for p in {c.source for c in chunks.values()}}
    assert len(texts) == 5
    for c in chunks.values():
        assert texts[c.source][c.start : c.end] == c.text
    assert idx.store._collection.count() == len(chunks)
    again = idx.ingest([CORPUS])
    assert again.chunks_embedded == 0 and again.files_unchanged == 5 and again.chunks_total == len(chunks)
    assert idx.stale_reason([CORPUS]) is None


def _small_index(tmp_path: Path, embedder) -> tuple[Index, Path]:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("杰文斯悖论指效率提高反而增加总消耗。" * 3, encoding="utf-8")
    (docs / "b.md").write_text("# Scaling\n\nMixture of experts routes each token to a few experts. " * 4,
                               encoding="utf-8")
    settings = make_settings(index=tmp_path / "idx", chunk_size=120, chunk_overlap=20)
    return Index(settings, embedder=embedder), docs


def _sources(idx: Index) -> dict[str, int]:
    idx._chunks = None
    out: dict[str, int] = {}
    for c in idx.load_chunks().values():
        out[Path(c.source).name] = out.get(Path(c.source).name, 0) + 1
    return out


def _vector_sources(idx: Index) -> set[str]:
    got = idx.store._collection.get(include=["metadatas"])
    return {Path(m["source"]).name for m in got["metadatas"]}


@pytest.mark.slow
def test_a_precision_other_than_the_index_is_one_clear_error(tmp_path: Path, embedder, models_dir: Path,
                                                            corpus_settings: Settings) -> None:
    """int8 and fp32 vectors are close, not equal: an index never mixes them, nor is queried across them."""
    idx, docs = _small_index(tmp_path, embedder)
    idx.ingest([docs])
    assert idx.meta()["embed_precision"] == "fp32"
    int8 = Index(idx.settings.replace(embed_precision="int8"), embedder=embedder)
    for attempt in (int8.check_embedder, lambda: int8.ingest([docs])):
        with pytest.raises(RagqaError, match="holds fp32 vectors.*--rebuild.*embed_precision = \"fp32\""):
            attempt()
    env = {"RAGQA_INDEX": str(idx.dir), "RAGQA_MODELS": str(models_dir), "RAGQA_EMBED_PRECISION": "int8",
           "RAGQA_CHUNK_SIZE": "120", "RAGQA_CHUNK_OVERLAP": "20"}
    assert_one_line_error(run_cli("ingest", str(docs), env=env), "holds fp32 vectors", "--rebuild")
    rebuilt = run_cli("ingest", "--rebuild", str(docs), env=env)  # the way to switch
    assert rebuilt.returncode == 0, rebuilt.stderr
    with pytest.raises(RagqaError, match="holds int8 vectors"):
        Index(idx.settings, embedder=embedder).check_embedder()
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir),
           "RAGQA_EMBED_PRECISION": "int8"}
    assert_one_line_error(run_cli("ask", "杰文斯悖论是什么？", env=env), "holds fp32 vectors", "--rebuild")


@pytest.mark.slow
def test_changed_and_deleted_files(tmp_path: Path, embedder) -> None:
    idx, docs = _small_index(tmp_path, embedder)
    first = idx.ingest([docs])
    assert first.files_added == 2 and set(_sources(idx)) == {"a.txt", "b.md"}
    (docs / "a.txt").write_text("完全不同的新内容。", encoding="utf-8")
    changed = idx.ingest([docs])
    assert changed.files_changed == 1 and changed.chunks_embedded == 1
    assert "完全不同" in "".join(c.text for c in idx.load_chunks().values())
    (docs / "b.md").unlink()
    gone = idx.ingest([docs])
    assert gone.files_removed == 1 and gone.chunks_embedded == 0
    assert set(_sources(idx)) == {"a.txt"}
    assert _vector_sources(idx) == {"a.txt"}  # no vectors left behind in Chroma either
    assert idx.store._collection.count() == len(idx.load_chunks())


@pytest.mark.slow
def test_files_outside_a_folder_are_what_else_the_index_searches(tmp_path: Path, light_embedder) -> None:
    idx, docs = _small_index(tmp_path, light_embedder)
    other = tmp_path / "clone" / "corpus"
    other.mkdir(parents=True)
    (other / "a.txt").write_text((docs / "a.txt").read_text(encoding="utf-8"), encoding="utf-8")  # a copy
    idx.ingest([docs, other])
    assert [Path(f).relative_to(tmp_path).as_posix() for f in idx.files_outside([docs])] == ["clone/corpus/a.txt"]
    assert idx.files_outside([docs, other]) == [] and idx.files_outside([tmp_path]) == []


@pytest.mark.slow
def test_binary_file_is_skipped_with_a_warning(tmp_path: Path, embedder) -> None:
    idx, docs = _small_index(tmp_path, embedder)
    (docs / "blob.txt").write_bytes(os.urandom(4096) + b"\0")
    (docs / "latin.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e. ".encode("latin-1") * 20)
    report = idx.ingest([docs])
    assert any("blob.txt" in s and "binary" in s for s in report.skipped)
    assert set(_sources(idx)) == {"a.txt", "b.md", "latin.txt"}
    assert "Café" in "".join(c.text for c in idx.load_chunks().values())


def test_missing_index_and_corrupt_state_are_clear(tmp_path: Path) -> None:
    settings = make_settings(index=tmp_path / "none")
    with pytest.raises(RagqaError, match="no index at .*ragqa ingest"):
        Index(settings).load_chunks()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RagqaError, match="corrupt.*--rebuild"):
        Index(make_settings(index=broken)).load_chunks()


def test_concurrent_ingest_is_refused(tmp_path: Path) -> None:
    import fcntl

    idx = Index(make_settings(index=tmp_path / "idx"))
    (tmp_path / "idx").mkdir()
    with open(tmp_path / "idx" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RagqaError, match="another ingest is running"):
            idx.ingest([CORPUS])


@pytest.mark.slow
def test_kill_mid_ingest_leaves_previous_index_usable(tmp_path: Path, models_dir: Path, embedder) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(CORPUS / "001_014de5e63ed176de.txt", docs)
    idx_dir = tmp_path / "idx"
    env = {"RAGQA_INDEX": str(idx_dir), "RAGQA_MODELS": str(models_dir), "RAGQA_CHUNK_SIZE": "400"}
    first = run_cli("ingest", str(docs), env=env)
    assert first.returncode == 0, first.stderr
    settings = make_settings(index=idx_dir, chunk_size=400)
    before = len(Index(settings).load_chunks())

    shutil.copy(CORPUS / "000_f5fd2a6a8ad6d922.txt", docs)
    (docs / "001_014de5e63ed176de.txt").write_text("替换后的文件内容。" * 50, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ragqa.cli import main; main()", "ingest", str(docs)],
        env={**os.environ, **env}, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 300
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("embedding ") or time.time() > deadline:
            break
    time.sleep(random.uniform(0.5, 3.0))  # somewhere inside the embedding / writing phase
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    after = Index(settings, embedder=embedder)
    chunks = after.load_chunks()
    assert len(chunks) == before  # the old committed state, whole
    assert {Path(c.source).name for c in chunks.values()} == {"001_014de5e63ed176de.txt"}
    hits = after.dense_search(embedder.embed_query("生成式 AI"), 3)
    assert hits and all(h[0] in chunks for h in hits)

    again = run_cli("ingest", str(docs), env=env)
    assert again.returncode == 0, again.stderr
    final = Index(settings, embedder=embedder)
    assert {Path(c.source).name for c in final.load_chunks().values()} == {
        "000_f5fd2a6a8ad6d922.txt", "001_014de5e63ed176de.txt"}
    assert final.store._collection.count() == len(final.load_chunks())  # orphans collected


def test_cli_ingest_bad_paths(tmp_path: Path) -> None:
    env = {"RAGQA_INDEX": str(tmp_path / "idx")}
    assert_one_line_error(run_cli("ingest", str(tmp_path / "missing"), env=env), "does not exist")


@pytest.mark.slow
def test_a_folder_deleted_elsewhere_leaves_nothing_behind(tmp_path: Path, embedder) -> None:
    idx, docs = _small_index(tmp_path, embedder)
    idx.ingest([docs])
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.txt").write_text("另一个文件夹里的内容。" * 5, encoding="utf-8")
    shutil.rmtree(docs)
    report = idx.ingest([other])
    assert report.files_added == 1 and report.files_removed == 2
    assert set(_sources(idx)) == {"c.txt"} and _vector_sources(idx) == {"c.txt"}


@pytest.mark.slow
def test_dense_search_reaches_past_uncommitted_vectors(tmp_path: Path, light_embedder) -> None:
    """A re-ingest in progress has written the new version's vectors but not committed it: they are the
    query's nearest and not live. Readers must still get the committed chunks, also when more uncommitted
    vectors are nearer than a fixed margin of extra places covers and BM25 has nothing for the question."""
    from ragqa.index import Progress
    from ragqa.ingest import load_document, split_document

    docs = tmp_path / "docs"
    docs.mkdir()
    note = "Note {} on mixture of experts: each token is routed to two experts.\n"
    (docs / "moe.txt").write_text("".join(note.format(i) for i in range(6)), encoding="utf-8")
    settings = make_settings(index=tmp_path / "idx", chunk_size=120, chunk_overlap=0)
    idx = Index(settings, embedder=light_embedder)
    idx.ingest([docs])
    live = set(idx.load_chunks())
    path = docs / "moe.txt"
    path.write_text("".join(note.format(i) for i in range(6, 60)), encoding="utf-8")
    data = path.read_bytes()
    pending = split_document(load_document(path, data), str(path), 120, 0, "v2")
    idx._add_vectors(pending, Progress())  # what the writer has done before its commit
    question = light_embedder.embed_query("How are tokens routed to experts in a mixture of experts?")
    assert len(pending) > 4 * (min(5, len(live)) + 8)  # more than a fixed over-fetch could get past
    got = Index(settings, embedder=light_embedder).dense_search(question, 5)
    assert {cid for cid, _ in got} <= live and len(got) == min(5, len(live))


@pytest.mark.slow
def test_a_long_lived_reader_follows_later_ingests(tmp_path: Path, light_embedder) -> None:
    """chat and serve keep one Index: after another ingest commits (or rebuilds), their next retrieval
    answers from the new state, not from chunks whose vectors that ingest has deleted."""
    from ragqa.retrieve import HybridRetriever

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("杰文斯悖论：效率提高反而增加总消耗。VERSIONONE", encoding="utf-8")
    settings = make_settings(index=tmp_path / "idx", chunk_size=120, chunk_overlap=0)
    Index(settings, embedder=light_embedder).ingest([docs])
    reader = Index(settings, embedder=light_embedder)
    retriever = HybridRetriever(reader, k=3)
    assert "VERSIONONE" in retriever.retrieve("杰文斯悖论").hits[0].chunk.text
    assert not reader.changed()
    Index(settings, embedder=light_embedder).ingest([docs])  # nothing changed: no new generation
    assert not reader.changed()

    (docs / "a.txt").write_text("杰文斯悖论：效率提高反而增加总消耗。VERSIONTWO", encoding="utf-8")
    Index(settings, embedder=light_embedder).ingest([docs])
    assert reader.changed()
    assert "VERSIONTWO" in retriever.retrieve("杰文斯悖论").hits[0].chunk.text

    # --rebuild from another process replaces the state and the vector store: say so, never answer from
    # the deleted files this process's Chroma client still holds.
    proc = run_cli("ingest", "--rebuild", str(docs), env={
        "RAGQA_INDEX": str(settings.index_dir), "RAGQA_MODELS": str(settings.models_dir),
        "RAGQA_EMBEDDER": LIGHT_EMBEDDER, "RAGQA_CHUNK_SIZE": "120", "RAGQA_CHUNK_OVERLAP": "0"})
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(RagqaError, match="rebuilt by another process"):
        retriever.retrieve("杰文斯悖论")


def test_an_index_from_before_pages_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    old = tmp_path / "old"
    old.mkdir()
    con = sqlite3.connect(old / "state.sqlite")
    con.executescript(
        """
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE files(path TEXT PRIMARY KEY, sha256 TEXT, size INTEGER, n_chunks INTEGER);
        CREATE TABLE chunks(id TEXT PRIMARY KEY, source TEXT, start INTEGER, "end" INTEGER, heading TEXT,
            start_line INTEGER, end_line INTEGER, text TEXT, tokens TEXT);
        INSERT INTO chunks VALUES ('c1', '/docs/a.txt', 0, 4, '标题', 1, 1, '一段正文', '["正文"]');
        """
    )
    con.close()
    chunks = Index(make_settings(index=old)).load_chunks()
    assert chunks["c1"].text == "一段正文" and chunks["c1"].page is None
    con = sqlite3.connect(old / "state.sqlite")
    assert "page" in {row[1] for row in con.execute("PRAGMA table_info(chunks)")}
    con.close()
    assert Index(make_settings(index=old)).load_chunks()["c1"].heading == "标题"  # a second open is a no-op
