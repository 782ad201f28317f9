"""Case-space EMA error-map store and the error-map formulas (custom/uncertainty/)."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandFlipd, RandRotated, RandZoomd, SpatialPadd

from custom.transforms.array import make_case_coordinates
from custom.transforms.dictionary import AddCaseCoordinatesd, ForegroundOversampledCropd
from custom.uncertainty.store import ErrorMapStore
from custom.uncertainty.targets import (
    case_wt_mean,
    compute_prediction_error_probability,
    compute_prediction_failure,
    compute_prediction_variance,
    paper_target_transform,
    smooth_failure,
)

CASE = (40, 44, 36)
PATCH = (24, 24, 24)


def known_function(idx0, idx1, idx2):
    """A value per case voxel that differs between neighbours (so misalignment by one voxel shows)."""
    return ((idx0 * 7 + idx1 * 13 + idx2 * 29) % 97).astype(np.float32) / 97.0 + 0.01


def case_values(shape=CASE):
    i0, i1, i2 = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return known_function(i0, i1, i2)


@pytest.fixture
def store(tmp_path):
    return ErrorMapStore(tmp_path / "store", ema_window=30).create({"case_a": CASE, "case_b": (8, 9, 10)})


# ----------------------------------------------------------------------------------------- formulas
def test_prediction_failure_is_wt_xor():
    p = torch.tensor([0.2, 0.7, 0.5, 0.9, 0.1]).reshape(1, 1, 5, 1, 1)
    gt = torch.tensor([0, 0, 1, 1, 1]).reshape(1, 1, 5, 1, 1).float()
    f = compute_prediction_failure(p, gt)
    # 0.5 is not > 0.5: a false negative
    assert f.flatten().tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="same shape"):
        compute_prediction_failure(p, gt[:, :, :3])


def test_smooth_failure_is_3x3x3_mean_with_zero_padding():
    f = torch.zeros(1, 1, 5, 5, 5)
    f[0, 0, 2, 2, 2] = 1.0
    f[0, 0, 0, 0, 0] = 1.0
    s = smooth_failure(f)
    assert s.shape == f.shape
    assert s[0, 0, 2, 2, 2] == pytest.approx(1 / 27)
    assert s[0, 0, 1, 1, 1] == pytest.approx(2 / 27)  # neighbour of both ones
    assert s[0, 0, 0, 0, 0] == pytest.approx(1 / 27)  # corner: padding counts as 0, divisor stays 27
    assert s[0, 0, 4, 4, 4] == 0.0
    # brute-force reference
    fp = np.pad(f[0, 0].numpy(), 1)
    ref = np.zeros((5, 5, 5))
    for x in range(5):
        for y in range(5):
            for z in range(5):
                ref[x, y, z] = fp[x:x + 3, y:y + 3, z:z + 3].mean()
    np.testing.assert_allclose(s[0, 0].numpy(), ref, atol=1e-7)
    assert smooth_failure(f[0]).shape == f[0].shape


def test_var1shot():
    p = torch.tensor([0.0, 0.5, 1.0, 0.25])
    np.testing.assert_allclose(compute_prediction_variance(p).numpy(), [0.0, 1.0, 0.0, 0.75])


def test_paper_target_transform_by_hand():
    e = torch.tensor([0.0, 0.2, 0.4, 0.9]).reshape(1, 1, 4, 1, 1)
    m = torch.tensor([0, 1, 1, 0]).reshape(1, 1, 4, 1, 1)
    mean_wt = case_wt_mean(e, m)
    torch.testing.assert_close(mean_wt, torch.tensor([0.3]))
    out = paper_target_transform(e, mean_wt).flatten()
    expected = torch.sigmoid(torch.tensor([1e-3 - 0.3, 0.2 - 0.3, 0.4 - 0.3, 0.9 - 0.3]))
    torch.testing.assert_close(out, expected)
    # empty mask: reference 0
    out0 = paper_target_transform(e, case_wt_mean(e, torch.zeros_like(m))).flatten()
    torch.testing.assert_close(out0, torch.sigmoid(torch.clamp_min(e.flatten(), 1e-3)))
    with pytest.raises(ValueError, match="reference"):
        paper_target_transform(e, torch.tensor([0.1, 0.2]))


def test_ema_schedule_pure_function_scripted_visits():
    """First W visits are a running mean, then an EMA with rate 1/W; unvisited voxels untouched."""
    window = 4
    rng = np.random.default_rng(1)
    values = rng.random((12, 3)).astype(np.float32)
    visits = rng.random((12, 3)) < 0.7
    e = np.zeros(3, np.float32)
    n = np.zeros(3, np.uint8)
    ref_e = np.zeros(3)
    ref_n = np.zeros(3, int)
    for value, visit in zip(values, visits):
        e, n = compute_prediction_error_probability(e, n, value, window, visited=visit)
        for v in range(3):
            if visit[v]:
                ref_n[v] += 1
                a = max(1.0 / ref_n[v], 1.0 / window)
                ref_e[v] = (1 - a) * ref_e[v] + a * value[v]
    np.testing.assert_allclose(e, ref_e, rtol=1e-5)
    np.testing.assert_array_equal(n, ref_n)
    # the running-mean phase: after k <= W visits e equals the plain mean
    e1, n1 = np.zeros(1, np.float32), np.zeros(1, np.uint8)
    for k, v in enumerate([0.2, 0.4, 0.9], start=1):
        e1, n1 = compute_prediction_error_probability(e1, n1, np.float32([v]), window)
    assert e1[0] == pytest.approx(np.mean([0.2, 0.4, 0.9]), rel=1e-6) and n1[0] == 3
    # torch flavour agrees
    et, nt = compute_prediction_error_probability(torch.zeros(3), torch.zeros(3, dtype=torch.uint8),
                                                  torch.tensor([0.5, 0.1, 1.0]), window)
    assert et.tolist() == pytest.approx([0.5, 0.1, 1.0]) and nt.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="ema_window"):
        compute_prediction_error_probability(e, n, values[0], 300)


# ----------------------------------------------------------------------------------------- the store
def test_create_is_idempotent_and_validates(tmp_path):
    s = ErrorMapStore(tmp_path / "st", ema_window=5).create({"c1": (4, 5, 6)})
    coords = make_case_coordinates((4, 5, 6))
    s.scatter("c1", coords, np.full((4, 5, 6), 0.5, np.float32), np.zeros((4, 5, 6), np.float32))
    s.create({"c1": (4, 5, 6), "c2": (3, 3, 3)})  # keeps c1's state, adds c2
    assert s.full("c1")["error"].min() == pytest.approx(0.5)
    assert (s.full("c1")["count"] == 1).all() and (s.full("c2")["count"] == 0).all()
    files = sorted(p.name for p in (tmp_path / "st").iterdir() if p.suffix == ".npy")
    assert files == sorted(f"{c}.{k}.npy" for c in ("c1", "c2") for k in ("error", "variance", "count"))
    assert s.full("c1")["error"].dtype == np.float32 and s.full("c1")["count"].dtype == np.uint8
    with pytest.raises(ValueError, match="shape"):
        s.create({"c1": (4, 5, 7)})
    with pytest.raises(ValueError, match="file name"):
        s.create({"../evil": (2, 2, 2)})
    with pytest.raises(KeyError, match="unknown case"):
        s.gather("nope", coords)
    with pytest.raises(ValueError, match="outside case"):
        s.gather("c2", coords)
    with pytest.raises(ValueError, match="ema_window"):
        ErrorMapStore(tmp_path / "x", ema_window=256)
    with pytest.raises(ValueError, match="nearest"):  # bilinear-resampled coordinates
        s.gather("c1", coords + 0.5)


def test_scatter_mean_of_duplicates_counts_once(store):
    """Zoom-in maps several patch voxels to one case voxel: one visit, value = their mean."""
    coords = np.zeros((3, 2, 2, 1), np.float32)
    coords[:, 0, 0, 0] = (3, 4, 5)
    coords[:, 0, 1, 0] = (3, 4, 5)  # same case voxel (2,3,4)
    coords[:, 1, 0, 0] = (1, 1, 1)  # case voxel (0,0,0)
    coords[:, 1, 1, 0] = (0, 7, 7)  # invalid (0 on one axis): never writes
    f = np.array([[[0.2], [0.6]], [[1.0], [0.9]]], np.float32)
    updated = store.scatter("case_b", coords, f, f * 0.5)
    full = store.full("case_b")
    assert updated == 2
    assert full["count"][2, 3, 4] == 1 and full["count"][0, 0, 0] == 1 and full["count"].sum() == 2
    assert full["error"][2, 3, 4] == pytest.approx(0.4) and full["error"][0, 0, 0] == pytest.approx(1.0)
    assert full["variance"][2, 3, 4] == pytest.approx(0.2)
    assert full["error"][6, 6, 6] == 0 and full["count"][:, 6, 6].sum() == 0
    err, var = store.gather("case_b", coords)
    assert err.shape == (1, 2, 2, 1) and err.dtype == torch.float32
    assert err[0, :, :, 0].flatten().tolist() == pytest.approx([0.4, 0.4, 1.0, 0.0])
    # a second visit: running mean with the new value
    store.scatter("case_b", coords, np.full_like(f, 0.8), f * 0)
    assert store.full("case_b")["error"][2, 3, 4] == pytest.approx((0.4 + 0.8) / 2)
    assert store.full("case_b")["count"][2, 3, 4] == 2


def test_store_ema_schedule_and_saturating_count(tmp_path):
    window = 5
    s = ErrorMapStore(tmp_path / "st", ema_window=window).create({"c": (2, 2, 2)})
    coords = make_case_coordinates((2, 2, 2))
    rng = np.random.default_rng(0)
    ref_e, ref_n = 0.0, 0
    for step in range(300):
        v = np.float32(rng.random())
        s.scatter("c", coords, np.full((2, 2, 2), v, np.float32), np.full((2, 2, 2), v, np.float32))
        ref_n += 1
        a = max(1.0 / ref_n, 1.0 / window)
        ref_e = (1 - a) * ref_e + a * v
        if step in (0, 3, 4, 10, 299):
            full = s.full("c")
            assert full["error"][0, 0, 0] == pytest.approx(ref_e, rel=1e-4), step
    assert (s.full("c")["count"] == 255).all()  # saturates instead of wrapping to 0


def test_fast_path_equals_general_path(tmp_path):
    """Axis-aligned flipped crops use slicing; the result must equal the general (bincount) path."""
    rng = np.random.default_rng(3)
    fast = ErrorMapStore(tmp_path / "fast").create({"c": CASE})
    slow = ErrorMapStore(tmp_path / "slow").create({"c": CASE})
    slow.allow_fast_path = False
    cc = make_case_coordinates(CASE)
    for step in range(6):
        x0, y0, z0 = rng.integers(0, 17), rng.integers(0, 21), rng.integers(0, 13)
        c = cc[:, x0:x0 + 24, y0:y0 + 24, z0:z0 + 24]
        for axis in range(3):
            if rng.random() < 0.5:
                c = np.flip(c, axis + 1)
        if step == 5:  # padding around the crop stays on the fast path
            c = np.pad(c, [(0, 0), (2, 1), (0, 3), (1, 0)])
        c = np.ascontiguousarray(c)
        assert fast._analyse("c", c)[0] == "slices"
        f = rng.random(c.shape[1:]).astype(np.float32)
        v = rng.random(c.shape[1:]).astype(np.float32)
        fast.scatter("c", torch.from_numpy(c), torch.from_numpy(f)[None], v)
        slow.scatter("c", c, f, v)
        for a, b in zip(fast.gather("c", c), slow.gather("c", c)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for kind in ("error", "variance", "count"):
        np.testing.assert_allclose(fast.full("c")[kind], slow.full("c")[kind], rtol=1e-6, atol=1e-6)


def test_update_and_gather_general_path_with_duplicates(tmp_path):
    """The fused call reuses the values it wrote; with zoom-in duplicates it must equal scatter + gather."""
    rng = np.random.default_rng(5)
    cc = make_case_coordinates(CASE)
    # zoom-in by 2 on x (every case row twice) plus a random invalid sprinkle: the general path
    c = np.repeat(cc[:, 3:15, 2:26, 4:28], 2, axis=1)
    c[:, rng.random(c.shape[1:]) < 0.1] = 0
    fused = ErrorMapStore(tmp_path / "fused").create({"c": CASE})
    split = ErrorMapStore(tmp_path / "split").create({"c": CASE})
    assert fused._analyse("c", c)[0] == "general"
    for step in range(3):
        f = torch.rand(1, *c.shape[1:])
        v = torch.rand(1, *c.shape[1:])
        e1, v1 = fused.update_and_gather("c", torch.from_numpy(c), f, v)
        split.scatter("c", c, f, v)
        e2, v2 = split.gather("c", c)
        torch.testing.assert_close(e1, e2)
        torch.testing.assert_close(v1, v2)
    b1 = fused.update_and_gather_batch(["c"], torch.from_numpy(c)[None], f[None], v[None])
    split.scatter_batch(["c"], c[None], f[None], v[None])
    torch.testing.assert_close(b1[0], split.gather_batch(["c"], c[None])[0])
    np.testing.assert_array_equal(fused.full("c")["count"], split.full("c")["count"])
    assert fused.full("c")["count"].max() == 4


def _augment_pipeline(seed):
    t = Compose([
        AddCaseCoordinatesd(ref_key="image", coords_key="coords"),
        RandRotated(keys=["image", "value", "coords"], range_x=0.5, range_y=0.5, range_z=0.5, prob=1.0,
                    mode=["bilinear", "nearest", "nearest"], padding_mode="zeros", keep_size=True),
        RandZoomd(keys=["image", "value", "coords"], prob=1.0, min_zoom=0.7, max_zoom=1.4,
                  mode=["trilinear", "nearest", "nearest"], padding_mode="constant", keep_size=True),
        RandFlipd(keys=["image", "value", "coords"], prob=0.5, spatial_axis=0),
        RandFlipd(keys=["image", "value", "coords"], prob=0.5, spatial_axis=1),
        RandFlipd(keys=["image", "value", "coords"], prob=0.5, spatial_axis=2),
        ForegroundOversampledCropd(keys=["image", "value", "coords", "label"], label_key="label",
                                   patch_size=PATCH),
        SpatialPadd(keys=["image", "value", "coords"], spatial_size=[26, 26, 26], mode="constant"),
    ])
    t.set_random_state(seed)
    return t


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_alignment_through_monai_rotation_zoom_flip_crop(tmp_path, seed):
    """A patch whose values are a known function of case coordinates lands on exactly those case voxels."""
    rng = np.random.default_rng(seed)
    values = case_values()
    label = np.zeros((1,) + CASE, np.uint8)
    label[0, 15:25, 18:28, 12:22] = 2
    data = {"image": rng.standard_normal((4,) + CASE).astype(np.float32), "value": values[None].copy(),
            "label": label, "force_fg": bool(seed % 2)}
    out = _augment_pipeline(seed)(data)
    coords = out["coords"]
    patch_values = torch.as_tensor(out["value"])[0].numpy()
    c = torch.as_tensor(coords).numpy()
    valid = (c > 0).all(0)
    assert valid.any() and (~valid).any()  # rotation/zoom/pad leave invalid voxels
    idx = np.rint(c[:, valid]).astype(int) - 1
    # the transforms themselves keep coords and the carried image aligned
    np.testing.assert_array_equal(patch_values[valid], known_function(*idx))

    s = ErrorMapStore(tmp_path / "store", ema_window=30).create({"c": CASE})
    s.scatter("c", coords, torch.as_tensor(out["value"]), torch.as_tensor(out["value"]) * 0.5)
    full = s.full("c")
    covered = np.zeros(CASE, bool)
    covered[tuple(idx)] = True
    # exactly the covered case voxels were visited once, with the known value; nothing else moved
    np.testing.assert_array_equal(full["count"], covered.astype(np.uint8))
    np.testing.assert_allclose(full["error"][covered], values[covered], rtol=1e-6)
    np.testing.assert_allclose(full["variance"][covered], 0.5 * values[covered], rtol=1e-6)
    assert not full["error"][~covered].any() and not full["variance"][~covered].any()
    # gather returns the store at each patch voxel (0 where invalid)
    err, var = s.gather("c", coords)
    np.testing.assert_allclose(err[0].numpy()[valid], patch_values[valid], rtol=1e-6)
    assert not err[0].numpy()[~valid].any() and not var[0].numpy()[~valid].any()


def test_padding_never_writes(tmp_path):
    """Case smaller than the patch: the padded border is invalid and leaves the store untouched."""
    small = (20, 44, 16)
    s = ErrorMapStore(tmp_path / "store").create({"c": small})
    data = {"image": np.ones((4,) + small, np.float32), "label": np.zeros((1,) + small, np.uint8)}
    data = AddCaseCoordinatesd()(data)
    crop = ForegroundOversampledCropd(["image", "label", "coords"], "label", PATCH)
    crop.set_random_state(0)
    out = crop(data)
    c = out["coords"]
    assert c.shape == (3,) + PATCH
    valid = (c > 0).all(0)
    assert valid.sum() == 20 * 24 * 16 and not (out["image"][:, ~valid]).any()
    ones = np.ones(PATCH, np.float32)
    s.scatter("c", c, ones, ones)
    full = s.full("c")
    assert full["count"].sum() == 20 * 24 * 16 and full["error"].sum() == pytest.approx(20 * 24 * 16)
    # all-invalid patch: nothing written
    n = s.scatter("c", np.zeros((3,) + PATCH, np.float32), ones, ones)
    assert n == 0 and s.full("c")["count"].sum() == 20 * 24 * 16


def test_batch_api_snapshot_restore_and_pickle(tmp_path, store):
    cc = make_case_coordinates(CASE)
    coords = torch.from_numpy(np.stack([cc[:, :24, :24, :24], cc[:, 10:34, 5:29, 12:36]]))
    f = torch.rand(2, 1, 24, 24, 24)
    v = torch.rand(2, 1, 24, 24, 24)
    assert store.scatter_batch(["case_a", "case_a"], coords, f, v) == 2 * 24**3
    err, var = store.gather_batch(["case_a", "case_a"], coords)
    assert err.shape == (2, 1, 24, 24, 24) and var.shape == err.shape
    state = store.full("case_a")
    snap = store.snapshot(tmp_path / "snap")
    assert (snap / "index.json").exists()
    store.scatter_batch(["case_a", "case_a"], coords, f * 0 + 1, v)
    assert not np.array_equal(store.full("case_a")["error"], state["error"])
    store.restore(snap)
    for kind in ("error", "variance", "count"):
        np.testing.assert_array_equal(store.full("case_a")[kind], state[kind])
    clone = pickle.loads(pickle.dumps(store))
    assert clone._maps == {}
    torch.testing.assert_close(clone.gather("case_a", coords[1])[0], store.gather("case_a", coords[1])[0])
    buf = (torch.empty(1, 24, 24, 24), torch.empty(1, 24, 24, 24))
    got = store.gather("case_a", coords[1], out=buf)
    assert got[0].data_ptr() == buf[0].data_ptr()
    torch.testing.assert_close(got[0], err[1])
    with pytest.raises(FileNotFoundError, match="index.json"):
        store.restore(tmp_path / "missing")
    # scatter-then-gather in one call equals the two calls
    twin = ErrorMapStore(tmp_path / "twin").create({"case_a": CASE})
    twin.restore(snap)
    e1, v1 = store.update_and_gather_batch(["case_a", "case_a"], coords, f, v)
    twin.scatter_batch(["case_a", "case_a"], coords, f, v)
    e2, v2 = twin.gather_batch(["case_a", "case_a"], coords)
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(v1, v2)


def _worker(store, n):
    coords = make_case_coordinates((6, 6, 6))
    ones = np.ones((6, 6, 6), np.float32)
    for _ in range(n):
        store.scatter("c", coords, ones, ones)


def test_concurrent_processes_lose_no_update(tmp_path):
    """Two forked processes scatter into one case at once: the per-case lock loses no visit."""
    store = ErrorMapStore(tmp_path / "store", ema_window=200).create({"c": (6, 6, 6)})
    _worker(store, 1)  # maps and lock file opened before the fork: children must not share the lock
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(store, 100)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert (store.full("c")["count"] == 201).all()
    store2 = ErrorMapStore(tmp_path / "store2", ema_window=200).create({"c": (6, 6, 6)})
    procs = [ctx.Process(target=_worker, args=(pickle.loads(pickle.dumps(store2)), 60)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert (store2.full("c")["count"] == 120).all()


def test_benchmark_store_script_writes_json(tmp_path):
    """The benchmark entry point runs end to end at a tiny size and writes one JSON object with units, the floor
    measured in the same run and every scenario as a ratio to it, and prints the GPU command."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/benchmark_store.py", "--out", str(out), "--case_shape",
                           "[40,44,36]", "--patch", "24", "--iterations", "3", "--rotated_iterations", "2"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["case_shape"] == [40, 44, 36]
    # 40*44*36 voxels x (4 + 4 + 1) bytes plus three .npy headers
    assert result["disk_mb_per_case"] == pytest.approx(40 * 44 * 36 * 9 / 1e6, rel=0.01)
    assert result["floor_mb"] == pytest.approx(24**3 * 34 / 1e6) and result["floor_ms"] > 0
    for scenario in ("fast", "augmented", "rotated"):
        for call in ("scatter_gather", "update_and_gather"):
            name = f"{scenario}_{call}"
            assert result[f"{name}_cpu_mean_ms"] > 0 and result[f"{name}_wall_p95_ms"] > 0
            assert result[f"{name}_cpu_floor_ratio"] == pytest.approx(result[f"{name}_cpu_mean_ms"] / result["floor_ms"])
    assert result["rotated_update_and_gather_general_path_ratio"] == 1.0
    assert result["fast_update_and_gather_general_path_ratio"] == 0.0
    assert result["projected_disk_gb_1248_cases"] > 0 and result["rss_mb"] > 0
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and "x floor" in lines[0] and "MB/case" in lines[0]
    assert lines[1].endswith("python scripts/benchmark_store.py --device cuda --out store_benchmark_gpu.json")
    assert not any(p.name.startswith("store_bench_") for p in tmp_path.iterdir())  # temporary store removed


