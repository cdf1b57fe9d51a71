"""One exception type for everything a user can cause or fix.

The CLI turns a `RagqaError` into a single red line and a non-zero exit; anything else is a bug.
"""


class RagqaError(Exception):
    """A failure with a message fit to show a user as one line (it should name the fix)."""

    exit_code = 1
