"""One whole quantization job: load, measure, calibrate, measure again, save the model and a report.

This is the plain function the CLI calls and the service's worker wraps; it knows nothing of either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import quant_core
from quant_core.absorbed_rotation import absorb_rotation, check_rotation
from quant_core.accuracy import Scores, cached_baseline, paired, task_scores
from quant_core.bit_budget import Allocation, BudgetSpec, describe, plan_allocation
from quant_core.block_record import BlockRecord
from quant_core.checkpoint import BlockCheckpoint
from quant_core.corpus import (
    calibration_windows,
    resolve_text,
    tokenize_file,
)
from quant_core.distributed import SOLO, Ranks
from quant_core.engine import calibrate_blocks
from quant_core.errors import ConfigError
from quant_core.eval_windows import WindowedText, evaluation_windows, protocol, window_start
from quant_core.experts import is_fused_experts
from quant_core.export import check_packable, packed_details, write_packed
from quant_core.export_dtype import resolve_export_dtype, round_to_export_dtype
from quant_core.finetune import calibrate_then_tune
from quant_core.gguf_export import gguf_blockers, write_gguf
from quant_core.job import DTYPES, JobSpec
from quant_core.job_settings import calibrated_on_evaluation
from quant_core.layer_schemes import LayerSchemes
from quant_core.lazy_model import (
    LazyModel,
    PackedShardWriter,
    PackedWeights,
    ShardedWeights,
    ShardWriter,
    StreamingBlocks,
    blockwise_perplexity,
)
from quant_core.losses import Loss
from quant_core.memory import StagePeaks
from quant_core.methods.base import QuantMethod
from quant_core.model_card import write_model_cards
from quant_core.model_io import declared_dtype, load_model, load_tokenizer, save_fake_quant
from quant_core.model_structure import find_decoder_blocks, quantizable_linears
from quant_core.output_names import FAKE_QUANT_DIR, GGUF_DIR, PACKED_DIR
from quant_core.perplexity import perplexity
from quant_core.progress import PhaseProgress
from quant_core.report import Export, JobReport, PerplexityPair, Seconds
from quant_core.runtimes import FORMAT_FOR, RuntimeScore, score_checkpoint, target_blockers
from quant_core.spill import Spill
from quant_core.streamed_tuning import StreamedTuning, record_streamed_teacher

REPORT_NAME = "report.json"
SPILL_DIR = ".activations"  # under the job's output folder: its disk, not /tmp (often memory)
RANKS_DIR = ".ranks"  # where a streamed job's other ranks write the blocks they score, one folder each
BLOCKS_DIR = ".blocks"  # a streamed tuning's block checkpoint when the job names none


@dataclass
class JobHooks:
    """How a caller follows and steers a run: per-block progress, stage messages, cancellation, and
    the end-to-end tuning's loss at every step (``on_tuning_step(done, steps, loss)``)."""

    on_block: Callable[[BlockRecord], None] | None = None
    on_stage: Callable[[str], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    on_tuning_step: Callable[[int, int, float], None] | None = None

    def stage(self, message: str) -> None:
        if self.on_stage is not None:
            self.on_stage(message)


def library_versions() -> dict[str, str]:
    return {
        "swquant": quant_core.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def job_fingerprint(spec: JobSpec) -> str:
    """What a checkpoint must match to be resumed: every setting of the job but how many ranks run it."""
    settings = {key: value for key, value in spec.to_dict().items() if key != "world_size"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _advance_past(progress: PhaseProgress, index: int) -> None:
    """Block ``index`` is done: ``index + 1`` of them."""
    progress.advance(index + 1)


def export_formats_for(
    spec: JobSpec, method: QuantMethod, model: PreTrainedModel, blocks: nn.ModuleList
) -> tuple[str, ...]:
    """The formats this job writes, checked before any calibration.

    ``auto`` takes the packed checkpoint, a quarter of the float model's size or less and what vLLM
    serves, wherever compressed-tensors can hold the result; otherwise the fake-quantized one:
    weights in a rotated basis, or layers the format refuses (Conv1D, a ragged last group, a mixture
    of experts' asymmetric grids). An explicit ``pack_quantized`` that cannot be held is an error instead, and
    so is a runtime target (or an explicit ``gguf``) whose constraints the grid breaks.
    """
    for runtime in spec.targets:
        blockers = [
            b for scheme in spec.schemes for b in target_blockers(runtime, model.config, scheme, method.rotates)
        ]
        if blockers:
            blockers = list(dict.fromkeys(blockers))
            raise ConfigError(f"targets: {runtime} cannot run this job's checkpoint: {'; '.join(blockers)}", "targets")
    if "gguf" in spec.export_formats:
        blockers = [b for scheme in spec.schemes for b in gguf_blockers(model.config, scheme, method.rotates)]
        blockers = list(dict.fromkeys(blockers))
        if blockers:
            raise ConfigError(f"gguf export: {'; '.join(blockers)}", "export_formats")
    auto = spec.export_formats == ("auto",)
    wanted = {FORMAT_FOR[runtime] for runtime in spec.targets}
    if auto and not wanted and method.rotates:
        return ("fake_quant",)
    formats = [] if auto else list(spec.export_formats)
    if auto or "pack_quantized" in formats or "pack_quantized" in wanted:
        block_linears = {id(m) for m in quantizable_linears(blocks).values()}
        # a budget offers a unit only the group sizes that divide its input widths (quant_core.sensitivity)
        scheme = spec.quant if spec.budget is None else replace(spec.quant, group_size=None)
        try:
            check_packable(model, [n for n, m in model.named_modules() if id(m) in block_linears], LayerSchemes(scheme))
            formats.append("pack_quantized")
        except ConfigError:
            if not auto or "pack_quantized" in wanted:
                raise
            formats.append("fake_quant")
    return tuple(dict.fromkeys([*formats, *sorted(wanted)]))


def _streamed_writers(lazy: LazyModel, formats: tuple[str, ...], spec: JobSpec, out_dir: Path) -> list[ShardWriter]:
    """What a streamed job writes block by block: each checkpoint format it exports (GGUF is refused
    with lazy_load, see JobSpec)."""
    writers: list[ShardWriter] = []
    if "fake_quant" in formats:
        writers.append(ShardWriter(lazy, out_dir / FAKE_QUANT_DIR))
    if "pack_quantized" in formats:
        writers.append(PackedShardWriter(lazy, out_dir / PACKED_DIR, spec.quant))
    return writers


@dataclass
class LoadedJob:
    """What the load stage gives the others: the model (in memory or streamed), its blocks, the
    calibration and evaluation windows, and the formats the job will write."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    blocks: nn.ModuleList
    lazy: LazyModel | None
    residency: StreamingBlocks | None
    windows: torch.Tensor  # the blocks' calib.n_samples first, then any more the end-to-end tuning asks for
    eval_seq_len: int
    eval_sets: dict[str, WindowedText]
    eval_protocol: dict[str, Any]
    formats: tuple[str, ...]
    export_dtype: torch.dtype  # what the checkpoint's floats are stored in (streamed blocks: as calibrated)
    resources: dict[str, Any]  # a whole-model method's memory estimate


@dataclass
class Evaluation:
    """Perplexity per text and lm-eval scores of one model, and what they cost."""

    perplexity: dict[str, float]
    accuracy: Scores
    seconds: float


@dataclass
class Calibration:
    records: list[BlockRecord]
    method_stats: dict[str, Any]
    peak_device_mb: float | None
    seconds: float
    written: dict[str, Path]  # a streamed model's checkpoints by format, already on disk; empty otherwise
    schemes: LayerSchemes  # each linear's scheme: the job's, or its allocation's
    allocation: Allocation | None = None  # a size budget's


def load(spec: JobSpec, method: QuantMethod, out_dir: Path, hooks: JobHooks, checkpoint_dir: Path | None) -> LoadedJob:
    """Load the model and the texts, and refuse before any work what cannot run to the end."""
    calib_path = resolve_text(spec.calibration.text, "calibration.text")
    eval_paths = {name: resolve_text(name, "evaluation.texts") for name in spec.evaluation.texts}
    for name, path in eval_paths.items():
        if path.resolve() == calib_path.resolve():
            raise calibrated_on_evaluation(name)
    hooks.stage(f"loading {spec.model}")
    lazy: LazyModel | None = None
    if spec.lazy_load:
        if not Path(spec.model).is_dir():
            raise ConfigError("lazy_load needs a local model directory", "model")
        lazy = LazyModel(Path(spec.model), DTYPES[spec.dtype], spec.trust_remote_code)
        if any(is_fused_experts(m) for m in lazy.model.modules()):
            raise ConfigError("lazy_load does not stream mixture-of-experts blocks yet", "lazy_load")
        model, tokenizer = lazy.model, load_tokenizer(spec.model, spec.trust_remote_code)
    else:
        model, tokenizer = load_model(spec.model, DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code)
    blocks = find_decoder_blocks(model)
    method.check(blocks)
    if spec.rotation != "none":
        check_rotation(model)
    resources: dict[str, Any] = {}
    if method.whole_model:
        if checkpoint_dir is not None:
            raise ConfigError(
                f"{spec.method} trains the whole model at once and cannot resume from blocks", "checkpoint"
            )
        resources = method.check_resources(model, spec.calibration.seq_len, spec.device, spec.world_size)
    formats = export_formats_for(spec, method, model, blocks)
    residency = None if lazy is None else StreamingBlocks(lazy, _streamed_writers(lazy, formats, spec, out_dir))
    drawn = spec.finetune.windows_to_draw(spec.calibration.n_samples)
    start = window_start(tokenizer).calibration_token
    windows = calibration_windows(
        tokenize_file(tokenizer, calib_path), drawn, spec.calibration.seq_len, spec.seed, start
    )
    eval_seq_len = spec.evaluation.seq_len or spec.calibration.seq_len
    eval_sets = {
        name: evaluation_windows(tokenizer, path, eval_seq_len, spec.evaluation.max_windows)
        for name, path in eval_paths.items()
    }
    export_dtype = (
        DTYPES[spec.dtype]
        if spec.lazy_load
        else resolve_export_dtype(spec.export_dtype, declared_dtype(spec.model, spec.trust_remote_code), spec.widest)
    )
    return LoadedJob(
        model,
        tokenizer,
        blocks,
        lazy,
        residency,
        windows,
        eval_seq_len,
        eval_sets,
        protocol(tokenizer, eval_seq_len),
        formats,
        export_dtype,
        resources,
    )


def evaluate(
    spec: JobSpec,
    job: LoadedJob,
    hooks: JobHooks,
    quantized: bool,
    weights: ShardedWeights | None,
    ranks: Ranks = SOLO,
) -> Evaluation:
    """Perplexity on every text and, when asked, lm-eval scores (the float model's from the cache).

    ``weights``: evaluate a lazily loaded model by streaming these blocks instead of the model in memory.
    On several ``ranks`` each scores its share of the windows (progress counts the leader's share).
    """
    started = time.perf_counter()
    which = "quantized" if quantized else "full-precision"
    hooks.stage(f"evaluating the {which} model")
    streamed = job.lazy if weights is not None else None
    if streamed is None:
        nn.Module.to(job.model, spec.device)
    scores = {}
    for name, text in job.eval_sets.items():
        label = f"evaluating the {which} model on {name}"
        if streamed is not None and weights is not None:
            by_block = PhaseProgress(label, len(streamed.blocks), "blocks", hooks.stage)
            on_block = partial(_advance_past, by_block)
            scores[name] = blockwise_perplexity(
                streamed, text.ids, weights, spec.evaluation.batch_size, spec.device, on_block, text.scored, ranks
            )
        else:
            by_window = PhaseProgress(label, ranks.share(text.ids).shape[0], "windows", hooks.stage)
            scores[name] = perplexity(
                job.model, text.ids, spec.evaluation.batch_size, spec.device, by_window.advance, text.scored, ranks
            )

    lm_eval, accuracy_scores = spec.evaluation.lm_eval, {}
    if lm_eval is not None:  # refused with lazy_load, so the model is in memory
        accuracy = partial(task_scores, job.model, job.tokenizer, lm_eval, spec.device)
        if not quantized and lm_eval.baseline:
            hooks.stage(f"lm-eval on the full-precision model ({', '.join(lm_eval.tasks)}; cached per model and task)")
            accuracy_scores = cached_baseline(spec.model, spec.dtype, lm_eval, accuracy)
        elif quantized:
            hooks.stage(f"lm-eval on the quantized model ({', '.join(lm_eval.tasks)})")
            accuracy_scores = accuracy()
    if streamed is None:
        nn.Module.to(job.model, "cpu")
    return Evaluation(scores, accuracy_scores, time.perf_counter() - started)


def calibrate(
    spec: JobSpec,
    method: QuantMethod,
    record_loss: Loss,
    job: LoadedJob,
    hooks: JobHooks,
    checkpoint_dir: Path | None,
    peaks: StagePeaks,
    spill: Spill,
    ranks: Ranks = SOLO,
) -> Calibration:
    """Quantize the model: block by block through the engine (then, when the job asks, end-to-end
    tuning), or all at once for a whole-model method; activations too large for memory wait in
    ``spill``."""
    hooks.stage(f"calibrating with {spec.method} ({spec.quant.label}, loss {spec.loss})")
    started = time.perf_counter()
    records: list[BlockRecord] = []
    method_stats: dict[str, Any] = {}
    cuda = spec.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(spec.device)
    schemes, allocation = LayerSchemes(spec.quant), None
    if method.whole_model:
        with peaks.stage("blocks"):
            method_stats = _quantize_whole_model(spec, method, job, hooks, ranks)
    else:
        checkpoint = None if checkpoint_dir is None else BlockCheckpoint(checkpoint_dir, job_fingerprint(spec), ranks)
        finetune = spec.finetune
        blocks_windows, tuning_windows = finetune.split(job.windows, spec.calibration.n_samples)
        if spec.budget is not None:
            allocation = _allocation(spec, spec.budget, job, blocks_windows, record_loss, hooks, checkpoint, peaks)
            schemes = allocation.layer_schemes(job.model, spec.quant)
        blockwise = partial(
            calibrate_blocks,
            job.model,
            blocks_windows,
            method,
            record_loss,
            device=spec.device,
            seed=spec.seed,
            on_block=hooks.on_block,
            should_cancel=hooks.should_cancel,
            checkpoint=checkpoint,
            residency=job.residency,
            expert_min_tokens=spec.calibration.expert_min_tokens,
            spill=spill,
            ranks=ranks,
            schemes=None if allocation is None else allocation.block_schemes(len(job.blocks)),
        )
        if job.lazy is not None and job.residency is not None and finetune.enabled and checkpoint is not None:
            records, tuned = _calibrate_then_tune_streamed(
                spec, job.lazy, job.residency, blockwise, checkpoint, tuning_windows, hooks, peaks, spill
            )
        else:
            records, tuned = calibrate_then_tune(
                job.model,
                tuning_windows,
                finetune,
                schemes,
                blockwise,
                device=spec.device,
                seed=spec.seed,
                on_stage=hooks.on_stage,
                should_cancel=hooks.should_cancel,
                on_step=hooks.on_tuning_step,
                phase=peaks.stage,
                spill=spill,
                ranks=ranks,
            )
        if tuned is not None:
            method_stats["finetune"] = tuned
    # Blocks restored from a checkpoint bring their own peaks; what ran here is measured since the reset.
    device_peaks = [r.peak_device_mb or 0.0 for r in records]
    device_peaks += [torch.cuda.max_memory_allocated(spec.device) / 2**20] if cuda else []
    peak_device_mb = max(device_peaks, default=0.0) or None
    written = {} if job.residency is None else _finish_streamed(job.residency, job.formats, job.tokenizer)
    seconds = time.perf_counter() - started
    return Calibration(records, method_stats, peak_device_mb, seconds, written, schemes, allocation)


def _allocation(
    spec: JobSpec,
    budget: BudgetSpec,
    job: LoadedJob,
    windows: torch.Tensor,
    loss: Loss,
    hooks: JobHooks,
    checkpoint: BlockCheckpoint | None,
    peaks: StagePeaks,
) -> Allocation:
    """A size budget's schemes: measured on ``windows`` and chosen, or those a stored run of this job
    chose (its stored blocks were calibrated at them)."""
    stored = None if checkpoint is None else checkpoint.load_allocation()
    if stored is not None:
        hooks.stage("size budget: the allocation of the stored run")
        return Allocation.from_dict(stored)
    hooks.stage(
        f"size budget: measuring {len(spec.schemes)} schemes on every unit of linears "
        f"({min(budget.samples, windows.shape[0])} windows)"
    )
    progress = PhaseProgress("size budget, sensitivity", len(job.blocks), "blocks", hooks.stage)
    with peaks.stage("allocate"):
        allocation = plan_allocation(
            job.model,
            windows,
            budget,
            spec.quant.symmetric,
            loss,
            torch.finfo(job.export_dtype).bits,
            device=spec.device,
            seed=spec.seed,
            on_block=lambda index, _: _advance_past(progress, index),
        )
    hooks.stage(f"size budget: {allocation.bits_per_weight:.3f} bits per weight ({describe(allocation.units)})")
    if checkpoint is not None:
        checkpoint.save_allocation(allocation.to_dict())
    return allocation


def _quantize_whole_model(
    spec: JobSpec, method: QuantMethod, job: LoadedJob, hooks: JobHooks, ranks: Ranks
) -> dict[str, Any]:
    """A whole-model method (DiscQuant) on all the windows at once; its statistics beside the resources
    it was checked to fit in."""
    trained = method.quantize_model(
        job.model,
        job.windows,
        device=spec.device,
        seed=spec.seed,
        on_stage=hooks.on_stage,
        should_cancel=hooks.should_cancel,
        ranks=ranks,
    )
    return {**job.resources, **trained}


def _calibrate_then_tune_streamed(
    spec: JobSpec,
    lazy: LazyModel,
    residency: StreamingBlocks,
    blockwise: Callable[[], list[BlockRecord]],
    checkpoint: BlockCheckpoint,
    windows: torch.Tensor,
    hooks: JobHooks,
    peaks: StagePeaks,
    spill: Spill,
) -> tuple[list[BlockRecord], dict[str, Any] | None]:
    """A streamed job's blocks, then its end-to-end tuning one block at a time (quant_core.streamed_tuning):
    the teacher recorded streaming the source, the calibrated blocks rebuilt from ``checkpoint``, and
    every block written again with its tuned grid."""
    hooks.stage("recording the full-precision model's outputs for end-to-end tuning (streamed)")
    with peaks.stage("teacher"):
        teacher = record_streamed_teacher(lazy, windows, spec.device, spill=spill)
    with peaks.stage("blocks"):
        records = blockwise()
    tuning = StreamedTuning(lazy, checkpoint.restore, spec.finetune, spec.quant.group_size, spec.device)
    hooks.stage(f"end-to-end tuning, streamed: {spec.finetune.epochs} epoch(s)")
    with peaks.stage("tuning"):
        stats, tunables = tuning.tune(
            windows,
            teacher,
            seed=spec.seed,
            on_stage=hooks.on_stage,
            should_cancel=hooks.should_cancel,
            on_step=hooks.on_tuning_step,
        )
        tuning.write(tunables, residency.writers)
    return records, stats


def _finish_streamed(
    residency: StreamingBlocks, formats: tuple[str, ...], tokenizer: PreTrainedTokenizerBase
) -> dict[str, Path]:
    """Complete a streamed job's checkpoints; their folders by format, in :func:`_streamed_writers`' order."""
    streamed = [fmt for fmt in ("fake_quant", "pack_quantized") if fmt in formats]
    return dict(zip(streamed, residency.finish(tokenizer), strict=True))


def _streamed_weights(spec: JobSpec, job: LoadedJob, written: dict[str, Path]) -> ShardedWeights:
    """Where a streamed job's quantized blocks are read back from to be scored: the fake-quant folder,
    else the packed one read as the weights it stands for."""
    if "fake_quant" in written:
        return ShardedWeights(written["fake_quant"])
    return PackedWeights(written["pack_quantized"], spec.quant, job.export_dtype)


def export(
    spec: JobSpec, job: LoadedJob, written: dict[str, Path], schemes: LayerSchemes, out_dir: Path
) -> dict[str, Export]:
    """Write the checkpoint in each format the job takes (a streamed job's are written already); paths
    relative to ``out_dir``, since the report travels with the folders, not with the worker's disk."""
    exports: dict[str, Export] = {}
    dtype = {"dtype": str(job.export_dtype).removeprefix("torch.")}
    if not written:
        nn.Module.to(job.model, job.export_dtype)  # exact: round_to_export_dtype left every value representable
    if "fake_quant" in job.formats:
        path = written.get("fake_quant") or save_fake_quant(job.model, job.tokenizer, out_dir)
        exports["fake_quant"] = Export(str(path.relative_to(out_dir)), dtype)
    if "pack_quantized" in job.formats:
        if "pack_quantized" in written:
            path, details = (
                written["pack_quantized"],
                packed_details(job.model, [spec.quant], written["pack_quantized"]),
            )
        else:
            path, details = write_packed(job.model, schemes, out_dir / PACKED_DIR, job.tokenizer)
        exports["pack_quantized"] = Export(str(path.relative_to(out_dir)), {**details, **dtype})
    if "gguf" in job.formats:
        path, details = write_gguf(job.model, schemes, job.tokenizer, out_dir / GGUF_DIR)
        details = {**details, "file": path.name, "bytes": path.stat().st_size}
        exports["gguf"] = Export(str(path.parent.relative_to(out_dir)), details)
    return exports


def score_in_runtimes(
    spec: JobSpec, job: LoadedJob, exports: dict[str, Export], after: Evaluation, out_dir: Path, hooks: JobHooks
) -> dict[str, RuntimeScore]:
    """Each target runtime's perplexity of the checkpoint written for it, on the report's windows."""
    scores = {}
    for runtime in spec.targets:
        hooks.stage(f"scoring the checkpoint in {runtime}")
        written = exports[FORMAT_FOR[runtime]]
        checkpoint = out_dir / written.path / written.details.get("file", "")  # a folder, or GGUF's one file
        scores[runtime] = score_checkpoint(runtime, checkpoint, out_dir, job.eval_sets, after.perplexity)
    return scores


@dataclass
class Measured:
    """What every rank of a job computes: the loaded job, both evaluations, the calibration and the
    memory it took by stage. The leader turns it into the checkpoint and the report."""

    job: LoadedJob
    before: Evaluation
    calibration: Calibration
    after: Evaluation
    peaks: StagePeaks


def _agreed_cancel(hooks: JobHooks, ranks: Ranks) -> JobHooks:
    """``hooks`` whose cancellation every rank asks at the same points and answers with the leader's
    answer: ranks that decided apart would wait for each other in different collectives."""
    if not ranks.distributed:
        return hooks
    asked = hooks.should_cancel
    return replace(hooks, should_cancel=lambda: ranks.decide(ranks.leader and asked is not None and asked()))


@contextlib.contextmanager
def _written_dir(out_dir: Path, ranks: Ranks) -> Iterator[Path]:
    """Where this rank writes a streamed job's blocks, which it scores afterwards: the output folder for
    the leader, a copy of its own for every other rank, removed when the rank is done whatever happened
    (the last rank out removes the folder of them all)."""
    if ranks.leader:
        yield out_dir
        return
    own = out_dir / RANKS_DIR / f"rank{ranks.rank}"
    try:
        yield own
    finally:
        shutil.rmtree(own, ignore_errors=True)
        with contextlib.suppress(OSError):
            own.parent.rmdir()


def measure(
    spec: JobSpec, out_dir: Path, hooks: JobHooks, checkpoint_dir: Path | None, ranks: Ranks = SOLO
) -> Measured:
    """Load, evaluate, calibrate and evaluate again: a job up to its export, this rank's part of it."""
    with _written_dir(out_dir, ranks) as written_dir:
        return _measure(spec, out_dir, written_dir, hooks, checkpoint_dir, ranks)


def _measure(
    spec: JobSpec, out_dir: Path, written_dir: Path, hooks: JobHooks, checkpoint_dir: Path | None, ranks: Ranks
) -> Measured:
    hooks = _agreed_cancel(hooks, ranks)
    method, record_loss = spec.build_method(), spec.build_loss()  # the loss the block records measure
    torch.manual_seed(spec.seed)
    peaks = StagePeaks(spec.device)
    with peaks.stage("load"):
        job = load(spec, method, written_dir, hooks, checkpoint_dir)
    with peaks.stage("evaluate_full_precision"):
        before = evaluate(spec, job, hooks, False, job.lazy.weights if job.lazy is not None else None, ranks)
    if spec.rotation != "none":  # after the float model is scored: the baseline is the user's own model
        hooks.stage("rotating the model (absorbed into its weights)")
        with peaks.stage("rotate"):
            absorb_rotation(job.model, spec.seed)
    spill = Spill(out_dir / SPILL_DIR / (f"rank{ranks.rank}" if ranks.distributed else ""))
    # a streamed tuning rebuilds calibrated blocks from a block checkpoint: the job's own, or one of its
    # output folder's, removed when the job is done (and resumed from if the job runs again first)
    internal = spec.lazy_load and spec.finetune.enabled and checkpoint_dir is None
    blocks_dir = out_dir / BLOCKS_DIR if internal else checkpoint_dir
    try:
        calibration = calibrate(spec, method, record_loss, job, hooks, blocks_dir, peaks, spill, ranks)
    finally:
        shutil.rmtree(spill.directory, ignore_errors=True)  # its files were unlinked when mapped
    if internal and blocks_dir is not None:
        shutil.rmtree(blocks_dir, ignore_errors=True)
    written = calibration.written
    with peaks.stage("evaluate_quantized"):
        if not written:  # scored as it will be stored
            round_to_export_dtype(job.model, job.export_dtype, calibration.schemes)
        after = evaluate(spec, job, hooks, True, _streamed_weights(spec, job, written) if written else None, ranks)
    return Measured(job, before, calibration, after, peaks)


def run_job(
    spec: JobSpec,
    out_dir: Path,
    hooks: JobHooks | None = None,
    checkpoint_dir: Path | None = None,
    ranks: Ranks = SOLO,
) -> JobReport:
    """Run ``spec`` and write its checkpoint (``out_dir/packed`` and/or ``out_dir/model``, see
    :func:`export_formats_for`) and ``out_dir/report.json``: load, evaluate, calibrate, evaluate
    again, export, report.

    With ``checkpoint_dir``, progress is kept there after every block and a rerun of the same job
    continues from the last finished block. On several ``ranks`` this is the leader's part; every
    other rank runs :func:`measure` beside it (quant_core.launch starts them).
    """
    hooks = hooks or JobHooks()
    started = time.perf_counter()
    measured = measure(spec, out_dir, hooks, checkpoint_dir, ranks)
    job, before, calibration, after, peaks = (m := measured).job, m.before, m.calibration, m.after, m.peaks
    hooks.stage("saving the quantized model and report")
    out_dir.mkdir(parents=True, exist_ok=True)
    with peaks.stage("export"):
        exports = export(spec, job, calibration.written, calibration.schemes, out_dir)
    report = JobReport(
        spec=spec,
        calibration_tokens=int(job.windows.numel()),
        eval_seq_len=job.eval_seq_len,
        eval_protocol=job.eval_protocol,
        eval_counts={name: text.counts() for name, text in job.eval_sets.items()},
        perplexity={name: PerplexityPair(before.perplexity[name], after.perplexity[name]) for name in job.eval_sets},
        lm_eval=paired(before.accuracy, after.accuracy),
        blocks=calibration.records,
        method_stats=calibration.method_stats,
        seconds=Seconds(calibration.seconds, before.seconds + after.seconds, time.perf_counter() - started),
        peak_host_mb=peaks.overall_host_mb,
        peak_device_mb=calibration.peak_device_mb,
        peak_memory_by_stage=peaks.to_dict(),
        versions=library_versions(),
        exports=exports,
        runtimes=score_in_runtimes(spec, job, exports, after, out_dir, hooks),
        allocation=calibration.allocation,
        parallel=ranks.layout(spec.calibration.n_samples),
    )
    (out_dir / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2))
    write_model_cards(out_dir, report)
    return report
