import codecs
import re
from pathlib import Path

import pytest

from ragqa.errors import RagqaError
from ragqa.ingest import SkipFile, decode, find_headings, iter_files, load_text, split_text

from .conftest import DEFAULT_MODEL, SMALL_MODEL, make_settings, run_cli

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


# ---- real document formats ---------------------------------------------------------------------------------
# Every file below is built by the library that writes that format (reportlab, python-docx, the codecs), so
# the loaders are tested against real files, not against strings shaped like what a parser would return.

PDF_PAGES = [
    ["第一页：引言。", "This report describes three lakes in the north.", "本报告介绍北方的三个湖泊。"],
    ["第二页：湖泊数据。", "青岚湖的最大水深是四十七米。", "The maximum depth of Qinglan Lake is 47 meters."],
    ["第三页：结论。", "All three lakes freeze in January.", "三个湖泊都在一月结冰。"],
]


def make_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A PDF with a real text layer; Chinese through the CID font every PDF reader ships (no font file)."""
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    pdf = canvas.Canvas(str(path))
    for lines in pages:
        pdf.setFont("STSong-Light", 12)
        for i, line in enumerate(lines):
            pdf.drawString(72, 760 - 20 * i, line)
        if not lines:
            pdf.rect(72, 400, 300, 200, fill=1)  # a picture and no text: what a scanned page looks like
        pdf.showPage()
    pdf.save()
    return path


def make_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_heading("白沙灯塔", level=0)  # the Title style
    document.add_paragraph("白沙灯塔位于海湾的北岸，是当地最古老的建筑之一。")
    document.add_heading("建造历史", level=1)
    document.add_paragraph("白沙灯塔建于1872年，由工程师林秋白设计。")
    document.add_heading("Keepers", level=2)
    document.add_paragraph("The last keeper, Mara Quill, left the lighthouse in 1961.")
    table = document.add_table(rows=2, cols=2)
    for row, (year, event) in zip(table.rows, [("年份", "事件"), ("1930", "改用电灯")], strict=True):
        row.cells[0].text, row.cells[1].text = year, event
    document.save(str(path))
    return path


HTML_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Moonfish Festival</title>
<style>.nav { color: red; } /* STYLE_NOISE */</style>
<script>var tracker = "SCRIPT_NOISE"; function go() { return 1; }</script></head>
<body>
<header><a href="/">SiteBanner HEADER_NOISE</a></header>
<nav><ul><li><a href="/">Home NAV_NOISE</a></li><li><a href="/about">About</a></li></ul></nav>
<main>
<article>
<h1>The Moonfish Festival</h1>
<p>The Moonfish festival is held every year in the harbour town of Harrowgate on 14 March.</p>
<h2>节日习俗</h2>
<p>人们在<b>月鱼节</b>当天放飞纸灯笼。</p>
<!-- COMMENT_NOISE -->
<table><tr><th>Day</th><th>Event</th></tr><tr><td>14 March</td><td>Lantern parade</td></tr></table>
</article>
<aside>Related links ASIDE_NOISE</aside>
</main>
<footer>Copyright FOOTER_NOISE 2024</footer>
<script>console.log("SCRIPT_NOISE_2")</script>
</body></html>
"""
HTML_NOISE = ["STYLE_NOISE", "SCRIPT_NOISE", "HEADER_NOISE", "NAV_NOISE", "COMMENT_NOISE", "ASIDE_NOISE",
              "FOOTER_NOISE", "function go", "color: red"]

MARKDOWN = """# Orchard notes

Some general remarks about the estate.

## Pears

The Redwick orchard grows 312 kinds of pear, more than any other orchard in the valley.

## Apples

Apples are grown only on the southern slope.
"""

ENCODED_TEXTS = {
    "utf-8": "紫藤书院简介\n紫藤书院的院长是周明远。\nThe academy was founded in 1901.\n",
    "utf-8-sig": "铜铃桥的故事\n铜铃桥全长二百零八米，横跨清水河。\nIt has nine arches.\n",
    "gb18030": "松鹤茶园\n松鹤茶园每年出产三千斤绿茶，主要销往杭州。\n茶园有一百二十名工人。\n",
    "utf-16": "金沙码头\n金沙码头每天有十二班渡轮开往东岛。\nFerries start at 6:30.\n",
}


