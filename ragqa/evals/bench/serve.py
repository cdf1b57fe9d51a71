"""`ragqa serve` under load: N clients asking at once, the app's parallel lanes against one lane.

Both sides are the real HTTP app (`ragqa.serve.create_app` under uvicorn, on a free loopback port) over the
same index and the same model server, measured one after the other in the same run: the baseline is the app
with `serve_parallel = 1`, which answers one question at a time as `serve` did before it had lanes. What the
lanes can win depends on the model server: against one that batches (llama.cpp's `llama-server --parallel 4`,
vLLM) several answers are decoded in one batch; against one that serializes, nothing.

A model server with a prompt cache answers a question it has seen in a fraction of the time, so each client
count asks questions of its own, the next ones of the suite, and both sides ask the same ones; for a clean
comparison run the model server without its prompt cache (`llama-server --no-cache-prompt --cache-ram 0`).

Every response is checked: HTTP 200, an `answer` string, a `citations` list, and every `[n]` in the answer
naming one of them (or a refusal). A 503 (queue full) or any other status counts as an error; the app's queue
is sized to the largest client count so a full queue does not hide a slow lane.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from rich.table import Table

from ragqa.errors import RagqaError
from ragqa.evals.bench.common import BenchContext, make_table, ratio, rnd, summarize_ms
from ragqa.evals.metrics import citation_markers

TARGET = "with a model server that batches: throughput with 4+ clients above one lane's, no errors, all well-formed"
REQUEST_TIMEOUT_S = 600.0


def well_formed(status: int, body: bytes) -> str | None:
    """Why a /ask response is not a whole answer, or None when it is one."""
    if status != 200:
        return f"HTTP {status}"
    try:
        data = json.loads(body)
    except ValueError:
        return "not JSON"
    answer, citations = data.get("answer"), data.get("citations")
    if not isinstance(answer, str) or not answer.strip():
        return "no answer text"
    if not isinstance(citations, list):
        return "no citations list"
    if not data.get("refused"):
        numbers = {c.get("n") for c in citations if isinstance(c, dict)}
        bad = sorted(set(citation_markers(answer)) - numbers)
        if bad:
            return f"cites [{bad[0]}] that is not in its citations"
    return None


def ask(port: int, question: str) -> tuple[float, str | None]:
    """One POST /ask: seconds to the whole response, and what was wrong with it (None: well-formed)."""
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", "/ask", json.dumps({"question": question}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        problem = well_formed(resp.status, resp.read())
    except OSError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return time.perf_counter() - t, problem


def load(port: int, questions: Sequence[str], clients: int) -> dict[str, Any]:
    """The questions asked by `clients` threads at once, each asking its next one as soon as its previous
    answer is in."""
    lock = threading.Lock()
    requests = len(questions)
    todo = iter(range(requests))
    latencies: list[float] = []
    problems: list[str] = []

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            seconds, problem = ask(port, questions[i])
            with lock:
                latencies.append(seconds * 1000)
                if problem:
                    problems.append(problem)

    t = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return {"clients": clients, "requests": requests, "wall_s": rnd(wall, 1),
            "answers_per_min": rnd(60 * (requests - len(problems)) / wall), "latency_ms": summarize_ms(latencies),
            "errors": len(problems), "problems": sorted(set(problems))}


@contextmanager
def app_server(ctx: BenchContext, parallel: int, max_waiting: int) -> Iterator[int]:
    """The real `ragqa serve` app with `parallel` lanes on a free loopback port, for the block."""
    import uvicorn

    from ragqa.chain import QA
    from ragqa.index import Index
    from ragqa.serve import create_app

    s = ctx.index_settings.replace(serve_parallel=parallel)
    app = create_app(s, qa=QA(s, index=Index(s, embedder=ctx.embedder)), max_waiting=max_waiting)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RagqaError("the ragqa app did not start for the serve benchmark")
            time.sleep(0.05)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def model_server_slots(url: str) -> int | None:
    """llama-server's `total_slots` from /props (None from servers that do not say): how many it batches."""
    parts = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=10)
        conn.request("GET", "/props")
        resp = conn.getresponse()
        slots = json.loads(resp.read()).get("total_slots") if resp.status == 200 else None
        conn.close()
    except (OSError, ValueError, AttributeError):
        return None
    return slots if isinstance(slots, int) else None


def run(ctx: BenchContext) -> dict[str, Any]:
    settings = ctx.settings
    if not settings.llm_url:
        raise RagqaError("bench serve measures ragqa against a model server: pass --llm-url "
                         "(e.g. llama-server -m MODEL.gguf --parallel 4, then --llm-url http://127.0.0.1:8080/v1)")
    clients = sorted(set(ctx.clients))
    lanes = max(settings.serve_parallel, 1)
    suite = [q["question"] for q in ctx.load_questions()]
    if not suite:
        raise RagqaError(f"no questions in {ctx.suite}")
    per_level = ctx.questions or 8
    # Each client count its own questions (the suite's next ones, round-robin), at least one per client.
    levels, at = {}, 0
    for c in clients:
        n = max(c, per_level)
        levels[c] = [suite[(at + i) % len(suite)] for i in range(n)]
        at += n
    rows: list[dict[str, Any]] = []
    for mode, parallel in (("one lane", 1), (f"{lanes} lanes", lanes)):
        with app_server(ctx, parallel, max_waiting=max(clients)) as port:
            ask(port, suite[-1])  # warm-up: the first request loads what is still lazy
            for c in clients:
                ctx.console.print(f"[dim]  {mode}: {c} client(s), {len(levels[c])} questions…[/]")
                rows.append({"mode": mode, "lanes": parallel, **load(port, levels[c], c)})
    base = {r["clients"]: r for r in rows if r["lanes"] == 1}
    for r in rows:
        r["throughput_vs_one_lane"] = rnd(ratio(r["answers_per_min"], base[r["clients"]]["answers_per_min"]))
    gains = [r["throughput_vs_one_lane"] for r in rows if r["lanes"] > 1 and r["clients"] >= 4]
    errors = sum(r["errors"] for r in rows)
    return {"llm_url": settings.llm_url, "model_server_slots": model_server_slots(settings.llm_url),
            "serve_parallel": lanes, "questions_per_level": per_level, "rows": rows, "errors": errors,
            "target": TARGET,
            "met": bool(gains) and errors == 0 and all(g is not None and g > 1 for g in gains)}


def table(res: dict[str, Any]) -> Table:
    rows = [(r["mode"], r["clients"], r["requests"], r["answers_per_min"], r["throughput_vs_one_lane"],
             r["latency_ms"]["p50"], r["latency_ms"]["p95"], r["errors"]) for r in res["rows"]]
    title = f"serve: {res['llm_url']} (slots: {res['model_server_slots'] or '?'})"
    return make_table(title, ["mode", "clients", "questions", "answers/min", "vs one lane", "p50 ms", "p95 ms",
                              "errors"], rows)
