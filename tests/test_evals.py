# ruff: noqa: RUF001  (full-width digits and CJK punctuation are the point of several tests)
"""Tests of ragqa.evals: every metric pinned on hand-made records over a tiny corpus written per test.

The records are built by hand rather than by running the pipeline so each edge case (a quote split
across chunks, a citation to nothing, full-width digits) is exercised on purpose, without any model.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ragqa.errors import RagqaError
from ragqa.evals.metrics import (
    CorpusTexts,
    Span,
    citation_markers,
    covers,
    judge,
    locate_evidence,
    normalize_text,
    percentile,
    score_question,
    summarize,
)
from ragqa.evals.report import write_report
from ragqa.evals.runner import compare, load_suite, make_record, run_suite

from .conftest import assert_one_line_error, run_cli

ZH_TEXT = (
    "第一章 公司概况\n"
    "公司在2023年的营业收入为1,000万元，同比增长12%。董事长表示，明年将继续扩大研发投入。\n"
    "第二章 产品\n"
    "主要产品包括智能音箱和翻译耳机，其中翻译耳机支持四十种语言的实时互译。\n"
)
EN_TEXT = (
    "Chapter 1. The Harbor\n"
    "The old lighthouse on Gull Point was built in 1887 and stood 42 meters tall.\n"
    "It was automated in 1968, after which the keeper's cottage became a small museum.\n"
    "Chapter 2. The Town\n"
    "The town council meets on the first Tuesday of every month in the Maritime Hall.\n"
)
ZH_FILE, EN_FILE = "000_zh.txt", "001_en.txt"


@pytest.fixture()
def corpus_dir(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / ZH_FILE).write_text(ZH_TEXT, encoding="utf-8")
    (d / EN_FILE).write_text(EN_TEXT, encoding="utf-8")
    return d


@pytest.fixture()
def corpus(corpus_dir: Path) -> CorpusTexts:
    return CorpusTexts(corpus_dir)


def text_of(name: str) -> str:
    return ZH_TEXT if name == ZH_FILE else EN_TEXT


def chunk(name: str, start: int, end: int, score: float = 0.5, prefix: str = "corpus/") -> dict[str, Any]:
    """A retrieved chunk as the pipeline reports it: a path (not a basename) and the exact slice."""
    return {
        "source": prefix + name,
        "start": start,
        "end": end,
        "text": text_of(name)[start:end],
        "score": score,
    }


def around(name: str, quote: str, before: int = 5, after: int = 5) -> dict[str, Any]:
    """A chunk holding the whole quote with a little context."""
    text = text_of(name)
    pos = text.index(quote)
    return chunk(name, max(0, pos - before), min(len(text), pos + len(quote) + after))


def elsewhere(name: str, at: int = 0, size: int = 12) -> dict[str, Any]:
    """A chunk from the start of a file that holds no evidence used below."""
    return chunk(name, at, at + size)


def question(
    qid: str,
    q: str,
    lang: str,
    qtype: str,
    source: list[str],
    evidence: list[str],
    must: list[str],
) -> dict[str, Any]:
    return {
        "id": qid,
        "question": q,
        "lang": lang,
        "type": qtype,
        "source": source,
        "evidence": evidence,
        "answer": "reference",
        "must_include": must,
    }


def result(
    q: dict[str, Any],
    retrieved: list[dict[str, Any]],
    answer: str | None = "",
    refused: bool | None = False,
    cite: list[int] | None = None,
    timings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An `ask --json` result; citations copy retrieved[n-1] as a correct pipeline would."""
    citations = [
        {"n": n, **{k: retrieved[n - 1][k] for k in ("source", "start", "end", "text")}} for n in cite or []
    ]
    return {
        "question": q["question"],
        "answer": answer,
        "refused": refused,
        "citations": citations,
        "retrieved": retrieved,
        "model": "fake" if answer is not None else None,
        "timings": timings
        or {
            "retrieve_ms": 10.0,
            "ttft_ms": 100.0,
            "total_ms": 1100.0,
            "prompt_tokens": 500,
            "completion_tokens": 50,
        },
    }


Q_REV = question(
    "q1", "2023年营业收入是多少？", "zh", "numeric", [ZH_FILE], ["营业收入为1,000万元"], ["1000万元"]
)
Q_LIGHT = question(
    "q2",
    "When was the Gull Point lighthouse built and how tall is it?",
    "en",
    "multi",
    [EN_FILE],
    ["was built in 1887", "stood 42 meters tall"],
    ["1887", "42 meters"],
)
Q_NEG = question("q3", "Who is the mayor of the town?", "en", "negative", [], [], [])
Q_EAR = question(
    "q4",
    "翻译耳机支持多少种语言？",
    "zh",
    "factoid",
    [ZH_FILE],
    ["翻译耳机支持四十种语言的实时互译"],
    ["四十种"],
)


def record(q: dict[str, Any], res: dict[str, Any], corpus: CorpusTexts, retrieval_only: bool = False) -> dict:
    return make_record(q, res, corpus, retrieval_only=retrieval_only)


# --- locating evidence and coverage ----------------------------------------------------------------


def test_locate_evidence_first_occurrence_and_second_source(corpus: CorpusTexts) -> None:
    q = question(
        "x", "?", "en", "factoid", [ZH_FILE, EN_FILE], ["Chapter", "营业收入", "not in any file"], []
    )
    spans = locate_evidence(q, corpus)
    assert spans[0] == Span(EN_FILE, EN_TEXT.index("Chapter"), EN_TEXT.index("Chapter") + 7)
    assert spans[1] == Span(ZH_FILE, ZH_TEXT.index("营业收入"), ZH_TEXT.index("营业收入") + 4)
    assert spans[2] is None


def test_locate_evidence_tolerates_rewrapped_whitespace(corpus: CorpusTexts) -> None:
    q = question("x", "?", "en", "factoid", [EN_FILE], ["42 meters tall.  It was\nautomated"], [])
    (span,) = locate_evidence(q, corpus)
    assert span is not None
    assert EN_TEXT[span.start : span.end] == "42 meters tall.\nIt was automated"


