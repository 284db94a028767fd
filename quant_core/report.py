"""A job's report, typed: what ``run_job`` returns and ``report.json`` holds.

The CLI, the model card and the worker read it by attribute; ``to_dict`` is the JSON form, whose
keys are the report.json format users and the dashboard already read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from quant_core.bit_budget import Allocation
from quant_core.block_record import BlockRecord
from quant_core.eval_windows import per_unit
from quant_core.job import JobSpec
from quant_core.runtimes import RuntimeScore

# lm-eval scores per task and metric: the float model's value (None without a baseline) and the quantized one's.
PairedScores = dict[str, dict[str, dict[str, float | None]]]


@dataclass(frozen=True)
class PerplexityPair:
    before: float
    after: float


@dataclass(frozen=True)
class Seconds:
    calibration: float
    evaluation: float
    total: float


@dataclass(frozen=True)
class Export:
    """One checkpoint written: its folder relative to the job's output, and what the format adds
    (the packed export's size, library version and the reasons vLLM cannot serve it)."""

    path: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def vllm_blockers(self) -> list[str]:
        return list(self.details.get("vllm_blockers", []))


@dataclass(frozen=True)
class JobReport:
    spec: JobSpec
    calibration_tokens: int
    eval_seq_len: int
    eval_protocol: dict[str, Any]  # how windows are cut and scored (quant_core/eval_windows.py)
    eval_counts: dict[str, dict[str, int]]  # by text: windows, and the scored tokens, words and bytes
    perplexity: dict[str, PerplexityPair]  # token perplexity by evaluation text as the spec names it
    lm_eval: PairedScores
    blocks: list[BlockRecord]  # empty for a whole-model method
    method_stats: dict[str, Any]  # a whole-model method's own statistics (per-block ones are in blocks)
    seconds: Seconds
    peak_host_mb: float
    peak_device_mb: float | None
    peak_memory_by_stage: dict[str, Any]  # quant_core/memory.py: host (and device) MiB by stage
    versions: dict[str, str]
    exports: dict[str, Export]  # by format: fake_quant, pack_quantized, gguf
    runtimes: dict[str, RuntimeScore] = field(default_factory=dict)  # by target runtime
    parallel: dict[str, Any] = field(default_factory=dict)  # how the ranks split the job (Ranks.layout)
    allocation: Allocation | None = None  # a size budget's scheme per unit of linears, with its costs

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "quant_label": self.spec.quant.label,
            "seed": self.spec.seed,
            "calibration_tokens": self.calibration_tokens,
            "eval_seq_len": self.eval_seq_len,
            "eval_protocol": self.eval_protocol,
            "eval_windows": {name: counts["windows"] for name, counts in self.eval_counts.items()},
            "eval_counts": self.eval_counts,
            "perplexity": {name: asdict(pair) for name, pair in self.perplexity.items()},
            "perplexity_per_unit": {  # lm-eval's wikitext metrics on the same scored text
                name: {
                    "before": per_unit(pair.before, self.eval_counts[name]),
                    "after": per_unit(pair.after, self.eval_counts[name]),
                }
                for name, pair in self.perplexity.items()
            },
            "lm_eval": self.lm_eval,
            "blocks": [record.to_dict() for record in self.blocks],
            "parallel": self.parallel,
            "method_stats": self.method_stats,
            "seconds": asdict(self.seconds),
            "peak_host_mb": self.peak_host_mb,
            "peak_device_mb": self.peak_device_mb,
            "peak_memory_by_stage": self.peak_memory_by_stage,
            "device": self.spec.device,
            "versions": self.versions,
            "exports": {name: {"path": e.path, **e.details} for name, e in self.exports.items()},
            "runtimes": {name: score.to_dict() for name, score in self.runtimes.items()},
            "allocation": None if self.allocation is None else self.allocation.to_dict(),
        }
