#!/usr/bin/env bash
# The SmolLM2-135M-Instruct runs committed in this folder (`make bench-deps` first: kvpress
# 0.5.5 side venv, optimum-quanto, Austen). One torch/rayon thread per side: the build
# machine is a shared 2-core VM where a second thread mostly waits for a busy core. The
# scopes (depths, offsets, methods) are cut to what that machine ran in the time there was;
# the defaults of each subcommand are larger. needle and ppl ran side by side (neither is
# timed), micro and speed alone.
# Then: python -m kvpress_rs.bench report docs/results --readme README.md
set -euo pipefail
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
B="python -m kvpress_rs.bench"
OUT=${OUT:-docs/results}
$B micro --threads 1 --out "$OUT"
$B needle --threads 1 --lengths 2000 --depths 0.1 0.5 0.9 --ratios 0.25 0.5 \
  --methods full streaming_llm knorm snapkv quantized:bits=4 --out "$OUT" &
$B ppl --threads 1 --lengths 2048 --offsets 2000 60000 --continuation 64 --ratios 0.5 \
  --methods full knorm snapkv quantized:bits=4 quantized:bits=2,group_size=64,hadamard=true quanto:nbits=4 --out "$OUT"
wait
$B speed --threads 1 --lengths 2048 6144 --repeats 2 --steps 8 --methods full knorm quantized:bits=4 --out "$OUT"
