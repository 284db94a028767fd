#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a lent GPU machine beyond what its image holds (its python3
# is 3.12 with torch, numpy, safetensors and tqdm, but an older transformers and no pydantic,
# compressed-tensors or gguf), at the versions this checkout's environment runs, into .whl/ (ignored
# by git; carry it). Run here, once, with the project's venv active:
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
names=(transformers kernels huggingface-hub hf-xet httpx2 tokenizers compressed-tensors loguru gguf
       pydantic pydantic-core annotated-types typing-inspection typing-extensions pyyaml regex)
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
for name in "${names[@]}"; do
  version=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || {
    echo "skipping $name: not installed here" >&2; continue; }
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "$name==$version"
done
du -sh .whl
