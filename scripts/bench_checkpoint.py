"""Checkpoint bandwidth: mpilocal.checkpoint save/load against the machine's own sequential file
bandwidth on the same filesystem, in the same run (and torch.distributed.checkpoint with --torch).

    mpiexec -n 2 python scripts/bench_checkpoint.py --sizes 256M,512M --dir /tmp/ckbench
    mpiexec -n 2 python scripts/bench_checkpoint.py --device cuda --sizes 1G,4G,8G --torch --dir /scratch/x

Per total size S (float32, one DTensor sharded over dim 0 of a 1-D mesh; every rank holds S/N bytes):

* ``raw write 1``: one process writes S bytes with ``np.ndarray.tofile`` + ``fsync``;
  ``raw write N``: every rank writes its S/N bytes that way at once (aggregate, slowest rank);
* ``raw read 1`` / ``raw read N``: ``np.fromfile`` of those files after evicting them from the page
  cache (``posix_fadvise(DONTNEED)``, so reads come from the device, not from memory);
* ``save``: ``mpilocal.checkpoint.save`` (chunks, crc32, fsync, manifest, atomic rename), aggregate
  S / time of the slowest rank; ``load``: ``mpilocal.checkpoint.load`` into the same layout after
  evicting the checkpoint's files; ``async``: the blocking part of ``async_save`` (host copies);
* ``torch save`` / ``torch load`` (``--torch``): ``torch.distributed.checkpoint`` of a DTensor of the
  same size and layout (gloo on cpu, nccl on cuda).

The measurements are interleaved per repeat (raw write N, save, raw write 1, evict, raw read N,
load, raw read 1, async save), so each figure and its baseline see the same machine. Bandwidths are
medians of ``--repeat`` runs; the percentages are the medians of the per-repeat ratios save/load
against the faster raw figure (1 or N processes) of the same repeat. Rank 0 prints a markdown table (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.checkpoint as dcp
from mpilocal import Shard, distribute_tensor, init_device_mesh

COMM = MPI.COMM_WORLD
N, RANK = COMM.Get_size(), COMM.Get_rank()


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
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn):
    """Seconds from a common start to the slowest rank's end."""
    COMM.Barrier()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return COMM.allreduce(dt, op=MPI.MAX)


