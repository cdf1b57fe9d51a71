"""`ragqa serve`: the ask pipeline behind a small HTTP API, models loaded once for every request.

A request takes a lane, a QA pipeline of its own, for its whole question (the QA object keeps per-call state:
the model's usage figures). An in-process model has one llama.cpp context, so there is one lane and requests
take turns. With a model server (`llm_url`) there are `serve_parallel` lanes, each with its own client over
the one shared index: a server that batches (llama-server --parallel N) answers them together, while their
retrievals still take turns (~0.1 s against seconds of generation; it keeps the embedder single-threaded and
a reload of the index after a commit in one thread). FastAPI runs the sync endpoints in its thread pool; a cap
on waiting requests turns a flood into quick 503s rather than an unbounded queue of sockets.
The API serves no file from disk, and the CLI binds 127.0.0.1 unless told otherwise: there is no auth.

Beside ragqa's own routes, `/v1/models` and `/v1/chat/completions` speak OpenAI's chat API, so a chat
front end (Open WebUI, LibreChat) or any OpenAI client can use ragqa as a model: the last user message is
the question, earlier turns are the history `ragqa chat` would keep, the sources follow the answer's text,
and the whole `ask --json` object rides in the extra field `ragqa`.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ragqa.chain import QA, check_question, question_language, source_label
from ragqa.config import Settings
from ragqa.errors import RagqaError
from ragqa.llm import load_llm

MAX_WAITING = 32


class AskBody(BaseModel):
    question: str = Field(description="The question, in Chinese or English.")
    k: int | None = Field(default=None, ge=1, le=100, description="Passages given to the model.")


MODEL_ID = "ragqa"  # what /v1/models lists: ragqa as one model, whatever answers inside it
RETRY_AFTER_S = 5
SOURCES_TITLE = {"zh": "来源：", "en": "Sources:"}


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a list (how some clients send content)."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatBody(BaseModel):
    """OpenAI's chat-completions request. Sampling fields a client sends (temperature, max_tokens, ...) are
    accepted and ignored: ragqa's settings decide them, so the answer is the one `ragqa ask` gives."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False


