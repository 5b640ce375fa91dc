"""User-facing errors: one clear line that says what was wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DMSError(Exception):
    """An error caused by the user's input (model, ratio, data, recipe, paths).

    The CLI prints its message on one line and exits with status 2; nothing is written.
    """


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" Did you mean 'x'? Available: a, b, c"`` for an unknown name."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Available: {', '.join(choices)}"