def test_open_cases_are_bounded(tmp_path):
    """1248 cases x (3 maps + 1 lock) would exhaust file descriptors: only the most recent cases stay open."""
    import os

    cases = {f"c{i}": (4, 4, 4) for i in range(6)}
    s = ErrorMapStore(tmp_path / "st", max_open_cases=2).create(cases)
    coords = make_case_coordinates((4, 4, 4))
    ones = np.ones((4, 4, 4), np.float32)
    fds_before = len(os.listdir("/proc/self/fd"))
    for round_ in range(2):
        for case_id in cases:
            s.scatter(case_id, coords, ones * (round_ + 1) / 2, ones)
    assert len(s._maps) == 2 and len(s._lock_fds) == 2
    assert len(os.listdir("/proc/self/fd")) - fds_before <= 2 * 4
    for case_id in cases:  # evicted cases were flushed and reopen with their state
        full = s.full(case_id)
        assert (full["count"] == 2).all() and full["error"] == pytest.approx(np.full((4, 4, 4), 0.75))
    with pytest.raises(ValueError, match="max_open_cases"):
        ErrorMapStore(tmp_path / "x", max_open_cases=0)


def _random_affine_coords(rng, case, patch, zoom):
    """Nearest-neighbour coordinates of a randomly rotated, zoomed, shifted patch (index + 1, 0 outside)."""
    angles = rng.uniform(-0.6, 0.6, 3)
    rot = np.eye(3)
    for axis, ang in enumerate(angles):
        r = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        r[i, i] = r[j, j] = np.cos(ang)
        r[i, j], r[j, i] = -np.sin(ang), np.sin(ang)
        rot = rot @ r
    grid = np.stack(np.meshgrid(*[np.arange(p) - (p - 1) / 2 for p in patch], indexing="ij")).reshape(3, -1)
    centre = np.array(case) / 2 + rng.uniform(-4, 4, 3)
    idx = np.rint(rot @ grid / zoom + centre[:, None])
    inside = ((idx >= 0) & (idx < np.array(case)[:, None])).all(0)
    return np.where(inside, idx + 1, 0).astype(np.float32).reshape((3,) + tuple(patch))


