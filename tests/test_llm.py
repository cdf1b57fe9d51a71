import json
import math
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ragqa import models
from ragqa.config import Settings
from ragqa.errors import RagqaError
from ragqa.llm import RETRY_DELAYS, LlamaCppChat, OpenAIChat, estimate_tokens, gguf_metadata, model_params

from .conftest import CHECKED, ROOT, SMALL_MODEL, assert_one_line_error, free_port, make_settings, run_cli


def _tiny_gguf(path: Path, arch: str) -> Path:
    """A syntactically valid GGUF header with one key and no tensors (no chat template)."""
    key, value = b"general.architecture", arch.encode()
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    data += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value
    path.write_bytes(data)
    return path


def test_gguf_metadata_of_a_real_model(models_dir: Path) -> None:
    meta = gguf_metadata(models.final_path(models.REGISTRY["qwen2.5-coder-0.5b-instruct"], models_dir))
    assert meta["general.architecture"] == "qwen2"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def test_file_without_chat_template_names_the_flag(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "bare.gguf", "llama")
    with pytest.raises(RagqaError, match="--chat-format"):
        LlamaCppChat(make_settings(model=str(path)))


def test_unknown_architecture_is_one_line(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "alien.gguf", "alien-arch-9000")
    with pytest.raises(RagqaError, match="alien-arch-9000") as info:
        LlamaCppChat(make_settings(model=str(path), chat_format="chatml"))
    assert "\n" not in str(info.value)


def test_truncated_gguf_is_refused(tmp_path: Path, models_dir: Path) -> None:
    src = models.final_path(models.REGISTRY["smollm2-135m-instruct"], models_dir)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: 3_000_000])
    with pytest.raises(RagqaError):
        LlamaCppChat(make_settings(model=str(cut)))


@pytest.mark.slow
def test_real_model_streams_and_reports_usage(models_dir: Path) -> None:
    llm = LlamaCppChat(make_settings(model="smollm2-135m-instruct", models=models_dir, max_tokens=16))
    pieces = list(llm.stream([{"role": "user", "content": "Say hello."}], max_tokens=16))
    assert len(pieces) >= 2 and "".join(pieces).strip()
    assert llm.usage["completion_tokens"] == len(pieces)
    assert llm.usage["prompt_tokens"] and llm.usage["prompt_tokens"] > 3
    assert llm.count_tokens("hello world") >= 2


@pytest.mark.slow
@pytest.mark.parametrize("repack", [True, False])
def test_repack_switch_reaches_llama_cpp(models_dir: Path, capfd: pytest.CaptureFixture[str], repack: bool) -> None:
    """`repack` must really change how llama.cpp loads the weights (its log names the extra buffer: CPU_REPACK,
    or AMX on a CPU with AMX), and the patched defaults must not outlive the load."""
    import llama_cpp.llama as llama_module
    from llama_cpp import Llama

    default = llama_module.llama_cpp.llama_model_default_params
    path = models.final_path(models.REGISTRY[SMALL_MODEL], models_dir)
    capfd.readouterr()
    with model_params(use_extra_bufts=repack):
        Llama(str(path), n_ctx=256, verbose=True)
    assert bool(re.search(r"\b(CPU_REPACK|AMX) model buffer", capfd.readouterr().err)) is repack
    assert llama_module.llama_cpp.llama_model_default_params is default


# ---- saved system-prompt states (PrefixCache) -------------------------------------------------------------
SECRET_ZH = "你是助手。暗号是“菠萝”。用户问暗号时，只回答暗号这个词。"
SECRET_EN = "You are an assistant. The password is 'pineapple'. When asked for the password, reply with it only."


def _ask(llm: LlamaCppChat, system: str, question: str) -> str:
    return "".join(llm.stream([{"role": "system", "content": system}, {"role": "user", "content": question}], 12))


