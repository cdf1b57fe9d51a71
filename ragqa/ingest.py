"""Load documents and split them into chunks that know exactly where they came from.

Each file format has one loader in `LOADERS` (suffix -> function from bytes to a `Document`), so a new
format is one entry. Plain text and Markdown are decoded as they are; PDF, DOCX and HTML are converted to
text first, and for those the chunk offsets refer to the *extracted* text, not the file's bytes. Converted
headings are rendered as Markdown `#` lines so the same heading finder serves every format, and PDFs keep
where each page starts so a chunk never spans two pages and a citation can name its page.

Every chunk keeps character offsets into the (decoded or extracted) text (`text == source[start:end]`),
the lines it spans (for `file:LINE-LINE` citations), its page for paged formats and the nearest heading
above it. Splitting is LangChain's recursive splitter with Chinese sentence ends added ahead of the
Western ones, and `keep_separator="end"` so that `。` closes the sentence it belongs to instead of opening
the next chunk.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import io
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ragqa.errors import RagqaError

# Highest priority first: paragraphs, lines, sentence ends (Chinese and Western), clauses, words, characters.
SEPARATORS = ["\n\n", "\n", "。", "！", "？", "；", "! ", "? ", "; ", ". ", "，", "、", ", ", " ", ""]

_MD_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
_CN_HEADING = re.compile(
    r"^(第[一二三四五六七八九十百零\d]+[章节部分篇]|[一二三四五六七八九十]+、|\d+(\.\d+)*[\s、.．]\s*\S)"
)
_SENTENCE_END = tuple("。！？；.!?;:：，,")
_PAGE_BREAK = "\n\n"  # between the pages of an extracted PDF: a paragraph break, so lines stay countable


class SkipFile(Exception):
    """A file that cannot be indexed; ingest warns and goes on."""


@dataclass(frozen=True)
class Chunk:
    id: str
    source: str  # path as given/stored (absolute)
    start: int
    end: int
    text: str
    heading: str
    start_line: int
    end_line: int
    page: int | None = None  # 1-based page for paged formats (PDF), else None

    @property
    def metadata(self) -> dict[str, object]:
        meta: dict[str, object] = {
            "source": self.source,
            "start": self.start,
            "end": self.end,
            "heading": self.heading,
            "start_line": self.start_line,
            "end_line": self.end_line,
        }
        if self.page is not None:  # Chroma metadata values cannot be None
            meta["page"] = self.page
        return meta


@dataclass(frozen=True)
class Document:
    """The text of one file as ragqa indexes it, plus page spans for paged formats.

    `pages` holds (page number from 1, start, end) offsets into `text`; empty for unpaged formats.
    `warnings` are things the user should hear about although the file is still indexed.
    """

    text: str
    pages: tuple[tuple[int, int, int], ...] = ()
    warnings: tuple[str, ...] = ()


def iter_files(paths: list[Path]) -> Iterator[Path]:
    """Supported files under the given paths, sorted; hidden files and symlinks leaving the root skipped."""
    for root in paths:
        if not root.exists():
            raise RagqaError(f"path {root} does not exist")
        if root.is_file():
            yield root.resolve()
            continue
        base = root.resolve()
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if not path.is_file() or path.suffix.lower() not in SUPPORTED_SUFFIXES:
                continue
            resolved = path.resolve()
            if path.is_symlink() and not resolved.is_relative_to(base):
                continue  # never follow a link out of the folder the user gave
            yield resolved


def decode(data: bytes, name: str) -> str:
    """Decode bytes as text, detecting the encoding; refuse binaries instead of indexing garbage."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(enc)
            except UnicodeDecodeError:
                raise SkipFile(f"{name}: starts with a {enc} byte-order mark but does not decode as {enc}") from None
    if b"\x00" in data[:8192]:
        text = _utf16_without_bom(data)
        if text is None:
            raise SkipFile(f"{name}: looks binary (NUL bytes), skipped")
        return text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # pragma: no cover - charset-normalizer is a dependency
        raise SkipFile(f"{name}: not UTF-8 and no encoding detector available, skipped") from None
    best = from_bytes(data).best()
    if best is None or best.encoding is None:
        raise SkipFile(f"{name}: not text in any encoding ragqa can detect, skipped")
    return str(best)


