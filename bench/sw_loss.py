"""Cost and accuracy of the Sliced-Wasserstein (SW) loss, alone and inside a calibration step.

Part ``loss``: ``quant_core.losses.sliced_wasserstein`` against POT's ``ot.sliced_wasserstein_distance``
(its torch backend, so both run on the same device in the same dtype) and a naive loop over the
directions, on the same clouds and the same directions. The shapes are those of real block outputs:
N tokens in {2048, 16384}, hidden size D in {576, 4096, 8192} (SmolLM2-135M, 7B- and 70B-class
models) and K projections in {16, 128, 256}. Each is timed forward only (ours also forward + backward)
and ours must agree with both references for p=1 (sliced W1) and p=2 (squared sliced W2; POT returns
its square root, which is squared back here).

Part ``step``: OmniQuant steps (batch 1, full block forward + backward) on a SmolLM2-135M block with the
``mse`` and ``mse_sw`` losses, interleaved so that drifting machine load hits both alike, and the SW term
alone on the same block output. Target: the SW term costs at most 10% of an ``mse_sw`` step on CPU and
5% on GPU.

Prints a markdown table per part and writes ``bench/results/sw_loss.json`` (and ``sw_loss.png`` when
matplotlib is installed).

    python -m bench.sw_loss [--quick] [--devices cpu cuda] [--parts loss step] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ot
import torch
from torch import Tensor, nn

from bench.assets import prepare_smollm2
from quant_core.corpus import BUNDLED_TEXTS, calibration_windows, tokenize_file
from quant_core.engine import capture_block_inputs, run_block, run_block_batched, to_device
from quant_core.losses import LossOptions, build_loss, random_directions, sliced_wasserstein
from quant_core.methods import build_method
from quant_core.methods.base import BlockData
from quant_core.model_io import load_model
from quant_core.model_structure import find_decoder_blocks
from quant_core.quantizer import QuantSpec

RESULTS = Path(__file__).with_name("results") / "sw_loss.json"
TOKENS = (2048, 16384)
HIDDEN = (576, 4096, 8192)
PROJECTIONS = (16, 128, 256)
QUICK_TOKENS, QUICK_HIDDEN, QUICK_PROJECTIONS = (2048,), (576, 4096), (16, 128)
MAX_SHARE = {"cpu": 0.10, "cuda": 0.05}
NOISE = 0.1  # the output cloud is the target plus a small error, as a quantized block's output is
SEED = 0

SWFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def naive_sliced_wasserstein(x: Tensor, y: Tensor, directions: Tensor, p: int) -> Tensor:
    """The definition one direction at a time: project both clouds, sort, mean ``|gap|^p``, average."""
    per_direction = []
    # Rows of the transpose: a strided column would make each product several times slower on CPU
    # and time the memory layout instead of the method.
    for theta in directions.T.contiguous():
        gap = (x @ theta).sort().values - (y @ theta).sort().values
        per_direction.append(gap.abs().pow(p).mean())
    return torch.stack(per_direction).mean()


def pot_sliced_wasserstein(x: Tensor, y: Tensor, directions: Tensor, p: int) -> Tensor:
    """POT's estimate raised to the power p, so that p=2 is the squared sliced W2 like ours."""
    return ot.sliced_wasserstein_distance(x, y, projections=directions, p=p) ** p


def ours_forward_backward(x: Tensor, y: Tensor, directions: Tensor, p: int) -> Tensor:
    """Ours with the gradient for ``x``, as in training (the target ``y`` needs none)."""
    leaf = x.detach().requires_grad_(True)
    loss = sliced_wasserstein(leaf, y, directions, p)
    torch.autograd.grad(loss, leaf)
    return loss.detach()


METHODS: dict[str, SWFn] = {
    "ours": sliced_wasserstein,
    "ours_fwd_bwd": ours_forward_backward,
    "pot": pot_sliced_wasserstein,
    "naive": naive_sliced_wasserstein,
}


@dataclass(frozen=True)
class Shape:
    """N tokens of hidden size D compared along K directions."""

    tokens: int
    hidden: int
    projections: int

    def peak_bytes(self) -> int:
        """A generous estimate of the memory one row needs, to skip rows that would not fit.

        Ours in forward + backward holds seven [N, D] float32 buffers at once: the two clouds, their
        stacked copy, the gradient of that copy and the gradient of x. POT's quantile functions keep
        a few dozen [N, K] buffers (values, int64 sort and search indices, cumulative weights).
        """
        return 7 * self.tokens * self.hidden * 4 + 32 * self.tokens * self.projections * 8


