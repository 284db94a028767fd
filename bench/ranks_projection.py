"""On paper, from measured figures: GPTQ's per-block time and each rank's memory for a 70B Llama-shaped
model at 1, 2, 4 and 8 ranks, and where the communication starts to cost more than it saves.

Measured: SmolLM2-135M's mean block time on one rank of one thread and on two ranks of one thread
each (``bench/results/ranks.json``, from ``python -m bench.ranks``: a rank here is a core, as a rank
on a GPU node is a device), and the all-reduce and all-gather bandwidth of two local Gloo ranks on
this machine (measured here, 64 MiB tensors). The model of a block's time at N ranks:

    T(N) = R + P / N + C(N)

P is the work that splits with the windows (the block's forwards, the Hessians, GPTQ's column walk by
rows), R what every rank repeats, C(N) the traffic: a ring all-reduce of every Hessian (2 (N-1)/N of
its bytes through each rank's link) and an all-gather of the walked rows (weights and the compensated
copy, (N-1)/N). From the two SmolLM2 points and C measured here, P and R of SmolLM2. R holds each
linear's Cholesky factorisation and inverse, about (4/3) d_in^3 multiply-adds per walk, two walks per
linear (the full-range and the clipped grid), counted at this machine's measured rate; the rest of R
(the rotation of the weights, the diagnostics, the gathered results) is taken to grow with the
block's weights. Scaled to the 70B block: P by its weights times its tokens, R's cubic part by the
sum of d_in^3, the rest by its weights; C by the bytes. Three sets of rates: this machine's (CPU
ranks, Gloo, all measured), and GPUs in one node and across machines, whose rates are assumptions
stated in the output, not measurements: compute
``--gpu-tflops`` (achieved float32/TF32 rate) against this machine's measured matmul rate, links
``--nvlink-gbs`` and ``--network-gbs`` per rank.

Memory per rank: the block being calibrated (float32 while it is calibrated), the Hessians of its
linears (replicated on every rank), and the rank's share of both chains' activations (float32) and of
the tuning's teacher states. A job that loads the model holds all of it on every rank, in host
memory: listed apart. With ``lazy_load`` each rank streams one block at a time instead (over ranks,
without end-to-end tuning for now).

    python -m bench.ranks_projection [--ranks-result bench/results/ranks.json] \
        [--result bench/results/ranks_projection.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quant_core.launch import free_port

GIB = 2**30
PROBE_ELEMENTS = 2**24  # 64 MiB of float32 per collective
MATMUL = 2048  # side of the matrices whose product measures this machine's float32 rate
CUBIC = 4 / 3  # multiply-adds of a Cholesky factorisation and an inverse, in units of d^3
WALKS = 2  # GPTQ walks each linear from the full-range grid and from the clipped one
RANKS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class BlockShape:
    """A Llama-style decoder block: its linears as (input width, output width)."""

    hidden: int
    intermediate: int
    kv_width: int  # key and value projections' output width (grouped-query attention)
    layers: int
    params_total: float  # the whole model's parameters

    @property
    def linears(self) -> list[tuple[int, int]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def params(self) -> int:
        return sum(a * b for a, b in self.linears)

    @property
    def hessian_inputs(self) -> list[int]:
        """Distinct input widths with a Hessian each: q/k/v share one, gate/up share one."""
        return [self.hidden, self.hidden, self.hidden, self.intermediate]

    @property
    def factorisation_flops(self) -> float:
        """Every linear's Cholesky factorisation and inverse, for each of GPTQ's two walks."""
        return WALKS * 2 * CUBIC * float(sum(a**3 for a, _ in self.linears))


SMOLLM2 = BlockShape(hidden=576, intermediate=1536, kv_width=192, layers=30, params_total=134.5e6)
LLAMA_70B = BlockShape(hidden=8192, intermediate=28672, kv_width=1024, layers=80, params_total=70.6e9)


def _probe(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tensor = torch.ones(PROBE_ELEMENTS)
    parts = [torch.empty(PROBE_ELEMENTS // 2) for _ in range(2)]
    timings: dict[str, float] = {}
    for name, call in (
        ("all_reduce", lambda: dist.all_reduce(tensor)),
        ("all_gather", lambda: dist.all_gather(parts, tensor[: PROBE_ELEMENTS // 2])),
    ):
        call()  # connections warm
        dist.barrier()
        started = time.perf_counter()
        for _ in range(5):
            call()
        timings[name] = (time.perf_counter() - started) / 5
    if rank == 0:
        out.write_text(json.dumps(timings))
    dist.destroy_process_group()


def measured_link() -> dict[str, float]:
    """Bytes per second through each rank's link of two local Gloo ranks, by the ring's accounting:
    an all-reduce moves 2 (N-1)/N of the tensor, an all-gather (N-1)/N of the whole result."""
    out = Path(f"/tmp/ranks_probe_{os.getpid()}.json")
    mp.start_processes(_probe, args=(free_port(), out), nprocs=2, start_method="spawn")
    timings = json.loads(out.read_text())
    out.unlink()
    size = PROBE_ELEMENTS * 4
    return {"all_reduce": size / timings["all_reduce"], "all_gather": size / 2 / timings["all_gather"]}


def matmul_tflops() -> float:
    """One thread's float32 matrix-product rate on this machine: one rank's compute here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(MATMUL, MATMUL), torch.randn(MATMUL, MATMUL)
        a @ b
        started = time.perf_counter()
        for _ in range(3):
            a @ b
        return 3 * 2 * MATMUL**3 / (time.perf_counter() - started) / 1e12
    finally:
        torch.set_num_threads(threads)


