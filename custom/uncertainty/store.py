"""The training target of the uncertainty channel: prediction failure, its case-space EMA, variance baselines.

METHOD.md, "Error map": each iteration, from the detached forward pass,
``f = [p_WT > 0.5] != GT_WT`` (prediction failure), ``f_s = mean_3x3x3(f)`` (zero padding), and for
every case voxel ``v`` covered by the patch: ``n_v += 1``, ``a_v = max(1/n_v, 1/W)``,
``e_v <- (1 - a_v) e_v + a_v f_s(v)`` (``W = ema_window``). ``error_stable = e``. The same schedule on
``var1shot = 4 p_WT (1 - p_WT)`` gives ``variance_stable``.

The EMA lives in CASE space (the preprocessed case grid), not patch space, so that it stays aligned
with the anatomy under random crops, flips, rotations and zooms: the training pipeline carries each
voxel's case coordinates (index + 1, 0 = padding, see :class:`custom.transforms.dictionary.AddCaseCoordinatesd`)
through the augmentation, and :class:`ErrorMapStore` gathers/scatters through them.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from custom.core.atomic import atomic_write_json
from custom.uncertainty.store_files import (
    INDEX_NAME,
    KINDS,
    STORE_FORMAT_VERSION,
    copy_store_checked,
    map_path,
    open_case,
    read_index,
    write_zero_maps,
)
from custom.uncertainty.store_kernels import (
    HAVE_NUMBA,
    STATUS_BAD_VALUE,
    gather_kernel,
    sample_not_index,
    scatter_kernel,
    separable_update,
    separable_verify,
    slices_update,
    slices_verify,
    slices_verify_int,
    slices_verify_words,
)

#: ``fresh`` marker: the compiled scatter already gathered the updated values into the outputs
_GATHERED = "gathered"

_SAFE_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------------------------ store
def _to_numpy(x, dtype=np.float32) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _coords_numpy(coords) -> np.ndarray:
    """Coordinates as numpy: int16/int32 as they come (the training batches carry int16: half the bytes to
    read), anything else as float32."""
    c = _to_numpy(coords, dtype=None)
    return c if c.dtype in (np.int16, np.int32) else c.astype(np.float32, copy=False)


def _axis_slice(profile: np.ndarray):
    """If ``profile`` (1-D, case index + 1) is consecutive integers with step +1 or -1, return
    ``(start, stop, step)``."""
    if not (profile[0] >= 1 and profile[0] == int(profile[0])):
        return None
    if profile.size == 1:
        return int(profile[0]) - 1, int(profile[0]), 1
    step = profile[1] - profile[0]
    if step not in (1.0, -1.0):
        return None
    expected = profile[0] + step * np.arange(profile.size, dtype=np.float32)
    if not np.array_equal(profile, expected):
        return None
    return int(profile[0]) - 1, int(profile[-1]) - 1, int(step)


def _verify_box(c: np.ndarray, lo, hi, first, step) -> bool:
    """The compiled exact box check for float32 or integer coordinates (int16 rows of whole 64-bit words:
    four voxels per operation)."""
    if c.dtype == np.float32:
        return bool(slices_verify(np.ascontiguousarray(c), lo, hi, first, step))
    if c.dtype == np.int16 and c.flags.c_contiguous and c.shape[3] % 4 == 0 and c.ctypes.data % 8 == 0:
        n = c.shape[3]
        mask = np.zeros(n, np.int16)
        mask[lo[2]:hi[2]] = 1
        expected = np.zeros(n, np.int16)
        expected[lo[2]:hi[2]] = first[2] + step[2] * np.arange(hi[2] - lo[2])
        return bool(slices_verify_words(c.view(np.int64), mask.view(np.int64), expected.view(np.int64), lo, hi,
                                        first, step))
    return bool(slices_verify_int(np.ascontiguousarray(c), lo, hi, first, step))


def centre_profiles(c) -> tuple:
    """The three centre lines of coordinates ``c (3, X, Y, Z)``, channel k along axis k (numpy or torch)."""
    centre = [int(s) // 2 for s in c.shape[1:]]
    return c[0, :, centre[1], centre[2]], c[1, centre[0], :, centre[2]], c[2, centre[0], centre[1], :]


def slices_candidate(profiles, shape) -> tuple | None:
    """``(case slices, patch box, flips)`` of the axis-aligned crop (mirrored, zero padded) that the centre
    ``profiles`` (numpy) of a coordinate patch describe in a case of ``shape``, or None; the rest of the
    patch must still be checked against it."""
    case_sl, patch_sl, flips = [], [], []
    for axis, prof in enumerate(profiles):
        nz = np.flatnonzero(prof)
        if nz.size == 0:
            return None
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        if hi - lo != nz.size:
            return None
        info = _axis_slice(prof[lo:hi])
        if info is None:
            return None
        first, last, step = info
        a, b = min(first, last), max(first, last) + 1
        if a < 0 or b > shape[axis]:
            return None
        case_sl.append(slice(a, b))
        patch_sl.append(slice(lo, hi))
        flips.append(step < 0)
    return tuple(case_sl), tuple(patch_sl), tuple(flips)


class ErrorMapStore:
    """Case-space EMA store of ``error_stable``, ``variance_stable`` and visit counts, on disk.

    Layout of ``store_dir``: per case ``<case_id>.error.npy`` float32, ``<case_id>.variance.npy``
    float32, ``<case_id>.count.npy`` uint8 (saturating at 255; the rate only needs ``min(n, W)``), each
    of the case's preprocessed shape ``(X, Y, Z)``, plus ``index.json`` (case shapes, ema_window) and a
    ``<case_id>.lock`` used with ``fcntl.flock`` so several training processes can scatter safely.
    Files are memory-mapped lazily (the store pickles into DataLoader workers without open maps), after
    :mod:`custom.uncertainty.store_files` checked them (size, shape, dtype; values in [0, 1] on the first
    use of a case in a process). Failure and var1shot values outside [0, 1] (NaN included) are refused
    (``ValueError``) and never reach the case.

    Coordinates ``coords (3, *S)`` (float32, or int16 as the training batches carry them) are the case
    index + 1 of each patch voxel (0 on any axis = invalid,
    e.g. padding); see :class:`custom.transforms.dictionary.AddCaseCoordinatesd`.

    Scatter semantics: every case voxel covered by at least one valid patch voxel gets ``n += 1`` once,
    and the update value is the mean of the patch values mapping to it (a zoom-in maps several patch
    voxels to one case voxel). Gather returns, for every patch voxel, the store value at its case voxel
    (0 where invalid).

    Axis-aligned (mirrored) crops are detected exactly and take the slices path; rotated or zoomed
    patches the general path (:mod:`custom.uncertainty.store_kernels` describes both). Each runs as a
    compiled numba kernel when numba imports (``use_numba``), else as torch operations; both give
    bit-identical results.

    Args:
        store_dir: folder of the store (created by :meth:`create`).
        ema_window: ``W`` of ``a = max(1/n, 1/W)``, 1..255.
        use_locks: lock scatter per case (disable only for single-process benchmarks).
        max_open_cases: cases kept memory-mapped at once (least recently used ones are closed).
    """

    MAX_COUNT = 255
    KINDS = KINDS

    def __init__(self, store_dir, ema_window: int = 30, use_locks: bool = True, max_open_cases: int = 64):
        if not 1 <= int(ema_window) <= self.MAX_COUNT:
            raise ValueError(f"ema_window must be in [1, {self.MAX_COUNT}] (counts are uint8), got {ema_window}")
        self.store_dir = Path(store_dir)
        self.ema_window = int(ema_window)
        self.use_locks = bool(use_locks)
        if int(max_open_cases) < 1:
            raise ValueError(f"max_open_cases must be >= 1, got {max_open_cases}")
        #: each open case holds 3 memory maps (one file descriptor each) and a lock descriptor; the least
        #: recently used cases are closed beyond this, so 1248 cases stay far below the usual fd limit
        self.max_open_cases = int(max_open_cases)
        self._maps: OrderedDict = OrderedDict()
        self._lock_fds: OrderedDict = OrderedDict()
        self._shapes: dict | None = None
        #: cases whose values were checked in this process (:func:`custom.uncertainty.store_files.open_case`)
        self._checked: set = set()
        self._work: dict = {}
        self._lock_pid = os.getpid()
        #: use the slicing fast path for axis-aligned crops (False forces the general path, for tests)
        self.allow_fast_path = True
        #: general path through the compiled kernel (default when numba imports; False: torch fallback)
        self.use_numba = HAVE_NUMBA

    # pickling: never ship open memmaps or file descriptors into workers
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        state["_lock_fds"] = OrderedDict()
        state["_shapes"] = None
        state["_checked"] = set()
        state["_work"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Flush and drop the open memory maps and lock files (reopened lazily on next use)."""
        for maps in self._maps.values():
            for mm in maps.values():
                if isinstance(mm, np.memmap):
                    mm.flush()
        self._maps = OrderedDict()
        if self._lock_pid == os.getpid():
            for fd in self._lock_fds.values():
                os.close(fd)
        self._lock_fds = OrderedDict()
        self._shapes = None
        self._work = {}

    def _buffer(self, name: str, shape, dtype) -> np.ndarray:
        """Reusable work array: fresh multi-MB allocations page-fault on every call, which costs more
        than the arithmetic (a store instance is used from one thread)."""
        key = (name, tuple(int(s) for s in shape), np.dtype(dtype).str)
        buf = self._work.get(key)
        if buf is None:
            if len(self._work) > 16:
                self._work.clear()
            buf = self._work[key] = np.empty(key[1], dtype=dtype)
        return buf

    # ------------------------------------------------------------------ index / files
    @property
    def index_path(self) -> Path:
        return self.store_dir / INDEX_NAME

    def _path(self, case_id: str, kind: str) -> Path:
        return map_path(self.store_dir, case_id, kind)

    def _read_index(self) -> dict:
        if not self.index_path.exists():
            return {"version": STORE_FORMAT_VERSION, "ema_window": self.ema_window, "cases": {}}
        return read_index(self.store_dir)

    @property
    def shapes(self) -> dict:
        """``{case_id: (X, Y, Z)}`` of every case in the store."""
        if self._shapes is None:
            self._shapes = {k: tuple(v) for k, v in self._read_index()["cases"].items()}
        return self._shapes

    def __contains__(self, case_id) -> bool:
        return case_id in self.shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def create(self, cases: Mapping[str, Sequence[int]]) -> "ErrorMapStore":
        """Add every case not yet in the store with zero maps (idempotent: existing cases keep their state).

        Args:
            cases: ``{case_id: (X, Y, Z)}`` preprocessed case shapes.
        Raises:
            ValueError: a case id unsafe as a file name, or a case already stored with another shape.
            BraTSInputError: a damaged ``index.json`` (named).
        """
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with open(self.store_dir / ".store.lock", "a+") as lock_fh:
            fcntl.flock(lock_fh.fileno(), fcntl.LOCK_EX)
            index = self._read_index()
            changed = False
            for case_id, shape in cases.items():
                case_id = str(case_id)
                if not _SAFE_CASE_ID.match(case_id):
                    raise ValueError(f"ErrorMapStore: case id {case_id!r} is not usable as a file name")
                shape = [int(s) for s in shape]
                if len(shape) != 3 or min(shape) < 1:
                    raise ValueError(f"ErrorMapStore: case {case_id} needs a 3-D shape, got {shape}")
                old = index["cases"].get(case_id)
                if old is not None and all(self._path(case_id, k).exists() for k in self.KINDS):
                    if list(old) != shape:
                        raise ValueError(f"ErrorMapStore {self.store_dir}: case {case_id} stored with shape "
                                         f"{old}, asked for {shape}")
                    continue
                write_zero_maps(self.store_dir, case_id, shape)
                index["cases"][case_id] = shape
                changed = True
            if changed or not self.index_path.exists():
                index["ema_window"] = self.ema_window
                index["version"] = STORE_FORMAT_VERSION
                atomic_write_json(self.index_path, index)
            fcntl.flock(lock_fh.fileno(), fcntl.LOCK_UN)
        self._shapes = None
        return self

    def reset(self) -> "ErrorMapStore":
        """Zero maps for every case of the index (a run that starts over in an existing folder)."""
        self.close()
        for case_id, shape in self.shapes.items():
            write_zero_maps(self.store_dir, case_id, shape)
        return self

    def _open(self, case_id: str) -> dict:
        maps = self._maps.get(case_id)
        if maps is not None:
            self._maps.move_to_end(case_id)
        else:
            if case_id not in self.shapes:
                self._shapes = None  # another process may have added it
                if case_id not in self.shapes:
                    raise KeyError(f"ErrorMapStore {self.store_dir}: unknown case {case_id!r}")
            maps = open_case(self.store_dir, case_id, self.shapes[case_id], check_values=case_id not in self._checked)
            self._checked.add(case_id)
            self._maps[case_id] = maps
            while len(self._maps) > self.max_open_cases:
                _, old = self._maps.popitem(last=False)
                for mm in old.values():
                    mm.flush()
        return maps

    def _lock(self, case_id: str):
        if self._lock_pid != os.getpid():
            # flock is per open file description: descriptors inherited through fork would not exclude
            # the parent, so a forked process opens its own
            self._lock_fds = OrderedDict()
            self._lock_pid = os.getpid()
        fd = self._lock_fds.get(case_id)
        if fd is None:
            fd = os.open(self.store_dir / f"{case_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            self._lock_fds[case_id] = fd
            while len(self._lock_fds) > self.max_open_cases:
                os.close(self._lock_fds.popitem(last=False)[1])
        else:
            self._lock_fds.move_to_end(case_id)
        return fd

    # ------------------------------------------------------------------ coordinate analysis
    def _analyse(self, case_id: str, coords) -> tuple:
        """Classify ``coords (3, *S)``: ``("slices", case_slices, patch_slices, flips)`` when the valid
        voxels form an axis-aligned (possibly flipped) box surrounded by invalid voxels, else
        ``("general", flat_patch_positions, flat_case_index, None, shape, case_id)`` (torch fallback) or
        ``("general", None, None, coords (3, N), shape, case_id)`` (compiled kernel: it computes the case
        index itself and checks the bounds before it changes anything), or with the compiled kernels
        ``("separable", (p0, p1, p2), None, coords (3, N), shape, case_id)`` for a zoomed, not rotated
        patch (channel k a function ``p_k`` of axis k alone; same arithmetic as the general path)."""
        c = _coords_numpy(coords)
        if c.ndim != 4 or c.shape[0] != 3:
            raise ValueError(f"coords must be (3, X, Y, Z), got {tuple(c.shape)}")
        shape = self.shapes.get(case_id) or tuple(self._open(case_id)["error"].shape)
        fast = self._fast_slices(c, shape) if self.allow_fast_path else None
        if fast is not None:  # every coordinate was compared with its exact box
            return ("slices",) + fast
        # bilinear-resampled or negative coordinates: a sample tells
        numba = self.use_numba and HAVE_NUMBA
        if numba:
            bad = sample_not_index(c.reshape(3, -1), 97)
        else:
            sample = c.reshape(3, -1)[:, ::97]
            bad = not np.array_equal(sample, np.rint(sample)) or sample.min() < 0
        if bad:
            raise self._coords_error(case_id, c, shape, -2)
        if numba and self.allow_fast_path:
            profiles = self._separable(c, shape)
            if profiles is not None:
                return ("separable", profiles, None, c.reshape(3, -1), tuple(int(s) for s in shape), case_id)
        if numba and int(np.prod(shape)) < 2**31:  # int32 slots
            return ("general", None, None, c.reshape(3, -1), tuple(int(s) for s in shape), case_id)
        return ("general",) + self._general_index(case_id, c, shape) + (None, tuple(shape), case_id)

    @staticmethod
    def _separable(c: np.ndarray, shape) -> tuple | None:
        """The three axis profiles (case index + 1, 0 = padding) when ``c`` is separable (checked voxel by
        voxel), else None."""
        profiles = []
        for axis, prof in enumerate(centre_profiles(c)):
            if not prof.any() or prof.min() < 0 or prof.max() > shape[axis] or not np.array_equal(prof, np.rint(prof)):
                return None
            profiles.append(np.ascontiguousarray(prof))
        if not separable_verify(np.ascontiguousarray(c), *profiles):
            return None
        return tuple(profiles)

    @staticmethod
    def _values_error(case_id: str, values) -> ValueError:
        """The error for failure / var1shot values outside [0, 1] (NaN included)."""
        found = []
        for name, v in zip(("failure_smoothed", "variance"), values):
            v = np.asarray(v)
            bad = ~((v >= 0) & (v <= 1))
            if bad.any():
                found.append(f"{name} has {int(bad.sum())} values outside [0, 1] (first: {v[bad].flat[0]!r})")
        return ValueError(f"ErrorMapStore: refusing to update case {case_id}: {'; '.join(found) or 'bad values'} "
                          "(a non-finite prediction?)")

    @staticmethod
    def _coords_error(case_id: str, c3: np.ndarray, shape, status: int) -> ValueError:
        """The error for a kernel status (-1: beyond the case, -2: not a non-negative integer)."""
        if status == -1:
            hi = c3.max(axis=1)
            return ValueError(f"ErrorMapStore: coords reach {hi.astype(int).tolist()} outside case {case_id} "
                              f"of shape {list(shape)} (wrong case id or coordinates?)")
        return ValueError("ErrorMapStore: coords are not non-negative integers; the coordinate channels must "
                          "be resampled with mode='nearest' and padded with zeros (see AddCaseCoordinatesd)")

    @staticmethod
    def _general_index(case_id: str, c: np.ndarray, shape) -> tuple:
        """``(pos, lin)``: flat patch positions of the valid voxels and their flat case indices (int64)."""
        c2 = c.reshape(3, -1)
        valid = c2.min(axis=0) > 0
        hi = c2.max(axis=1)
        if np.any(hi > np.asarray(shape)):
            raise ValueError(f"ErrorMapStore: coords reach {hi.astype(int).tolist()} outside case {case_id} "
                             f"of shape {list(shape)} (wrong case id or coordinates?)")
        strides = np.array([shape[1] * shape[2], shape[2], 1])
        size = int(np.prod(shape))
        # float32 holds every product exactly while the case has < 2**24 voxels (BraTS: ~3.3 M)
        dtype = np.float32 if size < 2**24 else np.float64
        lin_all = (strides.astype(dtype) @ c2.astype(dtype, copy=False)).astype(np.int64)
        pos = np.flatnonzero(valid)
        lin = torch.from_numpy(lin_all).index_select(0, torch.from_numpy(pos)).numpy()
        lin -= int(strides.sum())
        return pos, lin

    def _fast_slices(self, c: np.ndarray, shape) -> tuple | None:
        """Exact, cheap detection of an axis-aligned crop (with flips and zero padding) of the case:
        a candidate box from the three centre lines, then every voxel checked against it."""
        spatial = c.shape[1:]
        profiles = centre_profiles(c)
        candidate = slices_candidate(profiles, shape)
        if candidate is None:
            return None
        case_sl, box, flips = candidate
        patch_sl = list(box)
        if self.use_numba and HAVE_NUMBA:
            lo = np.array([b.start for b in box], np.int64)
            hi = np.array([b.stop for b in box], np.int64)
            first = np.array([cs.stop if f else cs.start + 1 for cs, f in zip(case_sl, flips)], np.int64)
            step = np.array([-1 if f else 1 for f in flips], np.int64)
            if not _verify_box(c, lo, hi, first, step):
                return None
            return candidate
        # exact verification: inside the box each channel equals its broadcast profile ...
        eq = self._buffer("eq", tuple(b.stop - b.start for b in box), bool)
        for axis in range(3):
            view = [1, 1, 1]
            view[axis] = -1
            expected = profiles[axis][patch_sl[axis]].reshape(view)
            np.equal(c[axis][box], expected, out=eq)
            if not eq.all():
                return None
        # ... and outside it everything is invalid (all three channels 0)
        full = tuple(slice(None) for _ in spatial)
        for axis in range(3):
            for part in (slice(0, patch_sl[axis].start), slice(patch_sl[axis].stop, spatial[axis])):
                if part.stop > part.start:
                    sl = list(full)
                    sl[axis] = part
                    if c[(slice(None),) + tuple(sl)].any():
                        return None
        return candidate

    # ------------------------------------------------------------------ gather / scatter
    @staticmethod
    def _oriented(patch_view: np.ndarray, flips) -> np.ndarray:
        """View of a patch box re-ordered into case orientation (undo flips)."""
        sl = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
        return patch_view[sl]

    def gather(self, case_id: str, coords, device=None, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store values at each patch voxel's case coordinates.

        Args:
            case_id: case in the store.
            coords: ``(3, X, Y, Z)`` case coordinates (index + 1, 0 invalid), numpy or torch.
            device: move the results there (e.g. the training GPU).
            out: optional pair of CPU float32 tensors ``(1, X, Y, Z)`` to fill (a reusable staging
                buffer, which avoids page-faulting two fresh multi-MB arrays per call).
        Returns:
            ``(error, variance)``, float32 torch ``(1, X, Y, Z)``, 0 where invalid.
        """
        maps = self._open(case_id)
        return self._gather_plan(maps, self._analyse(case_id, coords), tuple(coords.shape[1:]), device, out)

    def scatter(self, case_id: str, coords, failure_smoothed, variance) -> int:
        """EMA update of ``error`` with ``failure_smoothed`` and of ``variance`` with ``variance`` (var1shot).

        Args:
            case_id: case in the store.
            coords: ``(3, X, Y, Z)`` case coordinates (index + 1, 0 invalid).
            failure_smoothed: ``f_s``, ``(X, Y, Z)`` or ``(1, X, Y, Z)``.
            variance: ``var1shot``, same shape.
        Returns:
            number of case voxels updated.
        """
        maps = self._open(case_id)
        values = self._check_values(coords, failure_smoothed, variance)
        return self._scatter_plan(case_id, maps, self._analyse(case_id, coords), values)[0]

    def update_and_gather(self, case_id: str, coords, failure_smoothed, variance, device=None, out=None):
        """:meth:`scatter` then :meth:`gather` with one coordinate analysis (the training step's order:
        the target of this iteration includes this iteration's observation).

        Returns:
            ``(error, variance)`` as :meth:`gather`.
        """
        maps = self._open(case_id)
        values = self._check_values(coords, failure_smoothed, variance)
        plan = self._analyse(case_id, coords)
        spatial = tuple(int(s) for s in coords.shape[1:])
        out = self._outputs(spatial, out)
        _, fresh = self._scatter_plan(case_id, maps, plan, values, keep_values=True, out=out)
        return self._gather_plan(maps, plan, spatial, device, out, fresh)

    @staticmethod
    def _check_values(coords, failure_smoothed, variance) -> list:
        spatial = tuple(int(s) for s in coords.shape[1:])
        values = []
        for name, v in (("failure_smoothed", failure_smoothed), ("variance", variance)):
            v = _to_numpy(v)
            if v.ndim == 4 and v.shape[0] == 1:
                v = v[0]
            if v.shape != spatial:
                raise ValueError(f"scatter: {name} has shape {v.shape}, coords cover {spatial}")
            values.append(v)
        return values

    @staticmethod
    def _outputs(spatial, out) -> tuple:
        """The pair of CPU float32 ``(1, *spatial)`` result tensors: ``out`` checked, or fresh ones."""
        if out is None:
            return tuple(torch.from_numpy(np.empty(spatial, dtype=np.float32))[None] for _ in range(2))
        for k in range(2):
            if tuple(out[k].shape) != (1,) + spatial or out[k].dtype != torch.float32:
                raise ValueError(f"gather: out[{k}] must be float32 {(1,) + spatial}, got "
                                 f"{out[k].dtype} {tuple(out[k].shape)}")
        return tuple(out)

    def _gather_numba(self, maps, plan, arrs) -> None:
        """Compiled gather of a general plan into the numpy views ``arrs`` (error, variance)."""
        _, _, _, c3, shape, case_id = plan
        flats = [a.reshape(-1) if a.flags.c_contiguous else np.empty(a.size, np.float32) for a in arrs]
        status = gather_kernel(c3, shape[0], shape[1], shape[2], np.asarray(maps["error"]).reshape(-1),
                            np.asarray(maps["variance"]).reshape(-1), flats[0], flats[1], True)
        if status < 0:
            raise self._coords_error(case_id, c3, shape, status)
        for a, flat in zip(arrs, flats):
            if not a.flags.c_contiguous:
                np.copyto(a, flat.reshape(a.shape))

    def _gather_plan(self, maps, plan, spatial, device, out, fresh=None):
        """Fill the patch from the store; ``fresh`` = per-valid-voxel values just written by the general
        scatter (saves re-reading the case at random positions), or ``_GATHERED`` when the compiled
        scatter already filled ``out``."""
        spatial = tuple(int(s) for s in spatial)
        out = self._outputs(spatial, out)
        if fresh is _GATHERED:
            return tuple(t.to(device) if device is not None else t for t in out)
        if plan[0] in ("general", "separable") and plan[3] is not None:
            self._gather_numba(maps, plan, [t.numpy()[0] for t in out])
            return tuple(t.to(device) if device is not None else t for t in out)
        results = []
        for k, kind in enumerate(("error", "variance")):
            t = out[k]
            arr = t.numpy()[0]
            if plan[0] == "slices":
                _, case_sl, box, flips = plan
                if any(b.stop - b.start != n for b, n in zip(box, spatial)):
                    arr.fill(0.0)
                np.copyto(self._oriented(arr[box], flips), maps[kind][case_sl])
            else:
                pos, lin = plan[1], plan[2]
                arr.fill(0.0)
                if fresh is None:
                    got = torch.from_numpy(maps[kind].reshape(-1)).index_select(0, torch.from_numpy(lin))
                else:
                    got = torch.from_numpy(fresh[k])
                torch.from_numpy(arr.reshape(-1)).index_copy_(0, torch.from_numpy(pos), got)
            results.append(t.to(device) if device is not None else t)
        return results[0], results[1]

    def _scatter_plan(self, case_id, maps, plan, values, keep_values: bool = False, out=None) -> tuple:
        """Apply the EMA update; returns ``(voxels updated, fresh values or None)``. With ``keep_values``
        and ``out`` (result tensors) the compiled paths gather into ``out`` under the lock and return
        ``_GATHERED``.

        Raises:
            ValueError: a failure or var1shot value outside [0, 1] (NaN included) at a valid voxel.
        """
        fd = self._lock(case_id) if self.use_locks else None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if plan[0] == "slices":
                if self.use_numba and HAVE_NUMBA:
                    return self._scatter_slices_numba(case_id, maps, plan, values, out if keep_values else None)
                self._check_unit(case_id, [v[plan[2]] for v in values])
                return self._scatter_slices(maps, plan, values), None
            if plan[0] == "separable":
                return self._scatter_separable(case_id, maps, plan, values, out if keep_values else None)
            if plan[3] is not None:
                return self._scatter_numba(maps, plan, values, out if keep_values else None)
            self._check_unit(case_id, [np.ascontiguousarray(v).reshape(-1)[plan[1]] for v in values])
            return self._scatter_general(maps, plan, values, keep_values)
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _check_unit(self, case_id: str, values) -> None:
        """Refuse values outside [0, 1] (the torch paths check before they update; the kernels as they go)."""
        for v in values:
            if v.size and not (float(v.min()) >= 0.0 and float(v.max()) <= 1.0):
                raise self._values_error(case_id, values)

    def _scatter_slices_numba(self, case_id, maps, plan, values, out=None) -> tuple:
        """The compiled slices update (and, with ``out``, the gather of the updated values)."""
        _, case_sl, box, flips = plan
        arrs = [t.numpy()[0] for t in out] if out is not None else [np.empty((0, 0, 0), np.float32)] * 2
        n = slices_update(np.asarray(maps["error"]), np.asarray(maps["variance"]), np.asarray(maps["count"]),
                          np.array([s.start for s in case_sl], np.int64), values[0], values[1],
                          np.array([b.start for b in box], np.int64),
                          np.array([b.stop - b.start for b in box], np.int64), np.array(flips, np.bool_),
                          np.float32(1.0 / self.ema_window), self.MAX_COUNT, arrs[0], arrs[1], out is not None)
        if n == STATUS_BAD_VALUE:
            raise self._values_error(case_id, [v[box] for v in values])
        return int(n), (_GATHERED if out is not None else None)

    def _scatter_separable(self, case_id, maps, plan, values, out=None) -> tuple:
        """The compiled separable update (and, with ``out``, the gather of the updated values)."""
        arrs = [t.numpy()[0] for t in out] if out is not None else [np.empty((0, 0, 0), np.float32)] * 2
        n = separable_update(np.asarray(maps["error"]), np.asarray(maps["variance"]), np.asarray(maps["count"]),
                             *plan[1], values[0], values[1], np.float32(1.0 / self.ema_window), self.MAX_COUNT,
                             arrs[0], arrs[1], out is not None)
        if n == STATUS_BAD_VALUE:
            valid = (plan[3] > 0).all(axis=0)
            raise self._values_error(case_id, [np.ascontiguousarray(v).reshape(-1)[valid] for v in values])
        return int(n), (_GATHERED if out is not None else None)

    def _rates_inplace(self, count_view: np.ndarray) -> torch.Tensor:
        """Increment the (saturating) counts in place and return ``a = max(1/n, 1/W)`` as float32.

        torch's fused in-place kernels do this in a few passes over the (strided) memory-mapped view,
        where numpy needs a temporary per operation."""
        n = torch.from_numpy(count_view)
        n.clamp_(max=self.MAX_COUNT - 1).add_(1)
        a = torch.from_numpy(self._buffer("rate", count_view.shape, np.float32))
        a.copy_(n)
        return a.reciprocal_().clamp_(min=1.0 / self.ema_window)

    def _scatter_slices(self, maps, plan, values) -> int:
        _, case_sl, box, flips = plan
        a = self._rates_inplace(maps["count"][case_sl])
        for kind, v in zip(("error", "variance"), values):
            target = torch.from_numpy(maps[kind][case_sl])
            patch = v[box]
            if any(flips):
                # torch.from_numpy refuses negative strides: undo the flips into a contiguous buffer
                tmp = self._buffer("oriented", a.shape, np.float32)
                np.copyto(tmp, self._oriented(patch, flips))
                patch = tmp
            # e <- e + a (f - e), one fused pass over the memory-mapped case block
            if min(patch.strides) < 0:
                patch = np.ascontiguousarray(patch)
            target.lerp_(torch.from_numpy(patch), a)
        return int(a.numel())

    def _scatter_numba(self, maps, plan, values, out=None) -> tuple:
        """The compiled general scatter (and, with ``out``, the gather of the updated values)."""
        _, _, _, c3, shape, case_id = plan
        size = int(np.prod(shape))
        slotmap = self._work.get("nb_slotmap")
        if slotmap is None or slotmap.size < size:
            slotmap = self._work["nb_slotmap"] = np.zeros(size, dtype=np.int32)  # kept all zero
        n_patch = c3.shape[1]
        work = self._work.get("nb_patch")
        if work is None or work.shape[1] < n_patch:
            # touched, pslot (int32) and sum_f, sum_v, hits (float32) per patch voxel
            work = self._work["nb_patch"] = np.empty((5, n_patch), dtype=np.int32)
        touched, pslot = work[0], work[1]
        sum_f, sum_v, hits = (work[k].view(np.float32) for k in (2, 3, 4))
        f = np.ascontiguousarray(values[0]).reshape(-1)
        v = np.ascontiguousarray(values[1]).reshape(-1)
        arrs = [t.numpy()[0] for t in out] if out is not None else None
        direct = arrs is not None and all(a.flags.c_contiguous for a in arrs)
        flats = [a.reshape(-1) for a in arrs] if direct else [np.empty(0, np.float32)] * 2
        n = scatter_kernel(c3, f, v, shape[0], shape[1], shape[2], np.asarray(maps["error"]).reshape(-1),
                        np.asarray(maps["variance"]).reshape(-1), np.asarray(maps["count"]).reshape(-1),
                        slotmap, touched, pslot, sum_f, sum_v, hits, np.float32(1.0 / self.ema_window),
                        self.MAX_COUNT, flats[0], flats[1], direct)
        if n == STATUS_BAD_VALUE:
            valid = (c3 > 0).all(axis=0)
            raise self._values_error(case_id, [f[valid], v[valid]])
        if n < 0:
            raise self._coords_error(case_id, c3, shape, n)
        if arrs is not None and not direct:
            self._gather_numba(maps, plan, arrs)
        return int(n), (_GATHERED if arrs is not None else None)

    def _scatter_general(self, maps, plan, values, keep_values: bool = False) -> tuple:
        # torch's index_select/index_copy_ are 2-3x faster than numpy fancy indexing on these random
        # accesses into the memory-mapped case, which dominate this path
        pos, lin = plan[1], plan[2]
        n_valid = lin.size
        if n_valid == 0:
            return 0, ((np.zeros(0, np.float32),) * 2 if keep_values else None)
        index = torch.from_numpy(lin)
        pos_t = torch.from_numpy(pos)
        fv = torch.from_numpy(np.ascontiguousarray(values[0]).reshape(-1)).index_select(0, pos_t)
        vv = torch.from_numpy(np.ascontiguousarray(values[1]).reshape(-1)).index_select(0, pos_t)
        size = maps["count"].size
        # duplicates (several patch voxels on one case voxel, e.g. zoom-in): one writer of each case voxel
        # in a case-sized scratch array represents it; every duplicate then carries the mean of its group,
        # so the indexed read-modify-write below computes and writes identical values for all of them and
        # each case voxel is updated exactly once
        owner = self._work.get("owner")
        if owner is None or owner.size < size:
            owner = self._work["owner"] = np.empty(size, dtype=np.int32)
        owner_t = torch.from_numpy(owner)
        order = torch.arange(n_valid, dtype=torch.int32)
        owner_t.index_copy_(0, index, order)
        rep = owner_t.index_select(0, index)
        n_unique = int(torch.count_nonzero(rep == order))
        if n_unique < n_valid:
            rep = rep.long()
            hits = torch.bincount(rep, minlength=n_valid).clamp_(min=1).to(torch.float32)
            fv = (torch.zeros(n_valid).index_add_(0, rep, fv) / hits).index_select(0, rep)
            vv = (torch.zeros(n_valid).index_add_(0, rep, vv) / hits).index_select(0, rep)
        count = torch.from_numpy(maps["count"].reshape(-1))
        n = count.index_select(0, index).clamp_(max=self.MAX_COUNT - 1).add_(1)
        count.index_copy_(0, index, n)
        a = n.to(torch.float32).reciprocal_().clamp_(min=1.0 / self.ema_window)
        fresh = []
        for kind, v in (("error", fv), ("variance", vv)):
            flat = torch.from_numpy(maps[kind].reshape(-1))
            cur = flat.index_select(0, index)
            # lerp as torch.lerp's two branches, in separate float32 operations (no fma), exactly like
            # the compiled kernel's _nb_lerp
            d = v - cur
            cur = torch.where(a < 0.5, cur + a * d, v - d * (1.0 - a))
            flat.index_copy_(0, index, cur)
            fresh.append(cur.numpy())
        return n_unique, (tuple(fresh) if keep_values else None)

    # ------------------------------------------------------------------ batches
    def gather_batch(self, case_ids: Sequence[str], coords, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched :meth:`gather`: ``coords (B, 3, X, Y, Z)`` -> ``(error, variance)`` each ``(B, 1, X, Y, Z)``."""
        if len(case_ids) != len(coords):
            raise ValueError(f"gather_batch: {len(case_ids)} case ids for {len(coords)} coordinate patches")
        spatial = tuple(int(s) for s in coords.shape[2:])
        err = torch.empty((len(case_ids), 1) + spatial)
        var = torch.empty_like(err)
        for b, cid in enumerate(case_ids):
            self.gather(str(cid), coords[b], out=(err[b], var[b]))
        if device is not None:
            err, var = err.to(device), var.to(device)
        return err, var

    def update_and_gather_batch(self, case_ids: Sequence[str], coords, failure_smoothed, variance, device=None):
        """:meth:`scatter_batch` then :meth:`gather_batch` (every sample scattered before any is gathered, so
        two patches of one case in a batch both see both updates), analysing each coordinate patch once.

        ``coords (B,3,…)``, ``failure_smoothed``/``variance`` ``(B,1,…)`` in; ``(error, variance)`` ``(B,1,…)`` out.
        """
        if not len(case_ids) == len(coords) == len(failure_smoothed) == len(variance):
            raise ValueError("update_and_gather_batch: inputs differ in batch size")
        spatial = tuple(int(s) for s in coords.shape[2:])
        # values written by a sample stay current only if no later sample of the batch hits the same case
        distinct = len(set(map(str, case_ids))) == len(case_ids)
        err = torch.empty((len(case_ids), 1) + spatial)
        var = torch.empty_like(err)
        plans = []
        for b, cid in enumerate(case_ids):
            maps = self._open(str(cid))
            values = self._check_values(coords[b], failure_smoothed[b], variance[b])
            plan = self._analyse(str(cid), coords[b])
            _, fresh = self._scatter_plan(str(cid), maps, plan, values, keep_values=distinct,
                                          out=(err[b], var[b]))
            plans.append((maps, plan, fresh))
        for b, (maps, plan, fresh) in enumerate(plans):
            self._gather_plan(maps, plan, spatial, None, (err[b], var[b]), fresh)
        if device is not None:
            err, var = err.to(device), var.to(device)
        return err, var

    def scatter_batch(self, case_ids: Sequence[str], coords, failure_smoothed, variance) -> int:
        """Batched :meth:`scatter`: ``coords (B,3,…)``, ``failure_smoothed``/``variance`` ``(B,1,…)``.

        Samples of the same case are applied one after the other (each is one visit).
        """
        if not len(case_ids) == len(coords) == len(failure_smoothed) == len(variance):
            raise ValueError("scatter_batch: case_ids, coords, failure_smoothed and variance differ in batch size")
        return sum(self.scatter(str(cid), coords[b], failure_smoothed[b], variance[b])
                   for b, cid in enumerate(case_ids))

    # ------------------------------------------------------------------ whole cases, persistence
    def full(self, case_id: str) -> dict:
        """Copies of the whole case maps: ``{"error", "variance", "count"}`` numpy ``(X, Y, Z)``."""
        return {kind: np.array(mm) for kind, mm in self._open(case_id).items()}

    def flush(self) -> None:
        for maps in self._maps.values():
            for mm in maps.values():
                mm.flush()

    def snapshot(self, dst_dir, meta: Mapping | None = None) -> Path:
        """Copy the store to ``dst_dir`` (replaced whole or not at all, files fsynced), checking every map on
        the way; ``meta`` is written last as ``epoch.json``.

        Raises:
            BraTSInputError: a damaged map of this store (named).
            OSError: disk full (``ENOSPC``, the destination and the free space named).
        """
        self.flush()
        return copy_store_checked(self.store_dir, dst_dir, meta)

    def restore(self, src_dir) -> "ErrorMapStore":
        """Replace this store's content with a snapshot, checking every map of it first (call before other
        processes open the store).

        Raises:
            FileNotFoundError: ``src_dir`` has no index.json.
            BraTSInputError: a damaged snapshot file (named: truncated, mis-shaped, values outside [0, 1]).
        """
        src_dir = Path(src_dir)
        if not (src_dir / INDEX_NAME).exists():
            raise FileNotFoundError(f"ErrorMapStore.restore: {src_dir} has no {INDEX_NAME} (not a store snapshot)")
        self.close()
        copy_store_checked(src_dir, self.store_dir)
        self._checked = set(self.shapes)  # every value was just checked
        return self

    def disk_bytes(self) -> int:
        """Bytes used by the store's files (apparent size)."""
        return sum(p.stat().st_size for p in self.store_dir.iterdir() if p.is_file())

    def remove(self) -> None:
        """Delete the store folder."""
        self.close()
        shutil.rmtree(self.store_dir, ignore_errors=True)
