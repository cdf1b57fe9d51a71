"""A single self-contained report.html per eval run.

Self-contained (inline CSS and SVG, no scripts, no external URLs) because reports get attached to
tickets and opened offline; the font stack names CJK fonts because half the suite is Chinese.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from ragqa.evals.metrics import (
    FUNNEL_ANSWERABLE,
    FUNNEL_LABELS,
    FUNNEL_NEGATIVE,
    LATENCY_PARTS,
    RATE_METRICS,
    Span,
    chunk_span,
    percentile,
)

REPORT_FILE = "report.html"

RATE_LABELS = {
    "evidence_recall@k": "evidence recall@k",
    "evidence_in_prompt": "evidence in prompt",
    "hit@k": "hit@k",
    "mrr": "MRR",
    "key_fact_accuracy": "key-fact accuracy",
    "key_fact_recall": "key-fact recall",
    "negative_rejection": "negative rejection",
    "false_refusal": "false refusal",
    "citation_validity": "citation validity",
    "citation_support": "citation support",
    "faithfulness": "faithfulness",
    "grounding_agreement": "grounding agrees with key facts",
}
PALETTE = ("#3b6fd8", "#e0823d", "#3aa57a", "#c2477b", "#8a63d2", "#b59a2c", "#4aa3c2", "#7a7a7a")
FONT_STACK = (
    'system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", "Noto Sans SC", '
    '"WenQuanYi Micro Hei", "Microsoft YaHei", "PingFang SC", sans-serif'
)


# --- shared table layout (also used by the rich tables in runner) -----------------------------------


def format_value(label: str, value: Any) -> str:
    """Display form of one metric: rates as percentages, MRR as a fraction, times in whole ms."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    if label == "n":
        return str(int(value))
    if label == "mrr":
        return f"{value:.3f}"
    if label in RATE_METRICS:
        return f"{value * 100:.1f}%"
    if label == "gen tok/s":
        return f"{value:.1f}"
    return f"{value:.0f}"


def summary_columns(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, metric group) for overall, then each language, then each question type."""
    cols = [("overall", summary.get("overall") or {})]
    cols += list((summary.get("by_lang") or {}).items())
    cols += list((summary.get("by_type") or {}).items())
    return cols


def _row_values(group: dict[str, Any]) -> list[tuple[str, Any, list[int] | None]]:
    """(label, value, [k, n] or None) rows of one metric group."""
    lat = group.get("latency") or {}
    counts = group.get("counts") or {}
    rows: list[tuple[str, Any, list[int] | None]] = [("n", group.get("n"), None)]
    rows += [(k, group.get(k), counts.get(k)) for k in RATE_METRICS]
    for part in LATENCY_PARTS:
        for p in ("p50", "p95"):
            rows.append((f"{part} {p}", (lat.get(part) or {}).get(p), None))
    rows.append(("gen tok/s", lat.get("gen_tok_s"), None))
    rows.append(("prompt tokens", group.get("prompt_tokens"), None))
    return rows


def format_rate(value: Any, count: Sequence[int] | None) -> str:
    """A rate with its count, "0.620 31/50", so that no rate is read without its denominator."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    return f"{value:.3f} {count[0]}/{count[1]}" if count else f"{value:.3f}"


def summary_rows(
    summary: dict[str, Any], columns: Sequence[tuple[str, dict[str, Any]]]
) -> list[tuple[str, list[str]]]:
    """Formatted metric rows (one cell per column); None becomes "—" so "no data" never reads as 0."""
    per_col = [_row_values(group) for _label, group in columns]
    labels = [label for label, _v, _c in _row_values({})]
    rows = []
    for i, label in enumerate(labels):
        cells = []
        for col in per_col:
            _label, value, count = col[i]
            rate = label in RATE_METRICS and label != "mrr"
            cells.append(format_rate(value, count) if rate else format_value(label, value))
        rows.append((label, cells))
    return rows


