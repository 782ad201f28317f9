"""The error-map store on disk: ``index.json`` and the per-case ``.npy`` maps, checked before use.

A store folder holds ``index.json`` (``{"version", "ema_window", "cases": {case_id: [X, Y, Z]}}``) and per
case ``<case_id>.error.npy`` float32, ``<case_id>.variance.npy`` float32 and ``<case_id>.count.npy`` uint8,
each ``(X, Y, Z)``. Nothing here trusts the files: a truncated ``.npy`` would be silently zero-extended by
``np.memmap(mode="r+")``, and a shape other than the index's would let a compiled kernel write past the
map, so every map is checked (header, dtype, shape against the index, file size) before it is
memory-mapped, and error and variance values are checked to lie in [0, 1] (NaN included) before a case
is first used in a process and whenever a store is copied. Every problem names the file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from custom.core.atomic import atomic_path, disk_full_error
from custom.core.errors import BraTSInputError
from custom.uncertainty.store_kernels import HAVE_NUMBA, first_outside_unit

STORE_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
#: kinds of map per case and their dtypes
KINDS = ("error", "variance", "count")
DTYPES = {"error": np.dtype(np.float32), "variance": np.dtype(np.float32), "count": np.dtype(np.uint8)}
#: kinds whose values must lie in [0, 1] (counts are uint8, any value is a count)
UNIT_KINDS = ("error", "variance")

_CHUNK_BYTES = 16 << 20


def map_path(store_dir, case_id: str, kind: str) -> Path:
    return Path(store_dir) / f"{case_id}.{kind}.npy"


def _damaged(problems, store_dir) -> BraTSInputError:
    return BraTSInputError(problems, header=f"error-map store {store_dir} is damaged (resume restores the store from "
                                            "store_snapshot/; otherwise start a new run)")


def read_index(store_dir) -> dict:
    """The parsed and checked ``index.json`` of ``store_dir``.

    Raises:
        FileNotFoundError: no index.json.
        BraTSInputError: unreadable JSON, or entries that are not a version, a window and 3-D shapes.
    """
    path = Path(store_dir) / INDEX_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise _damaged([f"{path}: unreadable ({exc})"], store_dir) from None
    try:
        index = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _damaged([f"{path}: not valid JSON ({exc})"], store_dir) from None
    problems = []
    if not isinstance(index, dict) or not isinstance(index.get("cases"), dict):
        raise _damaged([f"{path}: expected an object with a 'cases' object, got {type(index).__name__}"],
                       store_dir)
    if index.get("version") != STORE_FORMAT_VERSION:
        problems.append(f"{path}: format version {index.get('version')!r}, this code reads {STORE_FORMAT_VERSION}")
    window = index.get("ema_window")
    if not isinstance(window, int) or not 1 <= window <= 255:
        problems.append(f"{path}: ema_window {window!r} is not an integer in [1, 255]")
    for case_id, shape in index["cases"].items():
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s >= 1 for s in shape)):
            problems.append(f"{path}: case {case_id!r} has shape {shape!r}, expected 3 positive integers")
    if problems:
        raise _damaged(problems, store_dir)
    return index


def _read_header(fh) -> tuple:
    """``(shape, fortran_order, dtype, data offset)`` of an open ``.npy`` file."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    return tuple(shape), bool(fortran), np.dtype(dtype), fh.tell()


def check_map_file(path: Path, kind: str, shape) -> tuple[int, list[str]]:
    """Check one map file's header and size against ``shape`` (from the ``index.json`` beside it); returns
    ``(data offset, problems)``."""
    expected = DTYPES[kind]
    try:
        with open(path, "rb") as fh:
            file_shape, fortran, dtype, offset = _read_header(fh)
            size = os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        return 0, [f"{path}: missing"]
    except (OSError, ValueError, SyntaxError) as exc:
        return 0, [f"{path}: not a readable .npy file ({exc})"]
    problems = []
    if dtype != expected:
        problems.append(f"{path}: holds {dtype} values, expected {expected}")
    if fortran:
        problems.append(f"{path}: Fortran-ordered, expected C order")
    if file_shape != tuple(shape):
        problems.append(f"{path}: shape {list(file_shape)} differs from {path.parent / INDEX_NAME}'s {list(shape)}")
    needed = offset + int(np.prod(file_shape, dtype=np.int64)) * dtype.itemsize
    if not problems and size != needed:
        problems.append(f"{path}: {size} bytes, a {list(file_shape)} {dtype} map needs {needed} "
                        f"({'truncated' if size < needed else 'trailing bytes'})")
    return offset, problems