@pytest.mark.skipif(not pytest.importorskip("custom.uncertainty.store_kernels").HAVE_NUMBA, reason="numba not importable")
def test_numba_general_path_equals_torch_fallback_exactly(tmp_path):
    """The compiled general kernel and the torch fallback give bit-identical stores and gathers on rotated and
    zoomed coordinates (zoom-in: many patch voxels per case voxel), with invalid voxels and repeated visits."""
    rng = np.random.default_rng(11)
    kernel = ErrorMapStore(tmp_path / "numba", ema_window=3).create({"c": CASE})
    torch_ = ErrorMapStore(tmp_path / "torch", ema_window=3).create({"c": CASE})
    torch_.use_numba = False
    assert kernel.use_numba
    duplicates = 0
    for step, zoom in enumerate([1.4, 0.7, 1.0, 2.3, 1.4, 0.9, 1.2, 3.0]):
        c = _random_affine_coords(rng, CASE, PATCH, zoom)
        c[:, rng.random(PATCH) < 0.05] = 0  # scattered invalid voxels
        plan = kernel._analyse("c", c)
        assert plan[0] == "general" and plan[3] is not None and torch_._analyse("c", c)[3] is None
        valid = (c > 0).all(0)
        duplicates += int(valid.sum()) - len(np.unique(c[:, valid], axis=1).T)
        f = torch.from_numpy(rng.random(PATCH).astype(np.float32))
        v = torch.from_numpy(rng.random(PATCH).astype(np.float32))
        if step % 2:
            got = kernel.update_and_gather("c", torch.from_numpy(c), f[None], v[None])
            want = torch_.update_and_gather("c", torch.from_numpy(c), f[None], v[None])
        else:
            assert kernel.scatter("c", c, f, v) == torch_.scatter("c", c, f, v)
            got, want = kernel.gather("c", c), torch_.gather("c", c)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert not got[0][0][~torch.from_numpy(valid)].any()
    assert duplicates > 1000
    full_k, full_t = kernel.full("c"), torch_.full("c")
    assert full_k["count"].max() >= 4  # past the running-mean phase (W = 3)
    for kind in ("error", "variance", "count"):
        np.testing.assert_array_equal(full_k[kind], full_t[kind])
    # the batch call, with two patches of one case (gathered after both scatters) and non-contiguous coords
    c = np.stack([_random_affine_coords(rng, CASE, PATCH, 1.3) for _ in range(2)])
    f, v = torch.rand(2, 1, *PATCH), torch.rand(2, 1, *PATCH)
    got = kernel.update_and_gather_batch(["c", "c"], torch.from_numpy(c).flip(2), f, v)
    want = torch_.update_and_gather_batch(["c", "c"], torch.from_numpy(c).flip(2), f, v)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for kind in ("error", "variance", "count"):
        np.testing.assert_array_equal(kernel.full("c")[kind], torch_.full("c")[kind])


