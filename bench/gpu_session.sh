#!/usr/bin/env bash
# The checks and benchmarks that need a GPU, with the machine's own python3 (torch, triton, transformers,
# peft, pyarrow, fsspec, safetensors, matplotlib, tqdm; polars and dagster are not needed):
#
#   bash bench/gpu_session.sh tests quick   # GPU tests + bench_kernels --quick + bench_step + bench_loads, then
#                                           # bench_e2e --quick
#   bash bench/gpu_session.sh full          # bench_e2e in full (< 10 min on an H100)
#
# Steps run in the order given; logs and bench_e2e.json/png go to $OUT if set, else bench/results.
# Then, where the repo is: python -m bench.publish <that folder>
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
for step in "$@"; do
  case $step in
    tests)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
      python3 -m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_gpu.py \
        tests/engine/test_cuda_graphs.py tests/engine/test_sampling.py 2>&1 | tee "$out/gpu_tests.log" || status=1
      python3 -m bench.bench_kernels --quick 2>&1 | tee "$out/bench_kernels.log" || status=1
      python3 -m bench.bench_step --out "$out" 2>&1 | tee "$out/bench_step.log" || status=1
      # the host side of adapter loads on the GPU machine's many cores: do 2 (and 4) readers scale?
      python3 -m bench.bench_loads --repeats 3 --readers 4 --out "$out" 2>&1 | tee "$out/bench_loads.log" || status=1 ;;
    quick|full)
      python3 -m bench.bench_e2e $([ "$step" = quick ] && echo --quick) --out "$out" 2>&1 \
        | tee "$out/bench_e2e_$step.log" || status=1 ;;
    *) echo "unknown step $step (tests, quick, full)" >&2; exit 2 ;;
  esac
done
exit $status
