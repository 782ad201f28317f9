"""scripts/package_bundle.py: a self-contained bundle that MONAI's and the model zoo's tools accept.

A tiny checkpoint in a run folder as training leaves it is packaged through the real command line; the zip is
unpacked into a scratch folder and used from there by a Python that cannot import this repository and holds only
the packages the bundle's metadata.json lists (``python -S`` with a site-packages folder of those distributions
and what they require): the model zoo's checks (tests/zoo_checks.py), inference, data preparation and training.
"""

from __future__ import annotations

import csv
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO_ROOT, run_cmd
from packaging.requirements import Requirement

from custom.core.layout import METRICS_CSV_COLUMNS, BundleDir
from custom.model.networks import build_network

NAME = "brats_unc_nnunet"
VAL_ROWS = {  # epoch -> (dice wt, tc, et, mean, rmsd_unc, corr_unc); the checkpoint is epoch 2's
    1: (0.11, 0.12, 0.13, 0.12, 0.31, 0.21),
    2: (0.61, 0.52, 0.43, 0.52, 0.22, 0.71),
    3: (0.91, 0.92, 0.93, 0.92, 0.11, 0.91),
}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def run_folder(prepared_work_dir, tmp_path_factory) -> Path:
    """W/runs/unc/fold0 as training leaves it: model.pt (best epoch 2), metrics.csv, train_config.json, plans.json."""
    run = tmp_path_factory.mktemp("runs") / "unc" / "fold0"
    run.mkdir(parents=True)
    torch.manual_seed(3)
    net = build_network(prepared_work_dir / "plans.json")
    torch.save({"model": net.state_dict(), "epoch": 2, "ema_pseudo_dice": 0.5}, run / "model.pt")
    shutil.copyfile(prepared_work_dir / "plans.json", run / "plans.json")
    with open(run / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRICS_CSV_COLUMNS)
        writer.writeheader()
        for epoch, (wt, tc, et, mean, rmsd, corr) in VAL_ROWS.items():
            writer.writerow({"epoch": epoch, "train_loss": 1.0, "lr": 0.01, "time_s": 1.0, "val_dice_wt": wt,
                             "val_dice_tc": tc, "val_dice_et": et, "val_dice_mean": mean, "val_rmsd_unc": rmsd,
                             "val_corr_unc": corr})
    (run / "train_config.json").write_text(json.dumps({"fold": 0, "val_cases": ["a", "b", "c"]}))
    return run


