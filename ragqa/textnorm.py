"""One written form for facts written many ways: digits for Chinese and English numerals, one spelling per
unit, magnitudes in digits.

The eval matches key facts in this form (an answer writing 四十种 has the fact 40种), and the grounding check
looks for an answer's numbers in its passages in it (an English "8 billion" stands in a passage as 80 亿).
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal

_THOUSANDS = re.compile("(?<=\\d)[,\uff0c](?=\\d)")  # ASCII or full-width comma
_SPACE = re.compile(r"\s+")

# Chinese numerals, so that a must_include "4" matches an answer's "第四次" and "90%" matches "百分之九十".
_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8,
              "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000}
_CN_NUMERAL = re.compile("[零〇一二两三四五六七八九十百千]+")
# A lone 一 is a word as often as a number (一种, 统一, 一起): it becomes 1 only as an ordinal or before a
# measure word, so a must_include "1" does not match every sentence with 一 in it.
_LONE_ONE_CONTEXT = re.compile("第一|一(?=[个次种项年月日位名倍代轮层条款点章节部])")
_PERCENT_CN = re.compile("\x00(\\d+(?:\\.\\d+)?)")  # \x00 stands for 百分之 meanwhile
_PERCENT_WORD = re.compile(r"(?<=\d)(?:percent|per cent|pct)")
# Spellings of one unit; applied after spaces are removed and text is case-folded.
_UNIT_SPELLINGS = (
    ("千兆字节", "gb"), ("吉字节", "gb"), ("gigabytes", "gb"), ("gigabyte", "gb"),
    ("兆字节", "mb"), ("megabytes", "mb"), ("megabyte", "mb"),
    ("terabytes", "tb"), ("terabyte", "tb"),
    ("千瓦时", "kwh"), ("兆瓦", "mw"), ("千瓦", "kw"),
)


# English number words as digits ("eight months" = "8 months"); "one" stays a word (the one, one of).
_EN_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        "zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
    if w != "_"
}
_EN_NUMBERS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
                    "ninety": "90", "hundred": "100"})
_EN_NUMBER = re.compile(r"\b(" + "|".join(_EN_NUMBERS) + r")\b")
_EN_COMPOUND = re.compile(r"\b(twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)[- ](one|two|three|four|five|six|"
                          r"seven|eight|nine)\b")


def _english_numbers(text: str) -> str:
    text = _EN_COMPOUND.sub(lambda m: str(int(_EN_NUMBERS[m.group(1)]) + ("one two three four five six seven eight "
                                          "nine".split().index(m.group(2)) + 1)), text)
    return _EN_NUMBER.sub(lambda m: _EN_NUMBERS[m.group(1)], text)


def chinese_numeral_value(numeral: str) -> int | None:
    """Value of a Chinese numeral below 10,000 (四 4, 十二 12, 二十 20, 一百零五 105, 两千 2000), else None.

    Digit-by-digit forms (二〇二四 for 2024) read as digits. Two digits side by side are a range, not a
    number (两三个 is "two or three"), and runs that are not a well-formed number (二二十) give None: both
    are left as they are.
    """
    if not numeral:
        return None
    if all(c in _CN_DIGITS for c in numeral):
        if len(numeral) == 1:
            return _CN_DIGITS[numeral]
        if len(numeral) == 2 and not set(numeral) & {"零", "〇"}:
            return None
        return int("".join(str(_CN_DIGITS[c]) for c in numeral))
    total, digit, last_unit = 0, None, 10_000
    for c in numeral:
        if c in _CN_DIGITS:
            if digit is not None and _CN_DIGITS[c] != 0:
                return None
            digit = _CN_DIGITS[c] or None
        else:
            unit = _CN_UNITS[c]
            if unit >= last_unit:
                return None
            total += (1 if digit is None else digit) * unit
            digit, last_unit = None, unit
    return total + (digit or 0)


def _arabic(match: re.Match[str]) -> str:
    run = match.group(0)
    value = chinese_numeral_value(run)
    return run if value is None else str(value)


def chinese_numerals_to_digits(text: str) -> str:
    """Chinese numerals written as Arabic digits (第四次 -> 第4次, 十二 -> 12); a lone 一 only as an ordinal
    or before a measure word (see _LONE_ONE_CONTEXT)."""
    out, pos = [], 0
    for m in _CN_NUMERAL.finditer(text):
        run = m.group(0)
        out.append(text[pos : m.start()])
        if run == "一" and not _LONE_ONE_CONTEXT.match(text, max(0, m.start() - 1)) and not _LONE_ONE_CONTEXT.match(
            text, m.start()
        ):
            out.append(run)
        else:
            out.append(_arabic(m))
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def normalize_text(text: str) -> str:
    """Canonical form for key-fact matching, so that the same fact written differently is one string:
    "1,000" = "1000", full-width = half-width, "8 GB" = "8GB" = "8 千兆字节", "第四次" = "第4次",
    "两" = "2", "eight" = "8", "百分之九十" = "90%" = "90 percent"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _english_numbers(text)  # before spaces go: words need their bounds
    text = _SPACE.sub("", text)
    text = _THOUSANDS.sub("", text)
    for spelling, unit in _UNIT_SPELLINGS:  # first: 千兆字节 holds a numeral
        text = text.replace(spelling, unit)
    text = chinese_numerals_to_digits(text.replace("百分之", "\x00"))
    text = _PERCENT_CN.sub(r"\1%", text)
    text = _PERCENT_WORD.sub("%", text)
    return text.replace("\x00", "百分之")


