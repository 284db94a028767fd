"""Score token windows with vLLM: each position's next-token NLL.

Reads ``{"model": path, "windows": [[ids]], "threads": n, "result": path}`` as JSON on stdin and
writes ``{"nll": [[per-position NLL]], "runtime": "vllm X"}`` (or ``{"skipped": reason}`` where this
vLLM cannot run the checkpoint) as JSON to ``result`` (vLLM logs on stdout). Every window is one prompt, scored
through its prompt log-probabilities: each position but the first is predicted from those before it,
as quant_core.perplexity scores a window.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _cpu_cannot_run(model: str) -> str | None:
    """vLLM's CPU build runs packed int weights only through its AVX-512 kernel library, and packed
    experts of a mixture of experts only with AMX tiles (its CPUExpertsInt4 kernel)."""
    import torch
    from vllm.platforms import current_platform

    config = json.loads((Path(model) / "config.json").read_text())
    if not current_platform.is_cpu() or "quantization_config" not in config:
        return None
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts and not torch.cpu._is_amx_tile_supported():
        return (
            "vLLM's CPU build has no int4 kernel for a mixture of experts' packed experts on this processor "
            "(CPUExpertsInt4 needs AMX tiles), so packed MoE checkpoints run in vLLM on AMX CPUs and GPUs"
        )
    import vllm._custom_ops  # noqa: F401  (loads the kernel library this CPU supports)

    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None
    return (
        "vLLM's CPU build has no int4 weight kernel on this processor (cpu_gemm_wna16 is built for AVX-512 only; "
        "this CPU's kernel library lacks it), so packed checkpoints run in vLLM on AVX-512 CPUs and GPUs"
    )


def _memory_settings() -> dict[str, float | int]:
    """How much memory vLLM may take. On a GPU, its usual share. On a CPU it would reserve a share of
    *all* memory up front (0.92 unless told), refuse to start when less is free, then size the KV cache
    from what its own process happens to hold: fragile beside other work. Scoring needs the KV cache
    of a few windows only, so the cache is sized explicitly: 1 GiB, or a quarter of what is free now
    when that is less (vLLM then skips the check and the warm-up that sizes it)."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return {"gpu_memory_utilization": 0.9}
    return {"kv_cache_memory_bytes": min(2**30, psutil.virtual_memory().available // 4)}


def main() -> None:
    request = json.load(sys.stdin)
    if request.get("threads"):
        os.environ.setdefault("OMP_NUM_THREADS", str(request["threads"]))
    reason = _cpu_cannot_run(request["model"])
    if reason is not None:
        Path(request["result"]).write_text(json.dumps({"skipped": reason}))
        return
    import vllm
    from vllm import LLM, SamplingParams

    windows = request["windows"]
    llm = LLM(
        model=request["model"],
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=max(map(len, windows)) + 1,
        seed=0,
        **_memory_settings(),
    )
    outputs = llm.generate(
        [{"prompt_token_ids": window} for window in windows], SamplingParams(max_tokens=1, prompt_logprobs=0)
    )
    nll = [
        [-position[token].logprob for token, position in zip(window[1:], output.prompt_logprobs[1:], strict=True)]
        for window, output in zip(windows, outputs, strict=True)
    ]
    result = {"nll": nll, "runtime": f"vllm {vllm.__version__}"}
    written = Path(request["result"])
    written.with_suffix(".part").write_text(json.dumps(result))
    written.with_suffix(".part").rename(written)  # whole or absent, whatever happens next
    # vLLM's teardown at interpreter exit sometimes aborts ("terminate called without an active
    # exception") after every answer is in: leave without it. The caller ends this process group,
    # the engine's own process included.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
