"""Compiled (numba) kernels of :class:`custom.uncertainty.store.ErrorMapStore`.

Every kernel is None when numba cannot be imported (``HAVE_NUMBA`` False); the store then runs its torch
fallback, which computes bit-identical results (tests/test_error_maps.py).

Two update paths, each with the arithmetic the store has always used for it:

- the **slices** path (an axis-aligned, possibly mirrored crop of the case): ``slices_verify`` proves
  that the coordinates are exactly such a box (one read-only pass over them, early exit), then
  ``slices_update`` walks the case box once, in case order, and for each voxel reads and writes count,
  error and variance and writes the two gathered targets: one pass over every byte the step must
  touch. The EMA is ``torch.lerp``'s formula with a fused multiply-add (``fma(a, f - e, e)``, or
  ``fma(a - 1, f - e, f)`` for ``a >= 0.5``), which is what torch's vectorised ``lerp_`` computes on
  AVX2/AVX-512 CPUs and hence what the torch fallback computes there.
- the **general** path (rotated or zoomed patches): ``scatter_kernel`` in three passes (below), with
  the lerp written as two separate float32 operations (no fma), like the torch fallback's. A zoomed (not
  rotated) patch is separable, each coordinate channel a function of its own axis:
  ``separable_verify`` proves it, and ``separable_update`` walks the touched case voxels in case order,
  summing each one's patch voxels in patch order: the general path's arithmetic, bit for bit, without
  its random accesses.

Values outside [0, 1] (NaN included) are refused before they reach the case: the kernels return a
status instead (see :func:`scatter_kernel`), and the store raises.
"""

from __future__ import annotations

import numpy as np

# ------------------------------------------------------------------------ compiled general path
# The general path (rotated / zoomed patches) is bound by random access into the case arrays. One
# compiled kernel does the whole scatter in three passes, instead of a dozen indexed numpy/torch passes
# with temporaries: (1) patch voxels in order -> case index from the coordinates, a slot per touched
# case voxel (through a case-sized int32 slot map that is left all zero), float32 sums and hits per
# slot; (2) slots -> count, rate, EMA of error and variance, the new values kept in the slot; (3)
# optionally patch voxels -> the new values from their slot (the fused update_and_gather, without a
# second random pass over the case). Pass 2 prefetches the case voxels of the slot 32 ahead (software
# prefetch: the hardware cannot guess the next random address; -20% on rotated patches). Measured and
# not kept: a case-ordered pass 2 (through a sort, x-plane
# buckets or case-sized accumulators instead of slots: the transposition moves, it does not go away),
# and clearing the slot map by rows of the bounding box (a zoomed-out patch's box is the whole case). The arithmetic is the torch fallback's
# (`_scatter_general`) float32 arithmetic, operation for operation and with duplicates summed in patch
# order, so both give bit-identical stores and gathers (tests/test_error_maps.py checks it). Numba is
# optional: without it the torch fallback runs. Compiled lazily on the first call (a few seconds;
# benchmarks warm up first) and cached in __pycache__ next to this module.
try:  # pragma: no branch
    import numba as _numba
except Exception:  # noqa: BLE001 - any import failure (missing, broken llvmlite) means: use torch
    _numba = None


#: whether the compiled kernels are available (``ErrorMapStore.use_numba`` defaults to it)
HAVE_NUMBA = _numba is not None

#: kernel status codes (negative: nothing in the case was changed)
STATUS_BEYOND_CASE = -1  # a coordinate beyond the case shape
STATUS_NOT_INDEX = -2  # a valid coordinate below 1 (not an integer index)
STATUS_BAD_VALUE = -3  # a failure or var1shot value outside [0, 1] (NaN included)