@pytest.mark.skipif(not pytest.importorskip("custom.uncertainty.store_kernels").HAVE_NUMBA, reason="numba not importable")
def test_numba_general_path_rejects_bad_coords_without_writing(tmp_path):
    s = ErrorMapStore(tmp_path / "st").create({"c": CASE})
    rng = np.random.default_rng(2)
    c = _random_affine_coords(rng, CASE, PATCH, 1.2)
    ones = np.ones(PATCH, np.float32)
    bad = c.copy()
    bad[0, -1, -1, -1] = CASE[0] + 3  # beyond the case, after many valid voxels were seen
    with pytest.raises(ValueError, match="outside case"):
        s.scatter("c", bad, ones, ones)
    with pytest.raises(ValueError, match="outside case"):
        s.gather("c", bad)
    half = c.copy()
    half[:, -1, -1, -1] = (0.5, 3, 3)  # a valid coordinate that is not an integer index
    with pytest.raises(ValueError, match="nearest"):
        s.update_and_gather("c", half, ones, ones)
    assert not s.full("c")["count"].any()
    # the kernel's scratch was left clean: a good patch still counts every case voxel once
    assert s.scatter("c", c, ones, ones) == len(np.unique(c[:, (c > 0).all(0)], axis=1).T)
    assert s.full("c")["count"].max() == 1
    assert not s._work["nb_slotmap"].any()