def test_locate_evidence_missing_source_file_is_not_found(corpus: CorpusTexts) -> None:
    q = question("x", "?", "en", "factoid", ["nope.txt"], ["Chapter"], [])
    assert locate_evidence(q, corpus) == [None]


def test_split_quote_counts_by_larger_half(corpus: CorpusTexts) -> None:
    quote = "The town council meets on the first Tuesday"  # 44 chars
    pos = EN_TEXT.index(quote)
    q = question("x", "?", "en", "factoid", [EN_FILE], [quote], [])
    res = result(
        q, [chunk(EN_FILE, pos - 30, pos + 20), chunk(EN_FILE, pos + 20, pos + 80)], answer=None, refused=None
    )
    s = score_question(q, res, corpus, retrieval_only=True)
    # The second chunk holds 24 of 44 characters (>= half), so the quote counts as retrieved, at rank 2.
    assert s["quotes_covered"] == 1 and s["hit"] is True
    assert s["covering_ranks"] == [2] and s["rr"] == 0.5


def test_split_quote_with_no_half_does_not_count(corpus: CorpusTexts) -> None:
    quote = "The town council meets on the first Tuesday"  # 44 chars
    pos = EN_TEXT.index(quote)
    q = question("x", "?", "en", "factoid", [EN_FILE], [quote], [])
    # 21 + 21 characters of 44 (a 2-character gap): neither chunk reaches half.
    res = result(
        q, [chunk(EN_FILE, pos - 30, pos + 21), chunk(EN_FILE, pos + 23, pos + 80)], answer=None, refused=None
    )
    s = score_question(q, res, corpus, retrieval_only=True)
    assert s["quotes_covered"] == 0 and s["hit"] is False and s["rr"] == 0.0
    assert summarize([record(q, res, corpus, retrieval_only=True)], {})["overall"]["evidence_recall@k"] == 0.0


def test_covers_needs_same_file_and_exact_half() -> None:
    quote = Span("a.txt", 100, 120)
    assert covers(Span("a.txt", 110, 200), quote)  # exactly half
    assert not covers(Span("a.txt", 111, 200), quote)
    assert not covers(Span("b.txt", 0, 500), quote)


def test_retrieval_metrics_pooled_over_quotes(corpus: CorpusTexts) -> None:
    # q2: quote 1 at rank 2, quote 2 not retrieved; q1: its quote at rank 1.
    r2 = result(
        Q_LIGHT, [elsewhere(EN_FILE), around(EN_FILE, "was built in 1887", 0, 0)], answer=None, refused=None
    )
    r1 = result(Q_REV, [around(ZH_FILE, "营业收入为1,000万元")], answer=None, refused=None)
    summary = summarize([record(Q_LIGHT, r2, corpus, True), record(Q_REV, r1, corpus, True)], {})
    overall = summary["overall"]
    assert overall["evidence_recall@k"] == pytest.approx(2 / 3)
    assert overall["hit@k"] == pytest.approx(0.5)
    assert overall["mrr"] == pytest.approx((0.5 + 1.0) / 2)


def test_chunk_from_other_file_with_same_offsets_does_not_cover(corpus: CorpusTexts) -> None:
    pos = ZH_TEXT.index("营业收入为1,000万元")
    r = result(Q_REV, [chunk(EN_FILE, pos, pos + 20)], answer=None, refused=None)
    assert score_question(Q_REV, r, corpus, retrieval_only=True)["hit"] is False


# --- key facts -------------------------------------------------------------------------------------


def test_normalize_text_thousands_fullwidth_case_space() -> None:
    assert normalize_text("1,000 万元") == normalize_text("1000万元") == normalize_text("１，０００万元")
    assert normalize_text("Gull  POINT") == normalize_text("gull point")
    assert normalize_text("１８８７") == "1887"
    assert normalize_text("a, b") == "a,b"  # only commas between digits are separators


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        ("营业收入为1,000万元[1]", True),
        ("营业收入为 1000 万元", True),
        ("营业收入为１，０００万元", True),
        ("营业收入为100万元", False),
    ],
)
def test_key_facts_thousands_and_fullwidth(corpus: CorpusTexts, answer: str, ok: bool) -> None:
    r = result(Q_REV, [around(ZH_FILE, "营业收入为1,000万元")], answer=answer, cite=[1])
    rec = record(Q_REV, r, corpus)
    assert rec["scores"]["key_facts_ok"] is ok
    assert rec["correct"] is ok
    if not ok:
        assert "missing key facts: 1000万元" in rec["reasons"]


def test_key_fact_accuracy_and_recall_case_insensitive(corpus: CorpusTexts) -> None:
    r2 = result(
        Q_LIGHT, [around(EN_FILE, "was built in 1887")], answer="It was built in 1887 and is 42 METERS tall."
    )
    r4 = result(Q_EAR, [around(ZH_FILE, "翻译耳机支持四十种语言的实时互译")], answer="支持三十种语言。")
    overall = summarize([record(Q_LIGHT, r2, corpus), record(Q_EAR, r4, corpus)], {})["overall"]
    assert overall["key_fact_accuracy"] == 0.5
    assert overall["key_fact_recall"] == pytest.approx(2 / 3)


# --- refusals --------------------------------------------------------------------------------------


def test_negative_rejection_and_false_refusal(corpus: CorpusTexts) -> None:
    recs = [
        record(
            Q_NEG, result(Q_NEG, [elsewhere(EN_FILE)], answer="文档中没有相关信息。", refused=True), corpus
        ),
        record(Q_NEG, result(Q_NEG, [elsewhere(EN_FILE)], answer="The mayor is Bob.", refused=False), corpus),
        record(Q_REV, result(Q_REV, [elsewhere(ZH_FILE)], answer="无法回答。", refused=True), corpus),
        record(Q_EAR, result(Q_EAR, [elsewhere(ZH_FILE)], answer="四十种", refused=False), corpus),
    ]
    overall = summarize(recs, {})["overall"]
    assert overall["negative_rejection"] == 0.5
    assert overall["false_refusal"] == 0.5
    assert [r["correct"] for r in recs] == [True, False, False, True]
    assert "answered a negative question" in recs[1]["reasons"]
    assert "refused an answerable question" in recs[2]["reasons"]


