import codecs
from pathlib import Path

import pytest

from ragqa.errors import RagqaError
from ragqa.ingest import SkipFile, decode, find_headings, iter_files, load_text, split_text

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
ENDS = tuple("。！？；.!?;\n") + ("。”", "！”", "？”")


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.txt")), ids=lambda p: p.name[:3])
def test_every_chunk_maps_back_to_its_file(path: Path) -> None:
    text = path.read_bytes().decode("utf-8")
    chunks = split_text(text, str(path), 400, 80)
    assert len(chunks) > 10
    for c in chunks:
        assert text[c.start : c.end] == c.text
        assert len(c.text) <= 400
        assert c.start_line == text.count("\n", 0, c.start) + 1
    # The whole file is covered: no text is lost between chunks (gaps are whitespace only).
    covered = sorted((c.start, c.end) for c in chunks)
    for (_, end), (start, _) in zip(covered, covered[1:], strict=False):
        assert not text[end:start].strip()


def test_chunks_end_at_sentence_ends_when_within_reach() -> None:
    text = (CORPUS / "004_a703b02180ffb9b2.txt").read_text(encoding="utf-8")
    chunks = split_text(text, "004", 400, 80)
    ends = [text[c.start : c.end + 1].rstrip().endswith(ENDS) or text[c.end : c.end + 1] == "\n" for c in chunks]
    assert sum(ends) / len(ends) >= 0.95, [c.text[-20:] for c, ok in zip(chunks, ends, strict=True) if not ok][:5]


def test_chinese_sentence_end_stays_with_its_sentence() -> None:
    text = "第一句话很长很长很长很长。" * 20 + "第二段！" * 30
    chunks = split_text(text, "x", 60, 0)
    assert all(c.text.endswith(("。", "！")) for c in chunks)
    assert not any(c.text.startswith(("。", "！")) for c in chunks)


def test_headings_markdown_and_chinese_outline() -> None:
    text = "# 总览\n\n正文一。\n\n第二章 模型\n\n正文二。\n\n1.2 规模化假说\n正文三。\n## Details\n"
    text += "Body text. " * 20
    offsets, titles = find_headings(text)
    assert titles == ["总览", "第二章 模型", "1.2 规模化假说", "Details"]
    chunks = split_text(text, "x", 60, 0)
    assert chunks[0].heading == "总览"
    late = [c for c in chunks if c.start > offsets[-1]]
    assert late and all(c.heading == "Details" for c in late)


def test_corpus_chunks_carry_headings() -> None:
    text = (CORPUS / "002_884cb864056d6651.txt").read_text(encoding="utf-8")
    chunks = split_text(text, "002", 400, 80)
    assert sum(1 for c in chunks if c.heading) / len(chunks) > 0.8


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("纯文本 UTF-8".encode(), "纯文本 UTF-8"),
        (codecs.BOM_UTF8 + "带 BOM 的文本".encode(), "带 BOM 的文本"),
        ("UTF-16 文本，足够长以便检测。".encode("utf-16"), "UTF-16 文本，足够长以便检测。"),
        ("这是一段用 GB18030 编码的中文文本，生成式人工智能正在改变世界。".encode("gb18030"),
         "这是一段用 GB18030 编码的中文文本，生成式人工智能正在改变世界。"),
    ],
)
def test_decode_detects_encodings(data: bytes, expected: str) -> None:
    assert decode(data, "f") == expected


def test_binary_and_empty_files_are_skipped(tmp_path: Path) -> None:
    with pytest.raises(SkipFile, match="binary"):
        decode(bytes(range(256)) * 10, "blob.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(SkipFile, match="empty"):
        load_text(empty)


def test_iter_files_filters_and_refuses_missing(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "b.md").write_text("b", encoding="utf-8")
    (tmp_path / "c.exe").write_bytes(b"MZ")
    (tmp_path / ".hidden.txt").write_text("h", encoding="utf-8")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("secret", encoding="utf-8")
    (tmp_path / "link.txt").symlink_to(outside)
    names = [p.name for p in iter_files([tmp_path])]
    assert names == ["a.txt", "b.md"]
    with pytest.raises(RagqaError, match="does not exist"):
        list(iter_files([tmp_path / "nope"]))
