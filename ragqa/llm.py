"""Answering models behind one small interface, chosen by a registry of backends.

The chain only needs three things from a model: stream a chat reply as text pieces, count tokens (to fit
the prompt in the context window), and report usage afterwards. A backend is a class with that shape,
registered under a name in `BACKENDS`, the way simonw/llm registers model plugins; `load_llm` picks one
from the settings. The llama.cpp backend is LangChain's `ChatLlamaCpp` (the chat-model interface over
llama-cpp-python), so the chat template comes from the GGUF's own metadata.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ragqa import models
from ragqa.config import Settings
from ragqa.errors import RagqaError

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": ...}


class ChatModel(Protocol):
    name: str
    n_ctx: int
    usage: dict[str, int | None]

    def stream(self, messages: list[Message], max_tokens: int) -> Iterator[str]: ...

    def count_tokens(self, text: str) -> int: ...


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
        try:
            with _quiet_stderr():
                self.chat = ChatLlamaCpp(
                    model_path=str(path),
                    n_ctx=settings.n_ctx,
                    n_threads=settings.n_threads,
                    n_batch=512,  # ChatLlamaCpp's default of 8 makes prompt processing several times slower
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

    def count_tokens(self, text: str) -> int:
        return len(self.client.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def stream(self, messages: list[Message], max_tokens: int) -> Iterator[str]:
        from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

        kinds: dict[str, Callable[..., Any]] = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
        lc_messages = [kinds[m["role"]](content=m["content"]) for m in messages]
        completion = 0
        try:
            for chunk in self.chat.stream(lc_messages, max_tokens=max_tokens):
                text = chunk.content if isinstance(chunk.content, str) else ""
                if text:
                    completion += 1
                    yield text
        finally:  # also when the caller stops early (a refusal): usage must describe this call, not the last
            # llama.cpp's context now holds prompt + completion; streaming reports no usage of its own.
            self.usage = {"prompt_tokens": max(0, self.client.n_tokens - completion), "completion_tokens": completion}


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


BACKENDS: dict[str, Callable[[Settings], ChatModel]] = {
    "llama-cpp": LlamaCppChat,
}


def backend_name(settings: Settings) -> str:
    return "openai" if settings.llm_url else "llama-cpp"


def load_llm(settings: Settings) -> ChatModel:
    name = backend_name(settings)
    if name not in BACKENDS:
        raise RagqaError(f"no '{name}' backend in this build of ragqa")
    return BACKENDS[name](settings)