@dataclass
class LossRow:
    """One device and shape: median ms per method, calls timed, and ours' relative gap to each reference."""

    device: str
    tokens: int
    hidden: int
    projections: int
    peak_gib: float
    skipped: str | None = None
    ms: dict[str, float] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    rel_diff: dict[str, float] = field(default_factory=dict)


@dataclass
class StepRow:
    """One device: ms per step with each loss, the SW term alone, its share of a step and the verdict."""

    device: str
    block: int
    tokens_per_step: int
    hidden: int
    sw_num_projections: int
    step_ms_mse: float
    step_ms_mse_sw: float
    ratio: float
    sw_term_ms: float
    sw_share: float
    share_by_difference: float
    max_share: float
    passed: bool
    step_ms_samples: dict[str, list[float]]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_median(
    call: Callable[[], Any], device: torch.device, repeats: int, budget_s: float
) -> tuple[float, int, Any]:
    """Median ms of up to ``repeats`` calls, stopping early once ``budget_s`` is spent (one call at least).

    The budget keeps the naive loop on the largest shapes (tens of seconds a call on one CPU core)
    from dominating the run, while small shapes still get every repeat.
    """
    samples: list[float] = []
    result = None
    while len(samples) < repeats and (not samples or sum(samples) < budget_s * 1000):
        synchronize(device)
        started = time.perf_counter()
        result = call()
        synchronize(device)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), len(samples), result


def measure(
    fn: SWFn, x: Tensor, y: Tensor, directions: Tensor, repeats: int, budget_s: float
) -> tuple[float, int, dict[int, float]]:
    """Time ``fn`` at p=1 after one p=2 call, which warms up (allocator, lazy init) and gives the p=2 value.

    Taking the p=2 value from the warm-up spares one more call of the slow references on big shapes.
    """
    squared = float(fn(x, y, directions, 2))
    ms, runs, value = timed_median(lambda: fn(x, y, directions, 1), x.device, repeats, budget_s)
    return ms, runs, {1: float(value), 2: squared}


def relative_gap(ours: dict[int, float], reference: dict[int, float]) -> float:
    return max(abs(ours[p] - reference[p]) / abs(reference[p]) for p in ours)


