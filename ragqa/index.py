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
import tempfile
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragqa.config import Settings
from ragqa.errors import RagqaError, storage_error
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
    jieba = load_jieba()
    text = unicodedata.normalize("NFKC", text).lower()
    return [t for t in (w.strip() for w in jieba.cut(text)) if t and _WORD.search(t) and t not in _STOP]


def load_jieba() -> Any:
    """jieba, its dictionary loaded.

    Why not `jieba.initialize()`: it reads its prefix dictionary (498k entries) from a marshal cache, 0.6 s of
    every cold `ragqa ask`. The same dictionary as one word list plus a numpy array of counts loads in ~0.2 s.
    That copy sits beside jieba's own cache (same directory, same trust, no pickle), named after jieba's
    version and the size and mtime of its dictionary; anything wrong with it and jieba loads its own way.
    Only the default dictionary is handled: a custom one (`jieba.set_dictionary`) goes through jieba.
    """
    import jieba
    import numpy as np

    jieba.setLogLevel(logging.WARNING)
    dt = jieba.dt
    if dt.initialized or dt.dictionary != jieba.DEFAULT_DICT or dt.cache_file:
        return jieba
    with dt.lock:
        if dt.initialized:
            return jieba
        try:
            source = os.stat(Path(jieba.__file__).parent / jieba.DEFAULT_DICT_NAME)
        except OSError:
            return jieba
        cache = Path(dt.tmp_dir or tempfile.gettempdir()) / (
            f"ragqa-jieba-{jieba.__version__}-{source.st_size}-{source.st_mtime_ns}.npz")
        try:
            with np.load(cache, allow_pickle=False) as saved:
                words = saved["words"].tobytes().decode("utf-8").split("\n")
                counts = saved["counts"]
                total = int(saved["total"])
            if len(words) != len(counts):  # (the counts do not sum to total: dict.txt repeats a few words)
                raise ValueError("inconsistent dictionary cache")
            dt.FREQ, dt.total, dt.initialized = dict(zip(words, counts.tolist(), strict=True)), total, True
            return jieba
        except Exception:  # noqa: BLE001 - missing, truncated (BadZipFile) or foreign: jieba loads its own way
            pass
        dt.initialize()
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, words=np.frombuffer("\n".join(dt.FREQ).encode("utf-8"), dtype=np.uint8),
                         counts=np.fromiter(dt.FREQ.values(), dtype=np.int64, count=len(dt.FREQ)),
                         total=np.int64(dt.total))
            os.replace(tmp, cache)
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only or full temp dir costs the next process 0.4 s, nothing else
    return jieba


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
        self._collection: str | None = None
        self._checked_vectors = False
        self._chunks: dict[str, Chunk] | None = None
        self._generation: str | None = None  # the committed state the loaded chunks are (see `changed`)
        self._watch: sqlite3.Connection | None = None
        self._watch_inode: int | None = None
        self._seen_version = 0
        self._reading = threading.Lock()
        self._bm25: Any = None
        self._bm25_ids: list[str] = []

    # ---- state -------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.state_path.is_file()

    def _connect(self, create: bool = False, shared: bool = False) -> sqlite3.Connection:
        if not create and not self.exists():
            raise RagqaError(f"no index at {self.dir}; run: ragqa ingest [PATH]")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.state_path, timeout=30, isolation_level=None, check_same_thread=not shared)
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
        except (sqlite3.DatabaseError, OSError) as exc:
            raise self._open_error(exc) from None
        return con

    def _open_error(self, exc: BaseException) -> RagqaError:
        """A full disk or read-only place says so; anything else SQLite cannot read is corruption."""
        return storage_error(exc, self.dir, "opening the index") or RagqaError(
            f"index at {self.dir} is corrupt or unreadable ({(str(exc).splitlines() or [''])[0][:120]}); "
            "rebuild it with: ragqa ingest --rebuild [PATH]"
        )

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
        """All live chunks, read in one snapshot (kept: see `changed` for when to read them again)."""
        with self._reading:
            if self._chunks is None:
                self._read_chunks()
        return self._chunks

    def _read_chunks(self) -> None:
        if self._watch is None:
            # Kept open (serve's worker threads share it, under `_reading`): `changed` asks it for SQLite's
            # data_version, which moves only for commits made after this connection opened.
            self._watch = self._connect(shared=True)
            self._watch_inode = _inode(self.state_path)
        con = self._watch
        try:
            self._seen_version = con.execute("PRAGMA data_version").fetchone()[0]
            con.execute("BEGIN")
            rows = con.execute(
                'SELECT id, source, start, "end", text, heading, start_line, end_line, tokens, page FROM chunks'
            ).fetchall()
            self._generation = self._read_generation(con)
            con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            self.close()
            raise self._open_error(exc) from None
        self._chunks = {r[0]: Chunk(*r[:8], page=r[9]) for r in rows}
        self._tokens = {r[0]: json.loads(r[8]) for r in rows}

    @staticmethod
    def _read_generation(con: sqlite3.Connection) -> str | None:
        row = con.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return row[0] if row else None

    def changed(self) -> bool:
        """Whether an ingest has committed another state since the chunks were loaded.

        A process that answers many questions (chat, serve) must not keep answering from a state whose
        vectors the ingest's garbage collection is deleting. SQLite's data_version moves on any other
        connection's commit and costs microseconds to read; only then is the generation compared.
        """
        with self._reading:
            return self._changed()

    def _changed(self) -> bool:
        if self._chunks is None or self._watch is None:
            return False
        if _inode(self.state_path) != self._watch_inode:
            # `ingest --rebuild` replaced the state and the vector store under this process; an embedded
            # Chroma client keeps the deleted files open (chromadb caches one client per path and process),
            # so reopening here would read the old vectors. Say so instead of answering from them.
            self.close()
            raise RagqaError(f"the index at {self.dir} was rebuilt by another process; start this command again")
        try:
            version = self._watch.execute("PRAGMA data_version").fetchone()[0]
            if version == self._seen_version:
                return False
            if self._read_generation(self._watch) != self._generation:
                return True  # until `refresh`: load_chunks then takes the new version and generation
            self._seen_version = version  # a commit that changed no chunks (a no-change ingest)
            return False
        except sqlite3.DatabaseError:
            return True  # unreadable now: read it again, and fail there with the usual line

    def refresh(self) -> None:
        """Forget the loaded chunks and BM25, so the next search reads the committed state."""
        self._chunks = None
        self._bm25 = None

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None

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
        meta = self.meta()
        built_with = meta.get("embedder")
        if built_with and built_with != self.settings.embedder:
            raise RagqaError(
                f"index {self.dir} was built with embedder '{built_with}', not '{self.settings.embedder}'; "
                f"use --embedder {built_with}, or re-ingest with --rebuild to switch"
            )
        self._check_precision(meta)

    def _check_precision(self, meta: dict[str, str]) -> None:
        """int8 and fp32 vectors of one model are close, not equal: a query of the one against chunks of the
        other, or a store holding both, would rank silently worse, so a mismatch stops with one line."""
        if not meta.get("embedder"):
            return  # nothing built yet
        built = meta.get("embed_precision") or "fp32"  # indexes from before the setting hold fp32 vectors
        wanted = self.settings.embed_precision
        if built != wanted:
            raise RagqaError(
                f"index {self.dir} holds {built} vectors of {meta['embedder']}, but embed_precision is {wanted}; "
                f"re-ingest with --rebuild to switch, or set embed_precision = \"{built}\""
            )

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from ragqa.embed import from_settings

            self._embedder = from_settings(self.settings)
        return self._embedder

    def _legacy_collection_name(self) -> str:
        """The name indexes built before the name was stored in the state use (derived from the path)."""
        digest = hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:10]
        return f"ragqa-{digest}"

    def _collection_name(self) -> str:
        """The collection named in the state: random per index, so indexes of two machines that share a
        Chroma server (even at the same path) never share a collection, and a moved index keeps its own."""
        if self._collection is None:
            name = self.meta().get("collection") if self.exists() else None
            self._collection = name or self._legacy_collection_name()
        return self._collection

    def _where(self) -> str:
        return self.settings.chroma_url or str(self.dir / "chroma")

    @contextmanager
    def _vector_op(self, action: str) -> Iterator[None]:
        """Every call into the vector store: a lost server becomes one clear line, not a traceback."""
        try:
            yield
        except RagqaError:
            raise
        except Exception as exc:  # noqa: BLE001 - chromadb and httpx raise many unrelated types
            if self.settings.chroma_url and _is_unreachable(exc):
                raise RagqaError(
                    f"cannot reach the Chroma server at {self.settings.chroma_url} ({_first_line(exc)}); "
                    f"is `chroma run` up?"
                ) from None
            raise self._store_error(exc, action) from None

    def vector_ids(self) -> set[str]:
        """Every id in this index's collection, live or orphan (ids only: nothing is embedded)."""
        collection = self.store._collection  # ids-only listing is not part of the LangChain interface
        ids: set[str] = set()
        offset = 0
        with self._vector_op("listing vectors"):
            while True:
                got = collection.get(include=[], limit=5000, offset=offset)["ids"]
                if not got:
                    return ids
                ids.update(got)
                offset += len(got)

    @property
    def store(self) -> Any:
        """LangChain's Chroma vector store over an embedded client, or an HTTP client for `chroma run`."""
        if self._store is None:
            import chromadb
            from chromadb.config import Settings as ChromaSettings
            from langchain_chroma import Chroma

            chroma_settings = ChromaSettings(anonymized_telemetry=False)
            with self._vector_op(f"opening the vector store at {self._where()}"):
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
        return self._store

    def _store_error(self, exc: BaseException, action: str = "using the vector store") -> RagqaError:
        """Chroma's failures as one line: full disk / read-only place, a failed write, else a damaged store
        and the way out."""
        first = _first_line(exc)
        if self.settings.chroma_url:
            return RagqaError(f"{action} failed on the Chroma server at {self.settings.chroma_url}: {first}")
        known = storage_error(exc, self.dir / "chroma", action)
        if known:
            return known
        if action.startswith(("writing", "deleting")):
            return RagqaError(f"{action} failed: {first}")
        return RagqaError(
            f"vector store of index {self.dir} is corrupt or unreadable ({first}); "
            "rebuild it with: ragqa ingest --rebuild [PATH]"
        )

    # ---- ingest ------------------------------------------------------------------------------------
    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.dir / ".lock", "w")
        except OSError as exc:
            raise storage_error(exc, self.dir, "ingest") or RagqaError(
                f"cannot create index at {self.dir}: {exc.strerror}") from None
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
        with self._writer_lock(), _WriteGuard(self, rebuild) as guard:
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
                self._check_precision(meta)
                # A change of chunking invalidates every file's chunks: treat all as changed.
                same_chunking = all(meta.get(k) == v for k, v in settings_meta.items()) if meta else True
                settings_meta["embed_precision"] = self.settings.embed_precision  # equal, or stopped above
                known = {p: s for p, s, _ in con.execute("SELECT path, sha256, n_chunks FROM files")}
                if meta.get("collection"):
                    self._collection = meta["collection"]
                else:
                    # Named before any vector is written, so vectors of a crashed first run are not
                    # stranded in a collection no state refers to.
                    name = self._legacy_collection_name() if known else f"ragqa-{uuid.uuid4().hex[:16]}"
                    con.execute("INSERT OR REPLACE INTO meta VALUES ('collection', ?)", (name,))
                    self._collection, self._store = name, None
                # Listed once: unchanged files whose vectors the store lost (a server reset, a deleted
                # chroma/ folder) are embedded again, and whatever is not live afterwards is garbage.
                present = self.vector_ids()
                self._check_store(len(present))
                live_by_file: dict[str, list[str]] = {}
                for cid, src in con.execute("SELECT id, source FROM chunks"):
                    live_by_file.setdefault(src, []).append(cid)
                restored = 0
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
                        if all(i in present for i in live_by_file.get(key, ())):
                            report.files_unchanged += 1
                            continue
                        restored += 1
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
                if restored:
                    progress.warn(f"{restored} unchanged file(s) had vectors missing from {self._where()}; "
                                  "embedding them again")
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
                if changed_paths or new_chunks:
                    generation = int(self._read_generation(con) or 0) + 1
                    con.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (str(generation),))
                con.execute("COMMIT")
                guard.committed = True
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
            self._collect_garbage(present - live, progress)
        self.refresh()
        report.seconds = time.perf_counter() - t0
        return report

    def _check_store(self, n_present: int) -> None:
        """Refuse to build on a damaged vector store: Chroma answers a broken HNSW segment with silence, and
        an ingest that only adds to it would leave an index that looks fine and finds nothing. An empty
        collection is not damage: the lost vectors are embedded again (see `present` in ingest)."""
        if not n_present:
            return
        with self._vector_op("checking the vector store"):
            collection = self.store._collection
            got = collection.get(limit=1, include=["embeddings"])
            found = bool(got["ids"]) and bool(
                collection.query(query_embeddings=[got["embeddings"][0]], n_results=1, include=[])["ids"][0])
        if not found:
            raise self._store_error(RuntimeError(f"no vectors found for {n_present} stored vectors"))

    def _add_vectors(self, chunks: list[Chunk], progress: Progress) -> None:
        batch = max(1, self.settings.embed_batch_size)
        # Longest first within the run keeps padding waste low in each batch (sentence-transformers pads
        # every batch to its longest member).
        order = sorted(chunks, key=lambda c: len(c.text), reverse=True)
        progress.chunks(0, len(order))
        for i in range(0, len(order), batch):
            part = order[i : i + batch]
            with self._vector_op("writing vectors"):
                self.store.add_texts(
                    texts=[c.text for c in part],
                    metadatas=[c.metadata for c in part],
                    ids=[c.id for c in part],
                )
            progress.chunks(min(i + batch, len(order)), len(order))

    def _collect_garbage(self, stale: set[str], progress: Progress | None = None) -> None:
        """Delete vectors that no committed state refers to (replaced files, deleted files, crashed runs).

        Runs after the commit: if it fails (say the disk filled up), the new state still stands and the
        leftovers are invisible to queries, so a warning is enough; the next ingest removes them.
        """
        ids = sorted(stale)
        try:
            with self._vector_op("deleting old vectors"):
                for i in range(0, len(ids), 5000):
                    self.store._collection.delete(ids=ids[i : i + 5000])
        except RagqaError as exc:
            if progress is None:
                raise
            progress.warn(f"old vectors not removed yet ({exc}); the next ingest removes them")

    def _wipe(self) -> None:
        """--rebuild: start from nothing (also the way out of a corrupt index, and the undo of a failed
        first ingest)."""
        self.close()
        self.refresh()
        if self.settings.chroma_url:
            try:
                self.store.delete_collection()
            except Exception:  # noqa: BLE001 - a missing collection (or server) is fine here
                pass
        self._store, self._collection = None, None
        for name in ("state.sqlite", "state.sqlite-wal", "state.sqlite-shm"):
            (self.dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir / "chroma", ignore_errors=True)

    # ---- search ------------------------------------------------------------------------------------
    def dense_search(self, query_vector: list[float], k: int) -> list[tuple[str, float]]:
        """(chunk id, cosine similarity), best first, live chunks only."""
        live = self.load_chunks()
        if not live:
            return []
        # Over-fetch a little: vectors no committed state refers to (an ingest still running, or one that was
        # interrupted) may take some of the top places. While a re-ingest of similar text runs they can take
        # all of them, so fetch more until enough live ones come back or the collection has no more.
        need = min(len(live), k)
        want = need + 8
        with self._vector_op("vector search"):
            if not self._checked_vectors:
                # An empty collection under a non-empty state means the store was reset or replaced
                # (a new `chroma run --path`): say so, instead of answering from BM25 alone.
                if self.store._collection.count() == 0:
                    raise RagqaError(
                        f"the vector store at {self._where()} has no vectors for this index "
                        f"(collection {self._collection_name()}); run: ragqa ingest [PATH] to restore them"
                    )
                self._checked_vectors = True
            while True:
                hits = self.store.similarity_search_by_vector_with_relevance_scores(query_vector, k=want)
                if not hits:
                    # A collection holding live chunks always returns something; Chroma answers a damaged
                    # HNSW segment with silence, which must not pass for "no match".
                    raise self._store_error(RuntimeError(f"no vectors found for {len(live)} indexed chunks"))
                out = [(doc.id, 1.0 - float(distance)) for doc, distance in hits if doc.id in live]
                if len(out) >= need or len(hits) < want:
                    return out[:k]
                want *= 4

    def bm25_search(self, query: str, k: int) -> list[tuple[str, float]]:
        chunks = self.load_chunks()
        if not chunks:
            return []
        if self._bm25 is None:
            from ragqa.bm25 import BM25  # rank_bm25's scores over an inverted index (O(postings), not O(N))

            self._bm25_ids = list(chunks)
            self._bm25 = BM25([self._tokens[i] or ["\0"] for i in self._bm25_ids])
        q = tokenize(query)
        if not q:
            return []
        return [(self._bm25_ids[i], score) for i, score in self._bm25.top_k(q, k)]


