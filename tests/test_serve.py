import json
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ragqa.chain import Answer
from ragqa.config import Settings
from ragqa.serve import Busy, QAService, create_app

from .conftest import assert_one_line_error, free_port, make_settings, run_cli, running_server


class FakeQA:
    """Stands in for the pipeline in the logic tests: records how many questions run at once."""

    guard = threading.Lock()  # one for all instances: `crowd` counts across lanes

    def __init__(self, pause: float = 0.0, crowd: dict[str, int] | None = None) -> None:
        self.settings = make_settings(index="/nonexistent-index")
        self.llm = SimpleNamespace(name="fake-model")
        self.index = SimpleNamespace(embedder=object(), load_chunks=lambda: {"a": 1, "b": 2})
        self.pause = pause
        self.active = 0
        self.most_active = 0
        self.asked = 0
        self.crowd = crowd if crowd is not None else {"now": 0, "most": 0}

    def prepare(self) -> None:
        pass

    def ask(self, question: str, k: int | None = None, on_token: Any = None, history: Any = None) -> Answer:
        self.history = history
        with self.guard:
            self.active += 1
            self.asked += 1
            self.most_active = max(self.most_active, self.active)
            self.crowd["now"] += 1
            self.crowd["most"] = max(self.crowd["most"], self.crowd["now"])
        try:
            for word in ("答案", " [1]"):
                time.sleep(self.pause)
                if on_token:
                    on_token(word)
            return Answer(question, "答案 [1]", False, [{"n": 1, "source": "f.txt", "lines": [3, 4], "heading": "一"}],
                          [], "fake-model", {"total_ms": 1.0, "k": k, "prompt_tokens": 10, "completion_tokens": 2})
        finally:
            with self.guard:
                self.active -= 1
                self.crowd["now"] -= 1