def test_pdf_chunks_stay_on_their_page(tmp_path: Path) -> None:
    from ragqa.ingest import load_document

    pdf = make_pdf(tmp_path / "lakes.pdf", PDF_PAGES)
    doc = load_document(pdf)
    assert [number for number, _, _ in doc.pages] == [1, 2, 3]
    for (_, start, end), lines in zip(doc.pages, PDF_PAGES, strict=True):
        assert doc.text[start:end].splitlines() == lines  # the CID-font Chinese comes back exactly
    chunks = split_text(doc.text, str(pdf), 60, 10, pages=doc.pages)
    assert len(chunks) > len(PDF_PAGES)  # small chunks, so pages hold several
    spans = {number: (start, end) for number, start, end in doc.pages}
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text
        first, last = spans[c.page]
        assert first <= c.start < c.end <= last  # never across a page break
        assert c.metadata["page"] == c.page
    assert {c.page for c in chunks if "四十七米" in c.text} == {2}
    assert "page" not in split_text("无页码的文本。", "x.txt", 60, 10)[0].metadata


def test_scanned_pdf_is_reported_not_indexed(tmp_path: Path) -> None:
    from ragqa.ingest import load_document

    scanned = make_pdf(tmp_path / "scan.pdf", [[], []])
    with pytest.raises(SkipFile, match=r"scan\.pdf: no text layer \(scanned\?\)"):
        load_document(scanned)
    mixed = load_document(make_pdf(tmp_path / "mixed.pdf", [PDF_PAGES[0], [], PDF_PAGES[2]]))
    assert [number for number, _, _ in mixed.pages] == [1, 3]
    assert mixed.warnings == (f"{tmp_path / 'mixed.pdf'}: page 2 has no text layer (scanned?), not indexed",)


def test_encrypted_and_corrupt_files_are_skipped_by_name(tmp_path: Path) -> None:
    from pypdf import PdfWriter

    from ragqa.ingest import load_document

    good = make_pdf(tmp_path / "good.pdf", PDF_PAGES)
    locked = PdfWriter(clone_from=str(good))
    locked.encrypt("secret", algorithm="AES-128")
    locked.write(tmp_path / "locked.pdf")
    open_aes = PdfWriter(clone_from=str(good))
    open_aes.encrypt("", owner_password="owner", algorithm="AES-256")  # copy-protected, readable by anyone
    open_aes.write(tmp_path / "open.pdf")
    (tmp_path / "cut.pdf").write_bytes(good.read_bytes()[:300])
    (tmp_path / "junk.docx").write_bytes(b"PK\x03\x04 this is no zip archive" * 10)
    (tmp_path / "ole.docx").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(500))
    assert "四十七米" in load_document(tmp_path / "open.pdf").text
    for name, reason in [("locked.pdf", "encrypted PDF"), ("cut.pdf", "not a readable PDF"),
                         ("junk.docx", "not a readable DOCX"), ("ole.docx", "encrypted DOCX")]:
        with pytest.raises(SkipFile, match=reason) as info:
            load_document(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)


def test_docx_headings_become_chunk_headings(tmp_path: Path) -> None:
    from ragqa.ingest import load_document

    doc = load_document(make_docx(tmp_path / "lighthouse.docx"))
    assert doc.pages == ()
    assert doc.text.splitlines()[0] == "# 白沙灯塔"
    assert "# 建造历史" in doc.text and "## Keepers" in doc.text
    assert "年份 | 事件\n1930 | 改用电灯" in doc.text
    chunks = split_text(doc.text, "lighthouse.docx", 60, 0)
    by_fact = {c.heading for c in chunks if "1872" in c.text} | {c.heading for c in chunks if "Quill" in c.text}
    assert by_fact == {"建造历史", "Keepers"}
    assert all(c.page is None for c in chunks)


