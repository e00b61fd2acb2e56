#!/usr/bin/env bash
# GPU-machine checks for issue 3, one call per mode (results under $OUT):
#   scripts/gpu_check.sh suite  NRANKS TRANSPORTS   info + smoke + test suite on CuPy shards per transport
#   scripts/gpu_check.sh bench  NRANKS              collectives/redistribute + local_map benchmarks
# Transports nccl and staged run with the system MPI; cuda_mpi with the CUDA-aware Open MPI in ./gpu.
set -o pipefail
MODE=$1; N=${2:-2}; TRANSPORTS=${3:-nccl,staged,cuda_mpi}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
MPIRUN="mpirun --oversubscribe -n $N"
SYS_PATH=$PATH
aware() { . gpu/cuda-aware-env.sh; }
sysmpi() { export PATH=$SYS_PATH; unset OPAL_PREFIX MPI4PY_LIBMPI; }
step() { local t=$1; shift; echo "=== $(date -u +%T) [$t s] $*"; timeout -k 5 "$t" "$@"; echo "=== rc=$?"; }

if [ "$MODE" = suite ]; then
  nvidia-smi -L
  if [ -z "$SKIP_INFO" ]; then
    step 40 $MPIRUN python3 -m mpilocal info --all | tee $OUT/info-sysmpi.txt
    aware; step 40 $MPIRUN python3 -m mpilocal info | tee $OUT/info-cuda-aware.txt
  fi
  aware
  step ${SMOKE_TIMEOUT:-80} $MPIRUN python3 scripts/gpu_smoke.py ${TRANSPORTS//,/ }  # all three under the CUDA-aware MPI
  for T in ${TRANSPORTS//,/ }; do
    if [ "$T" = cuda_mpi ]; then aware; else sysmpi; fi
    step ${SUITE_TIMEOUT:-150} env MPILOCAL_TEST_DEVICE=cuda MPILOCAL_TRANSPORT=$T $MPIRUN python3 -m pytest --with-mpi -q \
      -p no:cacheprovider --timeout 100 tests --ignore=tests/test_failure.py -rs 2>&1 | tee $OUT/suite-$N-$T.log | tail -25
  done
  sysmpi
elif [ "$MODE" = bench ]; then
  sysmpi
  step 90 $MPIRUN python3 scripts/bench_local_map.py --device cuda --torch --out $OUT/local_map.md
  step 260 $MPIRUN python3 scripts/bench_collectives.py --device cuda --transports nccl,staged --naive-staging \
      --staged-max $((512<<20)) --target-time 0.06 --torch --json $OUT/bench_sys.json -v
  aware
  step 130 $MPIRUN python3 scripts/bench_collectives.py --device cuda --transports cuda_mpi --tag @cuda-aware-ompi \
      --target-time 0.06 --json $OUT/bench_aware.json -v
  sysmpi
  step 30 python3 scripts/bench_collectives.py --merge $OUT/bench_sys.json $OUT/bench_aware.json \
      --title "collectives, $N x GPU" --out $OUT/collectives.md --png $OUT/collectives.png > /dev/null
fi
