"""Checkpoint bandwidth: mpilocal.checkpoint save/load side by side with plain NumPy file I/O of the
same bytes by the same ranks, in one run (and torch.distributed.checkpoint with --torch).

    mpiexec -n 2 python scripts/bench_checkpoint.py --per-rank 64M,256M,1G --repeat 5 --dir /work
    mpiexec -n 2 python scripts/bench_checkpoint.py --device cuda --per-rank 512M,1G,2G,4G --torch --dir /scratch/x

Per size (float32, one DTensor sharded over dim 0 of a 1-D mesh of all ranks; every rank holds
``--per-rank`` bytes, or ``--sizes`` bytes in total), interleaved per repeat so that each figure
and its baseline see the same machine (the order alternates between repeats):

* ``raw write``: every rank writes its bytes with ``np.ndarray.tofile`` + ``fsync`` into its own
  file, all at once; aggregate bandwidth = total bytes / the slowest rank's time;
* ``save``: ``mpilocal.checkpoint.save`` of the DTensor (chunks, crc32, fsync, manifest, atomic
  rename), aggregate likewise;
* ``raw read`` / ``load``: ``np.fromfile`` of the raw files / ``mpilocal.checkpoint.load`` into the
  same layout, each after evicting the files from the page cache (``posix_fadvise(DONTNEED)``);
* ``crc32``: every rank computes the crc32 of its bytes with the checkpoint's crc32 function at
  once: the CPU cost that save and load add to the raw I/O (overlapped with it on a pool of threads);
* ``async``: the blocking part of ``async_save`` (the host copies);
* ``torch save`` / ``torch load`` (``--torch``): ``torch.distributed.checkpoint`` of a torch DTensor
  of the same size and layout (gloo on cpu, ``cpu:gloo,cuda:nccl`` on cuda), in the same repeats.

Every table cell gives the best and the median of ``--repeat`` runs (``best / median``); the ratios
are the medians of the per-repeat ratios save/raw write and load/raw read (and best/best).

Never hangs: every rank takes the same branches (torch/CuPy availability is agreed), every step's
errors are gathered so that any rank's error is raised on all ranks, torch.distributed gets its
rendezvous from MPI (MASTER_ADDR=127.0.0.1 on one host, a port chosen by rank 0 and broadcast) and
``--timeout``, and a watchdog ends the job (``MPI_Abort``, with every thread's stack) when one step
runs longer than ``--timeout`` seconds. ``--profile`` prints a cProfile of one save and one load per
rank.
"""

from __future__ import annotations

import argparse
import cProfile
import faulthandler
import io
import os
import pstats
import shutil
import socket
import statistics
import sys
import threading
import time
import traceback

import numpy as np
from mpi4py import MPI

COMM = MPI.COMM_WORLD
N, RANK = COMM.Get_size(), COMM.Get_rank()
G = 1e9