def interval_rows(group: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, "0.620 31/50", "0.482-0.741") for every counted rate of one group."""
    counts, ci = group.get("counts") or {}, group.get("ci95") or {}
    rows = []
    for key in RATE_METRICS:
        if key not in counts or not counts[key][1]:
            continue
        lo_hi = ci.get(key)
        rows.append((key, format_rate(group.get(key), counts[key]), f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}" if lo_hi else "—"))
    return rows


def funnel_rows(summary: dict[str, Any], columns: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, list[str]]]:
    """Funnel stages as rows, a cell per column: where the answerable and the unanswerable questions ended."""
    rows = []
    kinds = (("answerable", FUNNEL_ANSWERABLE, ""), ("negative", FUNNEL_NEGATIVE, "unanswerable: "))
    for kind, stages, prefix in kinds:
        extra = sorted({st for _l, g in columns for st in ((g.get("funnel") or {}).get(kind) or {})} - set(stages))
        for stage in (*stages, *extra):
            cells = []
            for _label, group in columns:
                funnel = (group.get("funnel") or {}).get(kind) or {}
                total = sum(funnel.values())
                cells.append(f"{funnel.get(stage, 0)}/{total}" if total else "—")
            rows.append((prefix + FUNNEL_LABELS.get(stage, stage), cells))
    return rows


# --- SVG charts -------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _svg_open(width: int, height: int, label: str) -> str:
    """Scalable SVG root: a viewBox with width 100% lets charts follow the page width."""
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}" '
        'xmlns="http://www.w3.org/2000/svg">'
    )


def bar_chart(title: str, groups: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Grouped bars of every 0..1 metric, one colour per group; missing values are marked "n/a"."""
    # A metric with no value in any group (e.g. key facts in a retrieval-only run) only adds noise.
    metrics = [m for m in RATE_METRICS if any(isinstance(g.get(m), (int, float)) for _n, g in groups)]
    if not groups or not metrics:
        return ""
    width, height, left, right, top, bottom = 1000, 300, 46, 10, 16, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / len(metrics)
    bar_w = min(26.0, slot * 0.8 / len(groups))
    parts = [_svg_open(width, height, title)]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{tick * 100:.0f}%</text>'
        )
    for i, metric in enumerate(metrics):
        x0 = left + slot * i + (slot - bar_w * len(groups)) / 2
        for j, (name, group) in enumerate(groups):
            value = group.get(metric)
            x = x0 + j * bar_w
            if isinstance(value, (int, float)):
                h = plot_h * max(0.0, min(1.0, float(value)))
                parts.append(
                    f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 2:.1f}" '
                    f'height="{max(h, 0.5):.1f}" fill="{PALETTE[j % len(PALETTE)]}" rx="2">'
                    f"<title>{_e(name)} · {_e(RATE_LABELS[metric])}: "
                    f"{_e(format_value(metric, value))}</title></rect>"
                )
            else:
                parts.append(
                    f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - 4}" class="na" '
                    f'text-anchor="middle" transform="rotate(-90 {x + bar_w / 2:.1f} {top + plot_h - 4})"'
                    f' dy="3">n/a</text>'
                )
        label = RATE_LABELS[metric]
        words = label.split(" ")
        lines = [label] if len(words) == 1 else [" ".join(words[:-1]), words[-1]]
        for k, line in enumerate(lines):
            parts.append(
                f'<text x="{left + slot * (i + 0.5):.1f}" y="{top + plot_h + 16 + 13 * k}" '
                f'class="label" text-anchor="middle">{_e(line)}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="legend-item"><span class="swatch" style="background:{PALETTE[j % len(PALETTE)]}">'
        "</span>"
        f'{_e(name)} <span class="muted">(n={_e(group.get("n", "?"))})</span></span>'
        for j, (name, group) in enumerate(groups)
    )
    return (
        f'<figure><figcaption>{_e(title)}</figcaption><div class="legend">{legend}</div>'
        f"{''.join(parts)}</figure>"
    )


FUNNEL_STEPS = (
    ("answerable questions", ()),
    ("evidence retrieved", ("not_retrieved",)),
    ("evidence in the prompt", ("not_retrieved", "cut")),
    ("answered (not refused)", ("not_retrieved", "cut", "refused")),
    ("right (all key facts)", ("not_retrieved", "cut", "refused", "incomplete")),
)