def traffic_seconds(shape: BlockShape, ranks: int, link: dict[str, float]) -> float:
    """C(N): the Hessians' ring all-reduce and the walked rows' all-gather (float32)."""
    if ranks == 1:
        return 0.0
    share = (ranks - 1) / ranks
    hessians = sum(4 * a * a for a in shape.hessian_inputs)
    rows = 2 * 4 * shape.params  # the quantized weights and the compensated copy
    return 2 * share * hessians / link["all_reduce"] + share * rows / link["all_gather"]


def memory_gib(shape: BlockShape, ranks: int, windows: int, seq_len: int) -> dict[str, float]:
    tokens = windows * seq_len
    return {
        "block": 4 * shape.params / GIB,
        "hessians": sum(4 * a * a for a in shape.hessian_inputs) / GIB,
        "activations (both chains)": 2 * 4 * tokens * shape.hidden / ranks / GIB,
        "tuning teacher states": 4 * tokens * shape.hidden / ranks / GIB,
        "whole model, bfloat16 (host, every rank, unless lazy_load)": 2 * shape.params_total / GIB,
    }


def project(
    measured: dict[Any, float], link: dict[str, float], assumed: dict[str, float], windows: int, seq_len: int
) -> dict[str, Any]:
    """P and R of SmolLM2 from its two points, scaled to the 70B block; T(N) for every N of RANKS."""
    c2 = traffic_seconds(SMOLLM2, 2, link)
    split = 2 * (measured[1] - measured[2] + c2)
    repeated = max(measured[1] - split, 0.0)
    cubic = SMOLLM2.factorisation_flops / (measured["cpu_tflops"] * 1e12)
    work_ratio = LLAMA_70B.params / SMOLLM2.params * (windows * seq_len) / measured["tokens"]
    rest_ratio = LLAMA_70B.params / SMOLLM2.params
    speedup = assumed["gpu_tflops"] / measured["cpu_tflops"]
    settings = {
        "this machine (CPU ranks, Gloo, measured rates)": (1.0, link),
        f"GPUs in one node (assumed: {assumed['gpu_tflops']:g} TFLOP/s, {assumed['nvlink_gbs']:g} GB/s links)": (
            speedup,
            {"all_reduce": assumed["nvlink_gbs"] * 1e9, "all_gather": assumed["nvlink_gbs"] * 1e9},
        ),
        f"GPUs across machines (assumed: {assumed['gpu_tflops']:g} TFLOP/s, {assumed['network_gbs']:g} GB/s links)": (
            speedup,
            {"all_reduce": assumed["network_gbs"] * 1e9, "all_gather": assumed["network_gbs"] * 1e9},
        ),
    }
    rows: dict[str, list[dict[str, float]]] = {}
    for label, (faster, rates) in settings.items():
        p = split * work_ratio / faster
        r = (LLAMA_70B.factorisation_flops / (measured["cpu_tflops"] * 1e12) + (repeated - cubic) * rest_ratio) / faster
        rows[label] = [
            {
                "ranks": n,
                "block_s": r + p / n + traffic_seconds(LLAMA_70B, n, rates),
                "compute_s": r + p / n,
                "traffic_s": traffic_seconds(LLAMA_70B, n, rates),
                "model_h": LLAMA_70B.layers * (r + p / n + traffic_seconds(LLAMA_70B, n, rates)) / 3600,
            }
            for n in RANKS
        ]
    return {
        "smollm2_split_s": split,
        "smollm2_repeated_s": repeated,
        "smollm2_factorisation_s": cubic,
        "smollm2_traffic_2_ranks_s": c2,
        "work_ratio": work_ratio,
        "rest_ratio": rest_ratio,
        "break_even": {label: break_even(table) for label, table in rows.items()},
        "rows": rows,
        "memory_gib": {n: memory_gib(LLAMA_70B, n, windows, seq_len) for n in (1, 2, 4, 8)},
    }


