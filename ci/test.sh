#!/usr/bin/env bash
# Run the test suite in the base environment; engine environments (vllm, intel) are used when present.
set -euo pipefail
cd "$(dirname "$0")/.."
export QWENHW_QUIET=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_HOST_IP=127.0.0.1 TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions"
[ -x .venvs/vllm/bin/python ] && export QWENHW_VLLM_PYTHON="$PWD/.venvs/vllm/bin/python"
[ -x .venvs/intel/bin/python ] && export QWENHW_INTEL_PYTHON="$PWD/.venvs/intel/bin/python"
exec .venvs/base/bin/python -m pytest -q -rs "$@"
