#!/usr/bin/env bash
# Reproduce the GPU measurements from the repository root on a CUDA machine where resprobe's
# dependencies are importable but the package is not installed (hence PYTHONPATH=., put before
# any PYTHONPATH already set, e.g. a folder of carried wheels).
# Steps are separate so that each fits a 10-minute command limit; the study resumes between calls.
#   bash benchmarks/gpu_runbook.sh targets  # every GPU target of docs/performance.md in one call
#                                           # (~5 min on an H100; each command under a time limit,
#                                           # 9 min in all, going on past a failed one): for a
#                                           # short lease and one 10-minute command
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
# RUNBOOK_SMOKE=1 runs a step's benchmarks at toy sizes on whatever device there is, without the
# CIFAR-10 archive, writing under $RUNBOOK_OUT (tests/test_gpu_runbook.py does, on the CPU): a
# GPU lease is not spent finding a broken command.
set -euo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
ARCHIVE=${CIFAR_ARCHIVE:-.data/cifar10-jpg.tar.gz}
OUT=${RUNBOOK_OUT:-.data}
SMOKE=${RUNBOOK_SMOKE:-0}
# without the archive (or in a smoke run) the trainer's benchmark takes synthetic CIFAR-shaped
# images, which cost the same per epoch; the study and the data step need the archive
DATA=()
if [ -f "$ARCHIVE" ] && [ "$SMOKE" != 1 ]; then DATA=(--data "$ARCHIVE"); fi
if [ "$SMOKE" = 1 ]; then
  TRAIN=(--limit 64 --batch-size 32 --epochs 1)
  HOOKS=(--batch 4 --samples 8 --repeats 1)
  BREAKDOWN=(--batch 4 --repeats 1)
  JACOBIAN=(--batch 2 --probes 2 --images 4 --width 4 --repeats 1)
  SITES=(--batch 4 --depth 8)
  ONEPASS=(--smoke)
else
  TRAIN=(--epochs 3)
  HOOKS=(--samples 4096)
  BREAKDOWN=()
  JACOBIAN=()
  SITES=(--batch 512 --depth 56)
  ONEPASS=()
fi
cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
graph=$([ "$cuda" = 1 ] && echo ,graph || true)  # recorded training needs a CUDA device

# timed NAME SECONDS COMMAND...: run COMMAND under a time limit, say how long it took, and note
# NAME as failed (without stopping) where it fails or runs out of time
failed=()
timed() {
  local name=$1 limit=$2 start=$SECONDS rc=0
  shift 2
  echo "### $name $(date +%T) (at most ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  echo "### $name: rc $rc in $((SECONDS - start)) s"
  if [ "$rc" -ne 0 ]; then failed+=("$name"); fi
  return 0
}
verdict() {
  if ((${#failed[@]})); then echo "### failed: ${failed[*]}" >&2; exit 1; fi
}

case "${1:-}" in
  targets)
    mkdir -p "$OUT"
    if ((${#DATA[@]})); then
      timed data 60 bash "$0" data
    elif [ "$SMOKE" != 1 ]; then
      echo "### no $ARCHIVE: bench_train times synthetic CIFAR-shaped images" >&2
    fi
    # the kernels the statistics rows run on, checked on this GPU before they are timed
    timed kernel-tests 120 python3 -m pytest -q -m gpu tests/probe/test_onepass_cuda.py \
      tests/probe/test_grouped_statistics.py tests/probe/test_replay.py
    # capture <= 1.05 x at batch 512 bf16 (statistics, 27 blocks), per probe, recorded or not
    timed breakdown 90 python3 -m benchmarks.bench_breakdown "${BREAKDOWN[@]}"
    # the dump: >= 90 % of the disk's speed, against .cpu() hooks, peak memory over 4 x samples
    timed hooks 120 python3 -m benchmarks.bench_hooks "${HOOKS[@]}" --out-dir "$OUT"
    # <= 0.7 s/epoch, eager and recorded
    timed train 100 python3 -m benchmarks.bench_train "${DATA[@]}" "${TRAIN[@]}" --modes "eager$graph"
    # ||J - P||^2 within 1.2 x of the bare vmap(jvp), >= 300 x jacrev, 27 blocks in <= 30 s
    timed jacobian 50 python3 -m benchmarks.bench_jacobian "${JACOBIAN[@]}"
    verdict ;;
  data)
    python3 -c "import sys; from probe.data import load_dataset; d = load_dataset(sys.argv[1]); print(d.x_train.shape, d.x_test.shape)" "$ARCHIVE" ;;
  tests)
    python3 -m pytest -q -m gpu tests/test_acceptance.py tests/probe/train/test_cuda_graph.py \
      tests/probe/test_served_sites.py tests/probe/test_grouped_statistics.py \
      tests/probe/test_replay.py tests/probe/test_onepass_cuda.py
    # chunks past the page cache on this machine's disk (skips where it has no O_DIRECT)
    python3 -m pytest -q -rs tests/probe/test_direct_io.py --basetemp "$OUT/pytest-direct" ;;
  bench)
    mkdir -p "$OUT"
    python3 -m benchmarks.bench_train "${DATA[@]}" "${TRAIN[@]}" --modes "eager$graph,minimal"
    python3 -m benchmarks.bench_hooks "${HOOKS[@]}" --out-dir "$OUT"
    python3 -m benchmarks.bench_breakdown "${BREAKDOWN[@]}"
    python3 -m benchmarks.bench_jacobian "${JACOBIAN[@]}"
    python3 -m benchmarks.bench_sites "${SITES[@]}" ;;
  kernels)
    python3 -m pytest -q -m gpu tests/probe/test_onepass_cuda.py \
      tests/probe/test_grouped_statistics.py tests/probe/test_replay.py
    python3 -m benchmarks.bench_onepass_cuda "${ONEPASS[@]}"
    python3 -m benchmarks.bench_breakdown "${BREAKDOWN[@]}" ;;
  profile)
    python3 -m benchmarks.bench_statistics_parts --profile
    python3 -m benchmarks.bench_statistics_parts --profile --fused
    python3 -m benchmarks.bench_statistics_parts --profile --welford ;;
  compiled)
    python3 -m benchmarks.bench_train "${DATA[@]}" "${TRAIN[@]}" --modes reduce-overhead ;;
  study)
    python3 -m probe study --preset he2016 --data "$ARCHIVE" --out "$OUT/study-he2016" --cuda-graph ;;
  dist)
    gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    python3 -m benchmarks.bench_distributed --ranks "$gpus" --repeats 3 --json "$OUT/dist.json" ;;
  all)
    logs=${LOGS:-$OUT/logs}
    mkdir -p "$logs"
    for step in data tests bench profile; do
      echo "### $step $(date +%T)"
      bash "$0" "$step" 2>&1 | tee "$logs/$step.log" || failed+=("$step")
    done
    verdict ;;
  *)
    echo "usage: $0 targets|data|tests|bench|kernels|profile|compiled|study|dist|all" >&2; exit 2 ;;
esac
