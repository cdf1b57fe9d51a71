"""The answerability score's weights, fitted on one eval run, and the refusal curve they give.

ragqa decides "not in the documents" from one score (llm.RefusalGate):
sigmoid(refusal_bias + refusal_check_weight * logit(check) + refusal_sentinel_weight * logit(p)), with `check` the
model's P("no") when asked whether the passages answer (chain.QA.answerability_check) and `p` its probability
of starting the answer with the refusal sentinel. With the check on (`refusal_check_weight` above 0; it is off
by default, evals/RESULTS.md 2026-12-07) both are recorded for every question of an eval run; this module fits
the three weights by a logistic regression of "the question is unanswerable" on them, and shows
negative_rejection, false_refusal and key facts at each threshold of the fitted score.

Fit on a run of the tune part with the gate open, so every question was answered and the curve is exact
(`RAGQA_REFUSAL_CHECK_WEIGHT=1 RAGQA_REFUSAL_THRESHOLD=1.01 ragqa eval ... --split tune`), then
`ragqa eval calibrate RUN_DIR`. The
threshold to choose is the middle of the range with the most right outcomes (answers with all key facts +
unanswerable questions refused): a range, not its best point, because 22 unanswerable questions make every
single point noisy. Two weights from two signals and 132 questions: a small model, hard to overfit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragqa.errors import RagqaError
from ragqa.evals.metrics import refusal_sweep
from ragqa.llm import logit, sigmoid

# A little ridge on the two weights (not the bias): keeps them finite when the tune part happens to separate.
RIDGE = 1.0


@dataclass(frozen=True)
class Fit:
    bias: float
    check_weight: float
    sentinel_weight: float
    n: int  # questions with both signals
    unanswerable: int

    def score(self, check: float, p: float) -> float:
        return sigmoid(self.bias + self.check_weight * logit(check) + self.sentinel_weight * logit(p))


def _signals(scores: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in scores if s.get("refusal_check") is not None and s.get("refusal_p") is not None]


def fit(scores: Sequence[dict[str, Any]], iterations: int = 50) -> Fit:
    """Logistic regression (Newton's method, ridge RIDGE on the weights) of unanswerable on
    (logit(check), logit(p)) over the per-question scores of one run."""
    import numpy as np

    rows = _signals(scores)
    y = np.array([0.0 if s["answerable"] else 1.0 for s in rows])
    if not rows or y.min() == y.max():
        raise RagqaError("the run needs answerable and unanswerable questions, each with refusal_check and "
                         "refusal_p recorded (a run with the answerability check on: RAGQA_REFUSAL_CHECK_WEIGHT=1)")
    x = np.array([[1.0, logit(s["refusal_check"]), logit(s["refusal_p"])] for s in rows])
    ridge = np.diag([0.0, RIDGE, RIDGE])
    w = np.zeros(3)
    for _ in range(iterations):
        prob = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (prob - y) + ridge @ w
        hess = (x.T * (prob * (1.0 - prob))) @ x + ridge
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return Fit(float(w[0]), float(w[1]), float(w[2]), len(rows), int(y.sum()))


def auc(scores: Sequence[dict[str, Any]], value: Any) -> float | None:
    """P(an unanswerable question scores above an answerable one), ties half: how well `value` separates."""
    rows = _signals(scores)
    neg = [value(s) for s in rows if not s["answerable"]]
    pos = [value(s) for s in rows if s["answerable"]]
    if not neg or not pos:
        return None
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in neg for b in pos)
    return wins / (len(neg) * len(pos))


def curve(
    scores: Sequence[dict[str, Any]], model: Fit, run_threshold: float | None, steps: int = 100
) -> list[dict[str, Any]]:
    """Counts at each threshold t of the fitted score (metrics.refusal_sweep over it): refused when the
    score reaches t, or when the run refused by other means (in words, or by its own gate below
    `run_threshold`). Key facts count only where the run answered: exact for a run with the gate open."""
    rows = refusal_sweep(_signals(scores), run_threshold, steps,
                         value=lambda s: model.score(s["refusal_check"], s["refusal_p"]))
    out = []
    for r in rows:
        counts = r["counts"]
        nr, fr, kf = (counts[k][0] for k in ("negative_rejection", "false_refusal", "key_fact_accuracy"))
        out.append({"threshold": r["threshold"], "negative_rejection": nr, "false_refusal": fr, "key_facts": kf,
                    "right": nr + kf})
    return out


def best_range(rows: Sequence[dict[str, Any]]) -> tuple[float, float, float]:
    """The widest run of consecutive thresholds with the most right outcomes: (low, high, middle)."""
    most = max(r["right"] for r in rows)
    best: tuple[float, float] = (0.0, -1.0)
    start = None
    for i, r in enumerate(rows):
        if r["right"] == most and start is None:
            start = i
        if start is not None and (r["right"] != most or i == len(rows) - 1):
            end = i if r["right"] == most else i - 1
            if end - start > best[1] - best[0]:
                best = (start, end)
            start = None
    low, high = rows[int(best[0])]["threshold"], rows[int(best[1])]["threshold"]
    return low, high, round((low + high) / 2, 2)


def calibrate(run_dir: Any, console: Any = None) -> dict[str, Any]:
    """Fit the weights on one run's records and print them, how well each signal separates, and the curve."""
    from rich.console import Console
    from rich.table import Table

    from ragqa.evals.runner import _load_run

    console = console or Console()
    summary, records = _load_run(run_dir)
    scores = [r["scores"] for r in records.values() if isinstance(r.get("scores"), dict)]
    model = fit(scores)
    run_threshold = (summary.get("config") or {}).get("refusal_threshold")
    rows = curve(scores, model, run_threshold)
    low, high, middle = best_range(rows)
    separation = {
        "sentinel": auc(scores, lambda s: s["refusal_p"]),
        "check": auc(scores, lambda s: s["refusal_check"]),
        "score": auc(scores, lambda s: model.score(s["refusal_check"], s["refusal_p"])),
    }
    answerable = model.n - model.unanswerable
    console.print(f"{model.n} questions with both signals ({model.unanswerable} unanswerable), run threshold "
                  f"{run_threshold}; AUC (unanswerable above answerable): sentinel {separation['sentinel']:.3f}, "
                  f"check {separation['check']:.3f}, score {separation['score']:.3f}")
    table = Table("threshold", f"negative rejection, of {model.unanswerable}", f"false refusal, of {answerable}",
                  f"key facts, of {answerable}", "right")
    for r in rows[4::5]:
        table.add_row(f"{r['threshold']:.2f}", str(r["negative_rejection"]), str(r["false_refusal"]),
                      str(r["key_facts"]), str(r["right"]))
    console.print(table)
    console.print(f"most right outcomes from {low:.2f} to {high:.2f}; its middle, with the fitted weights:")
    console.print(f"refusal_threshold = {middle}\nrefusal_bias = {model.bias:.2f}\n"
                  f"refusal_check_weight = {model.check_weight:.2f}\n"
                  f"refusal_sentinel_weight = {model.sentinel_weight:.2f}")
    return {"fit": model, "curve": rows, "range": (low, high, middle), "auc": separation}
