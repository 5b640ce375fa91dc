"""PruneReport: what was pruned, the parameter counts before/after, and how it was found.

Saved as ``report.json`` beside the checkpoint and printed as a table at the end of a run.

Example:
    >>> report = PruneReport.build(...)          # doctest: +SKIP
    >>> print(report.render())                   # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .architecture import Architecture
from .budget import Budget, ParamCounter


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"dms_llm": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass
class PruneReport:
    model: str
    model_type: str
    layout: str
    params: dict
    layers: list[dict]
    architecture: dict
    settings: dict
    search: dict = field(default_factory=dict)
    perplexity: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)  # {"dense": ..., "pruned": ...} from evaluate_model
    recovery: dict = field(default_factory=dict)  # LoRA recovery settings, history, perplexities
    command: str | None = None
    versions: dict = field(default_factory=versions)

    @classmethod
    def build(
        cls,
        model_name: str,
        model_type: str,
        layout: str,
        counter: ParamCounter,
        budget: Budget,
        arch: Architecture,
        params_after: int,
        non_embedding_after: int,
        group_size: int,
        settings: dict,
        search: dict | None = None,
    ) -> PruneReport:
        layers = []
        for index in range(arch.num_layers):
            kept = index in arch.kept_layers
            units = len(arch.kept_units[index]) if kept else 0
            layers.append(
                {
                    "layer": index,
                    "kept": kept,
                    "kv_heads": units,
                    "q_heads": units * group_size,
                    "of_kv_heads": arch.original_units[index],
                    "of_q_heads": arch.original_units[index] * group_size,
                    "channels": len(arch.kept_channels[index]) if kept else 0,
                    "of_channels": arch.original_channels[index],
                }
            )
        params = {
            "before": counter.total,
            "after": params_after,
            "target": budget.target,
            "non_embedding_before": counter.non_embedding,
            "non_embedding_after": non_embedding_after,
            "ratio_requested": round(budget.ratio, 6),
            "ratio_achieved": round(1.0 - params_after / counter.total, 6),
        }
        return cls(model_name, model_type, layout, params, layers, arch.to_dict(), settings, search or {})

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PruneReport:
        data = json.loads(Path(path).read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def render(self, width: int = 100) -> str:
        """The end-of-run summary: per-layer table, parameter counts and perplexity."""
        buffer = io.StringIO()
        console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
        table = Table(title=f"{Path(self.model).name}: {self.layout} layout")
        for column in ("layer", "kept", "KV heads", "Q heads", "MLP channels"):
            table.add_column(column, justify="right")
        for row in self.layers:
            if row["kept"]:
                table.add_row(
                    str(row["layer"]),
                    "yes",
                    f"{row['kv_heads']}/{row['of_kv_heads']}",
                    f"{row['q_heads']}/{row['of_q_heads']}",
                    f"{row['channels']}/{row['of_channels']}",
                )
            else:
                table.add_row(str(row["layer"]), "dropped", "-", "-", "-")
        console.print(table)
        p = self.params
        console.print(
            f"parameters: {p['before']:,} -> {p['after']:,} ({100 * p['ratio_achieved']:.2f}% removed; "
            f"target {p['target']:,} = {100 * p['ratio_requested']:.2f}%)"
        )
        console.print(f"non-embedding parameters: {p['non_embedding_before']:,} -> {p['non_embedding_after']:,}")
        if self.perplexity:
            q = self.perplexity
            console.print(
                f"perplexity ({Path(q['source']).name}, held-out tail, seq {q['seq_len']}): "
                f"dense {q['dense']:.3f} -> pruned {q['pruned']:.3f}"
                + (f" -> recovered {q['recovered']:.3f}" if "recovered" in q else ""),
                soft_wrap=True,
            )
        if self.recovery:
            r = self.recovery
            console.print(
                f"recovery: LoRA r={r['lora_r']} on {Path(str(r['data'])).name}, {r['steps']} steps"
                + (", distilled from the dense model" if r["distill"] else "")
                + (
                    f"; its held-out ppl {r['heldout_before']:.3f} -> {r['heldout_after']:.3f}"
                    if r.get("heldout_before")
                    else ""
                ),
                soft_wrap=True,
            )
        if self.search.get("method", "dms") != "dms":
            console.print(f"{self.search['method']} (one-shot criterion): {self.search.get('seconds')} s")
        elif self.search:
            console.print(f"search: {self.search.get('steps')} steps in {self.search.get('seconds')} s")
        text = buffer.getvalue()
        if self.evaluation:
            from .evaluate import render_evaluation

            text += render_evaluation(self.evaluation, width=width)
        return text
