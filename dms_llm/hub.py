"""Publish a pruned checkpoint to the Hugging Face Hub with a generated model card.

One commit uploads the folder's files plus the card (``README.md``) and the architecture plot,
built in memory: the local checkpoint is only read, never modified. A missing token or a failed
upload is one clear error, and the local folder stays as it was.

Example:
    >>> url = push_to_hub("llama2-7b-dms20", "me/llama2-7b-dms20", private=True)   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

from .card import ARCHITECTURE_PLOT, model_card
from .errors import DMSError

SKIPPED = {"README.md", ARCHITECTURE_PLOT}  # replaced by the generated card and plot


def _check_folder(folder: Path) -> list[Path]:
    from .checkpoint import check_model_folder

    check_model_folder(folder)
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not any(p.suffix == ".safetensors" for p in files):
        raise DMSError(f"{str(folder)!r} has no .safetensors weights; dms-llm only publishes safetensors")
    pickles = [p.name for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if pickles:
        raise DMSError(f"{str(folder)!r} contains pickled files {pickles}; remove them before publishing")
    return files


def upload_operations(folder: str | Path, repo_id: str, license: str | None = None) -> list:
    """The files of one commit: the checkpoint, the generated card and the architecture plot."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    files = _check_folder(folder)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in files
        if path.relative_to(folder).as_posix() not in SKIPPED
    ]
    operations.append(CommitOperationAdd("README.md", model_card(folder, repo_id, license).encode()))
    report = folder / "report.json"
    if report.is_file():
        from .plots import architecture_png

        layers = json.loads(report.read_text()).get("layers")
        if layers:
            operations.append(CommitOperationAdd(ARCHITECTURE_PLOT, architecture_png(layers, repo_id)))
    return operations


def check_repo_id(repo_id: str) -> None:
    """A Hub repository id (user/name), checked before any work."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("it must look like user/name")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = str(error).strip().splitlines()[0]
        raise DMSError(f"{repo_id!r} is not a valid Hub repository id: {reason}") from None


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    license: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` with its card; returns the commit URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import OfflineModeIsEnabled

    folder = Path(folder).expanduser()
    check_repo_id(repo_id)
    operations = upload_operations(folder, repo_id, license)
    token = token or get_token()
    if not token:
        raise DMSError("no Hugging Face token: run `hf auth login` or set HF_TOKEN; the local checkpoint is untouched")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {folder.name} (pruned with dms-llm)",
            revision=revision,
        )
    except OfflineModeIsEnabled:
        raise DMSError("cannot upload while HF_HUB_OFFLINE=1; the local checkpoint is untouched") from None
    except Exception as error:  # HTTP status, connection, timeout: whatever the network did, one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DMSError(f"upload to {repo_id} failed: {first}; the local checkpoint is untouched") from None
    return info.commit_url
