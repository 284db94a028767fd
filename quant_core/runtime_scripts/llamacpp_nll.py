"""Score token windows with llama.cpp (llama-cpp-python): each position's next-token NLL.

Reads ``{"model": path, "windows": [[ids]], "threads": n, "result": path}`` as JSON on stdin and
writes ``{"nll": [[per-position NLL]], "runtime": "llama-cpp-python X"}`` as JSON to ``result``. Each window is
evaluated from an empty cache, and every position but the last predicts the next token, as
quant_core.perplexity scores a window.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np


def main() -> None:
    request = json.load(sys.stdin)
    windows = request["windows"]
    length = max(len(window) for window in windows)
    llm = llama_cpp.Llama(
        model_path=request["model"],
        n_ctx=length,
        n_batch=length,
        n_ubatch=length,
        n_threads=request.get("threads"),
        logits_all=True,
        verbose=False,
    )
    nll = []
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nll.append((log_norm - logits[np.arange(len(window) - 1), window[1:]]).tolist())
    result = {"nll": nll, "runtime": f"llama-cpp-python {llama_cpp.__version__}"}
    Path(request["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
