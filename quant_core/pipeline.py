"""One whole quantization job: load, measure, calibrate, measure again, save the model and a report.

This is the plain function the CLI calls and the service's worker wraps; it knows nothing of either.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel

import quant_core
from quant_core.accuracy import Scores, cached_baseline, paired, task_scores
from quant_core.checkpoint import BlockCheckpoint
from quant_core.corpus import calibration_windows, evaluation_windows, resolve_text, tokenize_file
from quant_core.engine import BlockRecord, calibrate_blocks, peak_host_mb
from quant_core.errors import ConfigError
from quant_core.export import check_packable, write_packed
from quant_core.job import DTYPES, JobSpec
from quant_core.lazy_model import LazyModel, ShardedWeights, ShardWriter, StreamingBlocks, blockwise_perplexity
from quant_core.methods.base import QuantMethod
from quant_core.model_card import write_model_cards
from quant_core.model_io import FAKE_QUANT_DIR, PACKED_DIR, load_model, load_tokenizer, save_fake_quant
from quant_core.model_structure import find_decoder_blocks, quantizable_linears
from quant_core.perplexity import perplexity
from quant_core.progress import PhaseProgress
from quant_core.report import Export, JobReport, PerplexityPair, Seconds

REPORT_NAME = "report.json"


@dataclass
class JobHooks:
    """How a caller follows and steers a run: per-block progress, stage messages, cancellation."""

    on_block: Callable[[BlockRecord], None] | None = None
    on_stage: Callable[[str], None] | None = None
    should_cancel: Callable[[], bool] | None = None

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
    """What a checkpoint must match to be resumed: every setting of the job."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def _advance_past(progress: PhaseProgress, index: int) -> None:
    """Block ``index`` is done: ``index + 1`` of them."""
    progress.advance(index + 1)


def export_formats_for(
    spec: JobSpec, method: QuantMethod, model: PreTrainedModel, blocks: nn.ModuleList
) -> tuple[str, ...]:
    """The formats this job writes, checked before any calibration.

    ``auto`` takes the packed checkpoint, a quarter of the float model's size or less and what vLLM
    serves, wherever compressed-tensors can hold the result; otherwise the fake-quantized one:
    weights in a rotated basis, blocks streamed from disk, or layers the format refuses (Conv1D, a
    ragged last group). An explicit ``pack_quantized`` that cannot be held is an error instead.
    """
    auto = spec.export_formats == ("auto",)
    if auto and (spec.lazy_load or method.rotates):
        return ("fake_quant",)
    if auto or "pack_quantized" in spec.export_formats:
        block_linears = {id(m) for m in quantizable_linears(blocks).values()}
        try:
            check_packable(model, [n for n, m in model.named_modules() if id(m) in block_linears], spec.quant)
        except ConfigError:
            if not auto:
                raise
            return ("fake_quant",)
    return ("pack_quantized",) if auto else spec.export_formats


