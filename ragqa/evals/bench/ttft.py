"""Time to first token: QA.ask over the eval questions as `ragqa ask` sees it, each from a fresh process's
state, with the prompt sizes behind it."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ragqa.evals.bench.common import (
    BenchContext,
    TimedLLM,
    fresh_process,
    make_table,
    median,
    met,
    ratio,
    rnd,
    summarize_ms,
)

TARGET = "p50 TTFT <= 5000 ms, key_fact_accuracy within 0.02 of evals/RESULTS.md's (run `ragqa eval`)"


def run(ctx: BenchContext) -> dict[str, Any]:
    """QA.ask over the suite's questions: TTFT (retrieval + prompt processing) as `ragqa ask` sees it."""
    qa = ctx.qa()
    timed = TimedLLM(ctx.llm, stop_after=1)  # only the first token matters here
    qa._llm = timed
    questions = ctx.load_questions(ctx.questions)
    fresh_process(ctx.llm)
    qa.ask(questions[0]["question"])  # warm-up (not counted); also saves the system prompts' states
    qa.ask("What is it?" if questions[0]["lang"] == "zh" else "它是什么？")  # the other language's too
    rows = []
    prefixes = getattr(ctx.llm, "prefixes", None)
    for q in questions:
        fresh_process(ctx.llm)  # each `ragqa ask` is a fresh process with an empty KV cache
        a = qa.ask(q["question"])
        t = a.timings
        if t["ttft_ms"] is None:
            continue  # nothing fitted: a refusal without generation, no TTFT to measure
        # Tokens llama.cpp had evaluated when the first piece came out: the prompt (the sampled token is not
        # evaluated until the next step, which the early stop skips).
        prompt = ctx.llm.client.n_tokens if timed.pieces else None
        cached = prefixes.loaded_tokens if prefixes else 0  # restored from disk, not evaluated
        prompt_s = (t["ttft_ms"] - t["retrieve_ms"] - (t.get("focus_ms") or 0)) / 1000
        rows.append({"id": q["id"], "lang": q["lang"], "ttft_ms": t["ttft_ms"], "retrieve_ms": t["retrieve_ms"],
                     "focus_ms": t.get("focus_ms"), "prompt_tokens": prompt, "cached_tokens": cached,
                     "budget_tokens": a.budget.tokens if a.budget else None,
                     "prompt_tok_s": rnd(ratio(prompt - cached, prompt_s) if prompt else None)})
    ttft = [r["ttft_ms"] for r in rows]
    prompts = [r["prompt_tokens"] for r in rows if r["prompt_tokens"]]
    out = {
        "questions": len(rows),
        "model": ctx.llm.name,
        "n_threads": ctx.settings.n_threads,
        "ttft_ms": summarize_ms(ttft),
        "retrieve_ms": summarize_ms([r["retrieve_ms"] for r in rows]),
        "prompt_tokens_mean": rnd(sum(prompts) / len(prompts) if prompts else None, 1),
        "evaluated_tokens_mean": rnd(sum(r["prompt_tokens"] - r["cached_tokens"] for r in rows if r["prompt_tokens"])
                                    / len(prompts) if prompts else None, 1),
        "focus_ms": summarize_ms([r["focus_ms"] for r in rows if r["focus_ms"] is not None]),
        "context_tokens": ctx.settings.context_tokens,
        # the passage budget the answers used (ragqa/budget.py): from ttft_target_s and the probed rates
        "budget_tokens_p50": median([r["budget_tokens"] for r in rows if r["budget_tokens"] is not None]),
        "ttft_target_s": ctx.settings.ttft_target_s,
        "prompt_cache": ctx.settings.prompt_cache,
        "prompt_tok_s_p50": rnd(median([r["prompt_tok_s"] for r in rows if r["prompt_tok_s"]]), 1),
        "per_question": rows,
        "quality": "key_fact_accuracy: run `ragqa eval evals/corpus_qa.jsonl` and compare with evals/RESULTS.md",
        "target": TARGET,
    }
    out["met"] = met(out["ttft_ms"]["p50"], lambda x: x <= 5000)
    return out


def table(res: dict[str, Any]) -> Table:
    """The printed view of one result; the JSON holds everything, the table what a reader compares."""
    return make_table(
        f"time to first token ({res['questions']} questions, {res['model']}, {res['n_threads']} threads)",
        ["", "p50", "p95"],
        [["TTFT ms", res["ttft_ms"]["p50"], res["ttft_ms"]["p95"]],
         ["retrieval ms", res["retrieve_ms"]["p50"], res["retrieve_ms"]["p95"]],
         ["sentence focus ms", res["focus_ms"]["p50"], res["focus_ms"]["p95"]],
         ["passage budget tokens", res["budget_tokens_p50"], None],
         ["prompt tokens (mean)", res["prompt_tokens_mean"], None],
         ["  of which evaluated (rest: saved system prompt)", res["evaluated_tokens_mean"], None],
         ["prompt tok/s (evaluated)", res["prompt_tok_s_p50"], None]])