def test_no_negatives_gives_none_not_zero(corpus: CorpusTexts) -> None:
    r = result(Q_REV, [around(ZH_FILE, "营业收入为1,000万元")], answer="1000万元")
    summary = summarize([record(Q_REV, r, corpus)], {})
    assert summary["overall"]["negative_rejection"] is None
    assert summary["by_type"]["numeric"]["negative_rejection"] is None
    assert json.loads(json.dumps(summary))["overall"]["negative_rejection"] is None


def test_retrieval_only_none_metrics(corpus: CorpusTexts) -> None:
    timings = {
        "retrieve_ms": 12.0,
        "ttft_ms": None,
        "total_ms": 15.0,
        "prompt_tokens": None,
        "completion_tokens": None,
    }
    recs = [
        record(
            Q_REV,
            result(
                Q_REV, [around(ZH_FILE, "营业收入为1,000万元")], answer=None, refused=None, timings=timings
            ),
            corpus,
            retrieval_only=True,
        ),
        record(
            Q_NEG,
            result(Q_NEG, [elsewhere(EN_FILE)], answer=None, refused=None, timings=timings),
            corpus,
            retrieval_only=True,
        ),
    ]
    overall = summarize(recs, {})["overall"]
    for key in (
        "key_fact_accuracy",
        "key_fact_recall",
        "negative_rejection",
        "false_refusal",
        "citation_validity",
        "citation_support",
        "prompt_tokens",
    ):
        assert overall[key] is None, key
    assert overall["hit@k"] == 1.0 and overall["evidence_recall@k"] == 1.0
    assert overall["latency"]["ttft_ms"] == {"p50": None, "p95": None}
    assert overall["latency"]["gen_tok_s"] is None
    assert overall["latency"]["retrieve_ms"]["p50"] == 12.0
    assert all(r["correct"] for r in recs)  # retrieval-only correctness is "hit"


# --- citations -------------------------------------------------------------------------------------


def test_citation_markers_forms() -> None:
    assert citation_markers("a [1] b [2, 3] c [4][5] d 【6】 e ［７］ f [8，9]") == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
    ]


def test_citation_to_chunk_not_retrieved_is_invalid(corpus: CorpusTexts) -> None:
    retrieved = [around(ZH_FILE, "营业收入为1,000万元"), elsewhere(ZH_FILE), elsewhere(EN_FILE)]
    r = result(Q_REV, retrieved, answer="收入1000万元[1][7]。", cite=[1])
    rec = record(Q_REV, r, corpus)
    assert rec["scores"]["citation_valid"] is False
    assert rec["scores"]["invalid_citations"] == [7]
    assert "invalid citation [7]" in rec["reasons"]
    assert rec["correct"] is True  # the key facts are right; the bad citation is a warning
    assert summarize([rec], {})["overall"]["citation_validity"] == 0.0


def test_citation_list_out_of_range_or_mismatch_is_invalid(corpus: CorpusTexts) -> None:
    retrieved = [around(ZH_FILE, "营业收入为1,000万元"), elsewhere(ZH_FILE)]
    r = result(Q_REV, retrieved, answer="收入1000万元【1】", cite=[1])
    assert record(Q_REV, r, corpus)["scores"]["citation_valid"] is True

    mismatch = json.loads(json.dumps(r))
    mismatch["citations"][0]["end"] += 3  # cites [1] but not the span that was retrieved as #1
    assert record(Q_REV, mismatch, corpus)["scores"]["invalid_citations"] == [1]

    out_of_range = json.loads(json.dumps(r))
    out_of_range["citations"].append(
        {"n": 5, "source": "corpus/" + ZH_FILE, "start": 0, "end": 4, "text": "第一章 "}
    )
    assert record(Q_REV, out_of_range, corpus)["scores"]["invalid_citations"] == [5]

    absolute = json.loads(json.dumps(r))  # an absolute path naming the same file is the same source
    absolute["citations"][0]["source"] = "/data/corpus/" + ZH_FILE
    assert record(Q_REV, absolute, corpus)["scores"]["citation_valid"] is True


def test_citation_validity_counts_answers_without_citations_as_valid(corpus: CorpusTexts) -> None:
    ok = record(Q_EAR, result(Q_EAR, [elsewhere(ZH_FILE)], answer="四十种"), corpus)
    bad = record(Q_EAR, result(Q_EAR, [elsewhere(ZH_FILE)], answer="四十种 [2]"), corpus)
    neg = record(Q_NEG, result(Q_NEG, [elsewhere(EN_FILE)], answer="没有。", refused=True), corpus)
    assert summarize([ok, bad, neg], {})["overall"]["citation_validity"] == pytest.approx(2 / 3)


def test_citation_support(corpus: CorpusTexts) -> None:
    retrieved = [elsewhere(ZH_FILE), around(ZH_FILE, "翻译耳机支持四十种语言的实时互译")]
    supported = record(Q_EAR, result(Q_EAR, retrieved, answer="四十种[2]", cite=[2]), corpus)
    unsupported = record(Q_EAR, result(Q_EAR, retrieved, answer="四十种[1]", cite=[1]), corpus)
    refused = record(Q_EAR, result(Q_EAR, retrieved, answer="无法回答", refused=True), corpus)
    assert supported["scores"]["citation_support"] is True
    assert unsupported["scores"]["citation_support"] is False
    assert refused["scores"]["citation_support"] is None  # refused answers are not in the denominator
    assert summarize([supported, unsupported, refused], {})["overall"]["citation_support"] == 0.5


# --- latency, groups -------------------------------------------------------------------------------