def funnel_survivors(funnel: dict[str, int]) -> list[int]:
    """How many answerable questions were still alive after each of FUNNEL_STEPS."""
    total = sum(funnel.values())
    return [total - sum(funnel.get(stage, 0) for stage in lost) for _label, lost in FUNNEL_STEPS]


def funnel_chart(groups: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Where answerable questions were lost: per step, the share still alive, one bar per group, and the
    unanswerable questions refused below. Shares, not counts, so English (fewer questions) compares with
    Chinese at a glance; every bar's title and label give the count."""
    groups = [(name, g) for name, g in groups if sum(((g.get("funnel") or {}).get("answerable") or {}).values())]
    if not groups:
        return ""
    steps = [label for label, _lost in FUNNEL_STEPS] + ["unanswerable: refused"]
    width, left, right, top, row_gap = 1000, 200, 70, 10, 10
    bar_h = 14
    row_h = bar_h * len(groups) + row_gap
    height = top + row_h * len(steps) + 10
    plot_w = width - left - right
    parts = [_svg_open(width, height, "Where the questions were lost")]
    for i, step in enumerate(steps):
        y0 = top + i * row_h
        parts.append(f'<text x="{left - 8}" y="{y0 + row_h / 2:.1f}" class="label" text-anchor="end">{_e(step)}</text>')
        for j, (name, group) in enumerate(groups):
            funnel = group.get("funnel") or {}
            if i < len(FUNNEL_STEPS):
                alive = funnel_survivors(funnel.get("answerable") or {})
                k, n = alive[i], alive[0]
            else:
                neg = funnel.get("negative") or {}
                k, n = neg.get("refused", 0), sum(neg.values())
            y = y0 + j * bar_h
            if not n:
                parts.append(f'<text x="{left + 4}" y="{y + bar_h - 3}" class="na">n/a</text>')
                continue
            w = plot_w * k / n
            parts.append(
                f'<rect x="{left}" y="{y:.1f}" width="{max(w, 0.5):.1f}" height="{bar_h - 2}" '
                f'fill="{PALETTE[j % len(PALETTE)]}" rx="2"><title>{_e(name)} · {_e(step)}: {k}/{n}</title></rect>'
                f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 4}" class="tick">{k}/{n}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="legend-item"><span class="swatch" style="background:{PALETTE[j % len(PALETTE)]}"></span>'
        f"{_e(name)}</span>"
        for j, (name, _g) in enumerate(groups)
    )
    return (
        '<figure><figcaption>Where the questions were lost (answerable: share still on the way after each '
        f'step)</figcaption><div class="legend">{legend}</div>{"".join(parts)}</figure>'
    )


def refusal_chart(sweep: Sequence[dict[str, Any]]) -> str:
    """negative_rejection and false_refusal (and key facts) against the refusal threshold: where the
    threshold that trades one for the other sits."""
    sweep = [r for r in sweep if r.get("false_refusal") is not None or r.get("negative_rejection") is not None]
    if not sweep:
        return ""
    width, height, left, right, top, bottom = 1000, 260, 46, 10, 12, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    lines = (("negative_rejection", PALETTE[0]), ("false_refusal", PALETTE[1]), ("key_fact_accuracy", PALETTE[2]))
    parts = [_svg_open(width, height, "Refusal against the threshold")]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{tick * 100:.0f}%</text>')
    for tick in (0.1, 0.3, 0.5, 0.7, 0.9):
        x = left + plot_w * tick
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="middle">{tick:.1f}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" class="label" text-anchor="middle">'
                 "threshold on the answerability score (llm.RefusalGate)</text>")
    for key, colour in lines:
        rows = [r for r in sweep if r.get(key) is not None]
        points = [(left + plot_w * r["threshold"], top + plot_h * (1 - r[key])) for r in rows]
        if points:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
            for (x, y), r in zip(points, rows, strict=True):
                k, n = r["counts"][key]
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"><title>{_e(key)} at '
                             f'{r["threshold"]:.2f}: {k}/{n}</title></circle>')
    parts.append("</svg>")
    legend = "".join(
        f'<span class="legend-item"><span class="swatch" style="background:{c}"></span>{_e(RATE_LABELS[k])}</span>'
        for k, c in lines
    )
    return (
        "<figure><figcaption>Refusal decided by the first token's sentinel probability, at each threshold"
        f'</figcaption><div class="legend">{legend}</div>{"".join(parts)}</figure>'
    )


