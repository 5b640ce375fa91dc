"""The model card of a pruned checkpoint, built from its report.json, eval.json and config.json.

Example:
    >>> print(model_card("llama2-7b-dms20", repo_id="me/llama2-7b-dms20"))   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .config_compat import oldest_transformers

ARCHITECTURE_PLOT = "architecture.png"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def base_license(base_model: str | None) -> str | None:
    """The base model's licence: its card's metadata, or a recognisable LICENSE file, or the Hub."""
    if not base_model:
        return None
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        readme = folder / "README.md"
        if readme.is_file():
            text = readme.read_text()
            if text.startswith("---"):
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
                if meta.get("license"):
                    return str(meta["license"])
        license_file = folder / "LICENSE"
        if license_file.is_file():
            head = license_file.read_text()[:200].lower()
            for marker, name in (("mit license", "mit"), ("apache license", "apache-2.0"), ("llama 2", "llama2")):
                if marker in head:
                    return name
        return None
    try:  # a Hub name: ask the Hub, quietly, and go on without a licence when it cannot be reached
        from huggingface_hub import model_info

        card_data = model_info(base_model).card_data
        return getattr(card_data, "license", None) if card_data else None
    except Exception:
        return None


def _architecture_table(layers: list[dict]) -> list[str]:
    lines = ["| layer | kept | KV heads | Q heads | MLP channels |", "|---:|:---:|---:|---:|---:|"]
    for row in layers:
        if row["kept"]:
            lines.append(
                f"| {row['layer']} | yes | {row['kv_heads']}/{row['of_kv_heads']} | {row['q_heads']}/"
                f"{row['of_q_heads']} | {row['channels']}/{row['of_channels']} |"
            )
        else:
            lines.append(f"| {row['layer']} | dropped | - | - | - |")
    return lines


def _evaluation_table(evaluation: dict) -> list[str]:
    columns = [name for name in ("dense", "pruned") if name in evaluation] or list(evaluation)
    if not columns:
        return []
    first = evaluation[columns[0]]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines.append("| parameters | " + " | ".join(f"{evaluation[c]['params']:,}" for c in columns) + " |")
    for label in first.get("perplexity", {}):
        values = [evaluation[c]["perplexity"].get(label) for c in columns]
        lines.append(
            f"| perplexity {label} (seq {first.get('seq_len')}) | "
            + " | ".join(f"{v:.2f}" if v is not None else "-" for v in values)
            + " |"
        )
    tasks = (first.get("zero_shot") or {}).get("tasks", {})
    for task, metrics in tasks.items():
        for metric in ("acc", "acc_norm"):
            if metric in metrics:
                values = [evaluation[c]["zero_shot"]["tasks"][task].get(metric) for c in columns]
                lines.append(
                    f"| {task} {metric} (%) | "
                    + " | ".join(f"{100 * v:.2f}" if v is not None else "-" for v in values)
                    + " |"
                )
    if tasks:
        version = first["zero_shot"].get("lm_eval_version")
        lines += [
            "",
            f"Zero-shot accuracies from lm-eval {version} ({first['zero_shot'].get('source')}), "
            f"limit {first['zero_shot'].get('limit') or 'none'}.",
        ]
    return lines


def model_card(folder: str | Path, repo_id: str | None = None, license: str | None = None) -> str:
    """Markdown model card with YAML metadata for a checkpoint folder written by dms-llm."""
    folder = Path(folder)
    from .checkpoint import looks_like_path

    report = _read_json(folder / "report.json")
    evaluation = _read_json(folder / "eval.json")
    config = _read_json(folder / "config.json")
    base = report.get("model")
    per_layer = bool(config.get("dms_layer_shapes"))
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["dms-llm", "pruned", "structured-pruning", config.get("model_type", "llama")],
    }
    license = license or base_license(base)
    if base and not Path(base).expanduser().exists() and not looks_like_path(base):
        metadata["base_model"] = base  # a Hub id
    elif base:  # a local folder: its name, not a path on the machine that pruned it
        base = Path(base).name
    if license:
        metadata["license"] = license
    name = repo_id.split("/")[-1] if repo_id else folder.name
    params = report.get("params", {})
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    if params:
        lines += [
            f"`{base}` with {100 * params['ratio_achieved']:.1f}% of its parameters removed by structured pruning "
            "with dms-llm (Differentiable Model Scaling, ICML 2024): "
            f"**{params['before']:,} -> {params['after']:,} parameters** "
            f"(non-embedding {params['non_embedding_before']:,} -> {params['non_embedding_after']:,}; "
            f"target {params['target']:,}). Whole attention KV groups, MLP channels and decoder layers were "
            "removed, so the model is physically smaller and faster.",
            "",
        ]
    lines += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    repo = repo_id or str(folder)
    remote = ", trust_remote_code=True" if per_layer else ""
    lines += [
        f'model = AutoModelForCausalLM.from_pretrained("{repo}"{remote})',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "```",
        "",
    ]
    if per_layer:
        lines += [
            "Layers keep different numbers of heads and channels; the small `modeling_dms_pruned.py` beside "
            "the weights builds them (transformers only, no dms-llm needed).",
            "",
        ]
    if config.get("model_type"):
        lines += [f"Loads with transformers {oldest_transformers(config)} or later, 5.x included.", ""]
    lines += _how_it_was_made(report)
    if report.get("layers"):
        lines += ["## Architecture", "", f"![kept heads and channels per layer]({ARCHITECTURE_PLOT})", ""]
        lines += _architecture_table(report["layers"]) + [""]
    if evaluation:
        lines += ["## Evaluation", ""] + _evaluation_table(evaluation) + [""]
    elif report.get("perplexity"):
        q = report["perplexity"]
        lines += [
            "## Evaluation",
            "",
            f"Held-out perplexity on `{Path(str(q['source'])).name}` "
            f"(seq {q['seq_len']}): dense {q['dense']:.3f}, pruned {q['pruned']:.3f}"
            + (f", recovered {q['recovered']:.3f}" if "recovered" in q else "")
            + ".",
            "",
        ]
    lines += [
        "## Limitations",
        "",
        "Pruning removes capacity: check the evaluation above on your own task before "
        "relying on this model. Biases and limitations of the base model carry over.",
        "",
    ]
    return "\n".join(lines)


def _how_it_was_made(report: dict) -> list[str]:
    settings = report.get("settings", {})
    if not settings:
        return []
    lines = ["## How it was made", ""]
    if report.get("command"):
        lines += ["```bash", report["command"], "```", ""]
    data = settings.get("data", {})
    lines += [
        f"- targets: {', '.join(settings.get('targets', []))}; layout: {settings.get('layout')}",
        f"- calibration: `{Path(str(data.get('calib'))).name}`, {settings.get('calibration_blocks', '?')} blocks of "
        f"{data.get('seq_len')} tokens; {_how_searched(settings)}",
        f"- parameter target: {report['params']['target']:,} (ratio {report['params']['ratio_requested']:.3f})",
    ]
    recovery = report.get("recovery")
    if recovery:
        lines.append(
            f"- recovery: LoRA r={recovery['lora_r']}, {recovery['steps']} steps on "
            f"`{Path(str(recovery['data'])).name}`"
            + (", distilled from the dense model" if recovery.get("distill") else "")
            + ", merged"
        )
    versions = report.get("versions", {})
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return lines + [""]


MODE_WORDS = {
    "structure": "weights frozen",
    "lora": "LoRA adapters trained with the masks on frozen weights, then merged",
    "joint": "weights trained with the masks",
}
LOSS_WORDS = {
    "task": "cross-entropy",
    "kd": "KL to the dense model",
    "task+kd": "cross-entropy + KL to the dense model",
}


def _how_searched(settings: dict) -> str:
    """The search as the report resolved it, or the peer criterion that replaced it."""
    method = settings.get("method") or "dms"
    if method != "dms":
        return f"one-shot `{method}` criterion (no search)"
    search = settings.get("search", {})
    mode, loss = search.get("mode", "structure"), search.get("loss", "task")
    return (
        f"{search.get('steps')} search steps, {mode} mode ({MODE_WORDS.get(mode, mode)}), {LOSS_WORDS.get(loss, loss)}"
    )
