"""Fault hardening (issue 15.7, 15.11-13): non-finite weights, NIfTI headers that declare more than the file holds,
files left by a killed run, and named errors from the bundle commands.

Real files and real commands: checkpoints of the tiny plan, NIfTI files written by nibabel (or crafted byte by
byte), ``python -m monai.bundle run`` and ``scripts/evaluate.py`` in subprocesses, a writer killed with SIGKILL.
The server-side refusals of a NaN model are in tests/test_triton.py and tests/test_monailabel.py.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO_ROOT, run_cmd

from custom.core.atomic import atomic_torch_save
from custom.core.errors import BraTSInputError, CheckpointError
from custom.core.layout import prediction_paths, temporary_path
from custom.model.networks import build_network


# ----------------------------------------------------------------------------------------------- helpers
def _checkpoint(folder: Path, plans_path: Path, poison: str | None = None, value=float("nan")) -> Path:
    """model.pt (+ plans.json) of a seeded tiny network; ``poison``: a state-dict key whose first value is set to
    ``value`` (one bit-flip-like bad number in one tensor)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = build_network(plans_path, with_uncertainty=True).state_dict()
    if poison is not None:
        state[poison] = state[poison].clone()
        state[poison].view(-1)[0] = value
    atomic_torch_save({"model": state}, folder / "model.pt")
    shutil.copyfile(plans_path, folder / "plans.json")
    return folder / "model.pt"


