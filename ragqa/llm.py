"""Answering models behind one small interface, chosen by a registry of backends.

The chain only needs three things from a model: stream a chat reply as text pieces, count tokens (to fit
the prompt in the context window), and report usage afterwards. A backend is a class with that shape,
registered under a name in `BACKENDS`, the way simonw/llm registers model plugins; `load_llm` picks one
from the settings. The llama.cpp backend is LangChain's `ChatLlamaCpp` (the chat-model interface over
llama-cpp-python), so the chat template comes from the GGUF's own metadata. The "openai" backend is
LangChain's `ChatOpenAI` pointed at any OpenAI-compatible server (llama.cpp's llama-server,
llama-cpp-python's server, vLLM, Ollama), so the model can live in another process or on another machine.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import re
import struct
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ragqa import kernels, models
from ragqa.config import Settings
from ragqa.errors import RagqaError
from ragqa.kernels import Kernel

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": ...}


class ChatModel(Protocol):
    name: str
    n_ctx: int
    usage: dict[str, int | None]

    def stream(self, messages: list[Message], max_tokens: int) -> Iterator[str]: ...

    def count_tokens(self, text: str) -> int: ...


class RefusalGate:
    """Decides "not in the documents" from one calibrated answerability score, read off the model's first
    token, which llama.cpp computes anyway when it evaluates the prompt.

    A 1.5B model's own greedy choice refused a quarter of answerable questions and half the unanswerable
    ones it should have: the sentinel was often the likeliest first token by a hair, or missed by a hair.
    So the reply is the sentinel when the score reaches a threshold chosen on the eval's tune part; below
    it the sentinel's first tokens are banned, so the model answers. Without a threshold it only measures.
    The ban holds for the whole reply, not only its first token: that is what a model server's
    `logit_bias` can do, and the in-process and server paths must give the same answer.

    The score is sigmoid(weight * logit(p) + offset), p the probability of the sentinel as the first token.
    `offset` carries the signals known before the answer starts (chain.QA.answerability_check, opt-in):
    weight 1 and offset 0 make the score p itself, the default.
    """

    def __init__(self, threshold: float | None, weight: float = 1.0, offset: float = 0.0) -> None:
        self.threshold = threshold
        self.weight = weight
        self.offset = offset
        self.p: float | None = None  # P(first token starts the sentinel), once the first token is chosen

    @property
    def score(self) -> float | None:
        """The answerability score (higher: refuse), once `p` is known."""
        if self.p is None:
            return None
        if self.weight == 1 and self.offset == 0:
            return self.p  # the probability itself, not a round trip through logit and sigmoid
        return sigmoid(self.weight * logit(self.p) + self.offset)

    @property
    def refuses(self) -> bool:
        """The decision, once `p` is known: the reply is the sentinel, whatever the model would write."""
        score = self.score
        return self.threshold is not None and score is not None and score >= self.threshold

    def processor(self, first_ids: list[int]) -> Callable[[Any, Any], Any]:
        """A llama-cpp-python logits processor: measures on the first token, then refuses or bans."""
        import numpy as np

        ids = np.asarray(sorted(set(first_ids)), dtype=np.intp)

        def apply(_input_ids: Any, scores: Any) -> Any:
            if self.p is None:
                self.p = first_token_share(scores, {"p": ids})["p"]
            if self.threshold is None:
                return scores
            out = np.array(scores, copy=True)
            if self.refuses:  # the stream ends after this token (see the backends' stream)
                keep = ids[int(np.argmax(out[ids]))]
                out[:] = -np.inf
                out[keep] = scores[keep]
            else:
                out[ids] = -np.inf
            return out

        return apply


def logit(p: float, eps: float = 1e-6) -> float:
    """log(p / (1 - p)), with p kept off 0 and 1 so a certain first token gives a large, finite value."""
    p = min(max(p, eps), 1.0 - eps)
    return math.log(p / (1.0 - p))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def first_token_share(logits: Any, groups: dict[str, Any]) -> dict[str, float]:
    """The softmax mass of each group of token ids in one row of logits."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float64)
    weights = np.exp(row - row.max())
    total = weights.sum()
    return {name: float(weights[np.asarray(sorted(set(ids)), dtype=np.intp)].sum() / total)
            for name, ids in groups.items()}


