"""Hybrid retrieval: dense (Chroma) and BM25 (jieba tokens) lists fused by reciprocal rank fusion.

Dense search finds paraphrases and cross-lingual matches (an English question over Chinese text); BM25
finds exact names, numbers and rare terms that embeddings blur. RRF needs no score calibration between
the two, which matters because cosine similarities and BM25 scores live on unrelated scales.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import zip_longest

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
    context: str | None = None  # the sentences of the chunk given to the model, when not the whole chunk

    @property
    def prompt_text(self) -> str:
        return (self.context if self.context is not None else self.chunk.text).strip()

    def as_dict(self) -> dict[str, object]:
        c = self.chunk
        out: dict[str, object] = {
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
        if self.context is not None:
            out["context"] = self.context
        return out


def rrf_fuse(
    lists: dict[str, list[tuple[str, float]]], k: int, rrf_k: int = 60, weights: dict[str, float] | None = None
) -> list[tuple[str, float, dict[str, tuple[int, float]]]]:
    """Fuse ranked lists: score(d) = sum over lists of weight / (rrf_k + rank(d)), ranks from 1, weight 1
    unless `weights` names the list.

    Returns (id, fused score, {list name: (rank, original score)}) for the top k. Exact ties are common
    (dense's first and BM25's first both score 1/(rrf_k + 1)); they go to the better single rank, then to
    the list given first. Not to the id: ids hash the file's path, so the same passages in another folder
    (or beside one more file) would come in another order and make another prompt.
    """
    fused: dict[str, float] = {}
    detail: dict[str, dict[str, tuple[int, float]]] = {}
    best: dict[str, tuple[int, int]] = {}  # (rank, list position): one document per pair, so no tie is left
    for position, (name, ranked) in enumerate(lists.items()):
        for rank, (doc_id, score) in enumerate(ranked, start=1):
            fused[doc_id] = fused.get(doc_id, 0.0) + (weights or {}).get(name, 1.0) / (rrf_k + rank)
            detail.setdefault(doc_id, {})[name] = (rank, score)
            best[doc_id] = min(best.get(doc_id, (rank, position)), (rank, position))
    order = sorted(fused, key=lambda d: (-fused[d], best[d]))[:k]
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


def _best(detail: dict[str, tuple[int, float]], kind: str) -> tuple[int, float] | None:
    """The best (rank, score) of one kind of list over the question's forms ("dense", "dense.1", ...)."""
    ranks = [v for name, v in detail.items() if name == kind or name.startswith(kind + ".")]
    return min(ranks) if ranks else None


@dataclass
class Retrieval:
    hits: list[Hit]
    embed_ms: float
    search_ms: float
    vector: list[float] | None = field(default=None, repr=False)  # the query's embedding, for `focus`

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

    def retrieve(
        self, query: str, k: int | None = None, also: Sequence[str] = (), parts: Sequence[str] = ()
    ) -> Retrieval:
        """Top k for `query`; each form in `also` (the question put into the documents' language) adds its
        own dense and BM25 lists to the fusion, after the original's, so ties still go to the original.
        `parts` (the questions a question asks, chain.question_parts) add theirs too, all of them together
        weighing as one form: at full weight each, on the eval's tune part (2026-12-03) they pushed the
        passage answering the whole question down to where the prompt budget cut it."""
        k = k or self.k
        also = [a for a in dict.fromkeys(also) if a and a != query]
        parts = [p for p in dict.fromkeys(parts) if p and p != query and p not in also]
        form_weights = [1.0] * len(also) + [1.0 / len(parts) for _ in parts]  # no part: no division
        also = [*also, *parts]
        if self.index.changed():  # a long-lived process (chat, serve) answers from what is committed now
            self.index.refresh()
        self.index.load_chunks()  # the first call reads them: not a cost of this query's search
        t0 = time.perf_counter()
        dense_mode = self.mode in ("hybrid", "dense")
        vector = self.index.embedder.embed_query(query) if dense_mode else None
        also_vectors = [self.index.embedder.embed_query(a) for a in also] if dense_mode else []
        t1 = time.perf_counter()
        for attempt in range(3):
            chunks = self.index.load_chunks()
            lists: dict[str, list[tuple[str, float]]] = {}
            weights: dict[str, float] = {}
            if vector is not None:
                lists["dense"] = self.index.dense_search(vector, self.fetch_k)
                # Too few live vectors: an ingest committed after the chunks were read and is deleting the
                # old version's vectors. Read the new state and search it, so one answer sees one version.
                if len(lists["dense"]) < min(self.fetch_k, len(chunks)) and attempt < 2 and self.index.changed():
                    self.index.refresh()
                    continue
            if self.mode in ("hybrid", "bm25"):
                lists["bm25"] = self.index.bm25_search(query, self.fetch_k)
            for i, (form, weight) in enumerate(zip(also, form_weights, strict=True), start=1):
                if also_vectors:
                    lists[f"dense.{i}"] = self.index.dense_search(also_vectors[i - 1], self.fetch_k)
                    weights[f"dense.{i}"] = weight
                if self.mode in ("hybrid", "bm25"):
                    lists[f"bm25.{i}"] = self.index.bm25_search(form, self.fetch_k)
                    weights[f"bm25.{i}"] = weight
            break
        fused = distinct_texts(rrf_fuse(lists, 2 * self.fetch_k, self.rrf_k, weights), chunks, k)
        t2 = time.perf_counter()
        hits = []
        for doc_id, score, detail in fused:
            dense = _best(detail, "dense")
            bm25 = _best(detail, "bm25")
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
        return Retrieval(hits=hits, embed_ms=(t1 - t0) * 1000, search_ms=(t2 - t1) * 1000, vector=vector)