# -- no hangs: agreed steps and a watchdog ----------------------------------------------------------
class Watchdog:
    """Ends the job when one step runs longer than ``timeout`` seconds (every rank has its own)."""

    def __init__(self, timeout: float):
        self.timeout, self.step, self.t0 = timeout, None, None
        self.lock = threading.Lock()
        if timeout and timeout > 0:
            threading.Thread(target=self._run, daemon=True, name="bench-watchdog").start()

    def begin(self, step: str):
        with self.lock:
            self.step, self.t0 = step, time.monotonic()
        if self.timeout and self.timeout > 0:
            # the backstop that needs no GIL (native code may hold it): stacks, then _exit; the launcher
            # then ends the other ranks
            faulthandler.dump_traceback_later(self.timeout + 15, exit=True)

    def end(self):
        with self.lock:
            self.step = None
        if self.timeout and self.timeout > 0:
            faulthandler.cancel_dump_traceback_later()

    def _run(self):
        while True:
            time.sleep(0.5)
            with self.lock:
                late = self.step is not None and time.monotonic() - self.t0 > self.timeout
                step = self.step
            if late:
                sys.stderr.write(f"[rank {RANK}] bench_checkpoint: step {step!r} ran longer than --timeout "
                                 f"{self.timeout:g} s; ending the job. Stacks of rank {RANK}:\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(all_threads=True)
                _end_job(124, f"bench_checkpoint: step {step!r} ran longer than --timeout {self.timeout:g} s")


WATCHDOG: Watchdog | None = None


def _end_job(code: int, where: str) -> None:
    """End the whole job with ``code`` through mpilocal's abort (the report read by the launcher, the
    other ranks told, MPICH's /dev/shm segment released: README, "No lost messages"); plain
    MPI_Abort where mpilocal cannot be imported. Never returns."""
    try:
        from mpilocal import deadline
    except BaseException:
        time.sleep(1.0)
        COMM.Abort(code)
        os._exit(code)
    deadline.abort(code, "", where)


class StepError(RuntimeError):
    pass


INJECT = None  # --inject raise|hang:STEP_PREFIX:RANK (tests the two guarantees below)


def step(name: str, fn, *args):
    """Run ``fn(*args)`` on every rank as one step: errors of any rank are raised on every rank (after
    an all-gather of the verdicts); the watchdog ends the job when the step does not finish (a rank
    that fails before a collective inside ``fn`` leaves the others waiting in it: torch's collectives
    then raise after ``--timeout`` themselves, MPI's and mpilocal's wait for the watchdog or
    ``MPILOCAL_TIMEOUT``)."""
    WATCHDOG.begin(name)
    err, out = None, None
    try:
        if INJECT and name.startswith(INJECT[1]) and RANK == INJECT[2]:
            if INJECT[0] == "hang":
                time.sleep(1e9)
            raise RuntimeError(f"injected failure in step {name!r} (--inject)")
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - agreed below
        err = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc(limit=8))
    verdicts = COMM.allgather(err)
    WATCHDOG.end()
    bad = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if bad:
        firsts = "\n".join(f"  rank {r}: {v.splitlines()[0]}" for r, v in bad)
        r, v = bad[0]
        raise StepError(f"step {name!r} failed on rank(s) {[b[0] for b in bad]}:\n{firsts}\n"
                        f"rank {r}'s traceback:\n{v.split(chr(10), 1)[1] if chr(10) in v else v}")
    return out


def agreed(flag: bool) -> bool:
    """True only when ``flag`` is true on every rank (so every rank takes the same branch)."""
    return bool(COMM.allreduce(int(bool(flag)), op=MPI.MIN))


# -- helpers ------------------------------------------------------------------------------------------
def parse_size(s: str) -> int:
    s = s.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def human(b):
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << k:
            return f"{b / (1 << k):g} {unit}"
    return f"{b} B"


def evict(paths):
    """Drop the files' clean pages from the page cache (after fsync), so the next read hits the device."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError):
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(path):
    out = []
    for root, _, names in os.walk(path):
        out += [os.path.join(root, n) for n in names]
    return out


def timed(name, fn):
    """Seconds from a common start to the slowest rank's end (one agreed step)."""
    def run():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    COMM.Barrier()
    dt = step(name, run)
    return COMM.allreduce(dt, op=MPI.MAX)


def raw_write(a, path):
    a.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _fs(path):
    """The filesystem type and device of ``path`` (from /proc/mounts; best effort)."""
    try:
        best = ("", "?", "?")
        with open("/proc/mounts") as fh:
            for line in fh:
                dev, mnt, typ = line.split()[:3]
                if os.path.realpath(path).startswith(mnt) and len(mnt) > len(best[0]):
                    best = (mnt, typ, dev)
        return f"{best[1]} on {best[2]}"
    except OSError:
        return "?"