MAGNITUDE = re.compile(r"(\d+(?:\.\d+)?)(万亿|亿|万|trillion|billion|million|thousand)")
_MAGNITUDES = {"万亿": 10**12, "亿": 10**8, "万": 10**4, "trillion": 10**12, "billion": 10**9, "million": 10**6,
               "thousand": 10**3}


def expand_magnitudes(normalized: str) -> str:
    """Numbers with a magnitude word written out in digits, so that 80亿 = 8 billion = 8000000000."""
    def whole(m: re.Match[str]) -> str:
        value = Decimal(m.group(1)) * _MAGNITUDES[m.group(2)]
        return format(value.normalize(), "f") if value == value.to_integral() else m.group(0)

    return MAGNITUDE.sub(whole, normalized)


_CN_MAGNITUDE = re.compile(r"(\d+(?:\.\d+)?|[零〇一二两三四五六七八九十百千]+)\s*(万亿|亿|万)(?!分之)")
_EN_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))


def english_magnitude(number: str, unit: str) -> str | None:
    """The English for a Chinese count with 万/亿/万亿 (467 亿 -> "46.7 billion", 3000 亿 -> "300 billion",
    400 万 -> "4 million"); None for a numeral that is not one number (两三)."""
    if number[0].isdigit():
        value_cn: Decimal | int | None = Decimal(number)
    elif not set(number) & set(_CN_DIGITS):
        return None  # 千万 and 百万 alone are as often words (千万不要 "by all means do not") as counts
    else:
        value_cn = chinese_numeral_value(number)
    if value_cn is None:
        return None
    value = Decimal(value_cn) * _MAGNITUDES[unit]
    for scale, word in _EN_SCALES:
        if value >= scale:
            scaled = (value / scale).quantize(Decimal("0.001")).normalize()
            return f"{format(scaled, 'f')} {word}"
    return None


def with_english_magnitudes(text: str) -> str:
    """Chinese counts written in English: "467亿" -> "46.7 billion".

    Asked in English about a Chinese passage, the 1.5B model read 467 亿 as "467 billion" and 15 亿 as
    "15 billion" (亿 is 10^8, a unit English does not have); shown both forms ("467亿 (46.7 billion)") it
    wrote both. The conversion is arithmetic, so the chain does it and the model copies it. Only the
    prompt's copy of a passage is changed, never the stored text; the grounding check reads either form as
    one number (expand_magnitudes).
    """
    def english(m: re.Match[str]) -> str:
        return english_magnitude(m.group(1), m.group(2)) or m.group(0)

    return _CN_MAGNITUDE.sub(english, text)
