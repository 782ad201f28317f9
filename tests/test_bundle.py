"""The bundle as users run it: metadata, `verify_net_in_out`, evaluate.json, multi-GPU (torchrun, gloo on CPU)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO_ROOT, run_cmd

from custom.core.layout import METRICS_CSV_COLUMNS

CONFIGS = REPO_ROOT / "bundle" / "configs"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_configs_are_json_and_layer_on_train():
    from monai.bundle import ConfigParser

    for name in ("train", "tiny", "baseline", "mcdropout", "multi_gpu_train", "evaluate", "metadata"):
        json.loads((CONFIGS / f"{name}.json").read_text())
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")])
    for entry in ("initialize", "run", "training", "finalize"):
        assert entry in parser.get(), f"train.json lacks '{entry}'"
    # the lead's variables, with their defaults
    assert parser["variant"] == "unc" and parser["num_epochs"] == 500 and parser["iterations_per_epoch"] == 250
    assert (parser["unc_weight"], parser["rmsd_weight_cancer"], parser["corr_weight"]) == (0.4, 0.5, 0.4)
    assert parser["ema_window"] == 30 and parser["target_transform"] == "none" and parser["mask_dilation"] == 3
    assert parser["resume"] is False
    parser["work_dir"] = "/W"
    assert parser.get_parsed_content("output_dir") == "/W/runs/unc/fold0"
    # augmentation list in NNUNET.md order, coordinates carried through every spatial transform
    names = [t["_target_"].rsplit(".", 1)[-1] for t in parser["train"]["preprocessing"]["transforms"]]
    assert names[:3] == ["LoadPreprocessedd", "AddCaseCoordinatesd", "ForegroundOversampledCropd"]
    assert names[4:] == ["RandRotated", "RandZoomd", "RandGaussianNoised", "RandGaussianSmoothd",
                         "RandScaleIntensityd", "RandScaleIntensityFixedMeand", "RandSimulateLowResolutiond",
                         "RandAdjustContrastd", "RandAdjustContrastd", "RandFlipd", "RandFlipd", "RandFlipd",
                         "CastToTyped", "LabelToRegionsd", "SelectItemsd"]  # coordinates to the store as int16
    # label and coordinates on the image's sampling grid: nearest for grid-sample, nearest-exact for resize
    nearest = {"RandRotated": ["nearest", "nearest"], "RandZoomd": ["nearest-exact", "nearest-exact"]}
    for t in parser["train"]["preprocessing"]["transforms"]:
        if t["_target_"] in nearest:
            assert t["keys"] == ["image", "label", "coords"] and t["mode"][1:] == nearest[t["_target_"]]
    assert parser["validate"]["inferer"]["overlap"] == 0.5 and parser["validate"]["inferer"]["mode"] == "gaussian"


def test_metadata_complete():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "name", "task", "description", "authors", "copyright",
                "data_source", "data_type", "image_classes", "label_classes", "pred_classes", "eval_metrics",
                "intended_use", "references", "network_data_format"):
        assert meta.get(key), f"metadata.json: '{key}' missing or empty"
    assert meta["version"] in meta["changelog"]
    refs = " ".join(meta["references"])
    assert "Uncertainty-Aware nnU-Net" in refs and "nnU-Net" in refs and "BraTS" in refs and "2023" in refs
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 4 and list(image["channel_def"].values()) == ["t1c", "t1n", "t2f", "t2w"]
    assert pred["num_channels"] == 4 and len(pred["channel_def"]) == 4
    assert [v.split()[0] for v in pred["channel_def"].values()] == ["p_WT", "p_TC", "p_ET", "unc_output"]
    assert meta["label_names"] == {"background": 0, "NCR": 1, "ED": 2, "ET": 3}


def test_verify_net_in_out(prepared_work_dir):
    proc = run_cmd([PYTHON, "-m", "monai.bundle", "verify_net_in_out", "network_def",
                    "--meta_file", "bundle/configs/metadata.json", "--config_file", "bundle/configs/train.json",
                    "--work_dir", prepared_work_dir, "--device", "cpu"], env=ENV, timeout=600)
    assert "verified with no error" in proc.stdout + proc.stderr


def test_evaluate_config_writes_per_case_metrics(tiny_training_run, prepared_work_dir):
    from custom.training.setup import load_fold_data
    from custom.uncertainty.store import ErrorMapStore

    out = tiny_training_run
    _, val = load_fold_data(prepared_work_dir / "datalist.json", 0)
    store = ErrorMapStore(out / "store")
    before = {x["case_id"]: store.full(x["case_id"])["count"].copy() for x in val}
    store.close()
    run_cmd([PYTHON, "-m", "monai.bundle", "run", "evaluating", "--bundle_root", "bundle", "--config_file",
             "['bundle/configs/train.json','bundle/configs/evaluate.json']", "--work_dir", prepared_work_dir,
             "--fold", 0], env=ENV, timeout=600)
    with open(out / "eval" / "per_case_metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["case_id"] for r in rows) == sorted(x["case_id"] for x in val)
    for r in rows:
        assert 0.0 <= float(r["dice_wt"]) <= 1.0 and 0.0 <= float(r["dice_mean"]) <= 1.0
        assert r["rmsd_unc"] != "" and r["corr_var1shot"] != ""
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == len(val)
    assert summary["val_dice_wt"] == pytest.approx(np.mean([float(r["dice_wt"]) for r in rows]))
    store = ErrorMapStore(out / "store")
    for cid, count in before.items():  # evaluation reads the training store, never updates it
        np.testing.assert_array_equal(store.full(cid)["count"], count)


def test_config_paths_agree_with_the_layout(tmp_path):
    """The configs spell the run folder's names as data; they must be custom.core.layout's names."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    from custom.core.layout import WorkDir

    work = WorkDir(tmp_path)
    run = work.run("baseline", 3)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")])
    parser.update({"work_dir": str(tmp_path), "fold": 3, "variant": "baseline"})
    assert Path(parser.get_parsed_content("output_dir")) == run.path
    assert Path(parser.get_parsed_content("datalist")) == work.datalist
    assert Path(parser.get_parsed_content("plans_path")) == work.plans
    assert Path(parser.get_parsed_content("tb_writer#log_dir", instantiate=False)) == run.tensorboard
    handlers = parser["train"]["core_handlers"]
    i = next(i for i, h in enumerate(handlers) if h["_target_"].endswith("MetricsCSVHandler"))
    assert Path(parser.get_parsed_content(f"train#core_handlers#{i}#path")) == run.metrics_csv
    assert f"@output_dir + '/{run.store.name}'" in parser["store"]
    assert any(f"@output_dir + '/{run.train_config.name}'" in x for x in parser["initialize"])
    evaluate = ConfigParser()
    evaluate.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    evaluate.update({"work_dir": str(tmp_path), "fold": 3, "variant": "baseline"})
    assert Path(evaluate.get_parsed_content("checkpoint")) == run.best_model
    assert f"@output_dir + '/{run.store.name}'" in evaluate["store"]


