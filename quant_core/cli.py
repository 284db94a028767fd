"""``swquant`` command line: run a quantization job locally with a progress bar per block."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from quant_core.accuracy import LmEvalSpec
from quant_core.catalog import catalog, format_catalog
from quant_core.engine import BlockRecord
from quant_core.errors import CancelledError, ConfigError
from quant_core.job import DTYPES, EXPORT_FORMATS, CalibSpec, EvalSpec, JobSpec
from quant_core.lightcompress_config import read_lightcompress
from quant_core.losses import LOSSES
from quant_core.methods import METHODS
from quant_core.pipeline import REPORT_NAME, JobHooks, run_job
from quant_core.quantizer import QuantSpec

DEFAULTS: dict[str, Any] = {
    "method": "omniquant",
    "bits": 4,
    "group_size": 128,
    "symmetric": False,
    "loss": None,
    "calib": "austen",
    "n_samples": 128,
    "seq_len": 512,
    "eval": ["persuasion"],
    "eval_seq_len": None,
    "eval_max_windows": None,
    "lm_eval_task": [],
    "lm_eval_limit": None,
    "lm_eval_fewshot": None,
    "seed": 0,
    "device": "cpu",
    "dtype": "float32",
    "lazy_load": None,
    "export": ["auto"],
}


def key_value(text: str) -> tuple[str, Any]:
    """``name=value`` with the value read as YAML, so numbers, null and mappings come typed."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):  # YAML 1.1 reads "5e-2" as a string; users mean a number
        with contextlib.suppress(ValueError):
            parsed = float(parsed)
    return name.strip(), parsed


PER_CHANNEL = 0


def _group_size(text: str) -> int:
    """``0``, ``-1`` or ``none`` mean per-channel (one scale per output row), kept as 0 until the spec."""
    if text.lower() in ("0", "-1", "none", "per-channel"):
        return PER_CHANNEL
    return int(text)


def lm_eval_spec(settings: dict[str, Any]) -> LmEvalSpec | None:
    """The lm-eval part of a job from the flat settings; None when no task is named."""
    if not settings.get("lm_eval_task"):
        return None
    return LmEvalSpec(
        tasks=tuple(settings["lm_eval_task"]),
        limit=settings.get("lm_eval_limit"),
        num_fewshot=settings.get("lm_eval_fewshot"),
    )


def _default(text: str, key: str) -> str:
    """Help text with the default a job gets when neither the flag nor --config sets it."""
    value = DEFAULTS[key]
    shown = " ".join(value) if isinstance(value, list) else value
    return f"{text} (default: {shown})"


def add_job_arguments(q: argparse.ArgumentParser) -> None:
    """The flags that describe a job, shared by ``quantize`` (local) and ``submit`` (to a server).

    Defaults are None so that flags given on the command line override a --config file.
    """
    q.add_argument("--config", type=Path, help="LightCompress-style YAML; command-line flags override it")
    q.add_argument("--model", help="Hugging Face directory (safetensors) or hub id")
    q.add_argument("--method", choices=sorted(METHODS), help=_default("method", "method"))
    q.add_argument("--bits", type=int, help=_default("bits per weight", "bits"))
    q.add_argument(
        "--group-size", type=_group_size, help=_default("columns per scale; 0 or -1 for per-channel", "group_size")
    )
    q.add_argument("--symmetric", action="store_true", default=None, help="symmetric grid (default: asymmetric)")
    q.add_argument("--loss", choices=list(LOSSES), help="training loss (default: the method's own; swquant methods)")
    q.add_argument(
        "--loss-opt", type=key_value, action="append", default=[], metavar="NAME=VALUE", help="a loss option"
    )
    q.add_argument(
        "--method-opt",
        type=key_value,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a method option (see swquant methods)",
    )
    q.add_argument("--calib", help=_default("bundled corpus or text file", "calib"))
    q.add_argument("--n-samples", type=int, help=_default("calibration windows", "n_samples"))
    q.add_argument("--seq-len", type=int, help=_default("tokens per calibration window", "seq_len"))
    q.add_argument("--eval", action="append", help=_default("bundled corpus or text file; repeatable", "eval"))
    q.add_argument("--eval-seq-len", type=int, help="tokens per evaluation window (default: --seq-len)")
    q.add_argument("--eval-max-windows", type=int, help="evaluation windows per text (default: all)")
    q.add_argument(
        "--lm-eval-task",
        action="append",
        metavar="TASK",
        help="lm-eval task name or task YAML file, run on the float and the quantized model; repeatable",
    )
    q.add_argument("--lm-eval-limit", type=int, metavar="N", help="documents per lm-eval task (default: all)")
    q.add_argument("--lm-eval-fewshot", type=int, metavar="K", help="few-shot examples (default: the task's)")
    q.add_argument("--seed", type=int, help=_default("seed of every random draw", "seed"))
    q.add_argument(
        "--lazy-load", action="store_true", default=None, help="stream blocks from disk (models larger than memory)"
    )
    q.add_argument(
        "--dtype", choices=DTYPES, help=_default("model dtype for calibration (grids and losses stay fp32)", "dtype")
    )
    q.add_argument(
        "--export",
        nargs="+",
        choices=EXPORT_FORMATS,
        help=_default(
            "auto (pack_quantized where the format can hold the result, else fake_quant), or fake_quant "
            "(dequantized floats) and/or pack_quantized (int codes in compressed-tensors, for vLLM)",
            "export",
        ),
    )


