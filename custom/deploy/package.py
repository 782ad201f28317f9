"""Package a trained checkpoint as a self-contained MONAI bundle folder (and a zip of it).

``package_bundle(checkpoint, out_dir, name)`` writes ``out_dir/<name>/`` in the model zoo's layout
(:class:`custom.core.layout.BundleDir`)::

    configs/     the repository's bundle configs, unchanged, and metadata.json filled in for this model
    models/      model.pt (the plain state dict MONAI's tools load by default), model.ts (``network_export``:
                 sigmoid probabilities, its metadata says so), plans.json (the plan the network is built from)
    docs/        README.md (the zoo's sections: overview, data, input, output, performance, commands, license)
                 and data_license.txt
    custom/      the code the configs and scripts import, copied from this repository: the modules the configs
                 name and everything they import (MONAI runs a bundle with its root on ``sys.path``)
    scripts/     prepare_data.py (a work directory for training)
    LICENSE      Apache-2.0 (the code's licence)
    large_files.yml  models/model.pt and models/model.ts with their sha256 (and a download URL when given)

and ``out_dir/<name>.zip`` (MONAI's archive format: the folder inside the zip). The folder runs with nothing but
the packages ``metadata.json`` lists; ``tests/test_package.py`` runs it with an interpreter that cannot import this
repository and passes it through the model zoo's checks.

``metadata.json`` is the repository's, with what belongs to this model: the software versions it was packaged with
(``monai_version``, ``pytorch_version``, ``numpy_version``, ``required_packages_version``), the input spatial shape
the plan's network accepts, the output channels of the checkpoint and, when the checkpoint sits in its training run
folder, ``eval_metrics`` read from that run's ``metrics.csv`` at the checkpoint's epoch (``eval_metrics_source``
says which cases and epoch). It is checked against the fields MONAI's metadata schema requires
(:func:`metadata_problems`) before anything is written.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import os
import re
import shutil
from importlib import metadata as distributions
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from custom.core.atomic import atomic_write_bytes, atomic_write_json, file_sha256
from custom.core.constants import NUM_REGIONS
from custom.core.errors import BraTSInputError
from custom.core.layout import BUNDLE_ROOT, REPO_ROOT, BundleDir, RunDir
from custom.deploy.export import export_torchscript
from custom.evaluation.runs import read_metrics_csv
from custom.model.checkpoints import (checkpoint_epoch, checkpoint_out_channels, load_state_dict, resolve_plans_path,
                                      save_release_weights)
from custom.planning.plans import load_plans

#: the packaged bundle's folder name (model-zoo style: task and data characteristics)
BUNDLE_NAME = "brats_unc_nnunet"

#: scripts shipped under ``scripts/`` (run from the bundle root as ``python -m scripts.<name>``)
BUNDLE_SCRIPTS = ("prepare_data.py",)

#: the docs a bundle ships (the model zoo's: the model card and the data terms), with the files of ``docs/`` the
#: model card links to
BUNDLE_DOCS = ("README.md", "data_license.txt")
_MD_LINK = re.compile(r"\]\(([^)#\s]+)")

#: the same rules as a JSON Schema file, for MONAI's own ``verify_metadata`` offline (it downloads nothing when the
#: file it is given exists): ``python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath
#: COPY_OF_THIS_FILE``; tests/test_package.py checks that it and :func:`metadata_problems` agree
META_SCHEMA = Path(__file__).with_name("bundle_meta_schema.json")

#: required fields of MONAI's bundle metadata schema (meta_schema_20240725.json, the URL in metadata.json's
#: "schema") and the JSON type each must have; tensor fields below
SCHEMA_REQUIRED = {
    "schema": str, "version": str, "monai_version": str, "pytorch_version": str, "numpy_version": str,
    "required_packages_version": dict, "task": str, "description": str, "authors": str, "copyright": str,
    "network_data_format": dict,
}
SCHEMA_OPTIONAL = {
    "changelog": dict, "data_source": str, "data_type": str, "image_classes": str, "label_classes": str,
    "pred_classes": str, "eval_metrics": dict, "intended_use": str, "references": list, "supported_apps": dict,
}
TENSOR_REQUIRED = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")

#: distribution names of the packages metadata.json lists (import name -> distribution)
#: (numba, which speeds up the EMA store, is optional and not listed: MONAI reads ``optional_packages_version`` as a
#: deprecated name of ``required_packages_version`` and replaces the latter with it)
REQUIRED_DISTRIBUTIONS = {"ignite": "pytorch-ignite", "nibabel": "nibabel", "scipy": "scipy", "tqdm": "tqdm",
                          "tensorboard": "tensorboard", "fire": "fire"}

#: metrics.csv columns that become eval_metrics (when finite)
EVAL_COLUMNS = ("val_dice_wt", "val_dice_tc", "val_dice_et", "val_dice_mean", "val_rmsd_unc", "val_corr_unc")

_CUSTOM_REF = re.compile(r"\bcustom(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_HEADER = "cannot package the bundle"


# ------------------------------------------------------------------------------------------------ metadata
def _tensor_problems(where: str, tensor) -> list[str]:
    if not isinstance(tensor, Mapping):
        return [f"{where}: must be an object"]
    problems = [f"{where}: '{k}' missing" for k in TENSOR_REQUIRED if k not in tensor]
    checks = {"type": str, "format": str, "num_channels": int, "spatial_shape": list, "dtype": str,
              "value_range": list, "is_patch_data": bool, "channel_def": dict}
    for key, kind in checks.items():
        if key in tensor and (not isinstance(tensor[key], kind) or (kind is int and isinstance(tensor[key], bool))):
            problems.append(f"{where}.{key}: must be {kind.__name__}, got {type(tensor[key]).__name__}")
    if isinstance(tensor.get("spatial_shape"), list) and not all(
            isinstance(v, (str, int)) and not isinstance(v, bool) for v in tensor["spatial_shape"]):
        problems.append(f"{where}.spatial_shape: items must be strings or integers")
    if isinstance(tensor.get("value_range"), list) and not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in tensor["value_range"]):
        problems.append(f"{where}.value_range: items must be numbers")
    return problems


def metadata_problems(meta: Mapping) -> list[str]:
    """What MONAI's metadata schema (meta_schema_20240725.json) would reject in ``meta``, plus what the model zoo's
    ``verify_bundle`` checks besides (``version`` in ``changelog``).

    The schema itself cannot be downloaded here; this restates its rules: the required fields and their JSON types,
    ``network_data_format`` (and any ``<name>_data_format``) with ``inputs`` and ``outputs`` (and optionally
    ``post_processed_outputs``) whose tensors carry type, format, num_channels, spatial_shape (strings or
    integers), dtype and value_range (numbers). :data:`META_SCHEMA` holds the same rules as a JSON Schema for
    MONAI's ``verify_metadata``; this function names every problem at once, with no JSON Schema package.
    """
    if not isinstance(meta, Mapping):
        return ["metadata: must be a JSON object"]
    problems = [f"'{k}' missing" for k in SCHEMA_REQUIRED if k not in meta]
    for key, kind in {**SCHEMA_REQUIRED, **SCHEMA_OPTIONAL}.items():
        if key in meta and not isinstance(meta[key], kind):
            problems.append(f"'{key}': must be {kind.__name__}, got {type(meta[key]).__name__}")
    if isinstance(meta.get("references"), list) and not all(isinstance(r, str) for r in meta["references"]):
        problems.append("'references': items must be strings")
    if isinstance(meta.get("changelog"), Mapping) and meta.get("version") not in meta["changelog"]:
        problems.append(f"'version' {meta.get('version')!r} has no entry in 'changelog'")
    for key, io in meta.items():
        if key != "network_data_format" and not re.fullmatch(r"[_a-zA-Z0-9]+_data_format", str(key)):
            continue
        if not isinstance(io, Mapping):
            continue  # reported above for network_data_format
        for part in ("inputs", "outputs"):
            if part not in io:
                problems.append(f"{key}: '{part}' missing")
        for part in ("inputs", "outputs", "post_processed_outputs"):
            tensors = io.get(part, {})
            if not isinstance(tensors, Mapping):
                problems.append(f"{key}.{part}: must be an object")
                continue
            for name, tensor in tensors.items():
                problems.extend(_tensor_problems(f"{key}.{part}.{name}", tensor))
    return problems


def installed_version(distribution: str) -> str:
    try:
        return distributions.version(distribution)
    except distributions.PackageNotFoundError:
        raise BraTSInputError(f"{distribution}: not installed (the bundle's metadata.json lists it)",
                              header=_HEADER) from None


def spatial_shape_of(plans) -> list[str]:
    """The input sizes the plan's network accepts, per axis: multiples of its total stride ``s`` from ``2 s``
    (instance norm needs more than one voxel per axis at the bottleneck): ``"s*(n+1)"``."""
    strides = np.prod(np.asarray(plans.strides, dtype=int), axis=0)
    return [f"{int(s)}*(n+1)" for s in strides]


def eval_metrics_of(checkpoint) -> tuple[dict, str] | None:
    """``(eval_metrics, eval_metrics_source)`` of a checkpoint in its training run folder: the validation metrics
    of ``metrics.csv`` at the checkpoint's epoch. None when the checkpoint is not in a run folder, has no epoch or
    its epoch had no validation."""
    run = RunDir(Path(checkpoint).parent)
    epoch = checkpoint_epoch(checkpoint)
    if epoch is None or not run.metrics_csv.is_file():
        return None
    row = next((r for r in read_metrics_csv(run.metrics_csv) if r["epoch"] == epoch), None)
    if row is None:
        return None
    found = {c: round(float(row[c]), 4) for c in EVAL_COLUMNS if c in row and math.isfinite(row[c])}
    if not found:
        return None
    cases = ""
    if run.train_config.is_file():
        config = json.loads(run.train_config.read_text())
        cases = f" ({len(config.get('val_cases', []))} cases of fold {config.get('fold')})"
    return found, (f"this model on the validation cases of its training fold{cases} at epoch {epoch} "
                   f"(metrics.csv of {run.path.name}); not a held-out test set")


def bundle_metadata(template: Mapping, plans, out_channels: int, checkpoint, version: str | None = None,
                    changelog: str | None = None) -> dict:
    """metadata.json of a packaged model (see module docstring)."""
    meta = copy.deepcopy(dict(template))
    if version is not None and str(version) != meta.get("version"):
        if not changelog:
            raise BraTSInputError(f"version {version} needs a changelog entry (--changelog TEXT)", header=_HEADER)
        meta["version"] = str(version)
        meta["changelog"] = {str(version): str(changelog), **meta.get("changelog", {})}
    meta["monai_version"] = installed_version("monai")
    meta["pytorch_version"] = torch.__version__.split("+")[0]
    meta["numpy_version"] = np.__version__
    meta["required_packages_version"] = {d: installed_version(d) for d in REQUIRED_DISTRIBUTIONS.values()}
    fmt = meta["network_data_format"]
    shape = spatial_shape_of(plans)
    fmt["inputs"]["image"]["spatial_shape"] = shape
    pred = fmt["outputs"]["pred"]
    pred["spatial_shape"] = list(shape)
    pred["num_channels"] = int(out_channels)
    pred["channel_def"] = {k: v for k, v in pred["channel_def"].items() if int(k) < int(out_channels)}
    if int(out_channels) == NUM_REGIONS:  # a model without the uncertainty channel: inference reports var1shot
        fmt["post_processed_outputs"]["unc"]["channel_def"] = {
            "0": "var1shot = 4 p_WT (1 - p_WT) x cancer mask (this model has no uncertainty channel)"}
    metrics = eval_metrics_of(checkpoint)
    meta.pop("eval_metrics", None)
    meta.pop("eval_metrics_source", None)
    if metrics is not None:
        meta["eval_metrics"], meta["eval_metrics_source"] = metrics
    return meta


# ------------------------------------------------------------------------------------------------ code
def _module_path(dotted: str) -> Path | None:
    """The file of module ``custom.a.b`` (``custom/a/b.py`` or ``custom/a/b/__init__.py``), or None."""
    base = REPO_ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _custom_imports(path: Path) -> set[str]:
    """Every ``custom.*`` module a file imports (``from custom.a import b`` also names ``custom.a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "custom")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "custom":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def code_closure(config_files: Iterable, scripts: Iterable = ()) -> list[Path]:
    """The files of ``custom/`` the configs and scripts need: every module a config names (``_target_``, ``$``
    expressions, imports) or a script imports, what those import in turn, and the ``__init__.py`` of their
    packages. Sorted paths inside this repository."""
    wanted = set()
    for f in config_files:
        for ref in _CUSTOM_REF.findall(Path(f).read_text()):
            parts = ref.split(".")  # the longest prefix that is a module: the rest are attributes
            wanted.update(".".join(parts[:i]) for i in range(len(parts), 1, -1))
    for f in scripts:
        wanted |= _custom_imports(Path(f))
    todo, files = sorted(wanted), set()
    while todo:
        path = _module_path(todo.pop())
        if path is None or path in files:
            continue
        files.add(path)
        todo.extend(_custom_imports(path))
        parts = path.relative_to(REPO_ROOT).parts
        for i in range(1, len(parts)):
            init = REPO_ROOT.joinpath(*parts[:i], "__init__.py")
            if init not in files and init.is_file():
                todo.append(".".join(parts[:i]))
    return sorted(files)


