"""The checks and timings that need a GPU, prepared so that a lent machine's minutes go to measuring.

On the device machine, whose python3 holds torch with CUDA (``bash bench/gpu_wheels.sh`` fetches here, once,
the wheels its image lacks, into ``.whl/``; carry ``.whl``):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
    python3 -m bench.gpu_check --out $OUT/gpu_check.json

1. **Agreement**: the same job (a seeded tiny Llama, GPTQ W4 g32 with ``kd_sw`` tuning, packed export) on the
   CPU and on the GPU; the report's perplexities agree within 2% (the GPU's matmuls and the tuning's
   bfloat16 differ from the CPU's in round-off only), and the packed checkpoint reloads on the GPU with
   the report's perplexity.
2. **Scale**: a randomly initialised Llama of ``--hidden``/``--layers`` (the defaults make about 1.2B
   parameters) in bfloat16, GPTQ W4 g128 on ``--windows`` x ``--seq-len`` tokens then one epoch of
   tuning: seconds per block, peak device memory, the packed checkpoint's size, and seconds per billion
   parameters per block pass, from which a 7B or 70B job's time is predicted. On a machine with several
   GPUs the same job runs again on all of them (``world_size``: one rank per GPU, NCCL), and where
   llm-compressor's environment is there (``SWQUANT_PEER_PYTHON``, bench/README.md "Peer rows"), its
   GPTQ runs on the same model and windows: one table of wall time, block time, peak memory and
   perplexity.

It prints a table and writes JSON; ``--scale-only`` / ``--agreement-only`` run one part.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.peer_job import peer_gptq
from bench.quality import peer_python
from bench.random_llama import save_random_llama
from quant_core.job import CalibrationSpec, EvaluationSpec, JobSpec
from quant_core.launch import run_ranked
from quant_core.pipeline import run_job
from quant_core.quantizer import QuantSpec
from quant_core.runtimes import AGREEMENT

TUNING = {"epochs": 1, "loss": "kd_sw"}


def _job(
    model: Path, device: str, quant: QuantSpec, windows: int, seq_len: int, dtype: str, world_size: int = 1
) -> JobSpec:
    return JobSpec(
        model=str(model),
        quant=quant,
        method="gptq",
        calibration=CalibrationSpec(text="austen", n_samples=windows, seq_len=seq_len),
        evaluation=EvaluationSpec(texts=("persuasion",), max_windows=4),
        device=device,
        dtype=dtype,
        export_formats=("pack_quantized",),
        targets=("transformers",),
        finetune=TUNING,
        world_size=world_size,
    )


def agreement(work: Path, devices: tuple[str, str] = ("cpu", "cuda")) -> dict[str, Any]:
    """The tiny job on both devices; what each reported and what the packed checkpoint scored."""
    model = save_random_llama(work / "tiny", hidden=128, layers=2, intermediate=256, heads=2, kv_heads=2)
    quant = QuantSpec(bits=4, symmetric=False, group_size=32)
    reports = [
        run_job(_job(model, device, quant, 8, 128, "float32"), work / f"{i}-{device}")
        for i, device in enumerate(devices)
    ]
    after = [report.perplexity["persuasion"].after for report in reports]
    return {
        "devices": devices,
        "perplexity_after": after,
        "relative_difference": after[1] / after[0] - 1,
        "agrees": abs(after[1] / after[0] - 1) <= AGREEMENT,
        "packed_from_second_device": reports[1].runtimes["transformers"].to_dict(),
    }


def scale(work: Path, hidden: int, layers: int, windows: int, seq_len: int) -> list[dict[str, Any]]:
    """The large random model's job on one GPU, on every GPU when there are several, and llm-compressor's
    GPTQ on it when its environment is there: time per block, peak memory, checkpoint size."""
    intermediate = int(hidden * 8 / 3 / 256 + 1) * 256
    model = save_random_llama(
        work / "large",
        hidden=hidden,
        layers=layers,
        intermediate=intermediate,
        heads=hidden // 128,
        kv_heads=max(1, hidden // 512),
        vocab=32_000,
        dtype="bfloat16",
    )
    parameters = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2  # bfloat16: 2 bytes each
    quant = QuantSpec(bits=4, symmetric=False, group_size=128)
    rows = []
    for world_size in sorted({1, torch.cuda.device_count()}):
        spec = _job(model, "cuda", quant, windows, seq_len, "bfloat16", world_size)
        rows.append(_ours(spec, parameters, hidden, layers, work / f"large-{world_size}"))
    if peer_python().exists():
        started = time.perf_counter()
        peer = peer_gptq(_job(model, "cuda", quant, windows, seq_len, "bfloat16"))
        rows.append(
            {
                "row": "llm-compressor gptq, 1 GPU",
                "wall_s": time.perf_counter() - started,
                "calibration_s": peer["peer"]["seconds"],
                "perplexity": peer["perplexity"],
                "details": peer["peer"],
            }
        )
    return rows


def _ours(spec: JobSpec, parameters: float, hidden: int, layers: int, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    report = run_ranked(spec, out)
    block_seconds = [record.seconds for record in report.blocks]
    per_block_params = (parameters - 2 * 32_000 * hidden) / layers
    return {
        "row": f"swquant gptq + kd_sw tuning, {spec.world_size} GPU{'s' if spec.world_size > 1 else ''}",
        "world_size": spec.world_size,
        "parameters": parameters,
        "hidden": hidden,
        "layers": layers,
        "windows": spec.calibration.n_samples,
        "seq_len": spec.calibration.seq_len,
        "wall_s": time.perf_counter() - started,
        "calibration_s": report.seconds.calibration,
        "median_block_s": sorted(block_seconds)[len(block_seconds) // 2],
        "s_per_billion_params_per_block_pass": sum(block_seconds) / (per_block_params * layers / 1e9),
        "peak_device_mib": report.peak_device_mb,
        "peak_host_mib_by_rank": [max(b.peak_host_mb_by_rank[r] for b in report.blocks) for r in range(spec.world_size)]
        if spec.world_size > 1
        else [report.peak_host_mb],
        "packed_bytes": report.exports["pack_quantized"].details.get("bytes"),
        "bf16_bytes": parameters * 2,
        "tuning": report.method_stats.get("finetune", {}),
        "perplexity": {name: pair.after for name, pair in report.perplexity.items()},
        "perplexity_float": {name: pair.before for name, pair in report.perplexity.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--agreement-only", action="store_true")
    parser.add_argument("--scale-only", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script is for a GPU machine")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if not args.scale_only:
            result["agreement"] = agreement(work)
            print(f"agreement: {json.dumps(result['agreement'])}", flush=True)
        if not args.agreement_only:
            result["scale"] = scale(work, args.hidden, args.layers, args.windows, args.seq_len)
            print(f"{args.hidden} hidden, {args.layers} layers, {args.windows} x {args.seq_len} tokens")
            print("| row | wall (s) | median block (s) | s per 1e9 params | peak device (MiB) | perplexity |")
            print("| --- | --- | --- | --- | --- | --- |")
            for row in result["scale"]:
                print(
                    f"| {row['row']} | {row['wall_s']:.0f} | {row.get('median_block_s', float('nan')):.1f} | "
                    f"{row.get('s_per_billion_params_per_block_pass', float('nan')):.1f} | "
                    f"{row.get('peak_device_mib') or float('nan'):.0f} | {json.dumps(row['perplexity'])} |",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
