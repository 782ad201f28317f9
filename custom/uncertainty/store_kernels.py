"""Compiled (numba) kernels of :class:`custom.uncertainty.store.ErrorMapStore`'s general path.

``gather_kernel`` and ``scatter_kernel`` are None when numba cannot be imported; the store then runs its
torch fallback, which computes bit-identical results (tests/test_error_maps.py).
"""

from __future__ import annotations

import numpy as np

# ------------------------------------------------------------------------ compiled general path
# The general path (rotated / zoomed patches) is bound by random access into the case arrays. One
# compiled kernel does the whole scatter in three passes, instead of a dozen indexed numpy/torch passes
# with temporaries: (1) patch voxels in order -> case index from the coordinates, a slot per touched
# case voxel (through a case-sized int32 slot map that is left all zero), float32 sums and hits per
# slot; (2) slots -> count, rate, EMA of error and variance, the new values kept in the slot;
# (3) optionally patch voxels -> the new values from their slot (the fused update_and_gather, without a
# second random pass over the case). The arithmetic is the torch fallback's (`_scatter_general`) float32
# arithmetic, operation for operation and with duplicates summed in patch order, so both give
# bit-identical stores and gathers (tests/test_error_maps.py checks it). Numba is optional: without it
# the torch fallback runs. Compiled lazily on the first general-path call (about 1-3 s; benchmarks warm
# up first) and cached in __pycache__ next to this module, so later processes load it in well under 1 s.
try:  # pragma: no branch
    import numba as _numba
except Exception:  # noqa: BLE001 - any import failure (missing, broken llvmlite) means: use torch
    _numba = None


#: whether the compiled general path is available (``ErrorMapStore.use_numba`` defaults to it)
HAVE_NUMBA = _numba is not None


if HAVE_NUMBA:
    _njit = _numba.njit(cache=True, nogil=True)

    @_numba.njit(cache=True, nogil=True, inline="always")
    def _nb_lerp(e, target, a):
        # e + a (target - e), written like torch.lerp's two branches (exact at a == 1) but without fma,
        # so that the torch fallback (separate float32 ops) matches bit for bit
        d = target - e
        if a < np.float32(0.5):
            return e + a * d
        return target - d * (np.float32(1.0) - a)

    @_njit
    def gather_kernel(c, s0, s1, s2, err, var, out_e, out_v, check):
        """Store values at each patch voxel (0 where invalid). Returns 0, or -1 if ``check`` and a
        coordinate lies beyond the case, or -2 for a valid coordinate below 1 (not an integer)."""
        s12 = s1 * s2
        for i in range(c.shape[1]):
            x = c[0, i]
            y = c[1, i]
            z = c[2, i]
            if check and (x > s0 or y > s1 or z > s2):
                return -1
            if x > 0 and y > 0 and z > 0:
                ix = np.int64(x) - 1
                iy = np.int64(y) - 1
                iz = np.int64(z) - 1
                if check and (ix < 0 or iy < 0 or iz < 0):
                    return -2
                j = ix * s12 + iy * s2 + iz
                out_e[i] = err[j]
                out_v[i] = var[j]
            else:
                out_e[i] = 0.0
                out_v[i] = 0.0
        return 0

    @_njit
    def scatter_kernel(c, f, v, s0, s1, s2, err, var, cnt, slotmap, touched, pslot, sum_f, sum_v, hits, rate_min,
                    max_count, out_e, out_v, gather):
        """EMA update of ``err``/``var``/``cnt`` (flat case arrays) from the patch values ``f``/``v`` at
        the coordinates ``c (3, N)``; optionally gather the updated values into ``out_e``/``out_v``.

        ``slotmap`` (int32 per case voxel) must be zero and is left zero; ``touched``, ``pslot`` (int32)
        and ``sum_f``, ``sum_v``, ``hits`` (float32) are work arrays of at least N entries. Returns the
        number of case voxels updated, or -1 / -2 (see :func:`gather_kernel`) before anything in the case
        was changed."""
        s12 = s1 * s2
        nt = 0
        status = 0
        # pass 1, patch order: each touched case voxel gets a slot (first-touch order, so the slots of
        # nearby patch voxels are nearby); float32 sums per slot in patch order, like torch's index_add_
        for i in range(c.shape[1]):
            x = c[0, i]
            y = c[1, i]
            z = c[2, i]
            if x > s0 or y > s1 or z > s2:
                status = -1
                break
            if x > 0 and y > 0 and z > 0:
                ix = np.int64(x) - 1
                iy = np.int64(y) - 1
                iz = np.int64(z) - 1
                if ix < 0 or iy < 0 or iz < 0:
                    status = -2
                    break
                j = ix * s12 + iy * s2 + iz
                slot = slotmap[j]
                if slot == 0:
                    touched[nt] = j
                    sum_f[nt] = np.float32(0.0) + f[i]
                    sum_v[nt] = np.float32(0.0) + v[i]
                    hits[nt] = 1.0
                    nt += 1
                    slotmap[j] = nt
                    pslot[i] = nt
                else:
                    sum_f[slot - 1] += f[i]
                    sum_v[slot - 1] += v[i]
                    hits[slot - 1] += np.float32(1.0)
                    pslot[i] = slot
            else:
                pslot[i] = 0
        if status != 0:
            for t in range(nt):
                slotmap[touched[t]] = 0
            return status
        # pass 2, slots: one visit of each touched case voxel with the mean of its patch values; the
        # slot keeps the updated values
        # a = max(1/n, 1/W) by visit count after the visit (one division per possible count, not per voxel)
        rates = np.empty(max_count + 1, dtype=np.float32)
        rates[0] = 1.0
        for n in range(1, max_count + 1):
            rates[n] = max(np.float32(1.0) / np.float32(n), rate_min)
        for t in range(nt):
            j = touched[t]
            slotmap[j] = 0
            fm = sum_f[t]
            vm = sum_v[t]
            h = hits[t]
            if h != np.float32(1.0):  # x / 1 == x: divide only where patch voxels share a case voxel
                fm = fm / h
                vm = vm / h
            n = np.int64(cnt[j])
            if n > max_count - 1:
                n = max_count - 1
            n += 1
            cnt[j] = n
            a = rates[n]
            e_new = _nb_lerp(err[j], fm, a)
            v_new = _nb_lerp(var[j], vm, a)
            err[j] = e_new
            var[j] = v_new
            sum_f[t] = e_new
            sum_v[t] = v_new
        # pass 3, patch order: the updated values from the slots (the fused update_and_gather)
        if gather:
            for i in range(c.shape[1]):
                slot = pslot[i]
                if slot == 0:
                    out_e[i] = 0.0
                    out_v[i] = 0.0
                else:
                    out_e[i] = sum_f[slot - 1]
                    out_v[i] = sum_v[slot - 1]
        return nt
else:
    gather_kernel = scatter_kernel = None
