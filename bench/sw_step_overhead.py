"""What the SW term costs inside one calibration step on a real decoder block.

Times OmniQuant steps (batch 1, full block forward + backward) on one SmolLM2-135M block with the
``mse`` and ``mse_sw`` losses, and the SW term's own forward + backward on the same block output.
Prints a table and writes ``bench/results/sw_step_overhead.json``.

    python -m bench.sw_step_overhead [--block 3] [--steps 16] [--seq-len 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from bench.assets import prepare_smollm2
from quant_core.corpus import BUNDLED_TEXTS, calibration_windows, tokenize_file
from quant_core.engine import capture_block_inputs, run_block, run_block_batched
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.methods.base import BlockData
from quant_core.model_io import load_model
from quant_core.model_structure import find_decoder_blocks
from quant_core.quantizer import QuantSpec

RESULTS = Path(__file__).with_name("results") / "sw_step_overhead.json"


def step_ms(block: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict, loss: str) -> float:
    """Mean milliseconds of one OmniQuant step (one epoch over ``inputs`` with batch 1)."""
    trained = copy.deepcopy(block)
    method = build_method("omniquant", QuantSpec(bits=3, group_size=64), build_loss(loss), {"epochs": 1})
    data = BlockData(
        0, 1, inputs, targets, lambda x, o: run_block(trained, x, kwargs, o), torch.Generator().manual_seed(0)
    )
    started = time.perf_counter()
    method.calibrate(trained, data)
    return (time.perf_counter() - started) * 1000 / inputs.shape[0]


def sw_term_ms(output: torch.Tensor, target: torch.Tensor, repeats: int = 50) -> float:
    sw = build_loss("sw")
    x = output.clone().requires_grad_(True)
    started = time.perf_counter()
    for _ in range(repeats):
        sw(x, target).backward()
    return (time.perf_counter() - started) * 1000 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(str(prepare_smollm2()))
    windows = calibration_windows(tokenize_file(tokenizer, BUNDLED_TEXTS["austen"]), args.steps, args.seq_len, 0)
    captured = capture_block_inputs(model, windows, "cpu")
    blocks = find_decoder_blocks(model)
    with torch.no_grad():
        inputs = captured.hidden
        for block in blocks[: args.block]:
            inputs = run_block(block, inputs, captured.kwargs)
    block = blocks[args.block].requires_grad_(False)
    targets = run_block_batched(block, inputs, captured.kwargs, 8)

    step_ms(block, inputs[:2], targets[:2], captured.kwargs, "mse")  # warm-up
    mse = step_ms(block, inputs, targets, captured.kwargs, "mse")
    mse_sw = step_ms(block, inputs, targets, captured.kwargs, "mse_sw")
    sw = sw_term_ms(targets[:1] * 1.01, targets[1:2])
    result = {
        "block": args.block,
        "tokens_per_step": args.seq_len,
        "hidden": int(inputs.shape[-1]),
        "sw_num_projections": 16,
        "step_ms_mse": mse,
        "step_ms_mse_sw": mse_sw,
        "sw_term_ms": sw,
        "sw_share_of_step": sw / mse,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }
    print(f"| loss | ms per step (batch 1 x {args.seq_len} tokens, block {args.block}) |")
    print("| --- | --- |")
    print(f"| mse | {mse:.1f} |")
    print(f"| mse_sw | {mse_sw:.1f} |")
    print(f"| SW term alone, forward + backward | {sw:.2f} ({100 * sw / mse:.1f}% of an mse step) |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
