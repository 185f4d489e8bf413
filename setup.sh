#!/usr/bin/env bash
# Set up .venv with exactly what uv.lock pins, and this project in it (editable).
#
#   bash setup.sh            torch 2.13.0's CPU build (pip's configured index; on a machine
#                            without a local wheel: TORCH_INDEX=https://download.pytorch.org/whl/cpu)
#   TORCH=lock bash setup.sh torch as uv.lock pins it (PyPI's CUDA build, for GPU machines)
#   TORCH_VERSION=2.11.0 VENV=/tmp/v211 bash setup.sh
#                            another torch release from pip's index (PyPI: its CUDA build, ~6 GB
#                            with its libraries), e.g. to rehearse on a GPU image's torch
#
# Everything but torch comes from uv.lock (`uv export --frozen`, hashes checked, no resolution).
# uv is installed by pip if missing. VENV=DIR puts the environment elsewhere; PYTHON picks the
# interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-cpu}
TESTED_TORCH=2.13.0  # the release the suite runs on (tests/test_lock.py: the lock's)
TORCH_VERSION=${TORCH_VERSION:-$TESTED_TORCH}

# torch, and what only its CUDA build needs (tests/test_lock.py checks this list against
# uv.lock): the CPU build is installed by pip instead
CUDA_ONLY=(torch cuda-bindings cuda-pathfinder cuda-toolkit nvidia-cublas
           nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
           nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
           nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
           nvidia-nvtx)

if ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "uv>=0.9"
fi
uv() { "$PYTHON" -m uv "$@"; }

[ -x "$VENV/bin/python" ] || uv venv --quiet --seed --python "$PYTHON" "$VENV"
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
skip=()
if [ "$TORCH" = cpu ]; then
    for name in "${CUDA_ONLY[@]}"; do skip+=(--no-emit-package "$name"); done
    # (pip's notes on configured index folders that lack a package are left out)
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==$TORCH_VERSION" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi
uv export --quiet --frozen --extra dev --no-emit-project --format requirements.txt \
    "${skip[@]}" -o "$requirements"
# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set
# (as on this project's machines) Python never does, so every process would compile Ray,
# FastAPI and pydantic from source at each start: ~1.3 s more per Ray process (there are a
# dozen), 2.5 -> 1.2 s for `import ray.serve` alone (benchmarks/RESULTS.md, cold start)
uv pip install --quiet --no-config --compile-bytecode --python "$VENV/bin/python" --no-deps \
    --require-hashes -r "$requirements"
uv pip install --quiet --no-config --python "$VENV/bin/python" --no-deps -e .
if [ "$TORCH_VERSION" = "$TESTED_TORCH" ]; then
    uv pip check --no-config --python "$VENV/bin/python"
else  # another torch may ask for other versions than the lock's (2.11.0: setuptools<82)
    uv pip check --no-config --python "$VENV/bin/python" ||
        echo "(torch $TORCH_VERSION's requirements above differ from uv.lock's: not fixed here)"
fi
"$VENV/bin/python" -c "import torch, ray, demucs; print('set up', '$VENV:', 'torch', torch.__version__, 'ray', ray.__version__)"
echo "activate it with: source $VENV/bin/activate"
