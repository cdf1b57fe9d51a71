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

    def __init__(self, pause: float = 0.0) -> None:
        self.settings = make_settings(index="/nonexistent-index")
        self.llm = SimpleNamespace(name="fake-model")
        self.index = SimpleNamespace(embedder=object(), load_chunks=lambda: {"a": 1, "b": 2})
        self.pause = pause
        self.active = 0
        self.most_active = 0
        self.guard = threading.Lock()

    def prepare(self) -> None:
        pass

    def ask(self, question: str, k: int | None = None, on_token: Any = None, history: Any = None) -> Answer:
        self.history = history
        with self.guard:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
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
    service.lock.acquire()
    waiter = threading.Thread(target=service.ask, args=("first?",))
    waiter.start()
    while service._waiting < 1:
        time.sleep(0.01)
    with pytest.raises(Busy, match="already waiting"):
        service.ask("second?")
    service.lock.release()
    waiter.join()
    assert service._waiting == 0 and not service.lock.locked()


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
    resp = TestClient(app).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "是什么？"}]})
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
    assert not service.lock.locked()


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