def _funnel_table(summary: dict[str, Any]) -> str:
    columns = summary_columns(summary)
    head = "".join(f"<th>{_e(label)}</th>" for label, _g in columns)
    body = "".join(
        f"<tr><td>{_e(label)}</td>{''.join(f'<td>{_e(c)}</td>' for c in cells)}</tr>"
        for label, cells in funnel_rows(summary, columns)
    )
    return f'<table class="metrics"><thead><tr><th>stage</th>{head}</tr></thead><tbody>{body}</tbody></table>'


def _interval_table(summary: dict[str, Any]) -> str:
    body = "".join(
        f"<tr><td>{_e(RATE_LABELS.get(k, k))}</td><td>{_e(rate)}</td><td>{_e(ci)}</td></tr>"
        for k, rate, ci in interval_rows(summary.get("overall") or {})
    )
    return (
        '<table class="metrics"><thead><tr><th>metric</th><th>rate k/n</th><th>95% interval (Wilson)</th></tr>'
        f"</thead><tbody>{body}</tbody></table>"
    )


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * exp >= value:
            return step * exp
    return 10 * exp


def latency_chart(records: Sequence[dict[str, Any]]) -> str:
    """Box plus every question as a dot, per timing, so outliers stay visible next to p50/p95."""
    rows = []
    for part in LATENCY_PARTS:
        vals = [(r.get("id", "?"), r["scores"].get(part)) for r in records]
        vals = [(qid, v) for qid, v in vals if isinstance(v, (int, float))]
        rows.append((part, vals))
    rows = [(part, vals) for part, vals in rows if vals]
    if not rows:
        return '<p class="muted">No timing data.</p>'
    width, row_h, left, right = 1000, 74, 110, 190
    height = row_h * len(rows) + 10
    plot_w = width - left - right
    parts = [_svg_open(width, height, "latency per question")]
    for i, (part, vals) in enumerate(rows):
        nums = [v for _q, v in vals]
        top = 8 + i * row_h
        mid = top + 24
        vmax = _nice_max(max(nums))

        def x(v: float, vmax: float = vmax) -> float:
            return left + plot_w * v / vmax

        parts.append(f'<text x="{left - 10}" y="{mid + 4}" class="label" text-anchor="end">{_e(part)}</text>')
        for k in range(5):
            t = vmax * k / 4
            parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{top + 48}" class="grid"/>')
            parts.append(
                f'<text x="{x(t):.1f}" y="{top + 62}" class="tick" text-anchor="middle">{t:g}</text>'
            )
        q = {p: percentile(nums, p) or 0.0 for p in (5, 25, 50, 75, 95)}
        parts.append(
            f'<line x1="{x(min(nums)):.1f}" x2="{x(max(nums)):.1f}" y1="{mid}" y2="{mid}" class="whisker"/>'
        )
        parts.append(
            f'<rect x="{x(q[25]):.1f}" y="{mid - 12}" width="{max(x(q[75]) - x(q[25]), 1.5):.1f}" '
            f'height="24" class="box"/>'
        )
        parts.append(
            f'<line x1="{x(q[50]):.1f}" x2="{x(q[50]):.1f}" y1="{mid - 14}" y2="{mid + 14}" class="median"/>'
        )
        parts.append(
            f'<line x1="{x(q[95]):.1f}" x2="{x(q[95]):.1f}" y1="{mid - 10}" y2="{mid + 10}" class="p95"/>'
        )
        for j, (qid, v) in enumerate(vals):
            jitter = ((j * 7919) % 17 - 8) * 1.2
            parts.append(
                f'<circle cx="{x(v):.1f}" cy="{mid + jitter:.1f}" r="3" class="dot">'
                f"<title>{_e(qid)}: {v:.0f} ms</title></circle>"
            )
        parts.append(f'<text x="{width - right + 12}" y="{mid - 2}" class="stat">p50 {q[50]:.0f} ms</text>')
        parts.append(
            f'<text x="{width - right + 12}" y="{mid + 14}" class="stat p95t">p95 {q[95]:.0f} ms</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# --- failed questions ---------------------------------------------------------------------------------


def _marked(text: str, chunk: Span | None, quotes: Sequence[Span]) -> str:
    """Chunk text with the parts that are gold evidence wrapped in <mark>, escaped everywhere else."""
    if chunk is None or len(text) != chunk.end - chunk.start:
        return _e(text)
    ranges = sorted(
        (max(q.start, chunk.start) - chunk.start, min(q.end, chunk.end) - chunk.start)
        for q in quotes
        if chunk.overlap(q) > 0
    )
    out, pos = [], 0
    for start, end in ranges:
        start = max(start, pos)
        if end <= start:
            continue
        out += [_e(text[pos:start]), f"<mark>{_e(text[start:end])}</mark>"]
        pos = end
    out.append(_e(text[pos:]))
    return "".join(out)


def _failed_card(rec: dict[str, Any]) -> str:
    scores = rec.get("scores") or {}
    gold = rec.get("gold") or {}
    quotes = [Span(e["source"], e["start"], e["end"]) for e in scores.get("evidence", []) if e.get("found")]
    covering = set(scores.get("covering_ranks") or [])
    cited = {c.get("n") for c in rec.get("citations") or [] if isinstance(c, dict)}
    reasons = "".join(f'<span class="reason">{_e(r)}</span>' for r in rec.get("reasons") or [])
    answer = rec.get("answer")
    if answer is None:
        why = "the pipeline failed" if (rec.get("scores") or {}).get("error") else "retrieval-only run"
        answer_html = f'<span class="muted">(no answer: {why})</span>'
    else:
        answer_html = _e(answer)
    refused = ' <span class="badge warn">refused</span>' if rec.get("refused") else ""
    must = (
        ", ".join(f"<code>{_e(k)}</code>" for k in gold.get("must_include") or [])
        or '<span class="muted">—</span>'
    )

    ev_items = []
    for e in scores.get("evidence", []):
        if not e.get("found"):
            status, cls = "not found in corpus", "bad"
        elif e.get("retrieved"):
            status, cls = "retrieved", "good"
        else:
            status, cls = "not retrieved", "bad"
        where = f"{e['source']}:{e['start']}-{e['end']}" if e.get("found") else "?"
        ev_items.append(
            f'<li><span class="badge {cls}">{status}</span> <code class="src">{_e(where)}</code> '
            f"<q>{_e(e.get('quote', ''))}</q></li>"
        )
    evidence = (
        f'<ul class="evidence">{"".join(ev_items)}</ul>'
        if ev_items
        else '<p class="muted">No evidence quotes.</p>'
    )

    chunks = []
    for i, chunk in enumerate(rec.get("retrieved") or [], start=1):
        span = chunk_span(chunk)
        badges = []
        if i in covering:
            badges.append('<span class="badge good">evidence</span>')
        if i in cited:
            badges.append(f'<span class="badge cite">cited [{i}]</span>')
        where = f"{span.source}:{span.start}-{span.end}" if span else str(chunk.get("source"))
        score = chunk.get("score")
        score_txt = f"score {score:.3f}" if isinstance(score, (int, float)) else ""
        chunks.append(
            f'<li class="chunk{" covering" if i in covering else ""}"><div class="chunk-head"><b>#{i}</b> '
            f'<code class="src">{_e(where)}</code> <span class="muted">{_e(score_txt)}</span> '
            f"{''.join(badges)}</div>"
            f'<div class="chunk-text">{_marked(str(chunk.get("text", "")), span, quotes)}</div></li>'
        )
    retrieved = (
        f'<ol class="chunks">{"".join(chunks)}</ol>' if chunks else '<p class="muted">Nothing retrieved.</p>'
    )

    return f"""
<details class="failed" open>
  <summary><span class="qid">{_e(rec.get("id", "?"))}</span>
    <span class="badge">{_e(rec.get("lang", "?"))}</span><span class="badge">{_e(rec.get("type", "?"))}</span>
    <span class="qtext">{_e(rec.get("question", ""))}</span></summary>
  <div class="reasons">{reasons}</div>
  <div class="two">
    <div><h4>Answer{refused}</h4><div class="answer">{answer_html}</div></div>
    <div><h4>Reference</h4><div class="answer">{_e(gold.get("answer") or "—")}</div>
      <p class="must">must include: {must}</p></div>
  </div>
  <h4>Evidence quotes</h4>{evidence}
  <h4>Retrieved chunks</h4>{retrieved}
</details>"""


# --- page -------------------------------------------------------------------------------------------

CSS = """
:root {
  --fg:#1d2330; --muted:#6b7385; --line:#e3e6ee; --bg:#f6f7fb; --card:#fff; --accent:#3b6fd8;
  --good:#1f8a5b; --bad:#c23a3a; --warn:#b26a00;
}
* { box-sizing: border-box; }
body {
  margin:0; font-family: FONTS; color:var(--fg); background:var(--bg); line-height:1.5; font-size:15px;
}
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h4 {
  margin: 14px 0 6px; font-size: 14px; color: var(--muted); text-transform: uppercase;
  letter-spacing: .04em;
}
.muted { color: var(--muted); }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
.sub { color: var(--muted); margin-bottom: 18px; }
.alert {
  background:#fff4e0; border:1px solid #f0c67a; color:var(--warn); padding:8px 12px; border-radius:8px;
}
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
.card .v { font-size: 24px; font-weight: 650; }
.card .k { color: var(--muted); font-size: 13px; }
table {
  border-collapse: collapse; background: var(--card); border:1px solid var(--line); border-radius: 10px;
  overflow: hidden; width: 100%; font-size: 14px;
}
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eef1f8; font-weight: 600; }
thead th.grp { text-align: center; color: var(--muted); font-weight: 500; border-left: 2px solid #fff; }
tbody tr:nth-child(even) { background: #fafbfd; }
td.na { color: #b0b5c2; }
tr.sep td { border-top: 2px solid var(--line); }
.config td { text-align: left; white-space: normal; }
.config td:first-child { width: 220px; color: var(--muted); }
figure {
  margin: 0 0 18px; background: var(--card); border:1px solid var(--line); border-radius: 10px;
  padding: 12px;
}
figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { width: 100%; height: auto; display: block; font-family: FONTS; }
svg .grid { stroke: #e6e9f0; stroke-width: 1; }
svg .tick { fill: #8a91a2; font-size: 11px; }
svg .label { fill: #394055; font-size: 12px; }
svg .na { fill: #b0b5c2; font-size: 10px; }
svg .box { fill: #dbe5fa; stroke: #3b6fd8; stroke-width: 1.2; }
svg .whisker { stroke: #8a91a2; stroke-width: 1.2; }
svg .median { stroke: #1d2330; stroke-width: 2.5; }
svg .p95 { stroke: #c23a3a; stroke-width: 2; }
svg .dot { fill: #3b6fd8; fill-opacity: .55; }
svg .stat { fill: #394055; font-size: 13px; }
svg .p95t { fill: #c23a3a; }
.legend { display:flex; flex-wrap: wrap; gap: 14px; font-size: 13px; margin-bottom: 4px; }
.legend-item { display:inline-flex; align-items:center; gap: 6px; }
.swatch { width: 12px; height: 12px; border-radius: 3px; display:inline-block; }
.badge {
  display:inline-block; font-size: 12px; padding: 1px 8px; border-radius: 999px; background:#eef1f8;
  color:#394055; margin-right: 4px; vertical-align: 1px;
}
.badge.good { background:#e1f4ea; color: var(--good); }
.badge.bad { background:#fbe6e6; color: var(--bad); }
.badge.warn { background:#fff0d6; color: var(--warn); }
.badge.cite { background:#e6edfb; color: var(--accent); }
.ok { color: var(--good); font-weight: 600; }
.fail { color: var(--bad); font-weight: 600; }
details.failed {
  background: var(--card); border:1px solid var(--line); border-left: 4px solid var(--bad);
  border-radius: 10px; padding: 10px 16px 14px; margin: 0 0 14px;
}
details.failed > summary { cursor: pointer; font-size: 16px; list-style-position: outside; }
.qid { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-weight: 700; margin-right: 6px; }
.qtext { font-weight: 600; }
.reasons { margin: 8px 0 2px; }
.reason {
  display:inline-block; background:#fbe6e6; color:var(--bad); border-radius: 6px; padding: 2px 8px;
  margin: 2px 6px 2px 0; font-size: 13px;
}
.two { display:grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.answer {
  background:#fafbfd; border:1px solid var(--line); border-radius:8px; padding:8px 10px;
  white-space: pre-wrap; word-break: break-word; max-height: 16em; overflow:auto;
}
.must { margin: 6px 0 0; font-size: 14px; }
ul.evidence { margin: 0; padding-left: 18px; }
ul.evidence li { margin: 3px 0; }
q { color: #2b3245; }
ol.chunks { list-style: none; padding: 0; margin: 0; }
.chunk {
  border:1px solid var(--line); border-radius: 8px; margin: 6px 0; padding: 6px 10px; background:#fff;
}
.chunk.covering { border-color: #8fd1b0; background: #f2fbf6; box-shadow: inset 3px 0 0 var(--good); }
.chunk-head { font-size: 13px; margin-bottom: 3px; }
.src { color: #4a5268; }
.chunk-text {
  white-space: pre-wrap; word-break: break-word; font-size: 13.5px; max-height: 11em; overflow: auto;
  color: #2b3245;
}
mark { background: #ffe58a; padding: 0 1px; border-radius: 2px; }
.qtable th:nth-child(-n+5), .qtable td:nth-child(-n+5) { text-align: left; }
.qtable td:nth-child(4) { white-space: normal; max-width: 520px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
""".replace("FONTS", FONT_STACK)


def _metric_table(summary: dict[str, Any]) -> str:
    columns = summary_columns(summary)
    n_lang = len(summary.get("by_lang") or {})
    head = "".join(f"<th>{_e(label)}</th>" for label, _g in columns)
    group_head = (
        f'<tr><th></th><th></th><th colspan="{n_lang}" class="grp">by language</th>'
        f'<th colspan="{len(columns) - 1 - n_lang}" class="grp">by type</th></tr>'
    )
    body = []
    for label, cells in summary_rows(summary, columns):
        sep = ' class="sep"' if label in ("evidence_recall@k", "retrieve_ms p50") else ""
        name = RATE_LABELS.get(label, label)
        tds = "".join(f'<td class="na">{c}</td>' if c == "—" else f"<td>{_e(c)}</td>" for c in cells)
        body.append(f"<tr{sep}><td>{_e(name)}</td>{tds}</tr>")
    return (
        f'<table class="metrics"><thead>{group_head}<tr><th>metric</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _config_table(config: dict[str, Any]) -> str:
    rows = []
    for key, value in config.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        rows.append(f"<tr><td>{_e(key)}</td><td><code>{_e(shown)}</code></td></tr>")
    return (
        f'<table class="config"><tbody>{"".join(rows)}</tbody></table>' if rows else '<p class="muted">—</p>'
    )


def _cards(summary: dict[str, Any]) -> str:
    overall = summary.get("overall") or {}
    items = [(RATE_LABELS[k], format_value(k, overall.get(k))) for k in RATE_METRICS]
    total = ((overall.get("latency") or {}).get("total_ms") or {}).get("p50")
    items.append(("total p50", f"{format_value('ms', total)} ms" if total is not None else "—"))
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
            for k, v in items
        )
        + "</div>"
    )


