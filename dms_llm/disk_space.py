"""Room on disk: a run that cannot write its output refuses to start, and a disk that fills up
anyway gives one clear line instead of a traceback from inside safetensors.

A 70B prune searches for hours on eight GPUs and then writes a 110 GB checkpoint; a laptop's GGUF
export writes several GB, sometimes to a FAT32 stick whose files stop at 4 GiB. Found at the end,
a full disk costs the whole run. So every writing verb knows what it will write before any weights
load (an upper bound: the pruned model at its budget, the GGUF tensors' exact sizes, the search
state kept beside the output) and compares it with the free space of the disk that will hold it.
If the disk still fills up (another process, a quota), the partial copy is removed, as on any
failure, and the error says what happened and what to do.

Example:
    >>> check_room("out/llama-pruned", 110 * 2**30, "the pruned checkpoint")   # doctest: +SKIP
    >>> with disk_errors("out/llama-pruned", "the pruned checkpoint"):         # doctest: +SKIP
    ...     model.save_pretrained(staging)
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from .errors import DMSError

# beyond the tensors and tokenizer files: config, report, model card and the filesystem's own blocks
MARGIN = 4 * 2**20

# what a full disk, a quota or a file-size limit raise: OSError's errno, or safetensors' Rust
# I/O error, whose message ends in "(os error N)"
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# numpy's ``tofile`` (the GGUF writer's) reports a short write without its errno
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def size_text(n: int) -> str:
    """Bytes in the largest binary unit that keeps them >= 1: ``size_text(3 * 2**30)`` is ``'3.00 GiB'``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing parent: where a file or folder to be created will live."""
    path = Path(path).expanduser().absolute()
    return next((p for p in (path, *path.parents) if p.exists()), Path(path.anchor))


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the disk that holds, or will hold, ``path``."""
    return shutil.disk_usage(nearest_existing(path)).free


def check_room(
    path: str | os.PathLike, needed: int, what: str, fix: str = "free some space or write somewhere else"
) -> None:
    """Refuse (DMSError) when ``needed`` bytes, plus a margin, do not fit where ``path`` will be."""
    free = free_bytes(path)
    if needed + MARGIN > free:
        raise DMSError(
            f"writing {what} takes about {size_text(needed + MARGIN)} on the disk that holds {str(path)!r}, which "
            f"has {size_text(free)} free; {fix}"
        )


@cache
def check_download_room(repo_id: str, patterns: tuple[str, ...]) -> None:
    """Refuse a Hub download that the cache's disk cannot hold: huggingface_hub only warns, file
    by file, and a 70B model's 140 GB then fail part-way. The files matching ``patterns`` that the
    cache lacks are counted from the repository's listing; offline, or when the listing cannot be
    had (gated, missing), the download itself says what is wrong."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return
    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except Exception:  # gated without a token, no such repository, no network: left to the download
        return
    missing = [
        sibling
        for sibling in info.siblings or []
        if sibling.size
        and any(fnmatch(sibling.rfilename, pattern) for pattern in patterns)
        and not isinstance(try_to_load_from_cache(repo_id, sibling.rfilename, revision=info.sha), str)
    ]
    check_room(
        constants.HF_HUB_CACHE,
        sum(sibling.size for sibling in missing),
        f"{repo_id}'s {len(missing)} missing files into the Hugging Face cache",
        "free some space there, or point HF_HOME (or HF_HUB_CACHE) at a larger disk",
    )


def disk_error_code(error: BaseException, path: str | os.PathLike = ".") -> int | None:
    """ENOSPC, EDQUOT or EFBIG when ``error``, or an error it came from, is a failure for lack of
    room while writing to ``path``; None for any other error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = error.errno if isinstance(error, OSError) else None
        if code is None and (match := _OS_ERROR.search(str(error))):
            code = int(match.group(1))
        if code in DISK_ERRNOS:
            return code
        if isinstance(error, OSError) and code is None and _SHORT_WRITE.match(str(error)):
            # the disk took part of the data: it is full, or the file hit a size limit
            return errno.ENOSPC if free_bytes(path) < MARGIN else errno.EFBIG
        error = error.__cause__ or error.__context__
    return None


class DiskFullError(DMSError):
    """A write failed for lack of room: ``code`` is ENOSPC (a full disk), EDQUOT (a quota) or EFBIG
    (a file larger than the filesystem or ``ulimit -f`` allows)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@contextmanager
def disk_errors(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a full disk, an exceeded quota or a file too large for the filesystem, met while
    writing ``what`` to ``path``, into one DiskFullError; the caller removes its partial files."""
    try:
        yield
    except Exception as error:
        code = disk_error_code(error, path)
        if code is None:
            raise
        hint = (
            "this filesystem (or `ulimit -f`) does not allow a file that large (FAT32 stops at 4 GiB): "
            "write to another disk"
            if code == errno.EFBIG
            else f"{size_text(free_bytes(path))} free there now: free some space or write somewhere else"
        )
        where = f"could not write {what} to {str(path)!r}: {os.strerror(code)}"
        raise DiskFullError(f"{where} (the partial copy was removed); {hint}", code) from None


@contextmanager
def staged_folder(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """A hidden sibling of ``folder`` to write ``what`` into, renamed over ``folder`` when the block
    ends; when it fails (a full disk included, as one DiskFullError) the partial folder is removed
    and an earlier ``folder`` stays as it was.

    Example:
        >>> with staged_folder("state", "the search state") as staging:   # doctest: +SKIP
        ...     staging.mkdir(); save_file(tensors, staging / "state.safetensors")
    """
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with disk_errors(folder, what):
            yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():  # swapped, so that the folder is never missing while a reader looks
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(folder)
