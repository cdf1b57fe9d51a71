"""One settings object for the whole tool: defaults < TOML file < environment < flags.

Every value remembers where it came from, so `ragqa config` can answer "why is it using that model?"
without the user reading code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from ragqa.errors import RagqaError

ENV_PREFIX = "RAGQA_"


def _default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ragqa"


# The refusal threshold on the sentinel's first-token probability alone, chosen on the eval's tune part
# (2026-12-02): the default, and what the gate falls back to when the answerability check cannot run.
SENTINEL_ONLY_THRESHOLD = 0.50


@dataclass
class Settings:
    """Effective settings. Paths left as None are derived from `home` (see `resolve_paths`)."""

    home: Path = field(default_factory=_default_home)
    index: Path | None = None  # default: home/index
    models: Path | None = None  # default: home/models, shared by every index
    corpus: Path = Path("corpus")
    embedder: str = "embeddinggemma-300m"
    model: str = "qwen2.5-coder-1.5b-instruct"
    # Chunking, retrieval and prompt budget: chosen by `ragqa eval` on evals/corpus_qa.jsonl (evals/RESULTS.md).
    pipeline: str = "ragqa"  # or "baseline": the plain LangChain tutorial recipe, kept to measure against
    chunk_size: int = 400
    chunk_overlap: int = 80
    k: int = 5
    # Passage tokens in the prompt where no time budget applies: sentences chosen to fill it; 0 = whole passages.
    context_tokens: int = 300
    # The time budget (ragqa/budget.py): passage tokens follow from the host's measured prefill rate so that
    # the first token comes in about this many seconds; None keeps context_tokens. On the eval's tune part
    # (evals/RESULTS.md, 2026-12-02) key facts fell from 62/110 at 300 tokens to 53/110 at 200: the floor.
    # At 800, 152 of the 153 evidence quotes retrieval found reached the prompt: past the cap there is
    # nothing left to bring in.
    ttft_target_s: float | None = 5.0
    context_floor: int = 300
    context_cap: int = 800
    # A question in another language than the documents is also put into theirs by the model (a short
    # call): retrieval searches both forms, focus scores sentences against both, the prompt shows both.
    translate_query: bool = True
    # A question that asks several things ("…多少？基线是多少？") is also split into its parts
    # (chain.question_parts): each part adds its own retrieval, focus keeps each part's best sentences, and the
    # prompt names the parts one by one so the model answers all of them.
    question_parts: bool = True
    # Opt-in: once the answer has streamed, each later part is asked again on its own, in the same conversation,
    # shown its best sentences of the retrieved passages that the first prompt left out (chain.part_passages).
    # Those calls come after the first word, so the time target does not bound their passages. On the eval's
    # tune part (2026-12-07) it repaired 1 of the 32 multi-part questions (14 against 13 right) for ~2.7 s more
    # per answer: the 1.5B mostly restated its first answer (evals/RESULTS.md).
    answer_parts: bool = False
    # Passages shown to an English question have Chinese counts written in English ("467亿" as "46.7
    # billion"): arithmetic the chain does so the model does not (textnorm.with_english_magnitudes).
    english_magnitudes: bool = True
    # How the answer is made. "write": the model writes it from the passages. "quote": the model only picks
    # the numbered passage sentences that answer (a choice a small model makes better than it writes), the
    # answer quotes them, and a question in another language than the quotes gets them rendered in its own.
    answer_mode: str = "write"
    # A question in another language than its passages (it was translated for retrieval). "direct": the model
    # answers in the question's language from the passages, shown both forms of the question. "translate": it
    # answers the translated question in the passages' own language, and that answer is then translated.
    cross_lingual_answer: str = "direct"
    # A number or Latin-letter name in a written answer that stands in no passage: the answer is written
    # once more with the passage sentence that holds the closest match; what still stands nowhere is marked.
    fact_check: bool = False
    focus_split_chars: int = 80  # focus cuts sentences longer than this at commas or spaces; 0 = never
    # Once a passage does not fit the budget whole, it and the ones after it take turns (each its best sentence
    # first) instead of the first of them taking all the room left (retrieve.focus, spread).
    focus_spread: bool = False
    focus_embed: bool = False  # also score sentences by embedding similarity (cross-lingual, ~2.5 s a question)
    fetch_k: int = 20
    rrf_k: int = 60
    embed_batch_size: int = 16
    embed_runtime: str = "auto"  # "auto" (ONNX export if present, else torch), "onnx" or "torch"; same vectors
    # "int8": the ONNX export's MatMul weights quantized (onnx_export.quantize_int8), ~2x the chunks/s at the
    # same evidence_recall@k (evals/RESULTS.md); other vectors than fp32, so the index records it.
    embed_precision: str = "fp32"
    embed_threads: int = 0  # ONNX Runtime / torch threads of the embedder; 0 = the host's physical cores
    # Generation.
    n_ctx: int = 4096
    n_threads: int = 2  # llama.cpp's, for the prompt and for generation (the embedder has embed_threads)
    gpu_layers: int = 0
    temperature: float = 0.0
    max_tokens: int = 400
    # "Not in the documents" when the answerability score reaches refusal_threshold; below it the model must
    # answer (llm.RefusalGate). The score is sigmoid(refusal_bias + refusal_check_weight * logit(check) +
    # refusal_sentinel_weight * logit(p)): `p` the model's probability of starting the answer with the refusal
    # sentinel, `check` its P("no") when asked whether the passages answer the question (one more call,
    # chain.QA.answerability_check; refusal_check_weight 0 skips it). The defaults make the score p itself,
    # at 0.50, which had the most right outcomes (answers with all key facts + unanswerable questions refused)
    # over the eval's tune part (evals/RESULTS.md, 2026-12-02). With the check (2026-12-07, tune part:
    # `ragqa eval calibrate` fits bias -0.62, check 0.85, sentinel 0.04, threshold 0.26) the two parts gave
    # no gain beyond the noise, for ~0.5 s more to the first word, so it is off. None: the model's own
    # greedy choice. Through a model server it needs the server's tokenizer and logprobs.
    refusal_threshold: float | None = SENTINEL_ONLY_THRESHOLD
    refusal_check_weight: float = 0.0
    refusal_sentinel_weight: float = 1.0
    refusal_bias: float = 0.0
    chat_format: str | None = None
    seed: int = 42
    prompt_cache: bool = True  # keep the KV state of the fixed system prompts on disk (home/cache)
    # llama.cpp's kernel settings. With kernel_probe "auto", a short probe measures them once per host, model
    # file and llama.cpp build and applies the fastest that keeps the arithmetic (ragqa/kernels.py); "off"
    # keeps these defaults. A key set in ragqa.toml, the environment or a flag wins over the probe.
    kernel_probe: str = "auto"
    repack: bool = False  # CPU weight repacking (llama.cpp's --no-repack turns it off)
    n_ubatch: int = 512  # tokens per llama.cpp compute step while evaluating a prompt
    flash_attn: bool = False  # changes attention's arithmetic: never chosen by the probe
    kv_type: str = "f16"  # "f16" or "q8_0" (K always; V only with flash_attn): never chosen by the probe
    # Remote services (scale-out).
    llm_url: str | None = None
    llm_model: str | None = None
    llm_timeout: float = 120.0  # seconds a model server may stay silent; generous: CPU servers queue requests
    api_key_env: str | None = None
    # Questions `ragqa serve` answers at once when the model is a server (llm_url): each has its own client, and
    # a server that batches (llama-server --parallel N) runs them together. An in-process model has one
    # llama.cpp context: one question at a time, whatever this says.
    serve_parallel: int = 4
    chroma_url: str | None = None
    chroma_token_env: str | None = None
    # The index's name on the Chroma server (its collection): another machine given the same URL and name
    # answers from it with nothing ingested there. Unset: the name kept in the local index directory.
    index_name: str | None = None
    # Seconds an ingest's lease on a server index lasts unless renewed: a writer that crashed holds the index
    # no longer than this, a live one renews it every third of it.
    lease_seconds: float = 60.0
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def index_dir(self) -> Path:
        if self.index:
            return Path(self.index)
        if self.index_name:  # the local cache of a named server index
            return Path(self.home) / "indexes" / check_index_name(self.index_name)
        return Path(self.home) / "index"

    @property
    def models_dir(self) -> Path:
        return Path(self.models) if self.models else Path(self.home) / "models"

    @property
    def embedder_threads(self) -> int:
        """`embed_threads`, or the physical cores when it is 0: a matrix kernel on a core's second hardware
        thread shares that core's vector units, so extra threads only add contention."""
        return self.embed_threads if self.embed_threads > 0 else physical_cores()

    def public_items(self) -> list[tuple[str, Any, str]]:
        """(key, value, source) for display, with derived paths filled in."""
        out = []
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            if f.name == "index":
                value = self.index_dir
            elif f.name == "models":
                value = self.models_dir
            out.append((f.name, value, self.sources.get(f.name, "default")))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v, _ in self.public_items()}

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.sources = {**self.sources, **{k: "override" for k in changes}}
        return new


