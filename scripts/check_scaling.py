"""Check docs/scaling.md's model of metadata per call against CommDebugMode at P ranks.

    mpiexec -n P python scripts/check_scaling.py [--json FILE]

One program, the same at every P: DTensor.from_local without shape= and a local_map with a Shard
output (one shape agreement each), three funcol.all_reduce calls (one signature each), redistribute
S0->R and P->S0 (no metadata: their plans come from the placements). Under CommDebugMode every
rank counts what it sends; the ranks then compare (min and max over ranks) and rank 0 prints one
row, with the model's figures beside it:

* shape_agreement: 2 per program, B = (34 + 2 * mesh.ndim) * 8 bytes each, at any P; the vector a
  rank receives is B bytes too (docs/scaling.md);
* signature: one 48-byte vector per funcol call, at any P;
* nothing else: no metadata exchange whose size grows with P.

Exit status 1 (on every rank) when a figure differs from the model. ``scripts/check_scaling.sh``
runs it at 2..64 ranks (oversubscribed) and writes the table.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from mpi4py import MPI

import mpilocal
from mpilocal import CommDebugMode, DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
from mpilocal import functional as funcol
from mpilocal.layout import chunk_sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    P, r = comm.size, comm.rank
    mesh = init_device_mesh("cpu", (P,))
    B = (34 + 2 * mesh.ndim) * 8
    rows = list(chunk_sizes(2 * P + 1, P))
    x = np.ones((rows[r], 3))
    full = np.arange(4.0 * P * 3).reshape(4 * P, 3)
    s = distribute_tensor(full, mesh, [Shard(0)])
    p = DTensor.from_local(np.ones((4 * P, 3)), mesh, [Partial()], shape=(4 * P, 3))
    f = mpilocal.local_map(lambda a: a * 2, out_placements=[Shard(0)], in_placements=([Shard(0)],),
                           device_mesh=mesh)
    funcol.all_reduce(np.ones(8), "sum", mesh)  # the first call of a pattern takes the agreement
    with CommDebugMode() as mode:
        d = DTensor.from_local(x, mesh, [Shard(0)])
        y = f(d)
        for _ in range(3):
            funcol.all_reduce(np.ones(8), "sum", mesh)
        rs = s.redistribute(mesh, [Replicate()])
        ps = p.redistribute(mesh, [Shard(0)])
    got = {
        "shape_agreement_count": mode.get_metadata_counts().get("shape_agreement", 0),
        "shape_agreement_bytes": mode.get_metadata_bytes().get("shape_agreement", 0),
        "received_bytes": d._future.fut.result().nbytes,
        "signature_count": mode.get_metadata_counts().get("signature", 0),
        "signature_bytes": mode.get_metadata_bytes().get("signature", 0),
        "other_metadata_bytes": sum(v for k, v in mode.get_metadata_bytes().items()
                                    if k not in ("shape_agreement", "signature")),
        "data_collectives": mode.get_total_counts(),
    }
    want = {
        "shape_agreement_count": 2, "shape_agreement_bytes": 2 * B, "received_bytes": B,
        "signature_count": 3, "signature_bytes": 3 * 48, "other_metadata_bytes": 0,
        "data_collectives": 3 + 2,  # three all_reduce, the all_gather of S0->R, the reduce_scatter of P->S0
    }
    ok_values = (d.shape == (sum(rows), 3) and y.shape == (sum(rows), 3)
                 and np.array_equal(rs.to_local(), full)
                 and np.array_equal(ps.to_local(), P * np.ones((chunk_sizes(4 * P, P)[r], 3))))
    keys = sorted(got)
    mine = np.array([got[k] for k in keys], dtype=np.int64)
    lo, hi = np.empty_like(mine), np.empty_like(mine)
    comm.Allreduce(mine, lo, op=MPI.MIN)
    comm.Allreduce(mine, hi, op=MPI.MAX)
    ok = comm.allreduce(bool(ok_values) and all(got[k] == want[k] for k in keys), op=MPI.LAND)
    if r == 0:
        row = {"P": P, "B": B, "ok": ok, "values_ok": bool(ok_values),
               "min": dict(zip(keys, map(int, lo))), "max": dict(zip(keys, map(int, hi))), "model": want}
        print(json.dumps(row))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(row, fh)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
