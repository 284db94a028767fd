"""Does the Sliced-Wasserstein term help? The point-wise loss against its SW hybrids, over seeds.

For OmniQuant (base ``mse``) and TesseraQ (base ``l2``, from GPTQ's codes) at W3 and W2 (asymmetric
g64), every row quantizes SmolLM2-135M-Instruct on calibration windows drawn from the seed, with SW
directions and batch shuffling drawn from the same seed, and is evaluated on fixed windows of
Persuasion and Brown. Per cell (method, bits, loss) the table gives the mean and the spread over the
seeds and, per seed, the share of the point-wise row's gap to float that the hybrid recovers (the
paper's metric: ``(ppl_pointwise - ppl_hybrid) / (ppl_pointwise - ppl_float)``). A difference counts
only when the seeds' ranges do not overlap. Each row also records the block-output statistics SW
should move (``quant_core.output_stats``), averaged over blocks, before and after calibration.

Parts:

- ``core``: point-wise and plain hybrid for both methods and both bit widths, over the seeds, plus
  each method's starting point (searched-clip RTN for OmniQuant, GPTQ for TesseraQ) on seed 0;
- ``sweep``: on the sweep cell and seed 0, the SW weight, the number of projections and
  ``sw_block_size``, one at a time around the defaults;
- ``best``: the sweep's winner on the other seeds;
- ``variants``: max-sliced, learned projections, multi-scale and site SW on TesseraQ W2, on the
  first seed, against the plain hybrid's range over the core seeds.

Rows run in their own processes and are kept in the JSON, so an interrupted study resumes.

    python -m bench.sw_study [--parts core sweep variants] [--seeds 0 1 2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.assets import austen_calibration_text, prepare_smollm2, text_path
from quant_core.corpus import calibration_windows, tokenize_file
from quant_core.engine import calibrate_blocks
from quant_core.eval_windows import evaluation_windows, window_start
from quant_core.losses import build_loss
from quant_core.memory import host_peak_mb
from quant_core.methods import build_method
from quant_core.model_io import load_model
from quant_core.perplexity import perplexity
from quant_core.quantizer import QuantSpec

RESULTS = Path(__file__).with_name("results") / "sw_study.json"
EVAL_TEXTS = ("persuasion", "brown")
GROUP_SIZE = 64
# 16 windows of 128 tokens, a quarter of bench.quality's tokens: one row costs about four CPU minutes
# with its evaluation (a 16 x 256 row took 5.4). Training steps keep each method's default count,
# only shorter; the evaluation windows are bench.quality's.
N_SAMPLES, SEQ_LEN = 16, 128
EVAL_SEQ_LEN, EVAL_WINDOWS = 512, 10
_TESSERA = {"init": "gptq", "rounds": 4, "steps_per_round": 8, "batch_size": 2, "lr": 1e-2, "scale_lr": 1e-3}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {  # method -> (point-wise base loss, options)
    "omniquant": ("mse", {}),
    "tesseraq": ("l2", _TESSERA),
}
STARTS: dict[str, tuple[str, dict[str, Any]]] = {  # what each method starts from, as a row of its own
    "omniquant": ("rtn", {"clip_search": True}),
    "tesseraq": ("gptq", {}),
}
SWEEP_CELL = ("omniquant", 2)
SWEEP: dict[str, dict[str, Any]] = {
    "weight 0.03": {"hybrid_weights": {"sw": 0.03}},
    "weight 0.3": {"hybrid_weights": {"sw": 0.3}},
    "weight 1": {"hybrid_weights": {"sw": 1.0}},
    "K 64": {"sw_num_projections": 64},
    "K 256": {"sw_num_projections": 256},
    "block 4": {"sw_block_size": 4},
}
# The sweep's best on seed 0 (best on Persuasion, third on Brown; bench/HISTORY.md), run on the other seeds.
SWEEP_WINNER = "K 64"
PARTS = ("sweep", "best", "core", "variants")
VARIANTS = ("max_sw", "learned_sw", "ms_sw", "site_sw")
# The variants refine GPTQ's codes (TesseraQ) at W2, where the point-wise loss has the most to fix.
VARIANT_CELL = ("tesseraq", 2)
# One seed for the variants (compared with the plain hybrid's range over three): the study fits two hours.
VARIANT_SEEDS = 1


@dataclass(frozen=True)
class Cell:
    """One row of the study: a method at some bits with a loss and options, on one seed."""

    method: str
    bits: int | None
    loss: str
    seed: int
    setting: str = "default"  # the sweep setting or variant name; "default" for the plain losses
    options: dict[str, Any] = field(default_factory=dict)
    loss_options: dict[str, Any] = field(default_factory=dict)
    group: str = ""  # the method whose study this row belongs to (a start row's method differs)

    @property
    def key(self) -> str:
        if self.bits is None:
            return "fp32"
        return f"{self.group or self.method}/W{self.bits}/{self.loss}/{self.setting}/seed{self.seed}"


def _hybrid(base: str, term: str = "sw") -> str:
    return f"{base}_{term}"


def cells(parts: list[str], seeds: list[int]) -> list[Cell]:
    """Every row the chosen parts need, fp32 first."""
    todo = [Cell("fp32", None, "mse", 0)]
    if "sweep" in parts:  # first, so that its winner can get its seeds while the rest runs
        method, bits = SWEEP_CELL
        base, options = METHODS[method]
        for setting, loss_options in SWEEP.items():
            todo.append(Cell(method, bits, _hybrid(base), seeds[0], setting, options, loss_options))
    if "best" in parts:
        method, bits = SWEEP_CELL
        base, options = METHODS[method]
        for seed in seeds[1:]:
            todo.append(Cell(method, bits, _hybrid(base), seed, SWEEP_WINNER, options, SWEEP[SWEEP_WINNER]))
    if "core" in parts:
        for method, (base, options) in METHODS.items():
            for bits in (3, 2):
                start, start_options = STARTS[method]
                todo.append(Cell(start, bits, "mse", seeds[0], "start", start_options, group=method))
                for seed in seeds:
                    for loss in (base, _hybrid(base)):
                        todo.append(Cell(method, bits, loss, seed, options=options))
    if "variants" in parts:
        method, bits = VARIANT_CELL
        base, options = METHODS[method]
        for variant in VARIANTS:
            for seed in seeds[:VARIANT_SEEDS]:
                todo.append(Cell(method, bits, _hybrid(base, variant), seed, variant, options))
    return list({c.key: c for c in todo}.values())


def _mean_stats(records: list[Any], name: str) -> dict[str, float]:
    values = [getattr(r, name) for r in records]
    return {k: statistics.fmean(v[k] for v in values) for k in values[0]}


def run_cell(cell: Cell) -> dict[str, Any]:
    """Quantize (unless fp32) and evaluate one row in this process."""
    model, tokenizer = load_model(str(prepare_smollm2()))
    result: dict[str, Any] = {"cell": asdict(cell)}
    started = time.perf_counter()
    if cell.bits is not None:
        tokens = tokenize_file(tokenizer, austen_calibration_text())
        windows = calibration_windows(tokens, N_SAMPLES, SEQ_LEN, cell.seed, window_start(tokenizer).calibration_token)
        loss = build_loss(cell.loss, seed=cell.seed, **cell.loss_options)
        method = build_method(cell.method, QuantSpec(bits=cell.bits, group_size=GROUP_SIZE), loss, cell.options)
        records = calibrate_blocks(model, windows, method, build_loss("mse"), seed=cell.seed)
        result["mse_ratio"] = sum(r.mse_after for r in records) / sum(r.mse_before for r in records)
        result["distribution_before"] = _mean_stats(records, "distribution_before")
        result["distribution_after"] = _mean_stats(records, "distribution_after")
        shares = [r.method_stats["gradient_share"]["last"] for r in records if "gradient_share" in r.method_stats]
        if shares:
            result["sw_gradient_share"] = statistics.fmean(1 - s.get("base", 0.0) for s in shares)
    result["calibration_s"] = time.perf_counter() - started
    texts = {name: evaluation_windows(tokenizer, text_path(name), EVAL_SEQ_LEN, EVAL_WINDOWS) for name in EVAL_TEXTS}
    result["perplexity"] = {name: perplexity(model, t.ids, 4, "cpu", scored=t.scored) for name, t in texts.items()}
    result["peak_host_mb"] = host_peak_mb()
    return result


def _run_subprocess(cell: Cell, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.sw_study", "--one", json.dumps(asdict(cell)), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [""]
        return {"cell": asdict(cell), "error": f"exit {done.returncode}: {last[0][-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- summary ---------------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def _rows_by(rows: dict[str, Any], method: str, bits: int, loss: str, setting: str) -> dict[int, dict[str, Any]]:
    return {
        r["cell"]["seed"]: r
        for r in rows.values()
        if "perplexity" in r
        and (r["cell"]["group"] or r["cell"]["method"]) == method
        and r["cell"]["bits"] == bits
        and r["cell"]["loss"] == loss
        and r["cell"]["setting"] == setting
    }


def summarise(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (method, bits, loss, setting): perplexities over seeds and the gap SW recovers."""
    fp = rows.get("fp32", {}).get("perplexity")
    groups = sorted(
        {
            (r["cell"]["group"] or r["cell"]["method"], r["cell"]["bits"], r["cell"]["loss"], r["cell"]["setting"])
            for r in rows.values()
            if "perplexity" in r and r["cell"]["bits"] is not None
        },
        key=lambda g: (g[0], -g[1], g[3] != "start", g[2], g[3]),
    )
    summary = []
    for method, bits, loss, setting in groups:
        mine = _rows_by(rows, method, bits, loss, setting)
        base = _rows_by(rows, method, bits, METHODS[method][0], "default")
        entry: dict[str, Any] = {
            "method": method,
            "bits": bits,
            "loss": loss,
            "setting": setting,
            "seeds": sorted(mine),
        }
        for text in EVAL_TEXTS:
            values = [mine[s]["perplexity"][text] for s in sorted(mine)]
            entry[text] = {"values": values, "mean": statistics.fmean(values)}
            paired = [s for s in sorted(mine) if s in base]
            if fp and loss != METHODS[method][0] and setting != "start" and paired:
                recovered = [
                    100
                    * (base[s]["perplexity"][text] - mine[s]["perplexity"][text])
                    / (base[s]["perplexity"][text] - fp[text])
                    for s in paired
                ]
                base_values = [base[s]["perplexity"][text] for s in paired]
                mine_values = [mine[s]["perplexity"][text] for s in paired]
                entry[text]["gap_recovered_pct"] = recovered
                entry[text]["beyond_spread"] = len(paired) > 1 and (
                    max(mine_values) < min(base_values) or min(mine_values) > max(base_values)
                )
        entry["minutes"] = statistics.fmean(r["calibration_s"] for r in mine.values()) / 60
        for name in ("distribution_before", "distribution_after"):
            if all(name in r for r in mine.values()):
                entry[name] = {
                    k: statistics.fmean(r[name][k] for r in mine.values())
                    for k in ("mean_shift", "log_var_ratio", "sw")
                }
        shares = [r["sw_gradient_share"] for r in mine.values() if "sw_gradient_share" in r]
        if shares:
            entry["sw_gradient_share"] = statistics.fmean(shares)
        summary.append(entry)
    return summary


