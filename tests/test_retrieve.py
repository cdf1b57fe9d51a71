from pathlib import Path

import pytest

from ragqa.config import Settings
from ragqa.index import Index
from ragqa.ingest import Chunk
from ragqa.retrieve import Hit, HybridRetriever, distinct_texts, focus, rrf_fuse, sentences


def test_rrf_fuse_orders_by_summed_reciprocal_ranks() -> None:
    fused = rrf_fuse({"dense": [("a", 0.9), ("b", 0.8), ("c", 0.7)], "bm25": [("c", 12.0), ("a", 3.0)]}, k=3, rrf_k=60)
    ids = [d for d, _, _ in fused]
    assert ids == ["a", "c", "b"]
    a = dict((d, (s, det)) for d, s, det in fused)["a"]
    assert a[0] == pytest.approx(1 / 61 + 1 / 62)
    assert a[1] == {"dense": (1, 0.9), "bm25": (2, 3.0)}
    assert rrf_fuse({"dense": [], "bm25": []}, k=5) == []
    # Ties go to the better single rank, then to the list given first, whatever the ids (they hash paths).
    for first, second in (("a", "b"), ("b", "a")):
        tied = rrf_fuse({"dense": [(first, 0.5), ("c", 0.4)], "bm25": [(second, 9.0), ("d", 1.0)]}, k=4)
        assert [d for d, _, _ in tied] == [first, second, "c", "d"]
    # A list's weight scales its votes: two half-weight lists (a question's two parts) count as one.
    lists = {"dense": [("a", 0.9), ("b", 0.8)], "dense.1": [("b", 0.9)], "dense.2": [("b", 0.9)]}
    assert [d for d, _, _ in rrf_fuse(lists, k=2)] == ["b", "a"]
    halves = rrf_fuse(lists, k=2, weights={"dense.1": 0.5, "dense.2": 0.5})
    assert dict((d, s) for d, s, _ in halves)["b"] == pytest.approx(1 / 62 + 1 / 61)


class _ListIndex:
    """Logic-only index stand-in: every search returns the same ranked ids, whatever the query."""

    def __init__(self, ranked: list[str]) -> None:
        self.chunks = {i: Chunk(i, "f.txt", 0, 1, i, "", 1, 1) for i in ranked}
        self.ranked = [(i, 1.0 / (n + 1)) for n, i in enumerate(ranked)]
        self.embedder = type("E", (), {"embed_query": staticmethod(lambda q: [0.0])})()

    def changed(self) -> bool:
        return False

    def load_chunks(self) -> dict:
        return self.chunks

    def dense_search(self, vector, k: int) -> list:
        return self.ranked[:k]

    def bm25_search(self, query: str, k: int) -> list:
        return self.ranked[:k]


def test_retrieval_weighs_each_form_once_and_the_parts_together_as_one() -> None:
    """A question with no parts (the common case) fuses its own and its translation's lists at full weight;
    parts add lists that together weigh one form."""
    retriever = HybridRetriever(_ListIndex(["a", "b", "c"]), k=2, fetch_k=3)
    alone = retriever.retrieve("q")
    assert [h.chunk.id for h in alone.hits] == ["a", "b"] and alone.hits[0].score == pytest.approx(2 / 61)
    translated = retriever.retrieve("q", also=["问"])
    assert translated.hits[0].score == pytest.approx(4 / 61)
    parted = retriever.retrieve("q", also=["问"], parts=["p1", "p2"])
    assert parted.hits[0].score == pytest.approx(6 / 61)


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


# ---- focus: sentences within a token budget ------------------------------------------------------------
def test_sentences_split_chinese_and_english_and_give_back_the_text() -> None:
    text = "杰文斯悖论由杰文斯提出。效率提高，消耗反而增加！为什么？GPT-3.5 has 175B params. Next one\n标题\n"
    parts = sentences(text)
    assert "".join(parts) == text
    assert parts[:3] == ["杰文斯悖论由杰文斯提出。", "效率提高，消耗反而增加！", "为什么？"]
    assert "GPT-3.5 has 175B params." in parts  # a decimal point does not end a sentence


def _hit(i: int, text: str) -> Hit:
    return Hit(Chunk(f"c{i}", f"/d/{i}.txt", 0, len(text), text, "", 1, 1), 1.0 / (i + 1))


def test_focus_keeps_everything_when_it_fits() -> None:
    hits = [_hit(0, "短句一。短句二。"), _hit(1, "短句三。")]
    assert focus("问题", hits, budget=100, count_tokens=len) == hits


