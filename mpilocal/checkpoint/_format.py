"""The on-disk format of mpilocal checkpoints: paths, the manifest, chunk writing and reading.

No MPI here (and no import of the rest of mpilocal): this module only needs the standard library and
NumPy, so :func:`read_array` and ``python -m mpilocal.checkpoint ls`` work in one process. The
collective half (``save``/``load``/``async_save``) is ``_dist.py``. See ``docs/checkpoint.md``.

Layout of a checkpoint directory ``PATH``::

    PATH/manifest.json       written last: its presence marks a complete checkpoint
    PATH/data_00003.bin      one file per writing rank (process-group rank), chunks appended

A chunk is a C-ordered box of one array: ``offsets``/``shape`` in the global array, ``file``,
byte ``offset`` and ``length`` in that file, and the ``crc32`` of its bytes. Each shard is cut
along its first dim into chunks of at most ``CHUNK_BYTES`` so that a reader verifies the crc32 of
only what it needs. Bytes are the array's own (byte order kept: the dtype is ``numpy.dtype.str``).
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "FORMAT", "VERSION", "MANIFEST", "CHUNK_BYTES", "CheckpointError",
    "read_array", "read_manifest", "resolve", "tmp_dir", "old_dir", "flatten", "dtype_str",
    "DataFile", "write_pieces", "contiguous_boxes", "read_box", "run_reads", "wait_all", "remove_tree", "fsync_dir", "describe",
]

FORMAT = "mpilocal-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
CHUNK_BYTES = 16 << 20   # a shard is cut into chunks of at most this many bytes (contiguous_boxes); each
                         # chunk's crc32 runs on a worker thread while the next chunk moves
_KINDS = "biufcSUmM"     # dtype kinds that are raw bytes (no object pointers, no fields)

# fault injection for tests: called as hook(file_path, file_offset, nbytes) before each chunk is written
fault_hook = None


class CheckpointError(RuntimeError):
    """A checkpoint is missing, not a checkpoint, of another format version, damaged, or lacks keys."""


# -- paths and the commit protocol's sibling directories ----------------------------------------
def _norm(path) -> str:
    p = os.path.abspath(os.fspath(path))
    return p.rstrip(os.sep) or os.sep


def tmp_dir(path) -> str:
    """Where ``save`` writes before the commit: a hidden sibling of ``path``."""
    p = _norm(path)
    return os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.ckpt-tmp")


def old_dir(path) -> str:
    """Where the commit moves the previous checkpoint aside before renaming the new one into place."""
    p = _norm(path)
    return os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.ckpt-old")


def resolve(path) -> tuple[str, str]:
    """The directory holding the committed checkpoint at ``path`` and a note.

    ``path`` itself when it has a manifest; the moved-aside previous checkpoint when a crash hit
    between the two renames of a commit (``path`` missing, its ``.ckpt-old`` sibling complete).
    Raises :class:`CheckpointError` otherwise.
    """
    p = _norm(path)
    if os.path.isfile(os.path.join(p, MANIFEST)):
        return p, ""
    old = old_dir(p)
    if not os.path.lexists(p) and os.path.isfile(os.path.join(old, MANIFEST)):
        return old, (f"{p} is missing but {old} holds a complete checkpoint (a save crashed during its commit); "
                     f"reading that one, the last committed")
    if not os.path.lexists(p):
        raise CheckpointError(f"no checkpoint at {p}: the path does not exist; pass the checkpoint_id given to save()")
    if not os.path.isdir(p):
        raise CheckpointError(f"{p} is not a checkpoint: it is a file, not a checkpoint directory")
    raise CheckpointError(
        f"{p} is not a checkpoint: it has no {MANIFEST} (a directory that save() never committed, or another "
        f"kind of checkpoint)")


def parse_manifest(text: bytes, where: str) -> dict:
    """The manifest as a dict, checked for the format name and version."""
    try:
        m = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where} is damaged: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("entries"), dict):
        raise CheckpointError(f"{where} is not an mpilocal checkpoint manifest (no format {FORMAT!r})")
    if m.get("version") != VERSION:
        raise CheckpointError(
            f"{where} has format version {m.get('version')!r}, this mpilocal reads version {VERSION}; "
            f"read it with the mpilocal version that wrote it")
    return m


def read_manifest(path) -> tuple[str, dict]:
    """``(directory, manifest)`` of the committed checkpoint at ``path``."""
    d, _ = resolve(path)
    f = os.path.join(d, MANIFEST)
    with open(f, "rb") as fh:
        return d, parse_manifest(fh.read(), f)


def remove_tree(d: str) -> None:
    """Delete a checkpoint directory, its manifest first (so a half-deleted one is never accepted)."""
    if not os.path.lexists(d):
        return
    if os.path.isdir(d) and not os.path.islink(d):
        try:
            os.remove(os.path.join(d, MANIFEST))
        except FileNotFoundError:
            pass
        shutil.rmtree(d)
    else:
        os.remove(d)


def fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- keys and values ------------------------------------------------------------------------------
def is_stateful(v) -> bool:
    """DCP's ``Stateful`` protocol: an object with ``state_dict()`` and ``load_state_dict(sd)``."""
    return callable(getattr(v, "state_dict", None)) and callable(getattr(v, "load_state_dict", None))


