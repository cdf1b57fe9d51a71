"""Evaluation of ragqa against a gold JSONL suite: metrics, a runner, and an HTML report.

The public names are re-exported here so the CLI depends on one import path, not the module layout.
"""

from ragqa.evals.metrics import (
    CorpusTexts,
    judge,
    locate_evidence,
    normalize_text,
    score_question,
    summarize,
)
from ragqa.evals.report import render_report, write_report
from ragqa.evals.runner import (
    EvalFileError,
    compare,
    load_suite,
    make_record,
    print_summary,
    run_suite,
)

__all__ = [
    "CorpusTexts",
    "EvalFileError",
    "compare",
    "judge",
    "load_suite",
    "locate_evidence",
    "make_record",
    "normalize_text",
    "print_summary",
    "render_report",
    "run_suite",
    "score_question",
    "summarize",
    "write_report",
]