# ------------------------------------------------------------------------------------------------ bundle
def doc_files(source: BundleDir) -> list[str]:
    """:data:`BUNDLE_DOCS` and the files of ``docs/`` the model card links to (relative links).

    Raises:
        BraTSInputError: a relative link that leaves ``docs/`` or names no file (the bundle ships docs/ alone).
    """
    names, problems = list(BUNDLE_DOCS), []
    for target in _MD_LINK.findall(source.readme.read_text()):
        if "://" in target:
            continue
        path = (source.docs / target).resolve()
        if path.parent != source.docs.resolve() or not path.is_file():
            problems.append(f"{source.readme}: link {target} leaves docs/ or names no file")
        elif path.name not in names:
            names.append(path.name)
    if problems:
        raise BraTSInputError(problems, header=_HEADER)
    return names


def large_files_yaml(bundle: BundleDir, url: str = "") -> str:
    """``large_files.yml`` in the model zoo's format (path, url, hash_val, hash_type) for the weights and the
    TorchScript. The zoo's CI downloads a listed file only when it is missing or its hash differs."""
    lines = ["# Files too large for a pull request to the model zoo. Upload them, then put each file's download",
             "# URL into 'url' (scripts/package_bundle.py --model_url BASE fills BASE/<file name>).", "large_files:"]
    for path in (bundle.weights, bundle.torchscript):
        rel = path.relative_to(bundle.path).as_posix()
        link = f"{url.rstrip('/')}/{path.name}" if url else ""
        lines += [f'- path: "{rel}"', f'  url: "{link}"', f'  hash_val: "{file_sha256(path)}"', '  hash_type: "sha256"']
    return "\n".join(lines) + "\n"


