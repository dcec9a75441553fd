#!/usr/bin/env bash
# The GPU suite on a lent device machine, in two steps (BENCHMARKS.md, "GPU figures").
#
#   bash benchmarks/gpu_device.sh prepare   # here, with the package index: wheels into .whl/
#   bash benchmarks/gpu_device.sh run       # there (carry .whl): install, run, results to $OUT
#
# The device image has Python 3.12 with torch, transformers, peft and accelerate but not
# moebench, SQLAlchemy, Alembic (with Mako) or lm-eval (with dill), and no network, so those
# travel as wheels (about 14 MiB, under the 64 MiB a call may carry). moebench goes as a wheel
# built from this checkout: its package layout (methods/ and tasks/ mapped into moebench.*)
# needs an install, and the device may lack the build backend's version.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    py=${PYTHON:-.venv/bin/python}
    rm -rf .whl && mkdir -p .whl # .gitignore keeps /.whl/ out of git; `carry` takes it along
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        "lm-eval==0.4.13" "dill==0.4.1" "sqlalchemy==2.1.9" "alembic==1.20.1" "mako==1.4.3"
    "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
    du -sh .whl
    ;;
run)
    : "${OUT:?run this on the device machine, where OUT names the folder that comes back}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    rm -rf /tmp/gpu-suite /tmp/gpu-suite.partial-*
    status=0
    timeout 540 python3 benchmarks/gpu_suite.py --out /tmp/gpu-suite 2>&1 \
        | tee "$OUT/gpu-suite.log" || status=$?
    # A run cut off at its limit leaves what it measured in the .partial folder.
    dir=$(ls -d /tmp/gpu-suite /tmp/gpu-suite.partial-* 2>/dev/null | head -n 1 || true)
    if [ -n "$dir" ]; then
        cp "$dir/suite.json" "$dir/suite.md" "$OUT/" 2>/dev/null || true
        tar czf "$OUT/gpu-suite.tgz" -C "$(dirname "$dir")" "$(basename "$dir")"
    fi
    exit "$status"
    ;;
*)
    echo "usage: bash benchmarks/gpu_device.sh prepare|run" >&2
    exit 2
    ;;
esac
