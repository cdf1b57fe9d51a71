from pathlib import Path

import pytest

from ragqa.config import Settings
from ragqa.index import Index
from ragqa.retrieve import HybridRetriever, distinct_texts, rrf_fuse


def test_rrf_fuse_orders_by_summed_reciprocal_ranks() -> None:
    fused = rrf_fuse({"dense": [("a", 0.9), ("b", 0.8), ("c", 0.7)], "bm25": [("c", 12.0), ("a", 3.0)]}, k=3, rrf_k=60)
    ids = [d for d, _, _ in fused]
    assert ids == ["a", "c", "b"]
    a = dict((d, (s, det)) for d, s, det in fused)["a"]
    assert a[0] == pytest.approx(1 / 61 + 1 / 62)
    assert a[1] == {"dense": (1, 0.9), "bm25": (2, 3.0)}
    assert rrf_fuse({"dense": [], "bm25": []}, k=5) == []
    # Deterministic tie-break.
    assert [d for d, _, _ in rrf_fuse({"x": [("b", 1.0)], "y": [("a", 1.0)]}, k=2)] == ["a", "b"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("question", "quote", "file"),
    [
        ("杰文斯悖论是什么？", "杰文斯悖论", "004"),
        ("What is the Jevons paradox?", "杰文斯悖论", "004"),
        ("专家混合模型（MoE）如何提升效率？", "MoE", "002"),
    ],
)
def test_hybrid_retrieval_finds_the_passage(corpus_settings: Settings, embedder, question: str, quote: str,
                                            file: str) -> None:
    retriever = HybridRetriever(Index(corpus_settings, embedder=embedder), k=5, fetch_k=20)
    result = retriever.retrieve(question)
    assert len(result.hits) == 5
    assert any(quote in h.chunk.text and Path(h.chunk.source).name.startswith(file) for h in result.hits)
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.dense_score is not None or h.bm25_score is not None for h in result.hits)
    assert any(h.dense_score is not None and h.bm25_score is not None for h in result.hits)
    d = result.hits[0].as_dict()
    assert {"source", "start", "end", "text", "score", "dense_score", "bm25_score"} <= set(d)


@pytest.mark.slow
def test_dense_only_and_bm25_only_modes(corpus_settings: Settings, embedder) -> None:
    idx = Index(corpus_settings, embedder=embedder)
    dense = HybridRetriever(idx, k=3, mode="dense").retrieve("DeepSeek 的训练成本")
    bm25 = HybridRetriever(idx, k=3, mode="bm25").retrieve("DeepSeek 的训练成本")
    assert all(h.bm25_score is None for h in dense.hits)
    assert all(h.dense_score is None for h in bm25.hits)


def test_distinct_texts_keeps_the_best_of_each_text() -> None:
    from types import SimpleNamespace

    texts = {"a": "同一段。", "b": "同一段。\n", "c": "另一段。", "d": "第三段。"}
    chunks = {i: SimpleNamespace(text=t) for i, t in texts.items()}
    fused = [(i, 1.0 / n, {}) for n, i in enumerate("abcd", start=1)]
    assert [d for d, _, _ in distinct_texts(fused, chunks, k=2)] == ["a", "c"]
    assert [d for d, _, _ in distinct_texts(fused, chunks, k=5)] == ["a", "c", "d"]


@pytest.mark.slow
def test_a_file_indexed_twice_does_not_fill_the_hits_with_copies(tmp_path: Path, embedder) -> None:
    from .conftest import CORPUS, make_settings

    src = sorted(CORPUS.glob("*.txt"))[1]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / src.name).write_bytes(src.read_bytes())
    settings = make_settings(index=tmp_path / "index")
    idx = Index(settings, embedder=embedder)
    idx.ingest([tmp_path / "a", tmp_path / "b"])
    hits = HybridRetriever(idx, k=5).retrieve("生成式人工智能").hits
    texts = [h.chunk.text.strip() for h in hits]
    assert len(hits) == 5 and len(set(texts)) == 5
