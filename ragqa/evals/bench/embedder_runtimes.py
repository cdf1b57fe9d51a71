"""The EmbeddingGemma runtimes side by side: torch (sentence-transformers) vs ONNX Runtime fp32.

Not one of `ragqa bench`'s benchmarks (it needs torch, and it measures a choice ragqa has already made): run it
by hand from the repository root, alone on the machine, when the embedder or its runtimes change:

    python -m ragqa.evals.bench.embedder_runtimes [--skip-warm]

Cold: a fresh interpreter per runtime, from process start to the first query vector, split into imports,
model load and first query. Warm: docs/s over ragqa's own split of corpus/ (same batch size, both sort by
length) and one-query latency; then the largest difference between the two runtimes' vectors. Figures
measured with it are in evals/RESULTS.md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path.cwd()  # the repository root: corpus/ and evals/ are read from it, as `ragqa bench` does
EMBEDDER = "embeddinggemma-300m"

COLD = r"""
import json, sys, time
t0 = time.perf_counter()
runtime = sys.argv[1]
from pathlib import Path
from ragqa.config import load_settings
from ragqa.embed import from_settings
if runtime == "torch":
    import sentence_transformers, torch  # noqa: F401  what SentenceTransformerEmbeddings imports
else:
    import onnxruntime, tokenizers  # noqa: F401  what OnnxEmbeddings imports
t1 = time.perf_counter()
e = from_settings(load_settings().replace(embed_runtime=runtime))
t2 = time.perf_counter()
v = e.embed_query("杰文斯悖论是什么？")
t3 = time.perf_counter()
print(json.dumps({"runtime": type(e).__name__, "import_s": t1 - t0, "load_s": t2 - t1, "first_query_s": t3 - t2,
                  "dim": len(v)}))
"""


def cold(runtime: str) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", COLD, runtime], capture_output=True, text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = time.perf_counter() - start  # includes interpreter start-up and exit
    return row


def corpus_chunks() -> list[str]:
    from ragqa.config import load_settings
    from ragqa.ingest import iter_files, load_document, split_document

    s = load_settings()
    texts: list[str] = []
    for path in iter_files([ROOT / "corpus"]):
        texts.extend(c.text for c in split_document(load_document(path), str(path), s.chunk_size, s.chunk_overlap))
    return texts


def warm(runtime: str, texts: list[str], queries: list[str]) -> dict[str, float]:
    import numpy as np

    from ragqa.config import load_settings
    from ragqa.embed import from_settings

    e = from_settings(load_settings().replace(embed_runtime=runtime))
    e.embed_query("warm up")
    t = time.perf_counter()
    vecs = e.embed_documents(texts)
    docs_s = len(texts) / (time.perf_counter() - t)
    lat = []
    for q in queries:
        t = time.perf_counter()
        e.embed_query(q)
        lat.append((time.perf_counter() - t) * 1000)
    np.save(f"/tmp/bench_onnx_{runtime}.npy", np.array(vecs, dtype=np.float32))
    return {"runtime": type(e).__name__, "chunks": len(texts), "docs_per_s": docs_s,
            "query_ms_median": statistics.median(lat), "query_ms_min": min(lat)}


def main() -> None:
    if not (ROOT / "corpus").is_dir():
        sys.exit("run it from the repository root (corpus/ and evals/ are read from there)")
    for runtime in ("torch", "onnx", "torch", "onnx"):  # twice: the second of each has a warm page cache
        print(json.dumps({"cold": cold(runtime)}), flush=True)
    if "--skip-warm" in sys.argv:
        return
    import numpy as np

    texts = corpus_chunks()
    rows = [json.loads(line) for line in (ROOT / "evals" / "corpus_qa.jsonl").read_text(encoding="utf-8").splitlines()]
    queries = [r["question"] for r in rows][:20]
    for runtime in ("torch", "onnx"):
        print(json.dumps({"warm": warm(runtime, texts, queries)}), flush=True)
    a, b = np.load("/tmp/bench_onnx_torch.npy"), np.load("/tmp/bench_onnx_onnx.npy")
    print(json.dumps({"corpus_equivalence": {"max_abs_diff": float(np.abs(a - b).max()),
                                             "min_cosine": float((a * b).sum(axis=1).min())}}))


if __name__ == "__main__":
    main()
