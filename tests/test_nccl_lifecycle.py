"""NCCL communicators across many meshes (GPU only; skips elsewhere).

Meshes come and go (``close()``, ``init_device_mesh`` releasing dropped ones). Creating and destroying
one NCCL communicator per mesh communicator hung NCCL 2.28 on 2xH200 after a few dozen cycles (both
ranks waiting for their proxy thread in the connection setup of a fresh communicator;
``benchmarks/results/2026-11-29-h200x2-gpu-tests.md``). The nccl transport keeps one communicator per
set of members and device (``mpilocal/transport/nccl.py``): these tests hold that it is reused, that
results stay right through hundreds of meshes, and that the count of communicators stays bounded.
"""

import itertools

import numpy as np
import pytest
from conftest import RANK, W, assert_all

from mpilocal import gpu

cp = gpu.cupy_or_none()


def _nccl_works():
    if cp is None:
        return False
    from mpilocal.transport import detect

    return detect.nccl_version()[0] is not None


pytestmark = [pytest.mark.mpi, pytest.mark.skipif(not _nccl_works(), reason="needs CuPy, a GPU and NCCL")]



def _layouts():
    perms = [np.array(p) for p in itertools.permutations(range(W))]
    out = list(perms)
    out += [p.reshape(W, 1) for p in perms] + [p.reshape(1, W) for p in perms]
    if W == 4:
        out += [p.reshape(2, 2) for p in perms]
    return out


@pytest.mark.timeout(300)
def test_many_meshes_reuse_nccl_communicators():
    from mpilocal import DeviceMesh
    from mpilocal.transport import group_for, nccl, select

    t = select.gpu_transport("nccl")
    layouts = _layouts()
    bad = []
    for i in range(120):
        arr = layouts[i % len(layouts)]
        mesh = DeviceMesh("cuda", arr)
        for d in range(arr.ndim):
            g = group_for(mesh.get_group(d))
            x = cp.full(3, float(RANK), cp.float64)
            out = cp.empty(3 * g.size, cp.float64)
            t.allgatherv(x, out, [3] * g.size, g)
            members = np.moveaxis(arr, d, -1).reshape(-1, arr.shape[d])
            want = next(row for row in members if RANK in row).repeat(3).astype(np.float64)
            if not np.array_equal(cp.asnumpy(out), want):
                bad.append((i, arr.tolist(), d, cp.asnumpy(out).tolist(), want.tolist()))
        mesh.close()
    assert_all(not bad, f"wrong all-gathers: {bad[:3]}")
    # one communicator per (members, device): at most the number of distinct ordered member tuples
    distinct = set()
    for arr in layouts:
        for d in range(arr.ndim):
            for row in np.moveaxis(arr, d, -1).reshape(-1, arr.shape[d]):
                if RANK in row:
                    distinct.add(tuple(int(r) for r in row))
    mine = {k for k in nccl._BY_MEMBERS if k[1] == cp.cuda.Device().id}
    assert_all(len(mine) <= len(distinct) + 2,  # + the world and its reverse from other tests' meshes
               f"{len(mine)} NCCL communicators for {len(distinct)} member sets")


def test_same_members_share_one_communicator():
    from mpilocal import DeviceMesh
    from mpilocal.transport import group_for, nccl, select

    t = select.gpu_transport("nccl")
    a = DeviceMesh("cuda", np.arange(W))
    ga = group_for(a.get_group(0))
    x = cp.ones(2, cp.float32)
    t.allreduce(x, cp.empty_like(x), "sum", ga)
    first = ga.cache["nccl"]
    a.close()
    b = DeviceMesh("cuda", np.arange(W))  # a new communicator over the same members
    gb = group_for(b.get_group(0))
    out = cp.empty_like(x)
    t.allreduce(x * 2, out, "sum", gb)
    assert_all(gb.cache["nccl"] is first, "a new mesh over the same members made a second NCCL communicator")
    assert_all(np.array_equal(cp.asnumpy(out), np.full(2, 2.0 * W, np.float32)), f"allreduce gave {out}")
    b.close()
