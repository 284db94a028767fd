"""Checkpoints in the runtimes that serve them, on SmolLM2-135M: one row per grid and runtime.

Each grid the runtimes accept is one GPTQ job (searched clipping, 16 x 512 Austen calibration windows, seed 0) whose
targets are every runtime that can run it; the job itself loads each written checkpoint in each
runtime and scores the report's 10 x 512 windows of Persuasion there (quant_core.runtimes). The
fake-quantized export is also scored in vLLM, which runs half-precision dense checkpoints on any
CPU. Sizes are the written files against the model in bfloat16.

    eval "$(bash bench/install_runtimes.sh runtimes)"   # llama.cpp and vLLM, once
    python -m bench.runtimes [--out bench/results/runtimes.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from bench.assets import austen_calibration_text, prepare_smollm2, text_path
from quant_core.job import CalibrationSpec, EvaluationSpec, JobSpec
from quant_core.job_settings import RUNTIMES
from quant_core.output_names import FAKE_QUANT_DIR
from quant_core.pipeline import run_job
from quant_core.quantizer import QuantSpec
from quant_core.runtimes import score_checkpoint, target_blockers

RESULTS = Path(__file__).with_name("results") / "runtimes.json"
# (bits, symmetric, group size, GPTQ options, rotation): group 128 does not divide SmolLM2's 576-wide
# inputs. The absorbed rotation runs everywhere; QuIP's per-layer one is refused by every runtime.
GRIDS = [
    (4, False, 64, {}, "none"),
    (4, True, 32, {}, "none"),
    (8, True, 32, {}, "none"),
    (4, False, 64, {}, "hadamard"),
    (4, False, 64, {"incoherence": "hadamard"}, "none"),
]


def run_grid(
    model: Path, bits: int, symmetric: bool, group: int | None, options: dict[str, Any], rotation: str
) -> dict[str, Any]:
    """One job with every runtime that accepts the grid as a target; what each made of it."""
    calib = CalibrationSpec(text=str(austen_calibration_text()), n_samples=16, seq_len=512)
    evaluation = EvaluationSpec(texts=(str(text_path("persuasion")),), max_windows=10)
    base = dict(
        model=str(model),
        quant=QuantSpec(bits, symmetric, group),
        method="gptq",
        method_options=options,
        rotation=rotation,
    )
    probe = JobSpec(**base, calibration=calib, evaluation=evaluation)
    config, rotates = AutoConfig.from_pretrained(model), probe.build_method().rotates
    blockers = {runtime: target_blockers(runtime, config, probe.quant, rotates) for runtime in RUNTIMES}
    targets = tuple(runtime for runtime, reasons in blockers.items() if not reasons)
    refused = {runtime: "; ".join(reasons) for runtime, reasons in blockers.items() if reasons}
    if not targets:  # refused before any calibration: there is nothing to run
        return {"grid": probe.quant.label, "options": options, "rotation": rotation, "refused": refused}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        spec = JobSpec(
            **base, calibration=calib, evaluation=evaluation, targets=targets, export_formats=("fake_quant",)
        )
        report = run_job(spec, out)
        windows = _report_windows(spec, out)
        reported = {name: pair.after for name, pair in report.perplexity.items()}
        dense = score_checkpoint("vllm", out / FAKE_QUANT_DIR, out, windows, reported)
        for name, pair in report.perplexity.items():
            label = f"{spec.quant.label} {options} rotation {rotation}"
            print(f"{label}: float {pair.before:.2f} -> {pair.after:.2f} on {name}")
        return {
            "grid": spec.quant.label,
            "options": options,
            "rotation": rotation,
            "perplexity": {name: pair.after for name, pair in report.perplexity.items()},
            "float_perplexity": {name: pair.before for name, pair in report.perplexity.items()},
            "exports": report.to_dict()["exports"],
            "runtimes": {name: score.to_dict() for name, score in report.runtimes.items()},
            "vllm_fake_quant": dense.to_dict(),
            "refused": refused,
        }


def _report_windows(spec: JobSpec, out: Path) -> Any:
    """The evaluation windows the job scored (the same tokenizer, text and window rule)."""
    from quant_core.eval_windows import evaluation_windows
    from quant_core.model_io import load_tokenizer

    tokenizer = load_tokenizer(str(out / FAKE_QUANT_DIR))
    seq_len = spec.evaluation.seq_len or spec.calibration.seq_len
    return {  # keyed as the report keys its perplexities
        text: evaluation_windows(tokenizer, Path(text), seq_len, spec.evaluation.max_windows)
        for text in spec.evaluation.texts
    }


def table(rows: list[dict[str, Any]], bf16_bytes: int) -> str:
    lines = [
        "| grid | rotated | runtime | checkpoint | size vs bf16 | perplexity there | report | difference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        rotated = (
            "QuIP, per layer"
            if row["options"].get("incoherence") == "hadamard"
            else "absorbed"
            if row.get("rotation", "none") != "none"
            else "no"
        )
        report = next(iter(row.get("perplexity", {}).values()), None)
        scores = dict(row.get("runtimes", {}))
        if "vllm_fake_quant" in row:
            scores["vllm (fake_quant bf16)"] = row["vllm_fake_quant"]
        for runtime, score in scores.items():
            export = "gguf" if runtime == "llama.cpp" else "fake_quant" if "fake_quant" in runtime else "pack_quantized"
            size = row["exports"].get(export, {}).get("bytes")
            ratio = f"{size / bf16_bytes:.0%}" if size else "100%"
            if score["ran"]:
                value = next(iter(score["perplexity"].values()))
                difference = next(iter(score["relative_difference"].values()))
                lines.append(
                    f"| {row['grid']} | {rotated} | {runtime} | {export} | {ratio} | {value:.2f} | {report:.2f} "
                    f"| {difference:+.2%} |"
                )
            else:
                lines.append(
                    f"| {row['grid']} | {rotated} | {runtime} | {export} | {ratio} | not run | {report:.2f} | |"
                )
        for runtime, reason in row["refused"].items():
            lines.append(f"| {row['grid']} | {rotated} | {runtime} | refused before calibration: {reason} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    model = prepare_smollm2()
    bf16_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors")) // 2  # the float32 copy, halved
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for grid in GRIDS:  # written after every row, so a long run shows what it has
        rows.append(run_grid(model, *grid))
        result = {"machine": platform.processor() or platform.machine(), "bf16_bytes": bf16_bytes, "rows": rows}
        args.out.write_text(json.dumps(result, indent=2))
    print(table(rows, bf16_bytes))


if __name__ == "__main__":
    main()
