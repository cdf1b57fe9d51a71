"""The index: chunk vectors in Chroma, chunk text + BM25 tokens + file state in SQLite, kept in step.

Crash safety comes from one rule: the SQLite state is the only record of which chunks are live, and it
changes in a single transaction *after* the new vectors are in Chroma. Ingest adds vectors under new ids
(ids hash the file's content), commits the state, then deletes vectors that are no longer live. A kill at
any point leaves either the old or the new state committed; vectors from the other one are orphans that
queries ignore (dense hits are filtered by the live ids) and the next ingest deletes. Readers see a
snapshot (SQLite WAL), so `ragqa ask` during an ingest reads the old or the new index, never a mix.

BM25 lives beside Chroma in the SQLite file (tokens per chunk), also when vectors live on a Chroma server.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragqa.config import Settings
from ragqa.errors import RagqaError
from ragqa.ingest import Chunk, Document, SkipFile, iter_files, load_document, split_document

SCHEMA_VERSION = 1
_WORD = re.compile(r"\w", re.UNICODE)
_STOP = set(
    "的 了 是 在 和 与 及 或 也 都 就 而 被 把 对 为 于 之 其 这 那 有 中 上 下 个".split()
    + "吗 呢 啊 吧 什么 哪些 哪 如何 怎么 怎样 为什么 是否".split()
)
_STOP |= set("the a an of to in on for and or is are was were be been what which who whom how why does do did "
             "it its this that these those with by as at from according text document documents".split())


def tokenize(text: str) -> list[str]:
    """BM25 tokens: jieba words for Chinese, lower-cased words for English, no punctuation or stop words."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    text = unicodedata.normalize("NFKC", text).lower()
    return [t for t in (w.strip() for w in jieba.cut(text)) if t and _WORD.search(t) and t not in _STOP]


@dataclass
class IngestReport:
    files_added: int = 0
    files_changed: int = 0
    files_removed: int = 0
    files_unchanged: int = 0
    chunks_embedded: int = 0
    chunks_removed: int = 0
    chunks_total: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0