def test_checkpoint_loading_errors_name_the_file(prepared_work_dir, tmp_path):
    from custom.core.errors import BraTSInputError
    from custom.model.checkpoints import load_weights
    from custom.model.networks import build_network

    net = build_network(prepared_work_dir / "plans.json")
    with pytest.raises(BraTSInputError, match=r"model\.pt: checkpoint file not found"):
        load_weights(net, tmp_path / "model.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BraTSInputError, match=r"junk\.pt: not a readable PyTorch checkpoint"):
        load_weights(net, tmp_path / "junk.pt")
    baseline = build_network(prepared_work_dir / "plans.json", with_uncertainty=False)
    torch.save({"model": baseline.state_dict()}, tmp_path / "baseline.pt")
    with pytest.raises(BraTSInputError, match=r"baseline\.pt: weights do not fit"):
        load_weights(net, tmp_path / "baseline.pt")
    torch.save({"model": net.state_dict()}, tmp_path / "ok.pt")
    assert load_weights(build_network(prepared_work_dir / "plans.json"), tmp_path / "ok.pt") is not None
    # the training state checkpoint_last.pt holds the weights under "network": the same loader reads them
    torch.save({"network": net.state_dict(), "epoch": 1}, tmp_path / "checkpoint_last.pt")
    assert load_weights(build_network(prepared_work_dir / "plans.json"), tmp_path / "checkpoint_last.pt") is not None


def test_multi_gpu_config_with_torchrun_gloo_on_cpu(prepared_work_dir, tmp_path):
    """The multi-GPU config as users launch it (torchrun), with 2 CPU processes and the gloo backend."""
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous (others may run tests in parallel)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_cmd([torchrun, "--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", port,
             "-m", "monai.bundle", "run", "training", "--bundle_root", "bundle", "--config_file",
             "['bundle/configs/train.json','bundle/configs/multi_gpu_train.json','bundle/configs/tiny.json']",
             "--work_dir", prepared_work_dir, "--fold", 0, "--dist_backend", "gloo", "--num_epochs", 1,
             "--iterations_per_epoch", 3, "--output_dir", out, "--progress_bar", "false"], env=ENV, timeout=600)
    assert (out / "FINISHED").exists()
    ckpt = torch.load(str(out / "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["network"]), "DDP wrapper must not leak into checkpoints"
    assert ckpt["trainer"]["iteration"] == 3
    with open(out / "metrics.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert all(row[c] != "" for c in METRICS_CSV_COLUMNS)
    # only rank 0 writes: one TensorBoard event file, one config, one store
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["dist_backend"] == "gloo"
