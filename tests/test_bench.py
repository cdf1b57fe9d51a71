"""`ragqa bench`: the pure logic (medians, ratios, rates, tables) by hand, and one real quick run of the
cheapest benchmark through the CLI so the command cannot rot. The figures themselves are not asserted:
they depend on the machine."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from ragqa.config import Settings
from ragqa.errors import RagqaError
from ragqa.evals import bench

from .conftest import assert_one_line_error, run_cli


def test_median_ratio_and_generation_rate() -> None:
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert bench.median([]) is None
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(None, 2.0) is None and bench.ratio(1.0, 0) is None
    # 11 tokens, the first at t=1 s and the last at t=3 s: 10 tokens in 2 s after the first.
    assert bench.gen_rate(11, 1.0, 3.0) == 5.0
    assert bench.gen_rate(1, 1.0, 3.0) is None
    s = bench.summarize_ms([10.0, 20.0, 30.0, 40.0, 100.0])
    assert s == {"p50": 30.0, "p95": 88.0, "n": 5}


def test_sides_alternate_run_by_run() -> None:
    orders = [bench.alternate(r) for r in range(4)]
    assert orders == [("ragqa", "bare"), ("bare", "ragqa")] * 2


def test_sizes_names_and_quick_defaults() -> None:
    assert bench.parse_sizes("10000,100_000, 1000000") == (10000, 100000, 1000000)
    for bad in ("", "10k", "0,5"):
        with pytest.raises(RagqaError, match="--sizes"):
            bench.parse_sizes(bad)
    assert bench.check_names([]) == [n for n in bench.BENCHMARKS if n != "serve"]  # serve needs a model server
    assert bench.check_names(["serve"]) == ["serve"]
    assert bench.parse_clients("1, 4,16") == (1, 4, 16)
    for bad in ("", "four", "0,4"):
        with pytest.raises(RagqaError, match="--clients"):
            bench.parse_clients(bad)
    with pytest.raises(RagqaError, match="unknown benchmark nope"):
        bench.check_names(["ttft", "nope"])
    quick = bench.quick_defaults(None, None, None, quick=True)
    assert quick == {"runs": 1, "questions": 3, "sizes": bench.QUICK_SIZES}
    full = bench.quick_defaults(None, None, None, quick=False)
    assert full == {"runs": 3, "questions": None, "sizes": bench.FULL_SIZES}
    assert bench.quick_defaults(5, 7, "300", quick=True) == {"runs": 5, "questions": 7, "sizes": (300,)}


class _FakeLLM:
    name = "fake"
    n_ctx = 4096

    def __init__(self) -> None:
        self.usage = {"prompt_tokens": 3, "completion_tokens": 0}
        self.closed = False

    def count_tokens(self, text: str) -> int:
        return len(text)

    def stream(self, messages, max_tokens):
        try:
            yield from ["a", "b", "c"]
        finally:
            self.closed = True


def test_timed_llm_records_pieces_and_stops_early() -> None:
    inner = _FakeLLM()
    timed = bench.TimedLLM(inner, stop_after=1)
    assert list(timed.stream([{"role": "user", "content": "q"}], 10)) == ["a"]
    assert inner.closed and timed.pieces == ["a"] and len(timed.times) == 1 and timed.times[0] >= timed.t_call
    full = bench.TimedLLM(_FakeLLM())
    assert "".join(full.stream([], 10)) == "abc" and len(full.times) == 3
    assert full.messages == [] and full.usage["prompt_tokens"] == 3


def _render(name: str, res: dict) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    for table in bench.tables(name, res):
        console.print(table)
    return buf.getvalue()


def test_tables_show_each_figure_beside_its_baseline() -> None:
    gen = {"prompt_tokens": 1234, "n_passages": 5,
           "ragqa": {"ttft_ms": 2100.5, "gen_tok_s": 9.87, "completion_tokens": 40},
           "bare": {"ttft_ms": 2000.25, "gen_tok_s": 10.12, "completion_tokens": 40},
           "ratio": {"ttft": 1.0501, "gen_tok_s": 0.9753}}
    text = _render("generation", gen)
    assert "1234 prompt tokens" in text and "2,100.5" in text and "2,000.2" in text and "0.975" in text
    ret = {"query_embed_ms": {"p50": 55.0}, "queries": 3, "runs": 1,
           "sizes": [{"label": "corpus", "size": 250, "search_ms": {"p50": 4.0, "p95": 6.5},
                      "dense_ms": {"p95": 3.0}, "bm25_ms": {"p95": 1.5}},
                     {"label": "100000", "size": 100000, "search_ms": {"p50": 40.0, "p95": 61.5},
                      "dense_ms": {"p95": 30.0}, "bm25_ms": {"p95": 12.5}, "rank_bm25": {"bm25_ms": {"p95": 640.0}},
                      "insert_rate_per_s": 900.0, "rss_growth_mb": 812.0, "disk_mb": 700.0}],
           "skipped": [{"size": 1000000, "estimated_build_minutes": 18.5}]}
    text = _render("retrieval", ret)
    assert "100000" in text and "61.5" in text and "640.0" in text and "est. 18.5 min" in text


def test_serve_counts_only_whole_cited_answers_as_well_formed() -> None:
    from ragqa.evals.bench.serve import well_formed

    def body(**d) -> bytes:
        return json.dumps(d, ensure_ascii=False).encode()

    cited = [{"n": 1, "text": "…"}, {"n": 2, "text": "…"}]
    assert well_formed(200, body(answer="杰文斯悖论指效率提高反而增加消耗 [1][2]。", citations=cited)) is None
    assert well_formed(200, body(answer="文档中没有相关信息。", citations=[], refused=True)) is None
    assert well_formed(200, body(answer="It rose [3].", citations=cited)) == "cites [3] that is not in its citations"
    assert well_formed(200, body(answer="  ", citations=cited)) == "no answer text"
    assert well_formed(200, body(answer="x [1]")) == "no citations list"
    assert well_formed(200, b"<html>") == "not JSON"
    assert well_formed(503, body(error="busy")) == "HTTP 503"
    res = {"llm_url": "http://127.0.0.1:8080/v1", "model_server_slots": 4, "rows": [
        {"mode": "one lane", "clients": 4, "requests": 8, "answers_per_min": 6.5, "throughput_vs_one_lane": 1.0,
         "latency_ms": {"p50": 30000.0, "p95": 41000.0}, "errors": 0},
        {"mode": "4 lanes", "clients": 4, "requests": 8, "answers_per_min": 14.25, "throughput_vs_one_lane": 2.19,
         "latency_ms": {"p50": 15500.0, "p95": 19000.0}, "errors": 0}]}
    text = _render("serve", res)
    assert "slots: 4" in text and "4 lanes" in text and "14.2" in text and "2.190" in text


def test_machine_description() -> None:
    m = bench.machine(Settings())
    assert m["cores"] and m["threads"] == 2 and m["cpu"]
    assert {"llama-cpp-python", "torch", "chromadb"} <= set(m["versions"])
    assert set(m["kernel"]) == {"repack", "n_ubatch", "flash_attn", "kv_type", "n_threads"}  # what llama.cpp ran with


def test_cli_bench_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("bench", "nope"), "unknown benchmark nope")
    assert_one_line_error(run_cli("bench", "retrieval", "--sizes", "abc"), "--sizes")
    assert_one_line_error(run_cli("bench", "ttft", "--suite", str(tmp_path / "none.jsonl")), "not found")
    assert_one_line_error(run_cli("bench", "serve", "--clients", "1,x"), "--clients")
    no_server = run_cli("bench", "serve", "--out", str(tmp_path / "b"), env={"RAGQA_LLM_URL": ""})
    assert_one_line_error(no_server, "pass --llm-url")


@pytest.mark.slow
def test_bench_retrieval_quick_runs_end_to_end(corpus_settings: Settings, tmp_path: Path) -> None:
    """The real command on the real corpus index: tiny synthetic size, one run, JSON and table written."""
    out = tmp_path / "bench"
    proc = run_cli("bench", "retrieval", "--quick", "--sizes", "400", "--questions", "3",
                   "--index", str(corpus_settings.index_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    combined = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    res = json.loads((out / "retrieval.json").read_text(encoding="utf-8"))
    assert combined["results"]["retrieval"]["sizes"] == res["sizes"]
    assert combined["machine"]["cores"] >= 1 and combined["options"]["quick"] is True
    corpus_row, synthetic = res["sizes"]
    assert corpus_row["label"] == "corpus" and corpus_row["size"] > 100
    assert synthetic["size"] == 400 and synthetic["search_ms"]["n"] == 3
    assert synthetic["search_ms"]["p95"] >= synthetic["search_ms"]["p50"] > 0
    # The BM25 baseline ran on the same tokens and agrees with ragqa's scorer exactly.
    assert synthetic["rank_bm25"]["max_abs_score_diff_vs_ragqa"] == 0.0
    assert synthetic["insert_rate_per_s"] > 0 and synthetic["disk_mb"] > 0
    assert res["met"] is None  # no 100k size in this run: the target is not judged
    assert "retrieval, query embedding excluded" in proc.stdout and "rank_bm25 p95" in proc.stdout


@pytest.mark.slow
def test_bench_serve_against_a_real_model_server(corpus_settings: Settings, llama_server: str,
                                                 tmp_path: Path) -> None:
    """The real serve benchmark: the real app with one lane and with two, clients at once over HTTP, answers
    from a real llama_cpp.server (0.5B). That server decodes one request at a time, so no gain is asserted;
    what must hold is that every answer came back whole, in both modes and at every client count."""
    out = tmp_path / "bench"
    proc = run_cli("bench", "serve", "--clients", "2", "--questions", "2", "--llm-url", llama_server,
                   "--index", str(corpus_settings.index_dir), "--out", str(out),
                   env={"RAGQA_HOME": str(tmp_path / "home"), "RAGQA_MODELS": str(corpus_settings.models_dir),
                        "RAGQA_SERVE_PARALLEL": "2", "RAGQA_MAX_TOKENS": "64"})
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "serve.json").read_text(encoding="utf-8"))
    assert [(r["mode"], r["clients"]) for r in res["rows"]] == [("one lane", 2), ("2 lanes", 2)]
    assert res["errors"] == 0 and all(r["problems"] == [] for r in res["rows"])
    for r in res["rows"]:
        assert r["requests"] == 2 and r["answers_per_min"] > 0
        assert r["latency_ms"]["p95"] >= r["latency_ms"]["p50"] > 0
    assert res["rows"][0]["throughput_vs_one_lane"] == 1.0 and res["rows"][1]["throughput_vs_one_lane"] > 0
    assert "vs one lane" in proc.stdout


@pytest.mark.slow
def test_bench_ttft_restores_the_saved_system_prompt_each_fresh_process(corpus_settings: Settings,
                                                                       tmp_path: Path) -> None:
    """The real ttft benchmark (0.5B, 3 questions): every question starts from an empty KV cache and loads
    the system prompt's state from disk, so fewer tokens are evaluated than the prompt holds."""
    out = tmp_path / "bench"
    proc = run_cli("bench", "ttft", "--quick", "--questions", "3", "--model", "qwen2.5-coder-0.5b-instruct",
                   "--index", str(corpus_settings.index_dir), "--out", str(out),
                   env={"RAGQA_HOME": str(tmp_path / "home"), "RAGQA_MODELS": str(corpus_settings.models_dir)})
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "ttft.json").read_text(encoding="utf-8"))
    assert res["questions"] == 3 and res["prompt_cache"] is True
    assert res["context_tokens"] == Settings().context_tokens  # the default budget, whatever it is
    # the kernel probe is off in tests: no measured rates, so every answer kept the fixed budget
    assert res["budget_tokens_p50"] == Settings().context_tokens
    assert {row["budget_tokens"] for row in res["per_question"]} == {Settings().context_tokens}
    for row in res["per_question"]:
        assert 20 < row["cached_tokens"] < row["prompt_tokens"]
    assert res["evaluated_tokens_mean"] < res["prompt_tokens_mean"]
    assert list((tmp_path / "home" / "cache" / "prompts").glob("*.npz"))
    assert "of which evaluated" in proc.stdout