def flatten(state_dict, is_array, caller: str, stateful=None) -> list:
    """``[(dotted_key, container, index, leaf)]`` of a nested dict/list, in order (DCP's key names:
    ``{"model": {"w": ..}}`` -> ``"model.w"``, ``{"lr": [a, b]}`` -> ``"lr.0"``, ``"lr.1"``).

    A ``Stateful`` object (``state_dict()``/``load_state_dict()``, as in DCP) stands for its
    ``state_dict()``, walked under its key; ``(object, its state dict)`` pairs go to ``stateful``."""
    if not isinstance(state_dict, (dict, list)):
        raise TypeError(f"{caller}: state_dict must be a dict (or a list), got {type(state_dict).__name__}")
    out, seen = [], {}

    def walk(obj, prefix):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            if isinstance(obj, dict) and not isinstance(k, str):
                raise TypeError(f"{caller}: state_dict key {k!r} at {prefix or '<top>'!r} is a "
                                f"{type(k).__name__}; keys must be str")
            key = f"{prefix}.{k}" if prefix else str(k)
            if not is_array(v) and is_stateful(v):
                sub = v.state_dict()
                if not isinstance(sub, (dict, list)):
                    raise TypeError(f"{caller}: state_dict[{key!r}].state_dict() returned a {type(sub).__name__}, "
                                    f"not a dict")
                if stateful is not None:
                    stateful.append((v, sub))
                walk(sub, key)
                continue
            if isinstance(v, (dict, list)):
                walk(v, key)
                continue
            if not (is_array(v) or v is None or isinstance(v, (bool, int, float, str))):
                hint = " (use a list)" if isinstance(v, tuple) else ""
                raise TypeError(
                    f"{caller}: state_dict[{key!r}] is a {type(v).__name__}{hint}; a checkpoint holds DTensors, "
                    f"NumPy/CuPy arrays, NumPy scalars, JSON values (int, float, str, bool, None) and objects "
                    f"with state_dict()/load_state_dict(), in dicts/lists")
            if key in seen:
                raise ValueError(f"{caller}: two entries of the state_dict have the dotted key {key!r}; rename one")
            seen[key] = True
            out.append((key, obj, k, v))

    walk(state_dict, "")
    return out


def dtype_str(dtype, key: str, caller: str) -> str:
    """``dtype.str`` (byte order kept) of a dtype a checkpoint can hold; TypeError otherwise."""
    dt = np.dtype(dtype)
    if dt.hasobject or dt.fields is not None or dt.kind not in _KINDS or dt.subdtype is not None:
        raise TypeError(
            f"{caller}: {key!r} has dtype {dt!r}: object, structured and void dtypes cannot be checkpointed "
            f"(no pickle); store plain numeric/bool/fixed-width string arrays")
    return dt.str


