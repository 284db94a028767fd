"""Method x loss x bits on SmolLM2-135M: perplexity on two texts, calibration wall time, peak memory.

Every row quantizes the same model on the same seeded Austen calibration windows and is evaluated on
the same windows of persuasion.txt and brown.txt. Each row runs in its own process, so its peak
memory is its own; finished rows are kept in the JSON and skipped when the script is run again, so
an interrupted run resumes. ``--jobs 2`` runs two rows at a time (one thread each).

The default settings fit two CPU cores in under an hour (16 x 512 calibration windows, 10 x 512
evaluation windows per text, about one epoch of training, AWQ's search on 4 windows);
``--full`` uses 128 x 512 calibration windows and each method's published schedule (GPU scale).

    python -m bench.quality [--bits 3 2] [--rows rtn gptq ...] [--jobs 2] [--full] [--fresh] [--seed 0]

``--seed`` draws other calibration windows (and the methods' random choices): a row's spread over
seeds is what a difference between rows must exceed. ``--generated N`` adds N windows the float model
writes itself (:func:`sampled_windows`) to the calibration windows. Rows ending in ``+e2e`` add end-to-end tuning
after the blocks (quant_core.finetune): the full-precision model's last hidden states are recorded
before calibration, and step sizes and norms are then trained on the next-token distributions.

The DiscQuant rows (``greedy``, ``discquant``, ``discquant+quip``, ``discquant kd_sw``) train the
whole model against itself and are not in the default set; at CPU scale they see 64 windows (four
passes over the 16), one window per AdamW step, starting from the float weights (``init: orig``),
with lr 0.02 so that the summed step sizes (about 0.65) just cover the distance to a corner.
``discquant lr0.1 32 steps`` keeps the authors' lr on half the steps:

    python -m bench.quality --bits 3 4 --out bench/results/discquant.json \
        --rows rtn gptq greedy discquant "discquant+quip" "discquant kd_sw"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib import pyplot as plt

from bench.assets import austen_calibration_text, prepare_smollm2, text_path
from quant_core.corpus import calibration_windows, tokenize_file
from quant_core.engine import calibrate_blocks
from quant_core.eval_windows import evaluation_windows, window_start
from quant_core.finetune import calibrate_then_tune
from quant_core.finetune_options import FinetuneOptions
from quant_core.layer_schemes import LayerSchemes
from quant_core.losses import build_loss
from quant_core.memory import host_peak_mb
from quant_core.methods import build_method
from quant_core.model_io import load_model
from quant_core.perplexity import perplexity
from quant_core.quantizer import QuantSpec

RESULTS = Path(__file__).with_name("results") / "quality.json"
EVAL_TEXTS = ("persuasion", "brown")
AUSTEN = "austen"  # the four Austen novels other than Persuasion (bench.assets.austen_calibration_text)
# Windows of the calibration text drawn with another seed: what a default may be chosen on (the
# evaluation texts never are). A held-out window can overlap a calibration window (a few percent).
HELD_OUT_SEED = 12345
HELD_OUT_WINDOWS = 10
GROUP_SIZE = 64
SEED = 0


@dataclass(frozen=True)
class Row:
    """One table row: a method, its loss, and its options at CPU scale and at full scale."""

    label: str
    method: str
    loss: str
    quick: dict[str, Any] = field(default_factory=dict)
    full: dict[str, Any] = field(default_factory=dict)
    peer: str | None = None  # llm-compressor's scheme, run by bench/peer_llmcompressor.py
    loss_options: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)  # end-to-end tuning after the blocks (quant_core.finetune)


_AWQ_QUICK = {"search_samples": 4}  # the grid search runs 20 forwards per mapping: 2k tokens on CPU
_OMNI_FULL = {"schedule": "paper"}  # the budget schedule (64 steps a block, from the searched clipping) is the default
_TESSERA_GPTQ = {"init": "gptq", "rounds": 4, "steps_per_round": 8, "batch_size": 2, "lr": 1e-2, "scale_lr": 1e-3}
_TESSERA_QUICK = {"rounds": 4, "steps_per_round": 2, "batch_size": 2, "lr": 1e-2, "scale_lr": 1e-3, "init": "rtn"}
_NORM_QUICK = {"epochs": 1, "lr": 1e-4}
_NORM_CLIP = {**_NORM_QUICK, "base_options": {"clip_search": True}}
_NORM_QUIP_CLIP = {**_NORM_QUICK, "base_options": {"clip_search": True, "incoherence": "hadamard"}}
# DiscQuant at CPU scale: 64 windows, one per step, from the float weights; the authors' clamp and rho.
_DISCQ_QUICK = {"init": "orig", "n_samples": 64, "batch_size": 1, "grad_accum": 1, "lr": 0.02}
# Their published schedule: 1024 steps of 8 windows from random x (needs 8192 windows and a GPU).
_DISCQ_FULL = {"init": "rand", "n_samples": 8192, "grad_accum": 8, "grad_checkpoint": True}
_KD_SW_WEIGHTS = {"hybrid_weights": {"base": 1.0, "sw": 0.5}}  # SW term about a quarter of KD at W3 RTN
_GPTQ_CLIP = {"clip_search": True}
_GPTQ_QUIP_CLIP = {"incoherence": "hadamard", "clip_search": True}
_MATCH_FLOAT = {**_GPTQ_QUIP_CLIP, "match_float": True}
_E2E = {"epochs": 2}  # end-to-end tuning after the blocks, at the stage's default learning rates
ROWS = {
    row.label: row
    for row in (
        Row("rtn", "rtn", "mse"),
        Row("gptq", "gptq", "mse"),
        Row("gptq natural-order", "gptq", "mse", {"act_order": False, "static_groups": False}),
        Row("rtn+quip", "rtn", "mse", {"incoherence": "hadamard"}, {"incoherence": "hadamard"}),
        Row("gptq+quip", "gptq", "mse", {"incoherence": "hadamard"}, {"incoherence": "hadamard"}),
        Row("awq", "awq", "mse", _AWQ_QUICK),
        Row("awq+sw", "awq", "mse_sw", _AWQ_QUICK),
        Row("rtn clip", "rtn", "mse", {"clip_search": True}, {"clip_search": True}),
        Row("gptq clip", "gptq", "mse", _GPTQ_CLIP, _GPTQ_CLIP),
        Row("gptq+quip clip", "gptq", "mse", _GPTQ_QUIP_CLIP),
        Row("gptq clip match-float", "gptq", "mse", {**_GPTQ_CLIP, "match_float": True}),
        Row("gptq+quip clip match-float", "gptq", "mse", _MATCH_FLOAT),
        Row("gptq+quip clip match-float+e2e", "gptq", "mse", _MATCH_FLOAT, finetune=_E2E),
        *(
            Row(f"gptq+quip clip match-float damp {d:g}", "gptq", "mse", {**_MATCH_FLOAT, "match_float_damp": d})
            for d in (0.01, 0.1, 10.0)
        ),
        Row("gptq clip+e2e", "gptq", "mse", _GPTQ_CLIP, finetune=_E2E),
        Row("gptq+quip clip+e2e", "gptq", "mse", _GPTQ_QUIP_CLIP, finetune=_E2E),
        Row("gptq+quip clip+e2e kd_sw", "gptq", "mse", _GPTQ_QUIP_CLIP, finetune={**_E2E, "loss": "kd_sw"}),
        *(
            Row(
                f"gptq+quip clip+e2e kd_sw {p}",
                "gptq",
                "mse",
                _GPTQ_QUIP_CLIP,
                finetune={**_E2E, "loss": "kd_sw", "precision": p},
            )
            for p in ("bfloat16", "float32")
        ),
        Row("gptq+quip clip+e2e 1 epoch", "gptq", "mse", _GPTQ_QUIP_CLIP, finetune={"epochs": 1}),
        Row("gptq+quip clip+e2e 4 epochs", "gptq", "mse", _GPTQ_QUIP_CLIP, finetune={"epochs": 4}),
        *(
            Row(
                f"gptq+quip clip+e2e 1 epoch on {n} windows",
                "gptq",
                "mse",
                _GPTQ_QUIP_CLIP,
                finetune={"epochs": 1, "n_samples": n},
            )
            for n in (32, 64)
        ),
        Row("omniquant mse", "omniquant", "mse", {}, _OMNI_FULL),
        Row("omniquant mse_sw", "omniquant", "mse_sw", {}, _OMNI_FULL),
        Row("gptq clip one-pass", "gptq", "mse", {"clip_search": True, "true_sequential": False}),
        Row("gptq replay", "gptq", "mse", {"staged_pass": False}),
        Row("gptq clip+normtweak mse", "normtweaking", "mse", _NORM_CLIP),
        Row("gptq clip+normtweak dist", "normtweaking", "dist", _NORM_CLIP),
        Row("gptq clip+normtweak mse_sw", "normtweaking", "mse_sw", _NORM_CLIP),
        Row("gptq+quip clip+normtweak mse_sw", "normtweaking", "mse_sw", _NORM_QUIP_CLIP),
        Row("gptq+quip clip+normtweak mse_sw+e2e", "normtweaking", "mse_sw", _NORM_QUIP_CLIP, finetune=_E2E),
        Row("omniquant mse_sw 16 steps", "omniquant", "mse_sw", {"steps": 16}),
        Row("omniquant mse_sw 256 steps", "omniquant", "mse_sw", {"steps": 256}),
        Row("omniquant mse_sw paper lr 256 steps", "omniquant", "mse_sw", {"steps": 256, "schedule": "paper"}),
        Row("tesseraq gptq l2_sw 2x4", "tesseraq", "l2_sw", {**_TESSERA_GPTQ, "rounds": 2, "steps_per_round": 4}),
        Row("tesseraq gptq l2_sw 8x16", "tesseraq", "l2_sw", {**_TESSERA_GPTQ, "rounds": 8, "steps_per_round": 16}),
        Row("gptq clip+normtweak mse_sw 4 epochs", "normtweaking", "mse_sw", {**_NORM_CLIP, "epochs": 4}),
        Row("tesseraq gptq l2", "tesseraq", "l2", _TESSERA_GPTQ, {"init": "gptq"}),
        Row("tesseraq gptq l2_sw", "tesseraq", "l2_sw", _TESSERA_GPTQ, {"init": "gptq"}),
        Row("tesseraq l2", "tesseraq", "l2", _TESSERA_QUICK),
        Row("tesseraq l2_sw", "tesseraq", "l2_sw", _TESSERA_QUICK),
        Row("gptq+normtweak mse", "normtweaking", "mse", _NORM_QUICK),
        Row("gptq+normtweak mse_sw", "normtweaking", "mse_sw", _NORM_QUICK),
        Row("llm-compressor rtn", "rtn", "mse", peer="rtn"),
        Row("llm-compressor gptq", "gptq", "mse", peer="gptq"),
        Row("greedy", "discquant", "kd", {"early_save": "greedy"}, {"early_save": "greedy"}),
        Row("discquant", "discquant", "kd", _DISCQ_QUICK, _DISCQ_FULL),
        Row("discquant lr0.1 32 steps", "discquant", "kd", {**_DISCQ_QUICK, "n_samples": 32, "lr": 0.1}),
        Row(
            "discquant+quip",
            "discquant",
            "kd",
            {**_DISCQ_QUICK, "incoherence": "hadamard"},
            {**_DISCQ_FULL, "incoherence": "hadamard"},
        ),
        Row("discquant kd_sw", "discquant", "kd_sw", _DISCQ_QUICK, _DISCQ_FULL, loss_options=_KD_SW_WEIGHTS),
        Row(
            "discquant kd_sw 0.1",
            "discquant",
            "kd_sw",
            _DISCQ_QUICK,
            _DISCQ_FULL,
            loss_options={"hybrid_weights": {"base": 1.0, "sw": 0.1}},
        ),
    )
}
WHOLE_MODEL_ROWS = (
    "greedy",
    "discquant",
    "discquant lr0.1 32 steps",
    "discquant+quip",
    "discquant kd_sw",
    "discquant kd_sw 0.1",
)
# Other budgets of the trained methods, for the quality-against-minutes table.
BUDGET_ROWS = (
    "omniquant mse_sw 16 steps",
    "omniquant mse_sw 256 steps",
    "omniquant mse_sw paper lr 256 steps",
    "tesseraq gptq l2_sw 2x4",
    "tesseraq gptq l2_sw 8x16",
    "gptq clip+normtweak mse_sw 4 epochs",
)
# End-to-end tuning on top of the best blockwise rows (quant_core.finetune).
E2E_ROWS = (
    "gptq clip+e2e",
    "gptq+quip clip+e2e",
    "gptq+quip clip+e2e kd_sw",
    "gptq+quip clip+e2e 1 epoch",
    "gptq+quip clip+e2e 4 epochs",
    "gptq+quip clip+e2e 1 epoch on 32 windows",
    "gptq+quip clip+e2e 1 epoch on 64 windows",
    "gptq+quip clip+normtweak mse_sw+e2e",
)
OPT_IN_ROWS = (
    "gptq natural-order",
    "rtn+quip",
    "gptq+quip",
    "gptq+quip clip",
    "gptq clip one-pass",
    "gptq replay",
    "gptq+quip clip+normtweak mse_sw",
    *BUDGET_ROWS,
    *WHOLE_MODEL_ROWS,
    *E2E_ROWS,
)
DEFAULT_ROWS = [label for label in ROWS if label not in OPT_IN_ROWS]
PEER_SCRIPT = Path(__file__).with_name("peer_llmcompressor.py")


def peer_python() -> Path:
    """The interpreter of the separate environment llm-compressor lives in (see bench/README.md)."""
    env = os.environ.get("SWQUANT_PEER_PYTHON")
    return Path(env) if env else Path.home() / ".cache" / "swquant" / "peer-venv" / "bin" / "python"


def run_peer(row: Row, bits: int, model_dir: Path, windows: torch.Tensor, work: Path) -> dict[str, Any]:
    """Quantize with llm-compressor on the same windows; return its report (the model is in ``work/model``)."""
    python = peer_python()
    if not python.is_file():
        raise FileNotFoundError(f"llm-compressor environment not found at {python}; see bench/README.md")
    torch.save(windows, work / "windows.pt")
    cmd = [str(python), str(PEER_SCRIPT), "--model", str(model_dir), "--windows", str(work / "windows.pt")]
    cmd += [
        "--bits",
        str(bits),
        "--group-size",
        str(GROUP_SIZE),
        "--scheme",
        str(row.peer),
        "--out",
        str(work / "model"),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((work / "model" / "peer.json").read_text())


@dataclass(frozen=True)
class Settings:
    n_samples: int
    seq_len: int
    eval_windows: int
    seed: int = SEED  # draws the calibration windows and every random choice of the method
    generated: int = 0  # windows the float model samples itself, added to the calibration windows
    calibration: str = AUSTEN  # the text the calibration windows come from
    calib_seq_len: int = 0  # tokens per calibration window; 0: seq_len, the evaluation windows' length

    @classmethod
    def of(
        cls,
        full: bool,
        n_samples: int | None = None,
        seed: int = SEED,
        generated: int = 0,
        calibration: str = AUSTEN,
        calib_seq_len: int = 0,
    ) -> Settings:
        chosen = cls(128, 512, 0) if full else cls(16, 512, 10)
        n = n_samples or chosen.n_samples
        return cls(n, chosen.seq_len, chosen.eval_windows, seed, generated, calibration, calib_seq_len)

    @property
    def window_tokens(self) -> int:
        """Tokens per calibration window."""
        return self.calib_seq_len or self.seq_len

    def flags(self) -> list[str]:
        """The command-line flags that give these settings to a row's process."""
        return [
            *("--n-samples", str(self.n_samples), "--seed", str(self.seed), "--generated", str(self.generated)),
            *("--calibration", self.calibration, "--calib-seq-len", str(self.calib_seq_len)),
        ]


