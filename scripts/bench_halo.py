"""Halo exchange and a heat-equation step: mpilocal against hand-written mpi4py (and raw NCCL).

    mpiexec -n 2 python scripts/bench_halo.py [--device cpu|cuda] [--target-time 0.3] [--out table.md]

Part 1, halo exchange along dim 0 of a 1-D mesh (periodic, one message to each neighbour per
call; "bytes" is the size of one halo message, ``width * cols * itemsize``, float64). Raw
variants move the same bytes on preallocated buffers:

* ``raw Sendrecv``: two ``comm.Sendrecv`` calls (to the left, to the right) into a preallocated
  padded array (mpi4py buffer mode). With ``--device cuda`` it runs on the device buffers when the
  MPI is CUDA-aware, else as ``raw Sendrecv (staged)``: each halo copied to a preallocated host
  buffer, ``Sendrecv`` on the host, copied back (what a hand-written code does under such an MPI);
  ``raw Sendrecv (host buffers)`` is then the MPI part alone (the same bytes between host arrays);
* ``raw NCCL`` (``--device cuda`` with CuPy): ``cupy.cuda.nccl`` grouped send/recv of the same bytes,
  preallocated, with a stream synchronize per call (as every GPU variant here);
* ``raw + pad`` / ``raw NCCL + pad``: the raw exchange plus building a new padded array (``empty``
  + copying the interior): what an API that returns a new padded array must also do;
* ``mpilocal``: ``funcol.halo_exchange(X, 0, 0, width, "periodic")`` on a DTensor (new padded array;
  counted, watched, fingerprinted);
* ``mpilocal in place``: ``funcol.halo_update(P, mesh, 0, width, "periodic")`` on a persistent padded
  array (only the halo rows move, as in the raw columns; plus the public funcol argument check).

The summary columns compare with the raw exchange of mpilocal's own transport (``raw NCCL`` on
GPUs when present, else ``raw Sendrecv``).

Part 2, one explicit step of the 2-D heat equation on the mesh of ``heat2d.py`` (zero boundary):
``mpilocal.stencil`` (a new padded array per step, through ``local_map``), ``mpilocal.halo_update``
(persistent padded arrays, the interior updated with the array module, halos refreshed in place)
and a hand-written mpi4py version (persistent padded arrays, a Cartesian communicator, Sendrecv of
rows and of packed columns); with ``--device cuda`` that version sends device buffers under a
CUDA-aware MPI and stages every message through preallocated host buffers otherwise (labelled
"host-staged"), so it runs under any MPI.

Time: back-to-back iterations after warm-up, the slowest rank's mean, in ``--rounds`` interleaved
rounds of all variants of a case, the best round of each. Rank 0 prints markdown (with the load
average, where the OS reports one).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol
from mpilocal import DTensor, Shard, distribute_tensor, init_device_mesh
from mpilocal.layout import local_slices
from mpilocal.transport import detect

COMM = MPI.COMM_WORLD
RANK, W = COMM.Get_rank(), COMM.Get_size()


def timeit(fn, target, sync=lambda: None, max_iters=20000):
    """Mean seconds per call, the slowest rank's (calls issued by every rank alike)."""
    for _ in range(3):
        fn()
    sync()
    COMM.Barrier()
    t0 = time.perf_counter()
    fn()
    sync()
    one = COMM.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    iters = int(max(3, min(max_iters, target / max(one, 1e-7))))
    iters = COMM.bcast(iters, root=0)
    COMM.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    dt = (time.perf_counter() - t0) / iters
    return COMM.allreduce(dt, op=MPI.MAX)


def timeall(fns, args, sync=lambda: None):
    """{name: seconds per call}: the variants timed in ``args.rounds`` interleaved rounds, the best
    round of each (robust to a shared, loaded machine: every variant sees the same load)."""
    best = {}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t = timeit(fn, args.target_time / args.rounds, sync)
            best[name] = min(best.get(name, t), t)
    return best


def human(b):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024:
            return f"{b:g} {unit}"
        b /= 1024
    return f"{b:g} TiB"


def halo_cases(small_only):
    # (cols, width, rows per shard): small messages (latency) and large (bandwidth)
    cases = [(8, 1, 64), (8, 3, 64), (128, 1, 64), (1024, 2, 64)]
    if not small_only:
        cases += [(16384, 8, 64), (131072, 4, 16), (131072, 16, 32), (131072, 32, 64)]
    return cases