def test_focus_keeps_the_best_passages_whole_then_the_relevant_sentences_of_the_next() -> None:
    filler = "这里是一段与问题无关的背景描述文字。"
    hits = [
        _hit(0, "杰文斯悖论指效率提高反而增加资源消耗。"),
        _hit(1, filler * 3 + "杰文斯在1865年提出了这个悖论。" + filler * 2),
        _hit(2, "杰文斯悖论的另一个例子。" + filler),
    ]
    budget = 60
    out = focus("杰文斯悖论是谁提出的？", hits, budget=budget, count_tokens=len)
    assert sum(len(h.prompt_text.replace("…", "")) for h in out) <= budget
    assert out[0] is hits[0] and out[0].context is None  # the top passage fits: whole
    assert out[1].chunk.id == "c1" and "1865" in out[1].prompt_text and out[1].context is not None
    assert out[1].prompt_text.count(filler) < 5  # trimmed to the relevant sentence and its neighbours
    assert [h.chunk.id for h in out] == sorted(h.chunk.id for h in out)  # rank order kept
    assert len(out) == 2  # no room left for the third


def test_spread_focus_lets_the_passages_that_do_not_fit_take_turns() -> None:
    """The first passage that does not fit whole no longer takes all the room left: it and the next ones
    each give their best sentence first, so the second passage's answer is kept."""
    filler = "这里是一段与问题无关的背景描述文字。"
    hits = [
        _hit(0, "杰文斯悖论常被提起。" + filler * 3),
        _hit(1, filler + "杰文斯在1865年提出了这个悖论。" + filler),
        _hit(2, filler * 2),
    ]
    greedy = focus("杰文斯悖论是谁提出的？", hits, budget=60, count_tokens=len)
    assert [h.chunk.id for h in greedy] == ["c0"] and "1865" not in greedy[0].prompt_text
    out = focus("杰文斯悖论是谁提出的？", hits, budget=60, count_tokens=len, spread=True)
    assert [h.chunk.id for h in out] == ["c0", "c1"]  # rank order and numbers kept; c2 holds nothing relevant
    assert out[1].prompt_text == "杰文斯在1865年提出了这个悖论。" and "杰文斯悖论常被提起。" in out[0].prompt_text
    assert sum(len(h.prompt_text.replace("…", "")) for h in out) <= 60
    assert focus("杰文斯悖论是谁提出的？", hits, budget=1000, count_tokens=len, spread=True) == hits


def test_focus_without_any_overlap_keeps_a_passage_head() -> None:
    """An English question over Chinese text shares no bigrams: the passage's opening sentences are kept."""
    hits = [_hit(0, "第一句。第二句。第三句。第四句。")]
    assert focus("Who proposed it?", hits, budget=8, count_tokens=len)[0].context == "第一句。第二句。"


def test_focus_fills_no_leftover_room_with_list_markers() -> None:
    """Room left after the relevant sentences is not given to a list marker or a heading word that shares nothing
    with the question ("1.", "目录"): a numbered passage around nothing. Next to a kept sentence it stays."""
    hits = [_hit(0, "灯塔建于1960年。"), _hit(1, "目录\n1. 渡轮公司的历史很长很长。")]
    out = focus("灯塔是哪年建的？", hits, budget=13, count_tokens=len)
    assert [h.chunk.id for h in out] == ["c0"]
    one = [_hit(1, "1. 渡轮公司的历史很长很长。2. 别的话题也很长。")]
    kept = focus("渡轮公司的历史？", one, budget=16, count_tokens=len)
    assert kept[0].context == "1. 渡轮公司的历史很长很长。"


def test_focus_uses_the_embedding_for_cross_lingual_relevance() -> None:
    hits = [_hit(0, "甲句子。乙句子。丙句子。丁句子。")]
    vectors = {"甲句子。": [1.0, 0.0], "乙句子。": [0.0, 1.0], "丙句子。": [0.0, 1.0], "丁句子。": [0.6, 0.8]}
    out = focus("Which one?", hits, budget=4, count_tokens=len, query_vector=[1.0, 0.0],
                embed=lambda texts: [vectors[t] for t in texts])
    assert out[0].context == "甲句子。"
    assert out[0].as_dict()["context"] == "甲句子。" and out[0].as_dict()["text"] == hits[0].chunk.text


def test_focus_marks_a_gap_between_kept_sentences() -> None:
    vectors = {"甲。": [1.0, 0.0], "乙乙乙乙。": [0.0, 1.0], "丙。": [0.9, 0.1]}
    out = focus("Q", [_hit(0, "甲。乙乙乙乙。丙。")], budget=4, count_tokens=len, query_vector=[1.0, 0.0],
                embed=lambda texts: [vectors[t] for t in texts])
    assert out[0].context == "甲。…丙。"


