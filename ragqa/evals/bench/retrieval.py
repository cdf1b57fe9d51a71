"""Retrieval at scale: dense + BM25 + fusion at the corpus size and at growing synthetic sizes, the query
embedding timed apart, BM25 beside rank_bm25 (the scorer ragqa used before)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from ragqa.evals.bench.common import BenchContext, dir_mb, make_table, met, rss_mb, summarize_ms

TARGET = "p95 <= 100 ms at 100k chunks, excluding the query embedding"


def run(ctx: BenchContext) -> dict[str, Any]:
    """Dense (Chroma) + BM25 + RRF latency at the corpus size and at synthetic sizes, query embedding apart."""
    import numpy as np

    from ragqa.index import Index
    from ragqa.retrieve import HybridRetriever

    s = ctx.index_settings
    corpus_index = Index(s, embedder=ctx.embedder)
    questions = [q["question"] for q in ctx.load_questions(ctx.questions or (20 if ctx.quick else None))]
    vectors = []
    embed_ms = []
    ctx.embedder.embed_query(questions[0])  # warm-up
    for q in questions:
        t = time.perf_counter()
        vectors.append(ctx.embedder.embed_query(q))
        embed_ms.append((time.perf_counter() - t) * 1000)
    k, fetch_k, rrf_k = s.k, max(s.fetch_k, s.k), s.rrf_k
    retriever = HybridRetriever(corpus_index, k=k, fetch_k=fetch_k, rrf_k=rrf_k)
    results = [_time_queries(corpus_index, retriever, questions, vectors, ctx.runs, label="corpus")]

    # The synthetic index: real vectors (the corpus's, tiled with small noise, re-normalised) and token lists
    # drawn Zipf-like from the corpus vocabulary, inserted through the same SQLite + Chroma layout.
    got = corpus_index.store._collection.get(include=["embeddings"])
    base = np.asarray(got["embeddings"], dtype=np.float32)
    corpus_index.load_chunks()
    token_lists = list(corpus_index._tokens.values())
    freq: dict[str, int] = {}
    for toks in token_lists:
        for tok in toks:
            freq[tok] = freq.get(tok, 0) + 1
    vocab = sorted(freq, key=lambda w: (-freq[w], w))
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    lengths = np.array([len(x) for x in token_lists])
    rng = np.random.default_rng(0)

    syn_dir = Path(tempfile.mkdtemp(prefix="retrieval-", dir=ctx.out))
    syn = Index(s.replace(index=syn_dir / "index"), embedder=ctx.embedder)
    con = syn._connect(create=True)
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)",
                    [("embedder", s.embedder), ("chunk_size", str(s.chunk_size)),
                     ("chunk_overlap", str(s.chunk_overlap)), ("splitter", syn.splitter)])
    collection = syn.store._collection
    max_batch = min(5000, int(syn.store._client.get_max_batch_size()))
    built = 0
    build_s = 0.0
    rss0 = rss_mb()
    skipped = []
    try:
        for size in sorted(ctx.sizes):
            if built:
                rate = built / build_s
                estimate_min = (size - built) / rate / 60
                if estimate_min > ctx.max_build_minutes:
                    skipped.append({"size": size, "estimated_build_minutes": round(estimate_min, 1),
                                    "insert_rate_per_s": round(rate, 1),
                                    "reason": f"estimated build > {ctx.max_build_minutes} min at the rate so far"})
                    ctx.console.print(f"[yellow]retrieval: skipping {size:,} chunks (estimated build "
                                      f"{estimate_min:.1f} min at {rate:,.0f} chunks/s)[/]")
                    continue
            t_build = time.perf_counter()
            for lo in range(built, size, max_batch):
                hi = min(size, lo + max_batch)
                n = hi - lo
                rows = rng.integers(0, len(base), n)
                vec = base[rows] + rng.normal(0, 0.02, (n, base.shape[1])).astype(np.float32)
                vec /= np.linalg.norm(vec, axis=1, keepdims=True)
                ids = [f"syn-{i:07d}" for i in range(lo, hi)]
                lens = lengths[rng.integers(0, len(lengths), n)]
                drawn = rng.choice(len(vocab), size=int(lens.sum()), p=zipf)
                docs, pos = [], 0
                for ln in lens.tolist():
                    docs.append([vocab[j] for j in drawn[pos : pos + ln]])
                    pos += ln
                texts = [" ".join(d)[:400] for d in docs]
                collection.add(ids=ids, embeddings=vec, documents=texts,
                               metadatas=[{"source": "synthetic", "start": 0, "end": len(x)} for x in texts])
                con.execute("BEGIN")
                con.executemany(
                    'INSERT INTO chunks (id, source, start, "end", heading, start_line, end_line, text, tokens) '
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    [(i, "synthetic", 0, len(x), "", 1, 1, x, json.dumps(d, ensure_ascii=False))
                     for i, x, d in zip(ids, texts, docs, strict=True)],
                )
                con.execute("COMMIT")
            build_s += time.perf_counter() - t_build
            insert_rate = (size - built) / (time.perf_counter() - t_build)
            built = size
            syn._chunks, syn._bm25 = None, None
            t_load = time.perf_counter()
            syn.load_chunks()
            load_s = time.perf_counter() - t_load
            retriever = HybridRetriever(syn, k=k, fetch_k=fetch_k, rrf_k=rrf_k)
            row = _time_queries(syn, retriever, questions, vectors, ctx.runs, label=f"{size}")
            row.update({"insert_rate_per_s": round(insert_rate, 1), "load_chunks_s": round(load_s, 3),
                        "rss_growth_mb": round(rss_mb() - rss0, 1), "disk_mb": round(dir_mb(syn_dir), 1),
                        "bm25_postings_mb": round(syn._bm25.nbytes / 1e6, 1)})
            if size <= 100000:
                row["rank_bm25"] = _rank_bm25_reference(syn, questions, ctx.runs)
            results.append(row)
            ctx.console.print(f"[dim]retrieval: {size:,} chunks done (insert {insert_rate:,.0f}/s)[/]")
    finally:
        con.close()
        shutil.rmtree(syn_dir, ignore_errors=True)
    at_100k = next((r for r in results if r["size"] == 100000), None)
    out = {
        "k": k, "fetch_k": fetch_k, "queries": len(questions), "runs": ctx.runs,
        "query_embed_ms": summarize_ms(embed_ms),
        "sizes": results,
        "skipped": skipped,
        "target": TARGET,
        "met": met(at_100k["search_ms"]["p95"], lambda x: x <= 100) if at_100k else None,
    }
    return out


def _time_queries(index: Any, retriever: Any, questions: list[str], vectors: list[list[float]], runs: int,
                  label: str) -> dict[str, Any]:
    """Time the retriever's own steps (dense_search, bm25_search, rrf_fuse) per query, embedding excluded."""
    from ragqa.retrieve import rrf_fuse

    dense_ms, bm25_ms, fuse_ms, total_ms = [], [], [], []
    for r in range(runs + 1):  # pass 0 warms up (loads chunks, builds BM25, pages in the HNSW index)
        for q, v in zip(questions, vectors, strict=True):
            t0 = time.perf_counter()
            dense = index.dense_search(v, retriever.fetch_k)
            t1 = time.perf_counter()
            bm25 = index.bm25_search(q, retriever.fetch_k)
            t2 = time.perf_counter()
            rrf_fuse({"dense": dense, "bm25": bm25}, retriever.k, retriever.rrf_k)
            t3 = time.perf_counter()
            if r:
                dense_ms.append((t1 - t0) * 1000)
                bm25_ms.append((t2 - t1) * 1000)
                fuse_ms.append((t3 - t2) * 1000)
                total_ms.append((t3 - t0) * 1000)
    size = len(index.load_chunks())
    return {"label": label, "size": size, "search_ms": summarize_ms(total_ms), "dense_ms": summarize_ms(dense_ms),
            "bm25_ms": summarize_ms(bm25_ms), "fuse_ms": summarize_ms(fuse_ms)}


