"""One run at a time per output, and no litter from runs that were killed.

``claim_output(out)`` holds an exclusive lock (``.NAME.lock`` beside the output, through
``filelock``) for as long as a run may write ``out``: a second run into the same output fails at
once with one line instead of interleaving with the first. The operating system drops the lock when
its process dies, even from SIGKILL, so a killed run never blocks the next one; and because no live
run can hold the lock while we do, every staging folder or file of ``out`` that is still there
(``.NAME.tmp-*`` from a save killed half-way, ``..NAME.search-state.tmp-*`` from a killed state
save) is litter, and is removed. Only names built from ``out``'s own name and this tool's staging
prefixes are touched.

Example:
    >>> from pathlib import Path
    >>> with claim_output(Path("llama-dms-20")):  # doctest: +SKIP
    ...     save_pruned(model, tokenizer, "llama-dms-20")
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DMSError


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def stale_staging(out: Path) -> list[Path]:
    """Staging leftovers of ``out`` written by dms-llm (its own hidden name patterns only)."""
    parent = out.parent if str(out.parent) else Path(".")
    patterns = (f".{out.name}.tmp-*", f"..{out.name}.search-state.tmp-*")
    return sorted(path for pattern in patterns for path in parent.glob(pattern))


@contextmanager
def claim_output(out: str | os.PathLike) -> Iterator[list[Path]]:
    """Hold ``out`` for this run; yields the stale staging paths that were removed."""
    from filelock import FileLock, Timeout

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(out)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DMSError(
            f"another dms-llm run is writing {str(out)!r} right now; wait for it to finish or choose another output"
        ) from None
    try:
        removed = stale_staging(out)
        for path in removed:  # no live run holds the lock, so nobody is writing these
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        yield removed
    finally:
        lock.release()
        # filelock keeps the file (unlinking a lock others wait on splits them); no run here waits
        # (timeout 0), so the empty file is removed rather than left beside the user's output
        lock_path(out).unlink(missing_ok=True)
