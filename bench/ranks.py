"""One job on one rank of two threads against two ranks of one thread: wall time, peak memory per rank,
perplexity. A third row, one rank of one thread (first seed only), is what one rank's compute alone
takes: with the two-rank row it separates the work that splits over ranks from the work every rank
repeats (bench/ranks_projection.py).

The job: SmolLM2-135M, GPTQ with QuIP's incoherence, W4 group 64, then one epoch of end-to-end tuning
with ``kd_sw`` (two windows a step, so that both ranks work at every step), on ``--n-samples``
Austen windows of 512 tokens, perplexity on the first 20 windows of Persuasion. Each row is a
``swquant quantize`` process (its ranks are its children); its peak resident memory per rank is each
process's ``VmHWM``, read every half second while it runs, so it covers every stage, not only the
blocks. Rows run one after another on the whole machine: run them with nothing else on the cores.

    python -m bench.ranks [--seeds 0 1] [--n-samples 64] [--result bench/results/ranks.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.assets import austen_calibration_text, prepare_smollm2, text_path

ROWS = {"1 rank x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 2), "1 rank x 1 thread": (1, 1)}  # ranks, threads
RECIPE = [
    "--method", "gptq", "--method-opt", "incoherence=hadamard", "--bits", "4", "--group-size", "64",
    "--finetune", "epochs=1", "--finetune", "loss=kd_sw", "--finetune", "batch_size=2",
    "--seq-len", "512", "--eval-max-windows", "20", "--export", "fake_quant",
]  # fmt: skip
POLL_S = 0.5


def _peak_mib(pid: int) -> float | None:
    """The process's peak resident memory so far (``VmHWM``), or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _ranks_of(leader: psutil.Process) -> list[int]:
    """The leader (rank 0) and the ranks it spawned, not multiprocessing's resource tracker."""
    try:
        children = leader.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    spawned = []
    for child in children:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                spawned.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return [leader.pid, *spawned]


def run_row(
    world_size: int, threads: int, seed: int, n_samples: int, model: Path, calib: Path, out: Path
) -> dict[str, Any]:
    """One job on ``threads`` threads in all; its wall time, every rank's peak resident memory and the
    report's perplexity."""
    command = [sys.executable, "-m", "quant_core.cli", "quantize", "--model", str(model), *RECIPE]
    command += ["--calib", str(calib), "--eval", str(text_path("persuasion")), "--n-samples", str(n_samples)]
    command += ["--seed", str(seed), "--world-size", str(world_size), "--out", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    leader = psutil.Process(process.pid)
    peaks: dict[int, float] = {}
    order: list[int] = []
    while process.poll() is None:
        for pid in _ranks_of(leader):
            peak = _peak_mib(pid)
            if peak is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), peak)
                if pid not in order:
                    order.append(pid)
        time.sleep(POLL_S)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {process.returncode}")
    report = json.loads((out / "report.json").read_text())
    (ppl,) = report["perplexity"].values()  # the one evaluation text
    blocks = report["blocks"]
    return {
        "world_size": world_size,
        "threads": threads,
        "seed": seed,
        "wall_s": wall,
        "seconds": report["seconds"],
        "calibration_tokens": report["calibration_tokens"],
        "block_s_mean": sum(b["seconds"] for b in blocks) / len(blocks),
        "peak_mib_by_rank": [peaks[pid] for pid in order],
        "ppl_float": ppl["before"],
        "ppl_quantized": ppl["after"],
        "tuning_epoch_loss": report["method_stats"]["finetune"]["epoch_losses"][-1],
        "tuning_s_per_step": report["method_stats"]["finetune"].get("seconds_per_step"),
        "parallel": report["parallel"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--result", type=Path, default=Path("bench/results/ranks.json"))
    args = parser.parse_args(argv)
    model, calib = prepare_smollm2(), austen_calibration_text()
    done: list[dict[str, Any]] = json.loads(args.result.read_text()) if args.result.exists() else []
    for seed in args.seeds:
        for label, (world_size, threads) in ROWS.items():
            if threads == 1 and world_size == 1 and seed != args.seeds[0]:
                continue
            if any(r["seed"] == seed and r["row"] == label for r in done):
                continue
            with tempfile.TemporaryDirectory() as scratch:
                out = Path(scratch)
                row = {"row": label, **run_row(world_size, threads, seed, args.n_samples, model, calib, out)}
            done.append(row)
            args.result.parent.mkdir(parents=True, exist_ok=True)
            args.result.write_text(json.dumps(done, indent=2))
    columns = ["row", "seed", "wall (s)", "mean block (s)", "peak per rank (MiB)", "ppl float", "ppl W4", "tuning loss"]
    print(f"| {' | '.join(columns)} |\n{'| --- ' * len(columns)}|")
    for r in sorted(done, key=lambda r: (list(ROWS).index(r["row"]), r["seed"])):
        peaks = ", ".join(f"{p:.0f}" for p in r["peak_mib_by_rank"])
        print(
            f"| {r['row']} | {r['seed']} | {r['wall_s']:.0f} | {r['block_s_mean']:.1f} | {peaks} | "
            f"{r['ppl_float']:.3f} | {r['ppl_quantized']:.3f} | {r['tuning_epoch_loss']:.5f} |"
        )


if __name__ == "__main__":
    main()
