"""One real eval run: real index, real embedder, the small GGUF, through the `ragqa eval` command."""

import json
from pathlib import Path

import pytest

from ragqa.chain import question_language
from ragqa.config import Settings

from .conftest import CHECKED, ROOT, run_cli


@pytest.mark.slow
def test_real_eval_run_on_a_small_file(tmp_path: Path, corpus_settings: Settings) -> None:
    def test_part(name: str) -> list[dict]:
        lines = (ROOT / "evals" / name).read_text(encoding="utf-8").splitlines()
        return [q for q in map(json.loads, lines) if q["split"] == "test"]

    old, new = test_part("corpus_qa.jsonl"), test_part("paraphrase_qa.jsonl")
    small = [q for q in old if q["type"] == "factoid" and q["lang"] == "zh"][:2]
    small += [q for q in new if q["type"] == "negative"][:1]
    small += [q for q in new if q["lang"] == "en" and q["type"] != "negative"][:1]
    tune = next(q for q in map(json.loads, (ROOT / "evals" / "paraphrase_qa.jsonl").open(encoding="utf-8"))
                if q["split"] == "tune")
    suite = tmp_path / "small.jsonl"
    suite.write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in [*small, tune]) + "\n", encoding="utf-8")
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir),
           "RAGQA_CORPUS": str(ROOT / "corpus"), **CHECKED}  # the answerability check on: its fields recorded
    out = tmp_path / "run"
    proc = run_cli("eval", str(suite), "--split", "test", "--model", "qwen2.5-coder-0.5b-instruct", "--out", str(out),
                   env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ingesting first" not in proc.stderr  # the session index is current: nothing re-embedded
    assert "warning: the index also holds" not in proc.stderr  # it holds corpus/ alone
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["n"] == 4
    overall = summary["overall"]
    for key in ("evidence_recall@k", "evidence_in_prompt", "hit@k", "mrr", "key_fact_accuracy", "negative_rejection",
                "false_refusal", "citation_validity", "citation_support", "faithfulness", "grounding_agreement",
                "latency", "prompt_tokens", "counts", "ci95", "funnel"):
        assert key in overall
    funnel = overall["funnel"]
    assert sum(funnel["answerable"].values()) == 3 and sum(funnel["negative"].values()) == 1
    assert overall["counts"]["key_fact_accuracy"][1] == 3
    assert overall["evidence_recall@k"] is not None and overall["negative_rejection"] is not None
    assert overall["latency"]["ttft_ms"]["p50"] > 0
    assert summary["config"]["model"] == "qwen2.5-coder-0.5b-instruct"
    records = [json.loads(x) for x in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == [q["id"] for q in small]  # the tune question was left out
    assert all(r["answer"] for r in records) and all(r["split"] == "test" for r in records)
    english = records[3]
    # The 0.5B's reply is kept only when it is a Chinese question (chain.looks_like_translation); either way
    # the translation step ran and is timed.
    assert english["lang"] == "en" and "translate_ms" in english["timings"], english
    if english.get("translated_question"):
        assert question_language(english["translated_question"]) == "zh", english
    assert english["context"] and len(english["retrieved"]) >= len(english["context"])
    for r in records:
        if not r["refused"]:
            marks = r["grounding"]
            assert marks and all(set(m) == {"sentence", "supported", "passages", "unsupported"} for m in marks)
            assert r["scores"]["faithful"] == all(m["supported"] for m in marks)
    assert (out / "report.html").read_text(encoding="utf-8").count("<svg") >= 1

    # Every answer recorded its answerability score and both signals, which calibrate fits weights on.
    assert all(r["refusal_check"] is not None and r["refusal_score"] is not None for r in records), records
    assert all(0 <= r["scores"]["refusal_score"] <= 1 for r in records)
    calibrated = run_cli("eval", "calibrate", str(out), env=env)
    assert calibrated.returncode == 0, calibrated.stderr
    assert "4 questions with both signals (1 unanswerable)" in calibrated.stdout

    again = run_cli("eval", "compare", str(out), str(out), env=env)
    assert again.returncode == 0, again.stderr
