"""The inverted-index BM25 must give rank_bm25's scores exactly: it replaced it without changing retrieval."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from ragqa.bm25 import BM25
from ragqa.index import tokenize
from ragqa.ingest import iter_files, load_text, split_text

from .conftest import CORPUS, ROOT


@pytest.fixture(scope="module")
def corpus_tokens() -> list[list[str]]:
    """Token lists of the corpus chunks exactly as ingest stores them (heading + text), no model needed."""
    out = []
    for path in iter_files([CORPUS]):
        for c in split_text(load_text(path), str(path), 400, 80, "x"):
            out.append(tokenize(f"{c.heading}\n{c.text}") or ["\0"])
    return out


def _queries() -> list[list[str]]:
    lines = (ROOT / "evals" / "corpus_qa.jsonl").read_text(encoding="utf-8").splitlines()
    return [tokenize(json.loads(line)["question"]) for line in lines if line.strip()]


def test_scores_equal_rank_bm25_on_the_corpus(corpus_tokens: list[list[str]]) -> None:
    ref, ours = BM25Okapi(corpus_tokens), BM25(corpus_tokens)
    queries = _queries()
    assert len(queries) == 90 and len(corpus_tokens) > 100
    for q in queries + [["杰文斯悖论", "杰文斯悖论"], ["no-such-term"], []]:
        expected = ref.get_scores(q)
        got = ours.get_scores(q)
        assert np.array_equal(expected, got), (q, np.abs(expected - got).max())
        top = ours.top_k(q, 20)
        best = sorted(expected[expected > 0], reverse=True)[:20]
        assert [s for _, s in top] == [float(x) for x in best]
        assert all(expected[i] == s for i, s in top)


def test_negative_idf_floor_and_ties() -> None:
    # "a" is in more than half the documents: rank_bm25 floors its idf at epsilon * mean idf.
    docs = [["a", "b"], ["a", "c"], ["a"], ["d", "a"], ["b", "e"]]
    ref, ours = BM25Okapi(docs), BM25(docs)
    for q in (["a"], ["b"], ["a", "b", "a"], ["e", "d"]):
        assert np.array_equal(ref.get_scores(q), ours.get_scores(q))
    # Equal scores come back in row order, so results do not depend on numpy's sort.
    tied = BM25([["y"], ["x"], ["z"], ["x"], ["w"], ["x"], ["v"], ["u"]])
    assert [i for i, _ in tied.top_k(["x"], 2)] == [1, 3]
    assert [i for i, _ in tied.top_k(["x"], 5)] == [1, 3, 5]
    assert tied.top_k(["zzz"], 3) == []
    assert BM25([]).top_k(["x"], 3) == []
