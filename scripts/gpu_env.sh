#!/usr/bin/env bash
# The environment of the GPU check (benchmarks/gpu.py), built here and carried to the GPU machine.
#
# The GPU machine reaches no package registry. Its python3 is Python 3.12 with torch, transformers, timm,
# typer, rich, xarray and pytest; zarr, numcodecs, dask and distributed are not there, and neither may be
# matplotlib (mmkd-train's report plots the loss) nor setuptools (the build backend of `pip install -e .`).
# So the wheels of those, with their dependencies, for CPython 3.12 on x86-64 Linux, are downloaded here into
# .gpu-wheels/ (ignored by git; about 35 MB, under the 64 MiB that travels with the working tree), and the
# GPU machine installs from that folder alone.
#
#   bash scripts/gpu_env.sh download   # here, with the network: fills .gpu-wheels/
#   bash scripts/gpu_env.sh install    # there: zarr & co. from .gpu-wheels/, then mmkd itself (--no-deps -e .)
#   bash scripts/gpu_env.sh run        # there: install, then python benchmarks/gpu.py (its table and JSON to $OUT)
#
# `install` is the one command of docs/gpu.md:
#   pip install --no-index --find-links .gpu-wheels zarr numcodecs dask distributed matplotlib
#   pip install --no-index --find-links .gpu-wheels --no-deps -e .
# (the second takes setuptools for its isolated build from the folder too). Where pip refuses to touch an
# externally managed system Python (PEP 668), it is run again with --break-system-packages: the machine is
# lent for minutes and thrown away.
set -euo pipefail

cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
PYTHON=${PYTHON:-python3}
PACKAGES=(zarr==3.1.6 numcodecs==0.16.6 dask distributed matplotlib)
# pyproject.toml's [build-system] requires; `pip install -e .` builds in isolation from the wheel folder
BUILD=("setuptools>=68")

download() {
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --quiet --python-version 3.12 --implementation cp --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any -d "$WHEELS" "${PACKAGES[@]}" "${BUILD[@]}"
    # already on the GPU machine: transformers and torchvision require numpy, torchvision (timm's) pillow; they
    # are the two largest wheels (22 of 56 MB)
    rm -f "$WHEELS"/numpy-*.whl "$WHEELS"/pillow-*.whl
    echo "$WHEELS: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
}

pip_install() {
    local out
    if out=$("$PYTHON" -m pip install --no-index --find-links "$WHEELS" "$@" 2>&1); then
        echo "$out" | tail -1
    elif grep -q externally-managed <<<"$out"; then
        "$PYTHON" -m pip install --break-system-packages --no-index --find-links "$WHEELS" "$@" | tail -1
    else
        echo "$out" >&2
        return 1
    fi
}

install() {
    [ -d "$WHEELS" ] || { echo "no $WHEELS/: run 'bash scripts/gpu_env.sh download' where pip reaches PyPI" >&2; exit 1; }
    local names=()
    for p in "${PACKAGES[@]}"; do names+=("${p%%[=<>]*}"); done
    pip_install "${names[@]}"
    pip_install --no-deps -e .
}

case "${1:-}" in
    download) download ;;
    install) install ;;
    run)
        install
        HF_HUB_OFFLINE=1 "$PYTHON" benchmarks/gpu.py "${@:2}"
        ;;
    *)
        echo "usage: bash scripts/gpu_env.sh download|install|run [benchmark options]" >&2
        exit 2
        ;;
esac