def raw_write(a, path):
    a.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def bench(nbytes, d, repeat, device):
    """Per repeat, interleaved so that each figure and its baseline share the machine's state:
    raw write N, save, raw write 1; evict; raw read N, load, raw read 1; async save. Returns a dict of
    lists of seconds."""
    mesh = init_device_mesh(device, (N,))
    xp = np
    if device == "cuda":
        import cupy as xp
    rows = nbytes // 4 // 1024
    full = np.ones(nbytes // 4, np.float32) if RANK == 0 else None
    part = np.ones(nbytes // 4 // N, np.float32)
    p1, pn = os.path.join(d, "raw_one.bin"), os.path.join(d, f"raw_{RANK}.bin")
    local = xp.ones((rows // N, 1024), np.float32)
    W = mpilocal.DTensor.from_local(local, mesh, [Shard(0)], shape=(rows // N * N, 1024))
    tmpl = {"w": mpilocal.DTensor.from_local(xp.empty_like(local), mesh, [Shard(0)], shape=W.shape)}
    path = os.path.join(d, "ck")
    t = {k: [] for k in ("w1", "wn", "save", "r1", "rn", "load", "async")}
    for _ in range(repeat):
        t["wn"].append(timed(lambda: raw_write(part, pn)))
        t["save"].append(timed(lambda: dcp.save({"w": W}, checkpoint_id=path)))
        t["w1"].append(timed(lambda: raw_write(full, p1) if RANK == 0 else None))
        evict([p1, pn] + (ck_files(path) if RANK == 0 else []))
        COMM.Barrier()
        t["rn"].append(timed(lambda: np.fromfile(pn, np.float32)))
        t["load"].append(timed(lambda: dcp.load(tmpl, checkpoint_id=path)))
        t["r1"].append(timed(lambda: np.fromfile(p1, np.float32) if RANK == 0 else None))
        fut = []
        t["async"].append(timed(lambda: fut.append(dcp.async_save({"w": W}, checkpoint_id=path))))
        fut[0].result()
        evict([p1, pn])
    COMM.Barrier()
    for p in (p1, pn):
        if os.path.exists(p):
            os.remove(p)
    if RANK == 0:
        shutil.rmtree(path, ignore_errors=True)
    return t


def ck_files(path):
    return [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else []


def bench_torch(nbytes, d, repeat, device):
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as tdcp
    from torch.distributed.device_mesh import init_device_mesh as t_mesh
    from torch.distributed.tensor import DTensor as TDT
    from torch.distributed.tensor import Shard as TShard

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        port = COMM.bcast(_free_port() if RANK == 0 else None, 0)
        os.environ.setdefault("MASTER_PORT", str(port))
        if device == "cuda":
            local_rank = COMM.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()  # the GPU mpilocal binds, too
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=RANK, world_size=N)
    mesh = t_mesh(device, (N,))
    rows = nbytes // 4 // 1024
    local = torch.ones((rows // N, 1024), dtype=torch.float32, device=device)
    W = TDT.from_local(local, mesh, [TShard(0)], shape=(rows // N * N, 1024), stride=(1024, 1))
    path = os.path.join(d, "torch_ck")
    saves, loads = [], []
    for _ in range(repeat):
        if RANK == 0:
            shutil.rmtree(path, ignore_errors=True)
        COMM.Barrier()
        saves.append(timed(lambda: (tdcp.save({"w": W}, checkpoint_id=path), _sync(torch, device))))
        if RANK == 0:
            evict(ck_files(path))
        tmpl = {"w": TDT.from_local(torch.empty_like(local), mesh, [TShard(0)], shape=W.shape, stride=(1024, 1))}
        loads.append(timed(lambda: (tdcp.load(tmpl, checkpoint_id=path), _sync(torch, device))))
    COMM.Barrier()
    if RANK == 0:
        shutil.rmtree(path, ignore_errors=True)
    return [statistics.median(x) for x in (saves, loads)]


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


def _sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64M,256M", help="total checkpoint sizes, comma-separated (K/M/G)")
    ap.add_argument("--dir", default=None, help="directory on the filesystem to measure (default: a temp dir)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--torch", action="store_true", help="also torch.distributed.checkpoint (needs torch)")
    ap.add_argument("--out", default=None, help="write the markdown table here (rank 0)")
    a = ap.parse_args()
    base = a.dir or "/tmp"
    d = os.path.join(base, f"mpilocal-ckbench-{os.getpid() if RANK == 0 else 0}")
    d = COMM.bcast(d, 0)
    if RANK == 0:
        os.makedirs(d, exist_ok=True)
    COMM.Barrier()
    have_torch = False
    if a.torch:
        try:
            import torch  # noqa: F401
            import torch.distributed.checkpoint  # noqa: F401
            have_torch = True
        except ImportError:
            if RANK == 0:
                print("--torch: torch is not importable here; skipping torch.distributed.checkpoint", file=sys.stderr)
    G = 1e9
    head = ["size", "raw write 1", f"raw write {N}", "save", "save/raw", "raw read 1", f"raw read {N}", "load",
            "load/raw", "async blocking"]
    if have_torch:
        head += ["torch save", "torch load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    try:
        for s in [parse_size(x) for x in a.sizes.split(",")]:
            s -= s % (4 * 1024 * N)
            t = bench(s, d, a.repeat, a.device)
            med = {k: statistics.median(v) for k, v in t.items()}
            # ratio per repeat (against the faster raw figure of the same repeat), then the median
            save_pct = statistics.median(min(w1, wn) / sv for w1, wn, sv in zip(t["w1"], t["wn"], t["save"]))
            load_pct = statistics.median(min(r1, rn) / ld for r1, rn, ld in zip(t["r1"], t["rn"], t["load"]))
            row = [human(s), f"{s / med['w1'] / G:.2f} GB/s", f"{s / med['wn'] / G:.2f} GB/s",
                   f"{s / med['save'] / G:.2f} GB/s", f"{100 * save_pct:.0f}%", f"{s / med['r1'] / G:.2f} GB/s",
                   f"{s / med['rn'] / G:.2f} GB/s", f"{s / med['load'] / G:.2f} GB/s", f"{100 * load_pct:.0f}%",
                   f"{med['async'] * 1e3:.0f} ms"]
            if have_torch:
                ts, tl = bench_torch(s, d, a.repeat, a.device)
                row += [f"{s / ts / G:.2f} GB/s", f"{s / tl / G:.2f} GB/s"]
            lines.append("| " + " | ".join(row) + " |")
            if RANK == 0:
                print(lines[-1], flush=True)
    finally:
        COMM.Barrier()
        if RANK == 0:
            shutil.rmtree(d, ignore_errors=True)
    if RANK == 0:
        from mpilocal.checkpoint import _format

        info = (f"{N} ranks, device {a.device}, dir {base} ({_fs(base)}), crc32 from {_format.CRC32_MODULE}, "
                f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f}")
        table = info + "\n\n" + "\n".join(lines)
        print("\n" + table)
        if a.out:
            with open(a.out, "w") as fh:
                fh.write(table + "\n")


if __name__ == "__main__":
    main()
