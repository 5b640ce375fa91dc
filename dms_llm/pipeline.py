"""The prune pipeline as one call: budget -> calibration -> masks -> search -> slice -> report.

Example:
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> import dms_llm
    >>> model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")     # doctest: +SKIP
    >>> tokenizer = AutoTokenizer.from_pretrained("meta-llama/Llama-2-7b-hf")        # doctest: +SKIP
    >>> config = dms_llm.PruneConfig(ratio=0.2)
    >>> pruned, report = dms_llm.prune(model, tokenizer, config)                     # doctest: +SKIP
    >>> dms_llm.save_pruned(pruned, tokenizer, "llama2-7b-dms20", report=report.to_dict())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from .adapters import get_adapter
from .budget import ParamCounter, resolve_budget
from .config import PruneConfig
from .data import CalibrationData, calibration_blocks
from .evaluate import evaluate_model, perplexity, prepare_perplexity_sources
from .losses import teacher_targets
from .masks import MaskSet
from .report import PruneReport
from .search_loop import SearchResult, search
from .sharding import check_pruned_fits_main_device, gather_pruned, is_sharded
from .slicing import slice_model


def masks_for(model: nn.Module, config: PruneConfig, adapter=None) -> MaskSet:
    """The MaskSet a config asks for: its targets, layout and temperatures."""
    return MaskSet(
        model,
        targets=config.targets,
        uniform=config.layout == "uniform",
        temperatures={
            "heads": config.search.temperature_heads,
            "channels": config.search.temperature_channels,
            "layers": config.search.temperature_layers,
        },
        adapter=adapter,
        channel_multiple=config.channel_multiple,
    )


def prune(
    model: nn.Module,
    tokenizer,
    config: PruneConfig | None = None,
    *,
    calibration: CalibrationData | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    state_dir: str | Path | None = None,
    resume: bool = False,
) -> tuple[nn.Module | None, PruneReport | None]:
    """Prune ``model`` in place to the configured budget; returns (model, report).

    A model sharded with ``load_sharded`` is gathered onto the main process's host after the
    search; the other ranks get ``(None, None)``.

    ``state_dir`` keeps a resumable search state (every ``search.save_every`` steps);
    ``resume=True`` continues from it when it exists.
    """
    config = (config or PruneConfig()).validate()
    adapter = get_adapter(model.config)
    geometry = adapter.geometry(model)
    counter = ParamCounter.from_model(model, adapter)
    budget = resolve_budget(counter, config.ratio, config.params, config.targets)
    data = calibration or calibration_blocks(tokenizer, config.data, config.seed)
    seq_len = config.eval.seq_len
    main = accelerator is None or accelerator.is_main_process  # other ranks only help the search
    # A sharded model runs its layers' collectives on every rank, so every rank takes part in the
    # dense evaluations (only main's results are used); a data-parallel one leaves them to main.
    sharded = is_sharded(model)
    config = dataclasses.replace(config, search=config.search.resolved())  # "auto" made concrete
    evaluates = main or sharded
    heldout = evaluates and config.eval.heldout and data.heldout.numel() >= seq_len
    full_eval = evaluates and bool(config.eval.ppl or config.eval.tasks)
    uses = [name for name, runs in (("the held-out perplexity", heldout), ("--ppl/--tasks", full_eval),
                                    ("LoRA recovery", bool(config.recover.method))) if runs]  # fmt: skip
    if sharded and uses:  # they run on main's GPU, whole: refused now rather than after the search
        check_pruned_fits_main_device(model, budget.target, " and ".join(uses))

    dense_ppl = perplexity(model, data.heldout, seq_len, config.eval.batch_size) if heldout else None
    if full_eval:  # the dense model is evaluated now: the search below prunes it in place
        sources = prepare_perplexity_sources(tokenizer, config.eval.ppl)
        dense_eval = evaluate_model(model, tokenizer, config.eval, sources, progress=progress and main)

    # Distillation needs the dense model after the search has pruned it in place. Rather than a
    # copy of the model, its top-k next-token log-probabilities on the blocks that will be trained
    # on are taken now (one forward pass over them) and the teacher is those targets.
    recovery = search_teacher = recovery_teacher_targets = None
    if evaluates and config.recover.method == "lora" and config.recover.distill:
        from .recover import recovery_teacher

        recovery, recovery_teacher_targets = recovery_teacher(model, tokenizer, config.recover, config.seed)
    if "kd" in config.search.loss and config.method == "dms":
        # the dense model is this one before masks exist: its top-k next-token log-probabilities on
        # the calibration blocks, taken once (no copy of the weights, no teacher forward per step)
        settings = config.search
        world = accelerator.num_processes if accelerator is not None else 1
        search_teacher = teacher_targets(
            model,
            data.calib,
            settings.distill_topk,
            batch_size=settings.batch_size,
            rank=accelerator.process_index if world > 1 else 0,
            world=world,
            reduce=(lambda t: accelerator.reduce(t, "sum")) if world > 1 else None,  # each rank takes 1/world
        )
    if config.method != "dms":
        result = one_shot_result(model, config, counter, budget, data.calib, adapter)
    else:
        result = _search(model, config, adapter, counter, budget, data, accelerator, progress, search_teacher,
                         state_dir, resume)  # fmt: skip
    search_teacher = None  # the search's targets are done with: not held through slicing and recovery
    if sharded:  # main gathers the pruned model (sliced layer by layer) and saves it; the others are done
        search_device = model.get_input_embeddings().weight.device
        model = gather_pruned(model, result.architecture, config.layout, adapter)
        if not main:
            return None, None
    else:
        slice_model(model, result.architecture, config.layout, adapter)
    if sharded and (heldout or full_eval or config.recover.method):  # evaluated and recovered on main's GPU
        model.to(search_device)

    params_after = sum(p.numel() for p in model.parameters())
    if params_after != result.params:  # the accounting invariant; a bug if it ever fires
        raise RuntimeError(f"sliced model has {params_after} parameters, the budget accounting said {result.params}")
    embedding = counter.embedding
    report = PruneReport.build(
        model_name=str(getattr(model.config, "_name_or_path", "") or "model"),
        model_type=adapter.model_type,
        layout=config.layout,
        counter=counter,
        budget=budget,
        arch=result.architecture,
        params_after=params_after,
        non_embedding_after=params_after - embedding,
        group_size=geometry.group_size,
        settings=config.to_dict(),
        search=result.summary(),
    )
    report.settings["calibration_blocks"] = int(data.calib.shape[0])
    if heldout:
        report.perplexity = {
            "source": data.source,
            "seq_len": seq_len,
            "dense": dense_ppl,
            "pruned": perplexity(model, data.heldout, seq_len, config.eval.batch_size),
            "tokens": int(data.heldout.numel()),
        }
    if config.recover.method == "lora" and main:  # the other ranks' result is not saved: only main recovers
        from .recover import recover

        model, report.recovery = recover(
            model, tokenizer, config.recover, recovery_teacher_targets, config.seed, progress, data=recovery
        )
        if heldout:
            report.perplexity["recovered"] = perplexity(model, data.heldout, seq_len, config.eval.batch_size)
    if full_eval:
        report.evaluation = {
            "dense": dense_eval,
            "pruned": evaluate_model(model, tokenizer, config.eval, sources, progress=progress),
        }
    return model, report


def _search(model, config, adapter, counter, budget, data, accelerator, progress, teacher, state_dir, resume):
    """The DMS search on masks attached for its duration."""
    masks = masks_for(model, config, adapter)
    try:
        return search(
            model,
            masks,
            counter,
            budget,
            data.calib,
            config.search,
            seed=config.seed,
            accelerator=accelerator,
            progress=progress,
            teacher=teacher,
            state_dir=state_dir,
            resume=resume,
        )
    finally:
        masks.remove()


def one_shot_result(model: nn.Module, config: PruneConfig, counter, budget, blocks, adapter) -> SearchResult:
    """A peer's one-shot criterion (``--method``) on the same units, budget landing and slicing as DMS;
    FLAP's bias compensation is applied to the weights before slicing."""
    from .baselines import one_shot

    allowed = None
    if config.layout == "uniform":  # a stock config must accept the shared head count
        from .slicing import stock_unit_counts

        allowed = stock_unit_counts(model.config, adapter.geometry(model))
    start = time.perf_counter()
    chosen = one_shot(model, config.method, counter, budget, blocks, config.seed, adapter, allowed)
    if chosen.compensate is not None:
        chosen.compensate(model)
    return SearchResult(chosen.architecture, chosen.params, time.perf_counter() - start, method=config.method)
