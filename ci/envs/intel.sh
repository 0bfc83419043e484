#!/usr/bin/env bash
# Build the pinned Intel environment for qwenhw's `intel` backend at $1 (default .venvs/intel).
#
# ipex-llm (archived 2026-01-28) and IPEX (archived 2026-03-30) are a legacy stack: IPEX 2.8.0 exits unless
# torch is 2.8.*, ipex-llm breaks on transformers >= 4.57, and `ipex-llm[all]` pins a torch PyPI lacks, so
# everything is pinned here and ipex-llm is installed without extras. torch 2.8.0 from PyPI is a CUDA
# build: its NVIDIA libraries (~4 GB) are loaded even on CPU, so they stay. DS_BUILD_OPS=0: DeepSpeed's
# ops are JIT-built on first use (the AutoTP shm op, cached under TORCH_EXTENSIONS_DIR).
# Measured on 2 cores with a cold pip cache: see plugins/intel/README.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${1:-$REPO/.venvs/intel}
PYTHON=${PYTHON:-python3.11}
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import qwenhw_intel, ipex_llm" >/dev/null 2>&1; then
  echo "intel env: $VENV already built"
  exit 0
fi

start=$(date +%s)
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --no-input)

# The stack and everything pip resolved for it (2026-11-27), pinned so a rebuild is the same environment.
cat > "$VENV/requirements.txt" <<'PINS'
torch==2.8.0
intel_extension_for_pytorch==2.8.0
ipex-llm==2.3.0b20251110
transformers==4.51.3
deepspeed==0.19.8
nvidia-cublas-cu12==12.8.4.1
nvidia-cuda-cupti-cu12==12.8.90
nvidia-cuda-nvrtc-cu12==12.8.93
nvidia-cuda-runtime-cu12==12.8.90
nvidia-cudnn-cu12==9.10.2.21
nvidia-cufft-cu12==11.3.3.83
nvidia-cufile-cu12==1.13.1.3
nvidia-curand-cu12==10.3.9.90
nvidia-cusolver-cu12==11.7.3.90
nvidia-cusparse-cu12==12.5.8.93
nvidia-cusparselt-cu12==0.7.1
nvidia-nccl-cu12==2.27.3
nvidia-nvjitlink-cu12==12.8.93
nvidia-nvtx-cu12==12.8.90
triton==3.4.0
accelerate==1.15.0
safetensors==0.8.0
sentencepiece==0.2.3
tabulate==0.10.0
protobuf==7.36.2
py-cpuinfo==9.0.0
pluggy==1.7.0
psutil==7.2.2
rich==15.0.0
click==8.5.1
nvidia-ml-py==13.615.71
huggingface_hub==0.36.2
pytest==9.2.0
fsspec==2026.9.0
hf-xet==1.8.0
iniconfig==2.3.1
markdown-it-py==4.3.0
numpy==2.4.6
packaging==26.4
pydantic==2.14.4
pydantic_core==2.50.5
Pygments==2.21.0
PyYAML==6.0.4
regex==2026.11.19
sympy==1.14.0
tokenizers==0.21.4
tqdm==4.70.1
typing_extensions==4.16.0
einops==0.8.2
filelock==4.3.1
hjson==3.1.0
Jinja2==3.1.6
msgpack==1.2.4
networkx==3.6.1
ninja==1.13.2
requests==2.34.2
annotated-types==0.8.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
idna==3.20
MarkupSafe==3.0.4
mdurl==0.1.2
mpmath==1.3.0
typing-inspection==0.4.5
urllib3==2.8.0
PINS
"${pip[@]}" -r "$VENV/requirements.txt"

# qwenhw and the plugin are pure Python; --no-deps keeps pip from touching the pins above.
"${pip[@]}" --no-deps -e "$REPO" -e "$REPO/plugins/intel"
"$VENV/bin/python" -c "import qwenhw_intel, ipex_llm, intel_extension_for_pytorch, deepspeed" >/dev/null
echo "intel env: $VENV built in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
