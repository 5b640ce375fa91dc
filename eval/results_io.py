"""What every benchmark's results files share: paths written relative to the repository.

Example:
    >>> portable(str(ROOT / "eval" / "results"))
    'eval/results'
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def portable(text: str) -> str:
    """Paths in results files relative to the repository (no machine's own paths)."""
    return text.replace(str(ROOT) + "/", "").replace(str(ROOT.parent), "..")
