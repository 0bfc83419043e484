#!/usr/bin/env bash
# Create the environments qwenhw's tests use, from scratch, with pinned versions.
#   bash ci/setup.sh          base + vllm + intel environments under .venvs/
#   bash ci/setup.sh base     only the base environment (enough for `qwenhw demo` and most tests)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
which="${1:-all}"
PY="${PYTHON:-python3}"

if [ ! -x .venvs/base/bin/python ]; then "$PY" -m venv .venvs/base; fi
.venvs/base/bin/pip install -q -r ci/requirements/base.txt
.venvs/base/bin/pip install -q --no-deps -e . -e plugins/offload -e plugins/native
for plugin in plugins/vllm plugins/intel; do
  [ -f "$plugin/pyproject.toml" ] && .venvs/base/bin/pip install -q --no-deps -e "$plugin"
done
.venvs/base/bin/python -c "import qwenhw; print('base environment ready:', qwenhw.__version__)"

if [ "$which" = "all" ]; then
  # the plugin-guide example is not installed: tests put it on the path for themselves (tests/test_registry.py)
  [ -f ci/envs/vllm.sh ] && bash ci/envs/vllm.sh .venvs/vllm
  [ -f ci/envs/intel.sh ] && bash ci/envs/intel.sh .venvs/intel
fi
