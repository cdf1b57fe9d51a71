"""BM25 (Okapi) over an inverted index: the scores of `rank_bm25.BM25Okapi`, at a cost per query term that
grows with the term's postings instead of with the whole corpus.

rank_bm25 builds a Python list of every document's term counts per query term, which takes ~0.1 s per
term at 100k chunks. Here each term's postings (document rows and their precomputed BM25 term weight) are
numpy arrays, so a query touches only the documents that contain its terms. The arithmetic is the same
expression in the same order as rank_bm25's (idf with the epsilon floor, query terms repeated as often as
they occur), so the scores are equal to the last bit; tests compare the two on the corpus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class BM25:
    """BM25Okapi scores for token lists; `k1`, `b`, `epsilon` as in rank_bm25's defaults."""

    def __init__(self, corpus: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        self.k1, self.b, self.epsilon = k1, b, epsilon
        self.n_docs = len(corpus)
        vocab: dict[str, int] = {}
        # Term ids in order of first appearance: the order rank_bm25 sums idfs in (its average must match).
        term_ids = np.fromiter(
            (vocab.setdefault(t, len(vocab)) for doc in corpus for t in doc), dtype=np.int64
        )
        doc_len = np.fromiter((len(doc) for doc in corpus), dtype=np.int64, count=self.n_docs)
        self.vocab = vocab
        self.avgdl = float(doc_len.sum()) / self.n_docs if self.n_docs else 0.0
        n_terms = len(vocab)
        if not self.n_docs or not n_terms:
            self.idf = np.zeros(n_terms)
            self.indptr = np.zeros(n_terms + 1, dtype=np.int64)
            self.docs = np.zeros(0, dtype=np.int32)
            self.weights = np.zeros(0)
            return
        doc_of = np.repeat(np.arange(self.n_docs, dtype=np.int64), doc_len)
        # One (term, doc) key per occurrence; unique keys sorted by term then doc are the postings, their
        # counts the term frequencies.
        keys, tf = np.unique(term_ids * self.n_docs + doc_of, return_counts=True)
        post_term = keys // self.n_docs
        post_doc = keys % self.n_docs
        df = np.bincount(post_term, minlength=n_terms)
        self.indptr = np.concatenate(([0], np.cumsum(df)))
        self.docs = post_doc.astype(np.int32)
        dl = doc_len[post_doc]
        # rank_bm25: q_freq * (k1 + 1) / (q_freq + k1 * (1 - b + b * doc_len / avgdl)), same operation order.
        self.weights = tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / self.avgdl))

        idf = [0.0] * n_terms
        idf_sum = 0.0
        negative = []
        for tid, freq in enumerate(df.tolist()):
            value = math.log(self.n_docs - freq + 0.5) - math.log(freq + 0.5)
            idf[tid] = value
            idf_sum += value
            if value < 0:
                negative.append(tid)
        eps = self.epsilon * (idf_sum / n_terms)
        for tid in negative:
            idf[tid] = eps
        self.idf = idf

    def get_scores(self, query: Sequence[str]) -> np.ndarray:
        """A score per document, as `BM25Okapi.get_scores` (unknown terms add nothing)."""
        scores = np.zeros(self.n_docs)
        for term in query:
            tid = self.vocab.get(term)
            if tid is None:
                continue
            lo, hi = self.indptr[tid], self.indptr[tid + 1]
            scores[self.docs[lo:hi]] += self.idf[tid] * self.weights[lo:hi]
        return scores

    def top_k(self, query: Sequence[str], k: int) -> list[tuple[int, float]]:
        """(document row, score) of the k best documents with a positive score; ties by row, for determinism."""
        scores = self.get_scores(query)
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:
            hits = hits[np.argpartition(-scores[hits], k - 1)[:k]]
            # argpartition cuts ties at the k-th score arbitrarily: take every row tied with it, then sort.
            cut = scores[hits].min()
            hits = np.flatnonzero(scores >= cut)
        order = np.lexsort((hits, -scores[hits]))[:k]
        return [(int(hits[i]), float(scores[hits[i]])) for i in order]

    @property
    def nbytes(self) -> int:
        """Memory of the postings arrays (the vocabulary dict comes on top)."""
        return int(self.docs.nbytes + self.weights.nbytes + self.indptr.nbytes)