# -- torch.distributed.checkpoint ---------------------------------------------------------------------
class Torch:
    """torch.distributed initialized from MPI: env rendezvous on 127.0.0.1 (one host; else rank 0's
    host name) and a port rank 0 picked, broadcast; the same device binding as mpilocal's."""

    def __init__(self, device: str, timeout: float):
        import datetime

        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.device = torch, dist, device
        hosts = COMM.allgather(socket.gethostname())
        local = COMM.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = local.Get_rank()
        local.Free()
        addr = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
        port = COMM.bcast(_free_port() if RANK == 0 else None, 0)

        def init():
            if dist.is_initialized():
                return
            os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(RANK), WORLD_SIZE=str(N),
                              LOCAL_RANK=str(self.local_rank))
            if device == "cuda":  # the GPU mpilocal binds this rank to (node-local rank, or MPILOCAL_GPU)
                from mpilocal.gpu import binding

                torch.cuda.set_device(binding(torch.cuda.device_count())[0])
            backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
            # torch's own collective timeout comes first (a rank waiting for a failed one raises, and the
            # step's verdicts carry the first error everywhere); the watchdog (timeout) is the backstop
            dist.init_process_group(backend, init_method="env://", rank=RANK, world_size=N,
                                    timeout=datetime.timedelta(seconds=max(5.0, 0.8 * timeout) if timeout > 0
                                                               else 1e7))

        step("torch.distributed init", init)

        def smoke():  # one collective on each backend, so that a broken one fails here, with a name
            t = torch.ones(1, device=device)
            dist.all_reduce(t)
            if int(t.item()) != N:
                raise RuntimeError(f"torch all_reduce gave {t.item()}, expected {N}")
            dist.barrier()

        step("torch.distributed smoke test", smoke)

    def make(self, rows_per_rank: int):
        from torch.distributed.device_mesh import init_device_mesh as t_mesh
        from torch.distributed.tensor import DTensor as TDT
        from torch.distributed.tensor import Shard as TShard

        torch = self.torch
        mesh = t_mesh(self.device, (N,))
        local = torch.ones((rows_per_rank, 1024), dtype=torch.float32, device=self.device)
        shape = (rows_per_rank * N, 1024)
        w = TDT.from_local(local, mesh, [TShard(0)], shape=shape, stride=(1024, 1))
        t = TDT.from_local(torch.empty_like(local), mesh, [TShard(0)], shape=shape, stride=(1024, 1))
        return w, t

    def save(self, w, path):
        import torch.distributed.checkpoint as tdcp

        tdcp.save({"w": w}, checkpoint_id=path)
        self.sync()

    def load(self, t, path):
        import torch.distributed.checkpoint as tdcp

        tdcp.load({"w": t}, checkpoint_id=path)
        self.sync()

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def close(self):
        if self.dist.is_initialized():
            step("torch.distributed destroy", self.dist.destroy_process_group)


# -- the measurements -----------------------------------------------------------------------------------
def bench(per_rank, d, repeat, device, torch_side):
    import mpilocal
    import mpilocal.checkpoint as dcp
    from mpilocal import Shard, init_device_mesh
    from mpilocal.checkpoint import _format

    mesh = init_device_mesh(device, (N,))
    xp = np
    if device == "cuda":
        import cupy as xp
    rows = per_rank // 4 // 1024
    total = rows * 1024 * 4 * N
    part = np.ones(rows * 1024, np.float32)          # the raw figures' bytes (host memory)
    raw = os.path.join(d, f"raw_{RANK}.bin")
    local = xp.ones((rows, 1024), np.float32)
    W = mpilocal.DTensor.from_local(local, mesh, [Shard(0)], shape=(rows * N, 1024))
    tmpl = {"w": mpilocal.DTensor.from_local(xp.empty_like(local), mesh, [Shard(0)], shape=W.shape)}
    path, tpath = os.path.join(d, "ck"), os.path.join(d, "torch_ck")
    crc_in = memoryview(part).cast("B")
    tw = tt = None
    if torch_side is not None:
        tw, tt = step("torch DTensors", torch_side.make, rows)
    keys = ["wraw", "save", "rraw", "load", "crc", "async"] + (["tsave", "tload"] if torch_side else [])
    t = {k: [] for k in keys}

    def evict_all():
        evict([raw])
        if RANK == 0:
            evict(files_under(path) + files_under(tpath))

    for i in range(repeat):
        h = f"{human(per_rank)}/rank #{i}"
        writes = [("wraw", lambda: raw_write(part, raw)), ("save", lambda: dcp.save({"w": W}, checkpoint_id=path))]
        reads = [("rraw", lambda: np.fromfile(raw, np.float32)), ("load", lambda: dcp.load(tmpl, checkpoint_id=path))]
        if torch_side is not None:
            if RANK == 0:
                shutil.rmtree(tpath, ignore_errors=True)
            COMM.Barrier()
            writes.append(("tsave", lambda: torch_side.save(tw, tpath)))
            reads.append(("tload", lambda: torch_side.load(tt, tpath)))
        if i % 2:
            writes.reverse()
            reads.reverse()
        for k, fn in writes:
            t[k].append(timed(f"{k} {h}", fn))
        step(f"evict {h}", evict_all)
        for k, fn in reads:
            t[k].append(timed(f"{k} {h}", fn))
            step(f"evict {h}", evict_all)
        t["crc"].append(timed(f"crc32 {h}", lambda: _format._crc(crc_in)))
        fut = []
        t["async"].append(timed(f"async_save {h}", lambda: fut.append(dcp.async_save({"w": W}, checkpoint_id=path))))
        step(f"async_save result {h}", lambda: fut[0].result())
        step(f"evict {h}", evict_all)
    step("check", lambda: _check(tmpl["w"], 1.0))

    def clean():
        if os.path.exists(raw):
            os.remove(raw)
        if RANK == 0:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(tpath, ignore_errors=True)
    step("clean", clean)
    return total, t


