"""The cost of uncertainty, measured side by side in one process on the same cases.

    .venv/bin/python scripts/benchmark_inference.py --out bench_inference.json [--cases DIR] [--num_cases 3]
        [--shape "[64,64,48]"] [--patch_size "[32,32,32]"] [--filters "[8,16,32,64]"] [--repeats 2]
        [--mc_samples 10] [--device cpu] [--threads 1] [--real_size false]

Methods, all through the shared inference path (custom.inference.segmenter.UncertaintySegmenter.predict):
  (a) seg_only : 3-output network (segmentation only), 1 pass
  (b) unc_head : 4-output network (segmentation + unc_output, ours), 1 pass
  (c) tta      : (b) with mirroring TTA, 8 passes
  (d) mc_dropout: 4-output network with dropout kept on at inference, N passes averaged
Untrained networks of identical topology (timing does not depend on the weights). Each case is run by every
method in turn (interleaved, repeated), and the median seconds per case is reported, with network forward
passes per case counted by a forward hook. Ratios b/a (target <= 1.02), c/b, d/b from best-of-repeats wall time and from process CPU time.

--real_size true adds one 240x240x155 case with the nnU-Net BraTS plan (128^3 patch, 6 stages) for (a) and (b)
(minutes on CPU). The summary line prints the command to repeat everything on a GPU.
"""

import os
import tempfile
import time

import fire
import numpy as np

GPU_COMMAND = (".venv/bin/python scripts/benchmark_inference.py --device cuda --threads 8 --real_size true "
               "--real_size_methods all --out bench_inference_gpu.json")


def _plan(shape, spacing, patch_size=None, filters=None):
    from custom.planning.planner import ExperimentPlanner
    from custom.planning.plans import Plans

    fingerprint = {"spacings": [list(spacing)] * 4, "shapes_after_crop": [list(shape)] * 4}
    return Plans(ExperimentPlanner().plan(fingerprint, patch_size=patch_size, filters=filters))


class _ForwardCounter:
    """Counts network forward calls and patches (batch items) through a forward hook."""

    def __init__(self, network):
        self.calls = 0
        self.patches = 0
        network.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
        self.patches += int(args[0].shape[0])

    def reset(self):
        self.calls = self.patches = 0


def _methods(plans, device, sw_batch_size, mc_samples, seed=0):
    """name -> (segmenter, patch_fn or None, counter, passes per volume)."""
    import torch

    from custom.inference.segmenter import UncertaintySegmenter
    from custom.model.networks import build_network
    from custom.uncertainty.baselines import mc_dropout_patch_fn

    out = {}
    for name, with_unc, tta, dropout in (("seg_only", False, False, None), ("unc_head", True, False, None),
                                         ("tta", True, True, None), ("mc_dropout", True, False, 0.1)):
        torch.manual_seed(seed)
        net = build_network(plans, with_uncertainty=with_unc, dropout=dropout)
        counter = _ForwardCounter(net)
        seg = UncertaintySegmenter(net, plans, device=device, with_uncertainty=with_unc,
                                   sw_batch_size=sw_batch_size, tta=tta)
        patch_fn = mc_dropout_patch_fn(seg.network, mc_samples) if dropout else None
        passes = 8 if tta else (mc_samples if dropout else 1)
        out[name] = (seg, patch_fn, counter, passes)
    return out


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _measure(methods, cases, repeats, device, names=None, warmup=True):
    """Interleaved timing: for each repeat, each case, each method. Returns per-method results."""
    import torch

    names = names or list(methods)
    times = {n: [] for n in names}
    cpu_times = {n: [] for n in names}
    net_times = {n: [] for n in names}
    calls = {n: [] for n in names}
    patches = {n: [] for n in names}
    # warm-up (allocator, thread pools, lazy imports) on the first case, not timed
    for n in (names if warmup else []):
        seg, fn, counter, _ = methods[n]
        with torch.no_grad():
            seg.predict(cases[0][0], cases[0][1], patch_fn=fn)
    for _ in range(int(repeats)):
        for image, spacing in cases:
            for n in names:
                seg, fn, counter, _ = methods[n]
                counter.reset()
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    pred = seg.predict(image, spacing, patch_fn=fn)
                _sync(device)
                times[n].append(time.perf_counter() - t0)
                cpu_times[n].append(time.process_time() - c0)
                net_times[n].append(pred.info["network_s"])
                calls[n].append(counter.calls)
                patches[n].append(counter.patches)
    res = {}
    for n in names:
        res[n] = {"seconds_per_case_s": float(np.median(times[n])),
                  "min_seconds_per_case_s": float(np.min(times[n])),
                  "cpu_seconds_per_case_s": float(np.median(cpu_times[n])),
                  "network_seconds_per_case_s": float(np.median(net_times[n])),
                  "forward_passes_per_volume": methods[n][3],
                  "network_calls_per_case": float(np.mean(calls[n])),
                  "patch_forwards_per_case": float(np.mean(patches[n])),
                  "samples": len(times[n])}
    return res