def chat_turns(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """The question (the last message, a user's) and the history before it as (question, answer) pairs, as
    `ragqa chat` keeps it; system messages are ragqa's own business and are dropped."""
    if messages[-1].role != "user":
        raise RagqaError("the last message must be the user's question (role 'user')")
    history: list[tuple[str, str]] = []
    pending: str | None = None
    for m in messages[:-1]:
        if m.role == "user":
            pending = m.text()
        elif m.role == "assistant" and pending is not None:
            history.append((pending, m.text()))
            pending = None
    return messages[-1].text(), history


def sources_block(answer: dict[str, Any]) -> str:
    """The cited passages after the answer text, as `ragqa ask` prints them: chat clients show only text."""
    if not answer["citations"]:
        return ""
    lines = [f"[{c['n']}] {source_label(c)}" + (f" {c['heading']}" if c.get("heading") else "")
             for c in answer["citations"]]
    return "\n\n" + SOURCES_TITLE[question_language(answer["question"])] + "\n" + "\n".join(lines)


def completion(answer: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion object for one answer; the whole `ask --json` object rides in `ragqa`."""
    timings = answer["timings"]
    prompt, done = timings.get("prompt_tokens") or 0, timings.get("completion_tokens") or 0
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL_ID,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": answer["answer"] + sources_block(answer)}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done},
        "ragqa": answer,
    }


def stream_error(exc: BaseException) -> str:
    """What a client is told of an error after its stream has started: ragqa's own line, or a bug named."""
    return str(exc) if isinstance(exc, RagqaError) else f"internal error: {type(exc).__name__}: {exc}"


class Busy(RagqaError):
    """More requests are waiting than the server will queue."""


class _Cancelled(Exception):
    """The client of a streaming request went away: stop generating for it."""


class _TakingTurns:
    """A lane's retriever that waits for the other lanes' retrievals (see the module docstring)."""

    def __init__(self, retriever: Any, lock: threading.Lock) -> None:
        self._retriever = retriever
        self._lock = lock

    def retrieve(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._retriever.retrieve(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._retriever, name)


def make_lanes(qa: QA) -> list[QA]:
    """`qa` alone for an in-process model; with a model server, `serve_parallel` pipelines over qa's index,
    each with its own client, their retrievals taking turns."""
    n = qa.settings.serve_parallel
    if n < 1:
        raise RagqaError(f"serve_parallel must be 1 or more, not {n}")
    if n == 1 or not qa.settings.llm_url:
        return [qa]
    lanes = [qa] + [QA(qa.settings, index=qa.index, llm=load_llm(qa.settings)) for _ in range(n - 1)]
    lock = threading.Lock()
    for lane in lanes:
        lane.retriever = _TakingTurns(lane.retriever, lock)  # type: ignore[assignment]
    return lanes


class QAService:
    """The QA pipelines shared by all requests: a request takes a free lane for its whole question."""

    def __init__(self, qa: QA | list[QA], max_waiting: int = MAX_WAITING) -> None:
        lanes = qa if isinstance(qa, list) else [qa]
        self.qa = lanes[0]
        self.lanes = len(lanes)
        self._free: queue.LifoQueue[QA] = queue.LifoQueue()
        for lane in lanes:
            self._free.put(lane)
        self.max_waiting = max_waiting
        self._waiting = 0
        self._count = threading.Lock()

    def health(self) -> dict[str, Any]:
        settings = self.qa.settings
        answering = self.lanes - self._free.qsize()
        return {
            "status": "ok",
            "model": self.qa.llm.name,
            "embedder": settings.embedder,
            "index": str(settings.index_dir),
            "chunks": len(self.qa.index.load_chunks()),
            "lanes": self.lanes,
            "answering": answering,
            "busy": answering >= self.lanes,
            "waiting": self._waiting,
        }

    @contextlib.contextmanager
    def lane(self) -> Iterator[QA]:
        """A free lane for the block, waited for; Busy when `max_waiting` requests already wait."""
        with self._count:
            self._refuse_if_full()
            self._waiting += 1
        try:
            lane = self._free.get()
        finally:
            with self._count:
                self._waiting -= 1
        try:
            yield lane
        finally:
            self._free.put(lane)

    def _refuse_if_full(self) -> None:
        """Busy when no lane is free and `max_waiting` requests already wait for one."""
        if self._free.empty() and self._waiting >= self.max_waiting:
            raise Busy(f"{self._waiting} requests are already waiting; try again later")

    @property
    def idle(self) -> bool:
        """No question is being answered."""
        return self._free.qsize() == self.lanes

    def ask(self, question: str, k: int | None = None, on_token: Any = None,
            history: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        question = check_question(question)  # bad input is refused at once, without queueing
        with self.lane() as qa:
            return qa.ask(question, k=k, on_token=on_token, history=history).as_dict()

    def events(self, question: str, k: int | None = None,
               history: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, Any]]:
        """("token", text) while the model writes, then ("answer", the ask --json object).

        The question is checked here, at the call, before the first event is asked for. The pipeline runs
        in a worker thread that feeds a queue, so each token reaches the consumer as it comes while the lane
        is held; an error in it is raised in the consumer's thread. When the consumer stops early (closes the
        generator), the next token raises inside the pipeline and ends it.
        """
        question = check_question(question)
        self._refuse_if_full()  # refused now, rather than from inside a started stream
        pieces: queue.Queue[tuple[str, Any]] = queue.Queue()
        gone = threading.Event()

        def on_token(text: str) -> None:
            if gone.is_set():
                raise _Cancelled
            pieces.put(("token", text))

        def work() -> None:
            try:
                pieces.put(("answer", self.ask(question, k=k, on_token=on_token, history=history)))
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
            except Exception as exc:  # noqa: BLE001 - also a bug: the client gets one line, not a cut-off stream
                yield json.dumps({"error": stream_error(exc)}, ensure_ascii=False) + "\n"

        return lines()

    def chat_stream(self, question: str, history: list[tuple[str, str]]) -> Iterator[str]:
        """Server-sent events of chat.completion.chunk objects, as OpenAI streams: the answer's tokens, then
        its sources, then a last chunk with finish_reason "stop" and the `ask --json` object in `ragqa`, then
        `[DONE]`. An error after the stream has started is an `error` event, which OpenAI clients raise."""
        events = self.events(question, history=history)  # bad input, a full queue: an HTTP error, not a stream
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": MODEL_ID}

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def lines() -> Iterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            try:
                for kind, value in events:
                    if kind == "token":
                        yield chunk({"content": value})
                    else:
                        if value["refused"] is False:
                            yield chunk({"content": sources_block(value)})
                        yield chunk({}, "stop", ragqa=value)
            except Exception as exc:  # noqa: BLE001 - the client gets the reason, not a cut-off stream
                error = {"error": {"message": stream_error(exc), "type": "server_error"}}
                yield f"data: {json.dumps(error, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return lines()


def create_app(settings: Settings, qa: QA | None = None, max_waiting: int = MAX_WAITING) -> Any:
    """The FastAPI app. The embedder and the model load here, before the first request, not during it."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    qa = qa or QA(settings)
    qa.prepare()
    _ = qa.llm, qa.index.embedder, qa.index.load_chunks()
    service = QAService(make_lanes(qa), max_waiting=max_waiting)

    app = FastAPI(title="ragqa", summary="Grounded, cited answers from your documents.", docs_url=None,
                  redoc_url=None, openapi_url=None)  # nothing beyond the API itself is served
    app.state.service = service

    def error(request: Request, message: str, status: int) -> JSONResponse:
        """{"error": "..."} on ragqa's own routes; OpenAI's {"error": {"message", "type"}} under /v1, which
        its clients turn into their own exceptions with the message."""
        body: dict[str, Any] = {"error": message}
        if request.url.path.startswith("/v1/"):
            kind = "server_error" if status >= 500 else "invalid_request_error"
            body = {"error": {"message": message, "type": kind}}
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RagqaError)
    def ragqa_error(request: Request, exc: RagqaError) -> JSONResponse:
        return error(request, str(exc), 503 if isinstance(exc, Busy) else 400)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error(request, f"invalid request: {problems}", 422)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.health()

    @app.post("/ask")
    def ask(body: AskBody) -> dict[str, Any]:
        return service.ask(body.question, k=body.k)

    @app.post("/ask/stream")
    def ask_stream(body: AskBody) -> StreamingResponse:
        return StreamingResponse(service.stream(body.question, k=body.k), media_type="application/x-ndjson")

    # OpenAI's chat API, so Open WebUI, LibreChat or any OpenAI client can use ragqa as a model.
    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "ragqa"}]}

    @app.post("/v1/chat/completions", response_model=None)
    def chat_completions(body: ChatBody) -> dict[str, Any] | StreamingResponse:
        question, history = chat_turns(body.messages)
        if body.stream:
            return StreamingResponse(service.chat_stream(question, history), media_type="text/event-stream")
        return completion(service.ask(question, history=history))

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
