"""Scoring of ragqa answers against a gold eval suite.

Everything here is a pure function of (question, result, corpus text) so that a results.jsonl written
months ago can be re-scored, and so the tests can pin each metric on hand-made records. The only I/O is
reading corpus files, because evidence quotes are stored as text while retrieval reports character
offsets: the two meet only once a quote has been located in its source file.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragqa.textnorm import MAGNITUDE, expand_magnitudes, normalize_text

ANSWERABLE_TYPES = ("factoid", "numeric", "multi", "summary")
QUESTION_TYPES = (*ANSWERABLE_TYPES, "negative")
LANG_ORDER = ("zh", "en")

RATE_METRICS = (
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
)
METRIC_KEYS = (*RATE_METRICS, "latency", "prompt_tokens")
LATENCY_PARTS = ("retrieve_ms", "ttft_ms", "total_ms")


@dataclass(frozen=True)
class Span:
    """A character range in one corpus file, named by basename so absolute and relative paths agree."""

    source: str
    start: int
    end: int

    def overlap(self, other: Span) -> int:
        if self.source != other.source:
            return 0
        return max(0, min(self.end, other.end) - max(self.start, other.start))


def basename(path: str) -> str:
    """Basename for either separator: results may come from another OS than the one scoring them."""
    return re.split(r"[\\/]", str(path))[-1]


def is_answerable(question: dict[str, Any]) -> bool:
    return question.get("type") != "negative"


class CorpusTexts:
    """Cache of decoded corpus files, because every question re-reads the same few large files."""

    def __init__(self, corpus_dir: Path | str) -> None:
        self.corpus_dir = Path(corpus_dir)
        self._texts: dict[str, str | None] = {}

    def text(self, name: str) -> str | None:
        """Decoded text of a corpus file by basename, or None if missing (a bad suite must still run)."""
        name = basename(name)
        if name not in self._texts:
            try:
                data = (self.corpus_dir / name).read_bytes()
            except OSError:
                data = None
            self._texts[name] = None if data is None else decode_like_ingest(data, name)
        return self._texts[name]


def decode_like_ingest(data: bytes, name: str) -> str | None:
    """Decode exactly as ingestion does (retrieval offsets index that text); None for what ingest skips."""
    from ragqa.ingest import SkipFile, decode

    try:
        return decode(data, name)
    except SkipFile:
        return None


def _loose_pattern(quote: str) -> re.Pattern[str] | None:
    """A pattern tolerating whitespace differences, since quotes get re-wrapped when copied by hand."""
    chars = [re.escape(c) for c in quote if not c.isspace()]
    if not chars:
        return None
    return re.compile(r"\s*".join(chars))


def locate_quote(quote: str, sources: Sequence[str], corpus: CorpusTexts) -> Span | None:
    """Span of the first occurrence of `quote` in the first listed source file that holds it.

    Exact match first; a whitespace-insensitive match is the fallback so that a quote differing only in
    line wrapping still counts rather than silently scoring as "not retrieved".
    """
    for src in sources:
        text = corpus.text(src)
        if text is None or not quote:
            continue
        pos = text.find(quote)
        if pos >= 0:
            return Span(basename(src), pos, pos + len(quote))
    pattern = _loose_pattern(quote)
    if pattern is None:
        return None
    for src in sources:
        text = corpus.text(src)
        if text is None:
            continue
        m = pattern.search(text)
        if m:
            return Span(basename(src), m.start(), m.end())
    return None


def locate_evidence(question: dict[str, Any], corpus: CorpusTexts) -> list[Span | None]:
    """One span (or None when not found) per evidence quote, in the suite's order."""
    sources = list(question.get("source") or [])
    return [locate_quote(q, sources, corpus) for q in question.get("evidence") or []]


def chunk_span(chunk: dict[str, Any]) -> Span | None:
    """Span of a retrieved chunk or citation; None if the pipeline gave something unusable."""
    try:
        return Span(basename(chunk["source"]), int(chunk["start"]), int(chunk["end"]))
    except (KeyError, TypeError, ValueError):
        return None


def covers(chunk: Span | None, quote: Span | None) -> bool:
    """Whether one chunk holds at least half of a quote: a split quote counts by its larger half."""
    if chunk is None or quote is None:
        return False
    length = quote.end - quote.start
    return length > 0 and 2 * chunk.overlap(quote) >= length


def covers_any(chunk: Span | None, quotes: Iterable[Span | None]) -> bool:
    return any(covers(chunk, q) for q in quotes)


