# bench_halo with neighbors.SELF_COPY_BYTES set (argv[1]); the rest of argv goes to bench_halo.
# (Rounds 22-23 of benchmarks/results/2026-11-30c-h200x2-halos.md; run from the repository root. The constant was
# removed after them: every interior is now copied inside the NCCL group.)
import sys
sys.path.insert(0, "scripts")
from mpilocal import neighbors
neighbors.SELF_COPY_BYTES = int(sys.argv[1])
import bench_halo
sys.exit(bench_halo.main(sys.argv[2:]))
