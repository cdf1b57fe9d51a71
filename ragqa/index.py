"""The index: chunk vectors in Chroma, chunk text + BM25 tokens + file state in SQLite, kept in step.

Crash safety comes from one rule: the SQLite state is the only record of which chunks are live, and it
changes in a single transaction *after* the new vectors are in Chroma. Ingest adds vectors under new ids
(ids hash the file's content), commits the state, then deletes vectors that are no longer live. A kill at
any point leaves either the old or the new state committed; vectors from the other one are orphans that
queries ignore (dense hits are filtered by the live ids) and the next ingest deletes. Readers see a
snapshot (SQLite WAL), so `ragqa ask` during an ingest reads the old or the new index, never a mix.

On a Chroma server (`chroma_url`) the server holds the whole index: the chunk text and its metadata sit with
the vectors, and a side collection `<name>__state` holds one "head" record (the committed file state, the live
chunk ids, the settings and a version id) and the writers' lease. The commit point there is the single upsert
of the head; the local `state.sqlite` is then a cache of the head, with BM25 tokens built from the server's
chunk text, rebuilt whenever the head's version differs. A second machine with an empty home fills its cache
from the server and answers from the same passages. Chroma's single-node server has no sparse (BM25) search
(its Search API and sparse indexes are Chroma Cloud / distributed only), hence the local postings.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
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

from ragqa.config import Settings, check_index_name
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
        self._sides: dict[str, Any] = {}  # collection name -> its `__state` collection on the server
        self._pulled = False  # the local cache was compared with the server's head since the last refresh
        self._server_version: str | None = None  # the head version the loaded chunks are
        if settings.index_name:
            check_index_name(settings.index_name)

    # ---- state -------------------------------------------------------------------------------------
    def exists(self) -> bool:
        if self.settings.chroma_url and not self._pulled:
            self._pull()
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
        if self.settings.chroma_url and not self._pulled:
            self._pull()
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
            row = con.execute("SELECT value FROM meta WHERE key = 'server_version'").fetchone()
            self._server_version = row[0] if row else None
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
        if self.settings.chroma_url and self._server_version is not None:
            # A writer on another machine commits on the server only: its head is the one to compare.
            try:
                head = self._read_head()
            except RagqaError:
                return False  # a lost server: the search that follows says so in one line
            return head is not None and head.get("version") != self._server_version
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
        self._pulled = False

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

    def files_outside(self, paths: list[Path]) -> list[str]:
        """Indexed files under none of `paths`: what else retrieval searches besides them (a copy of corpus/
        indexed from another clone, a user's folder), which changes what an eval of `paths` measures."""
        roots = [p.resolve() for p in paths]
        return sorted(f for f in self.files() if not any(Path(f).is_relative_to(r) for r in roots))

    # ---- embedder and vector store -----------------------------------------------------------------
    def check_embedder(self) -> None:
        meta = self.meta()
        built_with = meta.get("embedder")
        if built_with and built_with != self.settings.embedder:
            raise RagqaError(
                f"index {self._label()} was built with embedder '{built_with}', not '{self.settings.embedder}'; "
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
        """`index_name` when set (the name other machines attach by), else the collection named in the state:
        random per index, so indexes of two machines that share a Chroma server (even at the same path) never
        share a collection, and a moved index keeps its own."""
        if self._collection is None:
            if self.settings.index_name:
                self._collection = self.settings.index_name
            else:
                name = self._local_meta().get("collection")
                self._collection = name or self._legacy_collection_name()
        return self._collection

    def _label(self) -> str:
        if self.settings.chroma_url and self.settings.index_name:
            return f"'{self.settings.index_name}' on {self.settings.chroma_url}"
        return str(self.dir)

    def _local_meta(self) -> dict[str, str]:
        """The cached state's meta, without asking the server (empty when there is no local state)."""
        if not self.state_path.is_file():
            return {}
        con = self._connect(create=True)
        try:
            return dict(con.execute("SELECT key, value FROM meta").fetchall())
        finally:
            con.close()

    # ---- the index on a Chroma server ----------------------------------------------------------------
    def _side(self) -> Any:
        """The `<collection>__state` collection: the head (commit record) and the writers' lease."""
        name = self._collection_name()
        if name not in self._sides:
            client = self.store._client
            with self._vector_op("opening the index state on the server"):
                self._sides[name] = client.get_or_create_collection(f"{name}{STATE_SUFFIX}", embedding_function=None)
        return self._sides[name]

    def _read_head(self) -> dict[str, Any] | None:
        with self._vector_op("reading the index head"):
            got = self._side().get(ids=[HEAD_ID], include=["documents"])
        return json.loads(got["documents"][0]) if got["ids"] else None

    def _pull(self) -> None:
        """Make the local state a copy of the server's head, when their versions differ.

        The head is read first, then its chunks by id: if some are gone, a writer committed and collected
        them meanwhile, so the newer head is read and fetched instead; the cache holds one whole version.
        """
        self._pulled = True
        if not self.settings.index_name and not self.state_path.is_file():
            return  # nothing names an index on the server
        for _ in range(5):
            head = self._read_head()
            if head is None:
                return  # none published (a new index, or one from before heads): the local state stands
            local = self._local_meta()
            if local.get("server_version") == head["version"] and local.get("collection") == self._collection_name():
                return
            rows = self._fetch_chunks(head["chunks"])
            if rows is not None:
                self._write_cache(head, rows)
                return
            again = self._read_head()
            if again is not None and again["version"] == head["version"]:
                raise RagqaError(
                    f"the Chroma server at {self.settings.chroma_url} lacks chunks of index "
                    f"{self._collection_name()}'s committed version; run: ragqa ingest --rebuild [PATH]"
                )
        raise RagqaError(f"index {self._collection_name()} kept changing while it was read; try again")

    def _fetch_chunks(self, ids: list[str]) -> list[tuple[str, str, dict[str, Any]]] | None:
        """(id, text, metadata) of every id, or None when some are missing."""
        collection = self.store._collection
        rows: list[tuple[str, str, dict[str, Any]]] = []
        with self._vector_op("reading the index from the server"):
            for i in range(0, len(ids), 1000):
                got = collection.get(ids=ids[i : i + 1000], include=["documents", "metadatas"])
                rows.extend(zip(got["ids"], got["documents"], got["metadatas"], strict=True))
        return rows if len({r[0] for r in rows}) == len(set(ids)) else None

    def _write_cache(self, head: dict[str, Any], rows: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Replace the local state with the head's, in one transaction (BM25 tokens built here)."""
        chunks = []
        for cid, text, m in rows:
            heading = m.get("heading") or ""
            chunks.append((cid, m["source"], m["start"], m["end"], heading, m["start_line"], m["end_line"], text,
                           json.dumps(tokenize(f"{heading}\n{text}"), ensure_ascii=False), m.get("page")))
        meta = {**head["meta"], "generation": str(head["generation"]), "server_version": head["version"],
                "collection": self._collection_name()}
        con = self._connect(create=True)
        try:
            con.execute("BEGIN IMMEDIATE")
            for table in ("chunks", "files", "meta"):
                con.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names
            con.executemany("INSERT INTO meta VALUES (?,?)", list(meta.items()))
            con.executemany("INSERT INTO files VALUES (?,?,?,?)",
                            [(p, sha, size, n) for p, (sha, size, n) in head["files"].items()])
            con.executemany(
                'INSERT INTO chunks(id, source, start, "end", heading, start_line, end_line, text, tokens, page) '
                "VALUES (?,?,?,?,?,?,?,?,?,?)", chunks)
            con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise self._open_error(exc) from None
        finally:
            con.close()

    def _publish(self, con: sqlite3.Connection, lease: _Lease | None) -> None:
        """The commit point on a server: the state `con` is about to commit, as one head upsert.

        Called inside the local transaction, so a failed upsert rolls the local state back too; a kill after
        the upsert leaves a stale cache, which the next `_pull` replaces. The head is one JSON document, ~46 bytes
        a chunk (the 456 chunks of corpus/ make 21 KB); one upsert is what makes the commit atomic, so an index
        of a few hundred thousand chunks (a head of tens of MB, sent whole on every change) would want the id
        list kept in content-addressed records the head names, still committed by the one head upsert.
        """
        if lease is not None:
            lease.check()
        version = uuid.uuid4().hex
        con.execute("INSERT OR REPLACE INTO meta VALUES ('server_version', ?)", (version,))
        meta = {k: v for k, v in con.execute("SELECT key, value FROM meta")
                if k not in ("generation", "server_version", "collection")}
        head = {
            "version": version,
            "generation": int(self._read_generation(con) or 0),
            "meta": meta,
            "files": {p: [sha, size, n]
                      for p, sha, size, n in con.execute("SELECT path, sha256, size, n_chunks FROM files")},
            "chunks": [r[0] for r in con.execute("SELECT id FROM chunks ORDER BY id")],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with self._vector_op("committing the index on the server"):
            self._side().upsert(ids=[HEAD_ID], documents=[json.dumps(head, ensure_ascii=False)],
                                embeddings=[[1.0]])

    @contextmanager
    def _server_lease(self) -> Iterator[_Lease | None]:
        """One writer per server index, across machines; None where no other machine can know the index."""
        if not self.settings.chroma_url or (not self.settings.index_name and not self._local_meta().get("collection")):
            yield None
            return
        lease = _Lease(self, self._side(), self.settings.lease_seconds)
        lease.acquire()
        try:
            self._pulled = False
            self._pull()  # build on the server's latest version, not on this machine's cache of an older one
            yield lease
        finally:
            lease.release()

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
        with self._writer_lock(), self._server_lease() as lease, _WriteGuard(self, rebuild) as guard:
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
                wanted_name = self.settings.index_name
                if meta.get("collection") and wanted_name and meta["collection"] != wanted_name:
                    raise RagqaError(f"index directory {self.dir} holds index '{meta['collection']}', not "
                                     f"'{wanted_name}'; give another --index or leave --index unset")
                if meta.get("collection"):
                    self._collection = meta["collection"]
                else:
                    # Named before any vector is written, so vectors of a crashed first run are not
                    # stranded in a collection no state refers to.
                    name = wanted_name or (
                        self._legacy_collection_name() if known else f"ragqa-{uuid.uuid4().hex[:16]}")
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
                if self.settings.chroma_url and (changed_paths or new_chunks or not meta.get("server_version")):
                    self._publish(con, lease)
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
                self._side().delete(ids=[HEAD_ID])  # readers elsewhere keep their cache until the new head
            except Exception:  # noqa: BLE001 - a missing collection (or server) is fine here
                pass
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


def list_indexes(settings: Settings) -> list[dict[str, Any]]:
    """The indexes on the Chroma server (`chroma_url`, from their heads) and under the home directory."""
    rows: list[dict[str, Any]] = []
    if settings.chroma_url:
        from chromadb.config import Settings as ChromaSettings

        probe = Index(settings.replace(index_name=None, index=settings.home / ".probe"))  # for its error lines
        with probe._vector_op("listing collections"):
            client = _http_client(settings, ChromaSettings(anonymized_telemetry=False))
            names = sorted(c.name for c in client.list_collections())
        for side_name in (n for n in names if n.endswith(STATE_SUFFIX)):
            with probe._vector_op("reading an index head"):
                got = client.get_collection(side_name).get(ids=[HEAD_ID], include=["documents"])
            if not got["ids"]:
                continue  # rebuilt or never committed
            head = json.loads(got["documents"][0])
            rows.append({"where": settings.chroma_url, "name": side_name[: -len(STATE_SUFFIX)],
                         "chunks": len(head["chunks"]), "files": sum(1 for f in head["files"].values() if f[2] >= 0),
                         "embedder": head["meta"].get("embedder"), "last_ingest": head.get("time")})
    home = Path(settings.home)
    for d in [home / "index", *sorted((home / "indexes").glob("*"))]:
        state = d / "state.sqlite"
        if not state.is_file():
            continue
        try:
            con = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5)
            try:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
                chunks = con.execute("SELECT count(*) FROM chunks").fetchone()[0]
                files = con.execute("SELECT count(*) FROM files WHERE n_chunks >= 0").fetchone()[0]
            finally:
                con.close()
        except sqlite3.DatabaseError:
            continue  # a damaged one: `ragqa ask --index DIR` says what is wrong with it
        mtime = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.stat().st_mtime))
        rows.append({"where": str(d), "name": meta.get("collection", "-") if meta.get("server_version") else "-",
                     "chunks": chunks, "files": files, "embedder": meta.get("embedder"), "last_ingest": mtime})
    return rows


STATE_SUFFIX = "__state"
HEAD_ID = "head"
LEASE_ID = "lease"
LEASE_SETTLE_S = 0.5  # how long a new lease is left before it is read back (Chroma has no compare-and-swap)
_LIVE_LEASES: set[str] = set()  # owners of the leases this process holds now


class _Lease:
    """The one-writer lease of a server index: a record {owner, expires_at} in the index's state collection.

    Without compare-and-swap, a writer writes its token, waits, reads it back and goes on only if it is still
    there: of two writers racing, the later write wins and the earlier one sees it. A thread renews the lease
    every third of its length; the commit checks it is still held (a writer paused past its expiry must not
    commit over another's work). Expiry uses wall clocks: the machines' clocks should agree (NTP) to well
    within `lease_seconds`.
    """

    def __init__(self, index: Index, side: Any, seconds: float) -> None:
        self.index = index
        self.side = side
        self.seconds = max(0.5, seconds)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host} pid {self.pid} ({uuid.uuid4().hex[:8]})"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        with self.index._vector_op("reading the ingest lease"):
            got = self.side.get(ids=[LEASE_ID], include=["documents"])
        return json.loads(got["documents"][0]) if got["ids"] else None

    def _write(self) -> None:
        record = {"owner": self.owner, "host": self.host, "pid": self.pid, "expires_at": time.time() + self.seconds}
        with self.index._vector_op("writing the ingest lease"):
            self.side.upsert(ids=[LEASE_ID], documents=[json.dumps(record)], embeddings=[[1.0]])

    def _busy(self, held: dict[str, Any] | None) -> RagqaError:
        if not held:
            return RagqaError(f"another ingest is starting on index {self.index._label()}; try again")
        until = time.strftime("%H:%M:%S UTC", time.gmtime(held["expires_at"]))
        return RagqaError(
            f"another ingest is running on index {self.index._collection_name()} ({held['owner']}); its lease "
            f"expires at {until} unless renewed; wait for it to finish"
        )

    def _dead(self, held: dict[str, Any]) -> bool:
        """A lease this process left and no longer holds: an ingest here that could not release it (its
        server went away mid-way). Another process's lease waits for its expiry, even on this host: a pid
        seen from here proves nothing about a writer sharing the hostname in another container."""
        return held.get("host") == self.host and held.get("pid") == self.pid and held["owner"] not in _LIVE_LEASES

    def acquire(self) -> None:
        held = self._read()
        if held and held["owner"] != self.owner and held["expires_at"] > time.time() and not self._dead(held):
            raise self._busy(held)
        self._write()
        time.sleep(LEASE_SETTLE_S)
        held = self._read()
        if not held or held["owner"] != self.owner:
            raise self._busy(held)
        _LIVE_LEASES.add(self.owner)
        self._thread = threading.Thread(target=self._renew, name="ragqa-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                held = self._read()
                if not held or held["owner"] != self.owner:
                    return  # lost: the commit's check says so
                self._write()
            except RagqaError:
                continue  # a server hiccup: try again at the next tick; the commit's check decides

    def check(self) -> None:
        held = self._read()
        if not held or held["owner"] != self.owner or held["expires_at"] <= time.time():
            raise RagqaError(
                f"this ingest lost its lease on index {self.index._collection_name()} "
                f"(now {held['owner'] if held else 'free'}); nothing was committed; run the ingest again"
            )

    def release(self) -> None:
        _LIVE_LEASES.discard(self.owner)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self._read()
            if held and held["owner"] == self.owner:
                with self.index._vector_op("releasing the ingest lease"):
                    self.side.delete(ids=[LEASE_ID])
        except RagqaError:
            pass  # it expires on its own


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