# ---- GGUF metadata -------------------------------------------------------------------------------------
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: Path, wanted: tuple[str, ...] = ("general.architecture", "tokenizer.chat_template")) -> dict:
    """Read a few metadata keys from a GGUF header, to name problems before llama.cpp fails vaguely."""
    found: dict[str, Any] = {}
    with open(path, "rb") as fh:

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = fh.read(size)
            if len(data) != size:
                raise RagqaError(f"{path} is truncated (GGUF header ends early); re-fetch or re-download it")
            return struct.unpack(fmt, data)[0]

        def read_str() -> str:
            n = read("<Q")
            if n > 1 << 26:
                raise RagqaError(f"{path} has a corrupt GGUF header")
            return fh.read(n).decode("utf-8", "replace")

        def skip_value(vtype: int) -> Any:
            if vtype == 8:
                return read_str()
            if vtype == 9:
                itype, count = read("<I"), read("<Q")
                if itype == 8:
                    for _ in range(count):
                        fh.seek(read("<Q"), os.SEEK_CUR)
                elif itype in _GGUF_SCALARS:
                    fh.seek(struct.calcsize(_GGUF_SCALARS[itype]) * count, os.SEEK_CUR)
                else:
                    raise RagqaError(f"{path} has a corrupt GGUF header (array of type {itype})")
                return None
            if vtype in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[vtype])
            raise RagqaError(f"{path} has a corrupt GGUF header (value type {vtype})")

        if fh.read(4) != models.GGUF_MAGIC:
            raise RagqaError(f"{path} is not a GGUF model file")
        read("<I")  # version
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = read_str()
            value = skip_value(read("<I"))
            if key in wanted:
                found[key] = value
                if len(found) == len(wanted):
                    break
    return found


