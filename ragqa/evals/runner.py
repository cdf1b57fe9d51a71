"""Running an eval suite through the pipeline, and comparing two runs.

The runner knows nothing about how a question gets answered: the caller passes `ask_fn`, so the same
loop serves full runs, retrieval-only runs and tests with a fake pipeline.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from ragqa.errors import RagqaError
from ragqa.evals.metrics import (
    LATENCY_PARTS,
    QUESTION_TYPES,
    RATE_METRICS,
    CorpusTexts,
    judge,
    locate_evidence,
    score_question,
    summarize,
)
from ragqa.evals.report import (
    format_value,
    funnel_rows,
    interval_rows,
    summary_columns,
    summary_rows,
    write_report,
)

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"

_LIST_FIELDS = ("source", "evidence", "must_include")
# Defaults are tuned on "tune" only; every figure ragqa claims is "test"'s (evals/split.py assigned them once).
SPLITS = ("tune", "test")


class EvalFileError(RagqaError):
    """An eval suite that cannot be read; the message names file:line so it can be fixed by hand."""


def _check_question(obj: Any, where: str, seen: dict[str, str]) -> dict[str, Any]:
    """Validate one parsed line; strict on shape because a typo would otherwise skew every metric."""
    if not isinstance(obj, dict):
        raise EvalFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "question", "lang", "type", *_LIST_FIELDS):
        if key not in obj:
            raise EvalFileError(f"{where}: missing field {key!r}")
    for key in ("id", "question", "lang"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise EvalFileError(f"{where}: field {key!r} must be a non-empty string")
    if obj["type"] not in QUESTION_TYPES:
        raise EvalFileError(
            f"{where}: field 'type' is {obj['type']!r}, expected one of {', '.join(QUESTION_TYPES)}"
        )
    for key in _LIST_FIELDS:
        value = obj[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise EvalFileError(f"{where}: field {key!r} must be a list of non-empty strings")
    if "answer" in obj and obj["answer"] is not None and not isinstance(obj["answer"], str):
        raise EvalFileError(f"{where}: field 'answer' must be a string")
    if obj["type"] != "negative" and obj["evidence"] and not obj["source"]:
        raise EvalFileError(f"{where}: evidence is given but 'source' is empty")
    if "split" in obj and obj["split"] not in SPLITS:
        raise EvalFileError(f"{where}: field 'split' is {obj['split']!r}, expected one of {', '.join(SPLITS)}")
    if obj["id"] in seen:
        raise EvalFileError(f"{where}: duplicate id {obj['id']!r} (first at {seen[obj['id']]})")
    seen[obj["id"]] = where
    return obj


def load_suite(
    path: Path | str | Sequence[Path | str], limit: int | None = None, split: str | None = None
) -> list[dict[str, Any]]:
    """Questions of one or more JSONL eval files, validated up front so a bad line fails before any model
    runs; `split` ("tune", "test", or None/"all" for every question) keeps that part of the suite."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise EvalFileError("no eval file given")
    if split not in (None, "all", *SPLITS):
        raise EvalFileError(f"--split is {split!r}, expected one of {', '.join((*SPLITS, 'all'))}")
    questions: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for one in paths:
        questions += _read_suite(one, seen)
    if split in SPLITS:
        unsplit = [q["id"] for q in questions if "split" not in q]
        if unsplit:
            raise EvalFileError(
                f"--split {split}: {len(unsplit)} questions record no split (first: {unsplit[0]}); "
                "run evals/split.py or use --split all"
            )
        questions = [q for q in questions if q["split"] == split]
        if not questions:
            raise EvalFileError(f"no questions of split {split!r} in {', '.join(map(str, paths))}")
    if limit is not None:
        if limit < 1:
            raise EvalFileError(f"--limit must be at least 1, got {limit}")
        questions = questions[:limit]
    return questions


