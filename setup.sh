#!/usr/bin/env bash
# Installs flowpre and what it needs into the current Python environment (use a venv),
# plus the Debian package holding Fashion-MNIST, the default training data.
set -euo pipefail
cd "$(dirname "$0")"
# torch first: the CPU wheel on these machines; on a GPU machine keep your CUDA build
python3 -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[dev]"
# only for its CLIP BPE vocabulary file (flowpre/text.py); its dependencies (torchvision)
# would pull another torch, and flowpre never imports open_clip itself
python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('open_clip') is None)" \
    || pip install -q --no-deps open-clip-torch
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
echo "flowpre installed: $(python3 -c 'import flowpre, torch; print("flowpre", flowpre.__version__, "torch", torch.__version__)')"