def test_html_keeps_the_article_and_drops_the_boilerplate(tmp_path: Path) -> None:
    from ragqa.ingest import load_document

    (tmp_path / "festival.html").write_text(HTML_PAGE, encoding="utf-8")
    text = load_document(tmp_path / "festival.html").text
    for noise in HTML_NOISE:
        assert noise not in text
    assert "held every year in the harbour town of Harrowgate on 14 March." in text
    assert "人们在月鱼节当天放飞纸灯笼。" in text  # inline tags do not break a Chinese sentence apart
    assert "Day | Event\n14 March | Lantern parade" in text
    chunks = split_text(text, "festival.html", 60, 0)
    assert {c.heading for c in chunks if "Harrowgate" in c.text} == {"The Moonfish Festival"}
    assert {c.heading for c in chunks if "纸灯笼" in c.text} == {"节日习俗"}


def test_html_charset_declared_or_detected(tmp_path: Path) -> None:
    from ragqa.ingest import load_document

    body = "<p>松鹤茶园每年出产三千斤绿茶，主要销往杭州。茶园有一百二十名工人。</p>"
    (tmp_path / "declared.htm").write_bytes(f'<html><head><meta charset="gbk"></head><body>{body}</body></html>'
                                           .encode("gbk"))
    (tmp_path / "bare.html").write_bytes(f"<html><body>{body}</body></html>".encode("gb18030"))
    for name in ("declared.htm", "bare.html"):
        assert load_document(tmp_path / name).text == "松鹤茶园每年出产三千斤绿茶，主要销往杭州。茶园有一百二十名工人。"


def test_markdown_headings_head_their_chunks(tmp_path: Path) -> None:
    from ragqa.ingest import load_document

    (tmp_path / "orchard.md").write_text(MARKDOWN, encoding="utf-8")
    doc = load_document(tmp_path / "orchard.md")
    assert doc.text == MARKDOWN
    chunks = split_text(doc.text, "orchard.md", 60, 0)
    assert {c.heading for c in chunks if "312" in c.text} == {"Pears"}
    assert {c.heading for c in chunks if "southern" in c.text} == {"Apples"}


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gb18030", "gbk", "utf-16", "utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("text", [ENCODED_TEXTS["gb18030"], ENCODED_TEXTS["utf-8"]], ids=["zh", "zh+en"])
def test_text_files_decode_to_the_exact_original(tmp_path: Path, encoding: str, text: str) -> None:
    from ragqa.ingest import load_document

    path = tmp_path / "notes.txt"
    path.write_bytes(text.encode(encoding))  # "utf-16" writes a BOM; "-le"/"-be" write none
    assert load_document(path).text == text


def test_utf16_detection_does_not_take_binaries_for_text() -> None:
    import struct

    with pytest.raises(SkipFile, match="binary"):
        decode(struct.pack("<200H", *range(200)), "counters.txt")  # zeros on one side, but control codes
    with pytest.raises(SkipFile, match="binary"):
        decode(struct.pack(">200H", *range(200)), "counters.txt")


def test_every_format_is_picked_up_and_unknown_suffixes_read_as_text(tmp_path: Path) -> None:
    from ragqa.ingest import LOADERS, load_document

    for name in ("a.pdf", "b.docx", "c.html", "d.htm", "e.md", "f.txt", "g.markdown", "h.exe", "i.rst"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in iter_files([tmp_path])] == [
        "a.pdf", "b.docx", "c.html", "d.htm", "e.md", "f.txt", "g.markdown"
    ]
    assert {".pdf", ".docx", ".html", ".htm", ".md", ".txt"} <= set(LOADERS)
    (tmp_path / "notes.rst").write_text("Title\n=====\n\n正文。\n", encoding="utf-8")
    assert load_document(tmp_path / "notes.rst").text == "Title\n=====\n\n正文。\n"  # named explicitly: plain text


