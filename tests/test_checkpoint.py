"""Distributed checkpoints (issue 13): save on M ranks, load on N with any mesh/placements, atomic
commit, damage detection, errors on every rank, async save overlapped with training, read_array
without MPI, the ``ls`` CLI.

The reference state (tests/failure_cases/checkpoint_job.py) holds NaN payloads, -0.0, inf, wrapping
ints, a big-endian dtype, uneven, empty and 0-d arrays, Partial(sum/max) placements and JSON values;
every comparison is bit-exact. Within one rank count the tests save and load on several meshes;
across rank counts, the 1-rank pass runs mpiexec jobs (save at 4, load at 1, 2, 3), and a fixed
directory written by the 4-rank pass is loaded by the other passes when present.
"""

import errno
import json
import os
import shutil
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import RANK, W as N, WORLD as COMM, DEVICE, Check, assert_all, to_host, xp, raises_all
import mpilocal.functional as funcol
from mpilocal import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
import mpilocal.checkpoint as dcp
from mpilocal.checkpoint import CheckpointError, _format
from mpilocal.checkpoint import _dist as dcp_dist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "failure_cases"))
import checkpoint_job as cj  # noqa: E402

FIXED = Path(os.environ.get("MPILOCAL_TEST_CKPT_DIR", Path(tempfile.gettempdir()) / f"mpilocal-ckpt-tests-{os.getuid()}"))


@pytest.fixture
def ckdir():
    """A fresh directory shared by all ranks (made by rank 0), removed after the test."""
    d = tempfile.mkdtemp(prefix="mpilocal-ckpt-") if RANK == 0 else None
    d = COMM.bcast(d, 0)
    yield Path(d)
    COMM.Barrier()
    if RANK == 0:
        shutil.rmtree(d, ignore_errors=True)


def removals_done():
    """Wait for rank 0's background deletion of replaced checkpoints (off the save's critical path)."""
    if RANK == 0:
        dcp_dist._wait_removals()
    COMM.Barrier()