@dataclass
class Progress:
    """Hooks the CLI fills with a rich progress bar; the library stays silent by default."""

    files: Callable[[int, int, str], None] = lambda done, total, name: None
    chunks: Callable[[int, int], None] = lambda done, total: None
    warn: Callable[[str], None] = lambda msg: None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Index:
    """One index directory: `state.sqlite` (+ `chroma/` when the vector store is embedded)."""

    def __init__(self, settings: Settings, embedder: Any = None) -> None:
        self.settings = settings
        self.dir = settings.index_dir
        self.state_path = self.dir / "state.sqlite"
        self._embedder: Any = embedder  # injectable, so several indexes in one process share one model
        self._store: Any = None
        self._chunks: dict[str, Chunk] | None = None
        self._bm25: Any = None
        self._bm25_ids: list[str] = []

    # ---- state -------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.state_path.is_file()

    def _connect(self, create: bool = False) -> sqlite3.Connection:
        if not create and not self.exists():
            raise RagqaError(f"no index at {self.dir}; run: ragqa ingest [PATH]")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.state_path, timeout=30, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, sha256 TEXT, size INTEGER, n_chunks INTEGER);
                CREATE TABLE IF NOT EXISTS chunks(
                    id TEXT PRIMARY KEY, source TEXT, start INTEGER, "end" INTEGER, heading TEXT,
                    start_line INTEGER, end_line INTEGER, text TEXT, tokens TEXT, page INTEGER);
                CREATE INDEX IF NOT EXISTS chunks_source ON chunks(source);
                """
            )
            _add_page_column(con)
            con.execute("SELECT count(*) FROM chunks").fetchone()
        except sqlite3.DatabaseError as exc:
            raise RagqaError(
                f"index at {self.dir} is corrupt ({exc}); rebuild it with: ragqa ingest --rebuild [PATH]"
            ) from None
        except OSError as exc:
            raise RagqaError(f"cannot open index at {self.dir}: {exc.strerror}") from None
        return con

    def meta(self) -> dict[str, str]:
        con = self._connect()
        try:
            return dict(con.execute("SELECT key, value FROM meta").fetchall())
        finally:
            con.close()

    def files(self) -> dict[str, tuple[str, int]]:
        con = self._connect()
        try:
            return {p: (s, n) for p, s, n in con.execute("SELECT path, sha256, n_chunks FROM files")}
        finally:
            con.close()

    def load_chunks(self) -> dict[str, Chunk]:
        """All live chunks, read in one snapshot."""
        if self._chunks is None:
            con = self._connect()
            try:
                con.execute("BEGIN")
                rows = con.execute(
                    'SELECT id, source, start, "end", text, heading, start_line, end_line, tokens, page FROM chunks'
                ).fetchall()
                con.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                raise RagqaError(f"index at {self.dir} is corrupt ({exc}); run: ragqa ingest --rebuild") from None
            finally:
                con.close()
            self._chunks = {r[0]: Chunk(*r[:8], page=r[9]) for r in rows}
            self._tokens = {r[0]: json.loads(r[8]) for r in rows}
        return self._chunks

    @property
    def splitter(self) -> str:
        return "langchain-default" if self.settings.pipeline == "baseline" else "ragqa"

    def stale_reason(self, paths: list[Path]) -> str | None:
        """Why the index does not reflect `paths` (missing, other settings, files added/changed/removed)."""
        if not self.exists():
            return f"no index at {self.dir}"
        meta = self.meta()
        wanted = {"embedder": self.settings.embedder, "chunk_size": str(self.settings.chunk_size),
                  "chunk_overlap": str(self.settings.chunk_overlap), "splitter": self.splitter}
        for key, value in wanted.items():
            if meta.get(key) != value:
                return f"index was built with {key}={meta.get(key)}, settings say {value}"
        known = self.files()
        roots = [p.resolve() for p in paths]
        current = {str(p): _sha256(p.read_bytes()) for p in iter_files(paths)}
        for path, digest in current.items():
            if path not in known:
                return f"{Path(path).name} is not indexed"
            if known[path][0] != digest:
                return f"{Path(path).name} changed since it was indexed"
        for path in known:
            if path not in current and any(Path(path).is_relative_to(r) for r in roots):
                return f"{Path(path).name} was deleted"
        return None

    # ---- embedder and vector store -----------------------------------------------------------------
    def check_embedder(self) -> None:
        built_with = self.meta().get("embedder")
        if built_with and built_with != self.settings.embedder:
            raise RagqaError(
                f"index {self.dir} was built with embedder '{built_with}', not '{self.settings.embedder}'; "
                f"use --embedder {built_with}, or re-ingest with --rebuild to switch"
            )

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from ragqa.embed import load_embedder

            self._embedder = load_embedder(
                self.settings.embedder,
                self.settings.models_dir,
                batch_size=self.settings.embed_batch_size,
                threads=self.settings.n_threads,
            )
        return self._embedder

    def _collection_name(self) -> str:
        digest = hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:10]
        return f"ragqa-{digest}"

    @property
    def store(self) -> Any:
        """LangChain's Chroma vector store over an embedded client, or an HTTP client for `chroma run`."""
        if self._store is None:
            import chromadb
            from chromadb.config import Settings as ChromaSettings
            from langchain_chroma import Chroma

            chroma_settings = ChromaSettings(anonymized_telemetry=False)
            try:
                if self.settings.chroma_url:
                    client = _http_client(self.settings, chroma_settings)
                else:
                    client = chromadb.PersistentClient(path=str(self.dir / "chroma"), settings=chroma_settings)
                self._store = Chroma(
                    collection_name=self._collection_name(),
                    embedding_function=_LazyEmbeddings(self),
                    client=client,
                    collection_metadata={"hnsw:space": "cosine"},
                )
            except RagqaError:
                raise
            except Exception as exc:
                where = self.settings.chroma_url or self.dir / "chroma"
                raise RagqaError(f"cannot open the vector store at {where}: {str(exc).splitlines()[0][:200]}") from None
        return self._store

    # ---- ingest ------------------------------------------------------------------------------------
    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.dir / ".lock", "w")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RagqaError(f"another ingest is running on {self.dir}; wait for it to finish") from None
            yield
        finally:
            fh.close()

    def ingest(self, paths: list[Path], progress: Progress | None = None, rebuild: bool = False) -> IngestReport:
        """Bring the index in line with the files under `paths`: add new, replace changed, drop deleted."""
        progress = progress or Progress()
        t0 = time.perf_counter()
        report = IngestReport()
        roots = [p.resolve() for p in paths]
        for p in paths:
            if not p.exists():
                raise RagqaError(f"path {p} does not exist")
        with self._writer_lock():
            if rebuild:
                self._wipe()
            con = self._connect(create=True)
            try:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
                settings_meta = {
                    "schema": str(SCHEMA_VERSION),
                    "embedder": self.settings.embedder,
                    "chunk_size": str(self.settings.chunk_size),
                    "chunk_overlap": str(self.settings.chunk_overlap),
                    "splitter": self.splitter,
                }
                if meta.get("embedder") and meta["embedder"] != self.settings.embedder:
                    raise RagqaError(
                        f"index {self.dir} was built with embedder '{meta['embedder']}'; "
                        f"re-ingest with --rebuild to switch to '{self.settings.embedder}'"
                    )
                # A change of chunking invalidates every file's chunks: treat all as changed.
                same_chunking = all(meta.get(k) == v for k, v in settings_meta.items()) if meta else True
                known = {p: s for p, s, _ in con.execute("SELECT path, sha256, n_chunks FROM files")}
                files = list(iter_files(paths))
                plan: list[tuple[str, str, Document]] = []  # (path, sha, extracted text)
                seen: set[str] = set()
                unusable: set[str] = set()  # present but unreadable now: their old chunks must go too
                not_text: list[tuple[str, str]] = []  # remembered, so an unchanged binary is not re-read
                for i, path in enumerate(files):
                    progress.files(i, len(files), path.name)
                    key = str(path)
                    seen.add(key)
                    try:
                        data = path.read_bytes()
                    except OSError as exc:
                        report.skipped.append(f"{path}: cannot read ({exc.strerror})")
                        progress.warn(report.skipped[-1])
                        unusable.add(key)
                        continue
                    digest = _sha256(data)
                    if known.get(key) == digest and same_chunking:
                        report.files_unchanged += 1
                        continue
                    try:
                        doc = load_document(path, data)
                    except SkipFile as exc:
                        report.skipped.append(str(exc))
                        progress.warn(str(exc))
                        unusable.add(key)
                        not_text.append((key, digest))
                        continue
                    for warning in doc.warnings:
                        progress.warn(warning)
                    plan.append((key, digest, doc))
                progress.files(len(files), len(files), "")
                # Gone: under a root we scanned and not seen, or no longer on disk at all (a folder that was
                # deleted or moved away since an earlier ingest leaves no vectors behind either).
                removed = [
                    p for p in known
                    if p in unusable
                    or (p not in seen and (any(Path(p).is_relative_to(r) for r in roots) or not Path(p).exists()))
                ]

                new_chunks: list[Chunk] = []
                for key, digest, doc in plan:
                    new_chunks.extend(
                        split_document(doc, key, self.settings.chunk_size, self.settings.chunk_overlap, digest,
                                       default_separators=self.splitter == "langchain-default")
                    )
                if new_chunks:
                    te = time.perf_counter()
                    self._add_vectors(new_chunks, progress)
                    report.embed_seconds = time.perf_counter() - te
                report.chunks_embedded = len(new_chunks)

                # The commit point: one transaction swaps the old state for the new one.
                con.execute("BEGIN IMMEDIATE")
                changed_paths = [k for k, _, _ in plan] + removed
                for p in changed_paths:
                    report.chunks_removed += con.execute("DELETE FROM chunks WHERE source = ?", (p,)).rowcount
                    con.execute("DELETE FROM files WHERE path = ?", (p,))
                con.executemany(
                    'INSERT OR REPLACE INTO chunks(id, source, start, "end", heading, start_line, end_line, text, '
                    "tokens, page) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    [
                        (c.id, c.source, c.start, c.end, c.heading, c.start_line, c.end_line, c.text,
                         json.dumps(tokenize(f"{c.heading}\n{c.text}"), ensure_ascii=False), c.page)
                        for c in new_chunks
                    ],
                )
                counts: dict[str, int] = {}
                for c in new_chunks:
                    counts[c.source] = counts.get(c.source, 0) + 1
                con.executemany(
                    "INSERT OR REPLACE INTO files VALUES (?,?,?,?)",
                    [(k, d, len(t.text.encode("utf-8", "surrogatepass")), counts.get(k, 0)) for k, d, t in plan],
                )
                con.executemany("INSERT OR REPLACE INTO files VALUES (?,?,0,-1)", not_text)
                con.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", list(settings_meta.items()))
                con.execute("COMMIT")
                for key in (k for k, _, _ in plan):
                    if key in known:
                        report.files_changed += 1
                    else:
                        report.files_added += 1
                report.files_removed = len([p for p in removed if p not in unusable])
                live = {r[0] for r in con.execute("SELECT id FROM chunks")}
                report.chunks_total = len(live)
            finally:
                con.close()
            self._collect_garbage(live)
        self._chunks = None
        self._bm25 = None
        report.seconds = time.perf_counter() - t0
        return report

    def _add_vectors(self, chunks: list[Chunk], progress: Progress) -> None:
        batch = max(1, self.settings.embed_batch_size)
        # Longest first within the run keeps padding waste low in each batch (sentence-transformers pads
        # every batch to its longest member).
        order = sorted(chunks, key=lambda c: len(c.text), reverse=True)
        progress.chunks(0, len(order))
        for i in range(0, len(order), batch):
            part = order[i : i + batch]
            try:
                self.store.add_texts(
                    texts=[c.text for c in part],
                    metadatas=[c.metadata for c in part],
                    ids=[c.id for c in part],
                )
            except RagqaError:
                raise
            except Exception as exc:
                raise RagqaError(f"writing vectors failed: {str(exc).splitlines()[0][:200]}") from None
            progress.chunks(min(i + batch, len(order)), len(order))

    def _collect_garbage(self, live: set[str]) -> None:
        """Delete vectors that no committed state refers to (replaced files, deleted files, crashed runs)."""
        collection = self.store._collection  # ids-only listing is not part of the LangChain interface
        stale: list[str] = []
        offset = 0
        while True:
            got = collection.get(include=[], limit=5000, offset=offset)
            ids = got["ids"]
            if not ids:
                break
            stale.extend(i for i in ids if i not in live)
            offset += len(ids)
        for i in range(0, len(stale), 5000):
            collection.delete(ids=stale[i : i + 5000])

    def _wipe(self) -> None:
        """--rebuild: start from nothing (also the way out of a corrupt index)."""
        if self.settings.chroma_url:
            try:
                self.store.delete_collection()
            except Exception:  # noqa: BLE001 - a missing collection is fine here
                pass
            self._store = None
        for name in ("state.sqlite", "state.sqlite-wal", "state.sqlite-shm"):
            (self.dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir / "chroma", ignore_errors=True)
        self._store = None

    # ---- search ------------------------------------------------------------------------------------
    def dense_search(self, query_vector: list[float], k: int) -> list[tuple[str, float]]:
        """(chunk id, cosine similarity), best first, live chunks only."""
        live = self.load_chunks()
        if not live:
            return []
        # Over-fetch a little: orphans of an interrupted ingest may take some of the top places.
        want = min(len(live), k) + 8
        try:
            hits = self.store.similarity_search_by_vector_with_relevance_scores(query_vector, k=want)
        except Exception as exc:
            raise RagqaError(f"vector search failed: {str(exc).splitlines()[0][:200]}") from None
        out = []
        for doc, distance in hits:
            if doc.id in live:
                out.append((doc.id, 1.0 - float(distance)))
        return out[:k]

    def bm25_search(self, query: str, k: int) -> list[tuple[str, float]]:
        chunks = self.load_chunks()
        if not chunks:
            return []
        if self._bm25 is None:
            from rank_bm25 import BM25Okapi

            self._bm25_ids = list(chunks)
            self._bm25 = BM25Okapi([self._tokens[i] or ["\0"] for i in self._bm25_ids])
        q = tokenize(query)
        if not q:
            return []
        import numpy as np

        scores = self._bm25.get_scores(q)
        top = np.argsort(-scores)[:k]
        return [(self._bm25_ids[i], float(scores[i])) for i in top if scores[i] > 0]


