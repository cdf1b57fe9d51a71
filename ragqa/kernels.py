"""llama.cpp kernel settings chosen by measurement, once per host, model file and llama.cpp build.

Which of llama.cpp's CPU knobs pays depends on the machine: weight repacking made generation faster and the
prompt slower on an AVX-512 host, and what it does with AVX2 kernels is a different question. So instead of a
fixed default, a short probe loads the model once per candidate, times a prompt and a short greedy reply, and
keeps the candidate that would answer a ragqa question soonest. The record is a JSON file under
`<models>/kernels/`, named by a digest of everything the timing depends on (the CPU's flags, llama.cpp's build
string, llama-cpp-python's version, the model file, the probe's size): when any of them changes, the old
record no longer matches and the next load probes again. A kernel key set by the user (ragqa.toml, RAGQA_*,
a flag) always wins over the probe; `kernel_probe = "off"` uses the plain defaults.

Only candidates that keep llama.cpp's arithmetic are chosen automatically: repacking, the micro-batch size and
the thread count reorganise the same computation (repacking's rounding differs slightly; its eval effect is
measured in evals/RESULTS.md). Flash attention and a q8_0 KV cache compute attention differently, so they are
measured and shown but applied only when the user sets them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragqa.budget import Rates
from ragqa.config import Settings
from ragqa.errors import RagqaError

KEYS = ("repack", "n_ubatch", "flash_attn", "kv_type", "n_threads")
KV_TYPES = {"f16": 1, "q8_0": 8}  # ggml type ids (GGML_TYPE_F16, GGML_TYPE_Q8_0)
PROBE_MODES = ("auto", "off")
# The probe's size: a retrieved-passage prompt of ragqa's length, and enough tokens to time generation.
PROBE_PROMPT_TOKENS = 400
PROBE_NEW_TOKENS = 32
PROBE_REPEATS = 2  # the better of two: a background hiccup only ever slows a run down
# The cost model: one ragqa answer is ~450 prompt tokens (passages, question, rules) and ~100 answer tokens;
# the user waits for both, so a kernel is judged by their sum, not by either rate alone.
ANSWER_PROMPT_TOKENS = 450
ANSWER_NEW_TOKENS = 100
# Repeated runs of one setting differed by a few percent: a candidate replaces the baseline only when it
# is faster than that by a clear margin.
MIN_GAIN = 0.05
RECORD_VERSION = 2
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings) if f.name in KEYS}


@dataclass(frozen=True)
class Kernel:
    """The llama.cpp settings that change speed: what `LlamaCppChat` and the generation benchmark apply."""

    repack: bool = _DEFAULTS["repack"]
    n_ubatch: int = _DEFAULTS["n_ubatch"]
    flash_attn: bool = _DEFAULTS["flash_attn"]
    kv_type: str = _DEFAULTS["kv_type"]
    n_threads: int = _DEFAULTS["n_threads"]

    def llama_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `llama_cpp.Llama` (n_threads included: prompt and generation alike, where
        Llama's own default would give the prompt every core whatever n_threads says)."""
        kv = KV_TYPES[self.kv_type]
        kwargs: dict[str, Any] = {"n_ubatch": self.n_ubatch, "flash_attn": self.flash_attn, "type_k": kv,
                                  "n_threads": self.n_threads, "n_threads_batch": self.n_threads}
        if self.flash_attn:  # llama.cpp refuses a quantized V cache without flash attention
            kwargs["type_v"] = kv
        return kwargs

    def model_fields(self) -> dict[str, Any]:
        """llama_model_params fields `Llama()` has no argument for (see `llm.model_params`)."""
        return {"use_extra_bufts": self.repack}

    def label(self) -> str:
        changed = [f"{k}={v}" for k, v in self.as_dict().items() if v != _DEFAULTS[k]]
        return ", ".join(changed) or "defaults"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Candidate:
    name: str
    kernel: Kernel
    auto: bool  # may be chosen without the user asking (see the module docstring)


def candidates() -> list[Candidate]:
    """The baseline and one change each: combinations would multiply the probe's time for gains that measured
    within noise one by one."""
    base = Kernel()
    return [
        Candidate("baseline", base, True),
        Candidate("repack", dataclasses.replace(base, repack=True), True),
        Candidate("n_ubatch 256", dataclasses.replace(base, n_ubatch=256), True),
        Candidate("1 thread", dataclasses.replace(base, n_threads=1), True),
        Candidate("flash_attn", dataclasses.replace(base, flash_attn=True), False),
        Candidate("q8_0 KV", dataclasses.replace(base, flash_attn=True, kv_type="q8_0"), False),
    ]


