"""Zero-shot (or few-shot) accuracy through lm-evaluation-harness, on the model already in memory.

Users compare quantized checkpoints by lm-eval accuracy as much as by perplexity (the SW paper reports
accuracy recovered; llm-compressor, GPTQModel and LightCompress all evaluate through lm-eval), so a
job can run lm-eval tasks on the float model and on the quantized one. A task is a name from lm-eval's
registry (its dataset must be reachable from the worker) or the path of a task YAML file, whose
folder is added to the registry, so tasks with local JSONL data run offline.

The float model's scores depend only on the model and the task settings, so they are cached on disk
(``SWQUANT_CACHE_DIR``, default ``~/.cache/swquant``) and a second job on the same model skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from quant_core.errors import ConfigError

Scores = dict[str, dict[str, float]]  # task -> metric -> value


@dataclass(frozen=True)
class LmEvalSpec:
    """Which lm-eval tasks a job runs, on how many documents, with how many few-shot examples."""

    tasks: tuple[str, ...]
    limit: int | None = None  # documents per task; None: all
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = 8
    baseline: bool = True  # also score the float model (cached), so the gap can be reported

    def resolved_tasks(self) -> tuple[list[str], list[str]]:
        """Task names to run and the folders of task files to add to lm-eval's registry."""
        names, folders = [], []
        for task in self.tasks:
            if task.endswith((".yaml", ".yml")):
                path = Path(task)
                if not path.is_file():
                    raise ConfigError(f"task file not found: {task}", "evaluation.lm_eval.tasks")
                declared = (yaml.safe_load(path.read_text()) or {}).get("task")
                if not isinstance(declared, str):
                    raise ConfigError(f"task file {task} declares no 'task:' name", "evaluation.lm_eval.tasks")
                names.append(declared)
                folders.append(str(path.parent.resolve()))
            else:
                names.append(task)
        return names, list(dict.fromkeys(folders))


def paired(before: Scores, after: Scores) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per task and metric, the float model's value (None without a baseline) beside the quantized one's."""
    return {
        task: {metric: {"before": before.get(task, {}).get(metric), "after": value} for metric, value in m.items()}
        for task, m in after.items()
    }


def lm_eval_version() -> str:
    try:
        return version("lm_eval")
    except PackageNotFoundError as error:
        raise ConfigError(
            "evaluation.lm_eval needs the lm-eval package: pip install 'swquant[eval]'", "evaluation.lm_eval"
        ) from error


def task_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: LmEvalSpec, device: str) -> Scores:
    """Every metric each task reports (without its standard error), for the model as it is now."""
    lm_eval_version()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names, folders = spec.resolved_tasks()
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, device=device)
    results = lm_eval.simple_evaluate(
        model=wrapped,
        tasks=names,
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        task_manager=TaskManager(include_path=folders or None),
        log_samples=False,
    )["results"]
    return {
        task: {
            metric.removesuffix(",none"): float(value)
            for metric, value in values.items()
            if isinstance(value, int | float) and "_stderr" not in metric
        }
        for task, values in results.items()
    }


def _model_fingerprint(model_source: str) -> str:
    """A local model folder by its config and its weight files' names, sizes and times; a hub id by name."""
    folder = Path(model_source)
    if not folder.is_dir():
        return model_source
    parts = [(folder / "config.json").read_text() if (folder / "config.json").is_file() else ""]
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = weights.stat()
        parts.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _task_file_digest(spec: LmEvalSpec) -> list[str]:
    """Task files and the data next to them change the scores: their contents enter the cache key."""
    digests = []
    for folder in spec.resolved_tasks()[1]:
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                digests.append(f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}")
    return digests


def cache_dir() -> Path:
    return Path(os.environ.get("SWQUANT_CACHE_DIR", Path.home() / ".cache" / "swquant")) / "lm_eval"


def cached_baseline(model_source: str, dtype: str, spec: LmEvalSpec, compute: Callable[[], Scores]) -> Scores:
    """The float model's scores from the cache, or ``compute()`` stored for the next job."""
    key_parts: dict[str, Any] = {
        "model": _model_fingerprint(model_source),
        "dtype": dtype,
        "spec": {**asdict(spec), "batch_size": None, "baseline": None},
        "task_files": _task_file_digest(spec),
        "lm_eval": lm_eval_version(),
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
    path = cache_dir() / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(scores))
    temporary.replace(path)  # atomic: two workers never read half a file
    return scores