def _add_page_column(con: sqlite3.Connection) -> None:
    """Indexes built before PDF support lack `chunks.page`; their chunks are all unpaged (NULL)."""
    if "page" in {row[1] for row in con.execute("PRAGMA table_info(chunks)")}:
        return
    try:
        con.execute("ALTER TABLE chunks ADD COLUMN page INTEGER")
    except sqlite3.OperationalError as exc:
        if "duplicate column" not in str(exc):  # another process migrated it first
            raise


class _LazyEmbeddings:
    """Loads the embedder on first use, so opening the store for ids-only work (a no-change re-ingest,
    garbage collection) does not pay the seconds an embedding model takes to load."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.index.embedder.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.index.embedder.embed_query(text)


def _http_client(settings: Settings, chroma_settings: Any) -> Any:
    from urllib.parse import urlparse

    import chromadb

    url = urlparse(settings.chroma_url or "")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise RagqaError(f"--chroma-url must look like http://HOST:PORT, got {settings.chroma_url!r}")
    headers = {}
    if settings.chroma_token_env:
        token = os.environ.get(settings.chroma_token_env)
        if not token:
            raise RagqaError(f"environment variable {settings.chroma_token_env} (chroma token) is not set")
        headers["Authorization"] = f"Bearer {token}"
    try:
        return chromadb.HttpClient(
            host=url.hostname,
            port=url.port or (443 if url.scheme == "https" else 8000),
            ssl=url.scheme == "https",
            headers=headers,
            settings=chroma_settings,
        )
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160]
        raise RagqaError(f"cannot reach Chroma server at {settings.chroma_url}: {reason}") from None