def break_even(table: list[dict[str, float]]) -> int | None:
    """The first rank count at which doubling from half of it adds more traffic than it saves compute."""
    for smaller, larger in itertools.pairwise(table):
        if larger["traffic_s"] - smaller["traffic_s"] > smaller["compute_s"] - larger["compute_s"]:
            return int(larger["ranks"])
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks-result", type=Path, default=Path("bench/results/ranks.json"))
    parser.add_argument("--result", type=Path, default=Path("bench/results/ranks_projection.json"))
    parser.add_argument("--windows", type=int, default=128, help="the 70B job's calibration windows")
    parser.add_argument("--seq-len", type=int, default=2048, help="the 70B job's tokens per window")
    parser.add_argument("--gpu-tflops", type=float, default=200.0, help="assumed: a GPU's achieved float32/TF32 rate")
    parser.add_argument("--nvlink-gbs", type=float, default=300.0, help="assumed: GB/s per GPU's link in one node")
    parser.add_argument("--network-gbs", type=float, default=12.5, help="assumed: GB/s per machine's link (100 Gb/s)")
    parser.add_argument(
        "--measure", action="store_true", help="measure the link and matmul rates again (default: keep --result's)"
    )
    args = parser.parse_args(argv)
    rows = json.loads(args.ranks_result.read_text())
    measured: dict[Any, float] = {}
    for n, label in ((1, "1 rank x 1 thread"), (2, "2 ranks x 1 thread")):
        blocks = [r["block_s_mean"] for r in rows if r["row"] == label]
        if not blocks:
            raise SystemExit(f"{args.ranks_result} has no row {label!r}: run python -m bench.ranks first")
        measured[n] = sum(blocks) / len(blocks)
    measured["tokens"] = rows[0]["calibration_tokens"]
    kept = json.loads(args.result.read_text()) if args.result.exists() and not args.measure else None
    if kept is not None:  # rates measured once on free cores: a rerun under load would understate them
        link, measured["cpu_tflops"] = kept["link_bytes_per_s"], kept["measured_block_s"]["cpu_tflops"]
    else:
        link, measured["cpu_tflops"] = measured_link(), matmul_tflops()
    assumed = {"gpu_tflops": args.gpu_tflops, "nvlink_gbs": args.nvlink_gbs, "network_gbs": args.network_gbs}
    result = {"assumed": assumed, "measured_block_s": measured, "link_bytes_per_s": link}
    result |= {"windows": args.windows, "seq_len": args.seq_len}
    result |= project(measured, link, assumed, args.windows, args.seq_len)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    print(f"this machine: float32 matmul {measured['cpu_tflops']:.3f} TFLOP/s")
    print(f"link (2 local Gloo ranks): all-reduce {link['all_reduce'] / 1e9:.2f} GB/s, ", end="")
    print(f"all-gather {link['all_gather'] / 1e9:.2f} GB/s")
    print(
        f"SmolLM2 block: {result['smollm2_split_s']:.2f} s splits, {result['smollm2_repeated_s']:.2f} s repeated ",
        end="",
    )
    print(f"({result['smollm2_factorisation_s']:.2f} s of it the factorisations)")
    for label, table in result["rows"].items():
        print(f"\n70B block, {label}")
        print(f"| ranks | block (s) | compute (s) | traffic (s) | 80 blocks (h) |\n{'| --- ' * 5}|")
        for row in table:
            print(
                f"| {row['ranks']} | {row['block_s']:.1f} | {row['compute_s']:.1f} | {row['traffic_s']:.1f} | "
                f"{row['model_h']:.2f} |"
            )
        even = result["break_even"][label]
        print(
            f"traffic outweighs the saving from {even} ranks" if even else f"traffic never outweighs up to {RANKS[-1]}"
        )
    print(f"\n70B, {args.windows} x {args.seq_len} tokens, GiB per rank")
    for n, parts in result["memory_gib"].items():
        print(f"{n} ranks: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