def test_focus_adds_neighbours_when_room_is_left() -> None:
    hits = [_hit(0, "它由杰文斯提出。" + "无关。" * 10 + "杰文斯悖论的定义是什么。" + "也无关的长句子在这里。" * 3)]
    out = focus("杰文斯悖论的定义", hits, budget=20, count_tokens=len)
    assert "杰文斯悖论的定义是什么。" in out[0].prompt_text and "无关。" in out[0].prompt_text


@pytest.mark.slow
def test_focused_context_keeps_the_evidence_of_real_questions(small_qa) -> None:
    """On the real index and embedder: the quoted evidence survives trimming to the default budget."""
    import json

    suite = Path(__file__).parent.parent / "evals/corpus_qa.jsonl"
    rows = [json.loads(line) for line in suite.open(encoding="utf-8")]
    rows = [r for r in rows if r.get("evidence")][:12]
    kept = found = 0
    for row in rows:
        retrieval = small_qa.retriever.retrieve(row["question"])
        whole = " ".join(h.chunk.text for h in retrieval.hits)
        quotes = [q for q in row["evidence"] if q in whole]
        if not quotes:
            continue
        found += 1
        budget = small_qa.settings.context_tokens
        out = focus(row["question"], retrieval.hits, budget, small_qa.llm.count_tokens)
        assert sum(small_qa.llm.count_tokens(h.prompt_text) for h in out) <= budget + 8 * len(out)
        kept += any(q[:12] in " ".join(h.prompt_text for h in out) for q in quotes)
    # Focus keeps ~2 passages' worth: on the whole eval, 0.794 of the evidence is in the prompt against 0.969
    # retrieved (evals/RESULTS.md); here 10 of 12 questions keep theirs. Below 3 in 4 is a regression.
    assert found >= 6 and kept >= 0.75 * found, (kept, found)


def test_split_long_cuts_run_on_sentences_at_commas_or_spaces() -> None:
    from ragqa.retrieve import MAX_UNIT_CHARS, split_long

    run_on = "然后微软发了一篇论文 然后他公开了参数量 " * 12 + "所以这个过程其实就是一个反思的过程" * 3
    pieces = split_long(run_on)
    assert "".join(pieces) == run_on and len(pieces) > 3
    assert all(len(p) <= MAX_UNIT_CHARS for p in pieces)
    assert all(p.endswith(" ") for p in pieces[:3])  # cut where the speaker paused, not mid-word
    assert split_long("短句。") == ["短句。"]
    no_breaks = "字" * 200
    assert "".join(split_long(no_breaks)) == no_breaks and max(map(len, split_long(no_breaks))) <= MAX_UNIT_CHARS


@pytest.mark.slow
def test_the_translated_form_of_a_question_joins_the_fusion(small_qa) -> None:
    """An English question's Chinese form adds its own dense and BM25 lists: BM25 now finds the passage
    the English words could not (the corpus writes 杰文斯, not Jevons)."""
    alone = small_qa.retriever.retrieve("What does the Jevons paradox say about efficiency?")
    question = "What does the Jevons paradox say about efficiency?"
    both = small_qa.retriever.retrieve(question, also=["杰文斯悖论关于效率说了什么？"])
    assert "杰文斯" in both.hits[0].chunk.text and both.hits[0].bm25_rank is not None
    assert sum("杰文斯" in h.chunk.text for h in both.hits) >= sum("杰文斯" in h.chunk.text for h in alone.hits)



def test_focus_keeps_the_sentence_answering_a_second_part() -> None:
    """Scored against the whole question, the sentence with the baseline loses its place to one more about
    the first part; each part's best sentence first, it is kept."""
    text = "OLA-VLM 在分割任务中的 mIoU 分数很高。这是背景。OLA-VLM 的 mIoU 分数领先。这是背景。基线为 39.3%。"
    hits = [_hit(0, text)]
    question = "OLA-VLM 在分割任务中取得了多少 mIoU 分数？基线是多少？"
    whole = focus(question, hits, budget=52, count_tokens=len)[0].prompt_text
    parts = ["OLA-VLM 在分割任务中取得了多少 mIoU 分数？", "基线是多少？"]
    parted = focus(question, hits, budget=52, count_tokens=len, parts=parts)[0].prompt_text
    assert "39.3" not in whole and "领先" in whole
    assert "39.3" in parted and "很高" in parted
    assert focus(question, hits, budget=52, count_tokens=len, parts=["Which baseline?"])[0].prompt_text == whole
