"""Cold start: `ragqa ask --json` from process start to first token, and a probe in a fresh interpreter
that splits that time into imports, model loads and the first and a warm TTFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from ragqa.errors import RagqaError
from ragqa.evals.bench.common import (
    BenchContext,
    TimedLLM,
    answerable_questions,
    fresh_process,
    make_table,
    median,
    met,
    rnd,
)

TARGET = "cold start adds <= 3000 ms over a warm TTFT"
COLD_MAX_TOKENS = 8  # cold start ends at the first token; a long answer would only cost time


def run(ctx: BenchContext) -> dict[str, Any]:
    """`ragqa ask --json` from process start to first token, and where that time goes."""
    s = ctx.index_settings
    question = answerable_questions(ctx)[0]
    env = {**os.environ, "RAGQA_MAX_TOKENS": str(COLD_MAX_TOKENS)}
    cmd = [sys.executable, "-c", "from ragqa.cli import main; main()", "ask", question, "--json",
           "--index", str(s.index_dir), "--model", s.model, "--embedder", s.embedder, "--threads", str(s.n_threads)]
    cli_runs = []
    for r in range(ctx.runs + 1):  # run 0 warms the OS page cache (model files), as a second use would be
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = proc.stdout.readline() if proc.stdout else ""
        t_line = time.perf_counter()
        _, stderr = proc.communicate()
        t_exit = time.perf_counter()
        if proc.returncode != 0 or not line.strip():
            raise RagqaError(f"bench: ragqa ask failed: {(stderr.strip().splitlines() or ['no output'])[-1]}")
        timings = json.loads(line)["timings"]
        after_first = (timings["total_ms"] - timings["ttft_ms"]) / 1000
        if r:
            cli_runs.append({"first_token_ms": round((t_line - t0 - after_first) * 1000, 1),
                             "ask_ttft_ms": timings["ttft_ms"], "exit_ms": round((t_exit - t_line) * 1000, 1)})
    probes = []
    for r in range(ctx.runs + 1):
        probe = subprocess.run(
            [sys.executable, "-c", "from ragqa.evals.bench.cold import probe; probe()", json.dumps(
                {"index": str(s.index_dir), "model": s.model, "embedder": s.embedder, "question": question,
                 "threads": s.n_threads, "models": str(s.models_dir)})],
            capture_output=True, text=True, env=env,
        )
        if probe.returncode != 0:
            raise RagqaError(f"bench: cold probe failed: {(probe.stderr.strip().splitlines() or [''])[-1]}")
        if r:
            probes.append(json.loads(probe.stdout.strip().splitlines()[-1]))
    parts = {key: rnd(median([p[key] for p in probes])) for key in probes[0]}
    first = median([x["first_token_ms"] for x in cli_runs])
    out = {
        "question": question,
        "max_tokens": COLD_MAX_TOKENS,
        "cli_first_token_ms": rnd(first),
        "warm_ttft_ms": parts["warm_ttft_ms"],
        "cold_over_warm_ms": rnd(first - parts["warm_ttft_ms"]) if first is not None else None,
        "parts_ms": parts,
        "runs": {"cli": cli_runs, "probe": probes},
        "target": TARGET,
    }
    out["met"] = met(out["cold_over_warm_ms"], lambda x: x <= 3000)
    return out


def probe() -> None:
    """Run in a fresh interpreter by `run`: time each cold step in the order `ragqa ask` pays them."""
    t_start = time.perf_counter()
    args = json.loads(sys.argv[1])
    parts: dict[str, float] = {}

    def mark(name: str, t: float) -> float:
        now = time.perf_counter()
        parts[name] = round((now - t) * 1000, 1)
        return now

    t = t_start
    import typer  # noqa: F401  (the CLI's own imports come first)

    t = mark("import_cli_ms", t)
    from ragqa import models, onnx_export

    onnx_export.prestart(args["embedder"], Path(args["models"]), args["threads"])  # as `ragqa ask` does
    t = mark("prestart_ms", t)
    import langchain_core.messages  # noqa: F401

    t = mark("import_langchain_ms", t)
    import chromadb  # noqa: F401

    t = mark("import_chromadb_ms", t)
    _, embedder_path, kind = models.resolve(args["embedder"], Path(args["models"]), kind="embedder")
    if kind == "sentence-transformers" and onnx_export.ready(embedder_path):
        import onnxruntime  # noqa: F401  (what the ONNX runtime of the embedder imports, instead of torch)
        import tokenizers  # noqa: F401

        t = mark("import_onnxruntime_ms", t)
    elif kind == "sentence-transformers":
        import torch  # noqa: F401

        t = mark("import_torch_ms", t)
        import sentence_transformers  # noqa: F401

        t = mark("import_sentence_transformers_ms", t)
    import llama_cpp  # noqa: F401

    t = mark("import_llama_cpp_ms", t)
    from langchain_community.chat_models import ChatLlamaCpp  # noqa: F401

    from ragqa.chain import QA
    from ragqa.config import load_settings
    from ragqa.index import Index

    t = mark("import_ragqa_rest_ms", t)
    parts["imports_total_ms"] = round(sum(v for k, v in parts.items() if k.startswith("import_")), 1)
    from ragqa.index import load_jieba

    load_jieba()  # jieba's dictionary, the way ragqa's BM25 tokenizer loads it
    t = mark("jieba_init_ms", t)
    settings = load_settings({"index": args["index"], "model": args["model"], "embedder": args["embedder"],
                              "n_threads": args["threads"], "models": args["models"]})
    index = Index(settings)
    qa = QA(settings, index=index)
    qa.prepare()
    t = mark("open_index_ms", t)
    _ = index.embedder
    t = mark("embedder_load_ms", t)
    llm = qa.llm
    t = mark("gguf_load_ms", t)
    timed = TimedLLM(llm, stop_after=1)
    qa._llm = timed
    a = qa.ask(args["question"])
    parts["first_ttft_ms"] = a.timings["ttft_ms"] or 0.0
    parts["first_token_since_start_ms"] = round((timed.times[0] - t_start) * 1000, 1) if timed.times else 0.0
    fresh_process(llm)
    b = qa.ask(args["question"])
    parts["warm_ttft_ms"] = b.timings["ttft_ms"] or 0.0
    print(json.dumps(parts))


def table(res: dict[str, Any]) -> Table:
    """The printed view of one result; the JSON holds everything, the table what a reader compares."""
    parts = res["parts_ms"]
    return make_table(
        "cold start (`ragqa ask --json`, process start to first token)", ["", "ms"],
        [["CLI: process start -> first token (p50)", res["cli_first_token_ms"]],
         ["warm TTFT (same process, KV reset)", res["warm_ttft_ms"]],
         ["cold - warm", res["cold_over_warm_ms"]],
         *[[k.removesuffix("_ms"), v] for k, v in parts.items() if k != "warm_ttft_ms"]])
