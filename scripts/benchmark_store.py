"""Benchmark the case-space EMA error-map store at real size (custom/uncertainty/), against its memory floor.

A 128^3 patch into a 140x170x140 case (the BraTS median after cropping), side by side in one run:
- ``fast``: axis-aligned random crops with random mirroring (p 0.5 per axis): the slices path;
- ``augmented``: nnU-Net's spatial augmentation through the real MONAI transforms on the coordinate
  channels (rotation p 0.2 +-30 deg per axis, scaling p 0.2 in 0.7-1.4, mirroring p 0.5 per axis);
- ``rotated``: every patch rotated and zoomed (the general path, worst case).
The coordinates reach the store as int16, like the training batches (``CastToTyped`` at the end of the
training pipeline). Each is timed as ``scatter`` + ``gather`` (two calls) and as the fused ``update_and_gather`` (what the
training handler calls), as the CPU time of the calling thread (what the store costs on an idle core;
on a shared machine the wall time includes waiting for one) and as wall time.

The floor (``floor_ms``): one streaming pass over the bytes the fused step must move, measured in the
same run on the same memory-mapped case: read and write a 128^3 box of the case's error, variance
(float32) and count (uint8), read the patch's failure and var1shot, write the two gathered targets:
34 B per patch voxel. Every scenario is reported as a ratio to it (``*_floor_ratio``).

With ``--device cuda`` the same scenarios also run through the GPU store (``store_device``:
:class:`custom.uncertainty.store_device.DeviceErrorMapStore`), resident on the GPU and streamed through
pinned host memory, timed as wall time with the device synchronised.

Usage: .venv/bin/python scripts/benchmark_store.py --out store_benchmark.json [--iterations 60] [--numba False]
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import torch


from custom.core.atomic import atomic_write_json
from custom.transforms.array import make_case_coordinates
from custom.uncertainty.store import ErrorMapStore
from custom.uncertainty.store_device import DeviceErrorMapStore
from custom.uncertainty.store_kernels import HAVE_NUMBA

NUM_CASES_REAL = 1248
FLOOR_BYTES_PER_VOXEL = 34
GPU_COMMAND = ".venv/bin/python scripts/benchmark_store.py --device cuda --out store_benchmark_gpu.json"


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _augmenter(rot_prob: float, zoom_prob: float, seed: int):
    from monai.transforms import Compose, RandFlipd, RandRotated, RandZoomd

    t = Compose([
        RandRotated(keys="coords", range_x=np.pi / 6, range_y=np.pi / 6, range_z=np.pi / 6, prob=rot_prob,
                    mode="nearest", padding_mode="zeros", keep_size=True),
        RandZoomd(keys="coords", prob=zoom_prob, min_zoom=0.7, max_zoom=1.4, mode="nearest-exact",
                  padding_mode="constant", keep_size=True),  # as bundle/configs/train.json
        RandFlipd(keys="coords", prob=0.5, spatial_axis=0),
        RandFlipd(keys="coords", prob=0.5, spatial_axis=1),
        RandFlipd(keys="coords", prob=0.5, spatial_axis=2),
    ])
    t.set_random_state(seed)
    return t


def _random_patch_coords(case_coords: np.ndarray, patch: int, rng) -> np.ndarray:
    shape = case_coords.shape[1:]
    starts = [int(rng.integers(0, max(s - patch, 0) + 1)) for s in shape]
    return case_coords[:, starts[0]:starts[0] + patch, starts[1]:starts[1] + patch, starts[2]:starts[2] + patch]


def _patches(case_coords, patch, n, rng, augment=None) -> list[torch.Tensor]:
    """The coordinate patches of a scenario, made before any timing (the augmentation is not timed), cast to
    int16 at the end as the training pipeline does (bundle/configs/train.json)."""
    out = []
    for _ in range(n):
        c = _random_patch_coords(case_coords, patch, rng)
        if augment is not None:
            c = torch.as_tensor(augment({"coords": torch.from_numpy(np.ascontiguousarray(c))})["coords"]).as_tensor()
        else:
            c = np.ascontiguousarray(c[tuple([slice(None)] + [slice(None, None, -1) if rng.random() < 0.5
                                                                else slice(None) for _ in range(3)])])
            c = torch.from_numpy(c)
        out.append(c.to(torch.int16).contiguous())
    return out


class _Floor:
    """The streaming floor: one pass over the bytes of a fused step (see the module docstring)."""

    def __init__(self, store: ErrorMapStore, case_id: str, patch: int, rng):
        self.maps = store._open(case_id)
        self.patch, self.rng = patch, rng
        self.f = np.random.default_rng(1).random((patch,) * 3, dtype=np.float32)
        self.v = np.random.default_rng(2).random((patch,) * 3, dtype=np.float32)
        self.out = [np.empty((patch,) * 3, np.float32) for _ in range(2)]
        self.samples: list[float] = []

    def measure(self, n: int = 3) -> None:
        shape = self.maps["error"].shape
        for _ in range(n):
            starts = [int(self.rng.integers(0, max(s - self.patch, 0) + 1)) for s in shape]
            box = tuple(slice(a, a + self.patch) for a in starts)
            t0 = time.thread_time()
            for kind in ("error", "variance"):
                block = self.maps[kind][box]
                np.multiply(block, 1, out=block)
            block = self.maps["count"][box]
            np.add(block, 0, out=block)
            np.copyto(self.out[0], self.f)
            np.copyto(self.out[1], self.v)
            self.samples.append(time.thread_time() - t0)

    @property
    def ms(self) -> float:
        return float(np.median(self.samples)) * 1e3


def _time_cpu(store, case_id, coords_list, f, v, staging, fused: bool) -> dict:
    wall, cpu, paths = [], [], []
    for c in coords_list:
        paths.append(store._analyse(case_id, c)[0])
        t0, p0 = time.perf_counter(), time.thread_time()
        if fused:
            store.update_and_gather(case_id, c, f, v, out=staging)
        else:
            store.scatter(case_id, c, f, v)
            store.gather(case_id, c, out=staging)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - p0)
    return {"wall": np.asarray(wall) * 1e3, "cpu": np.asarray(cpu) * 1e3, "paths": paths}


def _time_device(store: DeviceErrorMapStore, case_id, coords_list, f, v, device, fused: bool) -> dict:
    coords_dev = [c.to(device) for c in coords_list]
    f, v = f.to(device)[None], v.to(device)[None]
    wall = []
    for c in coords_dev:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if fused:
            store.update_and_gather_batch([case_id], c[None], f, v, device=device)
        else:
            store.scatter_batch([case_id], c[None], f, v)
            store.gather_batch([case_id], c[None], device=device)
        torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - t0)
    return {"wall": np.asarray(wall) * 1e3}


def _summary(name: str, times: dict, floor_ms: float, result: dict) -> None:
    for clock in ("cpu", "wall"):
        if clock in times:
            ms = times[clock]
            result[f"{name}_{clock}_mean_ms"] = float(ms.mean())
            result[f"{name}_{clock}_p95_ms"] = float(np.percentile(ms, 95))
            result[f"{name}_{clock}_floor_ratio"] = float(ms.mean() / floor_ms)
    if "paths" in times:
        result[f"{name}_general_path_ratio"] = float(np.mean([p == "general" for p in times["paths"]]))


def main(out: str = "store_benchmark.json", case_shape=(140, 170, 140), patch: int = 128, iterations: int = 60,
         rotated_iterations: int = 16, ema_window: int = 30, seed: int = 0, store_dir: str | None = None,
         threads: int = 1, numba: bool = True, device: str = "cpu"):
    """Measure the store; write one JSON object to ``out`` and print a one-line summary.

    Args:
        out: JSON output path.
        case_shape: preprocessed case shape (X, Y, Z).
        patch: cubic patch edge in voxels.
        iterations: patches per scenario (fast, augmented).
        rotated_iterations: patches for the always-rotated worst case.
        store_dir: where to put the store (default: a temporary folder beside ``out``, removed after).
        threads: torch threads (the store itself is single-threaded).
        numba: the compiled kernels (default; False: the torch fallback).
        device: "cpu", or "cuda" to also time the GPU store (resident and streamed).
    """
    torch.set_num_threads(int(threads))
    case_shape = tuple(int(s) for s in case_shape)
    if len(case_shape) != 3 or min(case_shape) < 1 or int(patch) < 1:
        raise ValueError(f"case_shape must be 3 positive ints and patch positive, got {case_shape}, {patch}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device visible to torch")
    rng = np.random.default_rng(seed)
    rss_before = _rss_mb()
    tmp = None
    if store_dir is None:
        tmp = tempfile.mkdtemp(prefix="store_bench_", dir=str(Path(out).resolve().parent))
        store_dir = tmp
    load_start = os.getloadavg()
    result: dict = {"case_shape": list(case_shape), "patch_size": [int(patch)] * 3, "ema_window": int(ema_window)}
    try:
        store = ErrorMapStore(Path(store_dir) / "store", ema_window=ema_window)
        store.use_numba = bool(numba) and HAVE_NUMBA
        store.create({"case_0": case_shape})
        case_coords = make_case_coordinates(case_shape)
        scenarios = {
            "fast": _patches(case_coords, patch, iterations, rng),
            "augmented": _patches(case_coords, patch, iterations, rng, _augmenter(0.2, 0.2, seed)),
            "rotated": _patches(case_coords, patch, rotated_iterations, rng, _augmenter(1.0, 1.0, seed + 1)),
        }
        f = torch.rand(1, patch, patch, patch)
        v = torch.rand(1, patch, patch, patch)
        staging = (torch.empty(1, patch, patch, patch), torch.empty(1, patch, patch, patch))
        # warm-up: the first touch of every page of the maps, and the kernels' first calls (numba compiles,
        # or loads its cache, here)
        first_call_s = time.perf_counter()
        for c in (scenarios["fast"][0], scenarios["rotated"][0]):
            store.scatter("case_0", c, f, v)
            store.gather("case_0", c, out=staging)
            store.update_and_gather("case_0", c, f, v, out=staging)
        first_call_s = time.perf_counter() - first_call_s
        floor = _Floor(store, "case_0", patch, rng)
        timings = {}
        for name, coords_list in scenarios.items():
            for fused in (False, True):
                floor.measure()  # interleaved, so that the floor sees the same machine load as the scenarios
                timings[(name, fused)] = _time_cpu(store, "case_0", coords_list, f, v, staging, fused)
        floor.measure()
        result["floor_ms"] = floor.ms
        result["floor_min_ms"] = float(np.min(floor.samples)) * 1e3
        result["floor_max_ms"] = float(np.max(floor.samples)) * 1e3
        result["floor_mb"] = patch ** 3 * FLOOR_BYTES_PER_VOXEL / 1e6
        result["floor_gb_per_s"] = result["floor_mb"] / result["floor_ms"]
        for (name, fused), times in timings.items():
            _summary(f"{name}_{'update_and_gather' if fused else 'scatter_gather'}", times, floor.ms, result)
        if device == "cuda":
            dev = torch.device("cuda")
            for mode in ("resident", "streamed"):
                dstore = DeviceErrorMapStore(store, dev, mode=mode)
                for c in (scenarios["fast"][0], scenarios["rotated"][0]):  # warm-up (allocations, first kernels)
                    dstore.update_and_gather_batch(["case_0"], c[None].to(dev), f[None].to(dev), v[None].to(dev))
                for name, coords_list in scenarios.items():
                    for fused in (False, True):
                        times = _time_device(dstore, "case_0", coords_list, f[0], v[0], dev, fused)
                        _summary(f"gpu_{mode}_{name}_{'update_and_gather' if fused else 'scatter_gather'}", times,
                                 floor.ms, result)
                dstore.close()
            result["gpu_name"] = torch.cuda.get_device_name(dev)
        store.flush()
        case_files = [p for p in Path(store.store_dir).iterdir() if p.name.startswith("case_0.") and p.suffix == ".npy"]
        disk_bytes = sum(p.stat().st_size for p in case_files)
        rss_after = _rss_mb()
        buffers_mb = sum(b.nbytes for b in store._work.values()) / 1e6
        store.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    result.update({
        "general_path": "numba" if store.use_numba else "torch",
        "first_calls_s": first_call_s,
        "disk_mb_per_case": disk_bytes / 1e6,
        "projected_disk_gb_1248_cases": disk_bytes * NUM_CASES_REAL / 1e9,
        "rss_mb": rss_after,
        "rss_increase_mb": rss_after - rss_before,
        "store_scratch_buffers_mb": buffers_mb,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "iterations": int(iterations),
        "rotated_iterations": int(rotated_iterations),
        "cpu_count": os.cpu_count(),
        "load_average_1min_start": load_start[0],
        "load_average_1min_end": os.getloadavg()[0],
        "torch_threads": int(threads),
        "gpu_command": GPU_COMMAND,
    })
    atomic_write_json(out, result)
    r = result
    line = (f"store {case_shape} patch {patch}^3, floor {r['floor_ms']:.1f} ms; update_and_gather cpu ms (x floor): "
            f"fast {r['fast_update_and_gather_cpu_mean_ms']:.1f} ({r['fast_update_and_gather_cpu_floor_ratio']:.2f}x), "
            f"augmented {r['augmented_update_and_gather_cpu_mean_ms']:.1f} "
            f"({r['augmented_update_and_gather_cpu_floor_ratio']:.2f}x, "
            f"{100 * r['augmented_update_and_gather_general_path_ratio']:.0f}% general), "
            f"rotated {r['rotated_update_and_gather_cpu_mean_ms']:.1f} "
            f"({r['rotated_update_and_gather_cpu_floor_ratio']:.2f}x); scatter+gather: fast "
            f"{r['fast_scatter_gather_cpu_mean_ms']:.1f}, augmented {r['augmented_scatter_gather_cpu_mean_ms']:.1f}, "
            f"rotated {r['rotated_scatter_gather_cpu_mean_ms']:.1f}")
    if device == "cuda":
        line += (f"; GPU fused wall ms resident/streamed: augmented "
                 f"{r['gpu_resident_augmented_update_and_gather_wall_mean_ms']:.2f}/"
                 f"{r['gpu_streamed_augmented_update_and_gather_wall_mean_ms']:.2f}")
    line += (f" ({r['general_path']}); disk {r['disk_mb_per_case']:.1f} MB/case -> "
             f"{r['projected_disk_gb_1248_cases']:.1f} GB for {NUM_CASES_REAL}; load {load_start[0]:.1f} -> "
             f"{r['load_average_1min_end']:.1f} -> {out}")
    print(line)
    print(f"GPU check (on a machine with a GPU): {GPU_COMMAND}")
    return result


def cli(**kwargs) -> None:
    """fire entry point (returns nothing, so fire prints only the summary line)."""
    main(**kwargs)


cli.__doc__ = main.__doc__

if __name__ == "__main__":
    fire.Fire(main if "--help" in sys.argv else cli)
