"""Checkpoint cases shared by tests/test_checkpoint.py (imported) and its mpiexec jobs (run).

    mpiexec -n 4 python checkpoint_job.py save DIR    save the reference state on a 2x2 (or 1-D) mesh
    mpiexec -n N python checkpoint_job.py load DIR    load it into every layout for N ranks, check bit-exact
    mpiexec -n 2 python checkpoint_job.py crash DIR   save v1, then kill -9 rank 1 in the middle of a large save

The reference arrays hold NaNs with payloads, -0.0, inf, wrapping int32 sums, int8 extremes, a
big-endian dtype, complex, an empty and a 0-d array, uneven shapes, and JSON values.
"""

import os
import signal
import sys

import numpy as np

from mpilocal import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
from mpilocal.layout import local_shape_and_offset, local_slices

QNAN1 = 0x7FF8_0000_DEAD_BEEF
QNAN2 = 0xFFF8_0000_0000_1234


def reference():
    """The global arrays (NumPy, seeded) and the JSON values."""
    rng = np.random.default_rng(1234)
    w = rng.standard_normal((7, 5))
    w.view(np.uint64)[0, 0] = QNAN1
    w.view(np.uint64)[0, 1] = QNAN2
    w[1, 0], w[1, 1], w[1, 2] = -0.0, np.inf, -np.inf
    e = rng.integers(-128, 128, (9, 3)).astype(np.int8)
    e[0, 0], e[-1, -1] = -128, 127
    m = rng.standard_normal((6, 4)).astype(">f8")
    m[0, 0], m[5, 3] = -0.0, np.nan
    g = rng.integers(-2**31, 2**31, (5, 3), dtype=np.int64).astype(np.int32)
    g[0, 0], g[0, 1] = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    arrays = {
        "model.w": w,                                              # float64 with NaN payloads, -0.0, inf
        "model.b": rng.standard_normal(5).astype(np.float32),     # uneven
        "model.e": e,                                              # int8 extremes
        "opt.m": m,                                                # big-endian
        "opt.g": g,                                                # saved as Partial(sum): wrapping int32 pieces
        "opt.h": rng.standard_normal((4, 6)),                      # saved as Partial(max)
        "c": (rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(np.complex64),
        "empty": np.zeros((0, 4)),
        "z": np.array(-0.0),
    }
    with np.errstate(over="ignore"):
        wrap = (np.arange(10, dtype=np.int64) * np.int64(2**62)).astype(">i8")  # wrapped, big-endian
    plain = {"plain.i": wrap, "plain.u": np.uint16(65535)}
    values = {"step": 12, "lr.0": 0.1, "lr.1": -0.0, "name": "run-1", "flag": True, "none": None}
    return arrays, plain, values


def device_arrays(xp):
    """The reference arrays a mesh of the array kind ``xp`` can hold (CuPy has no big-endian dtypes;
    those are covered on NumPy)."""
    arrays = reference()[0]
    return {k: a for k, a in arrays.items() if xp is np or a.dtype.isnative}


def save_placements(mesh_ndim):
    if mesh_ndim == 2:
        return {"model.w": [Shard(0), Shard(1)], "model.b": [Replicate(), Shard(0)], "model.e": [Shard(1), Shard(0)],
                "opt.m": [Shard(0), Shard(0)], "opt.g": [Partial(), Shard(0)], "opt.h": [Shard(1), Partial("max")],
                "c": [Replicate(), Replicate()], "empty": [Shard(0), Shard(1)], "z": [Replicate(), Replicate()]}
    return {"model.w": [Shard(1)], "model.b": [Shard(0)], "model.e": [Shard(0)], "opt.m": [Shard(0)],
            "opt.g": [Partial()], "opt.h": [Partial("max")], "c": [Replicate()], "empty": [Shard(0)],
            "z": [Replicate()]}


def on_device(a, xp):
    """Host array ``a`` as an array of kind ``xp``, bit for bit (cupy.asarray fills a 0-d array by value,
    with a memset when it == 0, so a 0-d -0.0 would arrive as +0.0; a 1-element copy keeps the bits)."""
    a = np.asarray(a)
    if xp is np:
        return a
    return xp.asarray(a.reshape(1)).reshape(()) if a.ndim == 0 else xp.asarray(a)


def _pieces(total, k, op):
    """k arrays whose reduction by op is exactly `total` (int sums wrap)."""
    if op == "max":
        return [total] + [total - 1.0 - i for i in range(k - 1)]
    rng = np.random.default_rng(99)
    rest = [rng.integers(-2**31, 2**31, total.shape, dtype=np.int64).astype(total.dtype) for _ in range(k - 1)]
    with np.errstate(over="ignore"):
        first = total - sum(rest, np.zeros_like(total)) if rest else total.copy()
    return [first.astype(total.dtype)] + rest


def make_dtensor(ref, mesh, pl, xp=np):
    """A DTensor of global value `ref` (Partial placements hold pieces that reduce to it)."""
    pl = list(pl)
    coord = mesh.get_coordinate()
    part = [i for i, p in enumerate(pl) if p.is_partial()]
    if not part:
        return distribute_tensor(on_device(ref, xp), mesh, pl, src_data_rank=None)
    shard_pl = [Replicate() if p.is_partial() else p for p in pl]
    k = int(np.prod([mesh.shape[i] for i in part]))
    idx = int(np.ravel_multi_index([coord[i] for i in part], [mesh.shape[i] for i in part]))
    piece = _pieces(ref, k, pl[part[0]].reduce_op)[idx]
    local = piece[local_slices(ref.shape, mesh.shape, shard_pl, coord)]
    return DTensor.from_local(on_device(np.ascontiguousarray(local), xp), mesh, pl, shape=ref.shape)


def nest(flat):
    """{"a.b": v} -> {"a": {"b": v}}; keys "x.0", "x.1" become lists."""
    out = {}
    for key, v in flat.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    def lists(d):
        if isinstance(d, dict):
            if d and all(k.isdigit() for k in d):
                return [lists(d[str(i)]) for i in range(len(d))]
            return {k: lists(v) for k, v in d.items()}
        return d
    return lists(out)


def saved_state(mesh, xp=np):
    _, plain, values = reference()
    arrays = device_arrays(xp)
    pls = save_placements(mesh.ndim)
    flat = {k: make_dtensor(a, mesh, pls[k], xp) for k, a in arrays.items()}
    flat.update({k: (on_device(v, xp) if isinstance(v, np.ndarray) and xp is not np and v.dtype.isnative else v)
                 for k, v in plain.items()})
    flat.update(values)
    return nest(flat)


OPTIONS = {
    1: [[Shard(0)], ["last"], [Replicate()], [Partial()]],
    2: [[Shard(0), Shard(1)], [Shard(1), "last"], [Replicate(), Shard(0)], [Shard(0), Shard(0)],
        [Partial(), Replicate()], [Replicate(), Replicate()]],
}


def load_layouts(n):
    """(mesh shape, variant) pairs for n ranks: 1-D and every 2-D factorization; one variant per
    placement option, so that every array meets every option."""
    shapes = [(n,)] + [(a, n // a) for a in range(1, n + 1) if n % a == 0]
    return [(s, v) for s in shapes for v in range(len(OPTIONS[len(s)]))]


def target_placements(key, ref, mesh_ndim, variant, i):
    opts = OPTIONS[mesh_ndim]
    pl = list(opts[(variant + i) % len(opts)])
    native = ref.dtype.isnative and ref.dtype.kind in "fiuc"
    out = []
    for p in pl:
        if p == "last":
            p = Shard(max(ref.ndim - 1, 0))
        if isinstance(p, Shard) and p.dim >= ref.ndim:
            p = Replicate() if ref.ndim == 0 else Shard(0)
        if isinstance(p, Partial) and not native:
            p = Replicate()
        out.append(p)
    return out


def template(mesh, variant, xp=np):
    """A state_dict of zeros laid out for `mesh` with placements chosen by `variant`."""
    _, plain, values = reference()
    arrays = device_arrays(xp)
    flat = {}
    for i, (k, a) in enumerate(arrays.items()):
        pl = target_placements(k, a, mesh.ndim, variant, i)
        shard_pl = [Replicate() if p.is_partial() else p for p in pl]
        coord = mesh.get_coordinate()
        lshape, _ = local_shape_and_offset(a.shape, mesh.shape, shard_pl, coord)
        zeros = np.zeros(lshape, a.dtype)
        flat[k] = DTensor.from_local(on_device(zeros, xp), mesh, pl, shape=a.shape)
    for k, v in plain.items():
        flat[k] = np.zeros_like(v) if isinstance(v, np.ndarray) else type(v)(0)
    flat.update({k: 0 for k in values})
    return nest(flat)


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.dtype.str, a.shape, a.reshape(-1).view(np.uint8).tobytes()


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a


def check_loaded(sd, mesh, xp=np):
    """Problems (strings) of a loaded template against the reference, on this rank; bit-exact."""
    _, plain, values = reference()
    arrays = device_arrays(xp)
    flat = {}

    def walk(o, prefix):
        items = o.items() if isinstance(o, dict) else enumerate(o)
        for k, v in items:
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (dict, list)):
                walk(v, key)
            else:
                flat[key] = v
    walk(sd, "")
    bad = []
    for k, ref in arrays.items():
        dt = flat[k]
        if not isinstance(dt, DTensor) or dt.device_mesh != mesh or tuple(dt.shape) != ref.shape:
            bad.append(f"{k}: not a DTensor of shape {ref.shape} on the template's mesh: {dt!r}")
            continue
        pl = dt.placements
        coord = mesh.get_coordinate()
        shard_pl = [Replicate() if p.is_partial() else p for p in pl]
        got = _host(dt.to_local())
        want = ref[local_slices(ref.shape, mesh.shape, shard_pl, coord)]
        # a Partial target holds the value at coordinate 0 of its Partial mesh dims, the reduction's
        # identity elsewhere (-0.0 for float sums: x + -0.0 == x bit for bit)
        off_origin = [p for i, p in enumerate(pl) if p.is_partial() and coord[i] != 0]
        if any(p.reduce_op == "sum" for p in off_origin):
            want = np.full_like(want, -0.0 if want.dtype.kind in "fc" else 0)
        if _bits(got) != _bits(want):
            bad.append(f"{k} {list(pl)}: local shard {got!r}, expected {want!r}")
        if any(p.is_partial() for p in pl) and mesh.device_type == "cpu":
            full = _host(dt.full_tensor())  # the reduction gives the saved array back (on the host: NaN
            if _bits(full) != _bits(ref):   # payloads kept; GPUs return canonical NaNs from arithmetic)
                bad.append(f"{k} {list(pl)}: full_tensor {full!r} != {ref!r}")
    for k, ref in plain.items():
        got = flat[k]
        if type(got) is not type(ref) and not (isinstance(ref, np.ndarray) and isinstance(_host(got), np.ndarray)):
            bad.append(f"{k}: type {type(got).__name__} != {type(ref).__name__}")
        elif _bits(np.asarray(_host(got))) != _bits(np.asarray(ref)):
            bad.append(f"{k}: {got!r} != {ref!r}")
    for k, ref in values.items():
        got = flat[k]
        if type(got) is not type(ref) or repr(got) != repr(ref):
            bad.append(f"{k}: {got!r} != {ref!r}")
    return bad


def main():
    import mpilocal.checkpoint as dcp
    from mpi4py import MPI

    cmd, path = sys.argv[1], sys.argv[2]
    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()
    if cmd == "save":
        mesh = init_device_mesh("cpu", (2, n // 2) if n % 2 == 0 and n > 2 else (n,))
        dcp.save(saved_state(mesh), checkpoint_id=path)
        print(f"SAVED {n}", flush=True)
    elif cmd == "load":
        bad = []
        for shape, v in load_layouts(n):
            mesh = init_device_mesh("cpu", shape)
            sd = template(mesh, v)
            dcp.load(sd, checkpoint_id=path)
            bad += [f"mesh {shape} variant {v}: {b}" for b in check_loaded(sd, mesh)]
        allbad = comm.allgather(bad)
        if any(allbad):
            print("MISMATCH", [b for r in allbad for b in r][:10], flush=True)
            sys.exit(1)
        if rank == 0:
            print(f"LOADED OK at {n} ranks, {len(load_layouts(n))} layouts", flush=True)
    elif cmd == "crash":
        from mpilocal.checkpoint import _format
        from shm_names import print_segments

        mesh = init_device_mesh("cpu", (n,))
        small = {"w": distribute_tensor(np.arange(12.0).reshape(4, 3), mesh, [Shard(0)], src_data_rank=None),
                 "step": 1}
        dcp.save(small, checkpoint_id=path)
        big = {"w": distribute_tensor(np.ones((n * 1024, 8192)), mesh, [Shard(0)], src_data_rank=None), "step": 2}
        if rank == 1:
            def kill(path_, offset, nbytes):
                if offset >= (16 << 20):   # in the middle of this rank's 64 MiB
                    print_segments()  # the test removes them: kill -9 leaves MPICH's behind
                    print("KILLING rank 1", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            _format.fault_hook = kill
        dcp.save(big, checkpoint_id=path)
        print("UNREACHABLE", flush=True)
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