# ----------------------------------------------------------------------------------------- slices kernel
def _mirrored_crops(rng, n, pad_last=True, depth=19):
    """Crops with random mirroring; ``depth`` 19: rows that are not a multiple of the SIMD width."""
    cc = make_case_coordinates(CASE)
    for step in range(n):
        x0, y0, z0 = rng.integers(0, 17), rng.integers(0, 21), rng.integers(0, 13)
        c = cc[:, x0:x0 + 24, y0:y0 + 24, z0:z0 + depth]
        for axis in range(3):
            if rng.random() < 0.5:
                c = np.flip(c, axis + 1)
        if pad_last and step == n - 1:
            c = np.pad(c, [(0, 0), (2, 1), (0, 3), (1, 0)])
        yield np.ascontiguousarray(c)


@pytest.mark.skipif(not pytest.importorskip("custom.uncertainty.store_kernels").HAVE_NUMBA, reason="numba not importable")
def test_numba_slices_path_equals_torch_fallback_exactly(tmp_path):
    """The compiled slices kernel (crop + mirroring, padding) gives the torch path's bits: torch's lerp_ with its
    fused multiply-add, through both branches of the rate (W = 3: 1, 1/2 then 1/3)."""
    rng = np.random.default_rng(4)
    kernel = ErrorMapStore(tmp_path / "numba", ema_window=3).create({"c": CASE})
    torch_ = ErrorMapStore(tmp_path / "torch", ema_window=3).create({"c": CASE})
    torch_.use_numba = False
    for step, c in enumerate(_mirrored_crops(rng, 9)):
        assert kernel._analyse("c", c)[0] == "slices" == torch_._analyse("c", c)[0]
        f = torch.from_numpy(rng.random(c.shape[1:]).astype(np.float32))
        v = torch.from_numpy(rng.random(c.shape[1:]).astype(np.float32))
        if step % 2:
            got = kernel.update_and_gather("c", torch.from_numpy(c), f[None], v[None])
            want = torch_.update_and_gather("c", torch.from_numpy(c), f[None], v[None])
        else:
            assert kernel.scatter("c", c, f, v) == torch_.scatter("c", c, f, v)
            got, want = kernel.gather("c", c), torch_.gather("c", c)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    full_k, full_t = kernel.full("c"), torch_.full("c")
    assert full_k["count"].max() >= 4
    for kind in ("error", "variance", "count"):
        np.testing.assert_array_equal(full_k[kind], full_t[kind])
    # the fma matters: the plain two-operation lerp differs in the last bit somewhere
    e, t = rng.random(4096).astype(np.float32), rng.random(4096).astype(np.float32)
    a = np.float32(1) / rng.integers(1, 40, 4096).astype(np.float32)
    d = t - e
    plain = np.where(a < 0.5, e + a * d, t - d * (np.float32(1) - a))
    assert not np.array_equal(plain, torch.from_numpy(e).lerp_(torch.from_numpy(t), torch.from_numpy(a)).numpy())


