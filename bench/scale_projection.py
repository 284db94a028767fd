"""A real model's main job read back from its report, beside llm-compressor's GPTQ, and projected to 7B and 70B.

Reads a job's ``report.json`` (``swquant quantize ... --out DIR``) and, when given, the peer's result
(``python -m bench.peer_job``, same flags), and prints: wall time by part, peak host memory by stage,
perplexity before and after (and the peer's), the time of a block pass (its median over blocks, so a
block slowed by other work on the machine does not set it) and that time per billion block weights.

A block pass of GPTQ is forwards and Hessians (work in proportion to the block's weights times the
calibration tokens) and the column walks with their factorisations (``d_out * d_in^2`` per linear,
which grows faster than the weights as the widths grow). Which share is which is not measured here,
so the projection to a Llama-2-7B and a Llama-3-70B block gives both ends: the measured time scaled
by the block's weights (every second is forward-like) and by ``sum(d_out * d_in^2)`` (every second is
walk-like), at the same calibration tokens and on the same machine.

    python -m bench.scale_projection --report DIR/report.json --model DIR [--peer PEER.json] \
        [--result bench/results/scale_projection.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.ranks_projection import LLAMA_70B, BlockShape

MIB_PER_GIB = 1024  # the report gives its peaks in MiB
LLAMA_7B = BlockShape(hidden=4096, intermediate=11008, kv_width=4096, layers=32, params_total=6.74e9)


def shape_of(model_dir: Path) -> BlockShape:
    """The block shape a Llama-style ``config.json`` declares (Qwen2, Mistral and Llama all name it so)."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return BlockShape(
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        kv_width=kv_heads * head_dim,
        layers=config["num_hidden_layers"],
        params_total=0.0,
    )


def walk_work(shape: BlockShape) -> float:
    """``sum(d_out * d_in^2)`` over the block's linears: the column walks' and factorisations' growth."""
    return float(sum(d_out * d_in**2 for d_in, d_out in shape.linears))


def project(seconds_per_block: float, measured: BlockShape, target: BlockShape) -> dict[str, float]:
    """Hours of block passes for ``target``'s whole model, scaled by weights and by walk work."""
    by_weights = seconds_per_block * target.params / measured.params
    by_walk = seconds_per_block * walk_work(target) / walk_work(measured)
    return {
        "block_weights_billions": target.params / 1e9,
        "blocks": target.layers,
        "hours_by_weights": by_weights * target.layers / 3600,
        "hours_by_walk": by_walk * target.layers / 3600,
    }


def summary(report: dict[str, Any], shape: BlockShape, peer: dict[str, Any] | None) -> dict[str, Any]:
    """The table's figures from a report (and the peer's result)."""
    block_seconds = [block["seconds"] for block in report["blocks"]]
    median = statistics.median(block_seconds)
    finetune = report["method_stats"].get("finetune", {})
    return {
        "model": report["spec"]["model"],
        "seed": report["seed"],
        "quant": report["quant_label"],
        "seconds": report["seconds"],
        "tuning_seconds_per_step": finetune.get("seconds_per_step"),
        "peak_gib_by_stage": {k: v / MIB_PER_GIB for k, v in report["peak_memory_by_stage"]["host_mb"].items()},
        "perplexity": report["perplexity"],
        "peer_perplexity": None if peer is None else peer["perplexity"],
        "block_seconds": block_seconds,
        "block_seconds_median": median,
        "block_weights_billions": shape.params / 1e9,
        "seconds_per_billion_block_weights": median / (shape.params / 1e9),
        "projection": {name: project(median, shape, target) for name, target in (("7B", LLAMA_7B), ("70B", LLAMA_70B))},
    }


def format_table(row: dict[str, Any]) -> str:
    lines = [f"{row['model']} ({row['quant']}, seed {row['seed']})", ""]
    lines += ["| part | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {value:.0f} |" for name, value in row["seconds"].items()]
    lines += ["", "| stage | peak host GiB |", "| --- | --- |"]
    lines += [f"| {name} | {value:.1f} |" for name, value in row["peak_gib_by_stage"].items()]
    lines += ["", "| text | float | job | llm-compressor GPTQ |", "| --- | --- | --- | --- |"]
    for text, scores in row["perplexity"].items():
        peer = (row["peer_perplexity"] or {}).get(text)
        lines.append(
            f"| {text} | {scores['before']:.3f} | {scores['after']:.3f} | {'' if peer is None else f'{peer:.3f}'} |"
        )
    lines += [
        "",
        f"block pass: median {row['block_seconds_median']:.1f} s over {len(row['block_seconds'])} blocks "
        f"(min {min(row['block_seconds']):.1f}, max {max(row['block_seconds']):.1f}); "
        f"{row['block_weights_billions']:.4f} B weights a block: "
        f"{row['seconds_per_billion_block_weights']:.0f} s per billion block weights",
        "",
        "| model | B weights a block | blocks | block passes, hours (by weights) | (by walk work) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, target in row["projection"].items():
        lines.append(
            f"| {name} | {target['block_weights_billions']:.3f} | {target['blocks']} | "
            f"{target['hours_by_weights']:.1f} | {target['hours_by_walk']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, required=True, help="the job's report.json")
    parser.add_argument("--model", type=Path, required=True, help="the model folder (its config.json)")
    parser.add_argument("--peer", type=Path, help="bench.peer_job's result for the same flags")
    parser.add_argument("--result", type=Path, default=Path("bench/results/scale_projection.json"))
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    peer = json.loads(args.peer.read_text()) if args.peer else None
    row = summary(report, shape_of(args.model), peer)
    print(format_table(row))
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