def _some_weight_key(plans_path: Path) -> str:
    """A weight in the middle of the network (not the first tensor: the message must name the right one)."""
    keys = [k for k, v in build_network(plans_path, with_uncertainty=True).state_dict().items()
            if v.is_floating_point() and k.endswith("conv.weight")]
    return keys[len(keys) // 2]


def _bundle_inference(checkpoint, input_dir, output_dir, timeout=600):
    return run_cmd([PYTHON, "-m", "monai.bundle", "run", "--bundle_root", "bundle",
                    "--config_file", "bundle/configs/inference.json", "--dataset_dir", input_dir,
                    "--output_dir", output_dir, "--checkpoint", checkpoint, "--progress", "false"],
                   check=False, timeout=timeout)


def _assert_named_error_alone(proc, *fragments):
    """Exit status 2, each fragment in stderr, and no traceback or MONAI wrapper around it."""
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in stderr:\n{proc.stderr[-3000:]}"
    for noise in ("Traceback", "Failed to evaluate", "RuntimeError"):
        assert noise not in proc.stderr, f"{noise!r} in stderr:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def plans_path(prepared_work_dir) -> Path:
    return prepared_work_dir / "plans.json"


@pytest.fixture(scope="module")
def one_case(synthetic_dataset, tmp_path_factory) -> Path:
    """A folder holding one synthetic case folder."""
    root = tmp_path_factory.mktemp("one_case")
    src = sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[0]
    shutil.copytree(src, root / src.name)
    return root


# ------------------------------------------------------------------------------- 15.7 non-finite weights
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_loader_refuses_non_finite_weights_naming_file_and_tensor(tmp_path, plans_path, value):
    from custom.inference.segmenter import UncertaintySegmenter
    from custom.model.checkpoints import load_state_dict, load_weights

    key = _some_weight_key(plans_path)
    bad = _checkpoint(tmp_path / "bad", plans_path, poison=key, value=value)
    good = _checkpoint(tmp_path / "good", plans_path)
    assert load_state_dict(good)  # the same network without the bad value loads
    kind = "1 NaN and 0 inf" if value != value else "0 NaN and 1 inf"
    for load in (lambda: load_state_dict(bad),
                 lambda: load_weights(build_network(plans_path, with_uncertainty=True), bad),
                 lambda: UncertaintySegmenter.from_checkpoint(bad)):
        with pytest.raises(CheckpointError) as err:
            load()
        message = str(err.value)
        assert str(bad) in message and f"tensor '{key}' holds {kind}" in message, message
        assert "1 of" in message  # one tensor affected


def test_loader_checks_the_checksum_training_wrote(tmp_path, plans_path):
    """A bit flip that leaves the file loadable and finite is caught by the ``.sha256`` training writes beside a
    checkpoint; a copy without it (e.g. bundle/models/model.pt) still loads."""
    from custom.model.checkpoints import load_state_dict

    good = _checkpoint(tmp_path / "run", plans_path)
    assert good.with_name("model.pt.sha256").is_file() and load_state_dict(good)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01
    good.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.pt: SHA-256 .* differs from model\.pt\.sha256"):
        load_state_dict(good)
    copy = tmp_path / "copy" / "model.pt"
    copy.parent.mkdir()
    shutil.copyfile(_checkpoint(tmp_path / "run2", plans_path), copy)
    assert load_state_dict(copy)


def _loads_that_may_run_pickled_code(source: str, filename: str) -> list[str]:
    """``torch.load`` calls without ``weights_only=True`` and ``np.load`` calls with ``allow_pickle`` set, as
    ``file:line`` (an unpickler runs whatever code a crafted file names)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        keywords = {k.arg: k.value for k in node.keywords}
        if owner == "torch" and node.func.attr == "load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{filename}:{node.lineno}")
        elif owner in ("np", "numpy") and node.func.attr == "load" and "allow_pickle" in keywords:
            found.append(f"{filename}:{node.lineno}")
    return found


def test_every_torch_load_reads_weights_only():
    """Every ``torch.load`` of the project (package, scripts, Triton models, MONAI Label app) passes
    ``weights_only=True`` and no ``np.load`` allows pickles; the check itself finds a planted unsafe call."""
    planted = "import torch\nimport numpy as np\ntorch.load(p)\ntorch.load(p, weights_only=False)\n" \
              "np.load(p, allow_pickle=True)\ntorch.load(p, map_location='cpu', weights_only=True)\n"
    assert _loads_that_may_run_pickled_code(planted, "planted.py") == ["planted.py:3", "planted.py:4", "planted.py:5"]
    files = [p for top in ("custom", "scripts", "triton_models") for p in sorted((REPO_ROOT / top).rglob("*.py"))]
    assert len(files) > 50 and any(p.name == "checkpoints.py" for p in files)
    unsafe = [hit for p in files for hit in _loads_that_may_run_pickled_code(p.read_text(), str(p.relative_to(REPO_ROOT)))]
    assert unsafe == []
    configs = sorted((REPO_ROOT / "bundle" / "configs").glob("*.json"))
    assert configs and not [c.name for c in configs if "torch.load" in c.read_text()]


def test_bundle_inference_on_a_nan_model_prints_the_named_error_alone(tmp_path, plans_path, one_case):
    """Issue 15.7: a NaN model used to predict "no tumour" everywhere with exit 0. Now the bundle command stops
    before reading any case, with the loader's message alone, and writes nothing."""
    bad = _checkpoint(tmp_path / "nan", plans_path, poison=_some_weight_key(plans_path))
    out = tmp_path / "out"
    proc = _bundle_inference(bad, one_case, out)
    _assert_named_error_alone(proc, "error: cannot load the model", str(bad), "non-finite weights")
    assert not out.exists() or not list(out.glob("*.nii.gz"))


def test_bundle_inference_on_a_bad_case_folder_prints_the_named_error_alone(tmp_path, plans_path, one_case):
    """Issue 15.13: the BraTSInputError message alone (no 'Failed to evaluate ConfigExpression' traceback), exit 2;
    the good case is still written."""
    good = _checkpoint(tmp_path / "ckpt", plans_path)
    cases = tmp_path / "cases"
    shutil.copytree(one_case, cases)
    case = next(p for p in cases.iterdir())
    broken = cases / "BraTS-GLI-90002-000"
    broken.mkdir()
    for f in case.iterdir():
        if "-t1n" not in f.name and "-seg" not in f.name:
            shutil.copyfile(f, broken / f.name.replace(case.name, broken.name))
    out = tmp_path / "out"
    proc = _bundle_inference(good, cases, out)
    _assert_named_error_alone(proc, "1 of 2 cases failed", f"{broken.name}-t1n.nii.gz: missing t1n image")
    assert prediction_paths(out, case.name)[0].exists() and prediction_paths(out, case.name)[1].exists()


def test_training_on_an_unprepared_work_dir_prints_the_named_error_alone(tmp_path):
    """Issue 15.13 / 21: `run training` on an empty work dir: the 'not prepared' message alone, exit 2."""
    proc = run_cmd([PYTHON, "-m", "monai.bundle", "run", "training", "--bundle_root", "bundle",
                    "--config_file", "bundle/configs/train.json", "--work_dir", tmp_path / "empty"],
                   check=False, timeout=600)
    _assert_named_error_alone(proc, "is not prepared for training", "datalist.json: not found",
                              "scripts/prepare_data.py")


def test_an_unexpected_error_keeps_its_traceback(tmp_path):
    """Only input errors are shortened: anything else is a bug and keeps the interpreter's traceback."""
    script = tmp_path / "boom.py"
    script.write_text("import custom.core.errors as e\ne.report_input_errors()\nraise KeyError('boom')\n")
    proc = run_cmd([PYTHON, script], check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'boom'" in proc.stderr


# ------------------------------------------------------------------------ 15.11 declared size vs file size
def _header_only(shape=(512, 512, 512), dtype=np.float32) -> bytes:
    """A NIfTI-1 header (348 bytes + 4 extension bytes) declaring ``shape`` and no voxel data after it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def _peak_rss_mb(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; its peak resident memory (MB, the kernel's VmHWM, which starts afresh
    at exec, unlike ru_maxrss) and its output."""
    wrapped = code + textwrap.dedent("""
        import re
        status = open("/proc/self/status").read()
        print("PEAK_MB", int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024)
        """)
    proc = run_cmd([PYTHON, "-c", wrapped])
    peak = float(proc.stdout.split("PEAK_MB")[-1])
    return peak, proc.stdout


def test_a_66_byte_file_declaring_512_cubed_is_refused_before_allocating(tmp_path):
    """Issue 15.11: a 66-byte .nii.gz whose header declares 512^3 float32 (512 MiB) used to drive validation to
    ~550 MB; every reader now refuses it from the file size, and memory stays at the interpreter's baseline."""
    small = gzip.compress(_header_only(), mtime=0)
    bomb_gz = tmp_path / "BraTS-GLI-00666-000-t1c.nii.gz"
    # pad the gzip header's file-name field so that the file is the 66 bytes
    bomb_gz.write_bytes(small[:3] + bytes([small[3] | 0x08]) + small[4:10] + b"x" * (66 - len(small) - 1) + b"\0"
                        + small[10:])
    assert bomb_gz.stat().st_size == 66 and gzip.decompress(bomb_gz.read_bytes()) == _header_only()
    bomb_nii = tmp_path / "bomb.nii"
    bomb_nii.write_bytes(_header_only())
    code = textwrap.dedent(f"""
        from custom.core.errors import BraTSInputError
        from custom.data.nifti import check_file, load_label_map, read_nifti
        from custom.data.studies import check_study_header
        for path in ({str(bomb_gz)!r}, {str(bomb_nii)!r}):
            print(check_file(path, "t1c", None, keep=True)[2])
            for read in (read_nifti, load_label_map, check_study_header):
                try:
                    read(path)
                except BraTSInputError as exc:
                    print(type(exc).__name__, exc.problems)
        """)
    peak, out = _peak_rss_mb(code)
    assert out.count("BraTSInputError") == 6, out
    assert f"{bomb_gz}: its header declares (512, 512, 512) float32 voxels (512.0 MiB), more than a 66 bytes gzip " \
           "file can hold" in out
    assert f"{bomb_nii}: its header declares (512, 512, 512) float32 voxels (512.0 MiB) but the file holds 352 " \
           "bytes" in out
    assert peak < 300, f"peak memory {peak:.0f} MB: the declared volume was allocated"


def test_declared_size_beyond_a_plausible_gzip_is_counted_not_trusted(tmp_path, synthetic_dataset):
    """A real-size gzip whose header declares 8x its voxels passes the ratio bound; the ISIZE trailer says too
    few bytes, the stream is counted (not kept) and the file refused. A valid file written as two gzip members
    (ISIZE then covers the last member only) and a valid .nii load as before."""
    from custom.data.nifti import MAX_DEFLATE_RATIO, check_file, read_nifti

    case = sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[0]
    src = case / f"{case.name}-t2w.nii.gz"
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)
    raw = gzip.decompress(src.read_bytes())
    offset = int(img.dataobj.offset)

    lying = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    big = tuple(2 * s for s in data.shape)
    lying.set_data_shape(big)
    liar = tmp_path / "liar.nii.gz"
    liar.write_bytes(gzip.compress(lying.binaryblock + raw[348:]))
    declared = int(np.prod(big)) * img.get_data_dtype().itemsize
    assert offset + declared < liar.stat().st_size * MAX_DEFLATE_RATIO  # the ratio bound alone cannot tell
    problems = check_file(liar, "t2w", None, keep=True)[2]
    assert len(problems) == 1 and problems[0].startswith(
        f"{liar}: its header declares {big} {img.get_data_dtype()} voxels ({declared / 2**20:.1f} MiB) but the "
        f"file decompresses to "), problems

    members = tmp_path / "members.nii.gz"
    half = offset + data.nbytes // 2
    members.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    assert int.from_bytes(members.read_bytes()[-4:], "little") < len(raw)  # ISIZE of the last member only
    plain = tmp_path / "plain.nii"
    plain.write_bytes(raw)
    for path in (src, members, plain):
        loaded, _ = read_nifti(path)
        np.testing.assert_array_equal(loaded, data)
        assert check_file(path, "t2w", None, keep=False)[2] == []

    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(BraTSInputError, match=r"truncated\.nii: its header declares .* but the file holds"):
        read_nifti(truncated)


# ---------------------------------------------------------------------- 15.12 files left by a killed run
def _killed_writer(out_dir: Path, case_id: str) -> subprocess.CompletedProcess:
    """A real process writing a case's outputs with save_prediction, SIGKILLed right after the first rename."""
    code = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from custom.data.nifti import save_prediction
        real_replace, calls = os.replace, []
        def replace_then_die(src, dst):
            real_replace(src, dst)
            calls.append(dst)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace_then_die
        labels = np.ones((8, 8, 8), np.uint8)
        save_prediction(labels, labels.astype(np.float32) / 2, np.eye(4), None, {str(out_dir)!r}, {case_id!r})
        """)
    return run_cmd([PYTHON, "-c", code], check=False)


def test_a_case_killed_mid_write_leaves_no_label_without_its_map(tmp_path, plans_path, one_case):
    """Issue 15.12: kill -9 between the two renames leaves the uncertainty map without the label map (never the
    reverse: the label map is renamed last, after the old one was removed). The next run removes that
    remainder and stale temporary files before writing; evaluation never takes a temporary file for a prediction."""
    from custom.evaluation.folder import match_prediction_files
    from custom.inference.engine import infer_folder
    from custom.inference.segmenter import UncertaintySegmenter

    case_id = next(p.name for p in one_case.iterdir())
    out = tmp_path / "out"
    out.mkdir()
    old_label, _ = prediction_paths(out, case_id)
    old_label.write_bytes(b"an older prediction")
    proc = _killed_writer(out, case_id)
    assert proc.returncode == -9, proc.stderr
    label, unc = prediction_paths(out, case_id)
    assert unc.exists() and not label.exists(), sorted(p.name for p in out.iterdir())
    # a temporary file of a dead writer, and one of this (living) process, which must stay
    stale = temporary_path(unc, pid=2**22 + 12345)
    stale.write_bytes(b"half written")
    alive = temporary_path(out / "other.nii.gz")
    alive.write_bytes(b"being written")

    with pytest.raises(BraTSInputError) as err:  # a hidden temporary file is not a prediction
        match_prediction_files(out, one_case)
    assert f"prediction missing for ground-truth case {case_id}" in str(err.value)
    assert stale.name not in str(err.value)

    segmenter = UncertaintySegmenter.from_checkpoint(_checkpoint(tmp_path / "ckpt", plans_path))
    summary = infer_folder(segmenter, one_case, out)  # the bundle run's engine
    assert set(summary["cases"]) == {case_id}
    assert label.exists() and unc.exists() and not stale.exists() and alive.exists()
    alive.unlink()
    assert sorted(p.name for p in out.iterdir()) == sorted([label.name, unc.name, "summary.json"])
    assert match_prediction_files(out, one_case, unc_dir=out)[0]["case_id"] == case_id


def test_output_folder_inside_the_input_folder_runs_twice(tmp_path, plans_path, one_case):
    """Issue 15.13: ``--output_dir`` inside ``--input_dir``: the second run used to take the output folder for a
    case folder and fail; it is skipped when the cases are listed."""
    from custom.inference.engine import infer_folder
    from custom.inference.segmenter import UncertaintySegmenter

    cases = tmp_path / "cases"
    shutil.copytree(one_case, cases)
    out = cases / "predictions"
    segmenter = UncertaintySegmenter.from_checkpoint(_checkpoint(tmp_path / "ckpt", plans_path))
    first = infer_folder(segmenter, cases, out)  # the bundle run's engine
    second = infer_folder(segmenter, cases, out)
    assert set(first["cases"]) == set(second["cases"]) == {p.name for p in one_case.iterdir()}
    assert not second["failures"]
    # the bundle's inference.json lists its cases the same way (its datalist skips the output folder)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config("bundle/configs/inference.json")
    parser.update({"bundle_root": "bundle", "dataset_dir": str(cases), "output_dir": str(out)})
    assert {d["case_id"] for d in parser.get_parsed_content("datalist")} == {p.name for p in one_case.iterdir()}


# --------------------------------------------------------------------- 15.13 evaluate.py names every file
@pytest.fixture(scope="module")
def evaluation_folders(synthetic_dataset, tmp_path_factory):
    """Ground truth (two cases, with images), predictions (= ground truth) and uncertainty maps."""
    root = tmp_path_factory.mktemp("eval_files")
    gt, pred = root / "gt", root / "pred"
    pred.mkdir()
    for case in sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[:2]:
        shutil.copytree(case, gt / case.name)
        seg = nib.load(str(case / f"{case.name}-seg.nii.gz"))
        labels = np.asarray(seg.dataobj).astype(np.uint8)
        nib.save(nib.Nifti1Image(labels, seg.affine), str(pred / f"{case.name}.nii.gz"))
        nib.save(nib.Nifti1Image((labels > 0).astype(np.float32) * 0.3, seg.affine), str(pred / f"{case.name}-unc.nii.gz"))
    return gt, pred


def _evaluate(gt, pred, out):
    return run_cmd([PYTHON, "scripts/evaluate.py", "--pred_dir", pred, "--gt_dir", gt, "--out_dir", out,
                    "--unc_dir", pred], check=False, timeout=300)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("which", ["prediction", "ground truth", "uncertainty map", "image"])
def test_evaluate_names_a_truncated_file(evaluation_folders, tmp_path, which):
    gt, pred = (shutil.copytree(p, tmp_path / p.name) for p in evaluation_folders)
    case_id = sorted(p.name for p in gt.iterdir())[1]
    target = {"prediction": pred / f"{case_id}.nii.gz", "ground truth": gt / case_id / f"{case_id}-seg.nii.gz",
              "uncertainty map": pred / f"{case_id}-unc.nii.gz",
              "image": gt / case_id / f"{case_id}-t2f.nii.gz"}[which]
    _truncate(target)
    proc = _evaluate(gt, pred, tmp_path / "report")
    assert proc.returncode == 2 and str(target) in proc.stderr, (which, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and not (tmp_path / "report" / "summary.json").exists()


def test_evaluate_names_an_image_of_another_shape(evaluation_folders, tmp_path):
    """The brain mask comes from the case's images: one of another shape is named, not a broadcast error."""
    gt, pred = (shutil.copytree(p, tmp_path / p.name) for p in evaluation_folders)
    case_id = sorted(p.name for p in gt.iterdir())[0]
    t1n = gt / case_id / f"{case_id}-t1n.nii.gz"
    img = nib.load(str(t1n))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), str(t1n))
    proc = _evaluate(gt, pred, tmp_path / "report")
    assert proc.returncode == 2 and f"{t1n}: shape" in proc.stderr and "differs from ground truth" in proc.stderr, \
        proc.stderr[-2000:]


def test_evaluate_runs_twice_with_its_output_inside_the_prediction_folder(evaluation_folders, tmp_path):
    gt, pred = (shutil.copytree(p, tmp_path / p.name) for p in evaluation_folders)
    for _ in range(2):
        proc = _evaluate(gt, pred, pred / "report")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((pred / "report" / "summary.json").read_text())["num_cases"] == 2


def test_evaluate_ignores_the_hidden_files_a_killed_writer_leaves(evaluation_folders, tmp_path):
    """Issue 15.12: ``*.nii.gz`` matched the hidden ``.CASE-unc.tmp-PID.nii.gz`` a kill -9 left, and evaluate.py
    stopped on it; hidden files are never read (here: garbage under the temporary names of a map and a label)."""
    gt, pred = (shutil.copytree(p, tmp_path / p.name) for p in evaluation_folders)
    case_id = sorted(p.name for p in gt.iterdir())[0]
    label, unc = prediction_paths(pred, case_id)
    for final in (label, unc):
        temporary_path(final, pid=2**22 + 4321).write_bytes(b"half written")
    proc = _evaluate(gt, pred, tmp_path / "report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["num_cases"] == 2
