"""The grounding mark on hand-made answers and passages: numbers, names and shared words."""

from ragqa.grounding import faithful, ground

PASSAGES = [
    "杰文斯在1865年出版的《煤炭问题》中指出，蒸汽机效率提高反而增加了煤炭消耗。",
    "GPT-4o mini 只有 80 亿参数，而 DeepSeek V3 总参数 6710 亿。",
]


def test_a_sentence_stating_what_its_passage_says_is_supported() -> None:
    marks = ground("杰文斯在1865年指出效率提高反而增加了煤炭消耗[1]。", PASSAGES)
    assert [m.supported for m in marks] == [True] and marks[0].passages == [1]
    assert faithful(marks) is True


def test_a_number_in_no_cited_passage_is_caught() -> None:
    marks = ground("杰文斯在1856年指出效率提高反而增加了煤炭消耗[1]。", PASSAGES)
    assert marks[0].supported is False and marks[0].unsupported == ["1856"]


def test_numbers_are_found_across_magnitudes_and_languages() -> None:
    marks = ground("GPT-4o mini has only 8 billion parameters [2].", PASSAGES)
    assert marks[0].supported is True, marks[0]
    wrong = ground("GPT-4o mini has 80 billion parameters [2].", PASSAGES)
    assert wrong[0].supported is False


def test_a_name_no_passage_holds_is_caught_and_plain_english_words_are_not() -> None:
    marks = ground("The paradox was described by Jevons in 1856 [1]. Llama-3 needs 8 GPUs [2].", PASSAGES)
    # "Jevons" is how English writes 杰文斯: a capitalised word is a translation, not checked; the year is.
    assert marks[0].supported is False and marks[0].unsupported == ["1856"]
    assert marks[1].supported is False and {"Llama-3", "8"} <= set(marks[1].unsupported)
    assert "needs" not in marks[1].unsupported


def test_a_sentence_citing_the_wrong_passage_is_unsupported() -> None:
    marks = ground("GPT-4o mini 只有 80 亿参数[1]。", PASSAGES)
    assert marks[0].supported is False and marks[0].passages == [1]


def test_a_same_language_sentence_needs_shared_words() -> None:
    marks = ground("量子计算机将在明年取代所有的传统服务器[1]。", PASSAGES)
    assert marks[0].supported is False and marks[0].unsupported == []


def test_uncited_sentences_are_checked_against_every_passage_and_lone_markers_skipped() -> None:
    marks = ground("DeepSeek V3 总参数 6710 亿。", PASSAGES)
    assert len(marks) == 1 and marks[0].supported is True and marks[0].passages == [1, 2]
    assert [m.passages for m in ground("DeepSeek V3 总参数 6710 亿。\n\n[2]", PASSAGES)] == [[2]]
    assert faithful(ground("", PASSAGES)) is None


def test_a_citation_after_the_period_counts_for_the_sentence_before_it() -> None:
    marks = ground("GPT-4o mini 只有 80 亿参数。 [2]", PASSAGES)
    assert len(marks) == 1 and marks[0].passages == [2] and marks[0].supported is True


def test_foreign_tokens_are_numbers_and_names_in_no_passage() -> None:
    from ragqa.grounding import foreign_tokens

    passages = ["GPT-4 于 2023 年发布，参数约 1.8 万亿。", "Llama 3 有 80亿 参数。"]
    assert foreign_tokens("GPT-4 was released in 2023 [1]; Llama 3 has 8 billion parameters [2].", passages) == []
    assert foreign_tokens("GPT-5 was released in 2024 [1].", passages) == ["2024", "GPT-5"]
    assert foreign_tokens("It was released in 2023 by the team.", passages) == []  # plain words are no names
    # list markers and numbers in Chinese words (第一, 一种) state no number
    listed = "两个要点：\n1. GPT-4 于 2023 年发布\n2. Llama 3 有 80亿 参数\n第一种说法 [1]"
    assert foreign_tokens(listed, passages) == []
