"""What every benchmark shares: the timing helpers, the table and the machine record, the context that
loads models and the corpus index once per run, and the wrapper that timestamps streamed tokens."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ragqa.config import Settings
from ragqa.evals.metrics import percentile

QUICK_SIZES = (2000, 10000)
FULL_SIZES = (10000, 100000, 1000000)


# ---- small pure helpers (unit-tested) ---------------------------------------------------------------------
def median(values: Sequence[float]) -> float | None:
    return percentile(list(values), 50)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is zero (a ratio of nothing must not print as 0)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def gen_rate(n_tokens: int, t_first: float, t_last: float) -> float | None:
    """Generation tokens/s after the first token: (tokens - 1) / (t_last - t_first); None below 2 tokens."""
    if n_tokens < 2 or t_last <= t_first:
        return None
    return (n_tokens - 1) / (t_last - t_first)


def alternate(run: int) -> tuple[str, str]:
    """Which side goes first in run `run`: alternating spreads slow drift (thermal, neighbours) over both."""
    return ("ragqa", "bare") if run % 2 == 0 else ("bare", "ragqa")


def summarize_ms(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": rnd(percentile(list(values), 50)), "p95": rnd(percentile(list(values), 95)), "n": len(values)}


def rnd(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.3f}" if abs(x) < 10 else f"{x:,.1f}"
    return str(x)


def make_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == columns[0] else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    return table


def rss_mb() -> float:
    """Resident memory of this process, from /proc (no psutil dependency)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def machine(settings: Settings) -> dict[str, Any]:
    """What the figures were measured on: without this a number cannot be compared with another."""
    from ragqa import kernels

    cpu = kernels.cpu_name()
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {}
    for pkg in ("ragqa", "llama-cpp-python", "torch", "chromadb", "sentence-transformers", "langchain-core", "numpy",
                "onnxruntime"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "threads": settings.n_threads,
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": list(os.getloadavg()),
        "embedder": settings.embedder,
        "embed_runtime": settings.embed_runtime,
        "embed_precision": settings.embed_precision,
        "embed_threads": settings.embedder_threads,
        "model": settings.model,
        # the llama.cpp kernel these settings apply (a probe's record or the defaults), with its sources
        "kernel": {k: {"value": v, "source": src} for k, (v, src) in kernels.describe(settings).items()},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---- shared state --------------------------------------------------------------------------------------
@dataclass
class BenchContext:
    """Models and the corpus index, loaded once and shared by the benchmarks of one run."""

    settings: Settings
    out: Path
    suite: Path
    runs: int = 3
    questions: int | None = None
    sizes: tuple[int, ...] = FULL_SIZES
    quick: bool = False
    max_build_minutes: float = 15.0
    index: Path | None = None  # an index of the corpus to reuse; default OUT/index
    clients: tuple[int, ...] = (1, 4, 16)  # concurrent clients of the serve benchmark
    console: Console = field(default_factory=Console)
    _embedder: Any = None
    _llm: Any = None
    _index_settings: Settings | None = None

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from ragqa.embed import from_settings

            self._embedder = from_settings(self.settings)
        return self._embedder

    @property
    def llm(self) -> Any:
        if self._llm is None:
            from ragqa.llm import load_llm

            self._llm = load_llm(self.settings)
        return self._llm

    @property
    def index_settings(self) -> Settings:
        """The corpus indexed under OUT/index or --index (a no-change re-ingest when it is already there)."""
        if self._index_settings is None:
            from ragqa.index import Index

            s = self.settings.replace(index=self.index or self.out / "index")
            Index(s, embedder=self.embedder).ingest([s.corpus])
            self._index_settings = s
        return self._index_settings

    def qa(self) -> Any:
        from ragqa.chain import QA
        from ragqa.index import Index

        s = self.index_settings
        return QA(s, index=Index(s, embedder=self.embedder), llm=self.llm)

    def load_questions(self, limit: int | None = None) -> list[dict[str, Any]]:
        from ragqa.evals.runner import load_suite

        return load_suite(self.suite, limit=limit)


class TimedLLM:
    """Wraps ragqa's chat model to timestamp each streamed piece; optionally stops after the first piece.

    Stopping early is how TTFT benchmarks avoid paying for whole answers: closing the generator stops
    llama.cpp, and the time to the first piece is unaffected.
    """

    def __init__(self, inner: Any, stop_after: int | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.n_ctx = inner.n_ctx
        self.stop_after = stop_after
        self.messages: list[dict[str, str]] = []
        self.t_call = 0.0
        self.times: list[float] = []
        self.pieces: list[str] = []

    @property
    def usage(self) -> dict[str, int | None]:
        return self.inner.usage

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def stream(self, messages: list[dict[str, str]], max_tokens: int) -> Iterator[str]:
        self.messages = messages
        self.times, self.pieces = [], []
        self.t_call = time.perf_counter()
        inner = self.inner.stream(messages, max_tokens)
        try:
            for piece in inner:
                self.times.append(time.perf_counter())
                self.pieces.append(piece)
                yield piece
                if self.stop_after and len(self.pieces) >= self.stop_after:
                    break
        finally:
            inner.close()


def reset_kv(llama: Any) -> None:
    """Forget llama.cpp's evaluated prefix. llama-cpp-python reuses the longest common token prefix of the
    previous call, so a repeated prompt would get a near-zero TTFT; after `reset()` (n_tokens = 0) the next
    call evaluates the whole prompt again, as a fresh `ragqa ask` process does."""
    llama.reset()


def fresh_process(llm: Any) -> None:
    """The state a new `ragqa ask` process starts in: an empty KV cache, and saved system-prompt states only
    on disk (llm.PrefixCache), so loading them is paid as a real process pays it."""
    reset_kv(llm.client)
    prefixes = getattr(llm, "prefixes", None)
    if prefixes is not None:
        prefixes.states.clear()
        prefixes.current = None


def answerable_questions(ctx: BenchContext) -> list[str]:
    """The suite's answerable questions, Chinese first (most of the suite, and the model answers them more)."""
    from ragqa.evals.metrics import is_answerable

    qs = [q for q in ctx.load_questions() if is_answerable(q)]
    ordered = [q["question"] for q in sorted(qs, key=lambda q: q["lang"] != "zh")]
    return ordered or [ctx.load_questions(1)[0]["question"]]


def met(value: float | None, test: Callable[[float], bool]) -> bool | None:
    return None if value is None else bool(test(value))
