#!/usr/bin/env bash
# Draws the house as it installs: farm-studio reads imports by file path, and the code imports
# itself as dsa_rag.model / dsa_rag.kernels / dsa_rag.rag_service (pyproject's package-dir
# mapping), so the three folders are copied under dsa_rag/ in a temp dir first.
#   .ci/house.sh            # -> farm-studio look (picture path on its first line; circles must be 0)
# The gate that CI runs is tests/test_layout.py (cycles, imports inside functions included).
set -euo pipefail
cd "$(dirname "$0")/.."
house=$(mktemp -d /tmp/dsa-rag-house.XXXXXX)
mkdir -p "$house/dsa_rag"
for d in model kernels rag_service; do cp -r "$d" "$house/dsa_rag/"; done
cp -r benchmarks examples "$house/"
find "$house" -name __pycache__ -prune -exec rm -rf {} +
git -C "$house" init -q
farm-studio look --repo "$house" "$@"
