"""Bits where they matter, on a real model: measured sensitivity, the allocation under size budgets,
and what it buys against uniform widths at the same storage.

Measures every unit's cost (quant_core.sensitivity: linears sharing an input share a scheme) under
each candidate scheme on the calibration windows, with the block-output MSE, then:

- **the proxy's ranking**: each unit alone at one scheme in the whole model, scored by the KL of the
  model's next-token distribution against full precision, beside the unit's block-output cost
  (Spearman's rank correlation over units);
- **the size-quality curve**: uniform widths and the allocation at each budget (average storage bits
  per weight, scales and zero points included), the model rounded to nearest at those schemes, with
  perplexity on the evaluation texts under the job's protocol.

Round-to-nearest isolates what the allocation itself buys; a method that calibrates the blocks
improves every point. Budgets are bits per weight of the block linears (embeddings and head stay as
they are in every row).

    python -m bench.allocation [--model DIR] [--seed 0] [--result bench/results/allocation_seed0.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from bench.assets import austen_calibration_text, prepare_smollm2, text_path
from quant_core.allocation import allocate
from quant_core.corpus import calibration_windows, tokenize_file
from quant_core.eval_windows import evaluation_windows, window_start
from quant_core.losses import build_loss
from quant_core.methods.base import rtn_weights, write_weights
from quant_core.model_io import load_model
from quant_core.model_structure import find_decoder_blocks
from quant_core.perplexity import perplexity
from quant_core.quantizer import QuantSpec
from quant_core.sensitivity import UnitCosts, measure_unit_costs

# 32 and 64 divide the widths of the common families (SmolLM2's 576 among them), so the packed export
# can hold every candidate; 128 leaves a ragged last group there.
SCHEMES = tuple(QuantSpec(bits=bits, group_size=group) for bits in (2, 3, 4, 8) for group in (32, 64))
UNIFORM = (QuantSpec(bits=2, group_size=64), QuantSpec(bits=3, group_size=64), QuantSpec(bits=4, group_size=64))
BUDGETS = (2.5, 3.0, 3.5, 4.0)
PROXY_SCHEME = QuantSpec(bits=3, group_size=64)
KL_WINDOWS = 2


def rounded(model: torch.nn.Module, chosen: list[tuple[UnitCosts, QuantSpec]]) -> torch.nn.Module:
    """A copy of ``model`` with the units named rounded to nearest at their schemes, the rest as they are."""
    copied = copy.deepcopy(model)
    blocks = find_decoder_blocks(copied)
    for unit, scheme in chosen:
        block = blocks[unit.block]
        write_weights(block, rtn_weights(block, dict.fromkeys(unit.linears, scheme)))
    return copied


@torch.no_grad()
def _log_probs(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(input_ids=w[None]).logits.float(), -1) for w in windows])


@torch.no_grad()
def proxy_ranking(model: torch.nn.Module, units: list[UnitCosts], windows: torch.Tensor) -> dict[str, Any]:
    """Each unit alone at PROXY_SCHEME (the rest in full precision): its block-output cost and the whole
    model's KL to full precision on the next token."""
    reference = _log_probs(model, windows)
    kls = []
    for unit in units:
        altered = _log_probs(rounded(model, [(unit, PROXY_SCHEME)]), windows)
        kls.append(torch.sum(reference.exp() * (reference - altered), -1).mean().item())
    block_costs = [unit.choices[unit.schemes.index(PROXY_SCHEME)].cost for unit in units]
    rho = spearmanr(block_costs, kls).statistic
    return {"scheme": PROXY_SCHEME.label, "spearman": float(rho), "block_costs": block_costs, "kl": kls}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: SmolLM2-135M)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-samples", type=int, default=8, help="calibration windows the costs are measured on")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--texts", nargs="+", default=["persuasion", "brown"])
    parser.add_argument("--result", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model_dir = args.model or prepare_smollm2()
    model, tokenizer = load_model(str(model_dir))
    start = window_start(tokenizer).calibration_token
    source = tokenize_file(tokenizer, austen_calibration_text())
    windows = calibration_windows(source, args.n_samples, args.seq_len, args.seed, start)

    started = time.perf_counter()
    units = measure_unit_costs(model, windows, SCHEMES, build_loss("mse"), seed=args.seed)
    sensitivity_s = time.perf_counter() - started
    weights = sum(_unit_weights(model, unit) for unit in units)

    texts = {
        name: evaluation_windows(tokenizer, text_path(name), args.seq_len, args.eval_windows) for name in args.texts
    }

    def scored(label: str, choice: list[int]) -> dict[str, Any]:
        size = sum(unit.choices[k].size_bits for unit, k in zip(units, choice, strict=True))
        quantized = rounded(model, [(unit, unit.schemes[k]) for unit, k in zip(units, choice, strict=True)])
        ppl = {name: perplexity(quantized, t.ids, scored=t.scored) for name, t in texts.items()}
        row = {"label": label, "bits_per_weight": size / weights, "linears_mib": size / 8 / 2**20, "perplexity": ppl}
        print(
            f"{label:<22} {row['bits_per_weight']:6.3f} {row['linears_mib']:8.2f}  "
            + "  ".join(f"{name} {value:9.2f}" for name, value in ppl.items()),
            flush=True,
        )
        return row

    float_ppl = {name: perplexity(model, t.ids, scored=t.scored) for name, t in texts.items()}
    print(f"{'float':<22} {'':6} {'':8}  " + "  ".join(f"{n} {v:9.2f}" for n, v in float_ppl.items()))
    rows = [scored(f"uniform {s.label}", [unit.schemes.index(s) for unit in units]) for s in UNIFORM]
    allocations = {}
    for budget in BUDGETS:
        started = time.perf_counter()
        choice = allocate([unit.choices for unit in units], int(budget * weights))
        allocate_s = time.perf_counter() - started
        rows.append({**scored(f"budget {budget}", choice), "allocate_s": allocate_s})
        allocations[str(budget)] = [
            {"block": unit.block, "linears": list(unit.linears), "scheme": unit.schemes[k].label}
            for unit, k in zip(units, choice, strict=True)
        ]
    ranking = proxy_ranking(model, units, windows[:KL_WINDOWS])
    rho = ranking["spearman"]
    print(f"sensitivity pass {sensitivity_s:.0f} s; proxy ranking (Spearman, {PROXY_SCHEME.label}) {rho:.3f}")
    result = {
        "model": str(model_dir),
        "seed": args.seed,
        "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
        "eval_windows": args.eval_windows,
        "threads": torch.get_num_threads(),
        "sensitivity_seconds": sensitivity_s,
        "float_perplexity": float_ppl,
        "rows": rows,
        "allocations": allocations,
        "proxy_ranking": ranking,
    }
    target = args.result or Path(__file__).with_name("results") / f"allocation_seed{args.seed}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {target}")


def _unit_weights(model: torch.nn.Module, unit: UnitCosts) -> int:
    block = find_decoder_blocks(model)[unit.block]
    return sum(block.get_submodule(name).weight.numel() for name in unit.linears)


if __name__ == "__main__":
    main()
