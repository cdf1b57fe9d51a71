"""ragqa's parts for other LangChain apps: its retrieval as a `BaseRetriever`, its answer path as a `Runnable`.

    retriever = RagqaRetriever.from_settings()   # ragqa.toml, RAGQA_* and these keywords, like the CLI
    answer = RagqaAnswer(retriever.qa)            # the same index and models, loaded once

`RagqaRetriever` returns one `Document` per retrieved chunk (the hybrid dense + BM25 search of `ragqa ask`),
the chunk's text as `page_content` and its place and scores as metadata. `RagqaAnswer` takes a question (or
`{"question": ..., "k": ...}`) and returns the `ragqa ask --json` object; `stream` gives `{"token": text}`
while the model writes, then `{"answer": that object}`, as `POST /ask/stream` does. Both take turns on the
pipeline's one lane (one model context, one question at a time; ragqa.serve), so `batch` and concurrent use queue.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import ConfigDict

from ragqa.chain import QA, check_question
from ragqa.config import load_settings
from ragqa.errors import RagqaError
from ragqa.retrieve import Hit
from ragqa.serve import QAService

_services: weakref.WeakKeyDictionary[QA, QAService] = weakref.WeakKeyDictionary()
_services_lock = threading.Lock()


def service_for(qa: QA) -> QAService:
    """The one QAService (its lane and queue) of `qa`, shared by every retriever and runnable built on it."""
    with _services_lock:
        if qa not in _services:
            _services[qa] = QAService(qa)
        return _services[qa]


def load_qa(**settings: Any) -> QA:
    """A ready pipeline: the settings as the CLI resolves them (defaults < ragqa.toml < env < `settings`),
    checked at once (missing model, empty index, embedder mismatch fail here, as one RagqaError)."""
    qa = QA(load_settings({k: v for k, v in settings.items() if v is not None}))
    qa.prepare()
    return qa


def hit_document(hit: Hit) -> Document:
    """One retrieved chunk as a Document: its whole text, and where it is and how it ranked."""
    meta = hit.as_dict()
    text = meta.pop("text")
    meta.pop("context", None)  # focus belongs to the answer path, not to retrieval
    meta["id"] = hit.chunk.id
    return Document(page_content=text, metadata=meta, id=hit.chunk.id)


class RagqaRetriever(BaseRetriever):
    """ragqa's hybrid retrieval (dense + BM25, fused by reciprocal rank) over its index.

    Metadata of each Document: `source`, `start`, `end` (the text is `file[start:end]`), `lines`, `page`,
    `heading`, the fused `score`, and both retrievers' `dense_score` / `dense_rank` and `bm25_score` /
    `bm25_rank` (None where that retriever did not find the chunk).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    qa: QA
    k: int | None = None  # passages per query; default: the pipeline's `k` setting

    @classmethod
    def from_settings(cls, k: int | None = None, **settings: Any) -> RagqaRetriever:
        return cls(qa=load_qa(**settings), k=k)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        query = check_question(query)
        with service_for(self.qa).lane() as qa:
            hits = qa.retriever.retrieve(query, k=self.k or qa.settings.k).hits
        return [hit_document(h) for h in hits]


def _question(value: Any) -> tuple[str, int | None]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and isinstance(value.get("question"), str):
        k = value.get("k")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise RagqaError(f"k must be a positive integer, got {k!r}")
        return value["question"], k
    raise RagqaError(f"RagqaAnswer takes a question (str) or {{'question': str, 'k': int}}, got {type(value).__name__}")


class RagqaAnswer(Runnable[Any, dict[str, Any]]):
    """The answer path of `ragqa ask`: retrieval, focus, the cited answer, refusal; output the `--json` object.

    Input: a question string, or a dict with `question` and optionally `k`. `invoke` and `batch` return the
    object (`question`, `answer`, `refused`, `citations`, `retrieved`, `context`, `model`, `timings`);
    `stream` yields `{"token": text}` as the model writes, then `{"answer": object}`.
    """

    def __init__(self, qa: QA) -> None:
        self.qa = qa
        self.service = service_for(qa)

    @classmethod
    def from_settings(cls, **settings: Any) -> RagqaAnswer:
        return cls(load_qa(**settings))

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> dict[str, Any]:
        return self._call_with_config(self._answer, input, config, run_type="chain")

    def _answer(self, value: Any) -> dict[str, Any]:
        question, k = _question(value)
        return self.service.ask(question, k=k)

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield from self.transform(iter([input]), config, **kwargs)

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None,
                  **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield from self._transform_stream_with_config(input, self._events, config, run_type="chain")

    def _events(self, values: Iterator[Any]) -> Iterator[dict[str, Any]]:
        value: Any = None
        for chunk in values:  # an upstream step may stream its output in pieces (text adds up)
            value = chunk if value is None else value + chunk
        question, k = _question(value)
        for kind, item in self.service.events(question, k=k):
            yield {kind: item}
