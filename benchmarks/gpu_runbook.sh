#!/usr/bin/env bash
# Reproduce the GPU measurements from the repository root on a CUDA machine where resprobe's
# dependencies are importable but the package is not installed (hence PYTHONPATH=.).
# Steps are separate so that each fits a 10-minute command limit; the study resumes between calls.
#   bash benchmarks/gpu_runbook.sh data     # decode CIFAR-10 JPEGs once (cached under data/cache)
#   bash benchmarks/gpu_runbook.sh bench    # trainer, hook and Jacobian benchmarks
#   bash benchmarks/gpu_runbook.sh study    # he2016 preset, fast recipe (run again to resume)
#   bash benchmarks/gpu_runbook.sh dist     # one GPU against all of the node's GPUs (torchrun)
set -euo pipefail
export PYTHONPATH=.
ARCHIVE=${CIFAR_ARCHIVE:-.data/cifar10-jpg.tar.gz}
case "${1:-}" in
  data)
    python3 -c "import sys; from probe.data import load_dataset; d = load_dataset(sys.argv[1]); print(d.x_train.shape, d.x_test.shape)" "$ARCHIVE" ;;
  bench)
    python3 -m benchmarks.bench_train --data "$ARCHIVE" --epochs 3
    python3 -m benchmarks.bench_train --data "$ARCHIVE" --epochs 3 --compile-mode reduce-overhead
    python3 -m benchmarks.bench_hooks --out-dir .data
    python3 -m benchmarks.bench_jacobian
    python3 -m benchmarks.bench_sites --batch 512 --depth 56 ;;
  study)
    python3 -m probe study --preset he2016 --data "$ARCHIVE" --out .data/study-he2016 ;;
  dist)
    gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    python3 -m benchmarks.bench_distributed --ranks "$gpus" --repeats 3 --json .data/dist.json ;;
  *)
    echo "usage: $0 data|bench|study|dist" >&2; exit 2 ;;
esac