def _ratios(res):
    """b/a, c/b, d/b from the best-of-repeats wall time (contention on a shared machine only adds time), from the
    median process CPU time (what the computation itself costs; meaningful with --threads 1 on CPU), and from
    the network part of the median wall time."""
    out = {}
    for key, num, den in (("b_over_a", "unc_head", "seg_only"), ("c_over_b", "tta", "unc_head"),
                          ("d_over_b", "mc_dropout", "unc_head")):
        if num in res and den in res:
            out[f"{key}_ratio"] = res[num]["min_seconds_per_case_s"] / res[den]["min_seconds_per_case_s"]
            out[f"{key}_cpu_ratio"] = res[num]["cpu_seconds_per_case_s"] / res[den]["cpu_seconds_per_case_s"]
            out[f"{key}_network_ratio"] = (res[num]["network_seconds_per_case_s"]
                                           / res[den]["network_seconds_per_case_s"])
    return out


def _load_cases(cases_dir, limit):
    from custom.data.cases import find_case_files, list_case_folders
    from custom.data.nifti import load_case_arrays

    cases = []
    for d in list_case_folders(cases_dir)[:limit]:
        c = find_case_files(d)
        image, _, _, spacing = load_case_arrays(c["image"])
        cases.append((image, tuple(float(s) for s in spacing)))
    return cases


def main(out: str, cases: str = None, num_cases: int = 3, shape=(64, 64, 48), patch_size=(32, 32, 32),
         filters=(8, 16, 32, 64), repeats: int = 2, mc_samples: int = 10, sw_batch_size: int = 2,
         device: str = "cpu", threads: int = 1, real_size=False, real_size_methods: str = "ab",
         seed: int = 0) -> None:
    """Benchmark; writes ONE JSON object to OUT and prints a one-line summary."""
    import torch

    from custom.core.atomic import atomic_write_json
    from custom.core.cli import as_bool
    from custom.data.synthetic import write_dataset

    torch.set_num_threads(int(threads))
    real_size = as_bool(real_size, "real_size")
    shape = [int(s) for s in shape]
    with tempfile.TemporaryDirectory(prefix="bench_inf_") as tmp:
        if cases is None:
            write_dataset(tmp, num_cases=int(num_cases), shape=shape, spacing=(1.0, 1.0, 1.0), seed=seed)
            cases = tmp
        case_arrays = _load_cases(cases, int(num_cases))
    plans = _plan([int(s * 0.75) for s in case_arrays[0][0].shape[1:]], case_arrays[0][1],
                  patch_size=list(patch_size), filters=list(filters))
    methods = _methods(plans, device, sw_batch_size, int(mc_samples), seed)
    tiny = _measure(methods, case_arrays, repeats, device)
    result = {"device": device, "torch_threads": int(threads), "torch_version": torch.__version__,
              "tiny": {"num_cases": len(case_arrays), "case_shape": list(case_arrays[0][0].shape[1:]),
                       "patch_size": list(plans.patch_size), "filters": list(plans.filters),
                       "repeats": int(repeats), "mc_samples": int(mc_samples), "methods": tiny,
                       **_ratios(tiny)},
              "b_over_a_target_ratio": 1.02, "gpu_command": GPU_COMMAND}
    if real_size:
        from custom.data.synthetic import make_case

        image, _ = make_case(np.random.default_rng(seed), (240, 240, 155), (1.0, 1.0, 1.0))
        real_plans = _plan((140, 170, 140), (1.0, 1.0, 1.0))
        names = ["seg_only", "unc_head"] if real_size_methods == "ab" else None
        real_methods = _methods(real_plans, device, sw_batch_size, int(mc_samples), seed)
        t0 = time.perf_counter()
        # no warm-up at real size: one pass is minutes on CPU, start-up costs are negligible beside it
        real = _measure(real_methods, [(image, (1.0, 1.0, 1.0))], 1, device, names, warmup=device != "cpu")
        result["real_size"] = {"case_shape": [240, 240, 155], "patch_size": list(real_plans.patch_size),
                               "filters": list(real_plans.filters), "methods": real, **_ratios(real),
                               "wall_s": time.perf_counter() - t0}
    atomic_write_json(out, result)
    t = result["tiny"]
    line = (f"benchmark_inference ({device}, {threads} threads): best s/case "
            f"a={tiny['seg_only']['min_seconds_per_case_s']:.3f} b={tiny['unc_head']['min_seconds_per_case_s']:.3f} "
            f"c={tiny['tta']['min_seconds_per_case_s']:.3f} d={tiny['mc_dropout']['min_seconds_per_case_s']:.3f}; "
            f"b/a={t['b_over_a_ratio']:.3f} (cpu {t['b_over_a_cpu_ratio']:.3f}; target <= 1.02) "
            f"c/b={t['c_over_b_ratio']:.2f} d/b={t['d_over_b_ratio']:.2f}")
    if real_size:
        r = result["real_size"]
        line += (f"; real size 240x240x155 b/a={r['b_over_a_ratio']:.3f} (cpu {r['b_over_a_cpu_ratio']:.3f}; "
                 f"a={r['methods']['seg_only']['seconds_per_case_s']:.1f}s, "
                 f"b={r['methods']['unc_head']['seconds_per_case_s']:.1f}s)")
    print(line + f" -> {out}\nGPU: {GPU_COMMAND}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    fire.Fire(main)
