"""Assign the fixed tune/test split of ragqa's eval suites, once.

Defaults are tuned on "tune" only and every figure ragqa reports is "test"'s, so the split must not move
when questions are re-read or re-ordered: each question's part is drawn from a hash of its id, stratified
by (suite, language, type) so that both parts hold English and Chinese, every question type and both
suites in the same proportions. Questions that already carry a split keep it; new ones are assigned so
that each stratum stays near TEST_SHARE. Run: python evals/split.py evals/corpus_qa.jsonl evals/paraphrase_qa.jsonl
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path

TEST_SHARE = 0.4
SALT = "ragqa-split-2026-12"


def _key(qid: str) -> str:
    return hashlib.sha256(f"{SALT}:{qid}".encode()).hexdigest()


def assign(suites: dict[str, list[dict]]) -> None:
    """Give every question without a split one, in place; strata keep about TEST_SHARE in test."""
    strata: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for name, records in suites.items():
        for r in records:
            strata[(name, r["lang"], r["type"])].append(r)
    carry = 0.0
    for key in sorted(strata):
        group = strata[key]
        want = TEST_SHARE * len(group) + carry
        n_test = round(want)
        carry = want - n_test  # rounding left over moves to the next stratum, so the total stays near 40%
        have = sum(1 for r in group if r.get("split") == "test")
        free = sorted((r for r in group if "split" not in r), key=lambda r: _key(r["id"]))
        need = max(0, n_test - have)
        for i, r in enumerate(free):
            r["split"] = "test" if i < need else "tune"


def main(paths: list[str]) -> None:
    suites = {p: [json.loads(line) for line in Path(p).read_text(encoding="utf-8").splitlines() if line.strip()]
              for p in paths}
    assign(suites)
    for p, records in suites.items():
        Path(p).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        n_test = sum(r["split"] == "test" for r in records)
        print(f"{p}: {len(records)} questions, {n_test} test, {len(records) - n_test} tune")


if __name__ == "__main__":
    main(sys.argv[1:] or ["evals/corpus_qa.jsonl", "evals/paraphrase_qa.jsonl"])
