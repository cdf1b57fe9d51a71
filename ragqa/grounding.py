"""A grounding mark on every answer sentence: is what it says in the passages it cites?

A small model copies numbers and names wrong more often than it invents whole sentences, and those are
what a reader acts on. So the check is cheap and literal: every number (in the digits-and-magnitudes form
of ragqa.textnorm, so "8 billion" finds 80 亿) and every Latin-letter name a sentence states must stand in
the passages it cites (or, citing none, in any passage given), and a sentence in the passages' own language
must share at least half of its word bigrams with them. An English sentence over Chinese passages can only
be checked on its numbers and names: it is marked supported when those hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ragqa.retrieve import overlap_grams, sentences
from ragqa.textnorm import MAGNITUDE, expand_magnitudes, normalize_text

_MARKER = re.compile(r"\[(\d+)\]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# A Latin-letter token that names something: has a capital after its first letter, a digit, or is all caps
# (GPT-4, MoE, DeepSeek, H100, RLHF); ordinary English words are not checked against Chinese passages.
_NAME = re.compile(r"\b[A-Za-z][A-Za-z0-9]*(?:[-.][A-Za-z0-9]+)*\b")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
MIN_SHARED_GRAMS = 0.5


def _is_name(token: str, in_chinese: bool) -> bool:
    if len(token) < 2:
        return False
    if in_chinese:
        return True
    return any(c.isdigit() for c in token) or any(c.isupper() for c in token[1:]) or token.isupper()


@dataclass
class SentenceMark:
    sentence: str
    supported: bool
    passages: list[int]  # 1-based passage numbers the sentence was checked against
    unsupported: list[str] = field(default_factory=list)  # numbers and names found in none of them

    def as_dict(self) -> dict[str, object]:
        return {"sentence": self.sentence, "supported": self.supported, "passages": self.passages,
                "unsupported": self.unsupported}


def _numbers(text: str) -> set[str]:
    norm = normalize_text(text)
    return set(_NUMBER.findall(norm)) | set(_NUMBER.findall(expand_magnitudes(norm)))


def missing_tokens(text: str, source: str) -> list[str]:
    """The numbers (by value where they carry a magnitude: 8 billion = 80亿) and the Latin-letter names that
    `text` states and `source` does not hold, in the order `text` states them. Numbers come back in the
    normalised form they were checked in; names as written."""
    bare = _MARKER.sub("", text)
    have = _numbers(source)
    stated = normalize_text(bare)
    # A number with a magnitude (8 billion, 80亿) is checked by its value, any other number as written.
    values = [expand_magnitudes(m.group(0)) for m in MAGNITUDE.finditer(stated)]
    values += _NUMBER.findall(MAGNITUDE.sub(" ", stated))
    missing = [v for v in dict.fromkeys(values) if v not in have]
    in_chinese = bool(_CJK.search(bare))
    lowered = source.lower()
    for token in dict.fromkeys(_NAME.findall(bare)):
        if _is_name(token, in_chinese) and token.lower() not in lowered:
            missing.append(token)
    return missing


# "1. ", "2、", "(3) " opening a line number a list, state nothing; normalised, "2. 2018" would read 2.2018.
_LIST_MARKER = re.compile(r"(?m)^\s*(?:\(?\d{1,2}[.、)）]|[-*•])\s*")
_CJK_NUMERAL = re.compile(r"(?<![\d.])[零一二两三四五六七八九十百千万亿]+")


def foreign_tokens(answer: str, passages: list[str]) -> list[str]:
    """Numbers and Latin-letter names of `answer` that stand in none of `passages` (what the model saw): the
    slips the answer is written once more for (chain.QA, `fact_check`). List markers are no numbers; only
    numbers written in digits count (一种, 第一点 are words, and normalised they would be 1s that no passage
    states); a number that is part of a missing name (the 5 of GPT-5) is that name's slip, named once."""
    text = _LIST_MARKER.sub(" ", _CJK_NUMERAL.sub("", answer))
    missing = missing_tokens(text, " ".join(passages))
    names = [t for t in missing if not _NUMBER.fullmatch(t)]
    return [t for t in missing if not (_NUMBER.fullmatch(t) and any(t in n for n in names))]


def check_sentence(sentence: str, passages: dict[int, str], cited: list[int]) -> SentenceMark:
    """Mark one sentence against the cited passages (all passages when it cites none)."""
    numbers_of = sorted(cited) if cited else sorted(passages)
    text = " ".join(passages[n] for n in numbers_of if n in passages)
    bare = _MARKER.sub("", sentence)
    missing = missing_tokens(sentence, text)
    in_chinese = bool(_CJK.search(bare))
    same_language = in_chinese == bool(_CJK.search(text))
    shared_ok = True
    if same_language:
        grams = overlap_grams(bare)
        shared_ok = not grams or len(grams & overlap_grams(text)) / len(grams) >= MIN_SHARED_GRAMS
    return SentenceMark(sentence.strip(), not missing and shared_ok, numbers_of, missing)


def ground(answer: str, passages: list[str]) -> list[SentenceMark]:
    """One mark per sentence of `answer`; `passages` are the texts the model saw, [1] first."""
    numbered = {i: p for i, p in enumerate(passages, start=1)}
    pieces: list[tuple[str, list[int]]] = []
    for sentence in sentences(answer):
        cited = [int(n) for n in _MARKER.findall(sentence) if int(n) in numbered]
        if not _MARKER.sub("", sentence).strip(" \n。.，,;；:：-—"):
            if pieces and cited:  # "…。 [1]": a citation after the period belongs to the sentence before it
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + cited)
            continue
        pieces.append((sentence, cited))
    return [check_sentence(sentence, numbered, cited) for sentence, cited in pieces]


def faithful(marks: list[SentenceMark]) -> bool | None:
    """Whether every sentence of an answer is supported; None for an answer with no sentence to check."""
    return all(m.supported for m in marks) if marks else None