def test_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_latency_and_tokens_in_summary(corpus: CorpusTexts) -> None:
    recs = []
    for i, total in enumerate([1000.0, 2000.0, 3000.0, 4000.0]):
        timings = {
            "retrieve_ms": 10.0 * (i + 1),
            "ttft_ms": 500.0,
            "total_ms": total,
            "prompt_tokens": 100 * (i + 1),
            "completion_tokens": 50,
        }
        recs.append(
            record(Q_EAR, result(Q_EAR, [elsewhere(ZH_FILE)], answer="四十种", timings=timings), corpus)
        )
    lat = summarize(recs, {})["overall"]["latency"]
    assert lat["total_ms"]["p50"] == pytest.approx(2500.0)
    assert lat["total_ms"]["p95"] == pytest.approx(3850.0)
    assert lat["retrieve_ms"]["p50"] == pytest.approx(25.0)
    assert lat["ttft_ms"] == {"p50": 500.0, "p95": 500.0}
    # The 49 tokens after the first over 0.5 s, 1.5 s, 2.5 s, 3.5 s of generation.
    assert lat["gen_tok_s"] == pytest.approx((98 + 49 / 1.5 + 19.6 + 49 / 3.5) / 4)
    refusal = {**timings, "completion_tokens": 1, "total_ms": 500.5}  # one token: no rate at all
    recs.append(record(Q_EAR, result(Q_EAR, [elsewhere(ZH_FILE)], answer="四十种", timings=refusal), corpus))
    assert summarize(recs, {})["overall"]["latency"]["gen_tok_s"] == pytest.approx(lat["gen_tok_s"])
    recs.pop()
    assert summarize(recs, {})["overall"]["prompt_tokens"] == pytest.approx(250.0)


def test_summary_splits_by_lang_and_type(corpus: CorpusTexts) -> None:
    recs = [
        record(Q_REV, result(Q_REV, [around(ZH_FILE, "营业收入为1,000万元")], answer="1000万元"), corpus),
        record(Q_EAR, result(Q_EAR, [elsewhere(ZH_FILE)], answer="不知道"), corpus),
        record(Q_LIGHT, result(Q_LIGHT, [elsewhere(EN_FILE)], answer="1887, 42 meters"), corpus),
        record(Q_NEG, result(Q_NEG, [elsewhere(EN_FILE)], answer="没有", refused=True), corpus),
    ]
    summary = summarize(recs, {"top_k": 5})
    assert summary["n"] == 4 and summary["config"] == {"top_k": 5}
    assert list(summary["by_lang"]) == ["zh", "en"]
    assert list(summary["by_type"]) == ["factoid", "numeric", "multi", "negative"]
    assert summary["by_lang"]["zh"]["key_fact_accuracy"] == 0.5
    assert summary["by_lang"]["en"]["key_fact_accuracy"] == 1.0
    assert summary["by_lang"]["en"]["negative_rejection"] == 1.0
    assert summary["by_lang"]["zh"]["negative_rejection"] is None
    assert summary["by_type"]["numeric"]["hit@k"] == 1.0
    assert summary["by_type"]["factoid"]["hit@k"] == 0.0
    assert summary["by_type"]["negative"]["hit@k"] is None
    expected = {
        "evidence_recall@k",
        "evidence_in_prompt",
        "hit@k",
        "mrr",
        "key_fact_accuracy",
        "key_fact_recall",
        "negative_rejection",
        "false_refusal",
        "citation_validity",
        "citation_support",
        "faithfulness",
        "grounding_agreement",
        "latency",
        "prompt_tokens",
        "counts",
        "ci95",
        "funnel",
    }
    assert set(summary["overall"]) - {"n"} == expected


def test_judge_reasons_for_unretrieved_evidence(corpus: CorpusTexts) -> None:
    s = score_question(Q_EAR, result(Q_EAR, [elsewhere(ZH_FILE)], answer="不知道"), corpus)
    correct, reasons = judge(s)
    assert not correct
    assert reasons[0] == "missing key facts: 四十种"
    assert any(r.startswith("evidence not retrieved") for r in reasons)


# --- load_suite ------------------------------------------------------------------------------------


def write_suite(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
        encoding="utf-8",
    )
    return path


def test_load_suite_ok_and_limit(tmp_path: Path) -> None:
    path = write_suite(tmp_path / "suite.jsonl", [Q_REV, "", Q_LIGHT, Q_NEG])
    assert [q["id"] for q in load_suite(path)] == ["q1", "q2", "q3"]
    assert [q["id"] for q in load_suite(path, limit=2)] == ["q1", "q2"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": "q9", "question": "broken', "invalid JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        (json.dumps({**Q_EAR, "id": "q9", "type": "opinion"}), "'type'"),
        (
            json.dumps({k: v for k, v in Q_EAR.items() if k != "evidence"} | {"id": "q9"}),
            "missing field 'evidence'",
        ),
        (json.dumps({**Q_EAR, "id": "q9", "must_include": "四十种"}), "'must_include' must be a list"),
        (json.dumps({**Q_EAR, "id": "q1"}), "duplicate id 'q1'"),
    ],
)
def test_load_suite_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write_suite(tmp_path / "suite.jsonl", [Q_REV, bad_line, Q_NEG])
    with pytest.raises(RagqaError) as info:
        load_suite(path)
    assert f"{path}:2:" in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_suite_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(RagqaError, match="cannot read"):
        load_suite(tmp_path / "nope.jsonl")
    with pytest.raises(RagqaError, match="no questions"):
        load_suite(write_suite(tmp_path / "empty.jsonl", [""]))


# --- run_suite and compare -------------------------------------------------------------------------

SUITE = [Q_REV, Q_LIGHT, Q_NEG, Q_EAR]


def good_ask(q: dict[str, Any]) -> dict[str, Any]:
    """A pipeline that always gets it right: evidence at rank 1, key facts in the answer, refusals."""
    if q["type"] == "negative":
        return result(q, [elsewhere(EN_FILE)], answer="The documents do not say.", refused=True)
    retrieved = [around(q["source"][0], quote) for quote in q["evidence"]]
    return result(q, retrieved, answer=" ".join(q["must_include"]) + " [1]", cite=[1])


def console() -> Console:
    return Console(file=io.StringIO(), width=240, color_system=None)


def output(con: Console) -> str:
    assert isinstance(con.file, io.StringIO)
    return con.file.getvalue()