def _question_table(records: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        s = r.get("scores") or {}
        verdict = '<span class="ok">ok</span>' if r.get("correct") else '<span class="fail">fail</span>'
        hit = {True: "✓", False: "✗", None: "—"}[s.get("hit")]
        keys = f"{s.get('keys_found', 0)}/{s.get('n_keys', 0)}" if s.get("key_facts_ok") is not None else "—"
        rr = f"{s['rr']:.2f}" if isinstance(s.get("rr"), (int, float)) else "—"
        total = f"{s['total_ms']:.0f}" if isinstance(s.get("total_ms"), (int, float)) else "—"
        rows.append(
            f'<tr><td><span class="qid">{_e(r.get("id", "?"))}</span></td><td>{_e(r.get("lang", ""))}</td>'
            f'<td>{_e(r.get("type", ""))}</td><td title="{_e(r.get("question", ""))}">'
            f"{_e(r.get('question', ''))}</td><td>{verdict}</td>"
            f"<td>{_e(FUNNEL_LABELS.get(s.get('stage') or '', s.get('stage') or '—'))}</td>"
            f"<td>{hit}</td><td>{rr}</td><td>{keys}</td>"
            f"<td>{total}</td></tr>"
        )
    return (
        '<table class="qtable"><thead><tr><th>id</th><th>lang</th><th>type</th><th>question</th>'
        "<th>verdict</th><th>stage</th>"
        "<th>hit</th><th>RR</th><th>key facts</th><th>total ms</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def render_report(summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """The report as one HTML string; split from write_report so it can be checked without disk."""
    failed = [r for r in records if not r.get("correct")]
    n = summary.get("n", len(records))
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    alert = ""
    if summary.get("interrupted"):
        alert = (
            f'<p class="alert">Interrupted: only {_e(n)} of {_e(summary.get("n_planned", "?"))} questions '
            "were run; every number below covers those only.</p>"
        )
    lang_groups = list((summary.get("by_lang") or {}).items())
    type_groups = list((summary.get("by_type") or {}).items())
    failed_html = "".join(_failed_card(r) for r in failed) or '<p class="ok">Every question passed.</p>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ragqa eval report</title>
<style>{CSS}</style>
</head>
<body><main>
<h1>ragqa eval report</h1>
<div class="sub">{_e(n)} questions · {len(records) - len(failed)} passed · {len(failed)} failed ·
generated {generated}</div>
{alert}
{_cards(summary)}
<h2 id="metrics">Metrics</h2>
{_metric_table(summary)}
<h2 id="funnel">Where each question was lost</h2>
{funnel_chart([("overall", summary.get("overall") or {}), *lang_groups])}
{_funnel_table(summary)}
<p class="muted">A right answer counts as right wherever retrieval stood; the other answerable questions end
at the first stage that lost them. Intervals are 95% Wilson intervals of each rate.</p>
{_interval_table(summary)}
<h2 id="refusal">Refusal threshold</h2>
{refusal_chart(summary.get("refusal_sweep") or []) or '<p class="muted">No refusal probabilities in this run.</p>'}
<h2 id="charts">By language and type</h2>
{bar_chart("Rates by language", lang_groups)}
{bar_chart("Rates by question type", type_groups)}
<h2 id="latency">Latency per question (ms)</h2>
<figure>{latency_chart(records)}
<p class="muted">Box: p25 to p75, black line: median, red line: p95, whisker: min to max,
dots: questions.</p></figure>
<h2 id="failed">Failed questions ({len(failed)})</h2>
{failed_html}
<h2 id="questions">All questions</h2>
{_question_table(records)}
<h2 id="config">Configuration</h2>
{_config_table(summary.get("config") or {})}
<footer>ragqa · self-contained report, no external resources</footer>
</main></body>
</html>
"""


def write_report(out_dir: Path | str, summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> Path:
    """Write out_dir/report.html and return its path."""
    path = Path(out_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(summary, records), encoding="utf-8")
    return path