def json_value(v, key: str, caller: str):
    """A JSON-able copy of ``v`` (floats keep NaN/inf/-0.0; ints any size)."""
    try:
        json.dumps(v, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{caller}: state_dict[{key!r}] = {v!r:.60} is not JSON-able ({e})") from None
    return v


# -- the I/O engine: a pool of threads, pinned staging buffers for device arrays -------------------
IO_THREADS = max(4, min(8, os.cpu_count() or 1))  # worker threads per process: crc32s, device copies, reads
STAGE_SLOTS = 6  # pinned host buffers of CHUNK_BYTES per GPU and process (device <-> host copies)
# chunk reads at once (run_reads). Default: 1 (sequential, in file order) below 8 CPUs, else a quarter of
# them up to 8. Measured (docs/checkpoint.md): on the 2-core VM parallel reads of one file were slower
# than one reader; on the 32-CPU GPU host 8 readers loaded at 96% of raw read, one reader at 77-79%.
_DEFAULT_READERS = 1 if (os.cpu_count() or 1) < 8 else min(8, (os.cpu_count() or 1) // 4)
READ_THREADS = max(1, int(os.environ.get("MPILOCAL_CKPT_READ_THREADS", "") or _DEFAULT_READERS))
_POOL = []
_POOL_LOCK = threading.Lock()


def io_pool() -> ThreadPoolExecutor:
    """The worker threads of this process's checkpoint I/O: the crc32 of each chunk (zlib.crc32 releases
    the GIL), the device-to-host copies of a save, the positioned reads (and their crc32) of a load."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(IO_THREADS, thread_name_prefix="mpilocal-ckpt-io"))
        return _POOL[0]


def _pick_crc32():
    """zlib's CRC-32, from the fastest module present: python-isal or zlib-ng (SIMD, several GB/s,
    optional: ``pip install isal``) or the standard library's zlib (~1-2 GB/s per core). All give the
    same values. ``MPILOCAL_CKPT_CRC=zlib`` forces the standard library."""
    if os.environ.get("MPILOCAL_CKPT_CRC", "").strip().lower() != "zlib":
        for mod in ("isal.isal_zlib", "zlib_ng.zlib_ng"):
            try:
                f = getattr(importlib.import_module(mod), "crc32")
                if f(b"123456789") == 0xCBF43926:
                    return f, mod
            except Exception:  # noqa: BLE001 - an optional accelerator that is absent or broken is skipped
                pass
    return zlib.crc32, "zlib"


CRC32, CRC32_MODULE = _pick_crc32()


def _crc(buf) -> int:
    return CRC32(buf) & 0xFFFFFFFF


def _sync_file_range():
    """Linux's ``sync_file_range`` (starts the writeback of a file range without waiting for it), or
    None (another OS, or ``MPILOCAL_CKPT_WRITEBACK=0``)."""
    if not sys.platform.startswith("linux") or os.environ.get("MPILOCAL_CKPT_WRITEBACK", "").strip() == "0":
        return None
    try:
        import ctypes

        f = ctypes.CDLL(None, use_errno=True).sync_file_range
        f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        f.restype = ctypes.c_int
        return f
    except (OSError, AttributeError):
        return None


_SFR = _sync_file_range()
_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE


def device_of(a):
    """``(cupy, device id)`` for a CuPy array, None for a host array (CuPy is never imported here)."""
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(a, cp.ndarray):
        return cp, a.device.id
    return None


class _Ring:
    """``STAGE_SLOTS`` pinned host buffers of ``CHUNK_BYTES`` (and a non-blocking stream each) for one GPU:
    device <-> host copies go through them, so they run at the pinned-memory speed, overlapped with
    the file I/O, and never touch fresh pageable pages. Made once per process and GPU."""

    def __init__(self, cp, did: int, nbytes: int):
        import queue

        import cupyx

        self.nbytes = nbytes
        self.free = queue.SimpleQueue()
        with cp.cuda.Device(did):
            for _ in range(STAGE_SLOTS):
                host = cupyx.empty_pinned((nbytes,), np.uint8)
                self.free.put((host, cp.cuda.Stream(non_blocking=True)))


_RINGS: dict = {}


def _ring(cp, did: int, n: int):
    """The staging ring of GPU ``did`` when a chunk of ``n`` bytes fits a slot, else None (pageable copy)."""
    with _POOL_LOCK:
        r = _RINGS.get(did)
        if r is None or r.nbytes < CHUNK_BYTES:
            try:
                r = _RINGS[did] = _Ring(cp, did, CHUNK_BYTES)
            except Exception:  # noqa: BLE001 - no pinned memory: the plain (pageable) copies still work
                r = _RINGS[did] = None
    return r if r is not None and n <= r.nbytes else None


def _host_bytes(a) -> memoryview:
    """The bytes of a C-contiguous host array, as a flat memoryview (no copy)."""
    return memoryview(a.reshape(-1).view(np.uint8))


def _d2h(cp, did, slot, src, lo: int, hi: int):
    """Bytes ``lo..hi`` of the C-contiguous CuPy array ``src`` in host memory: in the pinned ``slot``
    (async copy on its stream, then waited for), or a fresh host array without a slot."""
    with cp.cuda.Device(did):
        if slot is None:
            return memoryview(cp.asnumpy(src.reshape(-1).view(cp.uint8)[lo:hi]))
        host, stream = slot
        cp.cuda.runtime.memcpyAsync(host.ctypes.data, src.data.ptr + lo, hi - lo,
                                    cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        stream.synchronize()
    return memoryview(host)[:hi - lo]


class DataFile:
    """One writing rank's data file: chunks appended in order by the calling thread (one ``write`` call
    per chunk), the kernel's writeback of each chunk started at once (``sync_file_range``, on a helper
    thread, so the disk works while the next chunks are copied), one ``fsync`` on close."""

    def __init__(self, directory: str, name: str):
        self.name = name
        self.path = os.path.join(directory, name)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.offset = 0
        self._wb = ThreadPoolExecutor(1, thread_name_prefix="mpilocal-ckpt-writeback") if _SFR else None

    def append(self, mv: memoryview) -> int:
        """Write the bytes ``mv`` at the end; returns their offset in the file."""
        start, n = self.offset, len(mv)
        hook = fault_hook
        if hook is not None:
            hook(self.path, start, n)
        done = 0
        while done < n:
            w = os.write(self.fd, mv[done:done + (1 << 30)])
            if w <= 0:
                raise OSError(errno.EIO, f"write to {self.path} made no progress")
            done += w
        self.offset += n
        if self._wb is not None and n:
            self._wb.submit(_SFR, self.fd, start, n, _SFR_WRITE)
        return start

    def close(self, sync: bool = True) -> None:
        if self.fd is None:
            return
        try:
            if self._wb is not None:
                self._wb.shutdown(wait=True)  # (sync_file_range is only a hint: its result is not needed)
            if sync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = None


def write_pieces(f: DataFile, pieces) -> list:
    """Write ``pieces`` -- ``(src, lo, hi)``: bytes ``lo..hi`` of the C-contiguous NumPy or CuPy array
    ``src`` -- one after the other at the end of ``f``; returns ``[(file offset, crc32)]``.

    The calling thread only writes. The pool computes each piece's crc32 while the next pieces are
    written, and copies CuPy pieces into pinned staging buffers a few pieces ahead of the writes."""
    pool = io_pool()
    devs = [device_of(src) for src, _, _ in pieces]
    order = [j for j, d in enumerate(devs) if d is not None]
    staged = {}  # j -> (copy future, ring, slot)
    nlaunched = 0

    def launch(upto):
        nonlocal nlaunched
        while nlaunched < min(upto, len(order)):
            j = order[nlaunched]
            nlaunched += 1
            src, lo, hi = pieces[j]
            cp, did = devs[j]
            ring = _ring(cp, did, hi - lo)
            slot = ring.free.get() if ring is not None else None
            try:
                staged[j] = (pool.submit(_d2h, cp, did, slot, src, lo, hi), ring, slot)
            except BaseException:
                if slot is not None:
                    ring.free.put(slot)
                raise

    def free_after(fut, ring, slot):
        if slot is not None:
            fut.add_done_callback(lambda _f: ring.free.put(slot))

    out, ndev = [], 0
    try:
        for j, (src, lo, hi) in enumerate(pieces):
            if devs[j] is None:
                mv = _host_bytes(src)[lo:hi]
                crc = pool.submit(_crc, mv)  # (runs while this piece is written)
                out.append((f.append(mv), crc))
                continue
            launch(ndev + max(1, STAGE_SLOTS - 2))
            ndev += 1
            fut, ring, slot = staged.pop(j)
            crc = fut  # (until the crc32 is submitted: the slot is freed after the copy)
            try:
                mv = fut.result()
                crc = pool.submit(_crc, mv)
                out.append((f.append(mv), crc))
            finally:
                free_after(crc, ring, slot)  # once the crc32 has read it (the write is done by then)
    finally:
        for fut, ring, slot in staged.values():  # launched, never written (an error): free once copied
            free_after(fut, ring, slot)
    return [(off, crc.result()) for off, crc in out]


def row_blocks(shape, itemsize: int, limit: int | None = None):
    """``(start, stop)`` row ranges along dim 0 cutting an array of ``shape`` into pieces of at most
    ``limit`` bytes (default ``CHUNK_BYTES``; at least one row each); a 0-d array is one block
    ``(None, None)``."""
    limit = CHUNK_BYTES if limit is None else limit
    if len(shape) == 0:
        return [(None, None)]
    if 0 in shape:
        return []
    row = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    per = max(1, limit // max(row, 1))
    return [(s, min(s + per, shape[0])) for s in range(0, shape[0], per)]


def contiguous_boxes(shape, itemsize: int, limit: int | None = None) -> list:
    """The chunks of a C-ordered array of ``shape``: ``(offsets, box shape, first byte, end byte)`` of
    boxes of at most ``limit`` bytes (default ``CHUNK_BYTES``; at least one element each) that are each
    one contiguous byte range of the array, in order. Rows that fit are grouped (:func:`row_blocks`);
    a row larger than ``limit`` is cut the same way along the next dim, with the leading indices fixed
    (a box of shape ``(1, .., 1, k, rest)``), so a piece boundary need not fall on a row boundary."""
    limit = CHUNK_BYTES if limit is None else limit
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return [((), (), 0, itemsize)]
    if 0 in shape:
        return []
    out = []

    def walk(prefix, dims, base):
        slab = itemsize * int(np.prod(dims[1:], dtype=np.int64))  # bytes of one index of dims[0]
        if slab <= limit or len(dims) == 1:
            for a, b in row_blocks(dims, itemsize, limit):
                out.append((prefix + (a,) + (0,) * (len(dims) - 1), (1,) * len(prefix) + (b - a,) + dims[1:],
                            base + a * slab, base + b * slab))
            return
        for i in range(dims[0]):
            walk(prefix + (i,), dims[1:], base + i * slab)

    walk((), shape, 0)
    return out


# -- reading --------------------------------------------------------------------------------------
class Files:
    """Open data files of one checkpoint directory, for positioned reads (from the pool's threads)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._fds = {}

    def fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            if not isinstance(name, str) or os.sep in name or name.startswith("."):
                raise CheckpointError(f"{self.directory}/{MANIFEST} names a data file {name!r} outside the checkpoint")
            try:
                fd = self._fds[name] = os.open(os.path.join(self.directory, name), os.O_RDONLY)
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {self.directory} is damaged: data file {name} is missing") from None
        return fd

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def pread(self, key: str, ch: dict, mv: memoryview) -> None:
        """Read chunk ``ch`` of ``key`` into ``mv`` (its length), by positioned reads."""
        fd, n, off = self._fds[ch["file"]], len(mv), ch["offset"]
        pos = 0
        while pos < n:
            got = os.preadv(fd, [mv[pos:pos + (1 << 30)]], off + pos)
            if got <= 0:
                raise CheckpointError(
                    f"checkpoint {self.directory} is damaged: {ch['file']} is truncated; the chunk of {key!r} at "
                    f"offsets {ch['offsets']} needs bytes {off}..{off + n} of it but the file ends at {off + pos}")
            pos += got

    def verify(self, key: str, ch: dict, mv) -> None:
        if _crc(mv) != ch["crc32"]:
            off, n = ch["offset"], ch["length"]
            raise CheckpointError(
                f"checkpoint {self.directory} is damaged: crc32 mismatch in {ch['file']} for {key!r} (chunk at "
                f"offsets {ch['offsets']}, shape {ch['shape']}, bytes {off}..{off + n}); restore it from a good copy")

    def read_chunk(self, key: str, ch: dict, dst, sel, dtype) -> None:
        """Read chunk ``ch`` of ``key``, check its crc32, and put its part ``sel`` (slices; None: all of
        it, ``dst`` then being C-contiguous) into ``dst``, a view of the target (NumPy, or CuPy: through
        a pinned staging buffer, the copy to the device overlapped with the crc32)."""
        self.finish(key, ch, dst, sel, dtype, self.fetch(key, ch, dst, sel))

    def fetch(self, key: str, ch: dict, dst, sel):
        """The read half of :meth:`read_chunk`: the chunk's bytes in host memory (in ``dst`` itself, a
        chunk buffer, or a pinned slot taken from the ring; :meth:`finish` gives it back)."""
        n, dev = ch["length"], device_of(dst)
        if dev is None:
            buf = _host_bytes(dst) if sel is None else memoryview(np.empty(n, np.uint8))
            self.pread(key, ch, buf)
            return buf, None, None
        ring = _ring(dev[0], dev[1], n)
        slot = ring.free.get() if ring is not None else None
        try:
            host = slot[0][:n] if slot is not None else np.empty(n, np.uint8)
            self.pread(key, ch, memoryview(host))
        except BaseException:
            if slot is not None:
                ring.free.put(slot)
            raise
        return host, ring, slot

    def finish(self, key: str, ch: dict, dst, sel, dtype, got) -> None:
        """The rest of :meth:`read_chunk` (on the pool): crc32, then the bytes into ``dst``."""
        buf, ring, slot = got
        dev = device_of(dst)
        if dev is None:
            self.verify(key, ch, buf)
            if sel is not None:
                dst[...] = np.frombuffer(buf, dtype).reshape(ch["shape"])[sel]
            return
        cp, did = dev
        try:
            with cp.cuda.Device(did):
                if sel is None and slot is not None:
                    stream = slot[1]
                    cp.cuda.runtime.memcpyAsync(dst.data.ptr, buf.ctypes.data, ch["length"],
                                                cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
                    try:
                        self.verify(key, ch, buf)
                    finally:
                        stream.synchronize()
                    return
                self.verify(key, ch, buf)
                part = np.ascontiguousarray(buf.view(dtype).reshape(ch["shape"])[sel if sel is not None else ...])
                dst[...] = cp.asarray(part.reshape(-1)).reshape(dst.shape)  # (0-d: see host_to_cupy)
                cp.cuda.get_current_stream().synchronize()
        finally:
            if slot is not None:
                ring.free.put(slot)


def wait_all(futures) -> None:
    """Wait for every future; raise the first one's error (in the order given) after all have ended."""
    first = None
    for fut in futures:
        try:
            fut.result()
        except BaseException as e:  # noqa: BLE001 - the first is raised once all are done
            first = first or e
    if first is not None:
        raise first


def read_box(files: Files, key: str, entry: dict, offsets, shape, out=None, pending=None):
    """The box ``offsets``/``shape`` of array ``key``, read from the chunks that overlap it (each
    overlapping chunk is read whole once, to check its crc32; :func:`run_reads`).
    ``out``: a preallocated C-contiguous target (NumPy, or CuPy of the saved dtype). With a list
    ``pending``, the reads are appended to it and the call returns at once (``out`` is filled by
    :func:`run_reads` of the list, which orders the reads of several boxes by file and offset)."""
    dt = np.dtype(entry["dtype"])
    shape = tuple(int(s) for s in shape)
    if out is None:
        out = np.empty(shape, dtype=dt)
    covered, jobs = 0, []
    for ch in entry["chunks"]:
        co, cs = ch["offsets"], ch["shape"]
        lo = [max(a, b) for a, b in zip(offsets, co)]
        hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, shape, co, cs)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        if ch["length"] != dt.itemsize * int(np.prod(cs, dtype=np.int64)):
            raise CheckpointError(f"checkpoint {files.directory} is damaged: the chunk of {key!r} at offsets {co} "
                                  f"has length {ch['length']}, its shape {cs} of {dt.str} needs "
                                  f"{dt.itemsize * int(np.prod(cs, dtype=np.int64))}")
        # (a view even for 0-d: out[()] would be a scalar copy)
        dst = out[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, offsets)) + (Ellipsis,)]
        whole = list(lo) == list(co) and [h - l for l, h in zip(lo, hi)] == list(cs)
        sel = None if whole and dst.flags.c_contiguous else tuple(
            slice(l - b, h - b) for l, h, b in zip(lo, hi, co)) + (Ellipsis,)
        files.fd(ch["file"])  # opened here, on the calling thread
        jobs.append((ch, dst, sel))
        covered += int(np.prod([h - l for l, h in zip(lo, hi)], dtype=np.int64))
    if covered != int(np.prod(shape, dtype=np.int64)):
        raise CheckpointError(
            f"checkpoint {files.directory} is damaged: the chunks of {key!r} cover {covered} of the "
            f"{int(np.prod(shape))} elements of box offsets {list(offsets)} shape {list(shape)}")
    jobs = [(key, ch, dst, sel, dt) for ch, dst, sel in jobs]
    if pending is None:
        run_reads(files, jobs)
    else:
        pending.extend(jobs)
    return out