def _check(w, value):
    loc = w.to_local()
    loc = loc.get() if hasattr(loc, "get") else loc
    if not np.all(loc == value):
        raise RuntimeError("load did not give back the saved values")


def profile(per_rank, d, device):
    """cProfile of one save and one load (files evicted) per rank; rank 0 prints every rank's top."""
    import mpilocal
    import mpilocal.checkpoint as dcp
    from mpilocal import Shard, init_device_mesh

    mesh = init_device_mesh(device, (N,))
    xp = np
    if device == "cuda":
        import cupy as xp
    rows = per_rank // 4 // 1024
    local = xp.ones((rows, 1024), np.float32)
    W = mpilocal.DTensor.from_local(local, mesh, [Shard(0)], shape=(rows * N, 1024))
    tmpl = {"w": mpilocal.DTensor.from_local(xp.empty_like(local), mesh, [Shard(0)], shape=W.shape)}
    path = os.path.join(d, "ck")
    step("profile: first save", lambda: dcp.save({"w": W}, checkpoint_id=path))
    for what, fn in (("save", lambda: dcp.save({"w": W}, checkpoint_id=path)),
                     ("load", lambda: dcp.load(tmpl, checkpoint_id=path))):
        if RANK == 0:
            evict(files_under(path))
        COMM.Barrier()

        def run():
            pr = cProfile.Profile()
            t0 = time.perf_counter()
            pr.enable()
            fn()
            pr.disable()
            dt = time.perf_counter() - t0
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
            return dt, s.getvalue()
        dt, text = step(f"profile {what}", run)
        got = COMM.gather((dt, text), 0)
        if RANK == 0:
            for r, (dt, text) in enumerate(got):
                print(f"===== {what}, rank {r}: {dt:.3f} s ({per_rank * N / dt / G:.2f} GB/s aggregate)")
                print("\n".join(line for line in text.splitlines()[6:] if line.strip()), flush=True)
    if RANK == 0:
        shutil.rmtree(path, ignore_errors=True)


def cell(nbytes, secs):
    """``best / median`` bandwidth of a list of seconds."""
    return f"{nbytes / min(secs) / G:.2f} / {nbytes / statistics.median(secs) / G:.2f}"


def ratio(num, den):
    """median of per-repeat ratios (den time / num time), and best / best."""
    med = statistics.median(d / n for n, d in zip(num, den))
    return f"{100 * med:.0f}% ({100 * min(den) / min(num):.0f}%)"