def _host_copies(cp):
    """(device -> host, host -> device) copies into preallocated buffers (tests/fake_cupy: by value)."""
    if getattr(cp, "_FAKE", False):
        def d2h(dev, host):
            host[...] = cp.asnumpy(dev)
    else:
        def d2h(dev, host):
            dev.get(out=host)

    def h2d(host, dev):
        dev.set(host)

    return d2h, h2d


def bench_halo(args, xp, cp):
    mesh = init_device_mesh(args.device, (W,))
    left, right = (RANK - 1) % W, (RANK + 1) % W
    sync = (lambda: cp.cuda.get_current_stream().synchronize()) if cp is not None else (lambda: None)
    nccl_comm = None
    if cp is not None:
        try:
            from cupy.cuda import nccl

            uid = COMM.bcast(nccl.get_unique_id() if RANK == 0 else None, root=0)
            nccl_comm = nccl.NcclCommunicator(W, uid, RANK)
        except Exception as e:  # noqa: BLE001
            if RANK == 0:
                print(f"(no raw NCCL column: {e})")
    cuda_aware = cp is None or detect.mpi_cuda_aware()[0]
    d2h, h2d = _host_copies(cp) if cp is not None else (None, None)
    rows = []
    for cols, w, n in halo_cases(args.small_only):
        X = DTensor.from_local(xp.ones((n, cols)), mesh, [Shard(0)], shape=(n * W, cols))
        x = X.to_local()
        pad = xp.empty((n + 2 * w, cols))
        pad[w:w + n] = x
        nbytes = w * cols * 8

        def sendrecv(x, pad):
            COMM.Sendrecv(x[:w], left, 11, pad[w + n:], right, 11)
            COMM.Sendrecv(x[n - w:], right, 12, pad[:w], left, 12)

        def with_pad(exchange):
            def run():
                p = xp.empty((n + 2 * w, cols))
                p[w:w + n] = x
                exchange(x, p)
            return run

        fns = {}
        if cp is None:
            fns["raw Sendrecv"] = lambda: sendrecv(x, pad)
            fns["raw + pad"] = with_pad(sendrecv)
        else:
            xh, padh = np.ones((n, cols)), np.empty((n + 2 * w, cols))
            fns["raw Sendrecv (host buffers)"] = lambda: sendrecv(xh, padh)
            if cuda_aware:
                fns["raw Sendrecv"] = lambda: (sync(), sendrecv(x, pad))
            else:
                hs = [np.empty((w, cols)) for _ in range(4)]

                def staged():
                    d2h(x[:w], hs[0])
                    d2h(x[n - w:], hs[1])
                    COMM.Sendrecv(hs[0], left, 11, hs[2], right, 11)
                    COMM.Sendrecv(hs[1], right, 12, hs[3], left, 12)
                    h2d(hs[2], pad[w + n:])
                    h2d(hs[3], pad[:w])

                fns["raw Sendrecv (staged)"] = staged
        if nccl_comm is not None:
            from cupy.cuda import nccl

            s = cp.cuda.get_current_stream().ptr

            def nccl_exchange(x, pad):
                nccl.groupStart()
                nccl_comm.send(x[:w].data.ptr, nbytes, nccl.NCCL_UINT8, left, s)
                nccl_comm.recv(pad[w + n:].data.ptr, nbytes, nccl.NCCL_UINT8, right, s)
                nccl_comm.send(x[n - w:].data.ptr, nbytes, nccl.NCCL_UINT8, right, s)
                nccl_comm.recv(pad[:w].data.ptr, nbytes, nccl.NCCL_UINT8, left, s)
                nccl.groupEnd()

            fns["raw NCCL"] = lambda: nccl_exchange(x, pad)
            fns["raw NCCL + pad"] = with_pad(nccl_exchange)
        fns["mpilocal"] = lambda: funcol.halo_exchange(X, 0, 0, w, "periodic")
        P = funcol.halo_exchange(X, 0, 0, w, "periodic")
        fns["mpilocal in place"] = lambda: funcol.halo_update(P, mesh, 0, w, "periodic")
        res = timeall(fns, args, sync)
        rows.append((cols, w, n, nbytes, res))
    return rows