def test_run_suite_writes_three_files(tmp_path: Path, corpus_dir: Path) -> None:
    def ask(q: dict[str, Any]) -> dict[str, Any]:
        if q["id"] == "q4":
            raise RagqaError("model server went away")
        return good_ask(q)

    con = console()
    out = tmp_path / "run"
    summary = run_suite(SUITE, ask, out, corpus_dir, {"model": "fake"}, console=con)
    lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["id"] for r in recs] == ["q1", "q2", "q3", "q4"]
    assert [r["correct"] for r in recs] == [True, True, True, False]
    assert recs[3]["answer"] is None and recs[3]["reasons"][0] == "error: model server went away"
    for key in ("question", "retrieved", "citations", "timings", "lang", "type", "scores", "reasons"):
        assert key in recs[0]
    on_disk = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert on_disk["overall"] == json.loads(json.dumps(summary["overall"]))
    assert on_disk["n"] == 4 and on_disk["interrupted"] is False
    assert on_disk["overall"]["key_fact_accuracy"] == pytest.approx(2 / 3)  # the error counts as a miss
    html = (out / "report.html").read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in html and "<svg" in html and "翻译耳机支持多少种语言" in html
    text = output(con)
    assert "key_fact_accuracy" in text and "overall" in text and "zh" in text and "factoid" in text
    assert "—" in text  # None metrics are shown as a dash, not 0


def test_run_suite_keyboard_interrupt_still_writes(tmp_path: Path, corpus_dir: Path) -> None:
    def ask(q: dict[str, Any]) -> dict[str, Any]:
        if q["id"] == "q3":
            raise KeyboardInterrupt
        return good_ask(q)

    out = tmp_path / "run"
    summary = run_suite(SUITE, ask, out, corpus_dir, {}, console=console())
    assert summary["interrupted"] is True and summary["n"] == 2
    assert len((out / "results.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    on_disk = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert on_disk["n"] == 2 and on_disk["n_planned"] == 4
    assert (out / "report.html").is_file()


def test_compare_lists_flipped_questions(tmp_path: Path, corpus_dir: Path) -> None:
    def worse(q: dict[str, Any]) -> dict[str, Any]:
        res = good_ask(q)
        if q["id"] == "q2":
            res["answer"] = "It was built in 1887."  # drops "42 meters"
        return res

    def better_on_q2_worse_on_q4(q: dict[str, Any]) -> dict[str, Any]:
        res = good_ask(q)
        if q["id"] == "q4":
            res["refused"] = True
        return res

    a, b = tmp_path / "a", tmp_path / "b"
    run_suite(SUITE, worse, a, corpus_dir, {"name": "A"}, console=console())
    run_suite(SUITE, better_on_q2_worse_on_q4, b, corpus_dir, {"name": "B"}, console=console())
    con = console()
    flips = compare(a, b, con)
    assert flips["a_only_right"] == ["q4"] and flips["b_only_right"] == ["q2"]
    text = output(con)
    assert "right in A, wrong in B: 1" in text and "right in B, wrong in A: 1" in text
    assert "q4" in text and Q_EAR["question"] in text
    assert "q2" in text and Q_LIGHT["question"] in text
    assert "key_fact_accuracy" in text and "+33.3 pt" in text


def test_compare_rejects_dir_without_results(tmp_path: Path, corpus_dir: Path) -> None:
    run_suite(SUITE[:1], good_ask, tmp_path / "a", corpus_dir, {}, console=console())
    (tmp_path / "empty").mkdir()
    with pytest.raises(RagqaError, match=r"summary\.json is missing"):
        compare(tmp_path / "a", tmp_path / "empty", console())


# --- report ----------------------------------------------------------------------------------------


def test_report_escapes_data(tmp_path: Path, corpus: CorpusTexts) -> None:
    q = {**Q_EAR, "question": "<script>alert(1)</script> 翻译耳机？"}
    rec = record(q, result(q, [elsewhere(ZH_FILE)], answer="<b>bold</b> & more"), corpus)
    html = write_report(tmp_path, summarize([rec], {"note": "<i>x</i>"}), [rec]).read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "<i>x</i>" not in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the first rows of pixels of an 8-bit RGB(A) PNG, decoded with the stdlib."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6), f"unexpected PNG format depth={depth} color={color}"
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(min(height, 500)):  # enough rows to judge variety, cheap enough in pure Python
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i : i + 3]) for r in rows for i in range(0, stride, bpp)]


def test_report_renders_in_headless_chromium(tmp_path: Path, corpus_dir: Path) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(chromium).is_file(), (
        "Chromium is required for the report rendering test: apt-get install -y chromium fonts-noto-cjk"
    )

    def mixed(q: dict[str, Any]) -> dict[str, Any]:
        res = good_ask(q)
        if q["id"] == "q4":
            res["answer"] = "支持三十种语言 [1][9]"
        if q["id"] == "q2":
            res["retrieved"].insert(0, elsewhere(EN_FILE, 0, 60))
        return res

    out = tmp_path / "run"
    run_suite(SUITE, mixed, out, corpus_dir, {"model": "fake-model", "top_k": 5}, console=console())
    report = out / "report.html"
    png = tmp_path / "shot.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = subprocess.run(
        [chromium, *flags, f"--screenshot={png}", "--window-size=1200,2000", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert png.is_file(), f"no screenshot; chromium said: {shot.stderr[-2000:]}"
    width, height, pixels = _png_pixels(png.read_bytes())
    assert (width, height) == (1200, 2000)
    assert png.stat().st_size > 20_000
    counts: dict[bytes, int] = {}
    for px in pixels:
        counts[px] = counts.get(px, 0) + 1
    assert len(counts) > 50, "screenshot is (nearly) a single colour"
    assert max(counts.values()) < 0.97 * len(pixels), "screenshot is (nearly) a single colour"

    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    ).stdout
    assert '<table class="metrics">' in dom and "key-fact accuracy" in dom
    assert "<svg" in dom and "<rect" in dom and "<circle" in dom
    assert "翻译耳机支持多少种语言" in dom and "invalid citation [9]" in dom
    # The funnel: its chart with a bar per step, and the table of where each question ended.
    assert "Where the questions were lost" in dom and "evidence in the prompt" in dom
    assert "answered without all key facts" in dom and "95% interval" in dom