def _utf16_without_bom(data: bytes) -> str | None:
    """UTF-16/32 text written without a byte-order mark, else None (the caller calls the file binary).

    Zero bytes are normal in those encodings (every ASCII character carries one), so a NUL does not settle
    it: charset-normalizer decides, and only a wide Unicode encoding that decodes to (almost) no control
    characters is accepted for data that holds NULs.
    """
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None or not str(best.encoding).startswith(("utf_16", "utf_32")):
        return None
    text = str(best)
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f")
    return text if controls <= len(text) // 1000 else None


# ---- loaders: one per format, bytes in, Document out ------------------------------------------------------
def load_plain(data: bytes, name: str) -> Document:
    """Plain text and Markdown: decoded as they are (Markdown `#` headings are found by `find_headings`)."""
    return Document(decode(data, name))


def load_pdf(data: bytes, name: str) -> Document:
    """The text layer of each page, one span per page; pages without text are reported, never indexed empty.

    pypdf is called directly: LangChain's PyPDFLoader is a thin wrapper over the same two calls, lives in
    the sunset langchain-community package and costs a second of imports.
    """
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    texts: list[tuple[int, str]] = []
    unreadable: list[int] = []
    try:
        reader = PdfReader(io.BytesIO(data))  # pypdf itself tries the empty user password
        for number, page in enumerate(reader.pages, start=1):
            try:
                texts.append((number, page.extract_text() or ""))
            except (FileNotDecryptedError, DependencyError):
                raise
            except Exception:  # noqa: BLE001 - one broken page must not cost the others
                unreadable.append(number)
    except FileNotDecryptedError:
        raise SkipFile(f"{name}: encrypted PDF (needs a password), skipped") from None
    except DependencyError as exc:
        raise SkipFile(f"{name}: encrypted PDF that cannot be decrypted here ({exc}), skipped") from None

    parts: list[str] = []
    pages: list[tuple[int, int, int]] = []
    empty: list[int] = []
    pos = 0
    for number, raw in texts:
        text = raw.strip()
        if not text:
            empty.append(number)
            continue
        if parts:
            pos += len(_PAGE_BREAK)
        pages.append((number, pos, pos + len(text)))
        parts.append(text)
        pos += len(text)
    if not parts:
        if unreadable:
            raise SkipFile(f"{name}: no page of the PDF could be read, skipped")
        if not empty:
            raise SkipFile(f"{name}: PDF has no pages, skipped")
        raise SkipFile(f"{name}: no text layer (scanned?), skipped")
    warnings = []
    if empty:
        warnings.append(f"{name}: {_pages(empty)} no text layer (scanned?), not indexed")
    if unreadable:
        warnings.append(f"{name}: {_pages(unreadable)} could not be read, not indexed")
    return Document(_PAGE_BREAK.join(parts), tuple(pages), tuple(warnings))


def _pages(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10]) + (", …" if len(numbers) > 10 else "")
    return f"page {shown} has" if len(numbers) == 1 else f"pages {shown} have"


_DOCX_HEADING = re.compile(r"^(?:heading|标题)\s*([1-6])$", re.IGNORECASE)


def load_docx(data: bytes, name: str) -> Document:
    """Paragraphs and tables in document order (python-docx); Title and Heading N become `#` lines.

    LangChain's Docx2txtLoader flattens headings into body text, which would lose the chunk headings.
    """
    if data.startswith(b"\xd0\xcf\x11\xe0"):  # an OLE container: a password-protected DOCX or a legacy .doc
        raise SkipFile(f"{name}: encrypted DOCX (or an old .doc renamed .docx), skipped")
    import docx
    from docx.table import Table

    blocks: list[str] = []
    for item in docx.Document(io.BytesIO(data)).iter_inner_content():
        if isinstance(item, Table):
            rows = []
            for row in item.rows:
                cells: list[str] = []
                for cell in row.cells:
                    text = " ".join(cell.text.split())
                    if not cells or cells[-1] != text:  # a merged cell is listed once per grid column
                        cells.append(text)
                if any(cells):
                    rows.append(" | ".join(cells))
            if rows:
                blocks.append("\n".join(rows))
            continue
        text = item.text.strip()
        if not text:
            continue
        style = item.style.name if item.style is not None else ""
        match = _DOCX_HEADING.match(style or "")
        level = int(match.group(1)) if match else 1 if style == "Title" else 0
        blocks.append(f"{'#' * level} {' '.join(text.split())}" if level else text)
    return Document("\n\n".join(blocks))