def profile_small(args, xp, cp, calls=2000, top=25):
    """cProfile of ``calls`` back-to-back small halo calls (8 x 1, 64 rows) of each mpilocal variant:
    the functions (and CuPy/MPI/NCCL methods) by own time, rank 0's view. Profiling slows every
    Python call, so read the shares, not the totals."""
    import cProfile
    import io
    import pstats

    mesh = init_device_mesh(args.device, (W,))
    X = DTensor.from_local(xp.ones((64, 8)), mesh, [Shard(0)], shape=(64 * W, 8))
    P = funcol.halo_exchange(X, 0, 0, 1, "periodic")
    sync = (lambda: cp.cuda.get_current_stream().synchronize()) if cp is not None else (lambda: None)
    out = []
    for name, fn in (("halo_exchange", lambda: funcol.halo_exchange(X, 0, 0, 1, "periodic")),
                     ("halo_update", lambda: funcol.halo_update(P, mesh, 0, 1, "periodic"))):
        for _ in range(200):
            fn()
        sync()
        COMM.Barrier()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(calls):
            fn()
        sync()
        pr.disable()
        s = io.StringIO()
        st = pstats.Stats(pr, stream=s).strip_dirs()
        st.sort_stats("tottime").print_stats(top)
        out.append(f"\n### profile: {name}, 64 B halo, {calls} calls ({st.total_calls / calls:.0f} function calls "
                   f"per call)\n\n```\n" + "\n".join(l for l in s.getvalue().splitlines() if l.strip()) + "\n```")
    return "\n".join(out)


def per_call(args, reps=100, calls=100):
    """The per-call cost of each neighbour collective without its data exchange: the host
    transport's ``sendrecv`` replaced by a no-op (this mode only), so what is timed is mpilocal's
    own work per call (checks, plans, accounting, the signature reduction where there is one); and
    the Python function calls per call (cProfile). 64 x 8 float64 per rank, width 1, periodic.
    Best of ``reps`` x ``calls`` calls, the slowest rank's."""
    import cProfile
    import pstats

    from mpilocal.transport.host import HostTransport

    HostTransport.sendrecv = lambda self, sends, recvs, group: None
    mesh = init_device_mesh("cpu", (W,))
    X = DTensor.from_local(np.ones((64, 8)), mesh, [Shard(0)], shape=(64 * W, 8))
    x = X.to_local()
    P = funcol.halo_exchange(X, 0, 0, 1, "periodic")
    perm = [(i, (i + 1) % W) for i in range(W)]
    cases = {
        "halo_exchange(DTensor)": lambda: funcol.halo_exchange(X, 0, 0, 1, "periodic"),
        "halo_exchange(local array)": lambda: funcol.halo_exchange(x, mesh, 0, 1, "periodic"),
        "halo_update": lambda: funcol.halo_update(P, mesh, 0, 1, "periodic"),
        "permute": lambda: funcol.permute(x, perm, mesh),
        "shift": lambda: funcol.shift(x, 1, mesh),
        "send_recv": lambda: funcol.send_recv(x, (RANK + 1) % W, (RANK - 1) % W, mesh),
    }
    rows = []
    for name, f in cases.items():
        for _ in range(500):
            f()
        best = 1e9
        for _ in range(reps):
            COMM.Barrier()
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            best = min(best, (time.perf_counter() - t0) / calls)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(100):
            f()
        pr.disable()
        rows.append((name, COMM.allreduce(best, op=MPI.MAX), pstats.Stats(pr).total_calls / 100 - 1))
    return rows