def meshes(n):
    """1-D and 2-D meshes for n ranks."""
    return [(n,)] + [(a, n // a) for a in range(1, n + 1) if n % a == 0 and 1 < a < n] + ([(1, n)] if n > 1 else [])


def small_state(mesh, value=1.0):
    x = np.arange(30.0).reshape(6, 5) * value
    return {"w": distribute_tensor(xp.asarray(x), mesh, [Shard(0)] + [Replicate()] * (mesh.ndim - 1),
                                   src_data_rank=None),
            "v": np.arange(4, dtype=np.int16), "step": int(value)}, x


# -- reshard matrix ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_shape", meshes(N), ids=str)
def test_reshard_within_rank_count(ckdir, save_shape):
    """Save on one mesh of this rank count, load into every layout (1-D and 2-D meshes, other placements)."""
    mesh = init_device_mesh(DEVICE, save_shape)
    dcp.save(cj.saved_state(mesh, xp), checkpoint_id=ckdir / "ck")
    check = Check()
    for shape, v in cj.load_layouts(N):
        m = init_device_mesh(DEVICE, shape)
        sd = cj.template(m, v, xp)
        dcp.load(sd, checkpoint_id=ckdir / "ck")
        for b in cj.check_loaded(sd, m, xp):
            check(False, f"save {save_shape} -> load {shape} v{v}: {b}")
    check.done()


def test_reshard_from_4_ranks_fixed_dir():
    """The 4-rank pass saves to a fixed directory on a 2x2 mesh; the other passes load it when present."""
    path = FIXED / f"reshard-2x2-{DEVICE}"
    if N == 4:
        if RANK == 0:
            FIXED.mkdir(parents=True, exist_ok=True)
        COMM.Barrier()
        dcp.save(cj.saved_state(init_device_mesh(DEVICE, (2, 2)), xp), checkpoint_id=path)
    elif not (path / "manifest.json").exists():
        pytest.skip(f"{path} is written by the 4-rank pass; run the suite at 4 ranks first (or see the mpiexec test)")
    check = Check()
    for shape, v in cj.load_layouts(N):
        m = init_device_mesh(DEVICE, shape)
        sd = cj.template(m, v, xp)
        dcp.load(sd, checkpoint_id=path)
        for b in cj.check_loaded(sd, m, xp):
            check(False, f"load {shape} v{v}: {b}")
    check.done()


def test_writers_and_reads(ckdir):
    """Each shard is written once, by the first rank of its replica group; replicated arrays once, by
    rank 0; a rank reads only the chunks overlapping its target shard."""
    if True:
        path = ckdir / "ck"
        mesh = init_device_mesh(DEVICE, (N,))
        x = np.arange(N * 3 * 4.0).reshape(N * 3, 4)
        sd = {"s": distribute_tensor(xp.asarray(x), mesh, [Shard(0)], src_data_rank=None),
              "r": distribute_tensor(xp.asarray(x), mesh, [Replicate()], src_data_rank=None),
              "a": np.ones(3)}
        dcp.save(sd, checkpoint_id=path)
        _, man = _format.read_manifest(path)
        e = man["entries"]
        check = Check()
        check(sorted(c["file"] for c in e["s"]["chunks"]) == [f"data_{r:05d}.bin" for r in range(N)], e["s"])
        check([c["file"] for c in e["r"]["chunks"]] == ["data_00000.bin"], e["r"])
        check([c["file"] for c in e["a"]["chunks"]] == ["data_00000.bin"], e["a"])
        check(sum(c["length"] for c in e["s"]["chunks"]) == x.nbytes, "shard bytes written once")
        read = []
        orig = _format.Files.fetch  # (every chunk read goes through it, sequential or parallel reads)

        def spy(self, key, ch, *rest):
            read.append((key, ch["offsets"], ch["length"]))
            return orig(self, key, ch, *rest)

        _format.Files.fetch = spy
        try:
            t = {"s": distribute_tensor(xp.zeros_like(xp.asarray(x)), mesh, [Shard(0)], src_data_rank=None)}
            dcp.load(t, checkpoint_id=path)
        finally:
            _format.Files.fetch = orig
        check(read == [("s", [3 * RANK, 0], 3 * 4 * 8)], f"rank {RANK} read {read}")
        check.close(t["s"].to_local(), x[3 * RANK:3 * RANK + 3], "loaded shard")
        check.done()


def test_chunks_cut_large_shards(monkeypatch, ckdir):
    """A shard larger than CHUNK_BYTES is cut along its first dim; a reader of a few rows reads only
    the chunks holding them."""
    monkeypatch.setattr(_format, "CHUNK_BYTES", 64)
    mesh = init_device_mesh(DEVICE, (N,))
    x = np.arange(20 * 3, dtype=np.float64).reshape(20, 3) - 7.5   # 24-byte rows: 2 rows per chunk
    dcp.save({"x": distribute_tensor(xp.asarray(x), mesh, [Replicate()], src_data_rank=None)}, checkpoint_id=ckdir / "c")
    _, man = _format.read_manifest(ckdir / "c")
    check = Check()
    check(len(man["entries"]["x"]["chunks"]) == 10, man["entries"]["x"]["chunks"])
    t = {"x": distribute_tensor(xp.zeros((20, 3)), mesh, [Shard(0)], src_data_rank=None)}
    dcp.load(t, checkpoint_id=ckdir / "c")
    check.close(t["x"].full_tensor(), x, "reloaded")
    check(np.array_equal(_format.read_array(ckdir / "c", "x"), x), "read_array")
    check.done()


def test_contiguous_boxes_tile_the_bytes():
    """The chunks of a shard, against NumPy: in order they tile its C-ordered bytes exactly, each box's
    bytes are that byte range, none exceeds the limit unless it is one element; rows larger than the
    limit are cut inside (piece boundaries not on row boundaries); 0-d is one box, empty none."""
    check = Check()
    rng = np.random.default_rng(11)
    cases = [((), 8, 64), ((0, 3), 8, 64), ((3, 0, 2), 4, 8), ((5,), 8, 1), ((7, 3), 8, 48), ((2, 5, 7), 8, 120),
             ((3, 4, 5, 6), 2, 50), ((4, 9), 1, 10 ** 6), ((2, 3, 4), 8, 7)]
    for shape, itemsize, limit in cases:
        x = rng.integers(0, 256, int(np.prod(shape)) * itemsize, dtype=np.uint8).view(f"V{itemsize}").reshape(shape)
        flat = x.reshape(-1).view(np.uint8)
        boxes = _format.contiguous_boxes(shape, itemsize, limit)
        end = 0
        for off, bshape, lo, hi in boxes:
            sl = tuple(slice(o, o + b) for o, b in zip(off, bshape))
            want = np.ascontiguousarray(x[sl]).reshape(-1).view(np.uint8)
            check(lo == end and np.array_equal(flat[lo:hi], want), f"{shape} limit {limit}: box {off} {bshape} "
                                                                    f"bytes {lo}..{hi}")
            check(hi - lo <= max(limit, itemsize), f"{shape} limit {limit}: box {bshape} has {hi - lo} bytes")
            end = hi
        check(end == x.nbytes, f"{shape} limit {limit}: boxes cover {end} of {x.nbytes} bytes")
        check(len(boxes) == (0 if x.size == 0 else len(boxes)) and (x.size > 0 or not boxes), f"{shape}: {boxes}")
    check(_format.contiguous_boxes((), 8, 64) == [((), (), 0, 8)], "0-d: one box")
    check([b[1] for b in _format.contiguous_boxes((2, 5, 7), 8, 120)] == [(1, 2, 7), (1, 2, 7), (1, 1, 7)] * 2,
          "280-byte rows cut into 2+2+1 sub-rows of 56 bytes")
    check.done()


def test_rows_larger_than_chunk_are_cut_inside(monkeypatch, ckdir):
    """A shard whose rows exceed CHUNK_BYTES is written as contiguous sub-row boxes of at most
    CHUNK_BYTES, back to back in each file, each holding exactly its box's bytes; loads into other
    layouts and read_array give the array back bit for bit (NaN payloads and -0.0 included)."""
    monkeypatch.setattr(_format, "CHUNK_BYTES", 120)
    mesh = init_device_mesh(DEVICE, (N,))
    x = np.random.default_rng(5).standard_normal((2 * N, 5, 7))  # 280-byte rows, 56-byte sub-rows
    x[0, 0, 0], x[-1, 4, 6], x[0, 2, 3] = -0.0, np.inf, np.float64(np.nan) * -1
    dcp.save({"x": distribute_tensor(xp.asarray(x), mesh, [Shard(0)], src_data_rank=None)}, checkpoint_id=ckdir / "c")
    _, man = _format.read_manifest(ckdir / "c")
    chunks = man["entries"]["x"]["chunks"]
    check = Check()
    check(sorted(tuple(c["shape"]) for c in chunks) == sorted([(1, 2, 7), (1, 2, 7), (1, 1, 7)] * 2 * N),
          [c["shape"] for c in chunks])
    check(all(c["length"] <= 120 for c in chunks), [c["length"] for c in chunks])
    if RANK == 0:
        for name in {c["file"] for c in chunks}:
            mine = sorted((c for c in chunks if c["file"] == name), key=lambda c: c["offset"])
            check([c["offset"] for c in mine] == list(np.cumsum([0] + [c["length"] for c in mine[:-1]])),
                  f"{name}: chunks not back to back")
            data = (ckdir / "c" / name).read_bytes()
            for c in mine:
                box = x[tuple(slice(o, o + s) for o, s in zip(c["offsets"], c["shape"]))]
                check(data[c["offset"]:c["offset"] + c["length"]] == box.tobytes(), f"bytes of chunk {c['offsets']}")
    for shape, pl in [((N,), [Shard(1)]), ((N,), [Shard(2)]), ((N,), [Replicate()])] + (
            [((2, N // 2), [Shard(2), Shard(0)])] if N % 2 == 0 and N > 2 else []):
        m = init_device_mesh(DEVICE, shape)
        t = {"x": distribute_tensor(xp.zeros(x.shape), m, pl, src_data_rank=None)}
        dcp.load(t, checkpoint_id=ckdir / "c")
        check(to_host(t["x"].full_tensor()).tobytes() == x.tobytes(), f"load into {shape} {pl}")
    check(_format.read_array(ckdir / "c", "x").tobytes() == x.tobytes(), "read_array")
    check.done()


@pytest.mark.parametrize("readers", [1, 4])
def test_flipped_byte_in_a_middle_chunk_is_named(monkeypatch, ckdir, readers):
    """A flipped byte in one chunk in the middle of a big shard is found by every load that reads that
    chunk, on every rank, naming the key, the file and the chunk; a box that does not overlap the
    chunk still reads (only overlapping chunks are read)."""
    monkeypatch.setattr(_format, "CHUNK_BYTES", 256)
    monkeypatch.setattr(_format, "READ_THREADS", readers)
    mesh = init_device_mesh(DEVICE, (N,))
    x = np.arange(N * 64 * 8, dtype=np.float64).reshape(N * 64, 8)  # 16 chunks of 4 rows per rank
    dcp.save({"x": distribute_tensor(xp.asarray(x), mesh, [Shard(0)], src_data_rank=None)}, checkpoint_id=ckdir / "c")
    COMM.Barrier()
    _, man = _format.read_manifest(ckdir / "c")
    e = man["entries"]["x"]
    ch = sorted(e["chunks"], key=lambda c: c["offsets"])[len(e["chunks"]) // 2 + 1]
    if RANK == 0:
        with open(ckdir / "c" / ch["file"], "r+b") as fh:
            fh.seek(ch["offset"] + 100)
            b = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([b[0] ^ 0x01]))
    COMM.Barrier()
    t = {"x": distribute_tensor(xp.zeros(x.shape), mesh, [Replicate()], src_data_rank=None)}
    raises_all(CheckpointError, None, lambda: dcp.load(t, checkpoint_id=ckdir / "c"),
               contains=["crc32 mismatch", "'x'", ch["file"], str(ch["offsets"])])
    files = _format.Files(str(ckdir / "c"))
    try:
        r0 = ch["offsets"][0]
        before = _format.read_box(files, "x", e, (0, 0), (r0, 8))
        check = Check()
        check(np.array_equal(before, x[:r0]), "the rows before the damaged chunk read")
        try:
            _format.read_box(files, "x", e, (r0 + 1, 2), (1, 3))
            check(False, "a box inside the damaged chunk read without error")
        except CheckpointError as err:
            check(str(ch["offsets"]) in str(err), str(err))
    finally:
        files.close()
    check.done()


def test_write_error_mid_shard_keeps_previous_then_saves(monkeypatch, ckdir):
    """A write failing after several chunks (chunks and their crc32s in flight) raises on every rank;
    the previous checkpoint survives; the next save works and loads bit for bit."""
    monkeypatch.setattr(_format, "CHUNK_BYTES", 256)
    mesh = init_device_mesh(DEVICE, (N,))
    p = ckdir / "ck"
    dcp.save(small_state(mesh, 1.0)[0], checkpoint_id=p)
    x = np.arange(N * 64 * 8, dtype=np.float64).reshape(N * 64, 8) * 0.5
    if RANK == N - 1:
        def full(path, offset, nbytes):
            if offset >= 5 * 256:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        monkeypatch.setattr(_format, "fault_hook", full)
    sd = {"x": distribute_tensor(xp.asarray(x), mesh, [Shard(0)], src_data_rank=None), "step": 2}
    raises_all(OSError, None, lambda: dcp.save(sd, checkpoint_id=p), contains=["previous checkpoint"])
    monkeypatch.setattr(_format, "fault_hook", None)
    assert_all(_format.read_array(p, "step") == 1, "previous survives")
    dcp.save(sd, checkpoint_id=p)
    t = {"x": distribute_tensor(xp.zeros(x.shape), mesh, [Replicate()], src_data_rank=None), "step": 0}
    dcp.load(t, checkpoint_id=p)
    assert_all(t["step"] == 2 and to_host(t["x"].to_local()).tobytes() == x.tobytes(), "saved after the failure")


def _host_stand_in_for_cupy(calls):
    """A host stand-in for the few CuPy calls of the checkpoint's staging path (``_format``): arrays
    are NumPy arrays of a subclass named ``cupy.ndarray`` with CuPy's ``.data.ptr`` and ``.device``;
    ``memcpyAsync`` is a ``memmove`` that counts its calls by direction. It lets a machine without a
    GPU run the ring of pinned slots, the look-ahead copies and their release on errors; the real
    device run is ``MPILOCAL_TEST_DEVICE=cuda`` on the GPU machine."""
    import ctypes
    import types

    class Device:
        def __init__(self, i=0):
            self.id = i

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            pass

    class Stream(Device):
        ptr = 0

        def __init__(self, non_blocking=False):
            super().__init__()

    class ndarray(np.ndarray):
        @property
        def data(self):
            return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

        @property
        def device(self):
            return Device(0)

    def memcpy_async(dst, src, n, kind, stream):
        calls["h2d" if kind == 1 else "d2h"] += 1
        ctypes.memmove(dst, src, n)

    cp = types.ModuleType("cupy")
    cp.ndarray, cp.uint8 = ndarray, np.uint8
    cp.cuda = types.SimpleNamespace(Device=Device, Stream=Stream, get_current_stream=lambda: Stream(),
                                    runtime=types.SimpleNamespace(memcpyHostToDevice=1, memcpyDeviceToHost=2,
                                                                  memcpyAsync=memcpy_async))
    cp.asnumpy = lambda a: np.array(a)
    cp.asarray = lambda a: np.array(a).view(ndarray)
    cp.empty = lambda shape, dtype: np.empty(shape, dtype).view(ndarray)
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = lambda shape, dtype: np.empty(shape, dtype)
    return cp, cupyx


@pytest.mark.parametrize("readers", [1, 4])
def test_device_staging_ring_with_a_host_stand_in(monkeypatch, tmp_path, readers):
    """The CuPy save/load path (pinned slots, look-ahead device-to-host copies, staged reads with
    the copy to the device, partial boxes, chunks larger than a slot, errors) against NumPy, with a
    host stand-in for CuPy: bytes and crc32s as NumPy/zlib give them, every chunk staged, and every
    slot back in the ring afterwards (a lost slot would hang the next save)."""
    import time
    import zlib

    calls = {"h2d": 0, "d2h": 0}
    cp, cupyx = _host_stand_in_for_cupy(calls)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setattr(_format, "_RINGS", {})
    monkeypatch.setattr(_format, "CHUNK_BYTES", 256)
    monkeypatch.setattr(_format, "READ_THREADS", readers)  # (sequential reads, or several at once)
    x = np.random.default_rng(RANK).standard_normal((40, 12))  # 96-byte rows: 20 chunks of 2 rows > the slots
    x[3, 4] = -0.0
    check = Check()

    def ring_full():
        for _ in range(200):
            if _format._RINGS[0].free.qsize() == _format.STAGE_SLOTS:
                return True
            time.sleep(0.01)
        return False

    def save(arr, name):
        f = _format.DataFile(str(tmp_path), name)
        boxes = _format.contiguous_boxes(arr.shape, arr.dtype.itemsize)
        try:
            got = _format.write_pieces(f, [(arr, lo, hi) for _, _, lo, hi in boxes])
        finally:
            f.close()
        return {"dtype": arr.dtype.str, "chunks": [
            {"offsets": list(o), "shape": list(s), "file": name, "offset": off, "length": hi - lo, "crc32": crc}
            for (o, s, lo, hi), (off, crc) in zip(boxes, got)]}

    e = save(x.view(cp.ndarray), "d.bin")
    data = (tmp_path / "d.bin").read_bytes()
    check(data == x.tobytes(), "file bytes")
    check(all(c["crc32"] == zlib.crc32(data[c["offset"]:c["offset"] + c["length"]]) for c in e["chunks"]), "crc32s")
    check(calls["d2h"] == len(e["chunks"]) == 20, f"{calls} for {len(e['chunks'])} chunks: not all staged")
    files = _format.Files(str(tmp_path))
    try:
        out = cp.empty((40, 12), np.float64)
        _format.read_box(files, "x", e, (0, 0), (40, 12), out=out)
        check(np.asarray(out).tobytes() == x.tobytes() and calls["h2d"] == 20, f"whole load {calls}")
        part = cp.empty((14, 7), np.float64)
        _format.read_box(files, "x", e, (3, 2), (14, 7), out=part)
        check(np.array_equal(np.asarray(part), x[3:17, 2:9]) and calls["h2d"] == 20, f"partial box {calls}")
        # a flipped byte in a middle chunk: named, and the slots come back
        bad = dict(e, chunks=[dict(c) for c in e["chunks"]])
        bad["chunks"][9]["crc32"] ^= 1
        try:
            _format.read_box(files, "x", bad, (0, 0), (40, 12), out=cp.empty((40, 12), np.float64))
            check(False, "damaged chunk not detected")
        except CheckpointError as err:
            check("'x'" in str(err) and str(bad["chunks"][9]["offsets"]) in str(err), str(err))
        check(ring_full(), "slots lost after a failed load")
    finally:
        files.close()
    # a write failing after a few pieces, with copies in flight: raised, and every slot comes back
    monkeypatch.setattr(_format, "fault_hook", lambda path, off, n: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "no space", path)) if off >= 5 * 256 else None)
    try:
        save(x.view(cp.ndarray), "e.bin")
        check(False, "the write error was lost")
    except OSError as err:
        check(err.errno == errno.ENOSPC, repr(err))
    monkeypatch.setattr(_format, "fault_hook", None)
    check(ring_full(), "slots lost after a failed save")
    # chunks larger than a slot (written with 1 KiB chunks, slots of 256 bytes): plain copies
    monkeypatch.setattr(_format, "CHUNK_BYTES", 1024)
    big = save(x, "h.bin")
    monkeypatch.setattr(_format, "CHUNK_BYTES", 256)
    files = _format.Files(str(tmp_path))
    try:
        out = cp.empty((40, 12), np.float64)
        _format.read_box(files, "x", big, (0, 0), (40, 12), out=out)
        check(np.asarray(out).tobytes() == x.tobytes(), "chunks larger than a slot")
    finally:
        files.close()
    check(ring_full(), "slots lost")
    check.done()


def test_chunk_lists_go_to_rank_0_only(monkeypatch, ckdir):
    """The commit gathers the chunk lists at rank 0, which writes the manifest: the other ranks
    receive none of them (their traffic during a save with hundreds of chunks per rank stays a few
    hundred bytes: agreements and sizes), and the manifest lists every rank's chunks."""
    monkeypatch.setattr(_format, "CHUNK_BYTES", 64)
    mesh = init_device_mesh(DEVICE, (N,))
    x = np.arange(N * 200 * 8, dtype=np.float64).reshape(N * 200, 8)  # 200 chunks of one row per rank
    sd = {"x": distribute_tensor(xp.asarray(x), mesh, [Shard(0)], src_data_rank=None)}
    got = []
    for name in ("all_gather_tensor", "all_to_all_single", "broadcast"):
        orig = getattr(funcol, name)

        def spy(*a, _orig=orig, **k):
            out = _orig(*a, **k)
            got.append(int(to_host(out).nbytes))
            return out
        monkeypatch.setattr(dcp_dist.funcol, name, spy)
    dcp.save(sd, checkpoint_id=ckdir / "c")
    monkeypatch.undo()
    _, man = _format.read_manifest(ckdir / "c")
    chunks = man["entries"]["x"]["chunks"]
    check = Check()
    check(len(chunks) == 200 * N and sorted({c["file"] for c in chunks}) == [f"data_{r:05d}.bin" for r in range(N)],
          f"{len(chunks)} chunks in {sorted({c['file'] for c in chunks})}")
    if RANK != 0:
        check(sum(got) < 2000, f"rank {RANK} received {sum(got)} bytes in the save's collectives ({got})")
    elif N > 1:
        check(sum(got) > 200 * (N - 1) * 50, f"rank 0 received only {sum(got)} bytes ({got})")
    check.done()


def test_crc32_is_zlibs():
    """The crc32 in manifests is zlib's CRC-32 whichever module computes it (isal/zlib-ng when present)."""
    import zlib

    b = np.random.default_rng(RANK).integers(0, 256, 100_003, dtype=np.uint8)
    assert_all(_format._crc(b) == zlib.crc32(b) and _format._crc(b"123456789") == 0xCBF43926, _format.CRC32_MODULE)


def test_leaf_that_requires_grad(ckdir):
    """A parameter that requires grad is saved from its data and loaded as a leaf that requires grad."""
    mesh = init_device_mesh(DEVICE, (N,))
    x = np.arange(N * 6.0).reshape(N * 2, 3) - 4.0
    W = distribute_tensor(xp.asarray(x), mesh, [Shard(0)], src_data_rank=None, requires_grad=True)
    dcp.save({"w": W}, checkpoint_id=ckdir / "g")
    t = {"w": distribute_tensor(xp.zeros_like(xp.asarray(x)), mesh, [Replicate()], src_data_rank=None,
                                requires_grad=True)}
    dcp.load(t, checkpoint_id=ckdir / "g")
    check = Check()
    check(t["w"].requires_grad and t["w"].is_leaf, "loaded parameter requires grad")
    check.close(t["w"].detach().to_local(), x, "loaded values")
    check.done()


class _Opt:
    """A DCP Stateful: saved as its state_dict(), restored through load_state_dict()."""

    def __init__(self, mesh, lr, fill):
        self.lr = lr
        self.m = distribute_tensor(xp.full((N * 2, 2), fill), mesh, [Shard(0)], src_data_rank=None)

    def state_dict(self):
        return {"lr": self.lr, "m": self.m}

    def load_state_dict(self, sd):
        self.lr, self.m = sd["lr"], sd["m"]


def test_stateful_objects(ckdir):
    mesh = init_device_mesh(DEVICE, (N,))
    dcp.save({"opt": _Opt(mesh, 0.5, 3.0), "step": 2}, checkpoint_id=ckdir / "s")
    _, man = _format.read_manifest(ckdir / "s")
    opt = _Opt(mesh, 0.0, 0.0)
    sd = {"opt": opt, "step": 0}
    dcp.load(sd, checkpoint_id=ckdir / "s")
    check = Check()
    check(sorted(man["entries"]) == ["opt.lr", "opt.m", "step"], sorted(man["entries"]))
    check(opt.lr == 0.5 and sd["step"] == 2 and sd["opt"] is opt, f"lr {opt.lr} step {sd['step']}")
    check.close(opt.m.to_local(), np.full((2, 2), 3.0), "m restored through load_state_dict")
    check.done()


# -- device kinds -------------------------------------------------------------------------------------------------
def test_device_kinds(ckdir):
    """Save from the test device's shards (CuPy under MPILOCAL_TEST_DEVICE=cuda), load into NumPy (cpu
    mesh) and back into the device's kind."""
    mesh = init_device_mesh(DEVICE, (N,))
    sd, x = small_state(mesh, 3.0)
    sd["dev"] = xp.asarray(np.arange(5.0))
    dcp.save(sd, checkpoint_id=ckdir / "k")
    check = Check()
    for kind in ("cpu", DEVICE):
        m = init_device_mesh(kind, (N,))
        arr = np if kind == "cpu" else xp
        t = {"w": distribute_tensor(arr.zeros((6, 5)), m, [Replicate()], src_data_rank=None),
             "v": np.zeros(4, np.int16), "step": 0, "dev": arr.zeros(5)}
        dcp.load(t, checkpoint_id=ckdir / "k")
        check(type(t["w"].to_local()) is type(arr.zeros(1)), f"{kind}: {type(t['w'].to_local())}")
        check(type(t["dev"]) is type(arr.zeros(1)), f"{kind}: plain array {type(t['dev'])}")
        check.close(t["w"].to_local(), x, f"{kind} w")
        check.close(t["dev"], np.arange(5.0), f"{kind} dev")
        check(t["step"] == 3, t["step"])
    check.done()


# -- atomic commit and crashes -----------------------------------------------------------------------------------
def test_replace_is_atomic_and_recovers(ckdir):
    """Saving over a checkpoint replaces it; the states a crash can leave behind are read as the last
    committed checkpoint and cleaned by the next save."""
    mesh = init_device_mesh(DEVICE, (N,))
    p = ckdir / "ck"
    dcp.save(small_state(mesh, 1.0)[0], checkpoint_id=p)
    dcp.save(small_state(mesh, 2.0)[0], checkpoint_id=p)
    check = Check()
    check(_format.read_array(p, "step") == 2, "second save replaced the first")
    removals_done()
    check(sorted(os.listdir(ckdir)) == ["ck"], f"leftovers: {os.listdir(ckdir)}")
    COMM.Barrier()  # every rank looked before rank 0 starts the next save
    # crash between the commit's two renames: PATH moved aside, the new one complete in tmp
    dcp.save(small_state(mesh, 5.0)[0], checkpoint_id=ckdir / "new")
    COMM.Barrier()
    if RANK == 0:
        os.rename(p, _format.old_dir(p))
        os.rename(ckdir / "new", _format.tmp_dir(p))
    COMM.Barrier()
    t = small_state(mesh, 0.0)[0]
    dcp.load(t, checkpoint_id=p)
    check(t["step"] == 2, f"loaded {t['step']}, expected the last committed (2)")
    check.close(t["w"].to_local(), small_state(mesh, 2.0)[0]["w"].to_local(), "w of the last committed")
    check(_format.read_array(p, "step") == 2, "read_array recovers too")
    dcp.save(small_state(mesh, 3.0)[0], checkpoint_id=p)
    removals_done()
    check(sorted(os.listdir(ckdir)) == ["ck"], f"leftovers after the next save: {os.listdir(ckdir)}")
    check(_format.read_array(p, "step") == 3, "next save committed")
    COMM.Barrier()
    # a crash after the manifest but before the rename: an uncommitted tmp is never read
    dcp.save(small_state(mesh, 4.0)[0], checkpoint_id=ckdir / "x")
    COMM.Barrier()
    if RANK == 0:
        os.rename(ckdir / "x", _format.tmp_dir(p))
    COMM.Barrier()
    t = small_state(mesh, 0.0)[0]
    dcp.load(t, checkpoint_id=p)
    check(t["step"] == 3, "uncommitted tmp ignored")
    check.done()


def test_enospc_keeps_previous(ckdir, monkeypatch):
    """A write failing for lack of space (fault injection on the last rank) raises OSError(ENOSPC) on
    every rank; the previous checkpoint survives and the temporary directory is removed."""
    mesh = init_device_mesh(DEVICE, (N,))
    p = ckdir / "ck"
    dcp.save(small_state(mesh, 1.0)[0], checkpoint_id=p)
    if RANK == N - 1:
        def full(path, offset, nbytes):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        monkeypatch.setattr(_format, "fault_hook", full)
    big = {"w": distribute_tensor(xp.ones((N * 4, 5)), mesh, [Shard(0)], src_data_rank=None),
           "v": np.ones(3), "step": 9}
    try:
        dcp.save(big, checkpoint_id=p)
        err = None
    except OSError as e:
        err = e
    check = Check()
    check(err is not None and err.errno == errno.ENOSPC, f"expected OSError(ENOSPC), got {err!r}")
    check(err is not None and "previous checkpoint" in str(err) and f"rank {N - 1}" in str(err), str(err))
    monkeypatch.setattr(_format, "fault_hook", None)
    t, x = small_state(mesh, 0.0)
    dcp.load(t, checkpoint_id=p)
    check(t["step"] == 1, "previous checkpoint loads")
    check.close(t["w"].to_local(), small_state(mesh, 1.0)[0]["w"].to_local(), "previous w")
    check(sorted(os.listdir(ckdir)) == ["ck"], f"leftovers: {os.listdir(ckdir)}")
    check.done()


# -- damage and refusals ----------------------------------------------------------------------------------------
def _damage(path, how):
    COMM.Barrier()
    if RANK == 0:
        _, man = _format.read_manifest(path)
        ch = man["entries"]["w"]["chunks"][-1]
        f = Path(path) / ch["file"]
        if how == "flip":
            with open(f, "r+b") as fh:
                fh.seek(ch["offset"] + ch["length"] // 2)
                b = fh.read(1)
                fh.seek(-1, 1)
                fh.write(bytes([b[0] ^ 0x10]))
        else:
            os.truncate(f, ch["offset"] + ch["length"] - 3)
        return ch["file"]
    return None


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damage_detected_on_every_rank(ckdir, how):
    mesh = init_device_mesh(DEVICE, (N,))
    p = ckdir / "ck"
    dcp.save(small_state(mesh)[0], checkpoint_id=p)
    fname = COMM.bcast(_damage(p, how), 0)
    want = "crc32 mismatch" if how == "flip" else "truncated"
    t = {"w": distribute_tensor(xp.zeros((6, 5)), mesh, [Replicate()], src_data_rank=None)}
    before = t["w"]
    raises_all(CheckpointError, None, lambda: dcp.load(t, checkpoint_id=p, strict=False), contains=[want, "'w'", fname])
    assert_all(t["w"] is before, "a failed load left the state_dict unchanged")
    if RANK == 0:
        with pytest.raises(CheckpointError, match=want):
            _format.read_array(p, "w")
    COMM.Barrier()


def test_refusals_on_every_rank(ckdir):
    mesh = init_device_mesh(DEVICE, (N,))
    p = ckdir / "ck"
    dcp.save(small_state(mesh)[0], checkpoint_id=p)
    tmpl = lambda **kw: {"w": distribute_tensor(xp.zeros(kw.get("shape", (6, 5)), dtype=kw.get("dtype", np.float64)),
                                                mesh, [Shard(0)], src_data_rank=None), "v": np.zeros(4, np.int16),
                         "step": 0, **kw.get("extra", {})}
    raises_all(ValueError, None, lambda: dcp.load(tmpl(shape=(6, 4)), checkpoint_id=p),
               contains=["'w'", "(6, 5)", "(6, 4)"])
    raises_all(ValueError, None, lambda: dcp.load(tmpl(dtype=np.float32), checkpoint_id=p),
               contains=["'w'", "<f8", "<f4"])
    raises_all(CheckpointError, None, lambda: dcp.load(tmpl(extra={"opt": {"m": 0}}), checkpoint_id=p),
               contains=["lacks 1 key", "opt.m", "strict=False"])
    t = tmpl(extra={"opt": {"m": 7}})
    dcp.load(t, checkpoint_id=p, strict=False)
    assert_all(t["opt"]["m"] == 7 and t["step"] == 1, f"strict=False: {t}")
    dcp.load({"step": 0}, checkpoint_id=p)  # extra keys of the checkpoint are ignored
    raises_all(TypeError, None, lambda: dcp.load({"step": np.zeros(1)}, checkpoint_id=p),
               contains=["'step'", "a value"])
    raises_all(CheckpointError, None, lambda: dcp.load(tmpl(), checkpoint_id=ckdir / "nothing"),
               contains=["does not exist"])
    if RANK == 0:
        (ckdir / "plain").mkdir()
        (ckdir / "plain" / "x.txt").write_text("user data")
        (ckdir / "afile").write_text("x")
    COMM.Barrier()
    raises_all(CheckpointError, None, lambda: dcp.load(tmpl(), checkpoint_id=ckdir / "plain"),
               contains=["not a checkpoint"])
    raises_all(CheckpointError, None, lambda: dcp.load(tmpl(), checkpoint_id=ckdir / "afile"),
               contains=["not a checkpoint"])
    raises_all(FileExistsError, None, lambda: dcp.save(tmpl(), checkpoint_id=ckdir / "plain"), contains=["refusing"])
    assert_all((ckdir / "plain" / "x.txt").read_text() == "user data", "user directory untouched")
    # another format version
    COMM.Barrier()
    if RANK == 0:
        m = json.loads((p / "manifest.json").read_text())
        m["version"] = 99
        (p / "manifest.json").write_text(json.dumps(m))
    COMM.Barrier()
    raises_all(CheckpointError, None, lambda: dcp.load(tmpl(), checkpoint_id=p),
               contains=["format version 99", "version 1"])


def test_unstorable_values_raise_on_every_rank(ckdir):
    mesh = init_device_mesh(DEVICE, (N,))
    p = ckdir / "ck"
    raises_all(TypeError, None, lambda: dcp.save({"o": np.array([1, None], dtype=object)}, checkpoint_id=p),
               contains=["'o'", "object", "no pickle"])
    raises_all(TypeError, None, lambda: dcp.save({"t": (1, 2)}, checkpoint_id=p), contains=["'t'", "use a list"])
    raises_all(TypeError, None, lambda: dcp.save({"f": object()}, checkpoint_id=p), contains=["'f'", "state_dict()"])
    raises_all(TypeError, None, lambda: dcp.save({1: 2}, checkpoint_id=p), contains=["keys must be str"])
    raises_all(ValueError, None, lambda: dcp.save({"a.b": 1, "a": {"b": 2}}, checkpoint_id=p), contains=["'a.b'"])
    # a state_dict that differs between ranks (only on one rank) is refused on every rank
    sd = {"w": 1} if (RANK != N - 1 or N == 1) else {"w": 1, "x": 2}
    if N > 1:
        raises_all(ValueError, None, lambda: dcp.save(sd, checkpoint_id=p), contains=["differs between ranks"])
    assert_all(not p.exists(), "nothing committed")


# -- async --------------------------------------------------------------------------------------------------------
def test_async_save_overlapped_with_training(ckdir, monkeypatch):
    """The arrays are snapshotted at async_save; training steps (in-place updates, collectives,
    redistributes) run while the background thread writes (it waits for them, so they overlap);
    result() commits on every rank; the checkpoint holds the values of the save time."""
    mesh = init_device_mesh(DEVICE, (N,))
    W = distribute_tensor(xp.asarray(np.arange(N * 8.0).reshape(N * 2, 4)), mesh, [Shard(0)], src_data_rank=None)
    snapshot = to_host(W.full_tensor()).copy()
    trained = threading.Event()
    writes = []

    def wait_for_training(path, offset, nbytes):
        writes.append(threading.current_thread().name)
        trained.wait(60)

    monkeypatch.setattr(_format, "fault_hook", wait_for_training)
    fut = dcp.async_save({"w": W, "step": 1}, checkpoint_id=ckdir / "a")
    for _ in range(3):  # training steps on the main thread while the writer waits
        W.to_local()[...] += 1.0
        s = funcol.all_reduce(W.to_local(), "sum", mesh)
        W = DTensor.from_local(W.to_local() * 1.0, mesh, [Shard(0)], shape=W.shape)
        W.redistribute(mesh, [Replicate()])
    trained.set()
    fut.result()
    assert_all(fut.done(), "done after result()")
    assert_all(writes and all(n == "mpilocal-async-save" for n in writes), f"written by {set(writes)}")
    t = {"w": distribute_tensor(xp.zeros((N * 2, 4)), mesh, [Replicate()], src_data_rank=None), "step": 0}
    dcp.load(t, checkpoint_id=ckdir / "a")
    check = Check()
    check(np.array_equal(to_host(t["w"].to_local()), snapshot), "checkpoint holds the values at async_save")
    check(not np.array_equal(to_host(W.full_tensor()), snapshot) and s is not None, "training went on")
    check.done()


def test_async_save_error_at_result(ckdir, monkeypatch):
    mesh = init_device_mesh(DEVICE, (N,))
    p = ckdir / "a"
    dcp.save(small_state(mesh, 1.0)[0], checkpoint_id=p)
    if RANK == 0:
        def full(path, offset, nbytes):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        monkeypatch.setattr(_format, "fault_hook", full)
    fut = dcp.async_save(small_state(mesh, 2.0)[0], checkpoint_id=p)
    raises_all(OSError, None, fut.result, contains=["previous checkpoint"])
    monkeypatch.setattr(_format, "fault_hook", None)
    assert_all(_format.read_array(p, "step") == 1, "previous survives")
    f2 = dcp.async_save(small_state(mesh, 3.0)[0], checkpoint_id=p)
    f3 = dcp.async_save(small_state(mesh, 4.0)[0], checkpoint_id=p)  # commits f2 first
    assert_all(_format.read_array(p, "step") == 3, "pending save committed before the next")
    f3.result()
    f2.result()
    assert_all(_format.read_array(p, "step") == 4, "last async save committed")
    dcp.async_save(small_state(mesh, 5.0)[0], checkpoint_id=p)
    t = small_state(mesh, 0.0)[0]
    dcp.load(t, checkpoint_id=p)  # commits the pending async save first
    assert_all(t["step"] == 5, f"load after a pending async_save read step {t['step']}")


# -- one process, no MPI; the CLI ---------------------------------------------------------------------------------
def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "HYDI_", "OMPI_", "MPILOCAL_"))
           or k.startswith("OMPI_ALLOW_RUN_AS_ROOT")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    env["MPILOCAL_TIMEOUT"] = "60"
    env.update(extra)
    return env


NO_MPI_READER = r"""
import importlib.util, sys
sys.modules["mpi4py"] = None          # importing MPI now fails
spec = importlib.util.spec_from_file_location("ckfmt", sys.argv[1])
fmt = importlib.util.module_from_spec(spec); spec.loader.exec_module(fmt)
a = fmt.read_array(sys.argv[2], "model.w")
print(a.dtype.str, a.shape, a.tobytes().hex())
print(repr(fmt.read_array(sys.argv[2], "name")))
print("mpi4py.MPI" in sys.modules)
"""


@pytest.mark.skipif(N != 1, reason="runs subprocesses; 1-rank pass only")
def test_read_array_without_mpi_and_ls(ckdir):
    mesh = init_device_mesh("cpu", (1,))
    dcp.save(cj.saved_state(mesh), checkpoint_id=ckdir / "ck")
    p = subprocess.run([sys.executable, "-c", NO_MPI_READER, str(ROOT / "mpilocal/checkpoint/_format.py"),
                        str(ckdir / "ck")], capture_output=True, text=True, timeout=60, env=_clean_env())
    assert p.returncode == 0, p.stderr
    w = cj.reference()[0]["model.w"]
    assert p.stdout.split("\n")[:3] == [f"<f8 (7, 5) {w.tobytes().hex()}", "'run-1'", "False"], p.stdout
    for key, a in {**cj.reference()[0], **cj.reference()[1]}.items():
        got = dcp.read_array(ckdir / "ck", key)
        assert cj._bits(got) == cj._bits(np.asarray(a)), key
    p = subprocess.run([sys.executable, "-m", "mpilocal.checkpoint", "ls", str(ckdir / "ck")], capture_output=True,
                       text=True, timeout=60, env=_clean_env())
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    row = next(line for line in lines if line.startswith("opt.m "))
    assert row.split()[:3] == ["opt.m", "(6,", "4)"] and ">f8" in row and "[Shard(0)]" in row and "192 B" in row, row
    assert any(line.startswith("opt.g ") and "Partial(sum)" in line for line in lines), p.stdout
    assert any(line.startswith("name ") and '"run-1"' in line for line in lines), p.stdout
    p = subprocess.run([sys.executable, "-m", "mpilocal.checkpoint", "ls", str(ckdir / "none")], capture_output=True,
                       text=True, timeout=60, env=_clean_env())
    assert p.returncode == 2 and "does not exist" in p.stderr, (p.returncode, p.stderr)


IMPORT_NO_MPI = r"""
import sys
sys.modules["mpi4py"] = None          # any import of mpi4py now fails
import mpilocal.checkpoint as c
a = c.read_array(sys.argv[1], "model.w")
print(a.dtype.str, a.shape, a.tobytes().hex())
from mpilocal import checkpoint       # the from-import form as well
print(sorted(k for k in sys.modules if k.startswith("mpi4py") and sys.modules[k] is not None))
print("DTensor" in dir(__import__("mpilocal")), sorted(__import__("mpilocal").__all__) == sorted(set(__import__("mpilocal").__all__)))
"""

CLI_NO_MPI = r"""
import runpy, sys
sys.modules["mpi4py"] = None
sys.argv = ["mpilocal.checkpoint", "ls", sys.argv[1]]
runpy.run_module("mpilocal.checkpoint", run_name="__main__", alter_sys=True)
"""

# the library still starts on any other import path: failure handling installed, operators and autograd registered
STARTS = r"""
import sys
how = sys.argv[1]
if how == "submodule":
    import mpilocal.functional
elif how == "from":
    from mpilocal import DTensor
elif how == "attr":
    import mpilocal
    mpilocal.Shard
elif how == "star":
    from mpilocal import *
elif how == "save":
    import mpilocal.checkpoint as c
    c.save
import importlib, mpilocal, mpilocal.dtensor as d
f = importlib.import_module("mpilocal." + mpilocal._INSTALL_MODULE)  # the module with install()
print(f._INSTALLED, sys.excepthook is f._excepthook, "mpilocal.ops" in sys.modules, "mpilocal.autograd" in sys.modules,
      "mpilocal.optim" in sys.modules, mpilocal.DTensor is d.DTensor, callable(mpilocal.zeros),
      type(mpilocal.functional).__name__, mpilocal.functional.__loader__.__class__.__name__)
"""


@pytest.mark.skipif(N != 1, reason="runs subprocesses; 1-rank pass only")
def test_import_mpilocal_checkpoint_reads_without_mpi4py(ckdir):
    mesh = init_device_mesh("cpu", (1,))
    dcp.save(cj.saved_state(mesh), checkpoint_id=ckdir / "ck")
    p = subprocess.run([sys.executable, "-c", IMPORT_NO_MPI, str(ckdir / "ck")], capture_output=True, text=True,
                       timeout=60, env=_clean_env(), cwd=str(ROOT))
    assert p.returncode == 0, p.stderr
    w = cj.reference()[0]["model.w"]
    assert p.stdout.splitlines() == [f"<f8 (7, 5) {w.tobytes().hex()}", "[]", "True True"], p.stdout
    p = subprocess.run([sys.executable, "-c", CLI_NO_MPI, str(ckdir / "ck")], capture_output=True, text=True,
                       timeout=60, env=_clean_env(), cwd=str(ROOT))
    assert p.returncode == 0, p.stderr
    assert any(line.startswith("opt.m ") and ">f8" in line for line in p.stdout.splitlines()), p.stdout
    for how in ("submodule", "from", "attr", "star", "save"):
        p = subprocess.run([sys.executable, "-c", STARTS, how], capture_output=True, text=True, timeout=120,
                           env=_clean_env(MPILOCAL_ABORT_ON_ERROR="1"), cwd=str(ROOT))
        assert p.returncode == 0, (how, p.stderr)
        assert p.stdout.split() == ["True"] * 7 + ["module", "SourceFileLoader"], (how, p.stdout)


# -- mpiexec jobs: across rank counts, and kill -9 in the middle of a save ----------------------------------------
def _mpiexec():
    exe = Path(sys.executable).with_name("mpiexec")
    return str(exe) if exe.exists() else (shutil.which("mpiexec") or "mpiexec")


def _job(n, *args, timeout=240):
    cmd = [_mpiexec(), "-n", str(n), sys.executable, str(HERE / "failure_cases" / "checkpoint_job.py")]
    cmd += [str(a) for a in args]
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           env=_clean_env(), timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"HANG: {' '.join(cmd)}\n{(e.stdout or b'').decode(errors='replace')[-3000:]}")
    return p.returncode, p.stdout.decode(errors="replace")


@pytest.mark.skipif(N != 1, reason="launches its own mpiexec jobs; 1-rank pass only")
def test_save_at_4_load_at_1_2_3_ranks(ckdir):
    rc, out = _job(4, "save", ckdir / "ck")
    assert rc == 0 and "SAVED 4" in out, out[-3000:]
    for n in (1, 2, 3):
        rc, out = _job(n, "load", ckdir / "ck")
        assert rc == 0 and f"LOADED OK at {n} ranks" in out, out[-3000:]


@pytest.mark.skipif(N != 1, reason="launches its own mpiexec jobs; 1-rank pass only")
def test_kill_9_during_save_keeps_previous(ckdir):
    p = ckdir / "ck"
    rc, out = _job(2, "crash", p)
    for name in set(re.findall(r"SHM (/dev/shm/mpich_shm_[0-9a-f]+_\d+)", out)):  # as a batch epilogue would
        if os.path.exists(name):
            os.unlink(name)
    assert rc != 0 and "KILLING rank 1" in out and "UNREACHABLE" not in out, out[-3000:]
    assert _format.read_array(p, "step") == 1
    assert np.array_equal(_format.read_array(p, "w"), np.arange(12.0).reshape(4, 3))
    mesh = init_device_mesh("cpu", (1,))
    t = {"w": distribute_tensor(np.zeros((4, 3)), mesh, [Shard(0)]), "step": 0}
    dcp.load(t, checkpoint_id=p)
    assert t["step"] == 1 and np.array_equal(t["w"].to_local(), np.arange(12.0).reshape(4, 3))
    assert os.path.exists(_format.tmp_dir(p)), "the killed save left its temporary directory"
    dcp.save({"step": 3}, checkpoint_id=p)  # the next save clears it
    removals_done()
    assert sorted(os.listdir(ckdir)) == ["ck"] and _format.read_array(p, "step") == 3


@pytest.mark.skipif(N != 1, reason="launches its own mpiexec jobs; 1-rank pass only")
@pytest.mark.parametrize("how", ["raise", "hang"])
def test_bench_script_never_hangs(ckdir, how):
    """scripts/bench_checkpoint.py (also the driver of the torch.distributed.checkpoint comparison): an
    error on one rank is raised on every rank, a rank stuck in a step (here: in a save, which the
    other rank's collectives then wait for) ends the job at --timeout."""
    cmd = [_mpiexec(), "-n", "2", sys.executable, str(ROOT / "scripts" / "bench_checkpoint.py"), "--per-rank", "1M",
           "--repeat", "1", "--dir", str(ckdir), "--timeout", "10", "--inject", f"{how}:{'evict' if how == 'raise' else 'save'}:1"]
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           env=_clean_env(), timeout=150, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"HANG: {' '.join(cmd)}\n{(e.stdout or b'').decode(errors='replace')[-3000:]}")
    out = p.stdout.decode(errors="replace")
    assert p.returncode != 0, out[-3000:]
    if how == "raise":
        assert "step 'evict 1 MiB/rank #0' failed on rank(s) [1]" in out and "injected failure" in out, out[-3000:]
        assert p.returncode == 3 and "Traceback" not in out.split("bench_checkpoint: step")[0], out[-3000:]
    else:
        # (the watchdog of either rank may fire first: rank 0 waits in the save's collectives)
        assert "bench_checkpoint: step 'save 1 MiB/rank #0' ran longer than --timeout 10 s" in out, out[-3000:]
    assert not [f for f in os.listdir(ckdir) if f.startswith("mpilocal-ckbench")] or how == "hang", os.listdir(ckdir)


def test_read_threads_bound_the_reads_in_flight(monkeypatch, ckdir):
    """MPILOCAL_CKPT_READ_THREADS=N (READ_THREADS) means at most N chunk reads at once, whatever the
    size of the I/O pool; the loaded values are the saved ones bit for bit."""
    import threading
    import time

    monkeypatch.setattr(_format, "CHUNK_BYTES", 256)
    monkeypatch.setattr(_format, "READ_THREADS", 2)
    mesh = init_device_mesh(DEVICE, (N,))
    x = np.arange(N * 64 * 8, dtype=np.float64).reshape(N * 64, 8)
    dcp.save({"x": distribute_tensor(xp.asarray(x), mesh, [Shard(0)], src_data_rank=None)}, checkpoint_id=ckdir / "c")
    lock, now, most = threading.Lock(), [0], [0]
    real = _format.Files.read_chunk

    def counted(self, *a):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            time.sleep(0.002)  # long enough for the pool's other threads to start theirs
            return real(self, *a)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(_format.Files, "read_chunk", counted)
    t = {"x": distribute_tensor(xp.zeros(x.shape), mesh, [Replicate()], src_data_rank=None)}
    dcp.load(t, checkpoint_id=ckdir / "c")
    assert_all(to_host(t["x"].to_local()).tobytes() == x.tobytes() and 1 <= most[0] <= 2, f"most in flight {most[0]}")
