#!/usr/bin/env bash
# Create or update .venv at the repository root with SynPo and its test tools.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# timm (needed by LiteMedSAM's TinyViT encoder) imports torchvision: install a matching pair.
# On x86-64 Linux this is the pair that ships on this project's build machines.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    .venv/bin/pip install --disable-pip-version-check -q "torch==2.14.1" "torchvision==0.29.1"
fi
.venv/bin/pip install --disable-pip-version-check -q -e ".[test]"