@pytest.mark.slow
def test_system_prompt_state_is_saved_once_and_loaded_by_a_new_process(models_dir: Path, tmp_path: Path) -> None:
    """The second model instance never evaluates the system prompt: it loads its KV state from disk, and the
    model still knows what only that prompt said."""
    settings = make_settings(model=SMALL_MODEL, models=models_dir, home=tmp_path)
    first = LlamaCppChat(settings)
    assert "pineapple" in _ask(first, SECRET_EN, "What is the password?").lower()
    saved = list((tmp_path / "cache" / "prompts").glob("*.npz"))
    assert len(saved) == 1 and first.prefixes and first.prefixes.loaded_tokens > 20
    del first

    second = LlamaCppChat(settings)
    assert second.prefixes and second.prefixes._read(SECRET_EN) is not None  # noqa: SLF001
    assert "pineapple" in _ask(second, SECRET_EN, "What is the password?").lower()
    assert second.prefixes.loaded_tokens > 20  # restored, not evaluated
    assert list((tmp_path / "cache" / "prompts").glob("*.npz")) == saved  # nothing new written

    # Switching system prompts (the other language, a follow-up's rewrite call) restores each one's state.
    assert "菠萝" in _ask(second, SECRET_ZH, "暗号是什么？")
    assert "pineapple" in _ask(second, SECRET_EN, "What is the password?").lower()
    assert "菠萝" in _ask(second, SECRET_ZH, "暗号是什么？")
    assert len(list((tmp_path / "cache" / "prompts").glob("*.npz"))) == 2