# ---- what a record depends on --------------------------------------------------------------------------
def cpu_flags() -> str:
    """The CPU's feature flags, sorted (the kernels llama.cpp can pick), or the machine name where Linux's
    /proc/cpuinfo is missing."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(set(line.split(":", 1)[1].split())))
    return platform.machine() + " " + platform.processor()


def system_info() -> str:
    """llama.cpp's build description (its CPU backend's features: AVX2, AVX512, REPACK, ...)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def cpu_name() -> str:
    """The CPU's model name, for people (records, benchmark results); never part of a key."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def host() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores"


def record_key(model_path: Path, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    import llama_cpp

    stat = model_path.stat()
    return {
        "cpu_flags": hashlib.sha256(cpu_flags().encode()).hexdigest()[:16],
        "llama_cpp_system_info": system_info(),
        "llama_cpp_python": llama_cpp.__version__,
        "model": {"name": model_path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        "probe": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens},
    }


def record_path(models_dir: Path, model_path: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(models_dir) / "kernels" / f"{model_path.stem}-{digest}.json"


def _probe_size() -> tuple[int, int]:
    return PROBE_PROMPT_TOKENS, PROBE_NEW_TOKENS  # read at call time: the probe's tests shrink them


def load_record(settings: Settings, model_path: Path) -> tuple[dict[str, Any], Path] | None:
    """The record for this host, model and build, if one was written; never probes."""
    key = record_key(model_path, *_probe_size())
    path = record_path(settings.models_dir, model_path, key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("version") != RECORD_VERSION or data.get("key") != key:
        return None
    return data, path


# ---- measuring and choosing ------------------------------------------------------------------------------
PROBE_TEXT = (
    "杰文斯悖论指出，当技术进步提高了资源使用的效率时，资源的总消耗量反而可能增加，因为成本下降会刺激更多的需求。"
    "The Jevons paradox: when technology makes the use of a resource more efficient, total consumption of it "
    "can rise, because the lower cost per use invites more uses. Coal engines, lighting and computing each "
    "show the pattern. 检索增强生成先从文档中找出相关段落，再让模型根据这些段落回答问题，并标注引用来源。 "
)


def measure(model_path: Path, kernel: Kernel, n_ctx: int, prompt_tokens: int, new_tokens: int,
            repeats: int) -> dict[str, Any]:
    """`measure_here` in a child process, so that a candidate that crashes llama.cpp costs the probe that
    candidate, not the process. Seen on a 2-core KVM guest of an Intel Xeon with AMX (2026-12-02): llama.cpp's
    AMX matmul, used with weight repacking, died with SIGSEGV on every prompt of more than one token, and
    took `ragqa setup` with it. Raises RuntimeError with the reason; the probe records it."""
    args = json.dumps({"model_path": str(model_path), "kernel": kernel.as_dict(), "n_ctx": n_ctx,
                       "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats})
    proc = subprocess.run([sys.executable, "-m", "ragqa.kernels", args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else proc.returncode
        raise RuntimeError(f"llama.cpp crashed ({name})")
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the measuring process exited with {proc.returncode}: {tail}"[:200]) from None
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def measure_here(model_path: Path, kernel: Kernel, n_ctx: int, prompt_tokens: int, new_tokens: int,
                 repeats: int) -> dict[str, Any]:
    """Load the model with `kernel`, time a prompt of `prompt_tokens` and `new_tokens` greedy tokens,
    `repeats` times on a fresh KV cache, and keep the better rates. Bare llama.cpp: no chat template, no
    LangChain, so only the kernel differs between candidates."""
    import warnings

    import numpy as np
    from llama_cpp import Llama

    from ragqa.llm import _quiet_stderr, model_params

    t0 = time.perf_counter()
    with warnings.catch_warnings(), _quiet_stderr(), model_params(**kernel.model_fields()):
        warnings.simplefilter("ignore")
        llm = Llama(str(model_path), n_ctx=n_ctx, n_batch=512, rope_freq_base=0.0, rope_freq_scale=0.0,
                    verbose=False, **kernel.llama_kwargs())
    load_s = time.perf_counter() - t0
    text = PROBE_TEXT
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    while len(ids) < prompt_tokens:
        text += PROBE_TEXT
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    ids = ids[:prompt_tokens]
    prefill, gen, tokens = 0.0, 0.0, []
    try:
        for _ in range(repeats):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            t1 = time.perf_counter()
            out = []
            for _ in range(new_tokens):  # greedy, from the last row of logits llama.cpp computed
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
                out.append(int(np.argmax(logits)))
                llm.eval(out[-1:])
            t2 = time.perf_counter()
            prefill = max(prefill, len(ids) / (t1 - t0))
            gen = max(gen, new_tokens / (t2 - t1)) if new_tokens else gen
            tokens = out
    finally:
        llm.close()
    return {"prefill_tok_s": round(prefill, 1), "gen_tok_s": round(gen, 2), "load_s": round(load_s, 2),
            "tokens": tokens}


def answer_seconds(prefill_tok_s: float, gen_tok_s: float) -> float:
    """Modelled time of one ragqa answer (the cost the choice minimises)."""
    return ANSWER_PROMPT_TOKENS / prefill_tok_s + ANSWER_NEW_TOKENS / gen_tok_s


def choose(measured: list[dict[str, Any]]) -> str:
    """The name of the candidate to apply: the fastest by `answer_seconds` among those allowed automatically,
    if it beats the baseline by MIN_GAIN; else the baseline. `measured` rows: name, auto, prefill_tok_s,
    gen_tok_s (the first row named "baseline")."""
    base = next(m for m in measured if m["name"] == "baseline")
    base_s = answer_seconds(base["prefill_tok_s"], base["gen_tok_s"])
    allowed = [m for m in measured if m["auto"] and m["prefill_tok_s"] > 0 and m["gen_tok_s"] > 0]
    best = min(allowed, key=lambda m: answer_seconds(m["prefill_tok_s"], m["gen_tok_s"]))
    if answer_seconds(best["prefill_tok_s"], best["gen_tok_s"]) <= base_s * (1 - MIN_GAIN):
        return best["name"]
    return "baseline"


Progress = Callable[[str, int, int], None]  # (candidate name, done, total)


def probe(settings: Settings, model_path: Path,
          progress: Progress | None = None) -> tuple[dict[str, Any], Path] | None:
    """Measure every candidate, choose, and write the record (atomically: a concurrent load reads the old
    record or the new one, never half of one). None, and no record, when even the baseline cannot run: the
    model's own load then reports why."""
    prompt_tokens, new_tokens = _probe_size()
    key = record_key(model_path, prompt_tokens, new_tokens)
    path = record_path(settings.models_dir, model_path, key)
    rows = []
    # The baseline is measured first and again last, and keeps the better rates of both: on a shared machine
    # the speed drifts, and a baseline caught in a slow minute would let any candidate win by the drift.
    options = candidates()
    options.append(options[0])
    for i, cand in enumerate(options):
        if progress:
            progress(cand.name, i, len(options))
        try:
            result = measure(model_path, cand.kernel, settings.n_ctx, prompt_tokens, new_tokens, PROBE_REPEATS)
        except Exception as exc:  # noqa: BLE001 - a candidate this build cannot run is recorded, not chosen
            result = {"prefill_tok_s": 0.0, "gen_tok_s": 0.0, "error": f"{type(exc).__name__}: {exc}"[:200]}
        row = {"name": cand.name, "auto": cand.auto, "kernel": cand.kernel.as_dict(), **result}
        if i and cand is options[0]:
            first = rows[0]
            first["runs"] = [{k: first[k] for k in ("prefill_tok_s", "gen_tok_s")},
                             {k: row[k] for k in ("prefill_tok_s", "gen_tok_s")}]
            first["prefill_tok_s"] = max(first["prefill_tok_s"], row["prefill_tok_s"])
            first["gen_tok_s"] = max(first["gen_tok_s"], row["gen_tok_s"])
        else:
            rows.append(row)
        if "error" in rows[0]:
            return None
    if progress:
        progress("done", len(options), len(options))
    baseline_tokens = rows[0].get("tokens")
    for row in rows:  # greedy tokens equal to the baseline's: evidence that the candidate keeps the answers
        row["same_tokens"] = row.pop("tokens", None) == baseline_tokens
        if row["prefill_tok_s"] and row["gen_tok_s"]:
            row["answer_ms"] = round(1000 * answer_seconds(row["prefill_tok_s"], row["gen_tok_s"]))
    chosen = choose(rows)
    record = {
        "version": RECORD_VERSION,
        "key": key,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "host": host(),
        "model": str(model_path),
        "cost_model": {"prompt_tokens": ANSWER_PROMPT_TOKENS, "answer_tokens": ANSWER_NEW_TOKENS,
                       "min_gain": MIN_GAIN},
        "chosen": chosen,
        "kernel": next(r["kernel"] for r in rows if r["name"] == chosen),
        "candidates": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return record, path


def ensure(settings: Settings, model_path: Path, progress: Progress | None = None,
           force: bool = False) -> tuple[dict[str, Any], Path] | None:
    """The valid record for this host, model and build: read, or measured now when there is none."""
    found = None if force else load_record(settings, model_path)
    return found or probe(settings, model_path, progress)


# ---- applying --------------------------------------------------------------------------------------------
def _check(settings: Settings) -> None:
    if settings.kernel_probe not in PROBE_MODES:
        raise RagqaError(f"kernel_probe must be one of {', '.join(PROBE_MODES)}, not '{settings.kernel_probe}'")
    if settings.kv_type not in KV_TYPES:
        raise RagqaError(f"kv_type must be one of {', '.join(KV_TYPES)}, not '{settings.kv_type}'")
    if settings.n_ubatch < 1 or settings.n_threads < 1:
        raise RagqaError("n_ubatch and n_threads must be at least 1")


def _combine(settings: Settings, record: tuple[dict[str, Any], Path] | None) -> tuple[Kernel, dict[str, str]]:
    """User-set keys from the settings, the others from the record's choice (or the defaults)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    base = Kernel().as_dict()
    chosen_by_probe = {k for c in candidates() if c.auto for k, v in c.kernel.as_dict().items() if v != base[k]}
    for key in KEYS:
        if key in settings.sources or record is None:
            values[key] = getattr(settings, key)
            sources[key] = settings.sources.get(key, "default")
        elif key not in chosen_by_probe:  # measured only (see the module docstring)
            values[key] = getattr(settings, key)
            sources[key] = "default (the probe measures it, never sets it)"
        else:
            data, path = record
            values[key] = data["kernel"][key]
            sources[key] = f"probe {data['date']} ({path})"
    return Kernel(**values), sources


def resolve(settings: Settings, model_path: Path, progress: Progress | None = None) -> tuple[Kernel, dict[str, str]]:
    """The kernel to load `model_path` with and where each key came from; probes first if due."""
    _check(settings)
    record = ensure(settings, model_path, progress) if settings.kernel_probe == "auto" else None
    kernel, sources = _combine(settings, record)
    failed = next((r for r in (record[0]["candidates"] if record else []) if r["kernel"] == kernel.as_dict()
                   and "error" in r), None)
    if failed:  # a setting the probe saw fail here (a crash would take the process, with no message)
        named = ", ".join(k for k in KEYS if k in settings.sources) or "the kernel settings"
        raise RagqaError(f"llama.cpp failed with {kernel.label()} on this host when probed ({failed['error']}); "
                         f"change {named}")
    return kernel, sources


def describe(settings: Settings) -> dict[str, tuple[Any, str]]:
    """key -> (value, source) for `ragqa config`, from an existing record only (showing settings must not take
    half a minute); a missing record is named as such."""
    from ragqa import models

    _check(settings)
    record = None
    model_path: Path | None = None
    pending = ""
    if settings.kernel_probe == "auto":
        with contextlib.suppress(RagqaError):  # not fetched: nothing to show but the defaults
            _, model_path, _ = models.resolve(settings.model, settings.models_dir, kind="llm")
            record = load_record(settings, model_path)
        if record is None:
            pending = " (not probed yet: `ragqa models probe`)" if model_path else ""
    kernel, sources = _combine(settings, record)
    return {k: (getattr(kernel, k), s + (pending if s == "default" else "")) for k, s in sources.items()}


def measured_rates(settings: Settings) -> Rates | None:
    """The prefill and generation rates of the kernel these settings apply, from a valid record (the time
    budget, ragqa/budget.py, turns them into passage tokens); None when there is no record or it did not
    measure that kernel (a user-set combination), and with `kernel_probe = "off"`, which keeps every choice
    fixed, the passage budget included."""
    from ragqa import models

    if settings.kernel_probe != "auto":
        return None
    try:
        _, model_path, _ = models.resolve(settings.model, settings.models_dir, kind="llm")
        _check(settings)
    except RagqaError:
        return None
    record = load_record(settings, model_path)
    if record is None:
        return None
    kernel, _ = _combine(settings, record)
    for row in record[0]["candidates"]:
        if row["kernel"] == kernel.as_dict() and row["prefill_tok_s"] and row["gen_tok_s"]:
            return Rates(float(row["prefill_tok_s"]), float(row["gen_tok_s"]),
                         f"kernel probe {record[0]['date']}, {row['name']}")
    return None


def _main(argv: list[str]) -> int:
    """`python -m ragqa.kernels ARGS_JSON`: one `measure_here`, its result as the last line of stdout."""
    a = json.loads(argv[0])
    try:
        result = measure_here(Path(a["model_path"]), Kernel(**a["kernel"]), a["n_ctx"], a["prompt_tokens"],
                              a["new_tokens"], a["repeats"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        result = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