def test_offsets_follow_ingest_decoding_of_crlf_and_bom(tmp_path: Path) -> None:
    raw = "\ufeffline one\r\nline two holds the answer: 1,234 units\r\n"
    (tmp_path / "crlf.txt").write_bytes(raw.encode("utf-8"))
    text = raw[1:]  # ingestion strips the BOM and keeps "\r\n"
    q = question("x", "?", "en", "numeric", ["crlf.txt"], ["the answer: 1,234 units"], ["1234"])
    (span,) = locate_evidence(q, CorpusTexts(tmp_path))
    assert span is not None
    assert text[span.start : span.end] == "the answer: 1,234 units"
    assert span.start == text.index("the answer")


# --- fair matching ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "must", "ok"),
    [
        ("这是第四次浪潮", "第4次", True),
        ("第4次浪潮", "第四次", True),
        ("共有四种方法", "4", True),
        ("两个专家被激活", "2个", True),
        ("准确率达到百分之九十", "90%", True),
        ("准确率达到 90 percent", "90%", True),
        ("准确率达到９０％", "90%", True),
        ("需要 8 GB 显存", "8GB", True),
        ("需要8千兆字节显存", "8 GB", True),
        ("参数达到一百零五亿", "105亿", True),
        ("二〇二四年发布", "2024", True),
        ("It took eight months", "8 months", True),
        ("twenty-two layers", "22", True),
        ("百分之七十的公司", "70%", True),
        ("增长了十二倍", "12倍", True),
        # no false friends: a lone 一 is a word, 一 is not 10, a different number stays different
        ("他们统一了标准", "1", False),
        ("one of the models", "1", False),
        ("准确率达到百分之八十", "90%", False),
        ("第三次浪潮", "第4次", False),
    ],
)
def test_key_fact_matching_rules(answer: str, must: str, ok: bool) -> None:
    assert (normalize_text(must) in normalize_text(answer)) is ok, (normalize_text(answer), normalize_text(must))


def test_chinese_numeral_values() -> None:
    from ragqa.textnorm import chinese_numeral_value

    cases = {"四": 4, "十": 10, "十二": 12, "二十": 20, "三十五": 35, "一百零五": 105, "两千": 2000,
             "一千二百": 1200, "二〇二四": 2024, "九十": 90}
    assert {k: chinese_numeral_value(k) for k in cases} == cases
    assert chinese_numeral_value("二二十") is None and chinese_numeral_value("十百") is None


def test_fair_matching_counts_in_key_fact_accuracy(corpus: CorpusTexts) -> None:
    # Q_EAR's key fact is written 四十种; an answer in Arabic digits is the same fact.
    retrieved = [around(ZH_FILE, "翻译耳机支持四十种语言的实时互译")]
    rec = record(Q_EAR, result(Q_EAR, retrieved, answer="支持40种语言[1]", cite=[1]), corpus)
    assert rec["scores"]["key_facts_ok"] is True and rec["correct"] is True


# --- evidence in the prompt and the funnel -----------------------------------------------------------


