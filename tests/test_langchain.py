"""ragqa inside other LangChain apps: RagqaRetriever and RagqaAnswer in small LCEL chains.

The quick tests check the plumbing on a pipeline whose retrieval and answer are scripted; the slow ones run
both on the real corpus index with the real embedder and the 0.5B model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

from ragqa.chain import QA, Answer
from ragqa.config import Settings
from ragqa.errors import RagqaError
from ragqa.ingest import Chunk
from ragqa.langchain import RagqaAnswer, RagqaRetriever, service_for
from ragqa.retrieve import Hit, Retrieval

from .conftest import make_settings

DOC = "杰文斯悖论指出，技术进步提高了资源使用效率，反而增加了资源的总消耗。"
METADATA = {"source", "start", "end", "lines", "page", "heading", "score", "dense_score", "dense_rank",
            "bm25_score", "bm25_rank", "id"}


def _scripted_qa() -> QA:
    """A real QA object whose retrieval and answer are scripted (no index, no model)."""
    qa = QA.__new__(QA)
    qa.settings = make_settings(k=3)
    hit = Hit(Chunk("c0", "/docs/a.txt", 10, 10 + len(DOC), DOC, "悖论", 2, 3), 0.03, dense_rank=1,
              dense_score=0.81, bm25_rank=None, bm25_score=None)
    qa.retriever = type("R", (), {"retrieve": lambda self, q, k=None, also=(): Retrieval([hit], 0.0, 0.0)})()

    def ask(question: str, k: int | None = None, on_token: Any = None, **_: Any) -> Answer:
        for piece in ("效率提高", "反而增加消耗。", " [1]"):
            if on_token:
                on_token(piece)
        return Answer(question, "效率提高反而增加消耗。 [1]", False, [{"n": 1, "source": "/docs/a.txt"}],
                      [hit.as_dict()], "fake", {"k": k})

    qa.ask = ask  # type: ignore[method-assign]
    return qa


def test_retriever_documents_carry_the_chunks_place_and_both_scores() -> None:
    retriever = RagqaRetriever(qa=_scripted_qa())
    chain = retriever | RunnableLambda(lambda docs: [(d.page_content, d.metadata) for d in docs])
    [(text, meta)] = chain.invoke("杰文斯悖论是什么？")
    assert text == DOC and set(meta) == METADATA
    assert (meta["source"], meta["start"], meta["end"], meta["lines"], meta["heading"]) == (
        "/docs/a.txt", 10, 10 + len(DOC), [2, 3], "悖论")
    assert meta["dense_score"] == 0.81 and meta["bm25_score"] is None and meta["page"] is None
    assert [len(docs) for docs in retriever.batch(["a?", "b?"])] == [1, 1]
    with pytest.raises(RagqaError, match="empty"):
        retriever.invoke("  ")


def test_answer_runnable_invokes_batches_and_streams_the_json_object() -> None:
    qa = _scripted_qa()
    answer = RagqaAnswer(qa)
    out = (RunnableLambda(str.strip) | answer).invoke("  杰文斯悖论是什么？ ")
    assert out["question"] == "杰文斯悖论是什么？" and out["citations"][0]["n"] == 1 and out["timings"]["k"] is None
    assert answer.invoke({"question": "它是什么？", "k": 2})["timings"]["k"] == 2
    assert [a["question"] for a in answer.batch(["一？", "二？", "三？"])] == ["一？", "二？", "三？"]
    chunks = list((RunnablePassthrough() | answer).stream("杰文斯悖论是什么？"))
    assert [c["token"] for c in chunks[:-1]] == ["效率提高", "反而增加消耗。", " [1]"]
    assert chunks[-1]["answer"]["answer"] == "效率提高反而增加消耗。 [1]"
    assert service_for(qa) is answer.service and answer.service.idle
    with pytest.raises(RagqaError, match="takes a question"):
        answer.invoke(42)
    with pytest.raises(RagqaError, match="k must be"):
        answer.invoke({"question": "q?", "k": 0})


# ---- the real thing: the corpus index, EmbeddingGemma, the 0.5B model --------------------------------------
@pytest.fixture(scope="module")
def real_qa(corpus_settings: Settings, small_qa: QA) -> QA:
    """The session's pipeline (corpus index, 0.5B) with short answers: the same index and model objects."""
    return QA(corpus_settings.replace(max_tokens=64), index=small_qa.index, llm=small_qa.llm)


@pytest.mark.slow
def test_retriever_in_an_lcel_chain_on_the_real_index(real_qa: QA, corpus_settings: Settings) -> None:
    retriever = RagqaRetriever(qa=real_qa, k=4)

    def cite(inputs: dict[str, Any]) -> str:
        docs: list[Document] = inputs["docs"]
        return inputs["question"] + "\n" + "\n".join(f"[{i}] {d.page_content}" for i, d in enumerate(docs, 1))

    chain = RunnableParallel(question=RunnablePassthrough(), docs=retriever) | RunnableLambda(cite)
    prompt = chain.invoke("杰文斯悖论是什么？")
    assert prompt.startswith("杰文斯悖论是什么？\n[1] ") and "[4] " in prompt and "[5] " not in prompt
    docs = retriever.invoke("杰文斯悖论是什么？")
    assert any("杰文斯" in d.page_content for d in docs)
    for d in docs:
        assert set(d.metadata) == METADATA and d.id == d.metadata["id"]
        text = Path(d.metadata["source"]).read_text(encoding="utf-8")
        assert text[d.metadata["start"]:d.metadata["end"]] == d.page_content  # the place is exact
        assert d.metadata["dense_score"] is not None or d.metadata["bm25_score"] is not None
    assert any(d.metadata["dense_rank"] is not None and d.metadata["bm25_rank"] is not None for d in docs)
    english, chinese = retriever.batch(["What is a mixture of experts model?", "什么是专家混合模型？"])
    assert len(english) == len(chinese) == 4


@pytest.mark.slow
def test_answer_runnable_in_an_lcel_chain_with_the_real_model(real_qa: QA) -> None:
    answer = RagqaAnswer(real_qa)
    sources = RunnableLambda(str.strip) | answer | RunnableLambda(
        lambda a: (a["refused"], a["answer"], [Path(c["source"]).name for c in a["citations"]], a))
    refused, text, cited, obj = sources.invoke(" 杰文斯悖论是什么？ ")
    assert not refused and text and cited, obj
    assert {"question", "answer", "refused", "citations", "retrieved", "context", "model", "timings"} <= set(obj)
    assert obj["retrieved"] and obj["context"] and obj["model"] == real_qa.llm.name
    assert all(c["n"] <= len(obj["context"]) for c in obj["citations"])

    both = answer.batch(["What is the Jevons paradox?", {"question": "2030 年的 GPU 价格是多少？", "k": 3}])
    assert [a["question"] for a in both] == ["What is the Jevons paradox?", "2030 年的 GPU 价格是多少？"]
    assert len(both[1]["context"]) <= 3

    chunks = list((RunnablePassthrough() | answer).stream("杰文斯悖论是什么？"))
    final = chunks[-1]["answer"]
    assert all(set(c) == {"token"} for c in chunks[:-1]) and len(chunks) > 2
    if not final["refused"]:  # the text streamed is the answer returned
        assert "".join(c["token"] for c in chunks[:-1]).strip() == final["answer"]
    assert answer.service.idle
