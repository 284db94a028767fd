"""``swquant`` command line: run a quantization job locally with a progress bar per block."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic_core import PydanticUndefined
from tqdm import tqdm

from quant_core.block_record import BlockRecord
from quant_core.catalog import catalog, format_catalog
from quant_core.errors import CancelledError, ConfigError
from quant_core.job import JobSpec
from quant_core.job_settings import JobSettings, Setting, leaf_settings, set_path, validated
from quant_core.launch import run_torchrun
from quant_core.lightcompress_config import read_lightcompress
from quant_core.pipeline import REPORT_NAME, JobHooks


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


def job_flags() -> list[Setting]:
    """The settings that have a flag, in JobSettings' order."""
    return [setting for setting in leaf_settings() if setting.flag is not None]


def _help(setting: Setting) -> str:
    """The field's description with the default a job gets when neither the flag nor --config sets it."""
    default = setting.default
    if default in (None, {}, []) or default is PydanticUndefined:
        return setting.info.description or ""
    shown = " ".join(map(str, default)) if isinstance(default, list) else default
    return f"{setting.info.description} (default: {shown})"


def _add_flag(parser: argparse.ArgumentParser, setting: Setting) -> None:
    """One flag, its kind read off the field's type: a list takes several values, a Literal its choices."""
    flag = setting.flag
    assert flag is not None
    metavar = flag.metavar or flag.name.lstrip("-").upper().replace("-", "_")
    kwargs: dict[str, Any] = {"dest": setting.path, "help": _help(setting), "metavar": metavar}
    annotation = setting.info.annotation
    item = get_args(annotation)[0] if get_origin(annotation) is list else annotation
    if flag.kind == "key_value":
        kwargs.update(type=key_value, action="append", default=[], metavar="NAME=VALUE")
    elif flag.kind == "repeat":
        kwargs.update(action="append", help=f"{kwargs['help']}; repeatable")
    elif flag.kind == "group_size":
        kwargs.update(type=_group_size)
    elif annotation is bool:
        described = f"{setting.info.title.lower()}: {setting.info.description}" if setting.info.title else None
        kwargs = {"dest": setting.path, "help": described or setting.info.description}
        kwargs.update(action="store_true", default=None)
    elif get_origin(annotation) is list:
        kwargs.update(nargs="+")
    elif annotation in (int, int | None):
        kwargs.update(type=int)
    if get_origin(item) is Literal:
        kwargs.update(choices=list(get_args(item)), metavar=None)
    if setting.choices is not None:
        kwargs.update(choices=setting.choices.names(), metavar=None)
    parser.add_argument(flag.name, **kwargs)


def add_job_arguments(q: argparse.ArgumentParser) -> None:
    """The flags that describe a job, shared by ``quantize`` (local) and ``submit`` (to a server),
    built from JobSettings. Defaults are None so that flags given override a --config file."""
    q.add_argument("--config", type=Path, help="LightCompress-style YAML; command-line flags override it")
    for setting in job_flags():
        _add_flag(q, setting)


def given_job_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The job flags given on the command line, by setting path."""
    found = {setting.path: getattr(args, setting.path, None) for setting in job_flags()}
    return {path: value for path, value in found.items() if value not in (None, [])}


def settings_from_args(args: argparse.Namespace) -> tuple[JobSettings, str | None]:
    """JobSettings' defaults, then the config file, then explicit flags; and the config's save path."""
    body, save_path = read_lightcompress(args.config) if args.config is not None else ({}, None)
    kinds = {setting.path: setting.flag.kind for setting in job_flags() if setting.flag is not None}
    for path, value in given_job_flags(args).items():
        if kinds[path] == "key_value":  # options from flags join (and override) the config's
            value = {**(body.get(path) or {}), **dict(value)}
        elif kinds[path] == "group_size":
            value = value or None
        set_path(body, path, value)
    if not body.get("model"):
        raise ConfigError("--model is required", "model")
    return validated(JobSettings, body), save_path


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


def quantize(args: argparse.Namespace) -> int:
    settings, save_path = settings_from_args(args)
    out_dir = args.out if args.out is not None else save_path and Path(save_path)
    if not out_dir:
        raise ConfigError("--out is required", "save_path")
    spec = JobSpec.from_settings(settings, device=args.device or "cpu")
    bars: list[tqdm] = []

    def on_block(record: BlockRecord) -> None:
        if not bars:
            bars.append(tqdm(total=record.num_blocks, desc="blocks", unit="block", dynamic_ncols=True))
        bars[0].set_postfix(loss=f"{record.loss_before:.4g}->{record.loss_after:.4g}", s=f"{record.seconds:.1f}")
        bars[0].update(1)
        if record.index + 1 == record.num_blocks:
            bars[0].close()

    hooks = JobHooks(on_block=on_block, on_stage=lambda m: tqdm.write(f"• {m}"))
    report = run_torchrun(spec, out_dir, hooks, args.checkpoint)
    if report is None:  # a rank of a torchrun job other than 0: the leader reports
        return 0
    for name, ppl in report.perplexity.items():
        print(f"perplexity {name}: {ppl.before:.3f} -> {ppl.after:.3f}")
    print(f"calibration {report.seconds.calibration:.1f}s, peak host memory {report.peak_host_mb:.0f} MiB")
    stats = report.method_stats
    if "loss_final" in stats:
        losses = f"{stats['loss_first']:.4g} -> {stats['loss_final']:.4g}"
        corners = 100 * stats["fraction_near_corners"]
        print(
            f"{spec.method}: {stats['steps']} steps, {spec.loss} {losses}, {corners:.1f}% of x at a corner "
            "before rounding"
        )
    for name, export in report.exports.items():
        blockers = export.vllm_blockers
        serving = f" (vLLM cannot serve it: {'; '.join(blockers)})" if blockers else ""
        print(f"wrote {name}: {out_dir / export.path}{serving}")
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
