"""The index with its vectors on a real `chroma run` server on loopback (the scale-out mode).

Each server is a real subprocess: started on a free port, waited for (heartbeat), stopped at the end.
Counts are checked with chromadb's own HttpClient against the server, not through ragqa.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ragqa.config import Settings
from ragqa.errors import RagqaError
from ragqa.index import Index, Progress

from .conftest import (
    ROOT,
    SMALL_MODEL,
    assert_one_line_error,
    free_port,
    make_settings,
    run_cli,
    running_server,
    stop_process,
)

CHROMA = Path(sys.executable).with_name("chroma")


@dataclass
class ChromaServer:
    """A running `chroma run` on loopback: its port and URL, a chromadb client on it, and `stop` for the tests
    that kill it mid-way (a no-op once stopped)."""

    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)

    def client(self):
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        return chromadb.HttpClient(host="127.0.0.1", port=self.port,
                                   settings=ChromaSettings(anonymized_telemetry=False))


@contextmanager
def chroma_server(path: Path) -> Iterator[ChromaServer]:
    """`chroma run --path DIR` on a free port, ready once its heartbeat answers; stopped at the end."""
    port = free_port()
    cmd = [str(CHROMA), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)]
    with running_server(cmd, f"http://127.0.0.1:{port}/api/v2/heartbeat", path.with_suffix(".log"), timeout=60) as proc:
        yield ChromaServer(port, proc)


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    with chroma_server(tmp_path_factory.mktemp("chroma-server") / "db") as server:
        yield server


def _docs(root: Path) -> Path:
    docs = root / "docs"
    docs.mkdir()
    zh = "杰文斯悖论指效率提高反而增加总消耗。煤炭用量随蒸汽机改进而上升。"
    (docs / "a.txt").write_text(zh * 3, encoding="utf-8")
    (docs / "b.md").write_text("# Scaling\n\nMixture of experts routes each token to a few experts. " * 4,
                               encoding="utf-8")
    return docs


def _settings(tmp_path: Path, url: str, name: str = "idx", **more: object) -> Settings:
    return make_settings(index=tmp_path / name, chroma_url=url, chunk_size=120, chunk_overlap=20, **more)


def _server_sources(server: ChromaServer, idx: Index) -> list[str]:
    """Source file name of every vector in the index's collection, read from the server directly."""
    got = server.client().get_collection(idx._collection_name()).get(include=["metadatas"])
    return sorted(Path(m["source"]).name for m in got["metadatas"])


def _live(idx: Index) -> dict[str, int]:
    idx._chunks = None
    out: dict[str, int] = {}
    for c in idx.load_chunks().values():
        out[Path(c.source).name] = out.get(Path(c.source).name, 0) + 1
    return out


# ---- quick: bad input, no model --------------------------------------------------------------------------
def test_bad_chroma_url_is_one_line(tmp_path: Path) -> None:
    docs = _docs(tmp_path)
    proc = run_cli("ingest", str(docs), "--index", str(tmp_path / "idx"), "--chroma-url", "localhost:8000")
    assert_one_line_error(proc, "--chroma-url must look like http://HOST:PORT", "localhost:8000")


