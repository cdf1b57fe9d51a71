"""`ragqa bench`: how close ragqa runs to the physical limits of the machine, each figure beside a baseline.

Every benchmark is one module here with `run(ctx)`, returning a plain dict (medians over `runs` after one
warm-up, the raw runs kept), `table(res)` and its `TARGET`; `common` holds the timing, table and machine code
they share. `run_benchmarks` prints a table per benchmark and writes one JSON each plus a combined `bench.json`.
The baselines are measured in the same process on the same machine in the same run, because on a shared
2-core CPU a figure from another hour is not comparable:

- generation: ragqa's streaming path vs a bare `llama_cpp.Llama` with the same settings and messages;
- ttft: end-to-end time to first token over the eval questions (and the prompt sizes behind it);
- ingest: `Index.ingest` from empty vs the embedder alone on the same chunks in the same batches;
- retrieval: dense + BM25 + fusion at growing synthetic sizes, BM25 beside rank_bm25 (the old scorer);
- cold: `ragqa ask` from process start to first token, split into imports, model loads and warm TTFT;
- serve: `ragqa serve` with 1, 4, 16 clients against a model server, its lanes vs one lane (only when named:
  it needs `--llm-url`).

Not part of the test suite's pass/fail: the figures depend on the machine and on who else uses it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from ragqa.errors import RagqaError
from ragqa.evals.bench import cold, generation, ingest, retrieval, serve, ttft
from ragqa.evals.bench.common import (
    FULL_SIZES,
    QUICK_SIZES,
    BenchContext,
    TimedLLM,
    alternate,
    fmt,
    gen_rate,
    machine,
    make_table,
    median,
    ratio,
    summarize_ms,
)

BENCHES = {"generation": generation, "ttft": ttft, "ingest": ingest, "retrieval": retrieval, "cold": cold,
           "serve": serve}
BENCHMARKS = tuple(BENCHES)
ON_REQUEST = ("serve",)  # not in the default run: it needs a model server
TARGETS = {name: module.TARGET for name, module in BENCHES.items()}

__all__ = [
    "BENCHMARKS", "FULL_SIZES", "QUICK_SIZES", "TARGETS", "BenchContext", "TimedLLM", "alternate", "check_names",
    "fmt", "gen_rate", "machine", "make_table", "median", "parse_clients", "parse_sizes", "quick_defaults", "ratio",
    "run_benchmarks", "summarize_ms", "tables",
]


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        raise RagqaError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(x <= 0 for x in sizes):
        raise RagqaError(f"--sizes must be positive integers, got {text!r}")
    return sizes


def parse_clients(text: str) -> tuple[int, ...]:
    try:
        clients = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RagqaError(f"--clients must be comma-separated integers, got {text!r}") from None
    if not clients or any(x <= 0 for x in clients):
        raise RagqaError(f"--clients must be positive integers, got {text!r}")
    return clients


def check_names(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise RagqaError(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    return list(names) or [n for n in BENCHMARKS if n not in ON_REQUEST]


def tables(name: str, res: dict[str, Any]) -> list[Table]:
    """The printed view of one result; the JSON holds everything, the table what a reader compares."""
    return [BENCHES[name].table(res)]


def run_benchmarks(ctx: BenchContext, names: Sequence[str]) -> dict[str, Any]:
    """Run the named benchmarks in order; print each table as soon as it is done and write its JSON."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    combined: dict[str, Any] = {"machine": machine(ctx.settings),
                                "options": {"runs": ctx.runs, "questions": ctx.questions, "sizes": list(ctx.sizes),
                                            "quick": ctx.quick},
                                "results": {}}
    for name in names:
        ctx.console.print(f"[bold]bench {name}[/] …")
        t = time.perf_counter()
        res = BENCHES[name].run(ctx)
        res["bench_seconds"] = round(time.perf_counter() - t, 1)
        res["machine"] = combined["machine"]
        (ctx.out / f"{name}.json").write_text(json.dumps(res, ensure_ascii=False, indent=2), encoding="utf-8")
        combined["results"][name] = res
        for table in tables(name, res):
            ctx.console.print(table)
        ctx.console.print(f"[dim]target: {res['target']} → met: {fmt(res.get('met'))} "
                          f"({res['bench_seconds']} s)[/]")
        (ctx.out / "bench.json").write_text(json.dumps(combined, ensure_ascii=False, indent=2), encoding="utf-8")
    return combined


def quick_defaults(runs: int | None, questions: int | None, sizes: str | None, quick: bool) -> dict[str, Any]:
    """--quick: one run, a few questions, tiny synthetic sizes; explicit flags still win."""
    return {
        "runs": runs if runs is not None else (1 if quick else 3),
        "questions": questions if questions is not None else (3 if quick else None),
        "sizes": parse_sizes(sizes) if sizes else (QUICK_SIZES if quick else FULL_SIZES),
    }