def add_quantize_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = commands.add_parser(
        "quantize", help="quantize a model locally and write DIR/model (or DIR/packed) and DIR/report.json"
    )
    add_job_arguments(q)
    q.add_argument("--device", help="cpu, cuda or cuda:N")
    q.add_argument("--out", type=Path, help="output directory (default: the config's save_path)")
    q.add_argument(
        "--checkpoint", type=Path, help="keep progress here after every block; rerunning the same job resumes from it"
    )
    q.set_defaults(handler=quantize)


def add_methods_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = commands.add_parser("methods", help="list every method and loss with its options and defaults")
    m.add_argument("--json", action="store_true", help="as JSON (what GET /v1/methods returns)")
    m.set_defaults(handler=print_methods)


def print_methods(args: argparse.Namespace) -> int:
    print(json.dumps(catalog(), indent=2) if args.json else format_catalog(catalog()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swquant", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_quantize_command(commands)
    add_methods_command(commands)
    return parser


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then explicit flags."""
    settings = dict(DEFAULTS, loss_options={}, method_options={})
    if args.config is not None:
        settings.update(read_lightcompress(args.config))
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    settings["loss_options"] = {**settings["loss_options"], **dict(args.loss_opt)}
    settings["method_options"] = {**settings["method_options"], **dict(args.method_opt)}
    if args.model is not None:
        settings["model"] = args.model
    if getattr(args, "out", None) is not None:
        settings["save_path"] = str(args.out)
    if not settings.get("model"):
        raise ConfigError("--model is required", "model")
    settings["group_size"] = settings["group_size"] or None
    return settings


def spec_from_settings(settings: dict[str, Any]) -> JobSpec:
    return JobSpec(
        model=settings["model"],
        quant=QuantSpec(bits=settings["bits"], symmetric=settings["symmetric"], group_size=settings["group_size"]),
        method=settings["method"],
        method_options=settings["method_options"],
        loss=settings["loss"],
        loss_options=settings["loss_options"],
        calib=CalibSpec(text=settings["calib"], n_samples=settings["n_samples"], seq_len=settings["seq_len"]),
        eval=EvalSpec(
            texts=tuple(settings["eval"]),
            seq_len=settings["eval_seq_len"],
            max_windows=settings["eval_max_windows"],
            lm_eval=lm_eval_spec(settings),
        ),
        seed=settings["seed"],
        device=settings["device"],
        dtype=settings["dtype"],
        lazy_load=bool(settings["lazy_load"]),
        export_formats=tuple(settings["export"]),
    )


def quantize(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not settings.get("save_path"):
        raise ConfigError("--out is required", "save_path")
    spec = spec_from_settings(settings)
    out_dir = Path(settings["save_path"])
    bars: list[tqdm] = []

    def on_block(record: BlockRecord) -> None:
        if not bars:
            bars.append(tqdm(total=record.num_blocks, desc="blocks", unit="block", dynamic_ncols=True))
        bars[0].set_postfix(loss=f"{record.loss_before:.4g}->{record.loss_after:.4g}", s=f"{record.seconds:.1f}")
        bars[0].update(1)
        if record.index + 1 == record.num_blocks:
            bars[0].close()

    hooks = JobHooks(on_block=on_block, on_stage=lambda m: tqdm.write(f"• {m}"))
    report = run_job(spec, out_dir, hooks, args.checkpoint)
    for name, ppl in report["perplexity"].items():
        print(f"perplexity {name}: {ppl['before']:.3f} -> {ppl['after']:.3f}")
    print(f"calibration {report['seconds']['calibration']:.1f}s, peak host memory {report['peak_host_mb']:.0f} MiB")
    stats = report.get("method_stats") or {}
    if "loss_final" in stats:
        losses = f"{stats['loss_first']:.4g} -> {stats['loss_final']:.4g}"
        corners = 100 * stats["fraction_near_corners"]
        print(
            f"{spec.method}: {stats['steps']} steps, {spec.loss} {losses}, {corners:.1f}% of x at a corner "
            "before rounding"
        )
    for name, export in report["exports"].items():
        blockers = export.get("vllm_blockers")
        serving = f" (vLLM cannot serve it: {'; '.join(blockers)})" if blockers else ""
        print(f"wrote {name}: {out_dir / export['path']}{serving}")
    print(f"wrote {out_dir / REPORT_NAME}")
    return 0


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        where = f"{exc.field}: " if exc.field and not str(exc).startswith(exc.field) else ""
        print(f"swquant: error: {where}{exc}", file=sys.stderr)
        return 2
    except CancelledError as exc:
        print(f"swquant: {exc}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