def test_down_server_is_one_line_at_ingest(tmp_path: Path) -> None:
    docs = _docs(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_cli("ingest", str(docs), "--index", str(tmp_path / "idx"), "--chroma-url", url, timeout=120)
    assert_one_line_error(proc, f"cannot reach the Chroma server at {url}", "chroma run")


def test_hung_server_fails_in_bounded_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts the connection and never answers: chromadb alone would wait forever."""
    import ragqa.index

    monkeypatch.setattr(ragqa.index, "HEARTBEAT_TIMEOUT_S", 0.5)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel completes the handshake; nobody ever reads or writes
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        with pytest.raises(RagqaError, match=f"cannot reach the Chroma server at {url}.*timed out"):
            Index(_settings(tmp_path, url)).ingest([_docs(tmp_path)])


def test_missing_token_variable_is_one_line(tmp_path: Path) -> None:
    docs = _docs(tmp_path)
    env = {"RAGQA_CHROMA_TOKEN_ENV": "RAGQA_TEST_NO_SUCH_TOKEN"}
    proc = run_cli("ingest", str(docs), "--index", str(tmp_path / "idx"), "--chroma-url",
                   f"http://127.0.0.1:{free_port()}", env=env)
    assert_one_line_error(proc, "RAGQA_TEST_NO_SUCH_TOKEN", "not set")


# ---- the store on a server -------------------------------------------------------------------------------
@pytest.mark.slow
def test_server_ingest_is_incremental_and_leaves_no_vectors_behind(tmp_path: Path, chroma: ChromaServer,
                                                                   embedder) -> None:
    docs = _docs(tmp_path)
    idx = Index(_settings(tmp_path, chroma.url), embedder=embedder)
    first = idx.ingest([docs])
    assert first.files_added == 2 and first.chunks_embedded == first.chunks_total > 2
    assert not (tmp_path / "idx" / "chroma").exists()  # the vectors are on the server, not in the index dir
    assert (tmp_path / "idx" / "state.sqlite").is_file()  # chunk text + BM25 tokens stay local
    live = _live(idx)
    assert sorted(live) == ["a.txt", "b.md"]
    assert chroma.client().get_collection(idx._collection_name()).count() == sum(live.values())

    again = Index(_settings(tmp_path, chroma.url), embedder=embedder).ingest([docs])
    assert again.chunks_embedded == 0 and again.files_unchanged == 2 and again.chunks_total == first.chunks_total

    (docs / "a.txt").write_text("完全不同的新内容。", encoding="utf-8")
    changed = idx.ingest([docs])
    assert changed.files_changed == 1 and changed.chunks_embedded == 1
    bm25 = idx.bm25_search("新内容", 3)  # BM25 runs on the local state, also in server mode
    assert bm25 and Path(idx.load_chunks()[bm25[0][0]].source).name == "a.txt"
    (docs / "b.md").unlink()
    gone = idx.ingest([docs])
    assert gone.files_removed == 1 and gone.chunks_embedded == 0
    assert _server_sources(chroma, idx) == ["a.txt"]  # old a.txt vectors and all b.md vectors are gone
    hits = idx.dense_search(embedder.embed_query("新内容"), 3)
    assert [h[0] for h in hits] == list(idx.load_chunks())

    before = idx._collection_name()
    rebuilt = idx.ingest([docs], rebuild=True)  # drops the old collection on the server, not only the state
    names = {c.name for c in chroma.client().list_collections()}
    assert rebuilt.chunks_embedded == 1 and idx._collection_name() in names and before not in names
    assert _server_sources(chroma, idx) == ["a.txt"]


@pytest.mark.slow
def test_two_indexes_on_one_server_do_not_clash(tmp_path: Path, chroma: ChromaServer, embedder) -> None:
    docs = _docs(tmp_path)
    one = Index(_settings(tmp_path, chroma.url, "one"), embedder=embedder)
    two = Index(_settings(tmp_path, chroma.url, "two"), embedder=embedder)
    one.ingest([docs / "a.txt"])
    two.ingest([docs / "b.md"])
    assert one._collection_name() != two._collection_name()
    assert _server_sources(chroma, one) == ["a.txt"] * len(one.load_chunks())
    (docs / "a.txt").unlink()
    one.ingest([docs])  # drops a.txt and adds b.md to index one; index two's vectors must survive
    assert _server_sources(chroma, two) == ["b.md"] * len(two.load_chunks())
    assert _server_sources(chroma, one) == ["b.md"] * _live(one)["b.md"]


@pytest.mark.slow
def test_server_killed_mid_ingest_keeps_the_previous_index(tmp_path: Path, embedder) -> None:
    with chroma_server(tmp_path / "db") as server:
        docs = _docs(tmp_path)
        settings = _settings(tmp_path, server.url, embed_batch_size=2)
        idx = Index(settings, embedder=embedder)
        (docs / "b.md").unlink()
        before = idx.ingest([docs]).chunks_total
        (docs / "b.md").write_text("# New\n\nA file added later, in English, long enough for chunks. " * 6,
                                   encoding="utf-8")

        def kill_after_first_batch(done: int, total: int) -> None:
            if done > 0:
                server.stop(signal.SIGKILL)  # the server dies with some of the new vectors written

        with pytest.raises(RagqaError, match=f"cannot reach the Chroma server at {server.url}"):
            idx.ingest([docs], progress=Progress(chunks=kill_after_first_batch))
        assert _live(idx) == {"a.txt": before}  # the committed state is the old one, whole

    # The same data on a new port: the collection name lives in the state, not in the URL.
    with chroma_server(tmp_path / "db") as server:
        idx = Index(settings.replace(chroma_url=server.url), embedder=embedder)
        assert server.client().get_collection(idx._collection_name()).count() > before  # orphans of the kill
        hits = idx.dense_search(embedder.embed_query("experts"), 5)
        assert hits and all(h[0] in idx.load_chunks() for h in hits)  # orphans are not served
        report = idx.ingest([docs])
        assert report.files_added == 1 and report.files_unchanged == 1
        assert sorted(set(_server_sources(server, idx))) == ["a.txt", "b.md"]
        assert len(_server_sources(server, idx)) == report.chunks_total  # orphans collected


@pytest.mark.slow
def test_vectors_lost_on_the_server_are_reported_then_restored(tmp_path: Path, chroma: ChromaServer,
                                                                embedder) -> None:
    docs = _docs(tmp_path)
    idx = Index(_settings(tmp_path, chroma.url), embedder=embedder)
    total = idx.ingest([docs]).chunks_total
    chroma.client().delete_collection(idx._collection_name())  # e.g. the server's --path was wiped

    fresh = Index(_settings(tmp_path, chroma.url), embedder=embedder)
    with pytest.raises(RagqaError, match="has no vectors for this index.*ragqa ingest"):
        fresh.dense_search(embedder.embed_query("杰文斯悖论"), 3)
    warnings: list[str] = []
    report = fresh.ingest([docs], progress=Progress(warn=warnings.append))
    assert report.chunks_embedded == total and report.files_changed == 2
    assert any("missing" in w for w in warnings)
    assert chroma.client().get_collection(idx._collection_name()).count() == total


# ---- an auth token, through a proxy that enforces it -------------------------------------------------------
class _AuthProxy(BaseHTTPRequestHandler):
    """Forwards to the Chroma server only requests carrying the token; records every request's headers.

    `chroma run` (Chroma 1.x) has no server-side auth, so a proxy in front of it is how a token is enforced."""

    upstream_port = 0
    token = ""
    seen: list[dict[str, str]] = []

    def _handle(self) -> None:
        self.seen.append(dict(self.headers))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            payload = json.dumps({"error": "Unauthorized", "message": "token required"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.getheader("Content-Type") or "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def auth_proxy(chroma: ChromaServer) -> Iterator[tuple[str, type[_AuthProxy]]]:
    handler = type("Proxy", (_AuthProxy,), {"upstream_port": chroma.port, "token": "s3cret-token", "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_no_token_is_refused_in_one_line(tmp_path: Path, auth_proxy) -> None:
    url, _ = auth_proxy
    proc = run_cli("ingest", str(_docs(tmp_path)), "--index", str(tmp_path / "idx"), "--chroma-url", url)
    assert_one_line_error(proc, f"the Chroma server at {url} refused the request (HTTP 401)", "chroma_token_env")
    proc = run_cli("ingest", str(tmp_path / "docs"), "--index", str(tmp_path / "idx"), "--chroma-url", url,
                   env={"RAGQA_CHROMA_TOKEN_ENV": "RAGQA_TEST_TOKEN", "RAGQA_TEST_TOKEN": "wrong"})
    assert_one_line_error(proc, "refused the request (HTTP 401)", "$RAGQA_TEST_TOKEN")


@pytest.mark.slow
def test_token_is_sent_on_every_request(tmp_path: Path, chroma: ChromaServer, auth_proxy, embedder,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    url, proxy = auth_proxy
    monkeypatch.setenv("RAGQA_TEST_TOKEN", proxy.token)
    idx = Index(_settings(tmp_path, url, chroma_token_env="RAGQA_TEST_TOKEN"), embedder=embedder)
    report = idx.ingest([_docs(tmp_path)])
    assert idx.dense_search(embedder.embed_query("experts"), 2)
    assert len(proxy.seen) > 3
    assert all(h.get("Authorization") == f"Bearer {proxy.token}" for h in proxy.seen)
    assert all(h.get("X-Chroma-Token") == proxy.token for h in proxy.seen)
    # What went through the proxy reached the real server behind it.
    assert chroma.client().get_collection(idx._collection_name()).count() == report.chunks_total


# ---- the CLI end to end: eval (which ingests corpus/), ask, ingest, a server that went away --------------------
@pytest.mark.slow
def test_cli_eval_ingest_and_ask_against_a_server(tmp_path: Path, models_dir: Path) -> None:
    idx = tmp_path / "idx"
    # One corpus file (the one the first two eval questions are about) keeps the embedding short.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(ROOT / "corpus" / "000_f5fd2a6a8ad6d922.txt", corpus)
    env = {"RAGQA_MODELS": str(models_dir), "RAGQA_CORPUS": str(corpus), "RAGQA_HOME": str(tmp_path / "home")}
    with chroma_server(tmp_path / "db") as server:
        common = ["--index", str(idx), "--chroma-url", server.url]
        ev = run_cli("eval", str(ROOT / "evals" / "corpus_qa.jsonl"), "--limit", "2", "--retrieval-only",
                     "--out", str(tmp_path / "run"), *common, env=env)
        assert ev.returncode == 0, ev.stderr
        results = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
        assert len(results) == 2 and all(r["retrieved"] for r in results)
        assert not (idx / "chroma").exists()
        n_chunks = len(Index(make_settings(index=idx, chroma_url=server.url)).load_chunks())
        meta = Index(make_settings(index=idx)).meta()
        assert server.client().get_collection(meta["collection"]).count() == n_chunks > 20

        question = "文中说人工智能发展的一个转折点发生在什么时候？"
        asked = run_cli("ask", question, "--json", "--model", SMALL_MODEL, *common, env=env)
        assert asked.returncode == 0, asked.stderr
        answer = json.loads(asked.stdout)
        assert answer["retrieved"] and not answer["refused"], answer
        assert answer["citations"], answer
        assert all(c["source"].endswith("000_f5fd2a6a8ad6d922.txt") for c in answer["citations"])

        again = run_cli("ingest", *common, env=env)
        assert again.returncode == 0 and "0 chunks embedded" in again.stderr, again.stderr

        wrong = run_cli("ask", question, "--embedder", "multilingual-e5-small", *common, env=env)
        assert_one_line_error(wrong, "built with embedder 'embeddinggemma-300m'")
    down = run_cli("ask", "When was the turning point of AI?", "--json", "--model", SMALL_MODEL, *common, env=env,
                   timeout=120)
    assert_one_line_error(down, f"cannot reach the Chroma server at {server.url}")


# ---- the whole index on the server: named indexes, other machines, one writer ------------------------------
def _home(root: Path, url: str, name: str = "team-docs", **more: object) -> Settings:
    """The settings of one machine: its own (empty) RAGQA_HOME, the shared server and the index's name."""
    return make_settings(home=root, chroma_url=url, index_name=name, chunk_size=120, chunk_overlap=20, **more)


def _hits(idx: Index, embedder, query: str) -> list[dict[str, object]]:
    from ragqa.retrieve import HybridRetriever

    return [h.as_dict() for h in HybridRetriever(idx, k=4).retrieve(query).hits]


@pytest.mark.slow
def test_a_second_home_answers_from_the_server_alone(tmp_path: Path, chroma: ChromaServer, embedder) -> None:
    docs = _docs(tmp_path)
    (docs / "c.md").write_text("# 页面\n\n第二台机器不需要导入任何文件。\n\nNothing is ingested on the second "
                               "machine.\n", encoding="utf-8")
    writer = Index(_home(tmp_path / "home-a", chroma.url), embedder=embedder)
    writer.ingest([docs])
    assert writer.dir == tmp_path / "home-a" / "indexes" / "team-docs"

    reader = Index(_home(tmp_path / "home-b", chroma.url), embedder=embedder)
    assert not (tmp_path / "home-b").exists()
    for query in ("杰文斯悖论是什么？", "How are tokens routed to experts?", "第二台机器"):
        got = _hits(reader, embedder, query)
        assert got and got == _hits(writer, embedder, query)  # same passages, offsets, lines, scores
    assert reader.load_chunks() == writer.load_chunks()
    assert reader.files() == writer.files()
    assert reader.bm25_search("第二台机器", 1)[0][0] == writer.bm25_search("第二台机器", 1)[0][0]

    # The embedder check reads the server's record: another machine with another embedder gets one line.
    other = Index(_home(tmp_path / "home-c", chroma.url, embedder="multilingual-e5-small"))
    with pytest.raises(RagqaError, match="'team-docs' on .* was built with embedder 'embeddinggemma-300m'"):
        other.check_embedder()

    # A long-lived reader follows a commit made from the other machine.
    assert not reader.changed()
    (docs / "b.md").unlink()
    writer.ingest([docs])
    assert reader.changed()
    reader.refresh()
    assert {Path(c.source).name for c in reader.load_chunks().values()} == {"a.txt", "c.md"}
    assert not reader.changed()


def test_a_bad_index_name_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("ask", "问题", "--index-name", "../etc", "--chroma-url", f"http://127.0.0.1:{free_port()}",
                   env={"RAGQA_HOME": str(tmp_path / "home")})
    assert_one_line_error(proc, "index name '../etc' must be")


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_runs(tmp_path: Path, chroma: ChromaServer, embedder) -> None:
    docs = _docs(tmp_path)
    first = Index(_home(tmp_path / "home-a", chroma.url, "busy-index", embed_batch_size=1), embedder=embedder)
    first.ingest([docs / "a.txt"])
    inside, go_on = threading.Event(), threading.Event()

    def hold(done: int, total: int) -> None:
        if done:
            inside.set()
            go_on.wait(60)

    failure: list[BaseException] = []

    def run() -> None:
        try:
            first.ingest([docs], progress=Progress(chunks=hold))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert inside.wait(120)
        second = Index(_home(tmp_path / "home-b", chroma.url, "busy-index"), embedder=embedder)
        with pytest.raises(RagqaError, match=r"another ingest is running on index busy-index \(.* pid \d+ .*"
                                             r"lease expires at"):
            second.ingest([docs])
    finally:
        go_on.set()
        thread.join(120)
    assert not failure
    report = Index(_home(tmp_path / "home-b", chroma.url, "busy-index"), embedder=embedder).ingest([docs])
    assert report.files_unchanged == 2 and report.chunks_embedded == 0  # the first writer's commit is there


@pytest.mark.slow
def test_a_writer_killed_mid_ingest_leaves_the_old_version_and_its_lease_expires(
        tmp_path: Path, chroma: ChromaServer, embedder, models_dir: Path) -> None:
    docs = _docs(tmp_path)
    (docs / "b.md").unlink()
    name = "killed-writer"
    Index(_home(tmp_path / "home-a", chroma.url, name), embedder=embedder).ingest([docs])
    reader = Index(_home(tmp_path / "home-b", chroma.url, name), embedder=embedder)
    old_chunks = reader.load_chunks()
    old_hits = _hits(reader, embedder, "杰文斯悖论")
    collection = chroma.client().get_collection(name)
    before = collection.count()
    (docs / "b.md").write_text("# New\n\nA file added later, in English, long enough for chunks. " * 12,
                               encoding="utf-8")

    env = {"RAGQA_HOME": str(tmp_path / "home-a"), "RAGQA_EMBED_BATCH_SIZE": "1", "RAGQA_LEASE_SECONDS": "4",
           "RAGQA_MODELS": str(models_dir), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "from ragqa.cli import main; main()", "ingest", str(docs), "--index-name", name,
           "--chroma-url", chroma.url, "--chunk-size", "120", "--chunk-overlap", "20"]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while collection.count() <= before + 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.kill()  # SIGKILL: no cleanup, the lease stays on the server until it expires
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = time.time()
    assert collection.count() > before  # some new vectors were written, never committed
    later = Index(_home(tmp_path / "home-b", chroma.url, name), embedder=embedder)
    with pytest.raises(RagqaError, match="another ingest is running on index killed-writer"):
        later.ingest([docs])  # the dead writer's lease (4 s) has not expired yet
    assert time.time() - killed_at < 4

    fresh = Index(_home(tmp_path / "home-c", chroma.url, name), embedder=embedder)
    assert fresh.load_chunks() == old_chunks  # the old version, whole
    assert _hits(fresh, embedder, "杰文斯悖论") == old_hits
    assert not reader.changed()

    time.sleep(max(0.0, killed_at + 4.5 - time.time()))
    report = later.ingest([docs])
    assert report.files_added == 1 and report.files_unchanged == 1
    assert collection.count() == report.chunks_total  # the killed run's orphans were collected
    assert reader.changed()
    reader.refresh()
    assert {Path(c.source).name for c in reader.load_chunks().values()} == {"a.txt", "b.md"}


@pytest.mark.slow
def test_index_list_shows_the_server_and_the_local_indexes(tmp_path: Path, embedder) -> None:
    docs = _docs(tmp_path)
    with chroma_server(tmp_path / "db") as server:
        Index(_home(tmp_path / "home-a", server.url, "listed-one"), embedder=embedder).ingest([docs])
        Index(make_settings(home=tmp_path / "home-a"), embedder=embedder).ingest([docs / "a.txt"])  # local only
        proc = run_cli("index", "list", "--chroma-url", server.url, "--json",
                       env={"RAGQA_HOME": str(tmp_path / "home-a")})
        assert proc.returncode == 0, proc.stderr
        rows = {(r["where"], r["name"]): r for r in json.loads(proc.stdout)}
        on_server = rows[(server.url, "listed-one")]
        chunks = server.client().get_collection("listed-one").count()
        assert on_server["chunks"] == chunks and on_server["files"] == 2
        assert on_server["embedder"] == "embeddinggemma-300m" and on_server["last_ingest"].endswith("Z")
        cached = rows[(str(tmp_path / "home-a" / "indexes" / "listed-one"), "listed-one")]
        assert cached["chunks"] == chunks
        local = rows[(str(tmp_path / "home-a" / "index"), "-")]
        assert local["files"] == 1 and 0 < local["chunks"] < chunks
        assert {c.name for c in server.client().list_collections()} == {"listed-one", "listed-one__state"}
        table = run_cli("index", "list", "--chroma-url", server.url, env={"RAGQA_HOME": str(tmp_path / "home-a")})
        assert table.returncode == 0 and "listed-one" in table.stdout, table.stderr


@pytest.mark.slow
def test_cli_ask_from_an_empty_home_gives_the_same_answer(tmp_path: Path, models_dir: Path) -> None:
    """Temperature 0 (the default): the same passages from the server give the same answer on another home."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(ROOT / "corpus" / "000_f5fd2a6a8ad6d922.txt", corpus)
    question = "文中说人工智能发展的一个转折点发生在什么时候？"
    with chroma_server(tmp_path / "db") as server:
        common = ["--chroma-url", server.url, "--index-name", "shared-corpus"]
        env_a = {"RAGQA_MODELS": str(models_dir), "RAGQA_HOME": str(tmp_path / "home-a")}
        env_b = {"RAGQA_MODELS": str(models_dir), "RAGQA_HOME": str(tmp_path / "home-b")}
        ingested = run_cli("ingest", str(corpus), *common, env=env_a)
        assert ingested.returncode == 0, ingested.stderr
        answers = []
        for env in (env_a, env_b):
            asked = run_cli("ask", question, "--json", "--model", SMALL_MODEL, *common, env=env)
            assert asked.returncode == 0, asked.stderr
            answers.append(json.loads(asked.stdout))
        assert not (tmp_path / "home-b" / "indexes" / "shared-corpus" / "chroma").exists()
        assert answers[0]["retrieved"] and answers[0]["retrieved"] == answers[1]["retrieved"]
        assert answers[0]["answer"] and answers[0]["answer"] == answers[1]["answer"]