def first_bad_value(values: np.ndarray) -> int:
    """Flat index of the first value outside [0, 1] (NaN included) in a contiguous array, or -1."""
    flat = values.reshape(-1)
    if HAVE_NUMBA:
        return int(first_outside_unit(flat))
    bad = np.flatnonzero(~((flat >= 0) & (flat <= 1)))
    return int(bad[0]) if bad.size else -1


def _value_problem(path, values: np.ndarray, shape, start: int = 0) -> str | None:
    i = first_bad_value(values)
    if i < 0:
        return None
    flat = start + i
    voxel = [int(k) for k in np.unravel_index(flat, tuple(shape))]
    return (f"{path}: value {values.reshape(-1)[i]!r} at voxel {voxel} is outside [0, 1] "
            "(a non-finite or corrupt store value)")


def open_case(store_dir, case_id: str, shape, check_values: bool) -> dict:
    """Memory-map (``r+``) the three maps of a case after checking them.

    Raises:
        BraTSInputError: naming every missing, truncated, mis-shaped or mistyped file, or (with
            ``check_values``) a value of error or variance outside [0, 1].
    """
    problems, offsets = [], {}
    for kind in KINDS:
        offsets[kind], bad = check_map_file(map_path(store_dir, case_id, kind), kind, shape)
        problems += bad
    if problems:
        raise _damaged(problems, store_dir)
    maps = {kind: np.memmap(map_path(store_dir, case_id, kind), dtype=DTYPES[kind], mode="r+",
                            offset=offsets[kind], shape=tuple(shape)) for kind in KINDS}
    if check_values:
        for kind in UNIT_KINDS:
            problem = _value_problem(map_path(store_dir, case_id, kind), np.asarray(maps[kind]), shape)
            if problem:
                raise _damaged([problem], store_dir)
    return maps


def write_zero_maps(store_dir, case_id: str, shape) -> None:
    """Zero maps of ``case_id`` (each file written atomically)."""
    for kind in KINDS:
        with atomic_path(map_path(store_dir, case_id, kind)) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[kind], shape=tuple(int(s) for s in shape))
            mm.flush()
            del mm


def _copy_map_checked(src: Path, dst: Path, kind: str, shape, store_dir) -> None:
    """Copy one map file in chunks, checking header, size and (error, variance) values on the way."""
    offset, problems = check_map_file(src, kind, shape)
    if problems:
        raise _damaged(problems, store_dir)
    itemsize = DTYPES[kind].itemsize
    chunk = (_CHUNK_BYTES // itemsize) * itemsize
    buf = np.empty(chunk // itemsize, dtype=DTYPES[kind])
    view = memoryview(buf).cast("B")
    done = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(fin.read(offset))
        while True:
            n = fin.readinto(view)
            if not n:
                break
            if kind in UNIT_KINDS:
                problem = _value_problem(src, buf[:n // itemsize], shape, start=done)
                if problem:
                    raise _damaged([problem], store_dir)
            fout.write(view[:n])
            done += n // itemsize
        fout.flush()
        os.fsync(fout.fileno())


def copy_store_checked(src_dir, dst_dir, meta: Mapping | None = None, meta_name: str = "epoch.json") -> Path:
    """Copy a store (``index.json`` and every case's maps, nothing else) to ``dst_dir``, replacing it whole
    or not at all; every map is checked on the way and ``meta`` (JSON) is written last as ``meta_name``.

    Raises:
        BraTSInputError: a damaged source file (named; ``dst_dir`` is left as it was).
        OSError: ``ENOSPC``/``EDQUOT`` with the destination and the free space named (disk full).
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    index = read_index(src_dir)
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_dir.with_name(f".{dst_dir.name}.tmp-{os.getpid()}")
    old = dst_dir.with_name(f".{dst_dir.name}.tmp-old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for case_id, shape in index["cases"].items():
            for kind in KINDS:
                _copy_map_checked(map_path(src_dir, case_id, kind), map_path(tmp, case_id, kind), kind, shape,
                                  src_dir)
        _write_json_synced(tmp / INDEX_NAME, index)
        if meta is not None:
            _write_json_synced(tmp / meta_name, dict(meta))
        _fsync_dir(tmp)
        if dst_dir.exists():
            os.replace(dst_dir, old)
        os.replace(tmp, dst_dir)
        _fsync_dir(dst_dir.parent)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(dst_dir, exc) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dst_dir


def read_meta(store_dir, meta_name: str = "epoch.json") -> dict | None:
    """The JSON ``meta_name`` of a store copy, or None when it is missing or unreadable."""
    try:
        meta = json.loads((Path(store_dir) / meta_name).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_json_synced(path: Path, obj) -> None:
    with open(path, "w") as fh:
        fh.write(json.dumps(obj, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