def heat_mesh(n):
    p0 = int(math.isqrt(n))
    while n % p0:
        p0 -= 1
    return (n // p0, p0)


def bench_heat(args, xp, cp):
    """{variant: seconds per step} per grid size; the hand-written variant's label says how it moves
    device data (CUDA-aware MPI or host-staged)."""
    p0 = heat_mesh(W)
    meshes = [p0] + ([p0[::-1]] if p0[::-1] != p0 else [])  # (W, 1) and (1, W): row halos, then column halos
    sync = (lambda: cp.cuda.get_current_stream().synchronize()) if cp is not None else (lambda: None)
    staged = cp is not None and not detect.mpi_cuda_aware()[0]
    hand_name = "hand-written mpi4py" + ("" if cp is None else " (host-staged)" if staged else " (CUDA-aware)")
    d2h, h2d = _host_copies(cp) if staged else (None, None)
    nu = 0.2
    out = []
    for N, p in [(N, p) for p in meshes for N in args.heat_sizes]:
        mesh = init_device_mesh(args.device, p)
        u0 = np.random.default_rng(0).random((N, N))
        step = mpilocal.stencil(lambda u: u[1:-1, 1:-1] + nu * (u[2:, 1:-1] + u[:-2, 1:-1] + u[1:-1, 2:]
                                                                + u[1:-1, :-2] - 4 * u[1:-1, 1:-1]), boundary=0.0)
        U0 = distribute_tensor(xp.asarray(u0), mesh, [Shard(0), Shard(1)])
        state = {"U": U0}

        def ml():
            state["U"] = step(state["U"])

        # mpilocal in place: persistent padded arrays, halos refreshed by halo_update along each mesh dim
        pads = [funcol.halo_exchange(U0, (0, 1), (0, 1), 1, 0.0)]
        pads.append(xp.zeros_like(pads[0]))

        def upd():
            a, b = pads
            b[1:-1, 1:-1] = a[1:-1, 1:-1] + nu * (a[2:, 1:-1] + a[:-2, 1:-1] + a[1:-1, 2:] + a[1:-1, :-2]
                                                  - 4 * a[1:-1, 1:-1])
            funcol.halo_update(b, (mesh, 0), 0, 1, 0.0)
            funcol.halo_update(b, (mesh, 1), 1, 1, 0.0)
            pads.reverse()

        # hand-written: Cartesian communicator, persistent padded arrays, Sendrecv rows and packed columns
        cart = COMM.Create_cart(p, periods=[False, False])
        c = cart.Get_coords(cart.Get_rank())
        (up, down), (lf, rt) = cart.Shift(0, 1), cart.Shift(1, 1)
        s0 = [N // p[0] + (i < N % p[0]) for i in range(p[0])]
        s1 = [N // p[1] + (i < N % p[1]) for i in range(p[1])]
        n0, n1 = s0[c[0]], s1[c[1]]
        o0, o1 = sum(s0[:c[0]]), sum(s1[:c[1]])
        a = xp.zeros((n0 + 2, n1 + 2))
        a[1:-1, 1:-1] = xp.asarray(u0[o0:o0 + n0, o1:o1 + n1])
        b = xp.zeros_like(a)
        sc, rc = xp.empty(n0 + 2), xp.empty(n0 + 2)
        if staged:  # host buffers: a row each way, a column each way
            hrs, hrr, hcs, hcr = np.empty(n1 + 2), np.empty(n1 + 2), np.empty(n0 + 2), np.empty(n0 + 2)

            def rows(send, dst, tag, recv, src):
                d2h(send, hrs)
                cart.Sendrecv(hrs, dst, tag, hrr, src, tag)
                if src != MPI.PROC_NULL:
                    h2d(hrr, recv)

            def columns(dst, tag, src):
                d2h(sc, hcs)
                cart.Sendrecv(hcs, dst, tag, hcr, src, tag)
                if src != MPI.PROC_NULL:
                    h2d(hcr, rc)
        else:
            def rows(send, dst, tag, recv, src):
                cart.Sendrecv(send, dst, tag, recv, src, tag)

            def columns(dst, tag, src):
                cart.Sendrecv(sc, dst, tag, rc, src, tag)

        def hand():
            nonlocal a, b
            sync()
            rows(a[1], up, 1, a[-1], down)
            rows(a[-2], down, 2, a[0], up)
            sc[...] = a[:, 1]
            columns(lf, 3, rt)
            if rt != MPI.PROC_NULL:
                a[:, -1] = rc
            sc[...] = a[:, -2]
            columns(rt, 4, lf)
            if lf != MPI.PROC_NULL:
                a[:, 0] = rc
            b[1:-1, 1:-1] = a[1:-1, 1:-1] + nu * (a[2:, 1:-1] + a[:-2, 1:-1] + a[1:-1, 2:] + a[1:-1, :-2]
                                                  - 4 * a[1:-1, 1:-1])
            a, b = b, a

        # the three give the same field: 3 steps each from u0, against NumPy on the whole grid
        ref = u0.copy()
        for _ in range(3):
            e = np.pad(ref, 1)
            ref = e[1:-1, 1:-1] + nu * (e[2:, 1:-1] + e[:-2, 1:-1] + e[1:-1, 2:] + e[1:-1, :-2] - 4 * e[1:-1, 1:-1])
            ml(), upd(), hand()
        sl = local_slices((N, N), p, [Shard(0), Shard(1)], tuple(mesh.get_coordinate()))
        host = (lambda v: cp.asnumpy(v)) if cp is not None else (lambda v: v)
        ok = [np.allclose(host(state["U"].to_local()), ref[sl]), np.allclose(host(pads[0][1:-1, 1:-1]), ref[sl]),
              np.allclose(host(a[1:-1, 1:-1]), ref[o0:o0 + n0, o1:o1 + n1])]
        ok = np.array(ok, dtype=np.int64)
        COMM.Allreduce(MPI.IN_PLACE, ok, op=MPI.MIN)
        if not ok.all():
            raise RuntimeError(f"heat {N}: a variant differs from NumPy after 3 steps "
                               f"(stencil, halo_update, hand-written: {ok.tolist()})")
        res = timeall({"mpilocal.stencil": ml, "mpilocal halo_update": upd, hand_name: hand}, args, sync)
        cart.Free()
        out.append((N, p, res, hand_name))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--target-time", type=float, default=0.3)
    ap.add_argument("--small-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best of each variant")
    ap.add_argument("--heat-sizes", type=int, nargs="*", default=[128, 1024])
    ap.add_argument("--out", default=None)
    ap.add_argument("--per-call", action="store_true",
                    help="only: each neighbour collective's own per-call cost with the data exchange a no-op (CPU)")
    ap.add_argument("--profile", action="store_true",
                    help="also print where the time of a small halo call goes (cProfile, rank 0, by own time)")
    args = ap.parse_args(argv)
    if args.per_call:
        rows = per_call(args)
        if RANK == 0:
            try:
                load = "load average %.2f %.2f %.2f" % os.getloadavg()
            except OSError:
                load = "load average unknown"
            print(f"- {W} ranks, {detect.mpi_library_name()}, {platform.node()}, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {load} (at the end); host transport's "
                  f"sendrecv a no-op\n\n| call | µs per call (no data exchange) | Python function calls per call |\n"
                  "|---|---|---|\n" + "\n".join(f"| {n} | {1e6 * t:.2f} | {c:.0f} |" for n, t, c in rows))
        return 0
    cp = None
    xp = np
    if args.device == "cuda":
        import cupy as cp

        xp = cp
    halo = bench_halo(args, xp, cp)
    heat = bench_heat(args, xp, cp)
    prof = profile_small(args, xp, cp) if args.profile else ""
    if RANK:
        return 0
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    lines = [f"- {W} ranks, {detect.mpi_library_name()}, device {args.device}, "
             f"{platform.node()}, Python {platform.python_version()}, NumPy {np.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {load} (at the end)",
             f"- command: `mpiexec -n {W} python {' '.join(sys.argv)}`"
             f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})", ""]
    order = ("raw Sendrecv", "raw Sendrecv (staged)", "raw Sendrecv (host buffers)", "raw NCCL", "raw + pad",
             "raw NCCL + pad", "mpilocal", "mpilocal in place")
    cols = [c for c in order if any(c in r[4] for r in halo)]
    ref = next(c for c in ("raw NCCL", "raw Sendrecv", "raw Sendrecv (staged)") if c in cols)
    ref_pad = {"raw NCCL": "raw NCCL + pad", "raw Sendrecv": "raw + pad"}.get(ref)
    lines.append(f"Summary columns against `{ref}` (the raw exchange of mpilocal's transport where there is one); "
                 f"raw+pad: the same plus a new padded array.")
    lines.append("")
    lines.append("| halo message | cols x width (rows/shard) | " + " | ".join(f"{c} (µs)" for c in cols)
                 + " | mpilocal − raw (µs) | raw/mpilocal | (raw+pad)/mpilocal | in place − raw (µs) | raw/in place |")
    lines.append("|---" * (len(cols) + 7) + "|")
    for cl, w, n, nbytes, res in halo:
        raw = res[ref]
        ml, inplace = res["mpilocal"], res["mpilocal in place"]
        rp = res.get(ref_pad)
        lines.append(f"| {human(nbytes)} | {cl} x {w} ({n}) | "
                     + " | ".join(f"{1e6 * res[c]:.1f}" if c in res else "–" for c in cols)
                     + f" | {1e6 * (ml - raw):+.1f} | {100 * raw / ml:.0f}% | "
                     + (f"{100 * rp / ml:.0f}% |" if rp else "– |")
                     + f" {1e6 * (inplace - raw):+.1f} | {100 * raw / inplace:.0f}% |")
    hand_name = heat[0][3] if heat else "hand-written mpi4py"
    lines += ["", f"| heat step, grid | mesh | mpilocal.stencil (µs/step) | mpilocal halo_update (µs/step) | "
                  f"{hand_name} (µs/step) | stencil / hand | halo_update / hand |",
              "|---|---|---|---|---|---|---|"]
    for N, p, res, hand_name in heat:
        t_st, t_up, t_hand = res["mpilocal.stencil"], res["mpilocal halo_update"], res[hand_name]
        lines.append(f"| {N} x {N} | {p[0]} x {p[1]} | {1e6 * t_st:.1f} | {1e6 * t_up:.1f} | {1e6 * t_hand:.1f} | "
                     f"{t_st / t_hand:.2f}x | {t_up / t_hand:.2f}x |")
    text = "\n".join(lines) + prof
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
