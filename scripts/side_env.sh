#!/usr/bin/env bash
# Build a side environment from scratch and run the tests it names.
#   bash scripts/side_env.sh node        # .ci/envs/node.txt -> .venv-node, then the tests it lists
# A side environment holds a stack that does not install beside requirements.txt: another tool's pins
# (axolotl, LLaMA-Factory) or a locked-down GPU node's preinstalled versions. Its file in .ci/envs/ is a pip
# requirements file; comment lines in it say the rest:
#   # tests: <pytest arguments>     what to run in it (required)
#   # no-deps: <requirement> ...    installed afterwards with --no-deps (for a tool whose own pins conflict)
# torch 2.13.0 (the CPU build on this machine's disk) goes in first, so nothing pulls a CUDA build.
# A second run reuses the environment while its file is unchanged; SIDE_ENV_FRESH=1 rebuilds it;
# --install builds it and runs nothing (CI builds the side environments while the main suite runs).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: bash scripts/side_env.sh NAME [--install] (NAME one of: $(ls .ci/envs | sed 's/\.txt$//' | tr '\n' ' '))}
spec=.ci/envs/$name.txt
[ -f "$spec" ] || { echo "side_env: no $spec; the environments are: $(ls .ci/envs | tr '\n' ' ')" >&2; exit 2; }
venv=.venv-$name
tests=$(sed -n 's/^# tests: //p' "$spec")
[ -n "$tests" ] || { echo "side_env: $spec has no '# tests: ...' line; add the pytest arguments to run" >&2; exit 2; }
nodeps=$(sed -n 's/^# no-deps: //p' "$spec")
stamp=$(sha256sum "$spec" | cut -c1-16)
if [ "${SIDE_ENV_FRESH:-0}" = 1 ] || [ "$(cat "$venv/.istune-spec" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    PIP="$venv/bin/python -m pip --disable-pip-version-check -q"
    $PIP install torch==2.13.0
    $PIP install -r "$spec"
    [ -z "$nodeps" ] || $PIP install --no-deps $nodeps
    $PIP install -e . --no-deps
    echo "$stamp" > "$venv/.istune-spec"
fi
[ "${2:-}" != --install ] || exit 0
echo "side environment $name: $("$venv/bin/python" -c 'import torch, transformers, peft, accelerate; print("torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__, "| accelerate", accelerate.__version__)')"
# -p no:cacheprovider: the side run must not rewrite the main suite's .pytest_cache
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider $tests