_SPACE = re.compile(r"\s+")


def missing_key_facts(answer: str, must_include: Sequence[str]) -> list[str]:
    """Key facts the answer lacks. A key fact with a magnitude (80亿, 8 billion) also matches the same
    value in the other language's magnitude; one without (1.5) matches as written, so that "1.5" is
    still found in "1.5 billion"."""
    norm = normalize_text(answer)
    expanded = None
    missing = []
    for k in must_include:
        key = normalize_text(k)
        if key in norm:
            continue
        if MAGNITUDE.search(key):
            expanded = expanded if expanded is not None else expand_magnitudes(norm)
            if expand_magnitudes(key) in expanded:
                continue
        missing.append(k)
    return missing


# [n], [n, m], [n-m] and CJK forms (lenticular brackets, full-width comma, ideographic comma);
# written as escapes to keep the source ASCII-unambiguous.
_MARKER = re.compile("[\\[\u3010]\\s*(\\d+(?:\\s*[,\uff0c\u3001;\uff1b\\-\u2013]\\s*\\d+)*)\\s*[\\]\u3011]")


def citation_markers(answer: str) -> list[int]:
    """Every number inside [n] / [n, m] / [n][m] / 【n】 markers, in order of appearance."""
    text = unicodedata.normalize("NFKC", answer)
    return [int(n) for m in _MARKER.finditer(text) for n in re.findall(r"\d+", m.group(1))]


