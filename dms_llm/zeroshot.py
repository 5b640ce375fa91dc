"""Zero-shot accuracy through lm-eval, on the in-memory model (no reload from disk).

Tasks use lm-eval's stock configs (prompts, choices, metrics, versions). With ``task_data``
(a folder of JSON-lines files named as in ``LOCAL_TASK_FILES``) each task reads its rows from
the local file instead of the Hub: a generated task YAML ``include``s the stock one and overrides
only the data source, so prompts and metrics stay exactly the stock ones.

Example:
    >>> results = zero_shot(model, tokenizer, ["boolq", "arc_easy"], limit=100)      # doctest: +SKIP
    >>> results["tasks"]["arc_easy"]["acc"]                                           # doctest: +SKIP
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import yaml
from torch import nn

from .errors import DMSError, did_you_mean

STANDARD_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# task -> (file in the task-data folder, split it stands for)
LOCAL_TASK_FILES = {
    "boolq": ("boolq.validation.jsonl", "validation"),
    "piqa": ("piqa.validation.jsonl", "validation"),
    "hellaswag": ("hellaswag.validation.jsonl", "validation"),
    "winogrande": ("winogrande.validation.jsonl", "validation"),
    "arc_easy": ("arc_easy.test.jsonl", "test"),
    "arc_challenge": ("arc_challenge.test.jsonl", "test"),
    "openbookqa": ("openbookqa.test.jsonl", "test"),
}

# where lm-eval keeps each standard task's config (checked, with the task index as fallback)
STOCK_CONFIGS = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}

# local files that are already preprocessed (so the stock process_docs must not run again)
PREPROCESSED = {"hellaswag"}


def parse_tasks(text: str | list[str] | None) -> list[str]:
    """``"default"`` or ``"all"`` means the seven standard zero-shot tasks."""
    if not text:
        return []
    names = text if isinstance(text, list) else [t.strip() for t in text.split(",") if t.strip()]
    result: list[str] = []
    for name in names:
        result.extend(STANDARD_TASKS if name in ("default", "all") else [name])
    return list(dict.fromkeys(result))


@functools.lru_cache(maxsize=1)
def _stock_manager():
    """lm-eval's index of its own task configs (building it scans ~10k YAML files: once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _stock_config_path(task: str) -> Path:
    import lm_eval.tasks

    known = Path(lm_eval.tasks.__file__).parent / STOCK_CONFIGS.get(task, "-")
    if known.is_file() and f"task: {task}\n" in known.read_text():
        return known
    entry = _stock_manager()._index.get(task)  # the index maps names to their YAML files
    if entry is None or getattr(entry, "yaml_path", None) is None:
        raise DMSError(f"unknown lm-eval task {task!r}." + did_you_mean(task, LOCAL_TASK_FILES))
    return Path(entry.yaml_path)


def write_local_task_configs(tasks: list[str], task_data: str | Path, folder: Path) -> None:
    """One YAML per task: the stock config with its dataset replaced by the local file."""
    data = Path(task_data).expanduser()
    if not data.is_dir():
        raise DMSError(f"task data folder {str(task_data)!r} does not exist")
    for task in tasks:
        if task not in LOCAL_TASK_FILES:
            raise DMSError(f"no local file layout known for task {task!r}; local tasks: " + ", ".join(LOCAL_TASK_FILES))
        filename, split = LOCAL_TASK_FILES[task]
        path = data / filename
        if not path.is_file():
            raise DMSError(f"task file {str(path)!r} is missing (needed for {task})")
        config = {
            "include": str(_stock_config_path(task)),
            "task": task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(path.resolve())}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
        }
        if task in PREPROCESSED:
            config["process_docs"] = None
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    batch_size: int = 8,
    task_data: str | Path | None = None,
    seed: int = 1234,
) -> dict:
    """acc / acc_norm per task, with the lm-eval version and each task's version."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DMSError("zero-shot evaluation needs lm-eval: pip install 'dms-llm[eval]'") from None
    tasks = parse_tasks(tasks)
    with tempfile.TemporaryDirectory(prefix="dms-llm-tasks-") as folder:
        if task_data is not None:
            write_local_task_configs(tasks, task_data, Path(folder))
            # only the generated configs are indexed; they include the stock ones by path
            manager = TaskManager(include_path=folder, include_defaults=False)
        else:
            manager = _stock_manager()
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise DMSError(f"unknown lm-eval task {unknown[0]!r}." + did_you_mean(unknown[0], STANDARD_TASKS))
        was_training = model.training
        model.eval()
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        finally:
            model.train(was_training)
    return summarize(output, tasks, limit, task_data)


def summarize(output: dict, tasks: list[str], limit, task_data) -> dict:
    import lm_eval

    results = {}
    for task in tasks:
        metrics = output["results"].get(task, {})
        row = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                row[metric] = float(metrics[f"{metric},none"])
                row[f"{metric}_stderr"] = _float(metrics.get(f"{metric}_stderr,none"))
        row["samples"] = int(output.get("n-samples", {}).get(task, {}).get("effective", 0))
        row["version"] = output.get("versions", {}).get(task)
        results[task] = row
    return {
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "tasks": results,
        "limit": limit,
        "source": "local files" if task_data is not None else "Hugging Face Hub",
    }


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
