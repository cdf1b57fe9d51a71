"""Hybrid retrieval: dense (Chroma) and BM25 (jieba tokens) lists fused by reciprocal rank fusion.

Dense search finds paraphrases and cross-lingual matches (an English question over Chinese text); BM25
finds exact names, numbers and rare terms that embeddings blur. RRF needs no score calibration between
the two, which matters because cosine similarities and BM25 scores live on unrelated scales.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ragqa.index import Index
from ragqa.ingest import Chunk


@dataclass
class Hit:
    chunk: Chunk
    score: float  # fused RRF score
    dense_score: float | None = None
    dense_rank: int | None = None
    bm25_score: float | None = None
    bm25_rank: int | None = None

    def as_dict(self) -> dict[str, object]:
        c = self.chunk
        return {
            "source": c.source,
            "start": c.start,
            "end": c.end,
            "text": c.text,
            "score": round(self.score, 6),
            "heading": c.heading,
            "lines": [c.start_line, c.end_line],
            "page": c.page,
            "dense_score": None if self.dense_score is None else round(self.dense_score, 6),
            "dense_rank": self.dense_rank,
            "bm25_score": None if self.bm25_score is None else round(self.bm25_score, 6),
            "bm25_rank": self.bm25_rank,
        }


def rrf_fuse(
    lists: dict[str, list[tuple[str, float]]], k: int, rrf_k: int = 60
) -> list[tuple[str, float, dict[str, tuple[int, float]]]]:
    """Fuse ranked lists: score(d) = sum over lists of 1 / (rrf_k + rank(d)), ranks from 1.

    Returns (id, fused score, {list name: (rank, original score)}) for the top k, ties broken by id so
    the order is deterministic.
    """
    fused: dict[str, float] = {}
    detail: dict[str, dict[str, tuple[int, float]]] = {}
    for name, ranked in lists.items():
        for rank, (doc_id, score) in enumerate(ranked, start=1):
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (rrf_k + rank)
            detail.setdefault(doc_id, {})[name] = (rank, score)
    order = sorted(fused, key=lambda d: (-fused[d], d))[:k]
    return [(d, fused[d], detail[d]) for d in order]


def distinct_texts(fused: list[tuple[str, float, dict]], chunks: dict, k: int) -> list[tuple[str, float, dict]]:
    """The top k whose texts differ: a file indexed twice (a copy in another folder, a backup) would
    otherwise fill the k places with pairs of one passage and crowd out the second-best evidence."""
    seen: set[str] = set()
    out = []
    for item in fused:
        text = chunks[item[0]].text.strip()
        if text in seen:
            continue
        seen.add(text)
        out.append(item)
        if len(out) == k:
            break
    return out


@dataclass
class Retrieval:
    hits: list[Hit]
    embed_ms: float
    search_ms: float

    @property
    def total_ms(self) -> float:
        return self.embed_ms + self.search_ms


class HybridRetriever:
    """Dense + BM25 over one index; `k` results, each list contributing its top `fetch_k` candidates."""

    def __init__(self, index: Index, k: int = 5, fetch_k: int = 20, rrf_k: int = 60, mode: str = "hybrid") -> None:
        self.index = index
        self.k = k
        self.fetch_k = max(fetch_k, k)
        self.rrf_k = rrf_k
        self.mode = mode  # "hybrid", "dense" or "bm25": the last two exist to measure what fusion buys

    def retrieve(self, query: str, k: int | None = None) -> Retrieval:
        k = k or self.k
        chunks = self.index.load_chunks()
        t0 = time.perf_counter()
        lists: dict[str, list[tuple[str, float]]] = {}
        if self.mode in ("hybrid", "dense"):
            vector = self.index.embedder.embed_query(query)
            t1 = time.perf_counter()
            lists["dense"] = self.index.dense_search(vector, self.fetch_k)
        else:
            t1 = time.perf_counter()
        if self.mode in ("hybrid", "bm25"):
            lists["bm25"] = self.index.bm25_search(query, self.fetch_k)
        fused = distinct_texts(rrf_fuse(lists, 2 * self.fetch_k, self.rrf_k), chunks, k)
        t2 = time.perf_counter()
        hits = []
        for doc_id, score, detail in fused:
            dense = detail.get("dense")
            bm25 = detail.get("bm25")
            hits.append(
                Hit(
                    chunk=chunks[doc_id],
                    score=score,
                    dense_rank=dense[0] if dense else None,
                    dense_score=dense[1] if dense else None,
                    bm25_rank=bm25[0] if bm25 else None,
                    bm25_score=bm25[1] if bm25 else None,
                )
            )
        return Retrieval(hits=hits, embed_ms=(t1 - t0) * 1000, search_ms=(t2 - t1) * 1000)