# ---- context focus: the sentences that matter ------------------------------------------------------------
# Prompt processing is what the user waits for on a CPU (~85 tokens/s for the 1.5B model on 2 cores), and
# five whole passages are ~900 tokens. Most of a passage is context for the one or two sentences that answer;
# choosing sentences across the top passages to fill a token budget keeps the evidence and drops the wait.
_SENTENCE = re.compile(r".+?(?:[。！？；!?…]+[”’」』）)\"']*|\.(?=\s)|\n+|$)", re.S)


# A "sentence" longer than this many characters is cut at its commas or spaces (then every MAX_UNIT_CHARS):
# a transcript's run-on paragraphs have no sentence ends, and one such sentence filled the whole budget.
MAX_UNIT_CHARS = 80
_CLAUSE_END = re.compile(r"[，,、：:）)]+\s*|\s+")


def split_long(text: str, limit: int = MAX_UNIT_CHARS) -> list[str]:
    """`text` in pieces of at most about `limit` characters, cut after commas or at spaces where it can
    be, hard every `limit` characters where it cannot. Concatenated they give back the text."""
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = None
        for m in _CLAUSE_END.finditer(text, start + limit // 3, start + limit):
            cut = m.end()
        cut = cut or start + limit
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p]


def sentences(text: str) -> list[str]:
    """Sentences with their trailing punctuation; `3.5` and `e.g.x` stay whole (a period ends one only
    before whitespace). Concatenated they give back the text."""
    return [m.group(0) for m in _SENTENCE.finditer(text) if m.group(0)]


@dataclass(eq=False)  # one object a sentence: hashed by identity
class _Sentence:
    hit: int
    pos: int
    text: str
    tokens: int
    score: float = 0.0
    part_scores: list[float] = field(default_factory=list)  # one per question part


_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
_WORD = re.compile(r"\w")  # letters, digits and CJK characters
MIN_WORD_CHARS = 3  # a sentence sharing nothing with the question, shown for its own sake, holds this many (focus)


def overlap_grams(text: str) -> set[str]:
    """Character bigrams of CJK runs plus lower-cased words: a language-neutral overlap measure that needs
    no word segmentation (a question's 训练方法 matches a passage's 训练方法 however jieba cuts either)."""
    text = text.lower()
    grams = {m for m in re.findall(r"[a-z0-9][a-z0-9.%-]*", text) if len(m) > 1}
    for run in _CJK_RUN.findall(text):
        grams.update(run[i : i + 2] for i in range(len(run) - 1))
    return grams


def _ranked(own: list[_Sentence]) -> list[_Sentence]:
    """A passage's sentences, most relevant first: for a question in parts, each part's best in turn, then the
    rest by the whole question; sentences with no overlap at all keep the passage's order."""
    order = sorted(own, key=lambda u: -u.score)
    if own and own[0].part_scores:
        per_part = [sorted((u for u in own if u.part_scores[j] > 0), key=lambda u: -u.part_scores[j])
                    for j in range(len(own[0].part_scores))]
        order = [u for turn in zip_longest(*per_part) for u in turn if u is not None] + order
    return list(dict.fromkeys(order))


def _spread(by_hit: list[list[_Sentence]], take: Callable[[_Sentence], bool]) -> None:
    """focus(spread=True)'s order: passages take turns, in rank order, each taking its next sentence from a
    queue of its relevant sentences, best first, each followed by its neighbours; what room is left then goes
    to the rest in rank order."""
    queues = []
    for own in by_hit:
        by_pos = {u.pos: u for u in own}
        queue: list[_Sentence] = []
        for u in _ranked(own):
            if u.score > 0 or any(u.part_scores):
                queue += [v for v in (u, by_pos.get(u.pos - 1), by_pos.get(u.pos + 1)) if v is not None]
        queues.append(list(dict.fromkeys(queue)))
    for turn in zip_longest(*queues):
        for u in turn:
            if u is not None:
                take(u)
    for own in by_hit:
        for u in own:
            take(u)