class _WriteGuard:
    """Turns storage failures during an ingest into one line, and undoes a first ingest that fails.

    A first ingest that fails before its commit (full disk, read-only place, Ctrl-C, a bad file) leaves no
    index behind that would look complete or fail to open later; a failing re-ingest needs no undo, since
    the previous state is still the committed one.
    """

    def __init__(self, index: Index, rebuild: bool) -> None:
        self.index = index
        self.rebuild = rebuild
        self.fresh = False
        self.committed = False

    def __enter__(self) -> _WriteGuard:
        try:
            if self.rebuild:
                self.index._wipe()
        except OSError as exc:
            raise storage_error(exc, self.index.dir, "--rebuild") or self.index._open_error(exc) from None
        self.fresh = not self.index.exists()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return
        if self.fresh and not self.committed:
            try:
                self.index._wipe()
            except OSError:
                pass  # the original failure is the one worth reporting
        if isinstance(exc, OSError | sqlite3.DatabaseError):
            raise (storage_error(exc, self.index.dir, "ingest") or self.index._open_error(exc)) from None


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


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


# Bounds on every request to a Chroma server: chromadb's own HTTP client waits forever (timeout=None),
# so a hung or firewalled server would hang `ragqa ask` with it.
CONNECT_TIMEOUT_S = 5.0
HEARTBEAT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 60.0


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200] or type(exc).__name__


