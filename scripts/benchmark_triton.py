"""Throughput and latency through Triton, eager vs exported patch model, against in-process inference, one run.

    .venv/bin/python scripts/benchmark_triton.py --checkpoint CKPT --input_dir CASES --out triton_bench.json \
        [--variants "[eager,torchscript]"] [--concurrency "[1,2,4,8]"] [--requests_per_level 12] [--rounds 3] \
        [--protocol grpc] [--threads 1] [--volume_instances 4]

Same cases, same checkpoint, same machine, side by side:

- ``in_process``: ``UncertaintySegmenter.from_checkpoint(CKPT).predict`` one case after another
  (the bundle's inference path, eager PyTorch), ``torch.set_num_threads(threads)``.
- one real ``tritonserver`` per variant, all running at once, each on its own temporary repository filled by
  ``prepare_model_repository`` from the same checkpoint: ``eager`` (the python patch model rebuilding the network
  from this repository's code), ``torchscript`` / ``onnxruntime`` (the python patch model running the file
  ``export_model`` wrote), ``pytorch_libtorch`` / ``onnxruntime_onnx`` (Triton's native backends on the same
  files: NVIDIA's container only). ``OMP_NUM_THREADS=threads`` per model instance. For each concurrency c, c
  client threads each send volumes back to back until the level's requests are done.

The measurements alternate in rounds (in-process, then every variant at every level, ``--rounds`` times) so
that a load change on a shared machine does not favour one side; throughput = requests / wall time summed over
rounds. Writes one JSON object to ``--out`` (throughput in cases per second, latencies in ms, ratios) and prints
a one-line summary and the command to repeat it on a GPU. perf_analyzer's wheels need glibc 2.38, so this is the
project's own load generator.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import fire
import numpy as np

#: variant -> (Triton backend, python runtime)
VARIANTS = {
    "eager": ("python", "eager"),
    "torchscript": ("python", "torchscript"),
    "onnxruntime": ("python", "onnxruntime"),
    "pytorch_libtorch": ("pytorch_libtorch", ""),
    "onnxruntime_onnx": ("onnxruntime", ""),
}


def _latency_stats(latencies_s) -> dict:
    ms = sorted(1000.0 * x for x in latencies_s)
    return {
        "latency_mean_ms": round(statistics.fmean(ms), 2),
        "latency_p50_ms": round(float(np.percentile(ms, 50)), 2),
        "latency_p95_ms": round(float(np.percentile(ms, 95)), 2),
        "latency_max_ms": round(ms[-1], 2),
    }


def _load_cases(input_dir, num_cases: int):
    from custom.data.cases import find_case_files, list_case_folders
    from custom.data.nifti import load_case

    cases = []
    for case_dir in list_case_folders(input_dir)[:num_cases]:
        case = find_case_files(case_dir)
        image, _, spacing, _ = load_case(case)
        cases.append((case["case_id"], image, np.asarray(spacing, np.float32)))
    if not cases:
        raise SystemExit(f"[benchmark_triton] no cases in {input_dir}")
    return cases


def bench_in_process(segmenter, cases, requests: int) -> dict:
    """Cases one after another through ``segmenter.predict``: ``{"wall_s", "latencies_s", "errors"}``."""
    latencies = []
    t0 = time.perf_counter()
    for i in range(requests):
        _, image, spacing = cases[i % len(cases)]
        t = time.perf_counter()
        segmenter.predict(image, spacing)
        latencies.append(time.perf_counter() - t)
    return {"wall_s": time.perf_counter() - t0, "latencies_s": latencies, "errors": []}


def _summarise(runs: list[dict], **extra) -> dict:
    """Totals over rounds: throughput = requests done / wall time spent on them."""
    latencies = [x for r in runs for x in r["latencies_s"]]
    errors = [e for r in runs for e in r["errors"]]
    wall = sum(r["wall_s"] for r in runs)
    out = {**extra, "requests": len(latencies) + len(errors), "errors": len(errors), "wall_s": round(wall, 3),
           "throughput_cases_per_s": round(len(latencies) / wall, 4) if wall > 0 else 0.0}
    if latencies:
        out.update(_latency_stats(latencies))
    if errors:
        out["first_error"] = errors[0]
    return out


def bench_triton_level(url, protocol, cases, concurrency: int, requests: int, timeout_s: float) -> dict:
    from custom.deploy.triton_client import VolumeClient

    counter = iter(range(requests))
    lock = threading.Lock()
    latencies, errors = [], []

    def worker():
        with VolumeClient(url, protocol, timeout_s=timeout_s) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                case_id, image, spacing = cases[i % len(cases)]
                t = time.perf_counter()
                try:
                    client.infer(image, spacing, request_id=f"{case_id}-{i}")
                except Exception as err:  # recorded, reported in the JSON: a benchmark must not hide failures
                    with lock:
                        errors.append(f"{case_id}: {err}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"wall_s": time.perf_counter() - t0, "latencies_s": latencies, "errors": errors}


def _patch_batching(server) -> dict:
    """Patch-model counters: BLS requests, patches and executions (fewer executions than requests = merged)."""
    import tritonclient.grpc as tg

    from custom.deploy.triton_repository import PATCH_MODEL

    client = tg.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(PATCH_MODEL, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return {"requests": int(stats["inference_stats"]["success"].get("count", 0)),
            "inference_count": int(stats.get("inference_count", 0)),
            "execution_count": int(stats.get("execution_count", 0))}


def main(checkpoint: str, input_dir: str, out: str, variants=("eager", "torchscript"), concurrency=(1, 2, 4, 8),
         requests_per_level: int = 12, num_cases: int = 4, protocol: str = "grpc", threads: int = 1,
         timeout_s: float = 600.0, rounds: int = 3, volume_instances: int = 4, work_dir: str | None = None) -> None:
    """Run the benchmark; see the module docstring.

    Args:
        checkpoint: training checkpoint (plans.json beside it, else ``work_dir``).
        input_dir: BraTS case folders to send.
        out: JSON output path.
        variants: patch-model variants served side by side (keys of ``VARIANTS``).
        concurrency: concurrency levels (clients in flight).
        requests_per_level: requests per level over all rounds (per round at least the concurrency), and
            in-process cases timed.
        num_cases: distinct cases used (cycled).
        protocol: grpc or http.
        threads: torch/OpenMP threads for the in-process run and per Triton model instance.
        timeout_s: per-request timeout.
        rounds: the measurements are split into this many rounds, each running in-process then every variant
            at every level.
        volume_instances: volume-model instances per server (volumes in flight).
        work_dir: where plans.json is when it is not beside the checkpoint.
    """
    import torch

    from custom.core.atomic import atomic_write_json
    from custom.deploy.export import export_model
    from custom.deploy.triton_repository import prepare_model_repository
    from custom.deploy.triton_server import TritonServer, free_port
    from custom.inference.segmenter import UncertaintySegmenter
    from custom.model.checkpoints import resolve_plans_path

    levels = [int(c) for c in (concurrency if isinstance(concurrency, (list, tuple)) else [concurrency])]
    names = [str(v) for v in (variants if isinstance(variants, (list, tuple)) else [variants])]
    if not levels or min(levels) < 1:
        raise SystemExit(f"[benchmark_triton] concurrency levels must be >= 1, got {concurrency}")
    if not names or any(v not in VARIANTS for v in names):
        raise SystemExit(f"[benchmark_triton] variants must be among {sorted(VARIANTS)}, got {variants}")
    if protocol not in ("grpc", "http"):
        raise SystemExit(f"[benchmark_triton] protocol must be grpc or http, got {protocol!r}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(int(threads))
    cases = _load_cases(input_dir, num_cases)
    shape = list(cases[0][1].shape)
    plans_path = resolve_plans_path(checkpoint, work_dir)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    segmenter = UncertaintySegmenter.from_checkpoint(checkpoint, plans=plans_path, device=device)
    segmenter.predict(cases[0][1], cases[0][2])  # warm-up: allocator, lazy imports
    per_round = max(1, -(-int(requests_per_level) // int(rounds)))
    in_process_runs = []
    triton_runs = {v: {c: [] for c in levels} for v in names}
    counters = {v: {c: {"requests": 0, "inference_count": 0, "execution_count": 0} for c in levels} for v in names}
    with tempfile.TemporaryDirectory(prefix="brats-triton-bench-") as tmp, contextlib.ExitStack() as stack:
        exported = export_model(checkpoint, work_dir=work_dir, out_dir=Path(tmp) / "exported", triton_repo=None,
                                verify=False)
        servers = {}
        for v in names:
            backend, runtime = VARIANTS[v]
            repo = prepare_model_repository(
                checkpoint, plans_path=plans_path, repo_dir=Path(tmp) / v, torchscript=exported["torchscript"],
                onnx=exported["onnx"], backend=backend, runtime=runtime or "torchscript",
                volume_instances=volume_instances)
            server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                                  log_stream=None, threads=threads, startup_timeout_s=600)
            servers[v] = stack.enter_context(server)
        volume_config = (Path(tmp) / names[0] / "brats_unc_volume" / "config.pbtxt").read_text()
        urls = {v: (s.grpc_url if protocol == "grpc" else s.http_url) for v, s in servers.items()}
        for v in names:
            bench_triton_level(urls[v], protocol, cases, 1, 1, timeout_s)  # warm-up
        # rounds alternate in-process and every Triton level of every variant, so that a change of load on a
        # shared machine during the run spreads over all of them instead of favouring one
        for _ in range(int(rounds)):
            in_process_runs.append(bench_in_process(segmenter, cases, per_round))
            for v in names:
                for c in levels:
                    before = _patch_batching(servers[v])
                    triton_runs[v][c].append(
                        bench_triton_level(urls[v], protocol, cases, c, max(per_round, c), timeout_s))
                    after = _patch_batching(servers[v])
                    for k in counters[v][c]:
                        counters[v][c][k] += after[k] - before[k]
    in_process = _summarise(in_process_runs, sw_batch_size=segmenter.inferer.sw_batch_size)
    reference = in_process["throughput_cases_per_s"]
    triton, c1 = {}, {}
    for v in names:
        triton[v] = []
        for c in levels:
            n = counters[v][c]
            level = _summarise(triton_runs[v][c], concurrency=c)
            level["patches_per_execution"] = round(n["inference_count"] / max(n["execution_count"], 1), 3)
            level["bls_requests_per_execution"] = round(n["requests"] / max(n["execution_count"], 1), 3)
            level["throughput_vs_in_process_ratio"] = round(level["throughput_cases_per_s"] / reference, 3)
            triton[v].append(level)
        c1[v] = next((t["throughput_vs_in_process_ratio"] for t in triton[v] if t["concurrency"] == 1), None)
    if "eager" in triton:  # what serving the exported file instead of the eager network changes, level by level
        for v in names:
            for level, eager in zip(triton[v], triton["eager"]):
                if v != "eager" and eager["throughput_cases_per_s"]:
                    level["throughput_vs_triton_eager_ratio"] = round(
                        level["throughput_cases_per_s"] / eager["throughput_cases_per_s"], 3)
    # "must not fall": allow 5 % measurement noise between neighbouring levels
    non_decreasing = {v: all(b["throughput_cases_per_s"] >= 0.95 * a["throughput_cases_per_s"]
                             for a, b in zip(triton[v], triton[v][1:])) for v in names}
    result = {
        "benchmark": "triton_vs_in_process",
        "checkpoint": str(Path(checkpoint).resolve()),
        "protocol": protocol,
        "num_cases": len(cases),
        "case_shape": shape,
        "threads": threads,
        "device": device,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "in_process": in_process,
        "triton_volume_config": dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)"', volume_config)),
        "triton_volume_instances": int(volume_instances),
        "variants": {v: {"backend": VARIANTS[v][0], "runtime": VARIANTS[v][1]} for v in names},
        "rounds": int(rounds),
        "triton": triton,
        "c1_throughput_vs_in_process_ratio": c1,
        "target_c1_ratio": 0.9,
        "meets_c1_target": {v: bool(r is not None and r >= 0.9) for v, r in c1.items()},
        "throughput_non_decreasing": non_decreasing,
        "gpu_command": gpu_command(),
    }
    atomic_write_json(out, result)
    for v in names:
        levels_txt = " ".join(f"c{t['concurrency']}={t['throughput_cases_per_s']:.3g}/s" for t in triton[v])
        print(f"[benchmark_triton] triton {v} ({protocol}): {levels_txt}; c1 ratio {c1[v]}; "
              f"non-decreasing {non_decreasing[v]}")
    print(f"[benchmark_triton] in-process {reference:.3g} cases/s -> {out}")
    print(f"[benchmark_triton] on a GPU machine: {gpu_command()}")


def gpu_command() -> str:
    """The one command that repeats this benchmark on a GPU machine (NVIDIA's Triton container, whose
    tritonserver from PATH has the pytorch_libtorch and onnxruntime backends as well)."""
    return ("docker run --rm --gpus all --shm-size=8g -v $PWD:/workspace -w /workspace "
            "nvcr.io/nvidia/tritonserver:24.10-py3 bash -c \"pip install -r requirements.txt && "
            "pip install --no-deps -e . && python3 scripts/benchmark_triton.py --checkpoint CKPT --input_dir CASES "
            "--out triton_bench_gpu.json --threads 4 --variants '[eager,torchscript,pytorch_libtorch]'\"")


if __name__ == "__main__":
    fire.Fire(main)
