#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv and install what it needs.
# Idempotent: re-running with unchanged requirement files installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="$ROOT/.venv"
STAMP="$VENV/.requirements.sha256"
# Pins that keep every later install on the torch that lies on this machine's disk.
CONSTRAINTS="$VENV/constraints.txt"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV ($($PY --version))"
  "$PY" -m venv "$VENV"
fi
want="$(cat requirements.txt requirements-monailabel.txt pyproject.toml scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
printf 'torch==2.14.1\ntorchvision==0.29.1\nnumpy<2\nmonai==1.6.1\n' > "$CONSTRAINTS"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "[setup] installing requirements.txt (torch 2.14.1 from this machine's disk, MONAI 1.6.1, Ignite, Triton client/server...)"
"${PIP[@]}" install -r requirements.txt -c "$CONSTRAINTS" setuptools wheel
# sam2 is a declared dependency of monailabel: source-only, and it builds a CUDA extension
# in an isolated build (with a second torch) unless told otherwise. Nothing here uses SAM.
echo "[setup] installing sam2 without its CUDA extension (monailabel dependency)"
SAM2_BUILD_CUDA=0 "${PIP[@]}" install --no-build-isolation -c "$CONSTRAINTS" sam2
echo "[setup] installing MONAI Label (requirements-monailabel.txt)"
"${PIP[@]}" install -r requirements-monailabel.txt -c "$CONSTRAINTS"
echo "[setup] installing the project (package 'custom', editable)"
"${PIP[@]}" install --no-deps -e .
"$VENV/bin/python" -c "import torch, monai, ignite, custom; print('[setup] torch', torch.__version__, '| monai', monai.__version__, '| ignite', ignite.__version__)"
echo "$want" > "$STAMP"
