"""dms-llm: structured pruning of Llama-family models with Differentiable Model Scaling.

Example:
    >>> import dms_llm
    >>> config = dms_llm.PruneConfig(ratio=0.2)
    >>> model, tokenizer = dms_llm.load_model("meta-llama/Llama-2-7b-hf")          # doctest: +SKIP
    >>> pruned, report = dms_llm.prune(model, tokenizer, config)                    # doctest: +SKIP
    >>> dms_llm.save_pruned(pruned, tokenizer, "llama2-7b-dms20", report=report.to_dict())  # doctest: +SKIP

Importing this package loads torch and transformers only: never peft, lm-eval or CUDA.
"""

__version__ = "0.1.0"

from .adapters import ADAPTERS, get_adapter
from .architecture import Architecture
from .budget import Budget, ParamCounter, parse_param_count, resolve_budget
from .checkpoint import load_model, load_pruned, save_pruned
from .config import DataConfig, PruneConfig, SearchConfig, apply_overrides, load_recipe
from .data import calibration_blocks, load_text, tokenize_text
from .errors import DMSError
from .evaluate import perplexity
from .masks import MaskSet
from .pipeline import prune
from .report import PruneReport
from .search_loop import SearchResult, search
from .slicing import slice_model

__all__ = [
    "ADAPTERS",
    "Architecture",
    "Budget",
    "DMSError",
    "DataConfig",
    "MaskSet",
    "ParamCounter",
    "PruneConfig",
    "PruneReport",
    "SearchConfig",
    "SearchResult",
    "apply_overrides",
    "calibration_blocks",
    "get_adapter",
    "load_model",
    "load_pruned",
    "load_recipe",
    "load_text",
    "parse_param_count",
    "perplexity",
    "prune",
    "resolve_budget",
    "save_pruned",
    "search",
    "slice_model",
    "tokenize_text",
]
