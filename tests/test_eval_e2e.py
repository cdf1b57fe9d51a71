"""One real eval run: real index, real embedder, the small GGUF, through the `ragqa eval` command."""

import json
from pathlib import Path

import pytest

from ragqa.config import Settings

from .conftest import ROOT, run_cli


@pytest.mark.slow
def test_real_eval_run_on_a_small_file(tmp_path: Path, corpus_settings: Settings) -> None:
    lines = (ROOT / "evals" / "corpus_qa.jsonl").read_text(encoding="utf-8").splitlines()
    picked = [json.loads(x) for x in lines]
    small = [q for q in picked if q["type"] == "factoid" and q["lang"] == "zh"][:2]
    small += [q for q in picked if q["type"] == "negative"][:1]
    small += [q for q in picked if q["lang"] == "en" and q["type"] != "negative"][:1]
    suite = tmp_path / "small.jsonl"
    suite.write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in small) + "\n", encoding="utf-8")
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir),
           "RAGQA_CORPUS": str(ROOT / "corpus")}
    out = tmp_path / "run"
    proc = run_cli("eval", str(suite), "--model", "qwen2.5-coder-0.5b-instruct", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ingesting first" not in proc.stderr  # the session index is current: nothing re-embedded
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["n"] == 4
    overall = summary["overall"]
    for key in ("evidence_recall@k", "hit@k", "mrr", "key_fact_accuracy", "negative_rejection", "false_refusal",
                "citation_validity", "citation_support", "latency", "prompt_tokens"):
        assert key in overall
    assert overall["evidence_recall@k"] is not None and overall["negative_rejection"] is not None
    assert overall["latency"]["ttft_ms"]["p50"] > 0
    assert summary["config"]["model"] == "qwen2.5-coder-0.5b-instruct"
    records = [json.loads(x) for x in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == [q["id"] for q in small]
    assert all(r["answer"] for r in records)
    assert (out / "report.html").read_text(encoding="utf-8").count("<svg") >= 1

    again = run_cli("eval", "compare", str(out), str(out), env=env)
    assert again.returncode == 0, again.stderr