@torch.no_grad()
def sampled_windows(model: torch.nn.Module, ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[n, seq_len]`` windows written by the float model itself: each starts at one token drawn from
    the calibration text ``ids`` and continues by sampling at temperature 1 (no top-k or top-p cut).

    Text the model writes covers what it predicts, not one author's style, so these windows test
    whether calibrating on more than Austen carries to another text (Brown) without using that text.
    """
    generator = torch.Generator().manual_seed(seed)
    first = ids[torch.randint(0, ids.numel(), (n, 1), generator=generator)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(  # type: ignore[operator]
            first,
            attention_mask=torch.ones_like(first),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,  # no window ends early at an end-of-text token
            pad_token_id=0,
        )
    return out[:, :seq_len].cpu()


def _calibration_ids(
    tokenizer: Any, settings: Settings, austen: torch.Tensor, eval_ids: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The token stream the calibration windows are drawn from: the Austen corpus, or another text
    past the windows evaluated on it (``--calibration brown`` asks how much of a text's gap is its
    domain rather than the method, by calibrating on that text's own unevaluated part)."""
    if settings.calibration == AUSTEN:
        return austen
    if settings.calibration in eval_ids:
        return eval_ids[settings.calibration][settings.eval_windows * settings.seq_len :]
    return tokenize_file(tokenizer, text_path(settings.calibration))


def _data(
    tokenizer: Any, settings: Settings, model: torch.nn.Module, drawn: int | None = None
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """``drawn`` calibration windows (``settings.n_samples`` by default; with ``settings.generated``
    windows sampled from ``model`` after the text's), and the windows each row is measured on:
    held-out windows of the Austen corpus (``held_out``, whatever the calibration text) and the
    evaluation texts (under the job's protocol, quant_core/eval_windows.py), each as windows and the
    predictions that count (None: all)."""
    drawn = drawn or settings.n_samples
    if settings.generated and drawn != settings.n_samples:
        raise SystemExit("--generated: not with a row whose tuning sees other windows than the blocks")
    austen = tokenize_file(tokenizer, austen_calibration_text())
    eval_ids = {name: tokenize_file(tokenizer, text_path(name)) for name in EVAL_TEXTS}
    source = _calibration_ids(tokenizer, settings, austen, eval_ids)
    start = window_start(tokenizer).calibration_token
    windows = calibration_windows(source, drawn, settings.window_tokens, settings.seed, start)
    if settings.generated:
        sampled = sampled_windows(model, source, settings.generated, settings.window_tokens, settings.seed)
        windows = torch.cat([windows, sampled])
    cap = settings.eval_windows or None
    held_out = calibration_windows(austen, HELD_OUT_WINDOWS, settings.seq_len, HELD_OUT_SEED, start)
    evals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {"held_out": (held_out, None)}
    for name in eval_ids:
        text = evaluation_windows(tokenizer, text_path(name), settings.seq_len, cap)
        evals[name] = (text.ids, text.scored)
    return windows, evals


def run_row(label: str, bits: int | None, full: bool, settings: Settings) -> dict[str, Any]:
    """Quantize (or, with ``bits=None``, only evaluate) and measure one row in this process."""
    seed = settings.seed
    model_dir = prepare_smollm2()
    model, tokenizer = load_model(str(model_dir))
    row = ROWS.get(label)
    finetune = FinetuneOptions.from_dict(row.finetune if row is not None else {})
    extra = finetune.windows_to_draw(settings.n_samples) - settings.n_samples  # only the tuning sees these
    drawn, evals = _data(tokenizer, settings, model, settings.n_samples + extra)
    windows, tuning_windows = finetune.split(drawn, drawn.shape[0] - extra)  # the blocks' (and a peer's) first
    result: dict[str, Any] = {"label": label, "bits": bits}
    started = time.perf_counter()
    if row is not None and row.peer is not None and bits is not None:
        with tempfile.TemporaryDirectory() as work:
            peer = run_peer(row, bits, model_dir, windows, Path(work))
            model, _ = load_model(str(Path(work) / "model"))
        result.update(peer=peer, calibration_s=peer["seconds"], peak_host_mb=peer["peak_host_mb"])
    elif row is not None and bits is not None:
        spec = QuantSpec(bits=bits, group_size=GROUP_SIZE)
        options = row.full if full else row.quick
        loss = build_loss(row.loss, seed=seed, **row.loss_options)
        method = build_method(row.method, spec, loss, options)
        result.update(method=row.method, loss=row.loss, options=options, loss_options=row.loss_options)
        if method.whole_model:
            result["method_stats"] = method.quantize_model(model, windows, seed=seed)
        else:
            records, tuned = calibrate_then_tune(
                model,
                tuning_windows,
                finetune,
                LayerSchemes(spec),
                lambda: calibrate_blocks(model, windows, method, build_loss(row.loss, seed=seed), seed=seed),
                seed=seed,
            )
            result["mse_ratio"] = sum(r.mse_after for r in records) / sum(r.mse_before for r in records)
            if tuned is not None:
                result["finetune"] = tuned
    result.setdefault("calibration_s", time.perf_counter() - started)
    result["perplexity"] = {name: perplexity(model, w, 4, "cpu", scored=scored) for name, (w, scored) in evals.items()}
    result.setdefault("peak_host_mb", host_peak_mb())
    return result


def _same_settings(saved: dict[str, Any], full: bool, settings: Settings) -> bool:
    """Whether a results file was measured with these settings, so its rows can be kept."""
    try:
        return bool(saved["full"] == full and Settings(**saved["settings"]) == settings)
    except (KeyError, TypeError):  # no file, or one written before a setting existed
        return False


def _key(label: str, bits: int | None) -> str:
    return f"{label}@W{bits}" if bits is not None else label


def _run_subprocess(label: str, bits: int | None, full: bool, threads: int, settings: Settings) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.quality", "--one", label, "--threads", str(threads), *settings.flags()]
    cmd += ["--one-bits", str(bits)] if bits is not None else []
    cmd += ["--full"] if full else []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [""]
        return {"label": label, "bits": bits, "error": f"exit {done.returncode}: {last[0][-200:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| row | bits | held-out Austen ppl | persuasion ppl | brown ppl | calibration | peak host |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['bits']} | failed: {r['error']} | | | | |")
            continue
        ppl = r["perplexity"]
        bits = f"W{r['bits']}" if r["bits"] is not None else "fp32"
        held_out = f"{ppl['held_out']:.2f}" if "held_out" in ppl else "-"  # rows measured before it existed
        lines.append(
            f"| {r['label']} | {bits} | {held_out} | {ppl['persuasion']:.2f} | {ppl['brown']:.2f} | "
            f"{r['calibration_s'] / 60:.1f} min | {r['peak_host_mb'] / 1024:.2f} GiB |"
        )
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """Perplexity (log scale) against bits, one line per method and loss, fp32 as a dashed line."""
    fig, axes = plt.subplots(1, len(EVAL_TEXTS), figsize=(12, 5), sharey=True)
    for ax, text in zip(axes, EVAL_TEXTS, strict=True):
        for label in ROWS:
            points = sorted(
                (r["bits"], r["perplexity"][text])
                for r in rows.values()
                if r["label"] == label and r["bits"] is not None and "perplexity" in r
            )
            if points:
                style = "--" if ROWS[label].peer else "-"  # peer rows dashed, beside ours of the same colour
                ax.plot(*zip(*points, strict=True), marker="o", linestyle=style, label=label)
        if "fp32" in rows and "perplexity" in rows["fp32"]:
            ax.axhline(rows["fp32"]["perplexity"][text], color="black", linestyle="--", label="fp32")
        ax.set(title=f"SmolLM2-135M, asym g{GROUP_SIZE}: {text}", xlabel="bits", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS, metavar="ROW")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row")
    parser.add_argument("--full", action="store_true", help="128 x 512 calibration and the methods' own schedules")
    parser.add_argument("--fresh", action="store_true", help="recompute rows already in the results file")
    parser.add_argument("--n-samples", type=int, help="calibration windows (default 16, 128 with --full)")
    parser.add_argument("--seed", type=int, default=SEED, help="calibration windows and method draws (default 0)")
    parser.add_argument(
        "--generated", type=int, default=0, help="windows the float model samples, added to the calibration windows"
    )
    parser.add_argument(
        "--calibration",
        default=AUSTEN,
        help="text of the calibration windows: austen, or a text's name (its evaluated windows are skipped)",
    )
    parser.add_argument(
        "--calib-seq-len", type=int, default=0, help="tokens per calibration window (default: 512, as evaluated)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-bits", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.full and args.calibration in EVAL_TEXTS:
        parser.error(f"--calibration {args.calibration}: with --full every window of it is evaluated")
    torch.set_num_threads(args.threads)
    settings = Settings.of(args.full, args.n_samples, args.seed, args.generated, args.calibration, args.calib_seq_len)
    if args.one:
        print(json.dumps(run_row(args.one, args.one_bits, args.full, settings)))
        return
    prepare_smollm2()
    austen_calibration_text()
    saved = json.loads(args.out.read_text()) if args.out.is_file() and not args.fresh else {}
    results: dict[str, Any] = saved.get("rows", {}) if _same_settings(saved, args.full, settings) else {}
    todo = [("fp32", None)] + [(label, bits) for bits in args.bits for label in args.rows]
    todo = [
        (label, bits)
        for label, bits in todo
        if _key(label, bits) not in results or "error" in results[_key(label, bits)]
    ]

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads_per_row": args.threads}
        payload = {"full": args.full, "settings": settings.__dict__, "machine": machine, "rows": results}
        args.out.write_text(json.dumps(payload, indent=2))

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            pool.submit(_run_subprocess, label, bits, args.full, args.threads, settings): (label, bits)
            for label, bits in todo
        }
        for future, (label, bits) in futures.items():
            results[_key(label, bits)] = future.result()
            save()
            print(format_table([results[_key(label, bits)]]).splitlines()[-1], flush=True)
    order = [_key("fp32", None)] + [_key(label, bits) for bits in args.bits for label in args.rows]
    print(format_table([results[k] for k in order if k in results]))
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