# Never content: code, styling, and the navigation, banners and footers that repeat on every page of a site.
_HTML_NOISE = ["script", "style", "noscript", "template", "nav", "footer", "aside", "form", "iframe", "svg",
               "canvas", "button", "select", "object", "embed"]
_HTML_NOISE_ROLES = {"navigation", "banner", "contentinfo", "search", "complementary"}
_HTML_BLOCKS = ["address", "article", "blockquote", "dd", "div", "dl", "dt", "figcaption", "figure", "li", "main",
                "ol", "p", "pre", "section", "table", "ul", "hr"]


def load_html(data: bytes, name: str) -> Document:
    """Readable text of a page (beautifulsoup4) without scripts, styles, navigation, headers and footers.

    LangChain's BSHTMLLoader returns `get_text()` of the whole page, navigation and all, and drops
    headings; here `<h1>`-`<h6>` become `#` lines and block elements become paragraphs.
    """
    from bs4 import BeautifulSoup, Comment
    from bs4.dammit import EncodingDetector

    declared = EncodingDetector.find_declared_encoding(data, is_html=True)
    text = None
    if declared:
        try:
            text = data.decode(declared)
        except (LookupError, UnicodeDecodeError):
            text = None  # a wrong declaration: detect instead
    soup = BeautifulSoup(text if text is not None else decode(data, name), "html.parser")
    for node in soup.find_all(string=lambda s: isinstance(s, Comment)):
        node.extract()
    for tag in soup.find_all(_HTML_NOISE):
        if not tag.decomposed:  # a noise tag inside another one went with it
            tag.decompose()
    for tag in soup.find_all(attrs={"role": True}):
        if not tag.decomposed and str(tag.get("role", "")).lower() in _HTML_NOISE_ROLES:
            tag.decompose()
    for tag in soup.find_all("header"):  # the site banner, not an article's own header
        if not tag.decomposed and tag.find_parent(["article", "main", "section"]) is None:
            tag.decompose()
    for tag in soup.find_all(attrs={"hidden": True}):
        if not tag.decomposed:
            tag.decompose()
    title = " ".join(soup.title.get_text().split()) if soup.title else ""
    root = soup.find("main") or soup.body or soup
    for level in range(1, 7):
        for tag in root.find_all(f"h{level}"):
            tag.replace_with(f"\n\n{'#' * level} {' '.join(tag.get_text().split())}\n\n")
    for tag in root.find_all("br"):
        tag.replace_with("\n")
    for tag in root.find_all(["td", "th"]):
        tag.insert_after(" | ")
    for tag in root.find_all("tr"):
        tag.insert_after("\n")
    for tag in root.find_all(_HTML_BLOCKS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    lines = [" ".join(line.split()).rstrip(" |") for line in root.get_text().splitlines()]
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if title and not re.search(r"^# ", body, flags=re.MULTILINE):
        body = f"# {title}\n\n{body}"
    return Document(body)


# Suffix -> loader. A file of another suffix named explicitly on the command line is read as plain text.
LOADERS: dict[str, Callable[[bytes, str], Document]] = {
    ".txt": load_plain,
    ".text": load_plain,
    ".md": load_plain,
    ".markdown": load_plain,
    ".pdf": load_pdf,
    ".docx": load_docx,
    ".html": load_html,
    ".htm": load_html,
}
SUPPORTED_SUFFIXES = frozenset(LOADERS)


def load_document(path: Path, data: bytes | None = None) -> Document:
    """The indexable text of one file; `SkipFile` (with the reason) when there is none."""
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SkipFile(f"{path}: cannot read ({exc.strerror})") from None
    suffix = path.suffix.lower()
    try:
        doc = LOADERS.get(suffix, load_plain)(data, str(path))
    except SkipFile:
        raise
    except Exception as exc:  # noqa: BLE001 - parsers meet hostile files: skip this one, never the whole run
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        kind = suffix[1:].upper() or "text"
        raise SkipFile(f"{path}: not a readable {kind} file ({reason}), skipped") from None
    if not doc.text.strip():
        raise SkipFile(f"{path}: empty, skipped")
    return doc


def load_text(path: Path) -> str:
    return load_document(path).text


def find_headings(text: str) -> tuple[list[int], list[str]]:
    """Offsets and titles of heading lines: Markdown `#` lines, and numbered Chinese/outline titles."""
    offsets: list[int] = []
    titles: list[str] = []
    pos = 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        md = _MD_HEADING.match(stripped)
        title = None
        if md:
            title = md.group(1)
        elif 2 <= len(stripped) <= 40 and _CN_HEADING.match(stripped) and not stripped.endswith(_SENTENCE_END):
            title = stripped
        if title:
            offsets.append(pos)
            titles.append(title.strip("*# "))
        pos += len(line)
    return offsets, titles


def make_splitter(chunk_size: int, chunk_overlap: int, default_separators: bool = False):
    """The splitter; `default_separators` gives LangChain's stock one (the baseline pipeline's)."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    if chunk_size < 50:
        raise RagqaError(f"chunk_size {chunk_size} is too small (at least 50 characters)")
    if not 0 <= chunk_overlap < chunk_size:
        raise RagqaError(f"chunk_overlap must be between 0 and chunk_size ({chunk_size}), got {chunk_overlap}")
    if default_separators:
        return RecursiveCharacterTextSplitter(
            chunk_size=chunk_size, chunk_overlap=chunk_overlap, strip_whitespace=False, add_start_index=True
        )
    return RecursiveCharacterTextSplitter(
        chunk_size=chunk_size,
        chunk_overlap=chunk_overlap,
        separators=SEPARATORS,
        keep_separator="end",
        strip_whitespace=False,  # offsets must stay exact
        add_start_index=True,
    )


def chunk_id(source: str, digest: str, start: int, end: int) -> str:
    return hashlib.sha1(f"{source}\0{digest}\0{start}\0{end}".encode()).hexdigest()


def split_text(
    text: str,
    source: str,
    chunk_size: int,
    chunk_overlap: int,
    digest: str = "",
    default_separators: bool = False,
    pages: Sequence[tuple[int, int, int]] = (),
) -> list[Chunk]:
    """Chunks of `text`; with `pages` ((number, start, end) spans) each page is split on its own, so no
    chunk spans two pages. Offsets, lines and headings are always those of the whole text."""
    splitter = make_splitter(chunk_size, chunk_overlap, default_separators)
    head_offsets, head_titles = find_headings(text)
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    spans: Sequence[tuple[int | None, int, int]] = pages or [(None, 0, len(text))]
    chunks: list[Chunk] = []
    for page, span_start, span_end in spans:
        part = text[span_start:span_end]
        search_from = 0
        for doc in splitter.create_documents([part]):
            piece = doc.page_content
            start = doc.metadata.get("start_index", -1)
            if start < 0 or part[start : start + len(piece)] != piece:
                start = part.find(piece, search_from)  # the splitter's guess can miss on repeated text
                if start < 0:
                    raise RagqaError(f"{source}: internal error locating a chunk's offsets")
            end = start + len(piece)
            search_from = start + 1
            if not piece.strip():
                continue
            # Trim surrounding whitespace but keep offsets exact.
            lead = len(piece) - len(piece.lstrip())
            trail = len(piece) - len(piece.rstrip())
            start, end = span_start + start + lead, span_start + end - trail
            i = bisect.bisect_right(head_offsets, start) - 1
            heading = head_titles[i] if i >= 0 else ""
            chunks.append(
                Chunk(
                    id=chunk_id(source, digest, start, end),
                    source=source,
                    start=start,
                    end=end,
                    text=text[start:end],
                    heading=heading,
                    start_line=bisect.bisect_right(line_starts, start),
                    end_line=bisect.bisect_right(line_starts, max(start, end - 1)),
                    page=page,
                )
            )
    return chunks


def split_document(
    doc: Document, source: str, chunk_size: int, chunk_overlap: int, digest: str = "", default_separators: bool = False
) -> list[Chunk]:
    return split_text(doc.text, source, chunk_size, chunk_overlap, digest, default_separators, pages=doc.pages)
