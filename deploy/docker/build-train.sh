#!/usr/bin/env bash
# Build the training image with a CPU-only torch: this machine's torch wheel (found in pip's find-links, e.g.
# /opt/wheels) is put in deploy/docker/wheels/ for the build, so pip does not pull PyPI's CUDA build (5.9 GB).
# Usage: deploy/docker/build-train.sh [TAG]   (default kovae-train)
set -euo pipefail
cd "$(dirname "$0")/../.."

tag="${1:-kovae-train}"
links="${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}"
copied=()
for dir in $links /opt/wheels; do
    for wheel in "$dir"/torch-2.13.0+cpu-*.whl; do
        if [ -f "$wheel" ] && [ ${#copied[@]} -eq 0 ]; then
            cp "$wheel" deploy/docker/wheels/
            copied+=("deploy/docker/wheels/$(basename "$wheel")")
        fi
    done
done
trap 'rm -f "${copied[@]}"' EXIT
if [ ${#copied[@]} -eq 0 ]; then
    echo "no local CPU torch wheel found: pip will take torch from PyPI" >&2
fi
docker build --network host -f Dockerfile.train -t "$tag" .