def run_job(
    spec: JobSpec, out_dir: Path, hooks: JobHooks | None = None, checkpoint_dir: Path | None = None
) -> JobReport:
    """Run ``spec`` and write its checkpoint (``out_dir/packed`` and/or ``out_dir/model``, see
    :func:`export_formats_for`) and ``out_dir/report.json``.

    With ``checkpoint_dir``, progress is kept there after every block and a rerun of the same job
    continues from the last finished block.
    """
    hooks = hooks or JobHooks()
    started = time.perf_counter()
    method = spec.build_method()
    eval_loss = spec.build_loss()
    calib_path = resolve_text(spec.calib.text, "calib.text")
    eval_paths = {name: resolve_text(name, "eval.texts") for name in spec.eval.texts}
    torch.manual_seed(spec.seed)

    hooks.stage(f"loading {spec.model}")
    lazy: LazyModel | None = None
    residency: StreamingBlocks | None = None
    if spec.lazy_load:
        if checkpoint_dir is not None:
            raise ConfigError("a checkpoint cannot be combined with lazy_load yet", "lazy_load")
        if not Path(spec.model).is_dir():
            raise ConfigError("lazy_load needs a local model directory", "model")
        lazy = LazyModel(Path(spec.model), DTYPES[spec.dtype], spec.trust_remote_code)
        model, tokenizer = lazy.model, load_tokenizer(spec.model, spec.trust_remote_code)
        residency = StreamingBlocks(lazy, ShardWriter(lazy, out_dir / FAKE_QUANT_DIR))
    else:
        model, tokenizer = load_model(spec.model, DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code)
    blocks = find_decoder_blocks(model)
    method.check(blocks)
    resources: dict[str, Any] = {}
    if method.whole_model:
        if checkpoint_dir is not None:
            raise ConfigError(
                f"{spec.method} trains the whole model at once and cannot resume from blocks", "checkpoint"
            )
        resources = method.check_resources(model, spec.calib.seq_len, spec.device)
    formats = export_formats_for(spec, method, model, blocks)
    windows = calibration_windows(
        tokenize_file(tokenizer, calib_path), spec.calib.n_samples, spec.calib.seq_len, spec.seed
    )
    eval_seq_len = spec.eval.seq_len or spec.calib.seq_len
    eval_sets = {
        name: evaluation_windows(tokenize_file(tokenizer, path), eval_seq_len, spec.eval.max_windows)
        for name, path in eval_paths.items()
    }

    def evaluate(weights: ShardedWeights | None, which: str) -> dict[str, float]:
        """Perplexity per text: of the model in memory, or streaming the blocks stored in ``weights``."""
        streamed = lazy is not None and weights is not None
        if not streamed:
            model.to(spec.device)
        scores = {}
        for name, w in eval_sets.items():
            label = f"evaluating the {which} model on {name}"
            if streamed:
                assert lazy is not None and weights is not None
                by_block = PhaseProgress(label, len(lazy.blocks), "blocks", hooks.stage)
                scores[name] = blockwise_perplexity(
                    lazy, w, weights, spec.eval.batch_size, spec.device, partial(_advance_past, by_block)
                )
            else:
                by_window = PhaseProgress(label, w.shape[0], "windows", hooks.stage)
                scores[name] = perplexity(model, w, spec.eval.batch_size, spec.device, by_window.advance)
        if not streamed:
            model.to("cpu")
        return scores

    def accuracy() -> Scores:
        """lm-eval scores of the model in memory (lm-eval is refused with lazy_load)."""
        assert lm_eval is not None
        model.to(spec.device)
        scores = task_scores(model, tokenizer, lm_eval, spec.device)
        model.to("cpu")
        return scores

    lm_eval = spec.eval.lm_eval
    hooks.stage("evaluating the full-precision model")
    eval_started = time.perf_counter()
    ppl_before = evaluate(lazy.weights if lazy is not None else None, "full-precision")
    accuracy_before: Scores = {}
    if lm_eval is not None and lm_eval.baseline:
        hooks.stage(f"lm-eval on the full-precision model ({', '.join(lm_eval.tasks)}; cached per model and task)")
        accuracy_before = cached_baseline(spec.model, spec.dtype, lm_eval, accuracy)
    eval_seconds = time.perf_counter() - eval_started

    hooks.stage(f"calibrating with {spec.method} ({spec.quant.label}, loss {spec.loss})")
    calib_started = time.perf_counter()
    records: list[BlockRecord] = []
    method_stats: dict[str, Any] = {}
    peak_device_mb: float | None = None
    if method.whole_model:
        if spec.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(spec.device)
        method_stats = {
            **resources,
            **method.quantize_model(
                model,
                windows,
                device=spec.device,
                seed=spec.seed,
                on_stage=hooks.on_stage,
                should_cancel=hooks.should_cancel,
            ),
        }
        if spec.device.startswith("cuda"):
            peak_device_mb = torch.cuda.max_memory_allocated(spec.device) / 2**20
    else:
        records = calibrate_blocks(
            model,
            windows,
            method,
            eval_loss,
            device=spec.device,
            seed=spec.seed,
            on_block=hooks.on_block,
            should_cancel=hooks.should_cancel,
            checkpoint=BlockCheckpoint(checkpoint_dir, job_fingerprint(spec)) if checkpoint_dir is not None else None,
            residency=residency,
        )
        peak_device_mb = max((r.peak_device_mb or 0.0 for r in records), default=0.0) or None
    calib_seconds = time.perf_counter() - calib_started
    written = residency.writer.finish(tokenizer) if residency is not None else None

    hooks.stage("evaluating the quantized model")
    eval_started = time.perf_counter()
    ppl_after = evaluate(ShardedWeights(written) if written is not None else None, "quantized")
    accuracy_after: Scores = {}
    if lm_eval is not None:
        hooks.stage(f"lm-eval on the quantized model ({', '.join(lm_eval.tasks)})")
        accuracy_after = accuracy()
    eval_seconds += time.perf_counter() - eval_started

    hooks.stage("saving the quantized model and report")
    out_dir.mkdir(parents=True, exist_ok=True)
    written_to: dict[str, Path] = {}
    details: dict[str, dict[str, Any]] = {}
    if written is not None:
        written_to["fake_quant"] = written
    elif "fake_quant" in formats:
        written_to["fake_quant"] = save_fake_quant(model, tokenizer, out_dir)
    if "pack_quantized" in formats:
        details["pack_quantized"] = write_packed(model, spec.quant, out_dir / PACKED_DIR, tokenizer)
        written_to["pack_quantized"] = Path(details["pack_quantized"].pop("path"))
    report = JobReport(
        spec=spec,
        calibration_tokens=int(windows.numel()),
        eval_seq_len=eval_seq_len,
        eval_windows={name: int(w.shape[0]) for name, w in eval_sets.items()},
        perplexity={name: PerplexityPair(ppl_before[name], ppl_after[name]) for name in eval_sets},
        lm_eval=paired(accuracy_before, accuracy_after),
        blocks=records,
        method_stats=method_stats,
        seconds=Seconds(calib_seconds, eval_seconds, time.perf_counter() - started),
        peak_host_mb=peak_host_mb(),
        peak_device_mb=peak_device_mb,
        versions=library_versions(),
        # relative: the report travels with the folders, not the worker's disk
        exports={
            name: Export(str(path.relative_to(out_dir)), details.get(name, {})) for name, path in written_to.items()
        },
    )
    (out_dir / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2))
    write_model_cards(out_dir, report)
    return report
