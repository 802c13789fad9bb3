#!/usr/bin/env bash
# Reproduce the GPU measurements from the repository root on a CUDA machine where resprobe's
# dependencies are importable but the package is not installed (hence PYTHONPATH=., put before
# any PYTHONPATH already set, e.g. a folder of carried wheels).
# Steps are separate so that each fits a 10-minute command limit; the study resumes between calls.
#   bash benchmarks/gpu_runbook.sh data     # decode CIFAR-10 JPEGs once (cached under data/cache)
#   bash benchmarks/gpu_runbook.sh tests    # the -m gpu tests (CUDA capture and replay, CUDA-graph
#                                           # training), and direct chunk writes on this disk
#   bash benchmarks/gpu_runbook.sh bench    # trainer, hook and Jacobian benchmarks (~4 min on an H200);
#                                           # bench_breakdown times the statistics with the Triton
#                                           # kernels and with torch's formulas side by side
#   bash benchmarks/gpu_runbook.sh kernels  # the CUDA statistics' Triton kernels alone (~2 min):
#                                           # their -m gpu tests, those of the statistics that use
#                                           # them, their GPU time per block against torch's
#                                           # formulas and a copy (bench_onepass_cuda), and
#                                           # bench_breakdown with them on and off
#   bash benchmarks/gpu_runbook.sh profile  # the statistics' kernels by GPU time, eager, fused
#                                           # and eager with var_mean moments
#   bash benchmarks/gpu_runbook.sh compiled # trainer with torch.compile reduce-overhead (~2 min compiling)
#   bash benchmarks/gpu_runbook.sh study    # he2016 preset, fast recipe (run again to resume)
#   bash benchmarks/gpu_runbook.sh dist     # one GPU against all of the node's GPUs (torchrun)
#   bash benchmarks/gpu_runbook.sh all      # data, tests, bench, profile in one call (~6 min, H100),
#                                           # each step's log under $LOGS (default .data/logs),
#                                           # going on past a failed step; exits non-zero if any failed
set -euo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
ARCHIVE=${CIFAR_ARCHIVE:-.data/cifar10-jpg.tar.gz}
case "${1:-}" in
  data)
    python3 -c "import sys; from probe.data import load_dataset; d = load_dataset(sys.argv[1]); print(d.x_train.shape, d.x_test.shape)" "$ARCHIVE" ;;
  tests)
    python3 -m pytest -q -m gpu tests/test_acceptance.py tests/probe/train/test_cuda_graph.py \
      tests/probe/test_served_sites.py tests/probe/test_grouped_statistics.py \
      tests/probe/test_replay.py tests/probe/test_onepass_cuda.py
    # chunks past the page cache on this machine's disk (skips where it has no O_DIRECT)
    python3 -m pytest -q -rs tests/probe/test_direct_io.py --basetemp .data/pytest-direct ;;
  bench)
    mkdir -p .data
    python3 -m benchmarks.bench_train --data "$ARCHIVE" --epochs 3 --modes eager,graph,minimal
    python3 -m benchmarks.bench_hooks --samples 4096 --out-dir .data
    python3 -m benchmarks.bench_breakdown
    python3 -m benchmarks.bench_jacobian
    python3 -m benchmarks.bench_sites --batch 512 --depth 56 ;;
  kernels)
    python3 -m pytest -q -m gpu tests/probe/test_onepass_cuda.py \
      tests/probe/test_grouped_statistics.py tests/probe/test_replay.py
    python3 -m benchmarks.bench_onepass_cuda
    python3 -m benchmarks.bench_breakdown ;;
  profile)
    python3 -m benchmarks.bench_statistics_parts --profile
    python3 -m benchmarks.bench_statistics_parts --profile --fused
    python3 -m benchmarks.bench_statistics_parts --profile --welford ;;
  compiled)
    python3 -m benchmarks.bench_train --data "$ARCHIVE" --epochs 3 --modes reduce-overhead ;;
  study)
    python3 -m probe study --preset he2016 --data "$ARCHIVE" --out .data/study-he2016 --cuda-graph ;;
  dist)
    gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    python3 -m benchmarks.bench_distributed --ranks "$gpus" --repeats 3 --json .data/dist.json ;;
  all)
    logs=${LOGS:-.data/logs}
    mkdir -p "$logs"
    failed=()
    for step in data tests bench profile; do
      echo "### $step $(date +%T)"
      bash "$0" "$step" 2>&1 | tee "$logs/$step.log" || failed+=("$step")
    done
    if ((${#failed[@]})); then echo "### failed: ${failed[*]}" >&2; exit 1; fi ;;
  *)
    echo "usage: $0 data|tests|bench|kernels|profile|compiled|study|dist|all" >&2; exit 2 ;;
esac
