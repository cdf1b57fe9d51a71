"""How many passage tokens an answer's prompt may carry: a time budget turned into a token budget.

Why a time budget: what a user waits for is the first token, and on a 2-core CPU that is almost all prompt
evaluation (prefill). The same 300 passage tokens that come back in ~3 s on an AVX-512 host take ~8 s on an
AVX2 laptop (issue #15's figures). So the default is a target in seconds (`ttft_target_s`), and the token
budget follows from the host's measured prefill and generation rates (the kernel probe, ragqa/kernels.py):

    tokens = prefill_tok_s * (target - OVERHEAD_S - 1 / gen_tok_s - translation_s) - frame - PER_PASSAGE * n

clamped to [context_floor, context_cap]. The floor is the budget below which key_fact_accuracy fell by more
than 0.02 on the eval's tune part; the cap the one past which more passage text stopped buying answers
(both chosen from the curve in evals/RESULTS.md). A slow host thus keeps the floor and waits longer, rather
than answering worse; a fast one stops at the cap rather than paying for text that does not help.

The budget is a function of the settings, the recorded rates and the question only, never of a clock read
while answering: the same question on the same host gets the same prompt, so answers stay reproducible and
an eval can be re-run. Through a model server no rates are measured, so the fixed `context_tokens` applies; the
in-process path matches it only with `context_tokens` set (or the probe off).
"""

from __future__ import annotations

from dataclasses import dataclass

from ragqa.config import Settings

# Seconds before prefill starts that do not depend on the budget: embedding the question, hybrid retrieval,
# focus, building the prompt (p50 ~0.3 s over the eval on an AVX-512 host, evals/RESULTS.md), rounded up.
OVERHEAD_S = 0.4
# Tokens each passage adds besides its text: "[n] (heading)\n" and the blank line between passages.
PER_PASSAGE = 16


@dataclass(frozen=True)
class Rates:
    """A model's measured speed on this host, tokens per second."""

    prefill_tok_s: float
    gen_tok_s: float
    source: str  # where the figures came from, shown in `ragqa config` and recorded with each answer


@dataclass(frozen=True)
class Budget:
    """The passage budget an answer used, and why (recorded in `ask --json` as "budget")."""

    tokens: int  # 0: whole passages, no focus
    source: str

    def as_dict(self) -> dict[str, int | str]:
        return {"tokens": self.tokens, "source": self.source}


def passage_budget(
    settings: Settings,
    rates: Rates | None,
    frame_tokens: int,
    n_passages: int,
    translation_tokens: tuple[int, int] | None = None,
) -> Budget:
    """The passage token budget for one question.

    `frame_tokens`: the prompt tokens evaluated besides the passages (the rules, the question in both forms;
    the system prompt too when its state is not cached). `translation_tokens`: (prompt, output) tokens of the
    translation call that ran first, when the question was translated: its time counts against the target.
    A `context_tokens` the user set, no target, or no measured rates (a model server, the probe off) keep
    the fixed budget `context_tokens`.
    """
    fixed = settings.context_tokens
    if settings.sources.get("context_tokens", "default") != "default":
        return Budget(fixed, f"context_tokens ({settings.sources['context_tokens']})")
    if settings.ttft_target_s is None:
        return Budget(fixed, "context_tokens (ttft_target_s off)")
    if rates is None or rates.prefill_tok_s <= 0 or rates.gen_tok_s <= 0:
        return Budget(fixed, "context_tokens (no measured rates for this model)")
    seconds = settings.ttft_target_s - OVERHEAD_S - 1.0 / rates.gen_tok_s
    if translation_tokens:
        prompt, output = translation_tokens
        seconds -= prompt / rates.prefill_tok_s + output / rates.gen_tok_s
    raw = int(rates.prefill_tok_s * seconds) - frame_tokens - PER_PASSAGE * n_passages
    tokens = max(settings.context_floor, min(settings.context_cap, raw))
    why = (
        f"ttft_target_s {settings.ttft_target_s:g} at {rates.prefill_tok_s:.0f} tok/s prefill, "
        f"{rates.gen_tok_s:.1f} tok/s generation ({rates.source})"
    )
    if tokens != raw:
        why += f"; {raw} clamped to [{settings.context_floor}, {settings.context_cap}]"
    return Budget(tokens, why)