def memory_budget(device: torch.device) -> int:
    """Bytes a row may use: half the host's available memory (it may be shared), 80% of a GPU's free memory."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2


def clouds(tokens: int, hidden: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A seeded target cloud and a quantized-like output cloud close to it."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    target = torch.randn(tokens, hidden, generator=generator, device=device)
    output = target + NOISE * torch.randn(tokens, hidden, generator=generator, device=device)
    return output, target


def loss_rows(
    device: torch.device, shapes: list[Shape], repeats: int, budget_s: float, budget_bytes: int | None
) -> list[LossRow]:
    """Time every shape on one device; the clouds are drawn once per (N, D) and shared by every K."""
    limit = budget_bytes if budget_bytes is not None else memory_budget(device)
    rows = []
    for (tokens, hidden), group in itertools.groupby(shapes, key=lambda s: (s.tokens, s.hidden)):
        group = list(group)
        fitting = [s for s in group if s.peak_bytes() <= limit]
        x, y = clouds(tokens, hidden, device) if fitting else (None, None)
        for shape in group:
            row = LossRow(str(device), tokens, hidden, shape.projections, shape.peak_bytes() / 2**30)
            if shape not in fitting:
                row.skipped = f"needs ~{row.peak_gib:.2f} GiB > budget {limit / 2**30:.2f} GiB"
            else:
                generator = torch.Generator(device=device).manual_seed(SEED + shape.projections)
                directions = random_directions(hidden, shape.projections, generator)
                values = {}
                for name, fn in METHODS.items():
                    row.ms[name], row.runs[name], values[name] = measure(fn, x, y, directions, repeats, budget_s)
                row.rel_diff = {ref: relative_gap(values["ours"], values[ref]) for ref in ("pot", "naive")}
            print(loss_table_line(row), flush=True)
            rows.append(row)
        del x, y
    return rows


LOSS_HEADER = (
    "| device | N | D | K | ours ms | ours fwd+bwd ms | POT ms | naive ms | POT / ours | naive / ours "
    "| rel. diff vs POT | rel. diff vs naive |\n" + "| --- " * 12 + "|"
)


def loss_table_line(row: LossRow) -> str:
    head = f"| {row.device} | {row.tokens} | {row.hidden} | {row.projections} |"
    if row.skipped:
        return head + f" skipped: {row.skipped} |" + " |" * 7
    ms = row.ms
    return head + (
        f" {ms['ours']:.2f} | {ms['ours_fwd_bwd']:.2f} | {ms['pot']:.2f} | {ms['naive']:.2f} "
        f"| {ms['pot'] / ms['ours']:.2f} | {ms['naive'] / ms['ours']:.1f} "
        f"| {row.rel_diff['pot']:.1e} | {row.rel_diff['naive']:.1e} |"
    )


def prepare_block(block_index: int, windows: int, seq_len: int) -> tuple[nn.Module, Tensor, Tensor, dict[str, Any]]:
    """Block ``block_index`` of SmolLM2-135M with its inputs and full-precision targets, all on the CPU."""
    model, tokenizer = load_model(str(prepare_smollm2()))
    ids = calibration_windows(tokenize_file(tokenizer, BUNDLED_TEXTS["austen"]), windows, seq_len, SEED)
    captured = capture_block_inputs(model, ids, "cpu")
    blocks = find_decoder_blocks(model)
    with torch.no_grad():
        inputs = captured.hidden
        for block in blocks[:block_index]:
            inputs = run_block(block, inputs, captured.kwargs)
    block = blocks[block_index].requires_grad_(False)
    return block, inputs, run_block_batched(block, inputs, captured.kwargs, 8), captured.kwargs


def omniquant_step_ms(block: nn.Module, inputs: Tensor, targets: Tensor, kwargs: dict[str, Any], loss: str) -> float:
    """Mean ms of one OmniQuant step over one epoch of ``inputs`` with batch 1 (W3 g64, as in the paper)."""
    trained = copy.deepcopy(block)
    method = build_method("omniquant", QuantSpec(bits=3, group_size=64), build_loss(loss), {"epochs": 1})
    data = BlockData(
        0, 1, inputs, targets, lambda x, o: run_block(trained, x, kwargs, o), torch.Generator().manual_seed(SEED)
    )
    synchronize(inputs.device)
    started = time.perf_counter()
    method.calibrate(trained, data)
    synchronize(inputs.device)
    return (time.perf_counter() - started) * 1000 / inputs.shape[0]


def sw_term_ms(output: Tensor, target: Tensor, repeats: int) -> float:
    """Median ms of the SW term forward + backward, fresh directions included, as ``mse_sw`` computes it."""
    sw = build_loss("sw")
    leaf = output.detach().clone().requires_grad_(True)

    def call() -> None:
        torch.autograd.grad(sw(leaf, target), leaf)

    call()
    return timed_median(call, output.device, repeats, budget_s=float("inf"))[0]


def step_row(
    device: torch.device,
    block: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    kwargs: dict[str, Any],
    rounds: int,
    index: int,
) -> StepRow:
    """Interleaved ``mse`` / ``mse_sw`` epochs (medians over rounds) and the SW term alone on one device.

    The order flips every round so that neither loss always runs second. The verdict uses the SW term
    timed alone: on a shared machine the difference of two step times moves by more than the term itself.
    """
    block = copy.deepcopy(block).to(device)
    inputs, targets, kwargs = inputs.to(device), targets.to(device), to_device(kwargs, device)
    omniquant_step_ms(block, inputs[:2], targets[:2], kwargs, "mse_sw")  # warm-up
    times: dict[str, list[float]] = {"mse": [], "mse_sw": []}
    for r in range(rounds):
        for loss in ("mse", "mse_sw") if r % 2 == 0 else ("mse_sw", "mse"):
            times[loss].append(omniquant_step_ms(block, inputs, targets, kwargs, loss))
    mse, mse_sw = statistics.median(times["mse"]), statistics.median(times["mse_sw"])
    sw = sw_term_ms(targets[1:2], targets[:1], repeats=50)
    share = sw / mse_sw
    return StepRow(
        device=str(device),
        block=index,
        tokens_per_step=int(inputs.shape[1]),
        hidden=int(inputs.shape[-1]),
        sw_num_projections=LossOptions().sw_num_projections,
        step_ms_samples=times,
        step_ms_mse=mse,
        step_ms_mse_sw=mse_sw,
        ratio=mse_sw / mse,
        sw_term_ms=sw,
        sw_share=share,
        share_by_difference=1 - mse / mse_sw,
        max_share=MAX_SHARE[device.type],
        passed=share <= MAX_SHARE[device.type],
    )


def print_step_table(rows: list[StepRow]) -> None:
    print(
        "\nTarget: the SW term (K=16, forward + backward) costs at most "
        f"{MAX_SHARE['cpu']:.0%} of an mse_sw step on CPU, {MAX_SHARE['cuda']:.0%} on GPU. The verdict uses the"
        " term timed alone; the share from the step difference is a cross-check, noisy on a shared machine."
    )
    print(
        "| device | mse ms/step | mse_sw ms/step | mse_sw / mse | SW term ms | SW share of step "
        "| share from step difference | target | verdict |"
    )
    print("| --- " * 9 + "|")
    for r in rows:
        verdict = "PASS" if r.passed else "FAIL"
        print(
            f"| {r.device} | {r.step_ms_mse:.1f} | {r.step_ms_mse_sw:.1f} | {r.ratio:.3f} | {r.sw_term_ms:.2f} "
            f"| {r.sw_share:.1%} | {r.share_by_difference:.1%} | <= {r.max_share:.0%} | {verdict} |"
        )


def machine_info(devices: list[torch.device]) -> dict[str, Any]:
    """What the timings depend on; the load average tells whether other work shared the machine."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
    ]
    return {
        "cpu": models[0] if models else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": os.getloadavg(),
        "devices": {str(d): torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu" for d in devices},
        "torch": torch.__version__,
        "pot": ot.__version__,
        "python": platform.python_version(),
    }


def plot(rows: list[LossRow], path: Path) -> bool:
    """Median ms per shape for ours, POT and naive, one panel per device; False without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = list(dict.fromkeys(r.device for r in rows))
    width = max(8.0, 0.9 * max(sum(r.device == d for r in rows) for d in devices))
    fig, axes = plt.subplots(len(devices), 1, figsize=(width, 4.5 * len(devices)), squeeze=False)
    for ax, device in zip(axes[:, 0], devices, strict=True):
        measured = [r for r in rows if r.device == device and not r.skipped]
        labels = [f"{r.tokens}x{r.hidden}\nK={r.projections}" for r in measured]
        for name in ("ours", "ours_fwd_bwd", "pot", "naive"):
            ax.plot(labels, [r.ms[name] for r in measured], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"Sliced Wasserstein, N x D with K projections, on {device}")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, fewer repeats and steps: a smoke run")
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), help="default: cpu, and cuda if available")
    parser.add_argument("--parts", nargs="+", choices=("loss", "step"), default=["loss", "step"])
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="JSON path (it holds the parts run); the PNG goes next to it"
    )
    parser.add_argument("--repeats", type=int, help="timed calls per method and shape (default 5, quick 3)")
    parser.add_argument("--budget-s", type=float, default=8.0, help="stop repeating a timing after this many s")
    parser.add_argument("--memory-gib", type=float, help="memory a row may use (default: from what is free)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, e.g. OMP_NUM_THREADS)")
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--steps", type=int, help="windows per epoch in the step part (default 16, quick 4)")
    parser.add_argument("--rounds", type=int, help="interleaved mse / mse_sw epochs (default 4, quick 2)")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    if args.devices is None:
        args.devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda: torch.cuda.is_available() is False (CPU-only torch build or no GPU)")
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.steps = args.steps or (4 if args.quick else 16)
    args.rounds = args.rounds or (2 if args.quick else 4)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices]
    grid = (QUICK_TOKENS, QUICK_HIDDEN, QUICK_PROJECTIONS) if args.quick else (TOKENS, HIDDEN, PROJECTIONS)
    shapes = [Shape(*s) for s in itertools.product(*grid)]
    budget_bytes = int(args.memory_gib * 2**30) if args.memory_gib else None
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(devices), "quick": args.quick, "loss": [], "step": []}

    loss_results: list[LossRow] = []
    if "loss" in args.parts:
        print(LOSS_HEADER, flush=True)
        for device in devices:
            loss_results += loss_rows(device, shapes, args.repeats, args.budget_s, budget_bytes)
        result["loss"] = [asdict(r) for r in loss_results]
    if "step" in args.parts:
        block, inputs, targets, kwargs = prepare_block(args.block, args.steps, args.seq_len)
        step_results = [step_row(d, block, inputs, targets, kwargs, args.rounds, args.block) for d in devices]
        print_step_table(step_results)
        result["step"] = [asdict(r) for r in step_results]

    result["seconds"] = time.perf_counter() - started
    result["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} in {result['seconds']:.0f} s")
    if loss_results and plot(loss_results, args.out.with_suffix(".png")):
        print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