def _is_unreachable(exc: BaseException) -> bool:
    """Connection refused, reset or timed out (httpx), or chromadb's own "Could not connect" wrapper."""
    import httpx

    return isinstance(exc, httpx.TransportError | ConnectionError) or "Could not connect" in str(exc)


def _token_headers(settings: Settings) -> dict[str, str]:
    """The token as both headers Chroma's token auth knows; the `chroma run` server itself checks neither
    (Chroma 1.x has no server-side auth), so a proxy in front of it (Envoy, nginx) does, with either one."""
    if not settings.chroma_token_env:
        return {}
    token = os.environ.get(settings.chroma_token_env)
    if not token:
        raise RagqaError(f"environment variable {settings.chroma_token_env} (the Chroma token) is not set")
    return {"Authorization": f"Bearer {token}", "X-Chroma-Token": token}


def _http_client(settings: Settings, chroma_settings: Any) -> Any:
    """A chromadb HttpClient, after a bounded heartbeat: a down server fails in seconds with one line."""
    from urllib.parse import urlparse

    import chromadb
    import httpx

    raw = settings.chroma_url or ""
    url = urlparse(raw)
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
        raise RagqaError(f"--chroma-url must look like http://HOST:PORT, got {raw!r}")
    try:
        port = url.port or (443 if url.scheme == "https" else 8000)
    except ValueError:
        raise RagqaError(f"--chroma-url has an invalid port: {raw!r}") from None
    headers = _token_headers(settings)
    base = f"{url.scheme}://{url.hostname}:{port}"
    try:
        resp = httpx.get(f"{base}/api/v2/heartbeat", headers=headers,
                         timeout=httpx.Timeout(HEARTBEAT_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
    except httpx.HTTPError as exc:
        raise RagqaError(
            f"cannot reach the Chroma server at {raw} ({_first_line(exc)}); start it with: "
            f"chroma run --path DIR --port {port}"
        ) from None
    if resp.status_code in (401, 403):
        hint = (f"check the token in ${settings.chroma_token_env}" if settings.chroma_token_env
                else "set chroma_token_env to the name of the variable holding the token")
        raise RagqaError(f"the Chroma server at {raw} refused the request (HTTP {resp.status_code}); {hint}")
    if resp.status_code != 200 or "heartbeat" not in resp.text:
        raise RagqaError(
            f"{raw} does not answer like a Chroma 1.x server (HTTP {resp.status_code} on /api/v2/heartbeat)"
        )
    client = chromadb.HttpClient(
        host=url.hostname, port=port, ssl=url.scheme == "https", headers=headers, settings=chroma_settings
    )
    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):  # private in chromadb 1.5; without it requests stay unbounded
        session.timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    return client