def test_service_runs_one_question_at_a_time() -> None:
    qa = FakeQA(pause=0.01)
    service = QAService(qa)  # type: ignore[arg-type]
    results: list[dict] = []
    threads = [threading.Thread(target=lambda i=i: results.append(service.ask(f"问题 {i}？"))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and qa.most_active == 1
    assert sorted(r["question"] for r in results) == [f"问题 {i}？" for i in range(8)]


def test_service_refuses_when_too_many_wait() -> None:
    service = QAService(FakeQA(), max_waiting=1)  # type: ignore[arg-type]
    with service.lane():
        waiter = threading.Thread(target=service.ask, args=("first?",))
        waiter.start()
        while service._waiting < 1:
            time.sleep(0.01)
        with pytest.raises(Busy, match="already waiting"):
            service.ask("second?")
        assert service.health()["busy"] and service.health()["waiting"] == 1
    waiter.join()
    assert service._waiting == 0 and service.idle


def test_lanes_answer_at_once_each_one_question_at_a_time() -> None:
    """Three lanes, nine questions: three run together, never two on one lane (its per-call state)."""
    crowd = {"now": 0, "most": 0}
    lanes = [FakeQA(pause=0.05, crowd=crowd) for _ in range(3)]
    service = QAService(lanes)  # type: ignore[arg-type]
    threads = [threading.Thread(target=service.ask, args=(f"问题 {i}？",)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(q.most_active == 1 for q in lanes) and crowd["most"] == 3
    assert sum(q.asked for q in lanes) == 9 and service.idle and service.health()["lanes"] == 3


def test_lanes_only_for_a_model_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-process model: one lane whatever serve_parallel says. A model server: serve_parallel lanes over
    one index, each with its own client, whose retrievals take turns on one lock."""
    from ragqa import serve
    from ragqa.chain import QA
    from ragqa.errors import RagqaError

    clients: list[SimpleNamespace] = []
    monkeypatch.setattr(serve, "load_llm", lambda s: clients.append(SimpleNamespace(name="m")) or clients[-1])
    index = SimpleNamespace()
    local = QA(make_settings(serve_parallel=4), index=index, llm=SimpleNamespace(name="m"))  # type: ignore[arg-type]
    assert serve.make_lanes(local) == [local] and not clients
    remote = QA(make_settings(serve_parallel=3, llm_url="http://127.0.0.1:9/v1"), index=index,  # type: ignore[arg-type]
                llm=SimpleNamespace(name="m"))
    lanes = serve.make_lanes(remote)
    assert len(lanes) == 3 and lanes[0] is remote and all(q.index is index for q in lanes)
    assert [q.llm for q in lanes[1:]] == clients and len({id(q.llm) for q in lanes}) == 3
    locks = {id(q.retriever._lock) for q in lanes}  # noqa: SLF001
    assert len(locks) == 1 and lanes[1].retriever.k == remote.settings.k  # the wrapper passes attributes on
    with pytest.raises(RagqaError, match="serve_parallel must be 1 or more"):
        serve.make_lanes(QA(make_settings(serve_parallel=0, llm_url="http://127.0.0.1:9/v1"), index=index,  # type: ignore[arg-type]
                            llm=SimpleNamespace(name="m")))


def test_api_shapes_and_bad_input() -> None:
    from fastapi.testclient import TestClient

    client = TestClient(create_app(make_settings(), qa=FakeQA()))  # type: ignore[arg-type]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "fake-model" and health["chunks"] == 2
    ok = client.post("/ask", json={"question": "What is it?", "k": 3})
    assert ok.status_code == 200 and ok.json()["answer"] == "答案 [1]" and ok.json()["timings"]["k"] == 3
    lines = [json.loads(line) for line in client.post("/ask/stream", json={"question": "是什么？"}).text.splitlines()]
    assert [line["token"] for line in lines[:-1]] == ["答案", " [1]"] and lines[-1]["answer"]["citations"]
    for body, status, needle in [
        ({"question": "  "}, 400, "the question is empty"),
        ({"question": "长" * 100_000}, 400, "the limit is 2,000"),
        ({"k": 3}, 422, "question: Field required"),
        ({"question": "q", "k": 0}, 422, "k:"),
    ]:
        resp = client.post("/ask", json=body)
        assert resp.status_code == status and needle in resp.json()["error"], resp.text
    assert client.post("/ask/stream", json={"question": ""}).status_code == 400
    assert client.get("/README.md").status_code == 404 and client.get("/docs").status_code == 404


def test_openai_chat_api_shapes_history_and_errors() -> None:
    from fastapi.testclient import TestClient

    qa = FakeQA()
    client = TestClient(create_app(make_settings(), qa=qa))  # type: ignore[arg-type]
    assert client.get("/v1/models").json()["data"][0]["id"] == "ragqa"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "杰文斯悖论是什么？"},
                {"role": "assistant", "content": "一个悖论 [1]"},
                {"role": "user", "content": [{"type": "text", "text": "谁提出的？"}]}]
    body = client.post("/v1/chat/completions", json={"model": "ragqa", "messages": messages, "temperature": 0.7}).json()
    assert qa.history == [("杰文斯悖论是什么？", "一个悖论 [1]")]  # earlier turns are the chat's history
    assert body["object"] == "chat.completion" and body["ragqa"]["question"] == "谁提出的？"
    assert body["choices"][0]["message"]["content"] == "答案 [1]\n\n来源：\n[1] f.txt:3-4 一"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    events = [line.removeprefix("data: ") for line in client.post(
        "/v1/chat/completions", json={"messages": messages[-1:], "stream": True}).text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == body["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["ragqa"]["citations"]
    for bad, status, needle in [
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "the last message must be the user's"),
        ({"messages": [{"role": "user", "content": " "}]}, 400, "the question is empty"),
    ]:
        resp = client.post("/v1/chat/completions", json=bad)
        assert resp.status_code == status and needle in resp.json()["error"]["message"], resp.text


def test_a_full_queue_says_when_to_retry() -> None:
    from fastapi.testclient import TestClient

    app = create_app(make_settings(), qa=FakeQA(), max_waiting=0)  # type: ignore[arg-type]
    with app.state.service.lane():  # the one lane is answering, and no request may wait for it
        body = {"messages": [{"role": "user", "content": "是什么？"}]}
        resp = TestClient(app).post("/v1/chat/completions", json=body)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    assert "waiting" in resp.json()["error"]["message"]


def test_an_error_mid_stream_is_the_streams_last_line() -> None:
    from ragqa.errors import RagqaError

    class Failing(FakeQA):
        def ask(self, question: str, k: int | None = None, on_token: Any = None, history: Any = None) -> Answer:
            on_token("部分")
            raise RagqaError("the model server stopped mid-answer")

    service = QAService(Failing())  # type: ignore[arg-type]
    lines = [json.loads(line) for line in service.stream("是什么？")]
    assert lines == [{"token": "部分"}, {"error": "the model server stopped mid-answer"}]
    events = service.events("是什么？")
    assert next(events) == ("token", "部分")
    with pytest.raises(RagqaError, match="stopped mid-answer"):
        next(events)  # outside HTTP the error is raised, in the consumer's thread
    assert service.idle


def test_serve_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), env={"RAGQA_INDEX": str(tmp_path / "idx")})
    assert_one_line_error(proc, f"cannot listen on 127.0.0.1:{port}")


# ---- the real thing: `ragqa serve` as a process, the small model, the session's corpus index ----------------
def post(url: str, body: dict, timeout: float = 900) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


@pytest.fixture(scope="module")
def server(corpus_settings: Settings, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir),
           "RAGQA_MODEL": corpus_settings.model, "RAGQA_MAX_TOKENS": "48"}
    url = f"http://127.0.0.1:{port}"
    with running_server([sys.executable, "-c", "from ragqa.cli import main; main()", "serve", "--port", str(port)],
                        url + "/health", log, env=env):
        yield url
    assert "Traceback" not in log.read_text(encoding="utf-8"), log.read_text(encoding="utf-8")


QUESTIONS = [
    "杰文斯悖论是谁提出的？", "What is the Jevons paradox?", "什么是专家混合模型？", "Who proposed the Jevons paradox?",
    "杰文斯悖论是什么？", "What is a mixture of experts model?", "OpenAI 在 2024 年向欧盟缴纳了多少罚款？",
    "什么是过程监督学习？",
]


@pytest.mark.slow
def test_serve_answers_eight_concurrent_requests(server: str, corpus_settings: Settings) -> None:
    health = json.loads(urllib.request.urlopen(server + "/health", timeout=30).read())
    assert health["status"] == "ok" and health["model"] == corpus_settings.model and health["chunks"] > 100
    results: dict[int, tuple[int, Any]] = {}

    def ask(i: int, question: str) -> None:
        results[i] = post(server + "/ask", {"question": question})

    threads = [threading.Thread(target=ask, args=(i, q)) for i, q in enumerate(QUESTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(QUESTIONS)
    for i, (status, text) in results.items():
        assert status == 200, text
        body = json.loads(text)
        assert body["question"] == QUESTIONS[i]
        assert isinstance(body["answer"], str) and body["answer"] and isinstance(body["refused"], bool)
        assert body["model"] == corpus_settings.model and isinstance(body["citations"], list)
        for c in body["citations"]:
            assert 1 <= c["n"] <= len(body["context"]) and Path(c["source"]).is_file()
    assert any(not json.loads(text)["refused"] for _, text in results.values())


@pytest.mark.slow
def test_serve_streams_and_rejects_bad_input(server: str) -> None:
    status, text = post(server + "/ask/stream", {"question": "杰文斯悖论是什么？"})
    assert status == 200, text
    lines = [json.loads(line) for line in text.splitlines()]
    tokens = [line["token"] for line in lines if "token" in line]
    final = lines[-1]["answer"]
    assert tokens and final["answer"] and isinstance(final["citations"], list) and final["model"]
    if not final["refused"]:
        assert "".join(tokens).strip() == final["answer"]  # the stream is the answer, as the user saw it
    status, text = post(server + "/ask", {"question": ""})
    assert status == 400 and json.loads(text)["error"] == "the question is empty"


@pytest.mark.slow
def test_the_openai_client_streams_a_cited_answer_from_serve(server: str) -> None:
    """What Open WebUI or LibreChat do: list the models, then stream a chat completion, with the openai client."""
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["ragqa"]
    stream = client.chat.completions.create(model="ragqa", stream=True,
                                            messages=[{"role": "user", "content": "杰文斯悖论是什么？"}])
    pieces, last = [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        last = chunk
    text = "".join(pieces)
    answer = last.model_extra["ragqa"]  # the whole `ask --json` object rides in the last chunk
    assert last.choices[0].finish_reason == "stop" and answer["citations"] and not answer["refused"]
    assert text.startswith(answer["answer"]) and re.search(r"\n\n来源：\n\[\d+\] corpus/", text), text
    assert all(Path(c["source"]).is_file() for c in answer["citations"])
    with pytest.raises(openai.BadRequestError, match="the question is empty"):
        client.chat.completions.create(model="ragqa", messages=[{"role": "user", "content": ""}])


@pytest.mark.slow
def test_serve_with_a_model_server_answers_in_lanes(llama_server: str, corpus_settings: Settings,
                                                    tmp_path: Path) -> None:
    """`serve --llm-url --parallel 3` against a real llama_cpp.server: three questions at once, each answered
    whole, a question asked twice at once answered alike, and alike again when asked alone (no lane's
    per-call state leaks into another's). Whether the server batches them is its own affair: this one takes
    turns; `llama-server --parallel N` batches."""
    port = free_port()
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir),
           "RAGQA_HOME": str(tmp_path / "home"), "RAGQA_MAX_TOKENS": "48"}
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    questions = ["杰文斯悖论是谁提出的？", "Who proposed the Jevons paradox?", "杰文斯悖论是谁提出的？"]
    cmd = [sys.executable, "-c", "from ragqa.cli import main; main()", "serve", "--port", str(port),
           "--llm-url", llama_server, "--parallel", "3"]
    with running_server(cmd, url + "/health", log, env=env):
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=30).read())
        assert health["lanes"] == 3 and health["answering"] == 0
        results: dict[int, tuple[int, Any]] = {}
        threads = [threading.Thread(target=lambda i=i, q=q: results.__setitem__(i, post(url + "/ask", {"question": q})))
                   for i, q in enumerate(questions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alone = post(url + "/ask", {"question": questions[0]})
    bodies = []
    for status, text in [results[i] for i in range(len(questions))] + [alone]:
        assert status == 200, text
        bodies.append(json.loads(text))
    for body, question in zip(bodies, questions + questions[:1], strict=True):
        assert body["question"] == question and body["answer"] and body["model"].endswith(f"@ {llama_server}")
        for c in body["citations"]:
            assert 1 <= c["n"] <= len(body["context"])
    same = [bodies[0], bodies[2], bodies[3]]
    assert len({b["answer"] for b in same}) == 1, [b["answer"] for b in same]
    assert len({b["timings"]["prompt_tokens"] for b in same}) == 1
    assert bodies[1]["translated_question"]  # the English one took its translation call in its own lane
    assert "Traceback" not in log.read_text(encoding="utf-8")
