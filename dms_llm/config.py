"""Run settings as dataclasses, YAML recipes and ``key=value`` overrides.

Precedence (lowest to highest): dataclass defaults < recipe YAML < CLI flags < ``key=value``.

Example:
    >>> config = PruneConfig.from_dict({"ratio": 0.3, "search": {"steps": 100}})
    >>> config = apply_overrides(config, ["search.lr=0.05", "layout=uniform"])
    >>> config.search.lr, config.layout
    (0.05, 'uniform')
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import DMSError, did_you_mean

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class DataConfig:
    """Calibration text: a named source (wikitext2, c4, alpaca) or a local .txt/.jsonl/.parquet."""

    calib: str = "wikitext2"
    split: str = "train"
    text_field: str = "text"
    num_blocks: int = 1024  # distinct calibration blocks (fewer passes over each: less fitting of the domain)
    seq_len: int = 128
    heldout_fraction: float = 0.1  # tail of the token stream kept out of calibration, for perplexity

    def validate(self) -> None:
        _check(self.num_blocks >= 1, "data.num_blocks must be at least 1")
        _check(self.seq_len >= 2, "data.seq_len must be at least 2 tokens")
        _check(0.0 <= self.heldout_fraction < 1.0, "data.heldout_fraction must be in [0, 1)")


LOSSES = ("auto", "task", "kd", "task+kd")
SEARCH_MODES = ("auto", "structure", "joint", "lora")
METHODS = ("dms", "magnitude", "taylor", "flap", "minitron", "shortgpt", "random")  # dms, then the peers


@dataclass
class SearchConfig:
    """The DMS calibration loop."""

    mode: str = "auto"  # "structure": weights frozen, only keep ratios learn; "joint": weights train too;
    # "lora": LoRA adapters train with the ratios (frozen weights), merged before slicing; "auto": see resolved()
    steps: int = 300
    batch_size: int = 8  # blocks per micro-batch and process
    grad_accum: int = 1  # micro-batches per step and process
    lr: float = 0.02
    budget_weight: float = 10.0
    decay_fraction: float = 0.6  # the target decays from full size to the budget over this part
    refine_fraction: float = 0.2  # last part: heads and layers frozen, channels refine
    temperature_heads: float = 4.0
    temperature_channels: float = 1.0
    temperature_layers: float = 4.0
    importance_beta: float = 0.99
    mask_forward: str = "straight_through"  # or "soft"
    layer_importance: str = "skip_loss"  # or "taylor"
    layer_score_every: int = 50
    score_blocks: int = 16  # blocks used for layer scores and the layer guard
    layer_score_budget: float = 0.08  # share of the search's compute that layer scoring may use
    gradient_checkpointing: bool = False
    save_every: int = 50  # steps between resumable state saves (0: never)
    loss: str = "auto"  # task: cross-entropy on the text; kd: KL to the dense model; task+kd; auto: resolved()
    weight_lr: float = 1e-4  # joint mode: learning rate of the weights
    distill_weight: float = 1.0  # weight of the KL to the dense model (the same weights, masks off)
    distill_topk: int = 64  # teacher log-probabilities kept per token (the rest is one bucket)
    lora_r: int = 8  # lora mode: adapter rank
    lora_alpha: int = 16
    lora_lr: float = 3e-3  # lora mode: learning rate of the adapters

    def resolved(self, teacher: bool = True) -> SearchConfig:
        """This config with ``auto`` mode and loss made concrete (the winners of eval/benchmark_quality.py).

        mode ``auto``: ``lora`` (adapters train with the ratios: far better in and out of domain than
        frozen weights, at 1.17x structure mode's step memory at the 1B shape; sharded with
        ``--shard`` too, where the adapters stay whole on every rank beside the sharded weights).
        loss ``auto``: ``task+kd`` when weights or adapters train (the dense model's distribution
        keeps them general), ``task`` in structure mode (KL there costs quality in domain and does
        not help reliably out of it), and ``task`` whenever ``distill_weight`` is 0 or no teacher
        is at hand (``teacher=False``).

        Example:
            >>> SearchConfig().resolved().mode, SearchConfig(mode="structure").resolved().loss
            ('lora', 'task')
        """
        mode = self.mode if self.mode != "auto" else "lora"
        loss = self.loss
        if loss == "auto":
            loss = "task+kd" if mode != "structure" and self.distill_weight > 0 and teacher else "task"
        return dataclasses.replace(self, mode=mode, loss=loss)

    def validate(self) -> None:
        _check(self.mode in SEARCH_MODES, f"search.mode must be one of {', '.join(SEARCH_MODES)}, got {self.mode!r}")
        _check(
            self.lora_r >= 1 and self.lora_alpha > 0 and self.lora_lr > 0,
            "search.lora_r >= 1, lora_alpha > 0, lora_lr > 0",
        )
        _check(self.grad_accum >= 1 and self.save_every >= 0, "search.grad_accum >= 1 and search.save_every >= 0")
        _check(self.weight_lr > 0 and self.distill_weight >= 0, "search.weight_lr > 0, search.distill_weight >= 0")
        _check(self.distill_topk >= 1, "search.distill_topk must be at least 1")
        _check(self.loss in LOSSES, f"search.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        kd_ok = self.loss in ("auto", "task") or self.distill_weight > 0
        _check(kd_ok, f"search.loss={self.loss} needs search.distill_weight > 0")
        _check(self.steps >= 1, "search.steps must be at least 1")
        _check(self.batch_size >= 1, "search.batch_size must be at least 1")
        _check(self.lr > 0, "search.lr must be positive")
        _check(self.budget_weight >= 0, "search.budget_weight must be >= 0")
        _check(0 <= self.decay_fraction <= 1 and 0 <= self.refine_fraction < 1, "search fractions must be in [0, 1)")
        _check(
            self.decay_fraction + self.refine_fraction <= 1.0,
            "search.decay_fraction + search.refine_fraction must not exceed 1",
        )
        _check(0 <= self.importance_beta < 1, "search.importance_beta must be in [0, 1)")
        _check(
            self.mask_forward in ("straight_through", "soft"),
            f"search.mask_forward must be 'straight_through' or 'soft', got {self.mask_forward!r}",
        )
        _check(
            self.layer_importance in ("skip_loss", "taylor"),
            f"search.layer_importance must be 'skip_loss' or 'taylor', got {self.layer_importance!r}",
        )
        _check(self.layer_score_every >= 1 and self.score_blocks >= 1, "layer scoring settings must be >= 1")
        _check(0.0 <= self.layer_score_budget <= 1.0, "search.layer_score_budget must be in [0, 1]")


@dataclass
class EvalConfig:
    """Evaluation: held-out perplexity, named/file perplexity sources and lm-eval tasks."""

    heldout: bool = True  # perplexity on the held-out tail of the calibration source
    ppl: list[str] = field(default_factory=list)  # wikitext2, ptb, c4 or text files
    tasks: list[str] = field(default_factory=list)  # lm-eval task names, or "default"
    seq_len: int = 128  # 128 as LLM-Pruner reports; 2048 as SliceGPT/Wanda
    batch_size: int = 8
    limit: float | None = None  # items per lm-eval task (quick runs)
    task_data: str | None = None  # folder of local task files (offline)

    def validate(self) -> None:
        _check(self.seq_len >= 2, "eval.seq_len must be at least 2")
        _check(self.batch_size >= 1, "eval.batch_size must be at least 1")
        _check(self.limit is None or self.limit > 0, "eval.limit must be positive")


@dataclass
class RecoverConfig:
    """LoRA recovery after pruning (peft), optionally distilled from the dense model."""

    method: str | None = None  # "lora" to recover after pruning; None to skip
    data: str = "alpaca"  # named source or local file; Alpaca-style rows are formatted as prompts
    split: str = "train"
    text_field: str = "text"
    num_blocks: int = 1024
    seq_len: int = 256
    heldout_fraction: float = 0.05
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-4
    warmup_steps: int = 10
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    distill: bool = False  # add KL(teacher || student) on the logits, the dense teacher frozen
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    distill_topk: int = 64  # teacher log-probabilities kept per token (the rest is one bucket)
    gradient_checkpointing: bool = False
    bf16: bool = False  # bfloat16 autocast on GPU
    save_every: int = 0  # steps between adapter checkpoints (0: none)

    def validate(self) -> None:
        _check(self.method in (None, "lora"), f"recover.method must be lora or empty, got {self.method!r}")
        _check(self.steps >= 1 and self.batch_size >= 1, "recover.steps and recover.batch_size must be >= 1")
        _check(self.lr > 0 and self.lora_r >= 1, "recover.lr must be positive and recover.lora_r >= 1")
        _check(self.seq_len >= 2 and self.num_blocks >= 1, "recover.seq_len >= 2 and recover.num_blocks >= 1")
        _check(0.0 <= self.heldout_fraction < 1.0, "recover.heldout_fraction must be in [0, 1)")
        _check(self.distill_temperature > 0 and self.distill_weight >= 0, "distillation settings must be positive")
        _check(self.distill_topk >= 1, "recover.distill_topk must be at least 1")


@dataclass
class PruneConfig:
    """Everything ``dms-llm prune`` needs besides the model."""

    ratio: float | None = 0.2
    params: str | None = None
    targets: list[str] = field(default_factory=lambda: ["heads", "channels", "layers"])
    layout: str = "per_layer"
    channel_multiple: int = 1  # every kept MLP width a multiple of this (32: q8_0, 256: k-quants)
    method: str = "dms"  # or a peer's one-shot criterion (METHODS[1:], in baselines)
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None  # "auto": spread one big model's layers over the GPUs (Accelerate)
    shard: bool = False  # split the decoder layers over the launched ranks (FSDP) instead of copying them
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)

    def validate(self) -> PruneConfig:
        if self.params is not None:
            self.ratio = None
        _check(self.ratio is not None or self.params is not None, "give --ratio or --params")
        if self.ratio is not None:
            _check(
                isinstance(self.ratio, (int, float)) and 0.0 < float(self.ratio) < 1.0,
                f"--ratio must be between 0 and 1 (the fraction of parameters to remove), got {self.ratio}",
            )
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        bad = [t for t in self.targets if t not in ("heads", "channels", "layers")]
        _check(
            bool(self.targets) and not bad,
            f"unknown prune target(s) {bad or self.targets}; use a subset of heads,channels,layers",
        )
        self.layout = str(self.layout).replace("-", "_")  # per-layer and per_layer both mean the same
        _check(self.layout in ("per_layer", "uniform"), f"--layout must be per_layer or uniform, got {self.layout!r}")
        _check(
            isinstance(self.channel_multiple, int) and self.channel_multiple >= 1,
            "--channel-multiple must be a whole number >= 1 (32 for q8_0, 256 for k-quants), "
            f"got {self.channel_multiple!r}",
        )
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}",
        )
        _check(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "dms":  # the one-shot criteria choose their own units and land without groups
            for wrong, what in (
                (self.channel_multiple > 1, "--channel-multiple"),
                (self.shard, "--shard"),
                (set(self.targets) != {"heads", "channels", "layers"}, "--targets"),
                (self.method == "flap" and self.layout == "uniform", "--layout uniform (FLAP allocates per layer)"),
            ):
                _check(not wrong, f"--method {self.method} does not take {what}; it is a DMS setting")
        self.data.validate()
        self.search.validate()
        self.eval.validate()
        self.recover.validate()
        _check(  # the recovery inside prune keeps no checkpoints: a silently ignored setting would mislead
            not self.recover.save_every,
            "recover.save_every applies to `dms-llm recover` only: prune's recovery keeps no adapter checkpoints; "
            "prune without --recover, then run `dms-llm recover OUTPUT --save-every N` (it resumes with --resume)",
        )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DMSError(message)


def _build(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise DMSError(f"recipe section {prefix or 'top level'!r} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise DMSError(f"unknown setting {prefix + key!r}." + did_you_mean(key, fields))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's type, with a clear error when it cannot."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise DMSError(f"setting {name!r} cannot be empty")
    base = args[0] if args and typing.get_origin(hint) is not list else hint
    if typing.get_origin(hint) is list or base is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return value
    try:
        if base is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            return bool(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return base(value)
    except (TypeError, ValueError):
        raise DMSError(f"setting {name!r} must be {base.__name__}, got {value!r}") from None
    return value


def apply_overrides(config: PruneConfig, overrides: list[str]) -> PruneConfig:
    """Apply ``section.key=value`` strings (the highest-precedence settings)."""
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise DMSError(f"override {item!r} must look like key=value (e.g. search.steps=500)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise DMSError(
                    f"unknown setting {key!r}."
                    + did_you_mean(part, [k for k, v in node.items() if isinstance(v, dict)])
                )
            node = node[part]
        if parts[-1] not in node:
            raise DMSError(f"unknown setting {key!r}." + did_you_mean(parts[-1], node))
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return PruneConfig.from_dict(data)


def merge_settings(config: PruneConfig, settings: dict[str, Any]) -> PruneConfig:
    """Set dotted keys (e.g. from CLI flags) on a config."""
    data = config.to_dict()
    for key, value in settings.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return PruneConfig.from_dict(data)


def available_recipes() -> dict[str, Path]:
    """Shipped recipes by name (file stem)."""
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def load_recipe(name_or_path: str) -> PruneConfig:
    """A shipped recipe by name (``llama3-8b``) or a YAML file path."""
    path = Path(name_or_path)
    if not path.is_file():
        recipes = available_recipes()
        if name_or_path not in recipes:
            raise DMSError(f"no recipe named {name_or_path!r} and no such file." + did_you_mean(name_or_path, recipes))
        path = recipes[name_or_path]
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0]
        raise DMSError(f"recipe {path} is not valid YAML: {first}") from None
    data.pop("model", None)  # informational: the model a recipe was written for
    return PruneConfig.from_dict(data)


def recipe_model(name_or_path: str) -> str | None:
    """The ``model:`` a recipe was written for, if it names one."""
    path = Path(name_or_path) if Path(name_or_path).is_file() else available_recipes().get(name_or_path)
    if path is None:
        return None
    data = yaml.safe_load(Path(path).read_text()) or {}
    return data.get("model")