def focus(
    query: str,
    hits: Sequence[Hit],
    budget: int,
    count_tokens: Callable[[str], int],
    query_vector: Sequence[float] | None = None,
    embed: Callable[[list[str]], list[list[float]]] | None = None,
    split_chars: int = MAX_UNIT_CHARS,
    parts: Sequence[str] = (),
    spread: bool = False,
) -> list[Hit]:
    """Fit the passages' text into `budget` tokens: the best passages whole, then the best sentences of the
    next ones.

    Passages go in rank order; one that fits the room left is kept whole (a passage's sentences explain
    each other: lists, the subject of a figure). The first that does not fit keeps its most relevant
    sentences, then their neighbours, while they fit; later passages get what room is left the same way.
    A sentence scores by the share of the question's CJK bigrams and words it holds, plus, when `embed` is
    given, its cosine similarity to the question (cross-lingual, but ~0.1 s per sentence with
    EmbeddingGemma on 2 cores: too slow for the default). For a question that asks several things (`parts`),
    a cut passage gives each part its best sentence in turn before the rest: the sentence holding the second
    number shares few words with the whole question, and lost its place to more about the first. Citation numbers
    stay per passage; passages left with no sentence are dropped. When everything fits, the hits come back
    unchanged.

    `spread`: once a passage does not fit whole, it and the passages after it take turns (each its best
    sentence, in rank order, then each its next with its neighbours) instead of the first of them taking
    all the room left.
    """
    units: list[_Sentence] = []
    for i, hit in enumerate(hits):
        pieces: list[str] = []
        for text in sentences(hit.chunk.text.strip()):
            if pieces and not text.strip():
                pieces[-1] += text  # a blank line belongs to the sentence before it
            else:
                pieces.extend(split_long(text, split_chars) if split_chars > 0 else [text])
        units.extend(_Sentence(i, j, text, count_tokens(text)) for j, text in enumerate(pieces))
    if sum(u.tokens for u in units) <= budget:
        return list(hits)

    wanted = overlap_grams(query)
    part_grams = [g for g in (overlap_grams(p) for p in parts) if g]
    dense = [0.0] * len(units)
    if embed is not None and query_vector is not None:
        import numpy as np

        q = np.asarray(query_vector, dtype=np.float32)
        vecs = np.asarray(embed([u.text.strip() for u in units]), dtype=np.float32)
        dense = (vecs @ q).tolist()
    for u, d in zip(units, dense, strict=True):
        grams = overlap_grams(u.text)
        u.score = d + (len(wanted & grams) / len(wanted) if wanted else 0.0)
        u.part_scores = [len(g & grams) / len(g) for g in part_grams]

    chosen: set[tuple[int, int]] = set()
    used = 0

    def take(u: _Sentence) -> bool:
        nonlocal used
        if (u.hit, u.pos) in chosen or used + u.tokens > budget:
            return False
        chosen.add((u.hit, u.pos))
        used += u.tokens
        return True

    by_hit: list[list[_Sentence]] = [[] for _ in hits]
    for u in units:
        by_hit[u.hit].append(u)
    for i, own in enumerate(by_hit):
        if used + sum(u.tokens for u in own) <= budget:
            for u in own:
                take(u)
            continue
        if spread:
            _spread(by_hit[i:], take)
            break
        by_pos = {u.pos: u for u in own}
        for u in _ranked(own):
            # A list marker or a heading word alone ("1.", "目录", "74。") that shares nothing with the question
            # is no sentence to show for its own sake: leftover room filled with them gave 71 of 419 shown
            # passages on the eval's tune part under 20 characters, a numbered label around nothing. As a
            # neighbour it still comes along.
            if not (u.score or any(u.part_scores)) and len(_WORD.findall(u.text)) < MIN_WORD_CHARS:
                continue
            if take(u):
                for near in (by_pos.get(u.pos - 1), by_pos.get(u.pos + 1)):
                    if near is not None:
                        take(near)

    out = []
    for i, (hit, own) in enumerate(zip(hits, by_hit, strict=True)):
        parts, last = [], None
        for u in own:
            if (i, u.pos) in chosen:
                if last is not None and u.pos != last + 1:
                    parts.append("…")
                parts.append(u.text)
                last = u.pos
        if parts:
            text = "".join(parts).strip()
            out.append(hit if text == hit.chunk.text.strip() else replace(hit, context=text))
    return out