def invalid_citations(result: dict[str, Any]) -> list[int | str]:
    """Citation numbers that do not point at what was retrieved.

    Markers in the answer text are checked as well as the citations list, because a model can print
    "[7]" when only five chunks were given and the pipeline may silently drop it from the list.
    """
    retrieved = prompt_passages(result)
    bad: list[int | str] = []
    for n in citation_markers(result.get("answer") or ""):
        if not 1 <= n <= len(retrieved) and n not in bad:
            bad.append(n)
    for cit in result.get("citations") or []:
        n = cit.get("n") if isinstance(cit, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(retrieved):
            label: int | str = n if isinstance(n, int) and not isinstance(n, bool) else repr(n)
        elif chunk_span(cit) is None or chunk_span(cit) != chunk_span(retrieved[n - 1]):
            label = n
        else:
            continue
        if label not in bad:
            bad.append(label)
    return bad


def prompt_passages(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The passages the model saw, numbered as its citations are: `context` in results written since
    `retrieved` became what retrieval found; before that, `retrieved` with each passage's focused text."""
    if isinstance(result.get("context"), list):
        return result["context"]
    return [{**r, "text": r.get("context") or r.get("text") or ""} for r in result.get("retrieved") or []]


def quote_in_passage(quote: Span | None, passage: dict[str, Any], corpus: CorpusTexts) -> bool:
    """Whether the model saw a quote: the passage covers it (see `covers`) and the part of the quote inside
    the passage's chunk still stands in the text given to the model, which focus may have cut to a few
    sentences. Compared without whitespace, since focus strips the sentences it joins."""
    span = chunk_span(passage)
    if quote is None or not covers(span, quote):
        return False
    text = corpus.text(quote.source)
    if text is None:
        return False
    part = text[max(quote.start, span.start) : min(quote.end, span.end)]
    shown = str(passage.get("text") or "")
    return _SPACE.sub("", part) in _SPACE.sub("", shown)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# Where a question was lost, in the order the pipeline loses it. A right answer is "right" wherever
# retrieval stood (the key facts can stand in a passage the gold quotes do not name).
FUNNEL_ANSWERABLE = ("not_retrieved", "cut", "refused", "incomplete", "right")
FUNNEL_NEGATIVE = ("refused", "answered")
FUNNEL_LABELS = {
    "not_retrieved": "not retrieved",
    "cut": "cut before the prompt",
    "refused": "refused",
    "incomplete": "answered without all key facts",
    "right": "right",
    "answered": "answered (should refuse)",
    "prompt": "evidence in the prompt (no answer asked)",
    "error": "error",
}


def funnel_stage(
    answerable: bool,
    retrieved: bool,
    in_prompt: bool | None,
    refused: bool | None,
    key_facts_ok: bool | None,
    error: str | None = None,
    retrieval_only: bool = False,
) -> str:
    """The stage of FUNNEL_ANSWERABLE / FUNNEL_NEGATIVE a question ended in ("error" when it failed)."""
    if error:
        return "error"
    if not answerable:
        if retrieval_only or refused is None:
            return "not_run"
        return "refused" if refused else "answered"
    if retrieval_only:
        return "right" if retrieved else "not_retrieved"
    if key_facts_ok and not refused:
        return "right"
    if not retrieved:
        return "not_retrieved"
    if in_prompt is False:
        return "cut"
    if refused is None:
        return "prompt"  # a context-only run: the passages were fitted, no answer was asked for
    return "refused" if refused else "incomplete"


def wilson_interval(k: float, n: float, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a rate k/n: unlike the normal approximation it stays inside [0, 1]
    and is honest at the small counts of a per-language or per-type group."""
    if not n:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score_question(
    question: dict[str, Any],
    result: dict[str, Any],
    corpus: CorpusTexts,
    retrieval_only: bool = False,
    error: str | None = None,
) -> dict[str, Any]:
    """Per-question scores; a field is None where the metric does not apply to this question.

    An errored question in a full run is scored as an empty, non-refused answer so that failures
    drag key-fact accuracy down instead of vanishing from its denominator.
    """
    answerable = is_answerable(question)
    quotes = locate_evidence(question, corpus) if answerable else []
    located = [q for q in quotes if q is not None]
    retrieved = result.get("retrieved") or []
    spans = [chunk_span(c) for c in retrieved]

    covered = [any(covers(s, q) for s in spans) for q in quotes]
    passages = prompt_passages(result)
    seen = [any(quote_in_passage(q, p, corpus) for p in passages) for q in quotes]
    covering_ranks = [i + 1 for i, s in enumerate(spans) if covers_any(s, located)]
    has_evidence = answerable and bool(quotes)

    answer = result.get("answer")
    answered = not retrieval_only and (answer is not None or error is not None)
    answer_text = answer if isinstance(answer, str) else ""
    refused: bool | None = bool(result.get("refused")) if answered else None

    must = list(question.get("must_include") or []) if answerable else []
    missing = missing_key_facts(answer_text, must) if answered and answerable else []

    bad_cits = invalid_citations(result) if answer is not None else []
    cited = {
        c["n"]
        for c in result.get("citations") or []
        if isinstance(c, dict) and isinstance(c.get("n"), int) and c["n"] not in bad_cits
    }
    support: bool | None = None
    if answerable and answer is not None and not refused and located:
        shown = [chunk_span(p) for p in passages]
        support = any(n - 1 < len(shown) and covers_any(shown[n - 1], located) for n in cited)
    in_prompt = all(seen) if has_evidence and not retrieval_only else None
    marks = result.get("grounding")
    faithful = all(bool(m.get("supported")) for m in marks) if answer is not None and not refused and marks else None
    key_facts_ok = (not missing) if answered and answerable else None

    timings = result.get("timings") or {}
    ttft, total = _num(timings.get("ttft_ms")), _num(timings.get("total_ms"))
    completion = _num(timings.get("completion_tokens"))
    gen_tok_s = None  # tokens after the first, over the time after the first: a refusal's one token says nothing
    if completion is not None and completion >= 2 and ttft is not None and total is not None and total > ttft:
        gen_tok_s = (completion - 1) / ((total - ttft) / 1000)

    return {
        "answerable": answerable,
        "error": error,
        "evidence": [
            {
                "quote": text,
                "source": s.source if s else None,
                "start": s.start if s else None,
                "end": s.end if s else None,
                "found": s is not None,
                "retrieved": hit,
                "in_prompt": saw if not retrieval_only else None,
            }
            for text, s, hit, saw in zip(question.get("evidence") or [], quotes, covered, seen, strict=False)
        ],
        "n_quotes": len(quotes),
        "quotes_covered": sum(covered),
        "quotes_in_prompt": sum(seen) if not retrieval_only else None,
        "hit": all(covered) if has_evidence else None,
        "in_prompt": in_prompt,
        "rr": (1 / covering_ranks[0] if covering_ranks else 0.0) if has_evidence else None,
        "covering_ranks": covering_ranks,
        "n_keys": len(must),
        "keys_found": len(must) - len(missing),
        "missing_keys": missing,
        "key_facts_ok": key_facts_ok,
        "refused": refused,
        "stage": funnel_stage(answerable, has_evidence and all(covered), in_prompt, refused, key_facts_ok,
                              error, retrieval_only),
        "citation_valid": (not bad_cits) if answer is not None else None,
        "invalid_citations": bad_cits,
        "citation_support": support,
        "faithful": faithful,
        "refusal_p": _num(result.get("refusal_p")),
        "refusal_check": _num(result.get("refusal_check")),
        "refusal_score": _num(result.get("refusal_score")),
        "retrieve_ms": _num(timings.get("retrieve_ms")),
        "ttft_ms": ttft,
        "total_ms": total,
        "prompt_tokens": _num(timings.get("prompt_tokens")),
        "completion_tokens": completion,
        "gen_tok_s": gen_tok_s,
    }


def judge(scores: dict[str, Any], retrieval_only: bool = False) -> tuple[bool, list[str]]:
    """(correct, reasons): the verdict that compare and the report's failed list are built on.

    Reasons list every problem seen, most decisive first, so a correct answer may still carry
    warnings such as an invalid citation.
    """
    reasons: list[str] = []
    if scores.get("error"):
        reasons.append(f"error: {scores['error']}")
    if scores["answerable"]:
        if scores.get("refused"):
            reasons.append("refused an answerable question")
        if scores.get("missing_keys"):
            reasons.append("missing key facts: " + ", ".join(scores["missing_keys"]))
        if scores.get("hit") is False:
            lost = [e["quote"] for e in scores["evidence"] if not e["retrieved"]]
            reasons.append("evidence not retrieved: " + " | ".join(lost))
        not_found = [e["quote"] for e in scores["evidence"] if not e["found"]]
        if not_found:
            reasons.append("evidence quote not found in corpus: " + " | ".join(not_found))
        if scores.get("citation_support") is False:
            reasons.append("no citation points at evidence")
        if not retrieval_only and scores.get("key_facts_ok") is None and not scores.get("error"):
            reasons.append("no answer")
        if retrieval_only:
            correct = scores.get("hit") is not False and not scores.get("error")
        else:
            correct = scores.get("key_facts_ok") is True and not scores.get("refused")
    else:
        if scores.get("refused") is False:
            reasons.append("answered a negative question")
        # A retrieval-only run cannot refuse, so a negative question has nothing to get wrong.
        correct = not scores.get("error") if retrieval_only else scores.get("refused") is True
    if scores.get("invalid_citations"):
        reasons.append("invalid citation " + " ".join(f"[{n}]" for n in scores["invalid_citations"]))
    return bool(correct), reasons


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linearly interpolated percentile (numpy's default), None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def aggregate(scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics over a group of per-question scores; None wherever the denominator is empty.

    Each rate also has its count (`counts`: [k, n]) and a 95% Wilson interval (`ci95`), because with
    greedy decoding one answer flips on a tiny change: 0.62 means little without 31/50 beside it.
    """
    ans = [s for s in scores if s["answerable"]]
    neg = [s for s in scores if not s["answerable"]]
    with_quotes = [s for s in ans if s["n_quotes"]]
    judged = [s for s in ans if s["key_facts_ok"] is not None]
    grounded = [s for s in judged if s.get("faithful") is not None]  # answered: a refusal has no grounding mark
    prompted = [s for s in with_quotes if s.get("quotes_in_prompt") is not None]

    def flags(group: Iterable[dict[str, Any]], key: str) -> tuple[float, int]:
        got = [bool(s[key]) for s in group if s.get(key) is not None]
        return float(sum(got)), len(got)

    def values(key: str) -> list[float]:
        return [s[key] for s in scores if s.get(key) is not None]

    counts: dict[str, tuple[float, int]] = {
        "evidence_recall@k": (
            float(sum(s["quotes_covered"] for s in with_quotes)), sum(s["n_quotes"] for s in with_quotes)
        ),
        "evidence_in_prompt": (
            float(sum(s["quotes_in_prompt"] for s in prompted)), sum(s["n_quotes"] for s in prompted)
        ),
        "hit@k": flags(ans, "hit"),
        "key_fact_accuracy": flags(judged, "key_facts_ok"),
        "key_fact_recall": (float(sum(s["keys_found"] for s in judged)), sum(s["n_keys"] for s in judged)),
        "negative_rejection": flags(neg, "refused"),
        "false_refusal": flags(ans, "refused"),
        "citation_validity": flags(scores, "citation_valid"),
        "citation_support": flags(ans, "citation_support"),
        "faithfulness": flags(scores, "faithful"),
        # What the cheap grounding mark is worth as a signal: on answered answerable questions, how often
        # "every sentence supported" agrees with the key-fact judgement (right and supported, or wrong and not).
        "grounding_agreement": (
            float(sum(bool(s["faithful"]) == bool(s["key_facts_ok"]) for s in grounded)), len(grounded)
        ),
    }
    latency: dict[str, Any] = {
        part: {"p50": percentile(values(part), 50), "p95": percentile(values(part), 95)}
        for part in LATENCY_PARTS
    }
    latency["gen_tok_s"] = _mean(values("gen_tok_s"))
    out: dict[str, Any] = {"n": len(scores)}
    for key in RATE_METRICS:
        if key == "mrr":
            out[key] = _mean([s["rr"] for s in ans if s["rr"] is not None])
        else:
            out[key] = _ratio(*counts[key])
    out["latency"] = latency
    out["prompt_tokens"] = _mean(values("prompt_tokens"))
    out["counts"] = {key: [int(k), n] for key, (k, n) in counts.items()}
    out["ci95"] = {key: wilson_interval(k, n) for key, (k, n) in counts.items()}
    out["funnel"] = funnel_counts(scores)
    return out


def funnel_counts(scores: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """How many questions ended in each stage, answerable and unanswerable apart, stages in order."""
    answerable = {stage: 0 for stage in FUNNEL_ANSWERABLE}
    negative = {stage: 0 for stage in FUNNEL_NEGATIVE}
    for s in scores:
        stage = s.get("stage") or "error"
        group = answerable if s["answerable"] else negative
        group[stage] = group.get(stage, 0) + 1
    return {"answerable": answerable, "negative": negative}


def recorded_score(s: dict[str, Any]) -> float | None:
    """The score a run decided its refusals on: the answerability score, or the first-token sentinel
    probability in runs that recorded no score."""
    return s.get("refusal_score") if s.get("refusal_score") is not None else s.get("refusal_p")


def refusal_sweep(
    scores: Sequence[dict[str, Any]],
    run_threshold: float | None,
    steps: int = 20,
    value: Callable[[dict[str, Any]], float] | None = None,
) -> list[dict[str, Any]]:
    """negative_rejection, false_refusal and key_fact_accuracy had the refusal been decided at each
    threshold t of the answerability score (llm.RefusalGate; `value`: the recorded one, or another score of
    each question, as evals.calibrate's fitted one), from one run's records.

    A question is refused at t when its score reaches t, or when the run refused it by other means
    (in words, or by its gate below the run's own threshold). Exact for t up to the run's threshold:
    above it a question the run refused has no answer to score, so key facts are left out there. A run
    with threshold above 1 (the sentinel never allowed) gives the whole curve.
    """
    limit = 1.0 if run_threshold is None else run_threshold
    rows = []
    for i in range(1, steps):
        t = i / steps
        neg, ans, kfa, exact = [0, 0], [0, 0], [0, 0], t <= limit
        for s in scores:
            recorded = recorded_score(s)
            if recorded is None or s.get("refused") is None:
                continue
            other = bool(s["refused"]) and (run_threshold is None or recorded < run_threshold)
            refused = (recorded if value is None else value(s)) >= t or other
            if s["answerable"]:
                ans[0] += refused
                ans[1] += 1
                # an answer the run refused holds no key facts, whatever its refusal text names nearby
                kfa[0] += (not refused) and not s["refused"] and bool(s.get("key_facts_ok"))
                kfa[1] += 1
            else:
                neg[0] += refused
                neg[1] += 1
        rows.append({
            "threshold": t,
            "negative_rejection": neg[0] / neg[1] if neg[1] else None,
            "false_refusal": ans[0] / ans[1] if ans[1] else None,
            "key_fact_accuracy": kfa[0] / kfa[1] if kfa[1] and exact else None,
            "counts": {"negative_rejection": neg, "false_refusal": ans, "key_fact_accuracy": kfa},
        })
    return [r for r in rows if r["counts"]["false_refusal"][1] or r["counts"]["negative_rejection"][1]]


def _ordered(keys: Iterable[str], preferred: Sequence[str]) -> list[str]:
    present = set(keys)
    return [k for k in preferred if k in present] + sorted(present - set(preferred))


def summarize(records: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Overall, per-language and per-type metrics of scored records (each needs "lang", "type", "scores")."""

    def group(key: str, order: Sequence[str]) -> dict[str, Any]:
        names = _ordered((str(r.get(key)) for r in records), order)
        return {name: aggregate([r["scores"] for r in records if str(r.get(key)) == name]) for name in names}

    return {
        "n": len(records),
        "overall": aggregate([r["scores"] for r in records]),
        "refusal_sweep": refusal_sweep([r["scores"] for r in records], config.get("refusal_threshold")),
        "by_lang": group("lang", LANG_ORDER),
        "by_type": group("type", QUESTION_TYPES),
        "config": config,
    }
