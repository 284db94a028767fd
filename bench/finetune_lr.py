"""End-to-end tuning's learning rates, chosen on held-out windows of the calibration text.

A default must not be tuned to the texts the results are reported on, so this script judges each
learning rate by perplexity on windows of the Austen calibration text drawn with another seed (not
the calibration windows, not Persuasion or Brown); the two evaluation texts are printed beside it
for the record only. The base (GPTQ+QuIP with clipping, bench.quality's settings) is calibrated
once; every learning rate then tunes a copy of it.

    python -m bench.finetune_lr [--lrs 1e-3 3e-3 1e-2] [--epochs 2] [--bits 3] [--out FILE]

``norm_lr`` is a tenth of ``lr`` in every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.assets import prepare_smollm2
from bench.quality import GROUP_SIZE, ROWS, SEED, Settings, _data
from quant_core.engine import calibrate_blocks
from quant_core.finetune import record_teacher, tune_end_to_end
from quant_core.finetune_options import FinetuneOptions
from quant_core.layer_schemes import LayerSchemes
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.model_io import load_model
from quant_core.perplexity import perplexity
from quant_core.quantizer import QuantSpec

BASE_ROW = "gptq+quip clip"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "finetune_lr.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(str(prepare_smollm2()))
    windows, texts = _data(tokenizer, Settings.of(False), model)

    def measure(m: torch.nn.Module) -> dict[str, float]:
        return {name: perplexity(m, w, 4, "cpu") for name, w in texts.items()}

    rows: list[dict[str, Any]] = [{"label": "fp32", "perplexity": measure(model)}]
    teacher = record_teacher(model, windows, "cpu")
    row = ROWS[BASE_ROW]
    spec = QuantSpec(bits=args.bits, group_size=GROUP_SIZE)
    method = build_method(row.method, spec, build_loss(row.loss), row.quick)
    calibrate_blocks(model, windows, method, build_loss(row.loss, seed=SEED), seed=SEED)
    rows.append({"label": BASE_ROW, "perplexity": measure(model)})
    for lr in args.lrs:
        tuned = copy.deepcopy(model)
        options = FinetuneOptions(epochs=args.epochs, lr=lr, norm_lr=lr / 10)
        started = time.perf_counter()
        stats = tune_end_to_end(tuned, windows, teacher, options, LayerSchemes(spec), seed=SEED)
        rows.append(
            {
                "label": f"+e2e lr {lr:g}",
                "options": options.model_dump(),
                "tune_s": time.perf_counter() - started,
                "stats": stats,
                "perplexity": measure(tuned),
            }
        )
        print(f"lr {lr:g}: {rows[-1]['perplexity']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bits": args.bits, "epochs": args.epochs, "rows": rows}, indent=2))
    print("| row | held-out Austen | persuasion | brown |\n| --- | --- | --- | --- |")
    for r in rows:
        ppl = r["perplexity"]
        print(f"| {r['label']} | {ppl['held_out']:.2f} | {ppl['persuasion']:.2f} | {ppl['brown']:.2f} |")


if __name__ == "__main__":
    main()