if HAVE_NUMBA:
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic

    _njit = _numba.njit(cache=True, nogil=True)

    @_intrinsic
    def _fma32(typingctx, a, b, c):
        """``a * b + c`` with one rounding (LLVM's ``llvm.fma.f32``: exact on every CPU, fused or not)."""
        sig = _types.float32(_types.float32, _types.float32, _types.float32)

        def codegen(context, builder, signature, args):
            flt = _ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma", [flt], _ir.FunctionType(flt, [flt, flt, flt]))
            return builder.call(fn, args)

        return sig, codegen

    @_intrinsic
    def _prefetch(typingctx, arr, index):
        """Hint the CPU to load ``arr[index]`` (1-D array) into the caches for writing (``llvm.prefetch``)."""
        sig = _types.void(arr, index)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            i8p = _ir.IntType(8).as_pointer()
            i32 = _ir.IntType(32)
            fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p],
                                                  _ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32]))
            ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
            # rw = 1 (write), locality = 3 (keep in all caches), cache type = 1 (data)
            builder.call(fn, [ptr, _ir.Constant(i32, 1), _ir.Constant(i32, 3), _ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    #: slots ahead whose case voxels pass 2 prefetches
    _PREFETCH_DISTANCE = 32

    @_numba.njit(cache=True, nogil=True, inline="always")
    def _nb_lerp(e, target, a):
        # e + a (target - e), written like torch.lerp's two branches (exact at a == 1) but without fma,
        # so that the torch fallback (separate float32 ops) matches bit for bit
        d = target - e
        if a < np.float32(0.5):
            return e + a * d
        return target - d * (np.float32(1.0) - a)

    @_numba.njit(cache=True, nogil=True, inline="always")
    def _nb_lerp_fma(e, target, a):
        # torch's vectorised lerp_: fma(coeff, target - e, base), coeff = a or a - 1, base = e or target
        d = target - e
        if a < np.float32(0.5):
            return _fma32(a, d, e)
        return _fma32(a - np.float32(1.0), d, target)

    @_numba.njit(cache=True, nogil=True, inline="always")
    def _nb_lerp_fma_select(e, target, a):
        # the same value as _nb_lerp_fma, as selects instead of a branch (vectorises)
        d = target - e
        small = a < np.float32(0.5)
        return _fma32(a if small else a - np.float32(1.0), d, e if small else target)

    @_numba.njit(cache=True, nogil=True, inline="always")
    def _in_unit(x):
        return (x >= np.float32(0.0)) & (x <= np.float32(1.0))  # False for NaN

    @_numba.njit(cache=True, nogil=True)
    def _rate_table(rate_min, max_count):
        # a = max(1/n, 1/W) by visit count after the visit (one division per possible count, not per voxel)
        rates = np.empty(max_count + 1, dtype=np.float32)
        rates[0] = 1.0
        for n in range(1, max_count + 1):
            rates[n] = max(np.float32(1.0) / np.float32(n), rate_min)
        return rates

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
        number of case voxels updated, or a negative status (``STATUS_*``: a coordinate beyond the case,
        a valid coordinate below 1, a value outside [0, 1] at a valid voxel) before anything in the case
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
                fi = f[i]
                vi = v[i]
                if not (_in_unit(fi) & _in_unit(vi)):  # bitwise: no extra branches
                    status = -3
                    break
                j = ix * s12 + iy * s2 + iz
                slot = slotmap[j]
                if slot == 0:
                    touched[nt] = j
                    sum_f[nt] = np.float32(0.0) + fi
                    sum_v[nt] = np.float32(0.0) + vi
                    hits[nt] = 1.0
                    nt += 1
                    slotmap[j] = nt
                    pslot[i] = nt
                else:
                    sum_f[slot - 1] += fi
                    sum_v[slot - 1] += vi
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
        rates = _rate_table(rate_min, max_count)
        for t in range(nt):
            if t + _PREFETCH_DISTANCE < nt:
                ahead = touched[t + _PREFETCH_DISTANCE]
                _prefetch(err, ahead)
                _prefetch(var, ahead)
                _prefetch(cnt, ahead)
                _prefetch(slotmap, ahead)
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

    # -------------------------------------------------------------------- slices (crop + mirroring)
    @_njit
    def slices_verify(c, lo, hi, first, step):
        """True when ``c (3, X, Y, Z)`` is exactly an axis-aligned box: inside the patch box
        ``[lo, hi)`` channel k equals ``first[k] + step[k] * (index_k - lo[k])`` (case index + 1, step
        +-1), and outside the box all three channels are 0. Read-only; stops at the first bad row."""
        n0, n1, n2 = c.shape[1], c.shape[2], c.shape[3]
        z0 = np.float32(first[2] - step[2] * lo[2])  # channel 2 at z is z0 + step * z (exact small integers)
        dz = np.float32(step[2])
        for x in range(n0):
            in_x = lo[0] <= x < hi[0]
            cx = np.float32(first[0] + step[0] * (x - lo[0]))
            for y in range(n1):
                in_xy = in_x and lo[1] <= y < hi[1]
                cy = np.float32(first[1] + step[1] * (y - lo[1]))
                r0 = c[0, x, y]
                r1 = c[1, x, y]
                r2 = c[2, x, y]
                bad = False
                # branch-free inner loops (vectorised); one test per row
                if in_xy:
                    for z in range(lo[2]):
                        bad |= (r0[z] != 0) | (r1[z] != 0) | (r2[z] != 0)
                    for z in range(lo[2], hi[2]):
                        bad |= (r0[z] != cx) | (r1[z] != cy) | (r2[z] != z0 + dz * np.float32(z))
                    for z in range(hi[2], n2):
                        bad |= (r0[z] != 0) | (r1[z] != 0) | (r2[z] != 0)
                else:
                    for z in range(n2):
                        bad |= (r0[z] != 0) | (r1[z] != 0) | (r2[z] != 0)
                if bad:
                    return False
        return True

    @_njit
    def slices_verify_int(c, lo, hi, first, step):
        """:func:`slices_verify` for integer coordinates (int16 from the training pipeline), compared as
        integers."""
        n0, n1, n2 = c.shape[1], c.shape[2], c.shape[3]
        z0 = first[2] - step[2] * lo[2]
        dz = step[2]
        for x in range(n0):
            in_x = lo[0] <= x < hi[0]
            cx = first[0] + step[0] * (x - lo[0])
            for y in range(n1):
                in_xy = in_x and lo[1] <= y < hi[1]
                cy = first[1] + step[1] * (y - lo[1])
                r0 = c[0, x, y]
                r1 = c[1, x, y]
                r2 = c[2, x, y]
                bad = False
                # branch-free inner loops (vectorised); one test per row
                if in_xy:
                    for z in range(lo[2]):
                        bad |= (r0[z] != 0) | (r1[z] != 0) | (r2[z] != 0)
                    for z in range(lo[2], hi[2]):
                        bad |= (np.int64(r0[z]) != cx) | (np.int64(r1[z]) != cy) | (np.int64(r2[z]) != z0 + dz * z)
                    for z in range(hi[2], n2):
                        bad |= (r0[z] != 0) | (r1[z] != 0) | (r2[z] != 0)
                else:
                    for z in range(n2):
                        bad |= (r0[z] != 0) | (r1[z] != 0) | (r2[z] != 0)
                if bad:
                    return False
        return True

    @_njit
    def slices_verify_words(cw, mw, ezw, lo, hi, first, step):
        """:func:`slices_verify` for C-contiguous int16 coordinates whose rows are whole 64-bit words: ``cw`` is
        their int64 view ``(3, X, Y, Z / 4)``, ``mw`` the words of the row's 0/1 box mask and ``ezw`` those of
        the expected channel 2 (0 outside the box). Four voxels per operation: ``mask * cx`` puts ``cx`` in
        every lane inside the box (``cx`` < 2**15: no carry between lanes), and a word XOR is 0 exactly when
        its four lanes are equal."""
        n0, n1, nw = cw.shape[1], cw.shape[2], cw.shape[3]
        for x in range(n0):
            in_x = lo[0] <= x < hi[0]
            for y in range(n1):
                r0 = cw[0, x, y]
                r1 = cw[1, x, y]
                r2 = cw[2, x, y]
                bad = 0
                if in_x and lo[1] <= y < hi[1]:
                    cx = first[0] + step[0] * (x - lo[0])
                    cy = first[1] + step[1] * (y - lo[1])
                    for k in range(nw):
                        m = mw[k]
                        bad |= (r0[k] ^ (m * cx)) | (r1[k] ^ (m * cy)) | (r2[k] ^ ezw[k])
                else:
                    for k in range(nw):
                        bad |= r0[k] | r1[k] | r2[k]
                if bad != 0:
                    return False
        return True

    @_njit
    def slices_update(err, var, cnt, case_lo, f, v, patch_lo, size, flips, rate_min, max_count, out_e, out_v,
                      gather):
        """EMA update of the case box ``case_lo + [0, size)`` of ``err``/``var``/``cnt`` (3-D case arrays)
        from the patch box ``patch_lo + [0, size)`` of ``f``/``v`` (mirrored on the axes of ``flips``),
        walking the case box in memory order, row by row (each row in a few branch-free passes over
        L1-resident row buffers); with ``gather`` the updated values go to the same patch voxels of
        ``out_e``/``out_v`` (and 0 everywhere outside the box). Returns the number of voxels updated, or
        ``STATUS_BAD_VALUE`` after leaving every voxel whose value lies outside [0, 1] unchanged."""
        rates = _rate_table(rate_min, max_count)
        bad = 0
        n2 = size[2]
        f_row = np.empty(n2, np.float32)
        v_row = np.empty(n2, np.float32)
        a_row = np.empty(n2, np.float32)
        e_new = np.empty(n2, np.float32)
        w_new = np.empty(n2, np.float32)
        if gather:
            p0, p1, p2 = out_e.shape
            # zero outside the box (the patch's padding)
            for x in range(p0):
                inside_x = patch_lo[0] <= x < patch_lo[0] + size[0]
                for y in range(p1):
                    if inside_x and patch_lo[1] <= y < patch_lo[1] + size[1]:
                        out_e[x, y, :patch_lo[2]] = 0.0
                        out_v[x, y, :patch_lo[2]] = 0.0
                        out_e[x, y, patch_lo[2] + n2:] = 0.0
                        out_v[x, y, patch_lo[2] + n2:] = 0.0
                    else:
                        out_e[x, y, :] = 0.0
                        out_v[x, y, :] = 0.0
        pz = patch_lo[2]
        cz = case_lo[2]
        for i in range(size[0]):
            cx = case_lo[0] + i
            px = patch_lo[0] + (size[0] - 1 - i if flips[0] else i)
            for k in range(size[1]):
                cy = case_lo[1] + k
                py = patch_lo[1] + (size[1] - 1 - k if flips[1] else k)
                f_src = f[px, py, pz:pz + n2]
                v_src = v[px, py, pz:pz + n2]
                if flips[2]:
                    for m in range(n2):
                        f_row[m] = f_src[n2 - 1 - m]
                        v_row[m] = v_src[n2 - 1 - m]
                else:
                    for m in range(n2):
                        f_row[m] = f_src[m]
                        v_row[m] = v_src[m]
                ok = True
                for m in range(n2):
                    ok &= _in_unit(f_row[m]) & _in_unit(v_row[m])
                c_row = cnt[cx, cy, cz:cz + n2]
                e_row = err[cx, cy, cz:cz + n2]
                w_row = var[cx, cy, cz:cz + n2]
                if ok:
                    for m in range(n2):
                        n = min(c_row[m], max_count - 1) + 1
                        c_row[m] = n
                        a_row[m] = rates[n]
                    for m in range(n2):
                        r = _nb_lerp_fma_select(e_row[m], f_row[m], a_row[m])
                        e_row[m] = r
                        e_new[m] = r
                    for m in range(n2):
                        r = _nb_lerp_fma_select(w_row[m], v_row[m], a_row[m])
                        w_row[m] = r
                        w_new[m] = r
                else:  # a row with bad values: update the others, leave those unchanged
                    for m in range(n2):
                        if _in_unit(f_row[m]) and _in_unit(v_row[m]):
                            n = min(c_row[m], max_count - 1) + 1
                            c_row[m] = n
                            a = rates[n]
                            e_row[m] = _nb_lerp_fma(e_row[m], f_row[m], a)
                            w_row[m] = _nb_lerp_fma(w_row[m], v_row[m], a)
                        else:
                            bad += 1
                        e_new[m] = e_row[m]
                        w_new[m] = w_row[m]
                if gather:
                    oe = out_e[px, py, pz:pz + n2]
                    ov = out_v[px, py, pz:pz + n2]
                    if flips[2]:
                        for m in range(n2):
                            oe[n2 - 1 - m] = e_new[m]
                            ov[n2 - 1 - m] = w_new[m]
                    else:
                        for m in range(n2):
                            oe[m] = e_new[m]
                            ov[m] = w_new[m]
        if bad:
            return -3
        return size[0] * size[1] * size[2]

    @_njit
    def sample_not_index(c, stride):
        """True when a sampled coordinate (every ``stride``-th voxel of ``c (3, N)``) is not a non-negative
        integer: coordinate channels resampled with anything but ``mode="nearest"`` (the general path's
        check; the slices path compares every voxel with its exact box)."""
        for i in range(0, c.shape[1], stride):
            for k in range(3):
                x = c[k, i]
                if not (x >= np.float32(0.0)) or np.float32(np.int64(x)) != x:
                    return True
        return False

    # -------------------------------------------------------------------- separable (zoom, no rotation)
    @_njit
    def separable_verify(c, p0, p1, p2):
        """True when ``c (3, X, Y, Z)`` is separable: a voxel is valid exactly where ``p0[x]``, ``p1[y]`` and
        ``p2[z]`` are all non-zero, and then holds ``(p0[x], p1[y], p2[z])``; elsewhere all three channels
        are 0. Read-only; stops at the first bad row."""
        n0, n1, n2 = c.shape[1], c.shape[2], c.shape[3]
        for x in range(n0):
            for y in range(n1):
                r0 = c[0, x, y]
                r1 = c[1, x, y]
                r2 = c[2, x, y]
                bad = False
                if p0[x] != 0 and p1[y] != 0:
                    cx = p0[x]
                    cy = p1[y]
                    zero = cx - cx  # 0 in the coordinates' own type (float32 or int16): no conversions
                    for z in range(n2):
                        on = p2[z] != zero
                        bad |= (r0[z] != (cx if on else zero)) | (r1[z] != (cy if on else zero))
                        bad |= r2[z] != p2[z]
                else:
                    for z in range(n2):
                        bad |= (r0[z] != 0) | (r1[z] != 0) | (r2[z] != 0)
                if bad:
                    return False
        return True

    @_njit
    def _groups(profile, size):
        """Patch indices grouped by case index (``profile`` = case index + 1, 0 = padding): ``(case indices
        ascending, group starts, members ascending within each group)``."""
        counts = np.zeros(size + 1, np.int64)
        for x in range(profile.shape[0]):
            counts[np.int64(profile[x])] += 1
        n_groups = 0
        for k in range(1, size + 1):
            if counts[k]:
                n_groups += 1
        cases = np.empty(n_groups, np.int64)
        starts = np.empty(n_groups + 1, np.int64)
        where = np.zeros(size + 1, np.int64)
        g = 0
        total = 0
        for k in range(1, size + 1):
            if counts[k]:
                cases[g] = k - 1
                starts[g] = total
                where[k] = total
                total += counts[k]
                g += 1
        starts[n_groups] = total
        members = np.empty(total, np.int64)
        for x in range(profile.shape[0]):
            k = np.int64(profile[x])
            if k:
                members[where[k]] = x
                where[k] += 1
        return cases, starts, members

    @_njit
    def separable_update(err, var, cnt, p0, p1, p2, f, v, rate_min, max_count, out_e, out_v, gather):
        """EMA update of the 3-D case arrays from a separable patch (see :func:`separable_verify`): case rows
        in case order; for each, the patch rows of its (x, y) group in patch order, each added into per-voxel
        float32 sums along z in patch order, so every case voxel sums its patch values in patch order; then
        the mean, count, rate and lerp exactly as :func:`scatter_kernel`. With ``gather`` the updated values
        go to the patch voxels (0 where invalid). Returns the number of case voxels updated, or
        ``STATUS_BAD_VALUE`` after leaving every case voxel with a patch value outside [0, 1] unchanged."""
        s0, s1, s2 = err.shape
        c0, g0, m0 = _groups(p0, s0)
        c1, g1, m1 = _groups(p1, s1)
        c2, g2, m2 = _groups(p2, s2)
        nz = c2.shape[0]
        n_valid_z = m2.shape[0]
        size_z = np.empty(nz, np.float32)
        for m in range(nz):
            size_z[m] = np.float32(g2[m + 1] - g2[m])
        rates = _rate_table(rate_min, max_count)
        sum_f = np.empty(nz, np.float32)
        sum_v = np.empty(nz, np.float32)
        ok = np.empty(nz, np.bool_)
        new_e = np.empty(nz, np.float32)
        new_v = np.empty(nz, np.float32)
        bad = 0
        if gather:  # zero the invalid voxels (padding); the valid ones are written below
            n0, n1, n2 = out_e.shape
            for x in range(n0):
                for y in range(n1):
                    if p0[x] == 0 or p1[y] == 0:
                        out_e[x, y, :] = 0.0
                        out_v[x, y, :] = 0.0
                    elif n_valid_z < n2:
                        for z in range(n2):
                            if p2[z] == 0:
                                out_e[x, y, z] = 0.0
                                out_v[x, y, z] = 0.0
        for i in range(c0.shape[0]):
            cx = c0[i]
            for k in range(c1.shape[0]):
                cy = c1[k]
                sum_f[:] = 0.0
                sum_v[:] = 0.0
                ok[:] = True
                n_rows = 0
                for a0 in range(g0[i], g0[i + 1]):  # (x, y) in patch order, then z ascending: patch order
                    x = m0[a0]
                    for a1 in range(g1[k], g1[k + 1]):
                        y = m1[a1]
                        n_rows += 1
                        f_row = f[x, y]
                        v_row = v[x, y]
                        for m in range(nz):  # z groups in case order, members ascending: patch order within
                            acc_f = sum_f[m]
                            acc_v = sum_v[m]
                            good = ok[m]
                            for a in range(g2[m], g2[m + 1]):
                                z = m2[a]
                                fi = f_row[z]
                                vi = v_row[z]
                                good &= _in_unit(fi) & _in_unit(vi)
                                acc_f = acc_f + fi
                                acc_v = acc_v + vi
                            sum_f[m] = acc_f
                            sum_v[m] = acc_v
                            ok[m] = good
                e_row = err[cx, cy]
                w_row = var[cx, cy]
                c_row = cnt[cx, cy]
                for m in range(nz):
                    cz = c2[m]
                    if ok[m]:
                        hits = np.float32(n_rows) * size_z[m]
                        fm = sum_f[m]
                        vm = sum_v[m]
                        if hits != np.float32(1.0):
                            fm = fm / hits
                            vm = vm / hits
                        n = min(np.int64(c_row[cz]), max_count - 1) + 1
                        c_row[cz] = n
                        a = rates[n]
                        e_new = _nb_lerp(e_row[cz], fm, a)
                        v_new = _nb_lerp(w_row[cz], vm, a)
                        e_row[cz] = e_new
                        w_row[cz] = v_new
                    else:
                        bad += 1
                        e_new = e_row[cz]
                        v_new = w_row[cz]
                    new_e[m] = e_new
                    new_v[m] = v_new
                if gather:
                    for a0 in range(g0[i], g0[i + 1]):
                        x = m0[a0]
                        for a1 in range(g1[k], g1[k + 1]):
                            y = m1[a1]
                            oe = out_e[x, y]
                            ov = out_v[x, y]
                            for m in range(nz):
                                for a in range(g2[m], g2[m + 1]):
                                    oe[m2[a]] = new_e[m]
                                    ov[m2[a]] = new_v[m]
        if bad:
            return -3
        return c0.shape[0] * c1.shape[0] * nz

    # -------------------------------------------------------------------- validation of store files
    @_njit
    def first_outside_unit(x):
        """Flat index of the first value outside [0, 1] (NaN included), or -1."""
        for i in range(x.size):
            if not _in_unit(x[i]):
                return i
        return -1
else:
    gather_kernel = scatter_kernel = slices_verify = slices_verify_int = slices_verify_words = slices_update = None
    sample_not_index = None
    first_outside_unit = None
    separable_verify = separable_update = None


def warm_up() -> float:
    """Compile the kernels (or load them from numba's cache) for the argument types the store passes, on tiny
    arrays, so that timings do not include it; returns the seconds taken (0 without numba)."""
    if not HAVE_NUMBA:
        return 0.0
    import time

    t0 = time.perf_counter()
    for dtype in (np.float32, np.int16):  # coordinates as float32 (transforms) or int16 (the training batches)
        _warm_up(dtype)
    return time.perf_counter() - t0


def _warm_up(coords_dtype) -> None:
    shape = (3, 4, 5)
    f32 = np.zeros(shape, np.float32)
    err, var, cnt = f32.copy(), f32.copy(), np.zeros(shape, np.uint8)
    out = [np.zeros(shape, np.float32) for _ in range(2)]
    c = np.zeros((3,) + shape, np.float32)
    for axis in range(3):
        view = [1, 1, 1]
        view[axis] = -1
        c[axis] = np.arange(1, shape[axis] + 1, dtype=np.float32).reshape(view)
    c = c.astype(coords_dtype)
    i64 = np.zeros(3, np.int64)
    size = np.array(shape, np.int64)
    step = np.ones(3, np.int64)
    (slices_verify if coords_dtype == np.float32 else slices_verify_int)(c, i64, size, step, step)
    words = np.zeros((3, 2, 2, 1), np.int64)
    slices_verify_words(words, words[0, 0, 0], words[0, 0, 0], i64, size, step, step)
    slices_update(err, var, cnt, i64, f32, f32, i64, size, np.zeros(3, np.bool_), np.float32(0.5), 255, out[0], out[1],
                  True)
    profiles = [np.ascontiguousarray(c[0, :, 0, 0]), np.ascontiguousarray(c[1, 0, :, 0]),
                np.ascontiguousarray(c[2, 0, 0, :])]
    separable_verify(c, *profiles)
    separable_update(err, var, cnt, *profiles, f32, f32, np.float32(0.5), 255, out[0], out[1], True)
    c3 = c.reshape(3, -1)
    n = c3.shape[1]
    work = np.zeros((5, n), np.int32)
    flat = [a.reshape(-1) for a in (err, var, cnt)]
    scatter_kernel(c3, f32.reshape(-1), f32.reshape(-1), *shape, *flat, np.zeros(n, np.int32), work[0], work[1],
                   work[2].view(np.float32), work[3].view(np.float32), work[4].view(np.float32), np.float32(0.5), 255,
                   out[0].reshape(-1), out[1].reshape(-1), True)
    gather_kernel(c3, *shape, flat[0], flat[1], out[0].reshape(-1), out[1].reshape(-1), True)
    sample_not_index(c3, 97)
    first_outside_unit(flat[0])
