#!/usr/bin/env bash
# The SmolLM2-135M-Instruct runs committed in this folder (`make bench-deps` first: kvpress
# 0.5.5 side venv, optimum-quanto, Austen). One torch/rayon thread per side: the build
# machine is a shared 2-core VM where a second thread mostly waits for a busy core.
# Then: python -m kvpress_rs.bench report docs/results --readme README.md
set -euo pipefail
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
B="python -m kvpress_rs.bench"
OUT=${OUT:-docs/results}
$B micro --threads 1 --out "$OUT"
$B needle --threads 1 --lengths 2000 --ratios 0.25 0.5 0.75 \
  --methods full streaming_llm knorm snapkv tova quantized:bits=4 quanto:nbits=4 --out "$OUT"
$B ppl --threads 1 --lengths 2048 --ratios 0.5 --out "$OUT"
$B speed --threads 1 --lengths 2048 6144 --out "$OUT"