def physical_cores() -> int:
    """Physical CPU cores this process may run on (Linux: distinct core ids in /proc/cpuinfo among the
    allowed CPUs); the logical count where that cannot be read."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        cpu = package = ""
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                cpu = value
            elif key == "physical id":
                package = value
            elif key == "core id" and cpu.isdigit() and int(cpu) in allowed:
                cores.add((package, value))
    except OSError:
        pass
    return max(1, len(cores) or len(allowed))


_INDEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{1,62}[A-Za-z0-9]")


def check_index_name(name: str) -> str:
    """A name that is both a Chroma collection name and a safe directory name, or one clear line."""
    if not _INDEX_NAME.fullmatch(name) or "__" in name:
        raise RagqaError(f"index name {name!r} must be 3-64 letters, digits, '-' or '_' (no '__'), "
                         "starting and ending with a letter or digit")
    return name


_HINTS = get_type_hints(Settings)
_KEYS = [f.name for f in fields(Settings) if f.name != "sources"]


def _coerce(key: str, raw: Any, origin: str) -> Any:
    """Convert a TOML/env/flag value to the field's type, with an error that names where it came from."""
    hint = _HINTS[key]
    optional = "None" in str(hint)
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
        return None
    try:
        if hint is bool or str(hint) == "bool":
            if isinstance(raw, bool):
                return raw
            word = str(raw).strip().lower()
            if word not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return word in ("1", "true", "yes", "on")
        if "Path" in str(hint):
            return Path(os.path.expanduser(str(raw)))
        if "int" in str(hint) and "float" not in str(hint):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if "float" in str(hint):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise RagqaError(f"invalid value {raw!r} for '{key}' ({origin})") from None


def config_file_path(env: dict[str, str]) -> Path | None:
    explicit = env.get(ENV_PREFIX + "CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise RagqaError(f"config file {path} (from RAGQA_CONFIG) does not exist")
        return path
    local = Path("ragqa.toml")
    return local if local.is_file() else None


def load_settings(overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Build the effective settings; `overrides` are command-line flags (None means "not given")."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    path = config_file_path(env)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RagqaError(f"cannot read config file {path}: {exc}") from None
        data = data.get("ragqa", data)
        for key, raw in data.items():
            if key not in _KEYS:
                raise RagqaError(f"unknown key '{key}' in {path} (known: {', '.join(_KEYS)})")
            values[key] = _coerce(key, raw, str(path))
            sources[key] = str(path)

    for key in _KEYS:
        name = ENV_PREFIX + key.upper()
        if name in env and name != ENV_PREFIX + "CONFIG":
            values[key] = _coerce(key, env[name], name)
            sources[key] = f"env {name}"

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in _KEYS:
            raise RagqaError(f"unknown setting '{key}'")
        values[key] = _coerce(key, raw, "flag")
        sources[key] = "flag"

    settings = Settings(**values)
    settings.sources = sources
    return settings