def _read_suite(path: Path, seen: dict[str, str]) -> list[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EvalFileError(f"cannot read eval file {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise EvalFileError(f"{path}:{line}: not valid UTF-8") from exc
    questions: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalFileError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        questions.append(_check_question(obj, where, seen))
    if not questions:
        raise EvalFileError(f"{path}: no questions in eval file")
    return questions


def _error_result(question: dict[str, Any], message: str) -> dict[str, Any]:
    """A result of the `ask --json` shape for a question the pipeline failed on."""
    return {
        "question": question["question"],
        "answer": None,
        "refused": None,
        "citations": [],
        "retrieved": [],
        "context": [],
        "model": None,
        "timings": {
            "retrieve_ms": None,
            "ttft_ms": None,
            "total_ms": None,
            "prompt_tokens": None,
            "completion_tokens": None,
        },
        "error": message,
    }


def make_record(
    question: dict[str, Any],
    result: dict[str, Any],
    corpus: CorpusTexts,
    retrieval_only: bool = False,
    error: str | None = None,
) -> dict[str, Any]:
    """One results.jsonl line: the ask result plus gold data, so the file alone can be re-scored."""
    scores = score_question(question, result, corpus, retrieval_only=retrieval_only, error=error)
    correct, reasons = judge(scores, retrieval_only=retrieval_only)
    return {
        **result,
        "id": question["id"],
        "lang": question["lang"],
        "type": question["type"],
        "split": question.get("split"),
        "tags": question.get("tags") or [],
        "gold": {k: question.get(k) for k in ("answer", "source", "evidence", "must_include")},
        "scores": scores,
        "correct": correct,
        "reasons": reasons,
    }


def _tally(records: Sequence[dict[str, Any]], retrieval_only: bool) -> str:
    ok = sum(1 for r in records if r["correct"])
    parts = [f"[green]ok {ok}[/] / [red]fail {len(records) - ok}[/]"]
    judged = [r["scores"]["key_facts_ok"] for r in records if r["scores"]["key_facts_ok"] is not None]
    if judged and not retrieval_only:
        parts.append(f"key facts {sum(judged)}/{len(judged)}")
    hits = [r["scores"]["hit"] for r in records if r["scores"]["hit"] is not None]
    if hits:
        parts.append(f"hit {sum(hits)}/{len(hits)}")
    ttfts = [r["scores"]["ttft_ms"] for r in records if r["scores"]["ttft_ms"] is not None]
    if ttfts:
        parts.append(f"ttft {sum(ttfts) / len(ttfts):.0f} ms")
    return "  ".join(parts)


def _warn_unlocatable(questions: Sequence[dict[str, Any]], corpus: CorpusTexts, console: Console) -> None:
    """Say up front which gold quotes cannot be found, since they will count as never retrieved."""
    for q in questions:
        if q["type"] == "negative":
            continue
        missing = [s for s in q["source"] if corpus.text(s) is None]
        if missing:
            console.print(
                f"[yellow]warning:[/] {q['id']}: source file not in {corpus.corpus_dir}: "
                + ", ".join(missing),
                markup=True,
                highlight=False,
            )
        for quote, span in zip(q["evidence"], locate_evidence(q, corpus), strict=False):
            if span is None and not missing:
                console.print(
                    f"[yellow]warning:[/] {q['id']}: evidence quote not found in its source: {quote!r}",
                    highlight=False,
                )


def run_suite(
    questions: list[dict[str, Any]],
    ask_fn: Callable[[dict[str, Any]], dict[str, Any]],
    out_dir: Path,
    corpus_dir: Path,
    config: dict[str, Any],
    console: Console | None = None,
    retrieval_only: bool = False,
) -> dict[str, Any]:
    """Ask every question, score it, and write results.jsonl, summary.json and report.html to out_dir.

    results.jsonl is flushed after each question so a crash or Ctrl-C loses nothing; on Ctrl-C the run
    stops, the summary covers the questions done so far and carries "interrupted": true.
    """
    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = CorpusTexts(corpus_dir)
    _warn_unlocatable(questions, corpus, console)
    config = {**config, "retrieval_only": retrieval_only}
    records: list[dict[str, Any]] = []
    interrupted = False
    started = time.perf_counter()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]eval[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[tally]}"),
        console=console,
        transient=False,
    )
    with (out_dir / RESULTS_FILE).open("w", encoding="utf-8") as fh, progress:
        task = progress.add_task("eval", total=len(questions), tally="")
        try:
            for question in questions:
                error = None
                try:
                    result = ask_fn(question)
                    if not isinstance(result, dict):
                        raise RagqaError(f"pipeline returned {type(result).__name__}, not a result object")
                except RagqaError as exc:
                    error = str(exc) or type(exc).__name__
                    result = _error_result(question, error)
                    progress.console.print(f"[red]error[/] {question['id']}: {error}", highlight=False)
                record = make_record(question, result, corpus, retrieval_only=retrieval_only, error=error)
                records.append(record)
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                fh.flush()
                progress.update(task, advance=1, tally=_tally(records, retrieval_only))
        except KeyboardInterrupt:
            interrupted = True
    config["wall_s"] = round(time.perf_counter() - started, 3)
    summary = summarize(records, config)
    summary["interrupted"] = interrupted
    summary["n_planned"] = len(questions)
    (out_dir / SUMMARY_FILE).write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    report = write_report(out_dir, summary, records)
    if interrupted:
        console.print(
            f"[yellow]interrupted after {len(records)}/{len(questions)} questions; "
            "results so far were written[/]"
        )
    print_summary(summary, console)
    console.print(
        f"results: {out_dir / RESULTS_FILE}\nsummary: {out_dir / SUMMARY_FILE}\nreport:  {report}",
        highlight=False,
    )
    return summary


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The metric table with a column per group, so language and type gaps are visible at a glance."""
    columns = summary_columns(summary)
    for title, first, rows in ((f"ragqa eval — {summary['n']} questions", "metric", summary_rows(summary, columns)),
                               ("where each question ended (funnel)", "stage", funnel_rows(summary, columns))):
        table = Table(title=title, title_style="bold")
        table.add_column(first, style="bold")
        for label, _group in columns:
            table.add_column(label, justify="right")
        for label, cells in rows:
            table.add_row(label, *cells)
        console.print(table)
    overall = Table(title="overall, with 95% intervals (Wilson)", title_style="bold")
    for col in ("metric", "rate k/n", "95% interval"):
        first = col == "metric"
        overall.add_column(col, style="bold" if first else None, justify="left" if first else "right")
    for row in interval_rows(summary.get("overall") or {}):
        overall.add_row(*row)
    console.print(overall)


def _load_run(run_dir: Path | str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    run_dir = Path(run_dir)
    summary_path, results_path = run_dir / SUMMARY_FILE, run_dir / RESULTS_FILE
    for p in (summary_path, results_path):
        if not p.is_file():
            raise RagqaError(
                f"{run_dir} is not an eval run directory: {p.name} is missing (run `ragqa eval` first)"
            )
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RagqaError(f"cannot read {summary_path}: {exc}") from exc
    records: dict[str, dict[str, Any]] = {}
    with results_path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                records[str(rec["id"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RagqaError(f"{results_path}:{lineno}: not a results record ({exc})") from exc
    return summary, records


# Metrics where a drop is an improvement; every other rate is better when higher.
_LOWER_IS_BETTER = ("false_refusal", "latency", "ms", "prompt tokens")


def _delta_cell(label: str, a: Any, b: Any, percent: bool) -> Text:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return Text("—", style="dim")
    d = b - a
    if abs(d) < 1e-12:
        return Text("0", style="dim")
    if label == "n":
        return Text(f"{d:+.0f}")
    better = (d < 0) if any(k in label for k in _LOWER_IS_BETTER) else (d > 0)
    text = f"{d * 100:+.1f} pt" if percent else f"{d:+.1f}"
    return Text(text, style="green" if better else "red")


def _flat_metrics(group: dict[str, Any] | None) -> list[tuple[str, Any, bool]]:
    """(label, value, is_rate) rows of one metric group, with latency flattened for diffing."""
    group = group or {}
    rows: list[tuple[str, Any, bool]] = [("n", group.get("n"), False)]
    rows += [(k, group.get(k), True) for k in RATE_METRICS]
    lat = group.get("latency") or {}
    for part in LATENCY_PARTS:
        for p in ("p50", "p95"):
            rows.append((f"{part} {p}", (lat.get(part) or {}).get(p), False))
    rows.append(("gen tok/s", lat.get("gen_tok_s"), False))
    rows.append(("prompt tokens", group.get("prompt_tokens"), False))
    return rows


# Short headers so the per-group table fits an 120-column terminal.
_GROUP_METRICS = {
    "evidence_recall@k": "recall",
    "hit@k": "hit",
    "mrr": "mrr",
    "key_fact_accuracy": "key facts",
    "negative_rejection": "neg rej",
    "false_refusal": "false ref",
    "citation_validity": "cit valid",
    "citation_support": "cit supp",
    "faithfulness": "faithful",
    "grounding_agreement": "grnd agree",
}


def _arrow_cell(label: str, a: Any, b: Any) -> Text:
    """ "A→B" in percent (MRR as a fraction), coloured by whether the change is an improvement."""

    def fmt(v: Any) -> str:
        if not isinstance(v, (int, float)):
            return "—"
        return f"{v:.3f}" if label == "mrr" else f"{v * 100:.1f}"

    if fmt(a) == fmt(b):
        return Text(fmt(a), style="dim")
    text = Text(f"{fmt(a)}→{fmt(b)}")
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        better = (b < a) if any(k in label for k in _LOWER_IS_BETTER) else (b > a)
        text.stylize("green" if better else "red")
    return text


def compare(a_dir: Path | str, b_dir: Path | str, console: Console | None = None) -> dict[str, Any]:
    """Print two runs side by side with B - A, and the questions whose verdict flipped.

    Returns the flipped ids too, so callers (and tests) need not parse the printed tables.
    """
    console = console or Console()
    sum_a, rec_a = _load_run(a_dir)
    sum_b, rec_b = _load_run(b_dir)
    table = Table(title=f"overall   A = {a_dir}   B = {b_dir}", title_style="bold")
    for col in ("metric", "A", "B", "B-A"):
        table.add_column(
            col, justify="left" if col == "metric" else "right", style="bold" if col == "metric" else None
        )
    for (label, va, is_rate), (_l, vb, _r) in zip(
        _flat_metrics(sum_a.get("overall")), _flat_metrics(sum_b.get("overall")), strict=True
    ):
        table.add_row(
            label, format_value(label, va), format_value(label, vb), _delta_cell(label, va, vb, is_rate)
        )
    console.print(table)

    by_group = Table(title="by group: A→B (rates in %)", title_style="bold")
    by_group.add_column("group", style="bold")
    by_group.add_column("n", justify="right")
    for header in _GROUP_METRICS.values():
        by_group.add_column(header, justify="right")
    for kind in ("by_lang", "by_type"):
        ga, gb = sum_a.get(kind) or {}, sum_b.get(kind) or {}
        for name in list(ga) + [n for n in gb if n not in ga]:
            a, b = ga.get(name) or {}, gb.get(name) or {}
            n_a, n_b = a.get("n", "—"), b.get("n", "—")
            cells: list[str | Text] = [str(n_a) if n_a == n_b else f"{n_a}→{n_b}"]
            cells += [_arrow_cell(k, a.get(k), b.get(k)) for k in _GROUP_METRICS]
            by_group.add_row(name, *cells)
    console.print(by_group)

    common = [qid for qid in rec_a if qid in rec_b]
    paired = paired_differences([rec_a[q] for q in common], [rec_b[q] for q in common])
    noise = Table(title=f"paired on the {len(common)} questions in both runs: is B-A beyond the noise?",
                  title_style="bold")
    for col in ("metric", "A", "B", "B-A", "95% interval", "beyond noise"):
        noise.add_column(col, style="bold" if col == "metric" else None, justify="left" if col == "metric" else "right")
    for name, row in paired.items():
        lo, hi = row["ci95"]
        noise.add_row(
            name, f"{row['a'][0]}/{row['a'][1]}", f"{row['b'][0]}/{row['b'][1]}", f"{row['diff']:+.3f}",
            f"{lo:+.3f} to {hi:+.3f}", Text("yes", style="bold") if row["beyond_noise"] else Text("no", style="dim"),
        )
    console.print(noise)
    moves = stage_moves([rec_a[q] for q in common], [rec_b[q] for q in common])
    console.print(Text(f"questions that moved between funnel stages: {sum(len(v) for v in moves.values())}",
                       style="bold"))
    for (was, now), ids in moves.items():
        console.print(Text.assemble(f"  {was} → {now}: ", (str(len(ids)), "bold"), f"  {' '.join(ids)}"))
    a_only = [qid for qid in common if rec_a[qid].get("correct") and not rec_b[qid].get("correct")]
    b_only = [qid for qid in common if rec_b[qid].get("correct") and not rec_a[qid].get("correct")]
    for title, ids, style in (
        ("right in A, wrong in B", a_only, "red"),
        ("right in B, wrong in A", b_only, "green"),
    ):
        console.print(Text(f"{title}: {len(ids)}", style=f"bold {style}"))
        for qid in ids:
            rec = rec_b[qid] if style == "red" else rec_a[qid]
            why = "; ".join(rec.get("reasons") or [])
            console.print(
                Text.assemble(
                    f"  {qid}  ",
                    (str(rec_a[qid].get("question", "")), "bold"),
                    (f"  — {why}" if why else "", "dim"),
                )
            )
    only = sorted(set(rec_a) ^ set(rec_b))
    if only:
        console.print(Text(f"questions in only one run: {', '.join(only)}", style="yellow"))
    return {
        "a_only_right": a_only,
        "b_only_right": b_only,
        "only_in_one": only,
        "paired": paired,
        "moves": {f"{was}->{now}": ids for (was, now), ids in moves.items()},
    }


# Per-question yes/no outcomes that compare pairs: (name, answerable questions only?, score key).
_PAIRED = (
    ("correct", None, "correct"),
    ("key_fact_accuracy", True, "key_facts_ok"),
    ("hit@k", True, "hit"),
    ("evidence_in_prompt (all quotes)", True, "in_prompt"),
    ("false_refusal", True, "refused"),
    ("negative_rejection", False, "refused"),
)


def paired_differences(
    recs_a: Sequence[dict[str, Any]], recs_b: Sequence[dict[str, Any]], z: float = 1.96
) -> dict[str, dict[str, Any]]:
    """B-A of each yes/no outcome over the same questions, with a 95% interval of the paired difference.

    Pairing matters: most questions give the same verdict in both runs, so the noise of a difference is
    that of the questions that flipped, far less than two independent intervals would suggest. A
    difference is beyond the noise when its interval excludes 0.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, answerable, key in _PAIRED:
        pairs = []
        for a, b in zip(recs_a, recs_b, strict=True):
            sa, sb = a.get("scores") or {}, b.get("scores") or {}
            if answerable is not None and sa.get("answerable") is not answerable:
                continue
            va = a.get("correct") if key == "correct" else sa.get(key)
            vb = b.get("correct") if key == "correct" else sb.get(key)
            if va is None or vb is None:
                continue
            pairs.append((int(bool(va)), int(bool(vb))))
        n = len(pairs)
        if not n:
            continue
        diffs = [vb - va for va, vb in pairs]
        mean = sum(diffs) / n
        var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
        half = z * math.sqrt(var / n)
        out[name] = {
            "n": n,
            "a": [sum(va for va, _ in pairs), n],
            "b": [sum(vb for _, vb in pairs), n],
            "diff": mean,
            "ci95": [mean - half, mean + half],
            "beyond_noise": mean - half > 0 or mean + half < 0,
            "flipped": sum(1 for d in diffs if d),
        }
    return out


def stage_moves(recs_a: Sequence[dict[str, Any]], recs_b: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """(stage in A, stage in B) -> question ids, for the questions whose funnel stage changed."""
    moves: dict[tuple[str, str], list[str]] = {}
    for a, b in zip(recs_a, recs_b, strict=True):
        was = (a.get("scores") or {}).get("stage") or "?"
        now = (b.get("scores") or {}).get("stage") or "?"
        if was != now:
            moves.setdefault((was, now), []).append(str(a.get("id")))
    return dict(sorted(moves.items()))