def format_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| method | bits | loss | setting | seeds | persuasion ppl | brown ppl | gap recovered P / B (%) | "
        "SW share | after: mean shift / log var / SW | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in summary:
        recovered = []
        for text in EVAL_TEXTS:
            values = e[text].get("gap_recovered_pct")
            mark = " *" if e[text].get("beyond_spread") else ""
            recovered.append(_spread(values) + mark if values else "")
        after = e.get("distribution_after")
        stats = f"{after['mean_shift']:.3f} / {after['log_var_ratio']:.3f} / {after['sw']:.4f}" if after else ""
        share = f"{e['sw_gradient_share']:.2f}" if "sw_gradient_share" in e else ""
        lines.append(
            f"| {e['method']} | W{e['bits']} | {e['loss']} | {e['setting']} | {len(e['seeds'])} | "
            f"{_spread(e['persuasion']['values'])} | {_spread(e['brown']['values'])} | "
            f"{' / '.join(recovered)} | {share} | {stats} | {e['minutes']:.1f} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Gap recovered (mean and min-max over seeds) per hybrid cell, one panel per evaluation text."""
    from matplotlib import pyplot as plt

    entries = [e for e in summary if e["persuasion"].get("gap_recovered_pct")]
    if not entries:
        return
    fig, axes = plt.subplots(1, len(EVAL_TEXTS), figsize=(13, 0.45 * len(entries) + 2), sharey=True)
    labels = [f"{e['method']} W{e['bits']} {e['loss']} {e['setting']}" for e in entries]
    for ax, text in zip(axes, EVAL_TEXTS, strict=True):
        for i, e in enumerate(entries):
            values = e[text]["gap_recovered_pct"]
            mean = statistics.fmean(values)
            ax.errorbar(mean, i, xerr=[[mean - min(values)], [max(values) - mean]], fmt="o", capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set(title=f"{text}: share of the point-wise gap SW recovers", xlabel="% of gap (higher is better)")
        ax.grid(True, alpha=0.3)
    axes[0].set_yticks(range(len(entries)), labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summary", action="store_true", help="only print the table of the rows already run")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_cell(Cell(**json.loads(args.one)))))
        return
    saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows: dict[str, Any] = saved.get("rows", {})
    if not args.summary:
        prepare_smollm2()
        austen_calibration_text()
        todo = [c for c in cells(args.parts, args.seeds) if c.key not in rows or "error" in rows[c.key]]

        def save() -> None:
            machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads_per_row": args.threads}
            settings = {
                "n_samples": N_SAMPLES,
                "seq_len": SEQ_LEN,
                "eval_windows": EVAL_WINDOWS,
                "eval_seq_len": EVAL_SEQ_LEN,
                "group_size": GROUP_SIZE,
            }
            payload = {"settings": settings, "machine": machine, "rows": rows, "summary": summarise(rows)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(payload, indent=2))

        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(_run_subprocess, cell, args.threads): cell for cell in todo}
            for future, cell in futures.items():
                rows[cell.key] = future.result()
                save()
                r = rows[cell.key]
                status = r.get("error") or " / ".join(f"{r['perplexity'][t]:.2f}" for t in EVAL_TEXTS)
                print(f"{cell.key}: {status} ({r.get('calibration_s', 0) / 60:.1f} min)", flush=True)
    summary = summarise(rows)
    print(format_table(summary))
    plot(summary, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