# ---- llama.cpp -----------------------------------------------------------------------------------------
class LlamaCppChat:
    """A local GGUF through LangChain's ChatLlamaCpp; the model loads once and serves many questions."""

    def __init__(self, settings: Settings) -> None:
        name, path, _ = models.resolve(settings.model, settings.models_dir, kind="llm")
        meta = gguf_metadata(path)
        if not meta.get("tokenizer.chat_template") and not settings.chat_format:
            raise RagqaError(
                f"{path.name} has no chat template in its metadata; pass --chat-format NAME "
                "(a llama-cpp-python format such as chatml, llama-2, gemma)"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from langchain_community.chat_models import ChatLlamaCpp
        self.name = name
        self.path = path
        model_kwargs: dict[str, Any] = {}
        if settings.chat_format:
            model_kwargs["chat_format"] = settings.chat_format  # ChatLlamaCpp ignores its own chat_format field
        # Measured once per host, model and llama.cpp build (a probe of ~100 s for the 1.5B the first time), then
        # read back.
        self.kernel, self.kernel_sources = kernels.resolve(settings, path, progress=_probe_notice(name))
        kernel_kwargs = self.kernel.llama_kwargs()
        model_kwargs.update({k: v for k, v in kernel_kwargs.items() if k != "n_threads"})  # through to Llama()
        try:
            with _quiet_stderr(), model_params(**self.kernel.model_fields()):
                self.chat = ChatLlamaCpp(
                    model_path=str(path),
                    n_ctx=settings.n_ctx,
                    n_threads=kernel_kwargs["n_threads"],
                    n_batch=512,  # ChatLlamaCpp's default of 8 makes prompt processing several times slower
                    # ChatLlamaCpp passes its own RoPE defaults (base 10000, scale 1) to llama.cpp, over the
                    # model's: Qwen2.5 is trained with base 1,000,000, so every position past the first few
                    # was encoded wrongly, and answers differed from the same file served by llama_cpp.server.
                    # 0 means "from the model file".
                    rope_freq_base=0.0,
                    rope_freq_scale=0.0,
                    n_gpu_layers=settings.gpu_layers,
                    temperature=settings.temperature,
                    max_tokens=settings.max_tokens,
                    seed=settings.seed,
                    verbose=False,
                    streaming=True,
                    model_kwargs=model_kwargs,
                )
        except Exception as exc:
            arch = meta.get("general.architecture", "unknown")
            fix = f"ragqa models fetch {name} --force" if name in models.REGISTRY else "check the file"
            raise RagqaError(
                f"llama.cpp could not load {path.name} (architecture '{arch}': unsupported by this "
                f"llama-cpp-python build, or the file is corrupt); {fix}"
            ) from exc
        self.client = self.chat.client
        self.n_ctx = self.client.n_ctx()
        self.usage: dict[str, int | None] = {"prompt_tokens": None, "completion_tokens": None}
        self.prefixes = PrefixCache(self.client, path, settings, self.kernel) if settings.prompt_cache else None
        self.rates = kernels.measured_rates(settings)  # for the time budget (ragqa/budget.py); None: unmeasured

    def count_tokens(self, text: str) -> int:
        return len(self.client.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    refusal_gate = True  # stream() takes a RefusalGate (see there)

    def sentinel_first_ids(self, sentinel: str) -> list[int]:
        """The token ids a reply starting with `sentinel` can start with (with and without a space)."""
        return [self.client.tokenize(form.encode("utf-8"), add_bos=False, special=False)[0]
                for form in (sentinel, " " + sentinel)]

    def first_token_probs(self, messages: list[Message], starts: dict[str, list[str]]) -> dict[str, float] | None:
        """For each name, the probability that the reply starts with one of its words (with or without a
        space before), read off the first token's distribution: a one-token call whose prompt evaluation the
        next call with the same beginning reuses (llama-cpp-python keeps the longest shared prefix)."""
        from llama_cpp import LogitsProcessorList

        groups = {name: [i for word in words for i in self.sentinel_first_ids(word)] for name, words in starts.items()}
        got: dict[str, float] = {}

        def measure(_input_ids: Any, scores: Any) -> Any:
            if not got:
                got.update(first_token_share(scores, groups))
            return scores

        if self.prefixes and messages and messages[0]["role"] == "system":
            self.prefixes.restore(messages[0]["content"])
        for _ in self.chat.stream(_lc_messages(messages), max_tokens=1,
                                  logits_processor=LogitsProcessorList([measure])):
            pass
        return got or None

    def stream(
        self, messages: list[Message], max_tokens: int, gate: RefusalGate | None = None, sentinel: str = ""
    ) -> Iterator[str]:
        lc_messages = _lc_messages(messages)
        completion = 0
        if self.prefixes and messages and messages[0]["role"] == "system":
            self.prefixes.restore(messages[0]["content"])
        from llama_cpp import LogitsProcessorList

        prompt_n: list[int] = []

        def note_prompt(input_ids: Any, scores: Any) -> Any:
            if not prompt_n:  # the context when the first token is chosen: the whole prompt, template and all
                prompt_n.append(len(input_ids))
            return scores

        # Below LangChain: ChatLlamaCpp passes extra keywords through to create_chat_completion, the only
        # place the first token's distribution (and the prompt's exact length) can be read.
        processors: list[Any] = [note_prompt]
        if gate is not None and sentinel:
            processors.append(gate.processor(self.sentinel_first_ids(sentinel)))
        extra: dict[str, Any] = {"logits_processor": LogitsProcessorList(processors)}
        try:
            for chunk in self.chat.stream(lc_messages, max_tokens=max_tokens, **extra):
                text = chunk.content if isinstance(chunk.content, str) else ""
                if gate is not None and gate.refuses:
                    completion += 1
                    yield sentinel  # decided: the rest of the sentinel's tokens would only cost time
                    return
                if text:
                    completion += 1
                    yield text
        finally:  # also when the caller stops early (a refusal): usage must describe this call, not the last
            # streaming reports no usage of its own
            prompt = prompt_n[0] if prompt_n else max(0, self.client.n_tokens - completion)
            self.usage = {"prompt_tokens": prompt, "completion_tokens": completion}


class PrefixCache:
    """The evaluated KV state of fixed system prompts, kept in memory and on disk.

    llama-cpp-python reuses the longest token prefix shared with the *previous* call only. A fixed system
    prompt would still be evaluated again by every fresh `ragqa ask` process and after each chat follow-up's
    rewrite call (another system prompt, ~120 tokens). So each system prompt is evaluated once per machine:
    its state is saved under home/cache and loaded in milliseconds. What it saves is the system prompt's
    length: ~39 tokens per answer with ragqa's current prompt, whose rules stay after the passages
    (evals/RESULTS.md, the prompt experiments). A file that fails to load is deleted and the prompt is
    evaluated as if there were no cache: the cache can cost time, never an answer.
    """

    MAX_FILES = 16

    def __init__(self, client: Any, model_path: Path, settings: Settings, kernel: Kernel) -> None:
        import llama_cpp

        self.client = client
        self.dir = Path(settings.home) / "cache" / "prompts"
        stat = model_path.stat()
        # Everything the saved bytes depend on; a change in any of them makes a new file, never a wrong state.
        self.salt = "|".join(map(str, (
            model_path.resolve(), stat.st_size, stat.st_mtime_ns, llama_cpp.__version__, self.client.n_ctx(),
            self.client.n_batch, settings.gpu_layers, settings.chat_format, settings.seed,
            # the kernel: repacked weights, micro-batches, flash attention and the KV type all change the bytes
            sorted(kernel.as_dict().items()),
            kernels.system_info(),  # the llama.cpp build: AVX2 and AVX-512 kernels round differently
            # the RoPE settings the context was made with: a state saved under another base encodes other positions
            getattr(self.client.context_params, "rope_freq_base", None),
            getattr(self.client.context_params, "rope_freq_scale", None),
        )))
        self.seed = settings.seed
        self.states: dict[str, Any] = {}
        self.current: str | None = None  # the system prompt the KV cache starts with, as far as we know
        self.loaded_tokens = 0  # tokens restored by the last `restore`: not evaluated for that call

    def restore(self, system: str) -> None:
        self.loaded_tokens = 0
        if self.current == system and self.client.n_tokens > 0:
            return  # llama-cpp-python's own prefix match will reuse it
        self.current = None
        state = self.states.get(system) or self._read(system) or self._prime(system)
        if state is None:
            return
        try:
            self.client.load_state(state)
        except Exception:  # noqa: BLE001 - a bad file must never cost the answer
            self._forget(system)
            self.client.reset()
            return
        self.states[system] = state
        self.current = system
        self.loaded_tokens = int(state.n_tokens)

    def _file(self, system: str) -> Path:
        digest = hashlib.sha256(f"{self.salt}|{system}".encode()).hexdigest()[:24]
        return self.dir / f"{digest}.npz"

    def _state(self, ids: Any, data: bytes) -> Any:
        import numpy as np
        from llama_cpp.llama import LlamaState

        n = len(ids)
        input_ids = np.zeros(self.client.n_ctx(), dtype=np.intc)
        input_ids[:n] = ids
        # Logits are not saved (n x 152k floats); the suffix decode of the next call recomputes them.
        scores = np.broadcast_to(np.zeros(self.client.n_vocab(), dtype=np.single), (n, self.client.n_vocab()))
        return LlamaState(input_ids, scores, n, data, len(data), self.seed)

    def _read(self, system: str) -> Any:
        import numpy as np

        path = self._file(system)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                return self._state(saved["ids"], saved["state"].tobytes())
        except Exception:  # noqa: BLE001 - truncated or foreign file
            self._forget(system)
            return None

    def _prime(self, system: str) -> Any:
        """Evaluate the system prompt once (with an empty user turn, whose header the real prompt shares)."""
        import numpy as np

        self.client.reset()
        messages = [{"role": "system", "content": system}, {"role": "user", "content": ""}]
        with _quiet_stderr():
            self.client.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
        n = int(self.client.n_tokens)
        if not 0 < n <= self.client.n_batch:  # llama-cpp-python keeps logits for at most n_batch rows
            return None
        saved = self.client.save_state()
        state = self._state(np.array(self.client.input_ids[:n], dtype=np.intc), saved.llama_state)
        path = self._file(system)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, ids=state.input_ids[:n], state=np.frombuffer(state.llama_state, dtype=np.uint8))
            os.replace(tmp, path)
            self._prune()
        except OSError:
            pass  # a read-only or full home only costs the next process the evaluation
        return state

    def _prune(self) -> None:
        files = sorted(self.dir.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[self.MAX_FILES :]:
            old.unlink(missing_ok=True)

    def _forget(self, system: str) -> None:
        self.states.pop(system, None)
        with contextlib.suppress(OSError):
            self._file(system).unlink(missing_ok=True)


def _probe_notice(name: str) -> Callable[[str, int, int], None]:
    """One stderr line when a model load has to measure the kernel settings first, so the wait is explained."""

    def notice(candidate: str, done: int, total: int) -> None:
        if done == 0:
            sys.stderr.write(f"measuring llama.cpp kernel settings for {name} on this host (once, {total} loads)\n")
            sys.stderr.flush()

    return notice


@contextlib.contextmanager
def model_params(**fields: Any) -> Iterator[None]:
    """Set llama_model_params fields that `llama_cpp.Llama()` has no argument for, while a model is created.

    Why: `use_extra_bufts` (llama.cpp's CPU weight repacking, `--no-repack` in its CLI) changes prompt and
    generation speed in opposite directions, by host (ragqa/kernels.py measures it). Llama() fills its params from
    `llama_model_default_params()` and then sets only the fields it knows, so the defaults are what can
    change. ragqa creates models from one thread; the original function is back when the block ends.
    """
    import llama_cpp.llama as llama_module

    default = llama_module.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = default()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp logs from C even with verbose=False when a load fails; keep the terminal to our one line."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)


# ---- OpenAI-compatible servers ----------------------------------------------------------------------
# Two retries with a short backoff: a restarting server gets a second chance, a down one fails in ~2 s.
RETRY_DELAYS = (0.5, 1.5)
CONNECT_TIMEOUT = 5.0
_CJK_CHAR = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
T = TypeVar("T")


def estimate_tokens(text: str) -> int:
    """A guess that errs high, for servers that cannot tokenize: a CJK character ~1 token, other text ~3 chars."""
    cjk = len(_CJK_CHAR.findall(text))
    return cjk + math.ceil((len(text) - cjk) / 3)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def transport_failure(exc: BaseException, read_timeout: float) -> tuple[bool, str] | None:
    """(safe to retry, reason) when `exc` means the server could not be reached or failed; None otherwise.

    Retrying is only offered for failures before the server started answering: refused or timed-out
    connections, dropped connections and 5xx/429 replies. A read timeout is not retried: the server took
    the request and is still busy with it, and sending it again only lengthens its queue. Exceptions are
    matched by class name along the cause chain, because the openai client raises httpx2's classes and
    ragqa's own requests raise httpx's.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    names = {klass.__name__ for e in chain for klass in type(e).__mro__}
    for e in chain:
        response = getattr(e, "response", None)
        status = getattr(e, "status_code", None) or getattr(response, "status_code", None)
        if isinstance(status, int) and status >= 400:
            return (True, f"HTTP {status}") if status >= 500 or status == 429 else None
    if "ConnectTimeout" in names:
        return True, "connection timed out"
    if names & {"ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException", "APITimeoutError"}:
        return False, f"no reply within {read_timeout:g} s; raise llm_timeout (RAGQA_LLM_TIMEOUT) if it is busy"
    if "ConnectError" in names:
        message = next(str(e) for e in chain if "ConnectError" in {k.__name__ for k in type(e).__mro__})
        if "refused" in message.lower():
            return True, "connection refused"
        return True, _one_line(message.split("] ")[-1] or "cannot connect")
    if names & {"RemoteProtocolError", "ReadError", "WriteError"}:
        return True, "the connection was closed by the server"
    if "APIConnectionError" in names:
        return True, _one_line(f"connection failed: {chain[-1]}")
    return None


def with_retries(call: Callable[[], T], on_give_up: Callable[[BaseException, str], RagqaError],
                 read_timeout: float, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `call`, again after a short pause while it fails in a way that is safe to retry."""
    for attempt in range(len(RETRY_DELAYS) + 1):
        try:
            return call()
        except Exception as exc:
            failure = transport_failure(exc, read_timeout)
            if failure is None:
                raise
            retry, reason = failure
            if not retry or attempt == len(RETRY_DELAYS):
                raise on_give_up(exc, reason) from None
            sleep(RETRY_DELAYS[attempt])
    raise AssertionError("unreachable")


class OpenAIChat:
    """A model on an OpenAI-compatible chat server, through LangChain's ChatOpenAI, streaming.

    The server is asked up front what it serves (GET /models): llama-cpp-python's server answers any model
    name with its own model, so a typo would otherwise go unnoticed. Token counts come from the server's
    tokenizer when it has an endpoint for it (llama-cpp-python: /extras/tokenize, llama-server and vLLM:
    /tokenize), else from `estimate_tokens`; never from tiktoken, which would download its encodings.
    The server does not say its context size through the OpenAI API, so `n_ctx` is the setting of that name:
    set it to the server's context size (llama-server -c, vLLM --max-model-len).
    """

    def __init__(self, settings: Settings, sleep: Callable[[float], None] = time.sleep) -> None:
        import httpx
        import openai

        url = (settings.llm_url or "").strip().rstrip("/")
        if not re.match(r"https?://[^/\s]+", url):
            raise RagqaError(f"--llm-url must be an http(s) URL such as http://127.0.0.1:8080/v1, not '{url}'")
        self.url = url
        self.timeout = float(settings.llm_timeout)
        self._sleep = sleep
        api_key = None
        if settings.api_key_env:
            api_key = os.environ.get(settings.api_key_env)
            if not api_key:
                raise RagqaError(f"the environment variable {settings.api_key_env} (named by --api-key-env) is not set")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=CONNECT_TIMEOUT), headers=self._headers)
        served = self._served_models()
        if settings.llm_model and settings.llm_model not in served:
            raise RagqaError(
                f"the model server at {url} does not serve '{settings.llm_model}'; it serves: {', '.join(served)}"
            )
        self.model = settings.llm_model or served[0]
        self.name = f"{self.model} @ {url}"
        self.n_ctx = settings.n_ctx
        self.usage: dict[str, int | None] = {"prompt_tokens": None, "completion_tokens": None}
        self.settings = settings
        self._tokenize = self._find_tokenizer()
        self._counts: dict[str, int] = {}
        self._sentinels: dict[str, dict[int, str]] = {}

        self.chat = _server_chat_class()(
            model=self.model,
            base_url=url,
            api_key=api_key or "not-needed",  # local servers ignore it; the client insists on one
            timeout=openai.Timeout(self.timeout, connect=CONNECT_TIMEOUT),  # openai's own httpx (httpx2)
            max_retries=0,  # retries are ours: only before the first token, see `stream`
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
            seed=settings.seed,
            streaming=True,
            stream_usage=True,
            use_responses_api=False,  # the Responses API is OpenAI's own; chat completions is what servers share
        )

    def _unreachable(self, exc: BaseException, reason: str) -> RagqaError:
        return RagqaError(f"cannot reach the model server at {self.url} ({reason})")

    def _not_openai(self, detail: str) -> RagqaError:
        hint = "" if self.url.endswith("/v1") else f"; did you mean {self.url}/v1?"
        return RagqaError(f"{self.url} is not an OpenAI-compatible API ({detail}){hint or '; check the URL'}")

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call, retried on transport failures, 5xx and 429; any other status is the caller's to read."""

        def call() -> Any:
            resp = self._http.request(method, self.url + path, **kwargs)
            if resp.status_code >= 500 or resp.status_code == 429:
                resp.raise_for_status()
            return resp

        return with_retries(call, self._unreachable, self.timeout, self._sleep)

    def _served_models(self) -> list[str]:
        resp = self._request("GET", "/models")
        if resp.status_code in (401, 403):
            raise RagqaError(
                f"the model server at {self.url} refused the request (HTTP {resp.status_code}); "
                "pass --api-key-env VAR with the API key in $VAR"
            )
        if resp.status_code != 200:
            raise self._not_openai(f"GET {self.url}/models: HTTP {resp.status_code}")
        try:
            ids = [str(m["id"]) for m in resp.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise self._not_openai(f"GET {self.url}/models did not return a model list") from None
        if not ids:
            raise RagqaError(f"the model server at {self.url} serves no model yet")
        return ids

    def _find_tokenizer(self) -> Callable[[str], list[int]] | None:
        """The server's own tokenizer endpoint, if it has one; probed once. Gives token ids."""
        root = self.url.removesuffix("/v1")
        candidates = [  # llama-cpp-python's server; then llama.cpp's llama-server ("content") and vLLM ("prompt")
            (root + "/extras/tokenize", lambda text: {"input": text, "model": self.model}),
            (root + "/tokenize", lambda text: {"content": text, "prompt": text, "model": self.model}),
        ]
        for endpoint, body in candidates:
            try:
                resp = self._http.post(endpoint, json=body("probe"))
                tokens = resp.json().get("tokens") if resp.status_code == 200 else None
            except Exception:
                continue
            if isinstance(tokens, list) and tokens:

                def ids(text: str, endpoint: str = endpoint, body: Callable[[str], dict] = body) -> list[int]:
                    def post() -> Any:
                        resp = self._http.post(endpoint, json=body(text))
                        resp.raise_for_status()
                        return resp

                    resp = with_retries(post, self._unreachable, self.timeout, self._sleep)
                    return [int(t) for t in resp.json()["tokens"]]

                return ids
        return None

    def count_tokens(self, text: str) -> int:
        if self._tokenize is None:
            return estimate_tokens(text)
        if text not in self._counts:
            if len(self._counts) > 4096:
                self._counts.clear()
            self._counts[text] = len(self._tokenize(text))
        return self._counts[text]

    @property
    def refusal_gate(self) -> bool:  # stream() takes a RefusalGate where the server can tokenize
        return self._tokenize is not None

    def _sentinel_tokens(self, sentinel: str) -> dict[int, str]:
        """The ids a reply starting with `sentinel` can start with (with and without a space), each with its
        text: the longest start of the form that tokenizes to that id alone (logprobs name tokens by text)."""
        if sentinel not in self._sentinels:
            assert self._tokenize is not None
            out: dict[int, str] = {}
            for form in (sentinel, " " + sentinel):
                first = self._tokenize(form)[0]
                texts = [form[:n] for n in range(1, len(form) + 1) if self._tokenize(form[:n]) == [first]]
                if texts:
                    out[first] = texts[-1]
            self._sentinels[sentinel] = out
        return self._sentinels[sentinel]

    def _first_token_p(self, messages: list[Message], sentinel: str) -> float | None:
        """P(the reply starts with the sentinel), as the in-process gate reads it off llama.cpp's logits."""
        got = self.first_token_probs(messages, {"p": [sentinel]})
        return None if got is None else got["p"]

    def first_token_probs(self, messages: list[Message], starts: dict[str, list[str]]) -> dict[str, float] | None:
        """For each name, P(the reply starts with one of its words), from the server's logprobs of a
        one-token reply to the same prompt, as the in-process backend reads it off llama.cpp's logits; None
        from a server without a tokenizer or logprobs. Below LangChain (a plain POST): its streaming client
        does not surface the first token's alternatives. The server keeps the evaluated prompt, so the answer
        that follows costs no second prefill on llama.cpp servers."""
        if self._tokenize is None:
            return None
        body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": self.settings.temperature,
                "seed": self.settings.seed, "logprobs": True, "top_logprobs": 20}
        resp = self._request("POST", "/chat/completions", json=body)
        try:
            top = resp.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None  # a server without logprobs: the model's own choice decides
        out = {}
        for name, words in starts.items():
            texts = {t for word in words for t in self._sentinel_tokens(word).values()}
            out[name] = float(sum(math.exp(t["logprob"]) for t in top if t.get("token") in texts))
        return out

    def _failed(self, exc: BaseException) -> RagqaError:
        """One line for an error the server answered with (not a transport failure)."""
        import openai

        if isinstance(exc, openai.APIStatusError):
            code, message = exc.status_code, _one_line(getattr(exc, "message", "") or str(exc))
            if code in (401, 403):
                return RagqaError(f"the model server at {self.url} refused the request (HTTP {code}); "
                                  "pass --api-key-env VAR with the API key in $VAR")
            if code == 404:
                return RagqaError(f"the model server at {self.url} has no chat endpoint for '{self.model}' "
                                  f"(HTTP 404: {message})")
            if code == 400 and re.search(r"context|too long|exceed", message, re.IGNORECASE):
                return RagqaError(f"the prompt does not fit the server's context ({message}); set n_ctx "
                                  "(RAGQA_N_CTX) to the server's context size")
            return RagqaError(f"the model server at {self.url} rejected the request (HTTP {code}: {message})")
        return RagqaError(f"the model server at {self.url} failed: {type(exc).__name__}: {_one_line(str(exc))}")

    def stream(
        self, messages: list[Message], max_tokens: int, gate: RefusalGate | None = None, sentinel: str = ""
    ) -> Iterator[str]:
        lc_messages = _lc_messages(messages)
        completion = 0
        reported: dict[str, Any] | None = None
        bias: dict[str, float] = {}
        if gate is not None and sentinel and self._tokenize is not None:
            gate.p = self._first_token_p(messages, sentinel)
            if gate.refuses:
                self.usage = {"prompt_tokens": self._prompt_estimate(messages), "completion_tokens": 1}
                yield sentinel
                return
            if gate.threshold is not None and gate.p is not None:
                bias = {str(i): -100.0 for i in self._sentinel_tokens(sentinel)}  # the in-process gate's ban
        try:
            for attempt in range(len(RETRY_DELAYS) + 1):
                started = False
                try:
                    extra: dict[str, Any] = {"logit_bias": bias} if bias else {}
                    finished = None
                    with contextlib.closing(self.chat.stream(lc_messages, max_tokens=max_tokens, **extra)) as chunks:
                        for chunk in chunks:
                            if chunk.usage_metadata:
                                reported = dict(chunk.usage_metadata)
                            finished = chunk.response_metadata.get("finish_reason") or finished
                            text = chunk.content if isinstance(chunk.content, str) else ""
                            if text:
                                started = True
                                completion += 1
                                yield text
                    if finished is None:
                        # A stream that ends without a finish reason was cut, not finished: llama-cpp-python's
                        # server, by default, ends a stream with [DONE] when another request arrives, and the
                        # answer would pass for whole (seen with `ragqa serve --parallel`, 2026-12-03).
                        raise RagqaError(f"the model server at {self.url} ended the answer without a finish "
                                         "reason, cut short (llama-cpp-python's server does so when another "
                                         "request arrives: start it with --interrupt_requests False)")
                    return
                except RagqaError:
                    raise
                except Exception as exc:
                    failure = transport_failure(exc, self.timeout)
                    if started:  # never re-send: the user has already seen part of this answer
                        reason = failure[1] if failure else _one_line(str(exc))
                        raise RagqaError(f"the model server at {self.url} stopped mid-answer ({reason})") from None
                    if failure is None:
                        raise self._failed(exc) from None
                    if not failure[0] or attempt == len(RETRY_DELAYS):
                        raise self._unreachable(exc, failure[1]) from None
                    self._sleep(RETRY_DELAYS[attempt])
        finally:  # also when the caller stops early (a refusal): usage must describe this call
            if reported and reported.get("input_tokens"):
                self.usage = {"prompt_tokens": reported["input_tokens"], "completion_tokens": reported["output_tokens"]}
            else:  # the server streams no usage (llama-cpp-python)
                self.usage = {"prompt_tokens": self._prompt_estimate(messages), "completion_tokens": completion}

    def _prompt_estimate(self, messages: list[Message]) -> int | None:
        """The prompt's tokens by the server's tokenizer plus the chat template's framing, exact for ChatML
        (Qwen): "<|im_start|>role\\n…<|im_end|>\\n" is 5 tokens a turn, "<|im_start|>assistant\\n" 3 more."""
        with contextlib.suppress(Exception):
            return sum(self.count_tokens(m["content"]) + 5 for m in messages) + 3
        return None


