"""llm-compressor's GPTQ on exactly a job's calibration windows, scored on the job's evaluation windows.

Takes the job's own flags (``swquant quantize``'s), draws the windows the job draws (same text,
seed and count; quant_core.pipeline.load), runs bench/peer_llmcompressor.py in llm-compressor's
environment (bench/README.md, "Peer rows") at the job's bits and group size, and prints and writes
the peer's perplexity on each of the job's evaluation texts:

    python -m bench.peer_job --model DIR --bits 4 --group-size 64 --n-samples 16 --eval-max-windows 40 \
        --seed 0 --result bench/results/peer_main_job_w4_seed0.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from bench.quality import PEER_SCRIPT, peer_python
from quant_core.cli import add_job_arguments, settings_from_args
from quant_core.job import JobSpec
from quant_core.perplexity import perplexity
from quant_core.pipeline import JobHooks, load


def peer_gptq(spec: JobSpec) -> dict[str, Any]:
    """llm-compressor's GPTQ on ``spec``'s calibration windows at its bits and group size: its own
    report (versions, wall time, peak memory) and its perplexity on each of the job's texts."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        job = load(spec, spec.build_method(), work, JobHooks(), None)
        torch.save(job.windows[: spec.calibration.n_samples], work / "windows.pt")
        group = spec.quant.group_size if spec.quant.group_size is not None else -1
        command = [str(peer_python()), str(PEER_SCRIPT), "--model", spec.model, "--windows", str(work / "windows.pt")]
        command += ["--bits", str(spec.quant.bits), "--group-size", str(group), "--scheme", "gptq"]
        subprocess.run([*command, "--out", str(work / "peer")], check=True, stdout=subprocess.DEVNULL)
        peer = AutoModelForCausalLM.from_pretrained(work / "peer", dtype=torch.float32).eval()
        scores = {
            name: perplexity(peer, text.ids, spec.evaluation.batch_size, spec.device, scored=text.scored)
            for name, text in job.eval_sets.items()
        }
        details = json.loads((work / "peer" / "peer.json").read_text())
    return {"spec": spec.to_dict(), "peer": details, "perplexity": scores}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    parser.add_argument("--result", type=Path, required=True, help="the JSON to write")
    args = parser.parse_args(argv)
    settings, _ = settings_from_args(args)
    spec = JobSpec.from_settings(settings)
    result = peer_gptq(spec)
    scores = result["perplexity"]
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    for name, value in scores.items():
        print(f"llm-compressor gptq {spec.quant.label} seed {spec.seed}: {value:.2f} on {name}")


if __name__ == "__main__":
    main()
