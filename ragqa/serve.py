"""`ragqa serve`: the ask pipeline behind a small HTTP API, models loaded once for every request.

llama.cpp has one context and the QA object keeps per-call state (the model's usage figures), so a
request holds `QAService.lock` for the whole question; FastAPI runs the sync endpoints in its thread
pool, so concurrent requests queue on that lock instead of corrupting each other. Retrieval runs inside
the lock too: it takes ~0.1 s against seconds of generation, and keeps the embedder single-threaded.
A cap on waiting requests turns a flood into quick 503s rather than an unbounded queue of sockets.
The API serves no file from disk, and the CLI binds 127.0.0.1 unless told otherwise: there is no auth.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, Field

from ragqa.chain import QA, check_question
from ragqa.config import Settings
from ragqa.errors import RagqaError

MAX_WAITING = 32


class AskBody(BaseModel):
    question: str = Field(description="The question, in Chinese or English.")
    k: int | None = Field(default=None, ge=1, le=100, description="Passages given to the model.")


class Busy(RagqaError):
    """More requests are waiting than the server will queue."""


class _Cancelled(Exception):
    """The client of a streaming request went away: stop generating for it."""


class QAService:
    """One QA pipeline shared by all requests, one question at a time."""

    def __init__(self, qa: QA, max_waiting: int = MAX_WAITING) -> None:
        self.qa = qa
        self.lock = threading.Lock()
        self.max_waiting = max_waiting
        self._waiting = 0
        self._count = threading.Lock()

    def health(self) -> dict[str, Any]:
        settings = self.qa.settings
        return {
            "status": "ok",
            "model": self.qa.llm.name,
            "embedder": settings.embedder,
            "index": str(settings.index_dir),
            "chunks": len(self.qa.index.load_chunks()),
            "busy": self.lock.locked(),
            "waiting": self._waiting,
        }

    def ask(self, question: str, k: int | None = None, on_token: Any = None) -> dict[str, Any]:
        question = check_question(question)  # bad input is refused at once, without queueing
        with self._count:
            if self._waiting >= self.max_waiting:
                raise Busy(f"{self._waiting} requests are already waiting; try again later")
            self._waiting += 1
        try:
            self.lock.acquire()
        finally:
            with self._count:
                self._waiting -= 1
        try:
            return self.qa.ask(question, k=k, on_token=on_token).as_dict()
        finally:
            self.lock.release()

    def events(self, question: str, k: int | None = None) -> Iterator[tuple[str, Any]]:
        """("token", text) while the model writes, then ("answer", the ask --json object).

        The question is checked here, at the call, before the first event is asked for. The pipeline runs
        in a worker thread that feeds a queue, so each token reaches the consumer as it comes while the lock
        is held; an error in it is raised in the consumer's thread. When the consumer stops early (closes the
        generator), the next token raises inside the pipeline and ends it.
        """
        question = check_question(question)
        if self._waiting >= self.max_waiting:  # refused now, rather than from inside a started stream
            raise Busy(f"{self._waiting} requests are already waiting; try again later")
        pieces: queue.Queue[tuple[str, Any]] = queue.Queue()
        gone = threading.Event()

        def on_token(text: str) -> None:
            if gone.is_set():
                raise _Cancelled
            pieces.put(("token", text))

        def work() -> None:
            try:
                pieces.put(("answer", self.ask(question, k=k, on_token=on_token)))
            except _Cancelled:
                pass
            except BaseException as exc:  # noqa: BLE001 - raised again in the consumer's thread
                pieces.put(("raise", exc))
            finally:
                pieces.put(("end", None))

        def run() -> Iterator[tuple[str, Any]]:
            worker = threading.Thread(target=work, name="ragqa-stream", daemon=True)
            worker.start()
            try:
                while True:
                    kind, value = pieces.get()
                    if kind == "end":
                        return
                    if kind == "raise":
                        raise value
                    yield kind, value
            finally:
                gone.set()

        return run()

    def stream(self, question: str, k: int | None = None) -> Iterator[str]:
        """NDJSON lines of `events`: {"token": text} while the model writes, then {"answer": the ask --json
        object}; an error after the response has started is its last line, {"error": "..."}."""
        events = self.events(question, k)  # bad input and a full queue fail here: a 4xx or 503, not a 200

        def lines() -> Iterator[str]:
            try:
                for kind, value in events:
                    yield json.dumps({kind: value}, ensure_ascii=False) + "\n"
            except RagqaError as exc:
                yield json.dumps({"error": str(exc)}, ensure_ascii=False) + "\n"
            except Exception as exc:  # a bug: the client still gets one line, not a cut-off stream
                yield json.dumps({"error": f"internal error: {type(exc).__name__}: {exc}"}, ensure_ascii=False) + "\n"

        return lines()


def create_app(settings: Settings, qa: QA | None = None, max_waiting: int = MAX_WAITING) -> Any:
    """The FastAPI app. The embedder and the model load here, before the first request, not during it."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    qa = qa or QA(settings)
    qa.prepare()
    _ = qa.llm, qa.index.embedder, qa.index.load_chunks()
    service = QAService(qa, max_waiting=max_waiting)

    app = FastAPI(title="ragqa", summary="Grounded, cited answers from your documents.", docs_url=None,
                  redoc_url=None, openapi_url=None)  # nothing beyond the API itself is served
    app.state.service = service

    @app.exception_handler(RagqaError)
    def ragqa_error(request: Request, exc: RagqaError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503 if isinstance(exc, Busy) else 400)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.health()

    @app.post("/ask")
    def ask(body: AskBody) -> dict[str, Any]:
        return service.ask(body.question, k=body.k)

    @app.post("/ask/stream")
    def ask_stream(body: AskBody) -> StreamingResponse:
        return StreamingResponse(service.stream(body.question, k=body.k), media_type="application/x-ndjson")

    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, on_ready: Any = None) -> None:
    """Bind first (a taken port is one clear line), load the models, then serve until interrupted."""
    import socket

    import uvicorn

    try:
        sock = socket.create_server((host, port))
    except OSError as exc:
        raise RagqaError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    try:
        app = create_app(settings)
        if on_ready:
            on_ready(sock.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
