"""Bits where they matter: the size-quality curve of uniform widths against size budgets, each point
one job run through the pipeline users run (``run_job`` on the settings ``swquant quantize`` takes).

Every row is the same job (GPTQ or ``--method``, the bench's calibration and evaluation windows) at a uniform width
in groups of 64, or with a size budget over the job's default candidates (2, 3, 4 and 8 bits in groups
of 32, 64 and 128, each unit offered the group sizes that divide its input widths). A row gives the
block linears' storage bits per weight (codes, 16-bit scales, zero points), the packed checkpoint's
bytes, the perplexity on each evaluation text, and what the sensitivity pass cost beside the
calibration::

    python -m bench.size_budget [--model DIR] [--seed 0 --seed 1] [--budget 3.5 ...] [--uniform 3 ...] \\
        [--result bench/results/size_budget_smollm2.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.assets import austen_calibration_text, prepare_smollm2, text_path
from quant_core.job import JobSpec
from quant_core.job_settings import JobSettings, validated
from quant_core.pipeline import run_job

BUDGETS = (2.5, 3.0, 3.5, 4.0)
UNIFORM = (2, 3, 4)
GROUP_SIZE = 64
TEXTS = ("persuasion", "brown")


def settings(model: Path, seed: int, args: argparse.Namespace, bits: int | None, budget: float | None) -> JobSettings:
    """The row's job: ``bits`` uniform in groups of 64, or a budget of ``budget`` bits per weight."""
    body: dict[str, Any] = {
        "model": str(model),
        "method": args.method,
        "bits": bits or 4,
        "group_size": GROUP_SIZE,
        "calibration": {"text": str(austen_calibration_text()), "n_samples": args.n_samples},
        "evaluation": {"texts": [str(text_path(t)) for t in TEXTS], "max_windows": args.eval_windows},
        "export_formats": ["pack_quantized"],
        "seed": seed,
    }
    if budget is not None:
        body["budget"] = {"bits_per_weight": budget, "samples": args.budget_samples}
    return validated(JobSettings, body)


def run_row(model: Path, seed: int, args: argparse.Namespace, bits: int | None, budget: float | None) -> dict[str, Any]:
    label = f"{args.method} " + (f"uniform W{bits} g{GROUP_SIZE}" if budget is None else f"budget {budget:g} bits")
    with tempfile.TemporaryDirectory() as out:
        report = run_job(JobSpec.from_settings(settings(model, seed, args, bits, budget)), Path(out)).to_dict()
    packed = report["exports"]["pack_quantized"]
    allocation = report["allocation"]
    blocks = report["blocks"]
    linear_bits = (
        allocation["bits_per_weight"]
        if allocation
        else sum(b["bits_per_weight"] for b in blocks) / len(blocks)  # uniform: every block alike
    )
    return {
        "label": label,
        "seed": seed,
        "bits_per_weight": linear_bits,
        "packed_bytes": packed["bytes"],
        "perplexity": {Path(name).stem: pair["after"] for name, pair in report["perplexity"].items()},
        "float_perplexity": {Path(name).stem: pair["before"] for name, pair in report["perplexity"].items()},
        "calibration_s": report["seconds"]["calibration"],
        "allocation_s": allocation["seconds"] if allocation else 0.0,
        "schemes": _scheme_counts(allocation),
    }


def _scheme_counts(allocation: dict[str, Any] | None) -> dict[str, int]:
    return dict(Counter(unit["scheme"] for unit in (allocation or {}).get("units", [])))


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'row':<28} {'seed':>4} {'bits/w':>7} {'packed MB':>9} "
        + " ".join(f"{name[:10]:>10}" for name in rows[0]["perplexity"])
        + f" {'calib s':>8} {'alloc s':>8}"
    ]
    for row in rows:
        ppl = " ".join(f"{value:>10.3f}" for value in row["perplexity"].values())
        lines.append(
            f"{row['label']:<28} {row['seed']:>4} {row['bits_per_weight']:>7.3f} {row['packed_bytes'] / 1e6:>9.2f} "
            f"{ppl} {row['calibration_s']:>8.0f} {row['allocation_s']:>8.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: SmolLM2-135M (bench.assets)")
    parser.add_argument("--seed", type=int, action="append", help="default: 0 and 1")
    parser.add_argument("--budget", type=float, nargs="*", help=f"bits per weight (default: {BUDGETS}; none: no row)")
    parser.add_argument("--uniform", type=int, nargs="*", help=f"uniform widths (default: {UNIFORM}; none: no row)")
    parser.add_argument("--method", default="gptq", help="the calibration method of every row")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--budget-samples", type=int, default=8)
    parser.add_argument("--result", type=Path, default=Path("bench/results/size_budget_smollm2.json"))
    args = parser.parse_args(argv)
    model = args.model or prepare_smollm2()
    uniform = UNIFORM if args.uniform is None else tuple(args.uniform)
    budgets = BUDGETS if args.budget is None else tuple(args.budget)
    planned = [(bits, None) for bits in uniform] + [(None, budget) for budget in budgets]
    rows: list[dict[str, Any]] = []
    args.result.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seed or [0, 1]:
        for bits, budget in planned:
            rows.append(run_row(model, seed, args, bits, budget))
            print(format_table(rows[-1:]), flush=True)
            # every finished row is kept: an interrupted run loses only the row it was in
            args.result.write_text(json.dumps({"model": str(model), "rows": rows}, indent=2))
    print(format_table(rows))


if __name__ == "__main__":
    main()
