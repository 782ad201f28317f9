"""The error-map store on a torch device (``store_device``): the EMA step where the prediction already is.

On a GPU the CPU store costs a patch's transfers (coordinates, failure and var1shot to the host, the
two targets back) plus its update on the training thread. :class:`DeviceErrorMapStore` does the same
update with torch operations on the device:

- ``resident``: the maps of every case of the fold live on the device (BraTS: ~30 MB per case, ~37 GB
  for a 5-fold training set: a GPU of 80 GB or more), loaded from the file store on first use and
  written back at :meth:`DeviceErrorMapStore.flush` (snapshots, close);
- ``streamed``: the maps stay in the memory-mapped file store; each patch's case-space bounding box goes
  to the device through pinned host memory and back (under the case's file lock);
- ``auto``: resident when all maps fit in ``memory_fraction`` of the device's free memory, else streamed.

The arithmetic is the CPU store's, operation for operation: the slices path (crop + mirroring) is the
same ``torch.lerp_`` on the case box; the general path sums the patch voxels that share a case voxel in
patch order (a stable sort groups them; one vector step per rank within a group keeps the float32 order
of the CPU kernel, deterministic on a GPU where ``index_add_`` is not), then count, rate and the lerp in
separate float32 operations. tests/test_error_maps.py runs this class on CPU tensors and compares it bit
for bit with the CPU store; ``scripts/benchmark_store.py --device cuda`` times it on a GPU.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from custom.uncertainty.store import ErrorMapStore, centre_profiles, slices_candidate
from custom.uncertainty.store_files import KINDS

logger = logging.getLogger(__name__)

MODES = ("auto", "resident", "streamed")
#: largest number of patch voxels on one case voxel summed with one vector step per rank (RandZoom's 1.4: 8)
_MAX_RANK_STEPS = 64
_TORCH_DTYPES = {"error": torch.float32, "variance": torch.float32, "count": torch.uint8}


def store_bytes(shapes: Mapping) -> int:
    """Bytes of all maps of a store (float32 error and variance, uint8 count per voxel)."""
    return sum(9 * int(np.prod(s)) for s in shapes.values())


class DeviceErrorMapStore:
    """:class:`~custom.uncertainty.store.ErrorMapStore` semantics, computed on ``device``.

    Args:
        store: the file store (index, snapshots, checks); its files stay the persistent state.
        device: torch device of the update (``"cuda"``, ``"cuda:1"``; ``"cpu"`` in tests).
        mode: ``"auto"``, ``"resident"`` or ``"streamed"`` (see the module docstring).
        memory_fraction: ``auto``: resident when the maps take at most this fraction of the free device
            memory (the network, activations and the loader's pinned batches need the rest).
    """

    def __init__(self, store: ErrorMapStore, device, mode: str = "auto", memory_fraction: float = 0.5) -> None:
        if mode not in MODES:
            raise ValueError(f"store mode must be one of {MODES}, got {mode!r}")
        if not 0.0 < float(memory_fraction) <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        self.store = store
        self.device = torch.device(device)
        self.ema_window = store.ema_window
        self.mode = self._resolve_mode(mode, float(memory_fraction))
        self._maps: dict[str, dict] = {}
        self._dirty: set[str] = set()
        self._pinned: dict = {}

    def _resolve_mode(self, mode: str, fraction: float) -> str:
        if mode != "auto":
            return mode
        needed = store_bytes(self.store.shapes)
        if self.device.type != "cuda":
            return "resident"
        free, _ = torch.cuda.mem_get_info(self.device)
        chosen = "resident" if needed <= fraction * free else "streamed"
        logger.info("error-map store on %s: %s (%.1f GB of maps, %.1f GB free)", self.device, chosen, needed / 1e9,
                    free / 1e9)
        return chosen

    # ------------------------------------------------------------------ store interface
    @property
    def shapes(self) -> dict:
        return self.store.shapes

    @property
    def store_dir(self):
        return self.store.store_dir

    def __contains__(self, case_id) -> bool:
        return case_id in self.store

    def __len__(self) -> int:
        return len(self.store)

    def create(self, cases) -> "DeviceErrorMapStore":
        self.store.create(cases)
        return self

    def flush(self) -> None:
        """Write the resident maps that changed back to the file store."""
        for case_id in sorted(self._dirty):
            maps = self.store._open(case_id)
            for kind in KINDS:
                np.copyto(maps[kind], self._maps[case_id][kind].cpu().numpy())
        self._dirty.clear()
        self.store.flush()

    def close(self) -> None:
        self.flush()
        self._maps.clear()
        self._pinned.clear()
        self.store.close()

    def snapshot(self, dst_dir, meta: Mapping | None = None):
        self.flush()
        return self.store.snapshot(dst_dir, meta)

    def restore(self, src_dir) -> "DeviceErrorMapStore":
        self._maps.clear()
        self._dirty.clear()
        self.store.restore(src_dir)
        return self

    def reset(self) -> "DeviceErrorMapStore":
        self._maps.clear()
        self._dirty.clear()
        self.store.reset()
        return self

    def remove(self) -> None:
        self._maps.clear()
        self._dirty.clear()
        self.store.remove()

    def full(self, case_id: str) -> dict:
        if case_id in self._maps:
            return {kind: self._maps[case_id][kind].cpu().numpy().copy() for kind in KINDS}
        return self.store.full(case_id)

    # ------------------------------------------------------------------ case data on the device
    def _resident(self, case_id: str) -> dict:
        maps = self._maps.get(case_id)
        if maps is None:
            files = self.store._open(case_id)  # checked (size, shape, values) by the file store
            maps = self._maps[case_id] = {kind: torch.from_numpy(np.array(files[kind])).to(self.device)
                                          for kind in KINDS}
        return maps

    def _staging(self, kind: str, numel: int) -> torch.Tensor:
        """A reusable pinned host buffer of at least ``numel`` elements."""
        buf = self._pinned.get(kind)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=_TORCH_DTYPES[kind], pin_memory=self.device.type == "cuda")
            self._pinned[kind] = buf
        return buf[:numel]

    def _load_box(self, case_id: str, box: tuple) -> dict:
        """The maps' ``box`` (tuple of slices) on the device, through pinned host memory."""
        files = self.store._open(case_id)
        out = {}
        for kind in KINDS:
            view = files[kind][box]
            staging = self._staging(kind, view.size).view(view.shape)
            staging.numpy()[...] = view
            # synchronous: the next patch refills the same pinned buffer
            out[kind] = staging.to(self.device) if self.device.type != "cpu" else staging
        return out

    def _save_box(self, case_id: str, box: tuple, maps: dict) -> None:
        files = self.store._open(case_id)
        for kind in KINDS:
            staging = self._staging(kind, maps[kind].numel()).view(maps[kind].shape)
            staging.copy_(maps[kind])  # synchronous device -> pinned host
            files[kind][box] = staging.numpy()

    # ------------------------------------------------------------------ analysis (on the device)
    def _plan(self, case_id: str, coords: torch.Tensor) -> tuple:
        """``("slices", case_slices, patch_box, flips)`` or ``("general", pos, idx (3, n) int64)`` where ``pos``
        are the flat patch positions of the valid voxels (ascending) and ``idx`` their case indices.

        Raises:
            ValueError: coordinates beyond the case or not non-negative integers (as the CPU store).
        """
        if coords.ndim != 4 or coords.shape[0] != 3:
            raise ValueError(f"coords must be (3, X, Y, Z), got {tuple(coords.shape)}")
        shape = tuple(self.store.shapes[case_id]) if case_id in self.store.shapes else None
        if shape is None:
            self.store._open(case_id)  # raises the KeyError naming the unknown case
            shape = tuple(self.store.shapes[case_id])
        c = coords.to(self.device, torch.float32)
        profiles = [p.cpu().numpy() for p in centre_profiles(c)]
        candidate = slices_candidate(profiles, shape)
        if candidate is not None:
            case_sl, box, flips = candidate
            size = [b.stop - b.start for b in box]
            grids = []
            for axis in range(3):
                start = case_sl[axis].stop if flips[axis] else case_sl[axis].start + 1
                step = -1.0 if flips[axis] else 1.0
                line = start + step * torch.arange(size[axis], device=self.device, dtype=torch.float32)
                view = [1, 1, 1]
                view[axis] = -1
                grids.append(line.view(view))
            inside = c[(slice(None),) + box]
            mismatches = sum((inside[k] != grids[k]).sum() for k in range(3))
            outside_nonzero = (c != 0).sum() - 3 * int(np.prod(size))
            if int(mismatches + outside_nonzero) == 0:
                return ("slices",) + candidate
        c2 = c.reshape(3, -1)
        limits = torch.tensor(shape, device=self.device, dtype=torch.float32).view(3, 1)
        beyond = (c2 > limits).any()
        not_index = ((c2 != torch.floor(c2)) | (c2 < 0)).any()
        flags = torch.stack([beyond, not_index]).tolist()
        if flags[0]:
            raise ErrorMapStore._coords_error(case_id, c2.cpu().numpy(), shape, -1)
        if flags[1]:
            raise ErrorMapStore._coords_error(case_id, c2.cpu().numpy(), shape, -2)
        valid = (c2 > 0).all(0)
        pos = valid.nonzero().squeeze(1)
        idx = c2[:, pos].long() - 1
        return ("general", pos, idx)

    def _values(self, case_id: str, plan: tuple, failure, variance, spatial) -> tuple:
        """The patch values ``(f, v)`` as float32 ``(X, Y, Z)`` on the device, refused outside [0, 1]."""
        values = []
        for name, x in (("failure_smoothed", failure), ("variance", variance)):
            x = torch.as_tensor(x).to(self.device, torch.float32)
            if x.ndim == 4 and x.shape[0] == 1:
                x = x[0]
            if tuple(x.shape) != tuple(spatial):
                raise ValueError(f"scatter: {name} has shape {tuple(x.shape)}, coords cover {tuple(spatial)}")
            values.append(x)
        if plan[0] == "slices":
            used = [x[plan[2]] for x in values]
        else:
            used = [x.reshape(-1)[plan[1]] for x in values]
        if not bool(torch.stack([((u >= 0) & (u <= 1)).all() for u in used]).all()):
            raise ErrorMapStore._values_error(case_id, [u.cpu().numpy() for u in used])
        return values[0], values[1]

    # ------------------------------------------------------------------ the update
    def _rates(self, n: torch.Tensor) -> torch.Tensor:
        """``a = max(1/n, 1/W)`` in float32, as the CPU store (reciprocal of the float count, then the clamp)."""
        return n.to(torch.float32).reciprocal_().clamp_(min=1.0 / self.ema_window)

    def _update_slices(self, maps: dict, plan: tuple, f, v, offset, out) -> int:
        _, case_sl, box, flips = plan
        case_box = tuple(slice(s.start - o, s.stop - o) for s, o in zip(case_sl, offset))
        dims = [d for d in range(3) if flips[d]]
        count = maps["count"][case_box]
        count.clamp_(max=ErrorMapStore.MAX_COUNT - 1).add_(1)
        a = self._rates(count)
        for k, (kind, x) in enumerate((("error", f), ("variance", v))):
            patch = x[box]
            if dims:
                patch = torch.flip(patch, dims)
            target = maps[kind][case_box]
            target.lerp_(patch.contiguous(), a)
            if out is not None:
                out[k].zero_()
                out[k][box] = torch.flip(target, dims) if dims else target
        return int(count.numel())

    def _update_general(self, maps: dict, plan: tuple, f, v, offset, shape, out) -> int:
        _, pos, idx = plan
        n_valid = int(pos.numel())
        if out is not None:
            for o in out:
                o.zero_()
        if n_valid == 0:
            return 0
        rel = idx - torch.tensor(offset, device=idx.device).view(3, 1)
        lin = (rel[0] * shape[1] + rel[1]) * shape[2] + rel[2]
        keys, perm = torch.sort(lin, stable=True)  # equal keys keep patch order
        first = torch.ones(n_valid, dtype=torch.bool, device=lin.device)
        first[1:] = keys[1:] != keys[:-1]
        group = torch.cumsum(first, 0) - 1
        starts = first.nonzero().squeeze(1)
        rank = torch.arange(n_valid, device=lin.device) - starts[group]
        unique = keys[starts]
        n_unique = int(unique.numel())
        fv = f.reshape(-1)[pos][perm]
        vv = v.reshape(-1)[pos][perm]
        # float32 sums in patch order, one rank at a time: ((0 + f1) + f2) + ..., as the CPU kernel
        sum_f = torch.zeros(n_unique, dtype=torch.float32, device=lin.device)
        sum_v = torch.zeros_like(sum_f)
        sum_f = sum_f + fv[starts]
        sum_v = sum_v + vv[starts]
        hits = torch.bincount(group, minlength=n_unique).to(torch.float32)
        max_rank = int(rank.max())
        if max_rank <= _MAX_RANK_STEPS:
            for r in range(1, max_rank + 1):
                at = (rank == r).nonzero().squeeze(1)
                g = group[at]
                sum_f[g] = sum_f[g] + fv[at]
                sum_v[g] = sum_v[g] + vv[at]
        else:  # huge groups (a degenerate zoom): np.add.at adds in array order, i.e. patch order within a group
            rest = (rank > 0).nonzero().squeeze(1)
            g, sums = group[rest].cpu().numpy(), []
            for total, x in ((sum_f, fv), (sum_v, vv)):
                host = total.cpu().numpy()
                np.add.at(host, g, x[rest].cpu().numpy())
                sums.append(torch.from_numpy(host).to(lin.device))
            sum_f, sum_v = sums
        fm = sum_f / hits  # x / 1 == x: the same values as dividing only the shared voxels
        vm = sum_v / hits
        count = maps["count"].view(-1)
        n = count[unique].clamp_(max=ErrorMapStore.MAX_COUNT - 1).add_(1)
        count[unique] = n
        a = self._rates(n)
        new = []
        for kind, target in (("error", fm), ("variance", vm)):
            flat = maps[kind].view(-1)
            cur = flat[unique]
            d = target - cur
            cur = torch.where(a < 0.5, cur + a * d, target - d * (1.0 - a))  # no fma, as the CPU kernel
            flat[unique] = cur
            new.append(cur)
        if out is not None:
            where = pos[perm]
            for k in range(2):
                out[k].view(-1)[where] = new[k][group]
        return n_unique

    def _gather_into(self, maps: dict, plan: tuple, offset, shape, out) -> None:
        for o in out:
            o.zero_()
        if plan[0] == "slices":
            _, case_sl, box, flips = plan
            case_box = tuple(slice(s.start - o, s.stop - o) for s, o in zip(case_sl, offset))
            dims = [d for d in range(3) if flips[d]]
            for k, kind in enumerate(("error", "variance")):
                src = maps[kind][case_box]
                out[k][box] = torch.flip(src, dims) if dims else src
        else:
            _, pos, idx = plan
            if pos.numel() == 0:
                return
            rel = idx - torch.tensor(offset, device=idx.device).view(3, 1)
            lin = (rel[0] * shape[1] + rel[1]) * shape[2] + rel[2]
            for k, kind in enumerate(("error", "variance")):
                out[k].view(-1)[pos] = maps[kind].view(-1)[lin]

    def _box_of(self, plan: tuple) -> tuple:
        """The case-space bounding box ``(offset, shape, slices)`` of a plan's voxels (streamed mode)."""
        if plan[0] == "slices":
            sl = plan[1]
        else:
            idx = plan[2]
            if idx.shape[1] == 0:
                sl = (slice(0, 1),) * 3
            else:
                lo = idx.amin(1).tolist()
                hi = idx.amax(1).tolist()
                sl = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
        return tuple(s.start for s in sl), tuple(s.stop - s.start for s in sl), sl

    def _step(self, case_id: str, coords, failure, variance, out, update: bool) -> int:
        """Update (optional) and gather one patch, under the case's file lock when streamed."""
        plan = self._plan(case_id, torch.as_tensor(coords))
        spatial = tuple(int(s) for s in coords.shape[1:])
        if update:
            f, v = self._values(case_id, plan, failure, variance, spatial)
        if self.mode == "resident":
            maps = self._resident(case_id)
            offset, shape = (0, 0, 0), tuple(self.store.shapes[case_id])
            if update:
                self._dirty.add(case_id)
            return self._apply(maps, plan, f if update else None, v if update else None, offset, shape, out, update)
        offset, shape, box = self._box_of(plan)
        fd = self.store._lock(case_id) if self.store.use_locks else None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            maps = self._load_box(case_id, box)
            n = self._apply(maps, plan, f if update else None, v if update else None, offset, shape, out, update)
            if update:
                self._save_box(case_id, box, maps)
            return n
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _apply(self, maps, plan, f, v, offset, shape, out, update: bool) -> int:
        if not update:
            self._gather_into(maps, plan, offset, shape, out)
            return 0
        if plan[0] == "slices":
            return self._update_slices(maps, plan, f, v, offset, out)
        return self._update_general(maps, plan, f, v, offset, shape, out)

    # ------------------------------------------------------------------ public calls (as ErrorMapStore)
    def _outputs(self, batch: int, spatial) -> tuple[torch.Tensor, torch.Tensor]:
        err = torch.zeros((batch, 1) + tuple(spatial), dtype=torch.float32, device=self.device)
        return err, torch.zeros_like(err)

    @staticmethod
    def _check_batch(name, case_ids, *tensors) -> None:
        if any(len(t) != len(case_ids) for t in tensors):
            raise ValueError(f"{name}: inputs differ in batch size")

    def update_and_gather_batch(self, case_ids: Sequence[str], coords, failure_smoothed, variance, device=None):
        """Every sample scattered before any is gathered (two patches of one case both see both updates);
        ``coords (B,3,…)``, ``failure_smoothed``/``variance`` ``(B,1,…)`` -> ``(error, variance)`` ``(B,1,…)``."""
        self._check_batch("update_and_gather_batch", case_ids, coords, failure_smoothed, variance)
        spatial = tuple(int(s) for s in coords.shape[2:])
        err, var = self._outputs(len(case_ids), spatial)
        distinct = len(set(map(str, case_ids))) == len(case_ids)
        for b, cid in enumerate(case_ids):
            self._step(str(cid), coords[b], failure_smoothed[b], variance[b], (err[b, 0], var[b, 0]) if distinct
                       else None, update=True)
        if not distinct:
            for b, cid in enumerate(case_ids):
                self._step(str(cid), coords[b], None, None, (err[b, 0], var[b, 0]), update=False)
        return (err, var) if device is None else (err.to(device), var.to(device))

    def gather_batch(self, case_ids: Sequence[str], coords, device=None):
        self._check_batch("gather_batch", case_ids, coords)
        err, var = self._outputs(len(case_ids), tuple(int(s) for s in coords.shape[2:]))
        for b, cid in enumerate(case_ids):
            self._step(str(cid), coords[b], None, None, (err[b, 0], var[b, 0]), update=False)
        return (err, var) if device is None else (err.to(device), var.to(device))

    def scatter_batch(self, case_ids: Sequence[str], coords, failure_smoothed, variance) -> int:
        self._check_batch("scatter_batch", case_ids, coords, failure_smoothed, variance)
        return sum(self._step(str(cid), coords[b], failure_smoothed[b], variance[b], None, update=True)
                   for b, cid in enumerate(case_ids))

    def update_and_gather(self, case_id: str, coords, failure_smoothed, variance, device=None):
        err, var = self.update_and_gather_batch([case_id], torch.as_tensor(coords)[None],
                                                torch.as_tensor(failure_smoothed)[None],
                                                torch.as_tensor(variance)[None], device)
        return err[0], var[0]

    def scatter(self, case_id: str, coords, failure_smoothed, variance) -> int:
        return self.scatter_batch([case_id], torch.as_tensor(coords)[None], torch.as_tensor(failure_smoothed)[None],
                                  torch.as_tensor(variance)[None])

    def gather(self, case_id: str, coords, device=None):
        err, var = self.gather_batch([case_id], torch.as_tensor(coords)[None], device)
        return err[0], var[0]