def with_context(res: dict[str, Any], shown: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """The result as the pipeline writes it now: `retrieved` is what was found, `context` what the model
    saw (a chunk's place with the text given, which focus may have cut)."""
    res["context"] = [
        {"n": n, "source": c["source"], "start": c["start"], "end": c["end"], "text": text,
         "focused": text != c["text"]}
        for n, (c, text) in enumerate(shown, start=1)
    ]
    return res


def test_evidence_in_prompt_needs_the_quote_in_the_text_the_model_saw(corpus: CorpusTexts) -> None:
    whole = chunk(ZH_FILE, 0, len(ZH_TEXT))
    kept = with_context(result(Q_REV, [whole], answer="1000万元[1]", cite=[1]), [(whole, whole["text"])])
    cut = with_context(result(Q_REV, [whole], answer="无法回答", refused=True), [(whole, "第一章 公司概况")])
    dropped = with_context(result(Q_REV, [whole], answer="无法回答", refused=True), [])
    s_kept = record(Q_REV, kept, corpus)["scores"]
    s_cut = record(Q_REV, cut, corpus)["scores"]
    s_dropped = record(Q_REV, dropped, corpus)["scores"]
    assert (s_kept["hit"], s_kept["in_prompt"], s_kept["stage"]) == (True, True, "right")
    assert (s_cut["hit"], s_cut["in_prompt"], s_cut["stage"]) == (True, False, "cut")
    assert (s_dropped["hit"], s_dropped["in_prompt"], s_dropped["stage"]) == (True, False, "cut")
    summary = summarize([record(Q_REV, kept, corpus), record(Q_REV, cut, corpus)], {})
    overall = summary["overall"]
    assert overall["evidence_recall@k"] == 1.0 and overall["evidence_in_prompt"] == 0.5
    assert overall["counts"]["evidence_in_prompt"] == [1, 2]


def test_evidence_in_prompt_from_results_written_before_context_existed(corpus: CorpusTexts) -> None:
    # Older results: `retrieved` was what the model saw, a focused passage carrying its text in "context".
    c = around(ZH_FILE, "营业收入为1,000万元", before=20, after=20)
    old = result(Q_REV, [{**c, "context": "董事长表示，明年将继续扩大研发投入。"}], answer="不知道", refused=True)
    assert record(Q_REV, old, corpus)["scores"]["in_prompt"] is False
    assert record(Q_REV, result(Q_REV, [c], answer="1000万元[1]", cite=[1]), corpus)["scores"]["in_prompt"] is True


@pytest.mark.parametrize(
    ("retrieved", "shown", "answer", "refused", "stage"),
    [
        (False, False, "不知道", True, "not_retrieved"),
        (True, False, "不知道", True, "cut"),
        (True, True, "不知道", True, "refused"),
        (True, True, "收入很高[1]", False, "incomplete"),
        (True, True, "1000万元[1]", False, "right"),
        (False, False, "1000万元[1]", False, "right"),  # right is right, wherever retrieval stood
    ],
)
def test_funnel_stage_of_an_answerable_question(
    corpus: CorpusTexts, retrieved: bool, shown: bool, answer: str, refused: bool, stage: str
) -> None:
    evidence = around(ZH_FILE, "营业收入为1,000万元")
    other = elsewhere(EN_FILE)
    found = [evidence] if retrieved else [other]
    seen = [(evidence, evidence["text"])] if shown else [(other, other["text"])]
    res = with_context(result(Q_REV, found, answer=answer, refused=refused, cite=None if refused else [1]), seen)
    assert record(Q_REV, res, corpus)["scores"]["stage"] == stage


def test_funnel_counts_and_negatives(corpus: CorpusTexts) -> None:
    refused = record(Q_NEG, result(Q_NEG, [elsewhere(EN_FILE)], answer="no", refused=True), corpus)
    answered = record(Q_NEG, result(Q_NEG, [elsewhere(EN_FILE)], answer="Bob [1]", cite=[1]), corpus)
    missed = record(Q_REV, result(Q_REV, [elsewhere(EN_FILE)], answer="不知道", refused=True), corpus)
    right = record(Q_REV, result(Q_REV, [around(ZH_FILE, "营业收入为1,000万元")], answer="1000万元[1]", cite=[1]),
                   corpus)
    assert (refused["scores"]["stage"], answered["scores"]["stage"]) == ("refused", "answered")
    funnel = summarize([refused, answered, missed, right], {})["overall"]["funnel"]
    assert funnel == {
        "answerable": {"not_retrieved": 1, "cut": 0, "refused": 0, "incomplete": 0, "right": 1},
        "negative": {"refused": 1, "answered": 1},
    }


def test_wilson_interval_and_counts_in_summary(corpus: CorpusTexts) -> None:
    from ragqa.evals.metrics import wilson_interval

    lo, hi = wilson_interval(31, 50)
    assert lo == pytest.approx(0.4821, abs=1e-3) and hi == pytest.approx(0.7406, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) is None
    recs = [record(q, good_ask(q), corpus) for q in SUITE]
    overall = summarize(recs, {})["overall"]
    assert overall["counts"]["key_fact_accuracy"] == [3, 3]
    assert overall["ci95"]["key_fact_accuracy"][1] == 1.0 and overall["ci95"]["key_fact_accuracy"][0] < 0.5


def test_summary_table_prints_rates_with_counts_funnel_and_intervals(tmp_path: Path, corpus_dir: Path) -> None:
    con = console()
    run_suite(SUITE, good_ask, tmp_path / "run", corpus_dir, {}, console=con)
    text = output(con)
    assert "1.000 3/3" in text  # key facts: rate and count together
    assert "where each question ended" in text and "not retrieved" in text and "unanswerable: refused" in text
    assert "95% interval" in text


# --- splits ---------------------------------------------------------------------------------------------


def test_load_suite_split_and_several_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({**Q_REV, "split": "tune"}, ensure_ascii=False) + "\n"
                 + json.dumps({**Q_LIGHT, "split": "test"}, ensure_ascii=False) + "\n", encoding="utf-8")
    b.write_text(json.dumps({**Q_NEG, "split": "test"}) + "\n", encoding="utf-8")
    assert [q["id"] for q in load_suite([a, b], split="test")] == ["q2", "q3"]
    assert [q["id"] for q in load_suite([a, b], split="tune")] == ["q1"]
    assert [q["id"] for q in load_suite([a, b], split="all")] == ["q1", "q2", "q3"]
    with pytest.raises(RagqaError, match="duplicate id 'q1'"):
        load_suite([a, a])
    with pytest.raises(RagqaError, match="--split is 'dev'"):
        load_suite([a], split="dev")
    unsplit = tmp_path / "c.jsonl"
    unsplit.write_text(json.dumps(Q_EAR, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(RagqaError, match="record no split"):
        load_suite([unsplit], split="test")
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps({**Q_EAR, "split": "train"}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(RagqaError, match="field 'split' is 'train'"):
        load_suite([bad])


# --- compare: noise and stage moves ------------------------------------------------------------------


def test_paired_differences_say_when_a_change_is_beyond_the_noise() -> None:
    from ragqa.evals.runner import paired_differences

    def recs(flags: list[bool]) -> list[dict[str, Any]]:
        return [{"id": f"q{i}", "correct": f, "scores": {"answerable": True, "key_facts_ok": f}}
                for i, f in enumerate(flags)]

    base = [False] * 40 + [True] * 10
    one_flip = recs([True] + base[1:])
    many = recs([True] * 30 + [False] * 10 + [True] * 10)
    small = paired_differences(recs(base), one_flip)["key_fact_accuracy"]
    big = paired_differences(recs(base), many)["key_fact_accuracy"]
    assert small["diff"] == pytest.approx(0.02) and small["beyond_noise"] is False and small["flipped"] == 1
    assert big["diff"] == pytest.approx(0.6) and big["beyond_noise"] is True
    assert big["a"] == [10, 50] and big["b"] == [40, 50]


def test_compare_shows_stage_moves_and_noise(tmp_path: Path, corpus_dir: Path) -> None:
    def cut_q1(q: dict[str, Any]) -> dict[str, Any]:
        res = good_ask(q)
        if q["id"] == "q1":
            res = with_context(res, [(res["retrieved"][0], "公司在")])
            res["answer"], res["refused"], res["citations"] = "不知道", True, []
        return res

    a, b = tmp_path / "a", tmp_path / "b"
    run_suite(SUITE, good_ask, a, corpus_dir, {}, console=console())
    run_suite(SUITE, cut_q1, b, corpus_dir, {}, console=console())
    con = console()
    out = compare(a, b, con)
    assert out["moves"] == {"right->cut": ["q1"]}
    assert out["paired"]["key_fact_accuracy"]["beyond_noise"] is False
    text = output(con)
    assert "right → cut: 1  q1" in text and "beyond noise" in text


def test_key_facts_with_a_magnitude_match_across_languages() -> None:
    from ragqa.evals.metrics import missing_key_facts

    assert missing_key_facts("GPT-4o mini 只有 80 亿参数", ["8 billion"]) == []
    assert missing_key_facts("only 8 billion parameters", ["80亿"]) == []
    assert missing_key_facts("1.75 trillion", ["1.75万亿"]) == []
    assert missing_key_facts("1.5 billion parameters", ["1.5"]) == []  # a bare number matches as written
    assert missing_key_facts("800 million", ["80亿"]) == ["80亿"]
    assert missing_key_facts("两三个亿美金", ["两三个亿"]) == []  # 两三 is a range, not 23


def test_refusal_sweep_from_the_first_token_probabilities() -> None:
    from ragqa.evals.metrics import refusal_sweep

    def s(answerable: bool, p: float, refused: bool = False, ok: bool = True) -> dict[str, Any]:
        return {"answerable": answerable, "refusal_p": p, "refused": refused, "key_facts_ok": ok}

    scores = [s(True, 0.1), s(True, 0.45), s(True, 0.7, ok=False), s(False, 0.3), s(False, 0.8),
              s(True, 0.05, refused=True)]  # refused in words: refused at every threshold
    rows = {round(r["threshold"], 2): r for r in refusal_sweep(scores, run_threshold=1.01)}
    assert rows[0.5]["counts"] == {"negative_rejection": [1, 2], "false_refusal": [2, 4],
                                   "key_fact_accuracy": [2, 4]}
    assert rows[0.25]["counts"]["negative_rejection"] == [2, 2] and rows[0.25]["false_refusal"] == 0.75
    # Above a run's own threshold the questions it refused have no answer to score.
    capped = {round(r["threshold"], 2): r for r in refusal_sweep(scores, run_threshold=0.5)}
    assert capped[0.9]["key_fact_accuracy"] is None and capped[0.45]["key_fact_accuracy"] is not None


def test_grounding_agreement_counts_answered_answerable_questions_only() -> None:
    """Right and supported, or wrong and unsupported, agree; refused and unanswerable questions are no case."""
    from ragqa.evals.metrics import aggregate

    def score(right: bool | None, supported: bool | None, answerable: bool = True) -> dict:
        return {"answerable": answerable, "n_quotes": 0, "key_facts_ok": right, "faithful": supported, "rr": None,
                "keys_found": 0, "n_keys": 1}

    scores = [score(True, True), score(False, False), score(True, False), score(False, True), score(False, True),
              score(False, None),  # refused: no grounding mark
              score(None, True, answerable=False)]
    out = aggregate(scores)
    assert out["counts"]["grounding_agreement"] == [2, 5] and out["grounding_agreement"] == pytest.approx(0.4)
    assert out["counts"]["faithfulness"] == [4, 6]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("总参数量约为467亿", "总参数量约为46.7 billion"),
        ("GPT-2（15 亿参数）", "GPT-2（1.5 billion参数）"),
        ("3000 亿然后只有 80 亿", "300 billion然后只有 8 billion"),
        ("400 万条", "4 million条"),
        ("五千亿参数", "500 billion参数"),
        ("1.5万亿", "1.5 trillion"),
        ("两三个亿", "两三个亿"),  # a range, not one number
        ("千万不要", "千万不要"),  # a word
        ("十万分之一", "十万分之一"),  # a fraction
    ],
)
def test_chinese_counts_get_their_english(text: str, shown: str) -> None:
    from ragqa.textnorm import with_english_magnitudes

    assert with_english_magnitudes(text) == shown


# --- calibrate: the answerability score's weights -----------------------------------------------------------
def _signal(answerable: bool, check: float, p: float, ok: bool = True, refused: bool = False) -> dict[str, Any]:
    return {"answerable": answerable, "refusal_check": check, "refusal_p": p, "key_facts_ok": ok,
            "refused": refused}


SIGNALS = [
    _signal(True, 0.05, 0.02), _signal(True, 0.10, 0.20), _signal(True, 0.15, 0.05, ok=False),
    _signal(True, 0.30, 0.40), _signal(True, 0.20, 0.01), _signal(True, 0.08, 0.30, refused=True),
    _signal(False, 0.70, 0.30), _signal(False, 0.55, 0.60), _signal(False, 0.25, 0.10), _signal(False, 0.90, 0.05),
]


def test_calibration_fits_the_check_that_separates_and_finds_the_best_range() -> None:
    from ragqa.evals.calibrate import auc, best_range, curve, fit

    model = fit(SIGNALS)
    assert (model.n, model.unanswerable) == (10, 4)
    assert model.check_weight > 0  # a high P("no") marks the unanswerable questions here
    assert auc(SIGNALS, lambda s: model.score(s["refusal_check"], s["refusal_p"])) > auc(
        SIGNALS, lambda s: s["refusal_p"])
    rows = {round(r["threshold"], 2): r for r in curve(SIGNALS, model, run_threshold=1.01)}
    low = rows[0.01]  # everything refused: all 4 unanswerable, all 6 answerable, no key facts
    assert (low["negative_rejection"], low["false_refusal"], low["key_facts"]) == (4, 6, 0)
    high = rows[0.99]  # nothing refused by the score; the one refused in words stays refused
    assert (high["negative_rejection"], high["false_refusal"], high["key_facts"], high["right"]) == (0, 1, 4, 4)
    start, end, middle = best_range([{"threshold": t / 10, "right": r} for t, r in enumerate([3, 5, 5, 5, 4, 5])])
    assert (start, end, middle) == (0.1, 0.3, 0.2)  # the widest run of the most, not the lone one at 0.5


def test_calibration_needs_both_signals_and_both_kinds_of_question(tmp_path: Path) -> None:
    from ragqa.evals.calibrate import fit

    with pytest.raises(RagqaError, match="answerable and unanswerable"):
        fit([s for s in SIGNALS if s["answerable"]])
    with pytest.raises(RagqaError, match="answerable and unanswerable"):
        fit([{**s, "refusal_check": None} for s in SIGNALS])


def test_eval_calibrate_prints_the_weights_to_set(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"config": {"refusal_threshold": 1.01}}), encoding="utf-8")
    (run / "results.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "scores": s}) + "\n" for i, s in enumerate(SIGNALS)), encoding="utf-8")
    proc = run_cli("eval", "calibrate", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "refusal_check_weight = " in proc.stdout and "refusal_threshold = " in proc.stdout
    assert "10 questions with both signals (4 unanswerable)" in proc.stdout
    assert_one_line_error(run_cli("eval", "calibrate", str(tmp_path / "nothing")), "not an eval run directory")