@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("path", ["slices", "general", "separable"])
def test_non_finite_values_never_reach_the_store(tmp_path, numba, path):
    """A NaN var1shot (non-finite prediction) or a value above 1 is refused with a ValueError; the case keeps
    finite values in [0, 1] (the voxels with bad values are not written)."""
    from custom.uncertainty.store_kernels import HAVE_NUMBA

    if numba and not HAVE_NUMBA:
        pytest.skip("numba not importable")
    s = ErrorMapStore(tmp_path / "st").create({"c": CASE})
    s.use_numba = numba
    rng = np.random.default_rng(0)
    if path == "slices":
        c = next(_mirrored_crops(rng, 1, pad_last=False))
    elif path == "general":
        c = _random_affine_coords(rng, CASE, PATCH, 1.2)
    else:  # zoom-in by 2 on x: separable
        c = np.ascontiguousarray(np.repeat(make_case_coordinates(CASE)[:, 3:15, 2:26, 4:28], 2, axis=1))
    assert s._analyse("c", c)[0] == (path if numba or path == "slices" else "general")
    ones = np.ones(c.shape[1:], np.float32) * 0.5
    s.scatter("c", c, ones, ones)
    before = s.full("c")
    for bad_value in (np.nan, np.inf, 1.5):
        v = ones.copy()
        valid = np.argwhere((c > 0).all(0))
        v[tuple(valid[len(valid) // 2])] = bad_value
        with pytest.raises(ValueError, match=r"variance has 1 values outside \[0, 1\]"):
            s.update_and_gather("c", c, ones, v)
        full = s.full("c")
        for kind in ("error", "variance"):
            assert np.isfinite(full[kind]).all() and full[kind].max() <= 1.0
        bad_voxel = tuple(int(k) - 1 for k in c[(slice(None),) + tuple(valid[len(valid) // 2])])
        assert full["count"][bad_voxel] == before["count"][bad_voxel]


# ----------------------------------------------------------------------------------------- damaged store files
def _store_with_state(tmp_path):
    s = ErrorMapStore(tmp_path / "st", ema_window=5).create({"c1": (6, 7, 8), "c2": (5, 5, 5)})
    s.scatter("c1", make_case_coordinates((6, 7, 8)), np.full((6, 7, 8), 0.25, np.float32),
              np.full((6, 7, 8), 0.5, np.float32))
    s.close()
    return tmp_path / "st"


def _damage(path, how):
    import json

    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:-100])
    elif how == "nan":
        mm = np.load(path, mmap_mode="r+")
        mm[1, 2, 3] = np.nan
        mm.flush()
    elif how == "above_one":
        mm = np.load(path, mmap_mode="r+")
        mm[0, 0, 1] = 3.0
        mm.flush()
    elif how == "shape":
        np.save(path, np.zeros((6, 7, 9), np.float32))
    elif how == "dtype":
        np.save(path, np.zeros((6, 7, 8), np.float64))
    elif how == "not_npy":
        path.write_bytes(b"garbage" * 10)
    elif how == "index":
        path.write_text('{"cases": {"c1": [6, 7')
    elif how == "index_shape":
        index = json.loads(path.read_text())
        index["cases"]["c1"] = [6, 7, 80]
        path.write_text(json.dumps(index))


@pytest.mark.parametrize("how,kind,expect", [
    ("truncated", "error", "truncated"), ("nan", "error", r"value nan at voxel \[1, 2, 3\] is outside \[0, 1\]"),
    ("above_one", "variance", r"value 3\.0 at voxel \[0, 0, 1\]"), ("shape", "variance", "differs from .*index.json"),
    ("dtype", "error", "float64 values, expected float32"), ("not_npy", "count", "not a readable .npy"),
    ("truncated", "count", "truncated"), ("index", None, "not valid JSON"), ("index_shape", None, "differs from"),
])
def test_damaged_store_files_are_refused_by_name(tmp_path, how, kind, expect):
    """Every damage is named with its file: before, a truncated .npy was zero-extended by memmap r+, NaN and
    out-of-range values were used, a shape that differs from index.json let the kernel write past the map."""
    from custom.core.errors import BraTSInputError

    root = _store_with_state(tmp_path)
    target = root / ("index.json" if kind is None else f"c1.{kind}.npy")
    _damage(target, how)
    size = target.stat().st_size
    s = ErrorMapStore(root, ema_window=5)
    coords = make_case_coordinates((6, 7, 8))
    with pytest.raises(BraTSInputError, match=expect) as err:
        s.update_and_gather("c1", coords, np.zeros((6, 7, 8), np.float32), np.zeros((6, 7, 8), np.float32))
    assert str(target) in str(err.value)
    assert target.stat().st_size == size, "the damaged file was changed"
    if kind is not None:
        assert s.gather("c2", make_case_coordinates((5, 5, 5)))[0].shape == (1, 5, 5, 5)  # other cases still work
        # a snapshot names the damaged live file; restoring from a damaged snapshot names the snapshot file
        with pytest.raises(BraTSInputError, match=expect):
            s.snapshot(tmp_path / "snap")
        assert not (tmp_path / "snap").exists()
        fresh = ErrorMapStore(tmp_path / "fresh", ema_window=5).create({"c1": (6, 7, 8), "c2": (5, 5, 5)})
        with pytest.raises(BraTSInputError, match=expect) as err:
            fresh.restore(root)
        assert str(target) in str(err.value)
        assert not fresh.full("c1")["count"].any(), "a refused restore changed the store"


def test_snapshot_carries_meta_and_restore_checks_values(tmp_path):
    root = _store_with_state(tmp_path)
    s = ErrorMapStore(root, ema_window=5)
    snap = s.snapshot(tmp_path / "snap", meta={"epoch": 3, "token": "abc"})
    import json

    assert json.loads((snap / "epoch.json").read_text()) == {"epoch": 3, "token": "abc"}
    assert sorted(p.name for p in snap.iterdir()) == sorted(
        ["index.json", "epoch.json"] + [f"{c}.{k}.npy" for c in ("c1", "c2") for k in ("error", "variance", "count")])
    s.scatter("c1", make_case_coordinates((6, 7, 8)), np.ones((6, 7, 8), np.float32), np.ones((6, 7, 8), np.float32))
    s.restore(snap)
    assert s.full("c1")["error"].max() == pytest.approx(0.25) and s.full("c1")["count"].max() == 1
    s.reset()
    assert not any(s.full(c)[k].any() for c in ("c1", "c2") for k in ("error", "variance", "count"))


# ----------------------------------------------------------------------------------------- the device store
def _device_stores(tmp_path, mode, device="cpu", window=3):
    from custom.uncertainty.store_device import DeviceErrorMapStore

    ref = ErrorMapStore(tmp_path / "ref", ema_window=window).create({"c": CASE, "d": (8, 9, 10)})
    dev = DeviceErrorMapStore(ErrorMapStore(tmp_path / f"dev_{mode}", ema_window=window).create(
        {"c": CASE, "d": (8, 9, 10)}), device, mode=mode)
    return ref, dev


def _mixed_patches(rng, n):
    """Crops with mirroring and padding, rotated/zoomed patches (zoom-in duplicates), scattered invalid voxels."""
    crops = _mirrored_crops(rng, n)
    for step in range(n):
        if step % 3 == 0:
            yield next(crops)
        else:
            c = _random_affine_coords(rng, CASE, PATCH, [1.4, 0.8, 2.2][step % 3])
            c[:, rng.random(PATCH) < 0.05] = 0
            yield c


def _compare_device_with_cpu(ref, dev, rng, device):
    for step, c in enumerate(_mixed_patches(rng, 9)):
        f = torch.from_numpy(rng.random(c.shape[1:]).astype(np.float32))
        v = torch.from_numpy(rng.random(c.shape[1:]).astype(np.float32))
        ct = torch.from_numpy(np.ascontiguousarray(c))
        if step % 2:
            want = ref.update_and_gather_batch(["c"], ct[None], f[None, None], v[None, None])
            got = dev.update_and_gather_batch(["c"], ct[None].to(device), f[None, None].to(device),
                                              v[None, None].to(device), device="cpu")
        else:
            assert ref.scatter("c", c, f, v) == dev.scatter("c", ct.to(device), f.to(device), v.to(device))
            want, got = ref.gather("c", c), dev.gather("c", ct.to(device), device="cpu")
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b.reshape(a.shape)), step
    # a batch with two patches of one case (both scattered before either is gathered) and one of another
    cs = [next(_mirrored_crops(rng, 1, pad_last=False, depth=24)), _random_affine_coords(rng, CASE, PATCH, 1.3)]
    c = torch.from_numpy(np.stack(cs + [cs[0]]))
    c[2] = 0
    c[2, :, :8, :9, :10] = torch.from_numpy(make_case_coordinates((8, 9, 10)))
    f, v = torch.rand(3, 1, *PATCH), torch.rand(3, 1, *PATCH)
    ids = ["c", "c", "d"]
    want = ref.update_and_gather_batch(ids, c, f, v)
    got = dev.update_and_gather_batch(ids, c.to(device), f.to(device), v.to(device), device="cpu")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for case in ("c", "d"):
        full_r, full_d = ref.full(case), dev.full(case)
        assert full_r["count"].max() >= 4 or case == "d"
        for kind in ("error", "variance", "count"):
            np.testing.assert_array_equal(full_d[kind], full_r[kind])


@pytest.mark.parametrize("mode", ["resident", "streamed"])
def test_device_store_equals_cpu_store_bit_for_bit(tmp_path, mode):
    """store_device: the torch path (run here on CPU tensors) does the CPU store's float32 operations in the same
    order: crops (torch's lerp_), rotated and zoomed patches with duplicates summed in patch order, batches."""
    ref, dev = _device_stores(tmp_path, mode)
    assert dev.mode == mode
    _compare_device_with_cpu(ref, dev, np.random.default_rng(7), "cpu")
    # resident maps reach the files at flush / snapshot; restore and reset reach the device copy
    snap = dev.snapshot(tmp_path / "snap", meta={"epoch": 1})
    reopened = ErrorMapStore(snap)
    np.testing.assert_array_equal(reopened.full("c")["error"], ref.full("c")["error"])
    coords = make_case_coordinates(CASE)
    dev.scatter("c", torch.from_numpy(coords), torch.ones(CASE), torch.ones(CASE))
    dev.restore(snap)
    np.testing.assert_array_equal(dev.full("c")["count"], ref.full("c")["count"])
    dev.reset()
    assert not dev.full("c")["count"].any()
    with pytest.raises(ValueError, match="outside case"):
        dev.gather("d", torch.from_numpy(coords))
    with pytest.raises(ValueError, match="nearest"):
        dev.gather("c", torch.from_numpy(coords[:, :10, :10, :10]) + 0.5)
    bad = torch.ones(CASE)
    bad[3, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"variance has 1 values outside \[0, 1\]"):
        dev.scatter("c", torch.from_numpy(coords), torch.ones(CASE) * 0.5, bad)
    assert not dev.full("c")["count"].any()
    dev.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU check of issue 19)")
@pytest.mark.parametrize("mode", ["resident", "streamed"])
def test_device_store_on_the_gpu_equals_cpu_store(tmp_path, mode):
    ref, dev = _device_stores(tmp_path, mode, device="cuda")
    _compare_device_with_cpu(ref, dev, np.random.default_rng(8), "cuda")


@pytest.mark.skipif(not pytest.importorskip("custom.uncertainty.store_kernels").HAVE_NUMBA, reason="numba not importable")
def test_numba_separable_path_equals_torch_fallback_exactly(tmp_path):
    """Zoomed, not rotated patches (MONAI's nearest zoom: repeated rows when zooming in, skipped rows and zero
    padding when zooming out, then mirroring) take the separable kernel; it gives the general path's bits."""
    from monai.transforms import Flip, Zoom

    rng = np.random.default_rng(12)
    kernel = ErrorMapStore(tmp_path / "numba", ema_window=3).create({"c": CASE})
    torch_ = ErrorMapStore(tmp_path / "torch", ema_window=3).create({"c": CASE})
    torch_.use_numba = False
    cc = make_case_coordinates(CASE)
    for step, zoom in enumerate([1.4, 0.7, 1.25, 0.85, 1.4, 0.7]):
        x0, y0, z0 = rng.integers(0, 17), rng.integers(0, 21), rng.integers(0, 13)
        c = torch.from_numpy(np.ascontiguousarray(cc[:, x0:x0 + 24, y0:y0 + 24, z0:z0 + 24]))
        c = Zoom(zoom=[zoom, zoom * 0.9 if step % 2 else zoom, zoom], mode="nearest-exact" if step % 2 else "nearest",
                 padding_mode="constant", keep_size=True)(c)
        c = Flip(spatial_axis=[a for a in range(3) if rng.random() < 0.5] or None)(c) if step % 3 else c
        c = np.ascontiguousarray(torch.as_tensor(c).numpy())
        assert kernel._analyse("c", c)[0] == "separable" and torch_._analyse("c", c)[0] == "general"
        assert (c == 0).any() == (zoom < 1)
        f = torch.from_numpy(rng.random(PATCH).astype(np.float32))
        v = torch.from_numpy(rng.random(PATCH).astype(np.float32))
        if step % 2:
            got = kernel.update_and_gather("c", torch.from_numpy(c), f[None], v[None])
            want = torch_.update_and_gather("c", torch.from_numpy(c), f[None], v[None])
        else:
            assert kernel.scatter("c", c, f, v) == torch_.scatter("c", c, f, v)
            got, want = kernel.gather("c", c), torch_.gather("c", c)
        for a, b in zip(got, want):
            assert torch.equal(a, b), step
    full_k, full_t = kernel.full("c"), torch_.full("c")
    assert full_k["count"].max() >= 4
    for kind in ("error", "variance", "count"):
        np.testing.assert_array_equal(full_k[kind], full_t[kind])


def test_device_store_with_huge_duplicate_groups(tmp_path):
    """A degenerate zoom (hundreds of patch voxels on one case voxel) takes the host summation: same bits."""
    ref, dev = _device_stores(tmp_path, "resident")
    c = np.zeros((3,) + PATCH, np.float32)
    c[:, :, :, :12] = np.array([3, 4, 5], np.float32).reshape(3, 1, 1, 1)  # 24*24*12 voxels on one case voxel
    c[:, :, :, 12:] = np.array([7, 8, 9], np.float32).reshape(3, 1, 1, 1)
    rng = np.random.default_rng(3)
    for _ in range(2):
        f = torch.from_numpy(rng.random(PATCH).astype(np.float32))
        v = torch.from_numpy(rng.random(PATCH).astype(np.float32))
        want = ref.update_and_gather("c", c, f[None], v[None])
        got = dev.update_and_gather("c", torch.from_numpy(c), f[None], v[None])
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    np.testing.assert_array_equal(dev.full("c")["error"], ref.full("c")["error"])


@pytest.mark.parametrize("numba", [True, False])
def test_int16_coordinates_give_the_same_bits(tmp_path, numba):
    """The training batches carry the coordinates as int16 (half the bytes to move and to check); every path
    (slices, separable, general) gives exactly what float32 coordinates give."""
    from custom.uncertainty.store_kernels import HAVE_NUMBA

    if numba and not HAVE_NUMBA:
        pytest.skip("numba not importable")
    a = ErrorMapStore(tmp_path / "f32", ema_window=3).create({"c": CASE})
    b = ErrorMapStore(tmp_path / "i16", ema_window=3).create({"c": CASE})
    a.use_numba = b.use_numba = numba
    rng = np.random.default_rng(9)
    patches = list(_mixed_patches(rng, 6)) + [
        np.ascontiguousarray(np.repeat(make_case_coordinates(CASE)[:, 3:15, 2:26, 4:28], 2, axis=1))]
    paths = set()
    for c in patches:
        c16 = torch.from_numpy(c.astype(np.int16))
        assert c16.dtype == torch.int16
        paths.add(b._analyse("c", c16)[0])
        assert a._analyse("c", c)[0] == b._analyse("c", c16)[0]
        f = torch.from_numpy(rng.random(c.shape[1:]).astype(np.float32))[None]
        for x, y in zip(a.update_and_gather("c", torch.from_numpy(c), f, f), b.update_and_gather("c", c16, f, f)):
            assert torch.equal(x, y)
        for x, y in zip(a.gather("c", c), b.gather("c", c16)):
            assert torch.equal(x, y)
    assert paths == ({"slices", "general", "separable"} if numba else {"slices", "general"})
    with pytest.raises(ValueError, match="outside case"):
        b.gather("c", torch.full((3, 4, 4, 4), 300, dtype=torch.int16))
    for kind in ("error", "variance", "count"):
        np.testing.assert_array_equal(a.full("c")[kind], b.full("c")[kind])


@pytest.mark.skipif(not pytest.importorskip("custom.uncertainty.store_kernels").HAVE_NUMBA, reason="numba not importable")
def test_int16_box_check_finds_every_wrong_voxel():
    """The word-wise int16 box check (four voxels per operation) rejects a single wrong value anywhere: in each
    channel, inside the box, in the padding, at row ends; and accepts the exact crop, mirrored or not."""
    from custom.uncertainty.store import ErrorMapStore as S

    rng = np.random.default_rng(5)
    s = S.__new__(S)
    s.use_numba = True
    cc = make_case_coordinates(CASE)
    for flips in ((False, False, False), (True, False, True), (False, True, True)):
        c = cc[:, 5:25, 3:23, 4:24]
        for axis, f in enumerate(flips):
            if f:
                c = np.flip(c, axis + 1)
        c = np.ascontiguousarray(np.pad(c, [(0, 0), (1, 3), (2, 2), (4, 4)])).astype(np.int16)  # 28 deep: 7 words
        assert c.shape[3] % 4 == 0
        assert s._fast_slices(c, CASE) is not None
        for _ in range(40):
            bad = c.copy()
            pos = (int(rng.integers(0, 3)),) + tuple(int(rng.integers(0, n)) for n in c.shape[1:])
            bad[pos] += int(rng.choice([-1, 1, 7]))
            assert s._fast_slices(bad, CASE) is None, pos
