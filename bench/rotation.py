"""Cost of QuIP's randomized Hadamard rotations per end-to-end tuning step, on SmolLM2-135M's linears.

End-to-end tuning (quant_core.finetune) rebuilds every weight a method quantized in the rotated basis
from its codes and step sizes at each step, ``U^T Q V``, and its backward rotates the weight's
gradient back, ``U G V^T``; GPTQ with ``incoherence: hadamard`` rotates each weight and Hessian once.
This times both directions for the seven linears of a SmolLM2-135M block (q, k, v, o, gate, up, down)
times its 30 blocks, against one dense matrix product per side as the reference cost, and checks that
the factored transform gives the dense product's result.

    python -m bench.rotation [--threads 2] [--repeats 5] [--out bench/results/rotation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from quant_core.incoherence import LinearRotation

RESULTS = Path(__file__).with_name("results") / "rotation.json"
BLOCKS = 30
SHAPES = {  # [out, in] of one SmolLM2-135M block's linears
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def _median_ms(call: Callable[[], Tensor], repeats: int) -> float:
    call()  # warm-up: first-touch allocations and the factors' dtype conversion
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(repeats: int) -> list[dict[str, float | str]]:
    """Per linear: milliseconds of ``restore`` (the forward), ``rotate`` (the backward) and the dense reference."""
    generator = torch.Generator().manual_seed(0)
    rows: list[dict[str, float | str]] = []
    for name, (out_features, in_features) in SHAPES.items():
        rotation = LinearRotation.draw(out_features, in_features, generator)
        weight = torch.randn(out_features, in_features, generator=generator)
        u = rotation.out_rotation.matrix(torch.float32)
        v = rotation.in_rotation.matrix(torch.float32)
        error = (rotation.restore(weight) - u.T @ weight @ v).abs().max().item()
        rows.append(
            {
                "linear": name,
                "restore_ms": _median_ms(partial(rotation.restore, weight), repeats),
                "rotate_ms": _median_ms(partial(rotation.rotate, weight), repeats),
                "dense_ms": _median_ms(partial(torch.linalg.multi_dot, [u.T, weight, v]), repeats),
                "max_abs_error_vs_dense": error,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.repeats)
    print("| linear | restore (forward) ms | rotate (backward) ms | dense U^T W V ms | max error vs dense |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['linear']} | {row['restore_ms']:.2f} | {row['rotate_ms']:.2f} | {row['dense_ms']:.2f} | "
            f"{row['max_abs_error_vs_dense']:.1e} |"
        )
    step = {key: BLOCKS * sum(float(row[key]) for row in rows) for key in ("restore_ms", "rotate_ms", "dense_ms")}
    print(
        f"per tuning step ({BLOCKS} blocks): restore {step['restore_ms']:.0f} ms, rotate {step['rotate_ms']:.0f} ms, "
        f"dense reference {step['dense_ms']:.0f} ms per direction"
    )
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows, "per_step_ms": step}, indent=2))


if __name__ == "__main__":
    main()