@functools.cache
def _server_chat_class() -> type:
    """ChatOpenAI, but sending the answer budget as `max_tokens`, the field every chat server reads.

    ChatOpenAI renames it to OpenAI's newer `max_completion_tokens`, which llama-cpp-python's server
    silently ignores: answers would then run on to the end of the context.
    """
    from langchain_openai import ChatOpenAI

    class ServerChatOpenAI(ChatOpenAI):
        def _get_request_payload(self, input_: Any, *, stop: list[str] | None = None, **kwargs: Any) -> dict:
            payload = super()._get_request_payload(input_, stop=stop, **kwargs)
            if "max_completion_tokens" in payload:
                payload["max_tokens"] = payload.pop("max_completion_tokens")
            return payload

    return ServerChatOpenAI


def _lc_messages(messages: list[Message]) -> list[Any]:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    kinds: dict[str, Callable[..., Any]] = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    return [kinds[m["role"]](content=m["content"]) for m in messages]


BACKENDS: dict[str, Callable[[Settings], ChatModel]] = {
    "llama-cpp": LlamaCppChat,
    "openai": OpenAIChat,
}


def backend_name(settings: Settings) -> str:
    return "openai" if settings.llm_url else "llama-cpp"


def load_llm(settings: Settings) -> ChatModel:
    name = backend_name(settings)
    if name not in BACKENDS:
        raise RagqaError(f"no '{name}' backend in this build of ragqa")
    return BACKENDS[name](settings)
