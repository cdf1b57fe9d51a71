"""Ingest: `Index.ingest` from empty vs the embedder alone on the same chunks in the same batches, and a
no-change re-ingest in process and as a CLI subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from ragqa.config import Settings
from ragqa.errors import RagqaError
from ragqa.evals.bench.common import BenchContext, alternate, make_table, median, met, ratio, rnd

TARGET = "ingest >= 0.9x the embedder alone; a no-change re-ingest < 2 s"


def run(ctx: BenchContext) -> dict[str, Any]:
    """Ingest corpus/ from empty vs the embedder alone on the same chunks in the same batches; re-ingest."""
    from ragqa.index import Index

    s0 = ctx.settings
    emb = ctx.embedder
    batch = max(1, s0.embed_batch_size)
    corpus = Path(s0.corpus)
    # --quick ingests the smallest corpus file only: the whole corpus takes minutes per pass on 2 cores.
    paths = [min((p for p in corpus.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)] if ctx.quick \
        else [corpus]
    # Same texts, same order (longest first) and batch size as Index._add_vectors.
    texts = _chunk_texts(s0, paths)
    emb.embed_documents(texts[:batch])  # warm-up: first-call costs of the model, outside both timings
    work = Path(tempfile.mkdtemp(prefix="ingest-", dir=ctx.out))
    ingest_rows: list[dict[str, Any]] = []
    embed_rows: list[dict[str, Any]] = []
    reingest_s: list[float] = []
    try:
        for r in range(ctx.runs):
            s = s0.replace(index=work / f"run{r}")
            for side in alternate(r):
                if side == "ragqa":
                    rep = Index(s, embedder=emb).ingest(paths)
                    ingest_rows.append({"chunks": rep.chunks_embedded, "seconds": rep.seconds,
                                        "embed_seconds": rep.embed_seconds})
                    t = time.perf_counter()
                    again = Index(s, embedder=emb).ingest(paths)
                    reingest_s.append(time.perf_counter() - t)
                    if again.chunks_embedded:
                        raise RagqaError("bench: a no-change re-ingest embedded chunks again")
                else:
                    t = time.perf_counter()
                    for i in range(0, len(texts), batch):
                        emb.embed_documents(texts[i : i + batch])
                    embed_rows.append({"chunks": len(texts), "seconds": time.perf_counter() - t})
        if ingest_rows[-1]["chunks"] != len(texts):
            raise RagqaError(f"bench: ingest embedded {ingest_rows[-1]['chunks']} chunks, expected {len(texts)}")
        cli_s = _cli_reingest(s0.replace(index=work / f"run{ctx.runs - 1}"), paths, ctx.runs)
        ingest_rate = median([x["chunks"] / x["seconds"] for x in ingest_rows])
        embed_rate = median([x["chunks"] / x["seconds"] for x in embed_rows])
        out = {
            "paths": [str(p) for p in paths],
            "chunks": ingest_rows[-1]["chunks"],
            "batch_size": batch,
            "embedder": s0.embedder,
            "embed_precision": s0.embed_precision,
            "embed_threads": s0.embedder_threads,
            "ingest_chunks_per_s": rnd(ingest_rate, 3),
            "embedder_alone_chunks_per_s": rnd(embed_rate, 3),
            "ratio": rnd(ratio(ingest_rate, embed_rate), 4),
            "ingest_seconds": rnd(median([x["seconds"] for x in ingest_rows]), 3),
            "ingest_embed_seconds": rnd(median([x["embed_seconds"] for x in ingest_rows]), 3),
            "embedder_alone_seconds": rnd(median([x["seconds"] for x in embed_rows]), 3),
            "reingest_in_process_s": rnd(median(reingest_s), 3),
            "reingest_cli_s": rnd(median(cli_s), 3),
            "runs": {"ingest": ingest_rows, "embedder": embed_rows, "reingest_in_process_s": reingest_s,
                     "reingest_cli_s": cli_s},
            "target": TARGET,
        }
        out["met"] = met(out["ratio"], lambda x: x >= 0.9) and met(out["reingest_cli_s"], lambda x: x < 2)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _chunk_texts(settings: Settings, paths: list[Path]) -> list[str]:
    from ragqa.index import Index
    from ragqa.ingest import iter_files, load_text, split_text

    chunks = []
    splitter_default = Index(settings).splitter == "langchain-default"
    for path in iter_files(paths):
        chunks += split_text(load_text(path), str(path), settings.chunk_size, settings.chunk_overlap, "x",
                             default_separators=splitter_default)
    return [c.text for c in sorted(chunks, key=lambda c: len(c.text), reverse=True)]


def _cli_reingest(settings: Settings, paths: list[Path], runs: int) -> list[float]:
    """Wall time of `ragqa ingest` on an unchanged corpus as a user's shell runs it (process start to exit)."""
    cmd = [sys.executable, "-c", "from ragqa.cli import main; main()", "ingest", *map(str, paths),
           "--index", str(settings.index_dir), "--embedder", settings.embedder]
    times = []
    for r in range(runs + 1):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - t
        if proc.returncode != 0:
            raise RagqaError(f"bench: ragqa ingest failed: {(proc.stderr.strip().splitlines() or [''])[-1]}")
        if r:
            times.append(elapsed)
    return times


def table(res: dict[str, Any]) -> Table:
    """The printed view of one result; the JSON holds everything, the table what a reader compares."""
    return make_table(
        f"ingest ({res['chunks']} chunks, batch {res['batch_size']}, {res['embedder']})",
        ["", "ragqa ingest", "embedder alone", "ratio"],
        [["chunks/s (p50)", res["ingest_chunks_per_s"], res["embedder_alone_chunks_per_s"], res["ratio"]],
         ["seconds (p50)", res["ingest_seconds"], res["embedder_alone_seconds"], None],
         ["no-change re-ingest s, in process", res["reingest_in_process_s"], None, None],
         ["no-change re-ingest s, CLI", res["reingest_cli_s"], None, None]])
