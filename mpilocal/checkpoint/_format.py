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
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "FORMAT", "VERSION", "MANIFEST", "CHUNK_BYTES", "CheckpointError",
    "read_array", "read_manifest", "resolve", "tmp_dir", "old_dir", "flatten", "dtype_str",
    "DataFile", "read_box", "remove_tree", "fsync_dir", "describe",
]

FORMAT = "mpilocal-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
CHUNK_BYTES = 16 << 20   # a shard is cut into chunks of at most this many bytes (along its first dim);
                         # each chunk's crc32 runs on a worker thread while the next chunk moves
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


# -- writing --------------------------------------------------------------------------------------
_POOL = []
_POOL_LOCK = threading.Lock()


def crc_pool() -> ThreadPoolExecutor:
    """Worker threads computing the chunks' crc32 while the calling thread moves bytes (zlib.crc32
    releases the GIL): one chunk per task, so several chunks are checked at once."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="mpilocal-crc"))
        return _POOL[0]


def _pick_crc32():
    """zlib's CRC-32, from the fastest module present: python-isal or zlib-ng (SIMD, several GB/s,
    optional) or the standard library's zlib (~1.5 GB/s per core). All give the same values.
    ``MPILOCAL_CKPT_CRC=zlib`` forces the standard library."""
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


class DataFile:
    """One writing rank's data file: chunks appended, each with its crc32; fsync on close."""

    def __init__(self, directory: str, name: str):
        self.name = name
        self.path = os.path.join(directory, name)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.offset = 0

    def append(self, buf):
        """Write ``buf`` (a C-contiguous array) at the end; ``(offset, length, crc32 future)``."""
        mv = memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
        start, n = self.offset, len(mv)
        crc = crc_pool().submit(_crc, mv)
        hook = fault_hook
        if hook is not None:
            hook(self.path, self.offset, n)
        done = 0
        while done < n:
            w = os.write(self.fd, mv[done:done + (1 << 30)])
            if w <= 0:
                raise OSError(errno.EIO, f"write to {self.path} made no progress")
            done += w
        self.offset += n
        return start, n, crc

    def close(self, sync: bool = True) -> None:
        if self.fd is None:
            return
        try:
            if sync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = None


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


# -- reading --------------------------------------------------------------------------------------
class Files:
    """Open data files of one checkpoint directory, for positioned reads."""

    def __init__(self, directory: str):
        self.directory = directory
        self._fds = {}

    def fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            if os.sep in name or name.startswith("."):
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

    def read_chunk(self, key: str, ch: dict, into):
        """Read chunk ``ch`` of ``key`` into the buffer ``into`` and check its length now; returns a
        future whose ``result()`` raises :class:`CheckpointError` on a crc32 mismatch."""
        fd, name = self.fd(ch["file"]), ch["file"]
        mv = memoryview(into).cast("B")
        n, off = ch["length"], ch["offset"]
        if len(mv) != n:
            raise CheckpointError(f"checkpoint {self.directory}: chunk of {key!r} has length {n}, expected {len(mv)}")
        pos = 0
        while pos < n:
            got = os.preadv(fd, [mv[pos:pos + (1 << 30)]], off + pos)
            if got <= 0:
                raise CheckpointError(
                    f"checkpoint {self.directory} is damaged: {name} is truncated; the chunk of {key!r} at offsets "
                    f"{ch['offsets']} needs bytes {off}..{off + n} of it but the file ends at {off + pos}")
            pos += got
        return crc_pool().submit(self._verify, key, ch, mv)

    def _verify(self, key, ch, mv):
        if _crc(mv) != ch["crc32"]:
            off, n = ch["offset"], ch["length"]
            raise CheckpointError(
                f"checkpoint {self.directory} is damaged: crc32 mismatch in {ch['file']} for {key!r} (chunk at "
                f"offsets {ch['offsets']}, shape {ch['shape']}, bytes {off}..{off + n}); restore it from a good copy")


def read_box(files: Files, key: str, entry: dict, offsets, shape, out=None) -> np.ndarray:
    """The box ``offsets``/``shape`` of array ``key``, read from the chunks that overlap it (each
    overlapping chunk is read whole once, to check its crc32). ``out``: a preallocated host array."""
    dt = np.dtype(entry["dtype"])
    shape = tuple(int(s) for s in shape)
    if out is None:
        out = np.empty(shape, dtype=dt)
    covered, checks = 0, []
    for ch in entry["chunks"]:
        co, cs = ch["offsets"], ch["shape"]
        lo = [max(a, b) for a, b in zip(offsets, co)]
        hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, shape, co, cs)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        # (a view even for 0-d: out[()] would be a scalar copy)
        dst = out[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, offsets)) + (Ellipsis,)]
        whole = list(lo) == list(co) and [h - l for l, h in zip(lo, hi)] == list(cs)
        if whole and dst.flags.c_contiguous:
            checks.append(files.read_chunk(key, ch, dst.reshape(-1).view(np.uint8)))
        else:
            buf = np.empty(ch["length"], dtype=np.uint8)
            checks.append(files.read_chunk(key, ch, buf))
            src = buf.view(dt).reshape(cs)
            dst[...] = src[tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, co)) + (Ellipsis,)]
        covered += int(np.prod([h - l for l, h in zip(lo, hi)], dtype=np.int64))
    for c in checks:  # crc32 of every chunk read (computed on the pool while the next ones were read)
        c.result()
    if covered != int(np.prod(shape, dtype=np.int64)):
        raise CheckpointError(
            f"checkpoint {files.directory} is damaged: the chunks of {key!r} cover {covered} of the "
            f"{int(np.prod(shape))} elements of box offsets {list(offsets)} shape {list(shape)}")
    return out


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