def _rank_bm25_reference(index: Any, questions: list[str], runs: int) -> dict[str, Any]:
    """The scorer ragqa used before (rank_bm25), on the same tokens and queries: the BM25 baseline."""
    import numpy as np
    from rank_bm25 import BM25Okapi

    from ragqa.index import tokenize

    ids = index._bm25_ids
    ref = BM25Okapi([index._tokens[i] or ["\0"] for i in ids])
    ms = []
    max_diff = 0.0
    for r in range(runs + 1):
        for q in questions:
            toks = tokenize(q)
            t = time.perf_counter()
            scores = ref.get_scores(toks)
            np.argsort(-scores)[:20]
            if r:
                ms.append((time.perf_counter() - t) * 1000)
            elif toks:
                max_diff = max(max_diff, float(np.abs(scores - index._bm25.get_scores(toks)).max()))
    return {"bm25_ms": summarize_ms(ms), "max_abs_score_diff_vs_ragqa": max_diff}


def table(res: dict[str, Any]) -> Table:
    """The printed view of one result; the JSON holds everything, the table what a reader compares."""
    rows = []
    for r in res["sizes"]:
        ref = r.get("rank_bm25", {}).get("bm25_ms", {})
        rows.append([r["label"], r["size"], r["search_ms"]["p50"], r["search_ms"]["p95"], r["dense_ms"]["p95"],
                     r["bm25_ms"]["p95"], ref.get("p95"), r.get("insert_rate_per_s"), r.get("rss_growth_mb"),
                     r.get("disk_mb")])
    for sk in res["skipped"]:
        rows.append([f"skipped (est. {sk['estimated_build_minutes']} min)", sk["size"]] + [None] * 8)
    return make_table(
        f"retrieval, query embedding excluded (embed p50 {res['query_embed_ms']['p50']} ms; "
        f"{res['queries']} queries x {res['runs']} runs)",
        ["", "chunks", "p50 ms", "p95 ms", "dense p95", "bm25 p95", "rank_bm25 p95", "insert/s", "RSS +MB",
         "disk MB"], rows)
