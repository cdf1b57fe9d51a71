"""The time budget: passage tokens from a TTFT target and the host's measured rates (ragqa/budget.py)."""

from __future__ import annotations

import pytest

from ragqa.budget import OVERHEAD_S, PER_PASSAGE, Budget, Rates, passage_budget
from ragqa.config import Settings, load_settings
from ragqa.index import Index
from tests.conftest import SMALL_MODEL

RATES = Rates(prefill_tok_s=200.0, gen_tok_s=25.0, source="probe 2026-12-02")


def settings(**values: object) -> Settings:
    return load_settings(dict(values), env={})


def test_budget_follows_the_prefill_rate() -> None:
    s = settings()
    b = passage_budget(s, RATES, frame_tokens=150, n_passages=5)
    expected = int(200.0 * (s.ttft_target_s - OVERHEAD_S - 1 / 25.0)) - 150 - PER_PASSAGE * 5
    assert s.context_floor < expected < s.context_cap  # the case under test: not clamped
    assert b == Budget(expected, b.source) and "200 tok/s prefill" in b.source and "probe 2026-12-02" in b.source
    # Twice the prefill speed buys more passage text; a translation call first costs some of it.
    fast = passage_budget(s, Rates(400.0, 25.0, "x"), frame_tokens=150, n_passages=5)
    translated = passage_budget(s, RATES, frame_tokens=150, n_passages=5, translation_tokens=(80, 20))
    assert fast.tokens > b.tokens > translated.tokens
    assert b.tokens - translated.tokens == pytest.approx(80 + 200 * 20 / 25.0, abs=1)


def test_budget_is_clamped_to_the_floor_and_the_cap() -> None:
    s = settings()
    slow = passage_budget(s, Rates(40.0, 10.0, "x"), frame_tokens=150, n_passages=5)
    assert slow.tokens == s.context_floor and "clamped" in slow.source
    fast = passage_budget(s, Rates(5000.0, 100.0, "x"), frame_tokens=150, n_passages=5)
    assert fast.tokens == s.context_cap and "clamped" in fast.source


def test_fixed_budget_where_the_user_set_one_or_nothing_was_measured() -> None:
    assert passage_budget(settings(context_tokens=450), RATES, 150, 5) == Budget(450, "context_tokens (flag)")
    assert passage_budget(settings(context_tokens=0), RATES, 150, 5).tokens == 0  # whole passages, as asked
    off = passage_budget(settings(ttft_target_s="none"), RATES, 150, 5)
    assert off.tokens == Settings().context_tokens and "off" in off.source
    unmeasured = passage_budget(settings(), None, 150, 5)
    assert unmeasured.tokens == Settings().context_tokens and "no measured rates" in unmeasured.source


def test_same_inputs_same_budget() -> None:
    """No clock is read: an answer's prompt depends on the question and the recorded rates only."""
    s = settings()
    budgets = {passage_budget(s, RATES, 150, 5, (80, 20)) for _ in range(20)}
    assert len(budgets) == 1


@pytest.mark.slow
def test_answer_records_the_budget_it_was_fitted_to(corpus_settings: Settings, embedder) -> None:
    """Real 0.5B GGUF and real index: with measured rates the prompt's passages fit the computed budget, the
    answer records it, and a slower host gets fewer passage tokens; without rates the fixed budget."""
    from ragqa.chain import QA
    from ragqa.llm import load_llm

    llm = load_llm(corpus_settings.replace(model=SMALL_MODEL))
    qa = QA(corpus_settings, index=Index(corpus_settings, embedder=embedder), llm=llm)
    question = "杰文斯悖论是什么？"
    llm.rates = None
    fixed = qa.ask(question, context_only=True)
    assert fixed.as_dict()["budget"] == {"tokens": corpus_settings.context_tokens,
                                         "source": "context_tokens (no measured rates for this model)"}
    used: dict[str, int] = {}
    for name, rates in (("slow", Rates(60.0, 12.0, "test")), ("fast", Rates(150.0, 30.0, "test"))):
        llm.rates = rates
        a = qa.ask(question, context_only=name == "slow")  # the fast host's answer is generated in full
        d = a.as_dict()
        assert d["budget"] == a.budget.as_dict() and f"{rates.prefill_tok_s:.0f} tok/s prefill" in d["budget"]["source"]
        # focus counts its sentences' tokens; joined, "…" and token merges at the seams can add a few
        assert sum(llm.count_tokens(h.prompt_text) for h in a.hits) <= a.budget.tokens + 8 * len(a.hits)
        used[name] = a.budget.tokens
    assert a.answer and a.context  # the generated answer, over the passages fitted to its budget
    assert used["slow"] == corpus_settings.context_floor < used["fast"]