def main():
    global WATCHDOG, INJECT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-rank", default=None, help="bytes per rank, comma-separated (K/M/G), e.g. 64M,256M,1G")
    ap.add_argument("--sizes", default=None, help="total bytes (all ranks), comma-separated; default 128M,512M")
    ap.add_argument("--dir", default=None, help="directory on the filesystem to measure (default: /tmp)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--torch", action="store_true", help="also torch.distributed.checkpoint (needs torch)")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds one step (one save, load, init, ...) may take before the job is ended (0: never)")
    ap.add_argument("--profile", action="store_true", help="cProfile one save and one load of the first size")
    ap.add_argument("--out", default=None, help="also write the table here (rank 0)")
    ap.add_argument("--inject", default=None, metavar="raise|hang:STEP_PREFIX:RANK",
                    help="testing: make one rank raise in, or hang in, the first step whose name starts with STEP_PREFIX")
    a = ap.parse_args()
    if a.inject:
        how, prefix, r = a.inject.split(":")
        INJECT = (how, prefix, int(r))
    WATCHDOG = Watchdog(a.timeout)
    if a.per_rank:
        per = [parse_size(x) for x in a.per_rank.split(",")]
    else:
        per = [parse_size(x) // N for x in (a.sizes or "128M,512M").split(",")]
    per = [max(4096, p - p % 4096) for p in per]
    base = a.dir or "/tmp"
    d = COMM.bcast(os.path.join(base, f"mpilocal-ckbench-{os.getpid()}") if RANK == 0 else None, 0)
    step("mkdir", lambda: os.makedirs(d, exist_ok=True) if RANK == 0 else None)

    def has(mod):
        try:
            __import__(mod)
            return True
        except Exception:  # noqa: BLE001 - a broken install counts as absent
            return False
    if a.device == "cuda" and not agreed(has("cupy")):
        raise StepError("--device cuda: CuPy is not importable on every rank")
    torch_side = None
    if a.torch:
        if agreed(has("torch.distributed.checkpoint")):
            torch_side = Torch(a.device, a.timeout)
        elif RANK == 0:
            print("--torch: torch.distributed.checkpoint is not importable on every rank; measuring mpilocal only",
                  file=sys.stderr, flush=True)
    from mpilocal.checkpoint import _format

    head = ["per rank", "total", "raw write", "save", "save/raw", "raw read", "load", "load/raw", "crc32 alone",
            "async blocking"]
    if torch_side is not None:
        head += ["torch save", "torch load", "save/torch", "load/torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if RANK == 0:
        print(f"{N} ranks, device {a.device}, dir {base} ({_fs(base)}), crc32 from {_format.CRC32_MODULE}, "
              f"{_format.IO_THREADS} I/O threads and {_format.READ_THREADS} reader(s) per rank, writeback {'early' if _format._SFR else 'at fsync'}, "
              f"{os.cpu_count()} CPUs, load average at the start {os.getloadavg()[0]:.1f}; cells: best / median "
              f"of {a.repeat} in GB/s (aggregate); ratios: median of per-repeat ratios (best/best)", flush=True)
        print("\n".join(lines), flush=True)
    try:
        if a.profile:
            profile(per[0], d, a.device)
        for p in per:
            total, t = bench(p, d, a.repeat, a.device, torch_side)
            row = [human(p), human(total), cell(total, t["wraw"]), cell(total, t["save"]), ratio(t["save"], t["wraw"]),
                   cell(total, t["rraw"]), cell(total, t["load"]), ratio(t["load"], t["rraw"]), cell(total, t["crc"]),
                   f"{1e3 * min(t['async']):.0f} / {1e3 * statistics.median(t['async']):.0f} ms"]
            if torch_side is not None:
                row += [cell(total, t["tsave"]), cell(total, t["tload"]), ratio(t["save"], t["tsave"]),
                        ratio(t["load"], t["tload"])]
            lines.append("| " + " | ".join(row) + " |")
            if RANK == 0:
                print(lines[-1], flush=True)
        if torch_side is not None:
            torch_side.close()
    finally:
        if RANK == 0:
            shutil.rmtree(d, ignore_errors=True)
    if RANK == 0:
        info = (f"{N} ranks, device {a.device}, dir {base} ({_fs(base)}), crc32 from {_format.CRC32_MODULE}, "
                f"{_format.IO_THREADS} I/O threads and {_format.READ_THREADS} reader(s) per rank, writeback {'early' if _format._SFR else 'at fsync'}, "
                f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f}; cells: best / median of "
                f"{a.repeat} in GB/s (aggregate); ratios: median of per-repeat ratios (best/best)")
        table = info + "\n\n" + "\n".join(lines)
        print("\n" + table, flush=True)
        if a.out:
            with open(a.out, "w") as fh:
                fh.write(table + "\n")


if __name__ == "__main__":
    try:
        main()
    except StepError as e:  # raised on every rank alike: report once, then every rank exits normally with 3
        if RANK == 0:
            print(f"bench_checkpoint: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.exit(3)
    except BaseException:  # anything else may be on this rank only: end the whole job, never wait
        traceback.print_exc()
        sys.stderr.flush()
        if N > 1:
            _end_job(4, f"bench_checkpoint: {traceback.format_exc().strip().splitlines()[-1]}")
        raise