def run_reads(files: Files, jobs) -> None:
    """Run the reads ``jobs`` (from :func:`read_box`): ``(key, chunk, dst, sel, dtype)``. Raises the
    first error (in file order) once every read has ended.

    With ``READ_THREADS`` = 1 (the default below 8 CPUs): the calling thread reads the chunks one
    after the other in file order, the access pattern the kernel's readahead serves best (it beat
    parallel reads of the same file on the 2-core development VM), while the pool checks each chunk's
    crc32 and moves its bytes (to the device, or the overlap of a partial chunk) as the next ones are
    read. With ``READ_THREADS`` > 1 (the default from 8 CPUs, or ``MPILOCAL_CKPT_READ_THREADS``),
    whole reads run on the pool at once (docs/checkpoint.md, "Bandwidth")."""
    jobs = sorted(jobs, key=lambda j: (j[1]["file"], j[1]["offset"]))
    pool = io_pool()
    if READ_THREADS > 1:  # at most READ_THREADS reads in flight (the pool may have more threads)
        gate, futs = threading.BoundedSemaphore(READ_THREADS), []
        for j in jobs:
            gate.acquire()
            futs.append(pool.submit(files.read_chunk, *j))
            futs[-1].add_done_callback(lambda _f: gate.release())
        wait_all(futs)
        return
    futs, first = [], None
    for i, (key, ch, dst, sel, dt) in enumerate(jobs):
        try:
            got = files.fetch(key, ch, dst, sel)
        except BaseException as e:  # noqa: BLE001 - raised once the reads in flight have ended
            first = e
            break
        futs.append(pool.submit(files.finish, key, ch, dst, sel, dt, got))
        if sel is not None and device_of(dst) is None and i >= 2 * IO_THREADS:
            futs[i - 2 * IO_THREADS].exception()  # (bounds the chunk buffers of partial overlaps in flight)
    try:
        wait_all(futs)
    except BaseException as e:  # noqa: BLE001 - the earliest in file order (a chunk read before the failed read)
        first = e
    if first is not None:
        raise first