# One question per format, each about a fact that only its file holds (the PDF's on page 2).
FORMAT_QUESTIONS = [
    ("青岚湖的最大水深是多少米？", "lakes.pdf", 2, ("四十七", "47")),
    ("白沙灯塔是哪一年建成的？", "lighthouse.docx", None, ("1872",)),
    ("Where is the Moonfish festival held?", "festival.html", None, ("Harrowgate",)),
    ("How many kinds of pear does the Redwick orchard grow?", "orchard.md", None, ("312",)),
    ("紫藤书院的院长是谁？", "utf-8.txt", None, ("周明远",)),
    ("铜铃桥全长多少米？", "utf-8-sig.txt", None, ("二百零八", "208")),
    ("松鹤茶园每年出产多少斤绿茶？", "gb18030.txt", None, ("三千", "3000", "3,000")),
    ("金沙码头每天有几班渡轮开往东岛？", "utf-16.txt", None, ("十二", "12")),
]


@pytest.mark.slow
def test_every_format_is_answered_with_a_citation_to_its_file_and_page(tmp_path: Path, models_dir: Path,
                                                                       embedder) -> None:
    from ragqa.chain import QA
    from ragqa.index import Index, Progress

    docs = tmp_path / "docs"
    docs.mkdir()
    make_pdf(docs / "lakes.pdf", PDF_PAGES)
    make_docx(docs / "lighthouse.docx")
    (docs / "festival.html").write_text(HTML_PAGE, encoding="utf-8")
    (docs / "orchard.md").write_text(MARKDOWN, encoding="utf-8")
    for encoding, text in ENCODED_TEXTS.items():
        (docs / f"{encoding}.txt").write_bytes(text.encode(encoding))
    make_pdf(docs / "scan.pdf", [[], []])
    (docs / "broken.docx").write_bytes(b"PK\x03\x04 not a zip archive" * 10)
    # The default 1.5B answers: each question's fact must be in its answer, and the 0.5B, since it runs with its
    # own RoPE settings, mostly replies "[1]" alone or takes another file's number ("312 [2]" for the tea garden).
    settings = make_settings(index=tmp_path / "index", models=models_dir, model=DEFAULT_MODEL, max_tokens=96)
    idx = Index(settings, embedder=embedder)
    warned: list[str] = []
    report = idx.ingest([docs], progress=Progress(warn=warned.append))

    assert report.files_added == 8, report
    assert sorted(Path(s.split(":")[0]).name for s in report.skipped) == ["broken.docx", "scan.pdf"]
    assert any("scan.pdf: no text layer (scanned?)" in w for w in warned)
    chunks = list(idx.load_chunks().values())
    indexed = "\n".join(c.text for c in chunks)
    assert not [noise for noise in HTML_NOISE if noise in indexed]
    assert {c.page for c in chunks if c.source.endswith("lakes.pdf")} == {1, 2, 3}
    assert {c.page for c in chunks if not c.source.endswith(".pdf")} == {None}
    stored = idx.store._collection.get(where={"source": str(docs / "lakes.pdf")}, include=["metadatas"])
    assert sorted(m["page"] for m in stored["metadatas"]) == [1, 2, 3]
    again = idx.ingest([docs], progress=Progress(warn=warned.append))
    assert again.files_unchanged == 10 and again.chunks_embedded == 0 and not again.skipped  # skips remembered

    qa = QA(settings, index=idx)
    for question, name, page, facts in FORMAT_QUESTIONS:
        answer = qa.ask(question)
        assert Path(answer.retrieved[0]["source"]).name == name, (question, answer.retrieved[0])
        assert answer.refused is False and answer.citations, (question, answer.answer)
        assert any(fact in (answer.answer or "") for fact in facts), (question, answer.answer)
        cited = [c for c in answer.citations if Path(c["source"]).name == name]
        assert cited, (question, answer.answer, answer.citations)
        assert {c["page"] for c in cited} == {page}

    env = {"RAGQA_INDEX": str(settings.index_dir), "RAGQA_MODELS": str(models_dir), "RAGQA_MODEL": SMALL_MODEL,
           "RAGQA_MAX_TOKENS": "96"}
    proc = run_cli("ask", FORMAT_QUESTIONS[0][0], env=env)
    assert proc.returncode == 0, proc.stderr
    sources = re.findall(r"^\[\d+\] (\S+) p\.(\d+)", proc.stdout, flags=re.MULTILINE)
    assert (str(docs / "lakes.pdf"), "2") in sources, proc.stdout