def package_bundle(checkpoint, out_dir, name: str = BUNDLE_NAME, work_dir=None, version: str | None = None,
                   changelog: str | None = None, model_url: str = "", source: BundleDir | None = None,
                   make_zip: bool = True, overwrite: bool = False) -> dict:
    """Write ``out_dir/<name>/`` and ``out_dir/<name>.zip`` (see module docstring). Returns a summary.

    The folder is assembled under a temporary name in ``out_dir`` and renamed at the end, so a failure leaves no
    partial bundle under ``<name>``.

    Raises:
        BraTSInputError: checkpoint or plan missing or unreadable, non-finite weights, an existing bundle
            without ``overwrite``, a package the metadata check rejects.
    """
    source = source or BundleDir(BUNDLE_ROOT)
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise BraTSInputError(f"bundle name {name!r}: use letters, digits and '_'", header=_HEADER)
    state = load_state_dict(checkpoint)  # the one loader: refuses non-finite weights, naming the file
    out_channels = checkpoint_out_channels(state)
    plans_path = resolve_plans_path(checkpoint, work_dir)
    plans = load_plans(plans_path)
    dest = BundleDir(out_dir / name)
    zip_path = out_dir / f"{name}.zip"
    if (dest.path.exists() or (make_zip and zip_path.exists())) and not overwrite:
        raise BraTSInputError(f"{dest.path}: exists (pass --overwrite true to replace it)", header=_HEADER)
    meta = bundle_metadata(json.loads(source.metadata.read_text()), plans, out_channels, checkpoint, version,
                           changelog)
    problems = metadata_problems(meta)
    if problems:
        raise BraTSInputError(problems, header=f"{_HEADER}: metadata.json would not pass MONAI's schema")

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = BundleDir(out_dir / f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp.path, ignore_errors=True)
    try:
        shutil.copytree(source.configs, tmp.configs, ignore=shutil.ignore_patterns("metadata.json", "__pycache__"))
        atomic_write_json(tmp.metadata, meta)
        tmp.models.mkdir()
        save_release_weights(checkpoint, tmp.weights)
        shutil.copyfile(plans_path, tmp.plans)
        export_torchscript(tmp.config("inference"), tmp.path, tmp.weights, tmp.torchscript, meta_file=tmp.metadata,
                           input_shape=[1, len(plans.modalities), *plans.patch_size], out_channels=out_channels)
        tmp.docs.mkdir()
        for doc in doc_files(source):
            shutil.copyfile(source.docs / doc, tmp.docs / doc)
        shutil.copyfile(REPO_ROOT / "LICENSE", tmp.license)
        scripts = [REPO_ROOT / "scripts" / s for s in BUNDLE_SCRIPTS]
        code = code_closure(sorted(tmp.configs.glob("*.json")), scripts)
        for f in code:
            target = tmp.path / f.relative_to(REPO_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        tmp.scripts.mkdir()
        for s in scripts:
            shutil.copyfile(s, tmp.scripts / s.name)
        atomic_write_bytes(tmp.large_files, large_files_yaml(tmp, model_url).encode())
        if dest.path.exists():
            shutil.rmtree(dest.path)
        os.replace(tmp.path, dest.path)
    finally:
        shutil.rmtree(tmp.path, ignore_errors=True)

    archive = None
    if make_zip:
        zip_path.unlink(missing_ok=True)
        archive = shutil.make_archive(str(out_dir / f".{name}.tmp-{os.getpid()}"), "zip", root_dir=out_dir,
                                      base_dir=name)
        os.replace(archive, zip_path)
        archive = str(zip_path)
    return {"bundle": str(dest.path), "zip": archive, "version": meta["version"], "out_channels": out_channels,
            "code_files": len(code), "eval_metrics": meta.get("eval_metrics"),
            "model_sha256": file_sha256(dest.weights), "torchscript_sha256": file_sha256(dest.torchscript)}