def read_array(path, key: str):
    """The global array (a NumPy array with the saved dtype, byte order kept) or JSON value stored
    under the dotted ``key`` of the checkpoint at ``path``. One process, no MPI.

    Raises :class:`CheckpointError` when ``path`` is not a checkpoint, the key is missing, or a chunk is
    damaged (crc32 mismatch or truncated file, naming the key and the file).
    """
    d, m = read_manifest(path)
    entry = m["entries"].get(key)
    if entry is None:
        keys = list(m["entries"])
        raise CheckpointError(f"read_array: checkpoint {d} has no key {key!r}; it has {keys[:20]}"
                              f"{' ...' if len(keys) > 20 else ''}")
    if entry["kind"] == "value":
        return entry["value"]
    shape = tuple(entry["shape"])
    files = Files(d)
    try:
        return read_box(files, key, entry, (0,) * len(shape), shape)
    finally:
        files.close()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def describe(path) -> str:
    """The text of ``python -m mpilocal.checkpoint ls PATH``."""
    d, m = read_manifest(path)
    _, note = resolve(path)
    rows = [("key", "shape", "dtype", "saved placements (mesh)", "size", "chunks")]
    total = 0
    for key, e in m["entries"].items():
        if e["kind"] == "value":
            rows.append((key, "-", type(e["value"]).__name__, "value " + json.dumps(e["value"])[:40], "-", "-"))
            continue
        nbytes = sum(c["length"] for c in e["chunks"])
        total += nbytes
        pl = ", ".join(e["placements"]) if e.get("placements") else "replicated array"
        mesh = f" on {'x'.join(map(str, e['mesh_shape']))}" if e.get("mesh_shape") else ""
        rows.append((key, str(tuple(e["shape"])), e["dtype"], f"[{pl}]{mesh}" if e.get("placements") else pl,
                     _size(nbytes), str(len(e["chunks"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"checkpoint {d} (format {m['format']} v{m['version']}, saved by {m.get('world_size')} ranks, "
             f"{len(m.get('files', []))} data files, {_size(total)})"]
    if note:
        lines.append("note: " + note)
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