@pytest.fixture(scope="module")
def packaged(run_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = run_cmd([PYTHON, "scripts/package_bundle.py", "--checkpoint", run_folder / "model.pt", "--out_dir", out],
                   timeout=600)
    return BundleDir(out / NAME), out / f"{NAME}.zip", proc


@pytest.fixture(scope="module")
def scratch_bundle(packaged, tmp_path_factory) -> BundleDir:
    """The zip unpacked into a scratch folder: what a user downloads."""
    _, zip_path, _ = packaged
    scratch = tmp_path_factory.mktemp("scratch")
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(scratch)
    return BundleDir(scratch / NAME)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def listed_distributions(meta: dict, site: Path) -> set[str]:
    """monai, torch, numpy and required_packages_version of metadata.json, with what they require (markers
    evaluated here, extras not followed): what `pip install` of the listed packages would bring."""
    dists = {_normal(d.metadata["Name"]): d for d in md.distributions(path=[str(site)])}
    todo = ["monai", "torch", "numpy", *meta["required_packages_version"]]
    seen: set[str] = set()
    while todo:
        name = _normal(todo.pop())
        if name in seen or name not in dists:
            continue
        seen.add(name)
        for line in dists[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def only_listed_site(meta: dict, dest: Path) -> set[str]:
    """A site-packages folder of links to the listed distributions' files only (no .pth files, no editable
    install of this repository): an environment with just what metadata.json lists."""
    site = Path(sysconfig.get_paths()["purelib"])
    allowed = listed_distributions(meta, site)
    owners = defaultdict(lambda: defaultdict(set))  # top-level entry -> distribution -> second-level names
    for dist in md.distributions(path=[str(site)]):
        for f in dist.files or []:
            parts = Path(f).parts
            if parts and parts[0] != "..":
                owners[parts[0]][_normal(dist.metadata["Name"])].add(parts[1] if len(parts) > 1 else None)
    dest.mkdir(parents=True)
    for top, by_dist in owners.items():
        mine = set(by_dist) & allowed
        if not mine or top.endswith(".pth"):
            continue
        if set(by_dist) <= allowed or any(None in by_dist[d] for d in mine):
            os.symlink(site / top, dest / top)
            continue
        (dest / top).mkdir()  # shared by listed and unlisted distributions (namespace packages): listed parts
        for d in mine:
            for sub in by_dist[d]:
                if not (dest / top / sub).exists():
                    os.symlink(site / top / sub, dest / top / sub)
    return allowed


@pytest.fixture(scope="module")
def isolated(scratch_bundle, tmp_path_factory):
    """``run(args, cwd)``: this interpreter with ``-S`` (no site, so no .pth file and no editable install) and
    PYTHONPATH = a site-packages of the listed distributions only; a clean environment."""
    root = tmp_path_factory.mktemp("isolated")
    meta = json.loads(scratch_bundle.metadata.read_text())
    allowed = only_listed_site(meta, root / "site")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), "PYTHONPATH": str(root / "site"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"}

    def run(args, cwd, timeout=600, check=True):
        proc = subprocess.run([sys.executable, "-S", *[str(a) for a in args]], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"isolated command failed ({proc.returncode}): {args}\n--- stdout ---\n"
                                 f"{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
        return proc

    run.allowed = allowed
    run.root = root
    return run


# ------------------------------------------------------------------------------------------------ the package
def test_package_writes_the_zoo_layout_with_release_weights(packaged, run_folder):
    bundle, zip_path, proc = packaged
    for path in (bundle.metadata, bundle.config("inference"), bundle.config("train"), bundle.logging_conf,
                 bundle.weights, bundle.torchscript, bundle.plans, bundle.readme, bundle.data_license,
                 bundle.license, bundle.large_files, bundle.code / "__init__.py", bundle.scripts / "prepare_data.py"):
        assert path.is_file(), path
    assert bundle.license.read_text() == (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in bundle.license.read_text() and "Version 2.0" in bundle.license.read_text()
    # configs are the repository's, unchanged (only metadata.json is this model's)
    for f in (REPO_ROOT / "bundle" / "configs").iterdir():
        if f.name != "metadata.json":
            assert (bundle.configs / f.name).read_bytes() == f.read_bytes(), f.name
    # models/model.pt: a plain state dict with the checkpoint's tensors (the training checkpoint keeps its dict)
    released = torch.load(bundle.weights, weights_only=True)
    trained = torch.load(run_folder / "model.pt", weights_only=True)
    assert set(trained) == {"model", "epoch", "ema_pseudo_dice"}
    assert all(torch.is_tensor(v) for v in released.values()) and released.keys() == trained["model"].keys()
    assert all(torch.equal(released[k], trained["model"][k]) for k in released)
    # large_files.yml: both large files with their sha256 (the zoo's download step skips a file whose hash matches)
    from custom.core.atomic import file_sha256

    text = bundle.large_files.read_text()
    for path in (bundle.weights, bundle.torchscript):
        assert f'path: "models/{path.name}"' in text and f'hash_val: "{file_sha256(path)}"' in text
    assert 'hash_type: "sha256"' in text and 'url: ""' in text  # no URL reachable here: filled on upload
    # the zip holds the folder itself (MONAI's archive format), file for file
    with zipfile.ZipFile(zip_path) as zf:
        names = {n for n in zf.namelist() if not n.endswith("/")}
    files = {p.relative_to(bundle.path.parent).as_posix() for p in bundle.path.rglob("*") if p.is_file()}
    assert names == files and all(n.startswith(f"{NAME}/") for n in names)
    assert f"package_bundle: {bundle.path}" in proc.stdout


def test_metadata_is_this_models_and_passes_the_schema_rules(packaged, tmp_path):
    from custom.deploy.package import metadata_problems

    bundle, _, _ = packaged
    meta = json.loads(bundle.metadata.read_text())
    assert metadata_problems(meta) == []
    # the versions it was packaged with, and every package the shipped code imports at module level
    assert meta["monai_version"] == md.version("monai") and meta["numpy_version"] == np.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert set(meta["required_packages_version"]) == {"pytorch-ignite", "nibabel", "scipy", "tqdm", "tensorboard",
                                                      "fire"}
    assert "optional_packages_version" not in meta  # MONAI would replace required_packages_version with it
    # eval_metrics: this model's, from its run's metrics.csv at the checkpoint's epoch (2), not epoch 1 or 3
    wt, tc, et, mean, rmsd, corr = VAL_ROWS[2]
    assert meta["eval_metrics"] == {"val_dice_wt": wt, "val_dice_tc": tc, "val_dice_et": et, "val_dice_mean": mean,
                                    "val_rmsd_unc": rmsd, "val_corr_unc": corr}
    assert "epoch 2" in meta["eval_metrics_source"] and "3 cases of fold 0" in meta["eval_metrics_source"]
    # the tiny plan has 4 stages (total stride 8): inputs of 16, 24, 32 ... voxels per axis
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == ["8*(n+1)"] * 3 == fmt["outputs"]["pred"]["spatial_shape"]
    assert fmt["outputs"]["pred"]["num_channels"] == 4
    # MONAI's own verify_metadata, as the model zoo runs it, offline against the shipped schema
    from custom.deploy.package import META_SCHEMA

    schema = tmp_path / "schema.json"
    shutil.copyfile(META_SCHEMA, schema)
    proc = run_cmd([PYTHON, "-m", "monai.bundle", "verify_metadata", "--meta_file", bundle.metadata, "--filepath",
                    schema], timeout=300)
    assert "skipped downloading" in proc.stdout + proc.stderr
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def test_metadata_rules_catch_what_the_schema_rejects():
    """Planted errors: each is named (the schema itself cannot be downloaded here)."""
    from custom.deploy.package import SCHEMA_REQUIRED, metadata_problems

    good = json.loads((REPO_ROOT / "bundle" / "configs" / "metadata.json").read_text())
    assert metadata_problems(good) == []
    for key in SCHEMA_REQUIRED:
        bad = {k: v for k, v in good.items() if k != key}
        assert f"'{key}' missing" in metadata_problems(bad)
    bad = json.loads(json.dumps(good))
    bad["version"] = 1
    bad["references"] = ["x", 2]
    bad["network_data_format"]["inputs"]["image"]["spatial_shape"] = [32.5, "32*n", 32]
    del bad["network_data_format"]["outputs"]["pred"]["value_range"]
    bad["network_data_format"]["post_processed_outputs"]["pred"]["num_channels"] = "1"
    problems = metadata_problems(bad)
    assert "'version': must be str, got int" in problems and "'references': items must be strings" in problems
    assert "network_data_format.inputs.image.spatial_shape: items must be strings or integers" in problems
    assert "network_data_format.outputs.pred: 'value_range' missing" in problems
    assert "network_data_format.post_processed_outputs.pred.num_channels: must be int, got str" in problems
    bad = json.loads(json.dumps(good))
    bad["version"] = "9.9.9"
    del bad["network_data_format"]["outputs"]
    problems = metadata_problems(bad)
    assert "'version' '9.9.9' has no entry in 'changelog'" in problems
    assert "network_data_format: 'outputs' missing" in problems


def _verify_metadata(meta: dict, tmp_path: Path, schema_copy: Path) -> str | None:
    """MONAI's own ``verify_metadata`` on ``meta`` against a copy of the shipped schema: None when it passes, else
    its message. No download: MONAI skips it when the schema file exists (the URL here is unreachable)."""
    from monai.bundle import verify_metadata

    meta_file = tmp_path / "metadata.json"
    meta_file.write_text(json.dumps(meta))
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema_copy))
    except ValueError as exc:
        return str(exc)
    return None


def test_monai_verify_metadata_offline_agrees_with_the_schema_rules(tmp_path):
    """The shipped JSON Schema (custom/deploy/bundle_meta_schema.json) and metadata_problems are one set of rules:
    the same required fields, and every planted error is rejected by both MONAI's verify_metadata and
    metadata_problems; the repository's metadata.json passes both."""
    from custom.deploy.package import META_SCHEMA, SCHEMA_REQUIRED, TENSOR_REQUIRED, metadata_problems

    schema = json.loads(META_SCHEMA.read_text())
    assert set(schema["required"]) == set(SCHEMA_REQUIRED)
    assert set(schema["definitions"]["tensor"]["required"]) == set(TENSOR_REQUIRED)
    copy = tmp_path / "schema.json"
    shutil.copyfile(META_SCHEMA, copy)
    good = json.loads((REPO_ROOT / "bundle" / "configs" / "metadata.json").read_text())
    assert _verify_metadata(good, tmp_path, copy) is None and metadata_problems(good) == []
    assert copy.read_bytes() == META_SCHEMA.read_bytes()  # used as given, nothing downloaded over it

    def planted(edit):
        bad = json.loads(json.dumps(good))
        edit(bad)
        return bad

    fmt = lambda m: m["network_data_format"]  # noqa: E731
    cases = {
        "authors missing": lambda m: m.pop("authors"),
        "required_packages_version missing": lambda m: m.pop("required_packages_version"),
        "version not a string": lambda m: m.update(version=1),
        "reference not a string": lambda m: m.update(references=["x", 2]),
        "outputs missing": lambda m: fmt(m).pop("outputs"),
        "spatial_shape item a float": lambda m: fmt(m)["inputs"]["image"].update(spatial_shape=[32.5, 32, 32]),
        "value_range missing": lambda m: fmt(m)["outputs"]["pred"].pop("value_range"),
        "num_channels a string": lambda m: fmt(m)["post_processed_outputs"]["pred"].update(num_channels="1"),
        "is_patch_data a string": lambda m: fmt(m)["inputs"]["image"].update(is_patch_data="yes"),
        "tensor not an object": lambda m: fmt(m)["post_processed_outputs"].update(unc="a map"),
        "other data format without inputs": lambda m: m.update(export_data_format={"outputs": {}}),
    }
    for what, edit in cases.items():
        bad = planted(edit)
        assert metadata_problems(bad), what
        message = _verify_metadata(bad, tmp_path, copy)
        assert message is not None and "Failed validating" in message, what


def test_shipped_code_is_what_the_configs_need(packaged):
    """custom/ in the bundle: the modules the configs name and what they import, nothing of export/serving."""
    bundle, _, _ = packaged
    shipped = {p.relative_to(bundle.path).as_posix() for p in bundle.code.rglob("*.py")}
    for needed in ("custom/inference/engine.py", "custom/inference/segmenter.py", "custom/model/checkpoints.py",
                   "custom/training/handlers/error_maps.py", "custom/training/setup.py", "custom/core/dist.py",
                   "custom/workflows/prepare.py", "custom/training/handlers/__init__.py"):
        assert needed in shipped, needed
    assert not any(p.startswith(("custom/deploy/", "custom/workflows/report")) for p in shipped)
    for p in shipped:
        assert (bundle.path / p).read_bytes() == (REPO_ROOT / p).read_bytes()
    assert not list(bundle.path.rglob("__pycache__"))


def test_docs_stay_inside_the_bundle(packaged):
    """Every relative link of the bundle's docs resolves to a file of the bundle (the zoo ships docs/ alone)."""
    bundle, _, _ = packaged
    for doc in (REPO_ROOT / "bundle" / "docs" / "README.md", bundle.readme):
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" in target:
                continue
            resolved = (doc.parent / target).resolve()
            root = bundle.path if doc == bundle.readme else REPO_ROOT / "bundle"
            assert resolved.is_relative_to(root.resolve()) and resolved.exists(), f"{doc}: link {target}"
    headings = re.findall(r"^## (.+)$", bundle.readme.read_text(), flags=re.M)
    for section in ("Model overview", "Data", "Input", "Output", "Performance", "Commands", "License"):
        assert any(h.startswith(section) for h in headings), (section, headings)


def test_package_refuses_what_it_cannot_ship(packaged, run_folder, tmp_path):
    bundle, _, _ = packaged
    proc = run_cmd([PYTHON, "scripts/package_bundle.py", "--checkpoint", run_folder / "model.pt", "--out_dir",
                    bundle.path.parent], check=False, timeout=300)
    assert proc.returncode != 0 and "--overwrite true" in proc.stderr and str(bundle.path) in proc.stderr
    proc = run_cmd([PYTHON, "scripts/package_bundle.py", "--checkpoint", run_folder / "model.pt", "--out_dir",
                    tmp_path / "v", "--version", "0.9.0"], check=False, timeout=300)
    assert proc.returncode != 0 and "needs a changelog entry" in proc.stderr
    nan = tmp_path / "nan"
    nan.mkdir()
    state = torch.load(run_folder / "model.pt", weights_only=True)["model"]
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
               nan / "model.pt")
    shutil.copyfile(run_folder / "plans.json", nan / "plans.json")
    proc = run_cmd([PYTHON, "scripts/package_bundle.py", "--checkpoint", nan / "model.pt", "--out_dir",
                    tmp_path / "n"], check=False, timeout=300)
    assert proc.returncode != 0 and "NaN or inf" in proc.stderr and str(nan / "model.pt") in proc.stderr
    assert not (tmp_path / "n" / NAME).exists() and not list((tmp_path / "n").glob(".*tmp*"))


# ------------------------------------------------------------------------------------------------ in isolation
def test_isolated_python_has_only_the_listed_packages(isolated, scratch_bundle):
    """The interpreter the next tests use: no repository, nothing unlisted; the bundle's own code from its root."""
    outside = isolated.root  # not the bundle folder
    proc = isolated(["-c", "import custom"], cwd=outside, check=False)
    assert proc.returncode != 0 and "No module named 'custom'" in proc.stderr
    for unlisted in ("onnx", "tritonclient", "matplotlib", "pandas"):
        proc = isolated(["-c", f"import {unlisted}"], cwd=outside, check=False)
        assert proc.returncode != 0 and f"No module named '{unlisted}'" in proc.stderr, unlisted
    proc = isolated(["-c", "import custom, monai, ignite, nibabel, scipy, tqdm, fire, torch.utils.tensorboard; "
                           "print(custom.__file__)"], cwd=scratch_bundle.path)
    assert Path(proc.stdout.strip()).parent == scratch_bundle.code
    assert {"monai", "torch", "numpy", "pytorch-ignite", "nibabel"} <= isolated.allowed
    assert "uncertainty-nnunet-brats" not in isolated.allowed


def test_packaged_bundle_passes_the_model_zoo_checks(isolated, scratch_bundle, prepared_work_dir, synthetic_dataset):
    """verify_bundle's directory, version, verify_net_in_out, ckpt_export with defaults + TorchScript round trip,
    and check_properties() of train and inference: with MONAI's functions, outside the repository."""
    out = isolated.root / "zoo.json"
    isolated([REPO_ROOT / "tests" / "zoo_checks.py", prepared_work_dir, synthetic_dataset, out],
             cwd=scratch_bundle.path, timeout=900)
    found = json.loads(out.read_text())
    assert Path(found["custom_from"]) == scratch_bundle.code
    assert found["verify_net_in_out"] is True
    assert found["large_files"] == ["models/model.pt", "models/model.ts"]
    assert found["network_def_vs_ckpt_export"] <= 1e-5  # ckpt_export with default key_in_ckpt: the plain dict
    assert found["model_ts_vs_sigmoid_network_def"] <= 1e-5  # model.ts is network_export: probabilities
    assert found["network_export_vs_model_ts"] <= 1e-5  # the documented `ckpt_export network_export`
    assert found["model_ts_pred"]["value_range"] == [0, 1] and "sigmoid" in found["model_ts_pred"]["activation"]
    assert found["inference_check_properties"] == [] and found["train_check_properties"] == []
    assert found["inference_dataset_size"] == 6
    assert found["train_dataset_dir"] == str(synthetic_dataset)
    assert not (scratch_bundle.models / "verify_model.ts").exists()


def test_packaged_bundle_infers_without_the_repository(isolated, scratch_bundle, synthetic_dataset, run_folder,
                                                       tmp_path):
    """`python -m monai.bundle run --config_file configs/inference.json` from the unpacked bundle gives what the
    repository's segmenter gives for the same checkpoint."""
    from custom.data.nifti import load_case_arrays
    from custom.inference.segmenter import UncertaintySegmenter

    cases = tmp_path / "cases"
    for case in sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[:2]:
        shutil.copytree(case, cases / case.name)
    out = tmp_path / "pred"
    isolated(["-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir", cases,
              "--output_dir", out, "--progress", "false"], cwd=scratch_bundle.path)
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["cases"]) == sorted(p.name for p in cases.iterdir()) and not summary["failures"]
    segmenter = UncertaintySegmenter.from_checkpoint(run_folder / "model.pt")
    for case in cases.iterdir():
        image, _, _, spacing = load_case_arrays([str(case / f"{case.name}-{m}.nii.gz")
                                                 for m in ("t1c", "t1n", "t2f", "t2w")])
        pred = segmenter.predict(image, spacing)
        labels = np.asarray(nib.load(out / f"{case.name}.nii.gz").dataobj)
        unc = np.asarray(nib.load(out / f"{case.name}-unc.nii.gz").dataobj)
        assert (labels == pred.labels).all() and np.abs(unc - pred.unc).max() <= 1e-5


def test_packaged_bundle_prepares_and_trains_without_the_repository(isolated, scratch_bundle, synthetic_dataset,
                                                                    tmp_path):
    """The bundle's scripts/prepare_data.py and `run training` (tiny config, one short epoch) from the unpacked
    bundle: training needs nothing the metadata does not list either."""
    work = tmp_path / "work"
    isolated(["-m", "scripts.prepare_data", "--dataset_dir", synthetic_dataset, "--work_dir", work, "--num_folds", 2,
              "--patch_size", "[32,32,32]", "--filters", "[8,16,32,64]"], cwd=scratch_bundle.path)
    out = tmp_path / "run"
    isolated(["-m", "monai.bundle", "run", "training", "--config_file", "['configs/train.json','configs/tiny.json']",
              "--work_dir", work, "--output_dir", out, "--num_epochs", 1, "--iterations_per_epoch", 2,
              "--progress_bar", "false"], cwd=scratch_bundle.path, timeout=900)
    assert (out / "FINISHED").is_file() and (out / "model.pt").is_file()
    assert torch.load(out / "model.pt", weights_only=True)["epoch"] == 1
