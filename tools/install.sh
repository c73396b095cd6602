#!/usr/bin/env bash
# Create the virtual environment (if missing) and install looplm with the book toolchain.
# Usage: tools/install.sh PYTHON VENV
# On a machine without an NVIDIA GPU, torch is the CPU build: first from a local wheel or
# index where the machine has one, then from PyTorch's CPU index, then from PyPI.
set -euo pipefail
python=$1
venv=$2
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.4"
  else
    if "${pip[@]}" --no-index --no-deps "torch>=2.4" 2>/dev/null; then
      # a wheel on this machine: now its dependencies, from the usual index
      version=$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))")
      "${pip[@]}" "torch==$version"
    else
      "${pip[@]}" "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu \
        || "${pip[@]}" "torch>=2.4"
    fi
  fi
fi
"${pip[@]}" -e ".[book]"
"$venv/bin/python" -c "import torch, looplm; print('looplm', looplm.__version__, '| torch', torch.__version__)"