@pytest.mark.slow
def test_a_corrupt_or_foreign_state_file_costs_time_not_the_answer(models_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(model=SMALL_MODEL, models=models_dir, home=tmp_path)
    LlamaCppChat(settings).prefixes.restore(SECRET_EN)  # type: ignore[union-attr]
    [path] = (tmp_path / "cache" / "prompts").glob("*.npz")
    import numpy as np

    with np.load(path) as saved:
        ids, state = saved["ids"], saved["state"]
    np.savez(path, ids=ids, state=state[: len(state) // 3])  # a truncated state: llama.cpp refuses it
    llm = LlamaCppChat(settings)
    assert "pineapple" in _ask(llm, SECRET_EN, "What is the password?").lower()
    path.write_bytes(b"not a numpy file")
    llm = LlamaCppChat(settings)
    assert "pineapple" in _ask(llm, SECRET_EN, "What is the password?").lower()
    assert np.load(path)["ids"].size > 20  # evaluated again and saved anew

    off = LlamaCppChat(settings.replace(prompt_cache=False))
    assert off.prefixes is None and "pineapple" in _ask(off, SECRET_EN, "What is the password?").lower()


# ---- OpenAI-compatible servers: logic against a scripted HTTP server on loopback ------------------------
class Scripted:
    """A scripted HTTP/1.1 server: each "METHOD /path" has a list of replies used in turn (the last repeats)."""

    def __init__(self, routes: dict[str, list[Callable[[BaseHTTPRequestHandler], None]]]) -> None:
        self.routes = routes
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = f"{self.command} {self.path}"
                outer.seen.append((key, {k.lower(): v for k, v in self.headers.items()}, body))
                replies = outer.routes.get(key) or [reply_json(404, {"detail": "Not Found"})]
                reply = replies[0] if len(replies) == 1 else replies.pop(0)
                try:
                    reply(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first: what the timeout tests want

            do_GET = do_POST = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def count(self, key: str) -> int:
        return sum(1 for k, _, _ in self.seen if k == key)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply_json(status: int, obj: object) -> Callable[[BaseHTTPRequestHandler], None]:
    def send(h: BaseHTTPRequestHandler) -> None:
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return send


def reply_sse(pieces: list[str], drop: bool = False, delay: float = 0.0,
              finish: str | None = "stop") -> Callable[[BaseHTTPRequestHandler], None]:
    """A chat-completions stream, chunked; `drop` cuts the connection after the pieces, mid-body; `finish`
    None ends it with [DONE] and no finish reason, as llama-cpp-python's server cuts a stream."""

    def send(h: BaseHTTPRequestHandler) -> None:
        time.sleep(delay)
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        events = [{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                   "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
        if finish and not drop:
            events.append({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                           "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        for event in events:
            data = f"data: {json.dumps(event)}\n\n".encode()
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()
        if drop:
            h.wfile.write(b"ff\r\ndata: {")
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        done = b"data: [DONE]\n\n"
        h.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))

    return send


MODELS = reply_json(200, {"object": "list", "data": [{"id": "tiny-model", "object": "model"}]})


@pytest.fixture
def scripted():
    servers: list[Scripted] = []

    def start(routes: dict) -> Scripted:
        servers.append(Scripted(routes))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def openai_chat(url: str, sleeps: list[float] | None = None, **settings: object) -> OpenAIChat:
    record = sleeps.append if sleeps is not None else (lambda _: None)
    return OpenAIChat(make_settings(llm_url=url, **settings), sleep=record)


def test_estimate_tokens_counts_cjk_per_character() -> None:
    assert estimate_tokens("杰文斯悖论") == 5
    assert estimate_tokens("abcdef") == 2
    assert estimate_tokens("效率 up") >= 3


def test_down_server_fails_after_bounded_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    sleeps: list[float] = []
    with pytest.raises(RagqaError, match=r"cannot reach the model server at .* \(connection refused\)") as info:
        openai_chat(url, sleeps)
    assert sleeps == list(RETRY_DELAYS) and url in str(info.value)


def test_5xx_is_retried_then_succeeds(scripted) -> None:
    busy = reply_json(503, {"error": "loading"})
    server = scripted({"GET /v1/models": [busy, busy, MODELS]})
    sleeps: list[float] = []
    llm = openai_chat(server.url, sleeps)
    assert llm.name == f"tiny-model @ {server.url}" and server.count("GET /v1/models") == 3
    assert sleeps == list(RETRY_DELAYS)


def test_persistent_5xx_gives_up_with_the_status(scripted) -> None:
    server = scripted({"GET /v1/models": [reply_json(500, {"error": "boom"})]})
    with pytest.raises(RagqaError, match=r"cannot reach .* \(HTTP 500\)"):
        openai_chat(server.url)
    assert server.count("GET /v1/models") == 1 + len(RETRY_DELAYS)


def test_not_an_openai_server_is_named_without_retrying(scripted) -> None:
    server = scripted({})
    with pytest.raises(RagqaError, match=r"is not an OpenAI-compatible API \(GET .*/models: HTTP 404\)"):
        openai_chat(server.url)
    assert server.count("GET /v1/models") == 1
    html = scripted({"GET /models": [reply_json(200, ["not", "a", "model", "list"])]})
    with pytest.raises(RagqaError, match=r"did not return a model list.*did you mean .*/v1\?"):
        openai_chat(html.url.removesuffix("/v1"))


def test_unknown_model_lists_what_the_server_serves(scripted) -> None:
    server = scripted({"GET /v1/models": [MODELS]})
    with pytest.raises(RagqaError, match=r"does not serve 'gpt-9'; it serves: tiny-model"):
        openai_chat(server.url, llm_model="gpt-9")


def test_api_key_comes_from_the_named_variable(scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    server = scripted({"GET /v1/models": [MODELS], "POST /v1/chat/completions": [reply_sse(["ok"])]})
    with pytest.raises(RagqaError, match="RAGQA_TEST_KEY"):
        openai_chat(server.url, api_key_env="RAGQA_TEST_KEY")
    monkeypatch.setenv("RAGQA_TEST_KEY", "sekrit")
    llm = openai_chat(server.url, api_key_env="RAGQA_TEST_KEY")
    assert "".join(llm.stream([{"role": "user", "content": "hi"}], max_tokens=8)) == "ok"
    assert all(h.get("authorization") == "Bearer sekrit" for _, h, _ in server.seen)


def test_stream_retries_only_before_the_first_token(scripted) -> None:
    chat = "POST /v1/chat/completions"
    busy = reply_json(503, {"error": "busy"})
    server = scripted({"GET /v1/models": [MODELS], chat: [busy, reply_sse(["杰文斯", "悖论"])]})
    sleeps: list[float] = []
    llm = openai_chat(server.url, sleeps)
    assert list(llm.stream([{"role": "user", "content": "问题"}], max_tokens=8)) == ["杰文斯", "悖论"]
    assert server.count(chat) == 2 and sleeps == [RETRY_DELAYS[0]]
    assert llm.usage["completion_tokens"] == 2 and llm.usage["prompt_tokens"] >= estimate_tokens("问题")
    request = json.loads(server.seen[-1][2])
    assert request["model"] == "tiny-model" and request["stream"] is True and request["temperature"] == 0
    assert request["max_tokens"] == 8 and "max_completion_tokens" not in request  # the field servers read

    cut = scripted({"GET /v1/models": [MODELS], chat: [reply_sse(["The answer", " is"], drop=True)]})
    llm = openai_chat(cut.url)
    got: list[str] = []
    with pytest.raises(RagqaError, match="stopped mid-answer"):
        for piece in llm.stream([{"role": "user", "content": "q"}], max_tokens=8):
            got.append(piece)
    assert got == ["The answer", " is"] and cut.count(chat) == 1  # never re-sent after tokens reached the user

    # [DONE] without a finish reason: llama-cpp-python's server ends a stream so when another request arrives.
    # The answer so far must not pass for whole.
    ended = scripted({"GET /v1/models": [MODELS], chat: [reply_sse(["The answer", " is"], finish=None)]})
    got.clear()
    with pytest.raises(RagqaError, match=r"ended the answer without a finish reason.*--interrupt_requests False"):
        for piece in openai_chat(ended.url).stream([{"role": "user", "content": "q"}], max_tokens=8):
            got.append(piece)
    assert got == ["The answer", " is"] and ended.count(chat) == 1


def test_silent_server_times_out_without_resending(scripted) -> None:
    chat = "POST /v1/chat/completions"
    server = scripted({"GET /v1/models": [MODELS], chat: [reply_sse(["late"], delay=3)]})
    llm = openai_chat(server.url, llm_timeout=0.5)
    with pytest.raises(RagqaError, match=r"cannot reach .* \(no reply within 0.5 s"):
        list(llm.stream([{"role": "user", "content": "q"}], max_tokens=8))
    assert server.count(chat) == 1


def test_chat_errors_from_the_server_are_one_line(scripted) -> None:
    chat = "POST /v1/chat/completions"
    overflow = reply_json(400, {"error": {"message": "Requested tokens (9000) exceed context window of 2048"}})
    server = scripted({"GET /v1/models": [MODELS], chat: [overflow]})
    with pytest.raises(RagqaError, match=r"does not fit the server's context .* set n_ctx") as info:
        list(openai_chat(server.url).stream([{"role": "user", "content": "q"}], max_tokens=8))
    assert "\n" not in str(info.value) and server.count(chat) == 1


def test_server_tokenizer_is_used_when_offered(scripted) -> None:
    tokens = reply_json(200, {"tokens": [1, 2, 3, 4]})
    server = scripted({"GET /v1/models": [MODELS], "POST /tokenize": [tokens]})
    llm = openai_chat(server.url)
    assert llm.count_tokens("任何文本") == 4
    assert json.loads(server.seen[-1][2])["content"] == "任何文本"
    plain = scripted({"GET /v1/models": [MODELS]})
    assert openai_chat(plain.url).count_tokens("任何文本 and more") == estimate_tokens("任何文本 and more")


# ---- a real llama-cpp-python OpenAI-compatible server on loopback (conftest.llama_server) -----------------
@pytest.mark.slow
def test_ask_answers_through_a_llama_cpp_server(llama_server: str, corpus_settings: Settings) -> None:
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir),
           "RAGQA_MAX_TOKENS": "64"}
    proc = run_cli("ask", "杰文斯悖论是谁提出的？", "--json", "--llm-url", llama_server, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["model"] == f"{SMALL_MODEL} @ {llama_server}"
    assert result["answer"] and result["refused"] is False and result["citations"], result
    for c in result["citations"]:
        r = result["context"][c["n"] - 1]
        assert (c["source"], c["start"], c["end"]) == (r["source"], r["start"], r["end"])
        assert Path(c["source"]).read_text(encoding="utf-8")[c["start"] : c["end"]] == c["text"]
    assert result["timings"]["completion_tokens"] > 0 and result["timings"]["prompt_tokens"] > 100


@pytest.mark.slow
@pytest.mark.parametrize("question", ["杰文斯悖论是什么？", "Who proposed the Jevons paradox?"])
def test_a_llama_cpp_server_gives_the_in_process_answer(llama_server: str, corpus_settings: Settings,
                                                         tmp_path: Path, question: str) -> None:
    """Same model file, same prompt, temperature 0: `--llm-url` and in-process answer alike, token for token,
    with the same citations and the same prompt size (the English question also takes the translation step
    through the server)."""
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir),
           "RAGQA_HOME": str(tmp_path / "home"), "RAGQA_MAX_TOKENS": "96", **CHECKED}  # the check's calls too
    local = run_cli("ask", question, "--json", "--model", SMALL_MODEL, env=env)
    remote = run_cli("ask", question, "--json", "--llm-url", llama_server, env=env)
    assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a.get("translated_question") == b.get("translated_question")
    assert a["context"] == b["context"]  # the same passages, cut to the same sentences: the same prompt
    assert (a["answer"], a["refused"]) == (b["answer"], b["refused"]), (a["answer"], b["answer"])
    assert [c["source"] for c in a["citations"]] == [c["source"] for c in b["citations"]]
    assert a["timings"]["completion_tokens"] == b["timings"]["completion_tokens"]
    assert a["timings"]["prompt_tokens"] == b["timings"]["prompt_tokens"]
    for key in ("refusal_p", "refusal_check", "refusal_score"):  # read off logits here and logprobs there
        assert abs(a[key] - b[key]) < 0.05, (key, a[key], b[key])


@pytest.mark.slow
def test_backend_uses_the_servers_tokenizer_and_streams_english(llama_server: str, models_dir: Path) -> None:
    llm = OpenAIChat(make_settings(llm_url=llama_server, max_tokens=16))
    local = LlamaCppChat(make_settings(model=SMALL_MODEL, models=models_dir))
    for text in ("The Jevons paradox", "杰文斯悖论是谁提出的？"):
        assert abs(llm.count_tokens(text) - local.count_tokens(text)) <= 1  # the server may add a BOS token
    pieces = list(llm.stream([{"role": "user", "content": "Say hello in English."}], max_tokens=16))
    assert len(pieces) >= 2 and "".join(pieces).strip()
    assert llm.usage["completion_tokens"] == len(pieces) and llm.usage["prompt_tokens"] > 3


@pytest.mark.slow
def test_first_token_probabilities_agree_in_process_through_a_server_and_with_the_gate(
    llama_server: str, models_dir: Path, tmp_path: Path
) -> None:
    """The answerability check's reading: the same probabilities from llama.cpp's logits in-process and from
    a server's logprobs, and, in-process, the same as the gate reads off the next call on the same prompt
    (which reuses the evaluated prompt)."""
    from ragqa.llm import RefusalGate

    messages = [{"role": "system", "content": "You answer only Yes or No."},
                {"role": "user", "content": "Is Paris the capital of France? Reply only Yes or No.\nReply:"}]
    starts = {"yes": ["Yes"], "no": ["No"]}
    local = LlamaCppChat(make_settings(model=SMALL_MODEL, models=models_dir, home=tmp_path / "home"))
    here = local.first_token_probs(messages, starts)
    there = OpenAIChat(make_settings(llm_url=llama_server)).first_token_probs(messages, starts)
    assert here and there and 0.9 < here["yes"] + here["no"] <= 1.0 + 1e-9  # told to, it says Yes or No
    assert min(here.values()) > 0.01  # both read (the 0.5B is unsure: "No" 0.57 for Paris, 2026-12-07)
    assert here == pytest.approx(there, abs=0.02)
    gate = RefusalGate(None)
    list(local.stream(messages, max_tokens=1, gate=gate, sentinel="Yes"))
    assert gate.p == pytest.approx(here["yes"], abs=1e-4)


@pytest.mark.slow
def test_eval_records_the_server_model(llama_server: str, corpus_settings: Settings, tmp_path: Path) -> None:
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir),
           "RAGQA_CORPUS": str(ROOT / "corpus"), "RAGQA_MAX_TOKENS": "32"}
    out = tmp_path / "run"
    proc = run_cli("eval", str(ROOT / "evals" / "corpus_qa.jsonl"), "--limit", "1", "--llm-url", llama_server,
                   "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["config"]["model"] == f"{SMALL_MODEL} @ {llama_server}"
    assert summary["config"]["llm_url"] == llama_server
    record = json.loads((out / "results.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert record["model"] == f"{SMALL_MODEL} @ {llama_server}" and record["answer"]


@pytest.mark.slow
def test_unknown_model_and_wrong_path_on_a_real_server_are_one_line(llama_server: str, tmp_path: Path) -> None:
    env = {"RAGQA_INDEX": str(tmp_path / "idx")}
    proc = run_cli("ask", "问题？", "--llm-url", llama_server, "--llm-model", "gpt-4o", env=env)
    assert_one_line_error(proc, "does not serve 'gpt-4o'", f"it serves: {SMALL_MODEL}")
    root = llama_server.removesuffix("/v1")
    proc = run_cli("ask", "问题？", "--llm-url", root, env=env)
    assert_one_line_error(proc, "not an OpenAI-compatible API", "HTTP 404", f"did you mean {llama_server}?")


def test_cli_down_server_and_non_openai_server_are_one_line(tmp_path: Path, scripted) -> None:
    env = {"RAGQA_INDEX": str(tmp_path / "idx")}
    down = f"http://127.0.0.1:{free_port()}/v1"
    proc = run_cli("ask", "问题？", "--llm-url", down, env=env)
    assert_one_line_error(proc, f"cannot reach the model server at {down} (connection refused)")
    web = scripted({"GET /": [reply_json(200, {"hello": "world"})]})  # a web server, but no OpenAI API
    proc = run_cli("ask", "What is it?", "--llm-url", web.url, env=env)
    assert_one_line_error(proc, f"{web.url} is not an OpenAI-compatible API", "HTTP 404")
    proc = run_cli("ask", "What is it?", "--llm-url", "ftp://example/v1", env=env)
    assert_one_line_error(proc, "must be an http(s) URL")


def test_openai_backend_never_touches_tiktoken(scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    import tiktoken

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tiktoken would download its encodings")

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    monkeypatch.setattr(tiktoken, "encoding_for_model", no_download)
    server = scripted({"GET /v1/models": [MODELS], "POST /v1/chat/completions": [reply_sse(["好"])]})
    llm = openai_chat(server.url)
    assert llm.count_tokens("杰文斯悖论") == 5 and list(llm.stream([{"role": "user", "content": "q"}], 4)) == ["好"]


def test_refusal_gate_measures_forces_and_bans_the_sentinel() -> None:
    import numpy as np

    from ragqa.llm import RefusalGate

    scores = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))  # tokens 1 and 3 start the sentinel
    measure = RefusalGate(None)
    assert np.array_equal(measure.processor([1, 3])(None, scores), scores) and measure.p == pytest.approx(0.35)
    assert not measure.refuses  # without a threshold it only measures
    forced = RefusalGate(0.3)
    out = forced.processor([1, 3])(None, scores)
    assert forced.refuses and int(np.argmax(out)) == 1 and np.isinf(out[[0, 2, 3]]).all()  # at the threshold
    banned = RefusalGate(0.4)
    apply = banned.processor([1, 3])
    out = apply(None, scores)
    assert not banned.refuses and int(np.argmax(out)) == 0 and np.isinf(out[[1, 3]]).all()  # below it: answer
    later = np.log(np.array([0.1, 0.6, 0.2, 0.1], dtype=np.float32))
    assert np.isinf(apply(None, later)[[1, 3]]).all() and banned.p == pytest.approx(0.35)  # banned all along


def test_the_gates_score_weighs_the_sentinel_and_adds_the_checks_offset() -> None:
    import numpy as np

    from ragqa.llm import RefusalGate, logit, sigmoid

    scores = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))  # P(sentinel) = 0.35 at tokens 1, 3
    plain = RefusalGate(0.3)
    plain.processor([1, 3])(None, scores)
    assert plain.score == plain.p == pytest.approx(0.35) and plain.refuses  # weight 1, offset 0: the probability itself
    shifted = RefusalGate(0.5, weight=0.5, offset=1.0)
    assert shifted.score is None and not shifted.refuses  # nothing measured yet
    out = shifted.processor([1, 3])(None, scores)
    assert shifted.score == pytest.approx(sigmoid(0.5 * logit(0.35) + 1.0)) and shifted.refuses
    assert np.isinf(out[[0, 2, 3]]).all()  # refused although the sentinel itself was not likely
    lowered = RefusalGate(0.5, weight=0.5, offset=-1.0)
    out = lowered.processor([1, 3])(None, scores)
    assert not lowered.refuses and np.isinf(out[[1, 3]]).all()  # answered, the sentinel banned
    assert sigmoid(-800) == pytest.approx(0.0) and sigmoid(800) == pytest.approx(1.0)
    assert abs(logit(0.0)) < 20 and logit(0.5) == 0.0


def _tokenizer_reply(server_ref: list) -> Callable[[BaseHTTPRequestHandler], None]:
    """A /tokenize endpoint over the text it was sent: "NOT" and " NOT" are one token each, else a character."""

    def send(h: BaseHTTPRequestHandler) -> None:
        text = json.loads(server_ref[0].seen[-1][2])["content"]
        ids: list[int] = []
        for form, tid in ((" NOT", 2000), ("NOT", 1000)):
            if text.startswith(form):
                ids, text = [tid], text[len(form):]
                break
        reply_json(200, {"tokens": ids + [ord(c) for c in text]})(h)

    return send


def test_the_server_gate_reads_the_sentinel_from_logprobs_and_bans_it_by_logit_bias(scripted) -> None:
    """The in-process gate's decision through an OpenAI-compatible server: P(sentinel) from a one-token reply's
    top logprobs, the sentinel itself at or above the threshold, a logit_bias ban below it."""
    from ragqa.chain import SENTINEL
    from ragqa.llm import RefusalGate

    top = [{"token": "NOT", "logprob": math.log(0.3)}, {"token": " NOT", "logprob": math.log(0.2)},
           {"token": "杰", "logprob": math.log(0.45)}, {"token": "N", "logprob": math.log(0.05)}]
    probe = reply_json(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "NOT"},
                                          "logprobs": {"content": [{"token": "NOT", "logprob": math.log(0.3),
                                                                    "top_logprobs": top}]}}]})
    ref: list = []
    server = scripted({"GET /v1/models": [MODELS], "POST /tokenize": [_tokenizer_reply(ref)],
                       "POST /v1/chat/completions": [probe, reply_sse(["杰文斯", "悖论 [1]"]), probe]})
    ref.append(server)
    llm = openai_chat(server.url)
    assert llm.refusal_gate
    messages = [{"role": "user", "content": "杰文斯悖论是什么？"}]
    below = RefusalGate(0.6)
    assert "".join(llm.stream(messages, max_tokens=8, gate=below, sentinel=SENTINEL)) == "杰文斯悖论 [1]"
    assert below.p == pytest.approx(0.5) and not below.refuses  # "NOT" and " NOT", not the stray "N"
    posts = [json.loads(b) for k, _, b in server.seen if k == "POST /v1/chat/completions"]
    assert posts[0]["max_tokens"] == 1 and posts[0]["logprobs"] is True and posts[0]["messages"] == messages
    assert posts[1]["logit_bias"] == {"1000": -100.0, "2000": -100.0} and posts[1]["stream"] is True
    at = RefusalGate(0.5)
    assert list(llm.stream(messages, max_tokens=8, gate=at, sentinel=SENTINEL)) == [SENTINEL] and at.refuses
    assert server.count("POST /v1/chat/completions") == 3  # a refusal streams nothing
