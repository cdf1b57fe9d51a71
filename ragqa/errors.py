"""One exception type for everything a user can cause or fix.

The CLI turns a `RagqaError` into a single red line and a non-zero exit; anything else is a bug.
"""

from __future__ import annotations

import errno
from pathlib import Path


class RagqaError(Exception):
    """A failure with a message fit to show a user as one line (it should name the fix)."""

    exit_code = 1


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
# What SQLite (and Chroma, which wraps it) say for the same conditions; they carry no errno.
_NO_SPACE_TEXT = ("disk is full", "no space left", "file too large", "quota exceeded", "disk i/o error")
_NOT_WRITABLE_TEXT = ("readonly database", "read-only file system", "permission denied", "unable to open database")


def storage_error(exc: BaseException, where: Path | str, doing: str) -> RagqaError | None:
    """A user-fixable storage failure (full disk, read-only place) as one line, or None if it is not one.

    Disk full and read-only homes surface as OSError in our code but as message text from SQLite and Chroma,
    so both are recognised; the line says what was being done, where, and what to do about it.
    """
    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    said = next((t for t in _NO_SPACE_TEXT + _NOT_WRITABLE_TEXT if t in text), "")
    reason = getattr(exc, "strerror", None) or said
    if code in _NO_SPACE or said in _NO_SPACE_TEXT:
        return RagqaError(f"{doing} failed: {where}: {reason} (is the disk full?); free some space and run it again")
    if code in _NOT_WRITABLE or said in _NOT_WRITABLE_TEXT:
        return RagqaError(
            f"{doing} failed: {where} is not writable ({reason}); "
            "make it writable or point RAGQA_HOME (or --index / RAGQA_MODELS) elsewhere"
        )
    return None
