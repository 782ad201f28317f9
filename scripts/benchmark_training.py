"""Training throughput of the tiny and the real-size (nnU-Net BraTS plan) configs, side by side in one run.

Measures, for each config, iterations per second, the DataLoader wait per batch against the compute time per
batch (forward + error-map store + loss + backward + step), the error-map store's share of that step (time
the training thread spends in store calls / step time), the synchronous data-pipeline cost per batch (what
the loader workers must sustain), and peak memory. ``--store_devices cpu,cuda`` repeats the real-size
measurement for each ``store_device``. Each measurement runs in its own process so peak memory is its own.
Writes ONE JSON object to --out and prints a one-line summary and the one-command GPU check.

    .venv/bin/python scripts/benchmark_training.py --out benchmark_training.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

from custom.core.atomic import atomic_write_json
from custom.core.layout import CONFIG_DIR, REPO_ROOT
from custom.workflows.prepare import prepare_synthetic
from custom.workflows.training_benchmark import measure_training
GPU_CHECK = (".venv/bin/python scripts/benchmark_training.py --out benchmark_training_gpu.json --device cuda "
             "--real_iterations 20 --tiny_iterations 50 --num_workers 8 --store_devices cpu,cuda")


def _prepare(work: Path, num_cases: int, shape, patch_size, filters, seed: int = 0) -> Path:
    return prepare_synthetic(work, num_cases, shape, patch_size=patch_size, filters=filters, seed=seed).path


def measure(work_dir: str, json_out: str, iterations: int = 4, warmup: int = 1, num_workers: int = 0,
            device: str | None = None, batch_size: int | None = None, tiny: bool = True,
            store_device: str | None = None):
    """(internal) one measurement in this process; writes its JSON to JSON_OUT."""
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    files = [CONFIG_DIR / "train.json"] + ([CONFIG_DIR / "tiny.json"] if tiny else [])
    out_dir = Path(tempfile.mkdtemp(prefix="bench_run_"))
    overrides = {"work_dir": str(work_dir), "output_dir": str(out_dir), "num_workers": int(num_workers)}
    if device:
        overrides["device"] = f"$torch.device('{device}')"
        overrides["amp"] = device.startswith("cuda")
    if batch_size:
        overrides["batch_size"] = int(batch_size)
    if store_device:
        overrides["store_device"] = str(store_device)
    try:
        atomic_write_json(json_out, measure_training(files, overrides, iterations=int(iterations), warmup=int(warmup)))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # the measured run's folder (store, checkpoints) is not kept


def _run_measure(work: Path, **kw) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "measure", "--work_dir", str(work), "--json_out", str(out)]
        for k, v in kw.items():
            if v is not None:
                cmd += [f"--{k}", str(v)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"measurement failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(out: str = "benchmark_training.json", work_dir: str | None = None, real_work_dir: str | None = None,
         tiny_iterations: int = 8, real_iterations: int = 1, num_workers: int = 2, device: str | None = None,
         real_batch_size: int | None = None, skip_real: bool = False, store_devices: str = ""):
    """Benchmark the tiny and the real-size training configs; write ONE JSON object to OUT.

    Args:
        out: JSON output path.
        work_dir: prepared tiny work dir (default: 6 synthetic 64^2x48 cases, patch 32, filters [8,16,32,64]).
        real_work_dir: prepared real-size work dir (default: 2 synthetic 240x240x155 cases, nnU-Net plan with
            patch 128^3, filters 32..320, 6 stages).
        tiny_iterations, real_iterations: timed iterations (after one warm-up).
        num_workers: DataLoader workers of the tiny run with workers (the other tiny run uses 0).
        device: "cpu" or "cuda" (default: the configs' choice).
        real_batch_size: override the plan's batch size (2) for the real-size config; on a CPU a batch of 2 at
            128^3 needs about 12 GB, so memory-limited machines measure batch 1.
        skip_real: only the tiny config.
        store_devices: comma-separated ``store_device`` values to measure the real-size config with, one run
            each (default: the config's, ``cpu``); e.g. ``cpu,cuda`` on a GPU machine.
    """
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_training_"))
    try:
        return _main(out, root, work_dir, real_work_dir, tiny_iterations, real_iterations, num_workers, device,
                     real_batch_size, skip_real, store_devices, start)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the synthetic work directories made for this run


def _main(out, root, work_dir, real_work_dir, tiny_iterations, real_iterations, num_workers, device, real_batch_size,
          skip_real, store_devices, start):
    tiny_work = Path(work_dir) if work_dir else _prepare(root / "tiny", 6, (64, 64, 48), [32, 32, 32], [8, 16, 32, 64])
    result: dict = {"device": device or "config default", "gpu_check_command": GPU_CHECK}
    # 3 warm-up iterations: the store's compiled kernels load on their first call of each kind of patch
    tiny0 = _run_measure(tiny_work, iterations=tiny_iterations, warmup=3, num_workers=0, device=device)
    tinyw = _run_measure(tiny_work, iterations=tiny_iterations, warmup=3, num_workers=num_workers, device=device)
    result.update({
        "tiny_iterations_per_s": tiny0["iterations_per_s"],
        "tiny_iterations_per_s_workers": tinyw["iterations_per_s"],
        "tiny_num_workers": tinyw["num_workers"],
        "tiny_data_ms_per_batch": tiny0["data_ms_per_batch_sync"],
        "tiny_data_wait_ms_per_batch_workers": tinyw["data_wait_ms_per_batch"],
        "tiny_compute_ms_per_batch": tiny0["compute_ms_per_batch"],
        "tiny_store_ms_per_batch": tiny0["store_ms_per_batch"],
        "tiny_store_share_ratio": tiny0["store_share_ratio"],
        "tiny_peak_rss_mb": max(tiny0["peak_rss_mb"], tinyw["peak_rss_mb"]),
        "tiny_loader_to_compute_ratio": tiny0["data_ms_per_batch_sync"] / tiny0["compute_ms_per_batch"],
        "tiny": {"workers_0": tiny0, "with_workers": tinyw},
    })
    if not skip_real:
        real_work = Path(real_work_dir) if real_work_dir else _prepare(root / "real", 2, (240, 240, 155),
                                                                       [128, 128, 128], None)
        # no warm-up iteration on CPU: one real-size iteration takes minutes there ("one iteration is enough")
        import torch

        on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
        runs = {}
        for store_device in [d.strip() for d in str(store_devices).split(",") if d.strip()] or [None]:
            runs[store_device] = _run_measure(real_work, iterations=real_iterations, warmup=0 if on_cpu else 1,
                                              num_workers=0, device=device, batch_size=real_batch_size, tiny=False,
                                              store_device=store_device)
        real = next(iter(runs.values()))
        for store_device, run in list(runs.items())[1:]:
            result.update({f"real_store_{store_device}_store_ms_per_batch": run["store_ms_per_batch"],
                           f"real_store_{store_device}_store_share_ratio": run["store_share_ratio"],
                           f"real_store_{store_device}_compute_ms_per_batch": run["compute_ms_per_batch"],
                           f"real_store_{store_device}": run})
        result.update({
            "real_iterations_per_s": real["iterations_per_s"],
            "real_data_ms_per_batch": real["data_ms_per_batch_sync"],
            "real_compute_ms_per_batch": real["compute_ms_per_batch"],
            "real_store_ms_per_batch": real["store_ms_per_batch"],
            "real_store_share_ratio": real["store_share_ratio"],
            "real_store_device": next(iter(runs)) or "cpu",
            "real_peak_rss_mb": real["peak_rss_mb"],
            "real_cuda_peak_mb": real["cuda_peak_mb"],
            "real_loader_to_compute_ratio": real["data_ms_per_batch_sync"] / real["compute_ms_per_batch"],
            # workers needed so that loading one batch never takes longer than computing one
            "real_min_workers_for_compute_bound": int(-(-real["data_ms_per_batch_sync"] // real["compute_ms_per_batch"])),
            "real": real,
        })
    result["total_s"] = time.perf_counter() - start
    atomic_write_json(out, result)
    line = (f"benchmark_training: tiny {result['tiny_iterations_per_s']:.2f} it/s (data {result['tiny_data_ms_per_batch']:.0f} ms"
            f" vs compute {result['tiny_compute_ms_per_batch']:.0f} ms per batch, store "
            f"{100 * result['tiny_store_share_ratio']:.1f}% of it)")
    if not skip_real:
        line += (f"; real-size {result['real_iterations_per_s']:.3f} it/s (data {result['real_data_ms_per_batch']:.0f} ms"
                 f" vs compute {result['real_compute_ms_per_batch']:.0f} ms per batch, store "
                 f"{result['real_store_ms_per_batch']:.0f} ms = {100 * result['real_store_share_ratio']:.1f}% of it on "
                 f"{result['real_store_device']}, peak {result['real_peak_rss_mb']:.0f} MB)")
        for key in result:
            if key.startswith("real_store_") and key.endswith("_store_share_ratio") and key != "real_store_share_ratio":
                name = key[len("real_store_"):-len("_store_share_ratio")]
                line += f"; store_device {name}: {100 * result[key]:.1f}% of the step"
    print(line + f" -> {out}")
    print(f"GPU check (when a GPU machine is lent): {GPU_CHECK}")


if __name__ == "__main__":
    fire.Fire({"main": main, "measure": measure}) if len(sys.argv) > 1 and sys.argv[1] in ("main", "measure") \
        else fire.Fire(main)
