"""The checks the MONAI model zoo runs on a submitted bundle (``ci/verify_bundle.py`` and its unit tests), with
MONAI's own functions and their default arguments, on the bundle in the current directory.

    cd BUNDLE && python zoo_checks.py WORK_DIR CASES_DIR OUT_JSON

Run by ``tests/test_package.py`` with an interpreter that has only the packages metadata.json lists and cannot
import this repository (``python -S``, a site-packages folder of those packages); like the zoo's
``verify_bundle.py`` it puts the bundle folder first on ``sys.path``. Each check is what the zoo does:

1. directory: ``configs/metadata.json``, ``LICENSE``, ``models/model.pt``, ``configs/inference.json``; every file in
   ``large_files.yml`` present with its hash (the zoo's download step skips such a file);
2. version and changelog;
3. ``verify_net_in_out("network_def", ...)`` with ``n=1``;
4. ``ckpt_export("network_def", ckpt_file=models/model.pt, ...)`` with default ``key_in_ckpt`` (a plain state dict),
   then ``torch.jit.load`` of the result and of ``models/model.ts`` (the TorchScript round trip), compared with
   the network built from the config;
5. ``create_workflow(...).check_properties()`` for ``inference.json`` (``dataset_dir`` = CASES_DIR) and for
   ``train.json`` + ``tiny.json`` (``work_dir`` = WORK_DIR), after ``initialize()``, as the zoo's unit tests do;
6. ``ckpt_export("network_export", ...)`` with defaults: the documented export of the served module.

The metadata schema itself cannot be downloaded here (``tests/test_package.py`` checks its required fields).
Writes what it found to OUT_JSON; raises on the first failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings

import torch
from monai.bundle import ConfigParser, ckpt_export, create_workflow, verify_net_in_out
from monai.bundle.scripts import _get_fake_spatial_shape  # the shape verify_net_in_out feeds (n=1)
from monai.data import load_net_with_metadata


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def large_files(path: str) -> list[dict]:
    """Entries of large_files.yml (the zoo's format, parsed without a YAML package)."""
    entries, current = [], None
    for line in open(path).read().splitlines():
        stripped = line.strip()
        if stripped.startswith("- path:"):
            current = {"path": stripped.split(":", 1)[1].strip().strip('"')}
            entries.append(current)
        elif current is not None and ":" in stripped and not stripped.startswith("#"):
            key, value = stripped.split(":", 1)
            current[key.strip()] = value.strip().strip('"')
    return entries


def network(parser_overrides: dict, net_id: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config("configs/inference.json")
    parser.read_meta("configs/metadata.json")
    parser.update(parser_overrides)
    return parser.get_parsed_content(net_id)


def main(work_dir: str, cases_dir: str, out_json: str) -> None:
    warnings.simplefilter("ignore")
    sys.path[0] = os.getcwd()  # verify_bundle.py: "add bundle path to ensure custom code can be used"
    found: dict = {"cwd": os.getcwd(), "custom_from": None}
    import custom  # the bundle's own code, from the current directory (bundle root)

    found["custom_from"] = os.path.dirname(os.path.abspath(custom.__file__))
    bundle = os.getcwd()

    # 1. directory (verify_bundle_directory) and large files (download_large_files skips a present, hashed file)
    for f in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        if not os.path.isfile(f):
            raise ValueError(f"necessary file {f} is not existing.")
    for entry in large_files("large_files.yml"):
        if sha256(entry["path"]) != entry["hash_val"] or entry["hash_type"] != "sha256":
            raise ValueError(f"large_files.yml: {entry['path']} does not match its hash")
    found["large_files"] = [e["path"] for e in large_files("large_files.yml")]

    # 2. version and changelog (verify_version_changes)
    meta = json.load(open("configs/metadata.json"))
    if meta["version"] not in meta["changelog"]:
        raise ValueError("version missing in changelog")

    # 3. verify_net_in_out with the zoo's arguments (n=1, the config's defaults)
    verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json",
                      bundle_root=bundle)
    found["verify_net_in_out"] = True

    # 4. ckpt_export of network_def with default arguments, TorchScript round trip
    tmp = tempfile.mkdtemp(prefix="zoo_checks-")
    verify_ts = os.path.join(tmp, "verify_model.ts")
    ckpt_export(net_id="network_def", filepath=verify_ts, ckpt_file="models/model.pt",
                meta_file="configs/metadata.json", config_file="configs/inference.json", bundle_root=bundle)
    net = network({"bundle_root": bundle}, "network_def")
    net.load_state_dict(torch.load("models/model.pt", weights_only=True))
    net.eval()
    image = meta["network_data_format"]["inputs"]["image"]
    x = torch.randn(1, image["num_channels"], *_get_fake_spatial_shape(image["spatial_shape"], n=1))
    exported = torch.jit.load(verify_ts).eval()
    shipped = torch.jit.load("models/model.ts").eval()
    with torch.no_grad():
        logits = net(x)
        found["network_def_vs_ckpt_export"] = float((exported(x) - logits).abs().max())
        found["model_ts_vs_sigmoid_network_def"] = float((shipped(x) - torch.sigmoid(logits)).abs().max())
    _, ts_meta, _ = load_net_with_metadata("models/model.ts")
    found["model_ts_pred"] = ts_meta["network_data_format"]["outputs"]["pred"]

    # 6. the documented export of the served module: ckpt_export network_export with default arguments
    export_ts = os.path.join(tmp, "network_export.ts")
    ckpt_export(net_id="network_export", filepath=export_ts, ckpt_file="models/model.pt",
                meta_file="configs/metadata.json", config_file="configs/inference.json", bundle_root=bundle)
    with torch.no_grad():
        found["network_export_vs_model_ts"] = float((torch.jit.load(export_ts).eval()(x) - shipped(x)).abs().max())

    # 5. properties, after initialize(), as the zoo's unit tests do
    infer = create_workflow(workflow_type="inference", config_file="configs/inference.json", bundle_root=bundle,
                            meta_file="configs/metadata.json", logging_file="configs/logging.conf",
                            dataset_dir=cases_dir, output_dir=os.path.join(tmp, "pred"))
    found["inference_check_properties"] = infer.check_properties()
    found["inference_dataset_size"] = len(infer.dataset)
    infer.finalize()
    train = create_workflow(workflow_type="train", config_file=["configs/train.json", "configs/tiny.json"],
                            bundle_root=bundle, meta_file="configs/metadata.json",
                            logging_file="configs/logging.conf", work_dir=work_dir,
                            output_dir=os.path.join(tmp, "train"))
    found["train_check_properties"] = train.check_properties()
    found["train_dataset_dir"] = train.dataset_dir
    train.finalize()
    for key in ("inference_check_properties", "train_check_properties"):
        if found[key]:
            raise ValueError(f"{key}: missing or wrong properties {found[key]}")
    json.dump(found, open(out_json, "w"), indent=2)
    print("zoo_checks: passed")


if __name__ == "__main__":
    main(*sys.argv[1:4])
