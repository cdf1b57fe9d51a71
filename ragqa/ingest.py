"""Load documents and split them into chunks that know exactly where they came from.

Every chunk keeps character offsets into the decoded source text (`text == source[start:end]`), the lines
it spans (for `file:LINE-LINE` citations) and the nearest heading above it. Splitting is LangChain's
recursive splitter with Chinese sentence ends added ahead of the Western ones, and `keep_separator="end"`
so that `。` closes the sentence it belongs to instead of opening the next chunk.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ragqa.errors import RagqaError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES

# Highest priority first: paragraphs, lines, sentence ends (Chinese and Western), clauses, words, characters.
SEPARATORS = ["\n\n", "\n", "。", "！", "？", "；", "! ", "? ", "; ", ". ", "，", "、", ", ", " ", ""]

_MD_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
_CN_HEADING = re.compile(
    r"^(第[一二三四五六七八九十百零\d]+[章节部分篇]|[一二三四五六七八九十]+、|\d+(\.\d+)*[\s、.．]\s*\S)"
)
_SENTENCE_END = tuple("。！？；.!?;:：，,")


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

    @property
    def metadata(self) -> dict[str, object]:
        return {
            "source": self.source,
            "start": self.start,
            "end": self.end,
            "heading": self.heading,
            "start_line": self.start_line,
            "end_line": self.end_line,
        }


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
        raise SkipFile(f"{name}: looks binary (NUL bytes), skipped")
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


def load_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SkipFile(f"{path}: cannot read ({exc.strerror})") from None
    text = decode(data, str(path))
    if not text.strip():
        raise SkipFile(f"{path}: empty, skipped")
    return text


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
    text: str, source: str, chunk_size: int, chunk_overlap: int, digest: str = "", default_separators: bool = False
) -> list[Chunk]:
    splitter = make_splitter(chunk_size, chunk_overlap, default_separators)
    head_offsets, head_titles = find_headings(text)
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    chunks: list[Chunk] = []
    search_from = 0
    for doc in splitter.create_documents([text]):
        piece = doc.page_content
        start = doc.metadata.get("start_index", -1)
        if start < 0 or text[start : start + len(piece)] != piece:
            start = text.find(piece, search_from)  # the splitter's guess can miss on repeated text
            if start < 0:
                raise RagqaError(f"{source}: internal error locating a chunk's offsets")
        end = start + len(piece)
        search_from = start + 1
        if not piece.strip():
            continue
        # Trim surrounding whitespace but keep offsets exact.
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        start, end = start + lead, end - trail
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
            )
        )
    return chunks
