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
    from custom.deploy.package import metadata_problems

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert metadata_problems(meta) == []
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "name", "task", "description", "authors", "copyright",
                "data_source", "data_type", "image_classes", "label_classes", "pred_classes",
                "intended_use", "references", "network_data_format"):
        assert meta.get(key), f"metadata.json: '{key}' missing or empty"
    assert meta["version"] in meta["changelog"]
    # no figures of a model this repository does not ship: a packaged bundle gets its own model's (test_package)
    assert "eval_metrics" not in meta
    refs = " ".join(meta["references"])
    assert "Uncertainty-Aware nnU-Net" in refs and "nnU-Net" in refs and "BraTS" in refs and "2023" in refs
    fmt = meta["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["num_channels"] == 4 and list(image["channel_def"].values()) == ["t1c", "t1n", "t2f", "t2w"]
    # outputs.pred is network_def's raw output (what verify_net_in_out and ckpt_export check): 4 logit channels
    assert pred["num_channels"] == 4 and pred["format"] == "logits" and pred["value_range"] == []
    assert [v.split()[0] for v in pred["channel_def"].values()] == ["WT", "TC", "ET", "unc_output"]
    # the label map (what generic tools such as MONAI Label show) is a post-processed output
    labels = fmt["post_processed_outputs"]["pred"]
    assert labels["channel_def"] == {"0": "background", "1": "NCR", "2": "ED", "3": "ET"}
    assert labels["num_channels"] == 1 and labels["dtype"] == "uint8" and labels["value_range"] == [0, 3]
    assert fmt["post_processed_outputs"]["unc"]["value_range"] == [0, 1]
    assert meta["label_names"] == {"background": 0, "NCR": 1, "ED": 2, "ET": 3}


def test_bundle_properties_of_train_and_inference(prepared_work_dir, tmp_path):
    """MONAI's `create_workflow(...).check_properties()` (what the model zoo checks) passes for train.json and
    inference.json; `dataset_dir` is the data each reads, `train#inferer` the trainer's."""
    from monai.bundle import create_workflow

    common = dict(meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
                  bundle_root="bundle")
    for extra in ([], ["baseline.json"]):
        train = create_workflow(workflow_type="train", config_file=[str(CONFIGS / c) for c in
                                                                   ["train.json", *extra, "tiny.json"]],
                                work_dir=str(prepared_work_dir), output_dir=str(tmp_path / "out"), **common)
        assert train.check_properties() == []
        # train.json reads the prepared work directory; its dataset_dir is the data set it was prepared from
        datalist = json.loads((prepared_work_dir / "datalist.json").read_text())
        assert train.dataset_dir == datalist["dataset_dir"]
        assert type(train.train_inferer).__name__ == "SimpleInferer"
        assert train.parser["train"]["trainer"]["inferer"].replace("::", "#") == "@train#inferer"
        names = [type(h).__name__ for h in train.train_handlers]
        assert ("ErrorMapHandler" in names) == (not extra), names  # baseline.json: no error-map handlers
        train.finalize()
    infer = create_workflow(workflow_type="inference", config_file=str(CONFIGS / "inference.json"),
                            dataset_dir=str(datalist["dataset_dir"]), output_dir=str(tmp_path / "pred"),
                            checkpoint=str(_fresh_checkpoint(prepared_work_dir, tmp_path)), **common)
    assert infer.check_properties() == []
    assert len(infer.dataset) == len(datalist["training"])
    # one execution path: `run` runs the evaluator, nothing else
    assert infer.parser["run"] == ["$@evaluator.run()"]
    assert type(infer.evaluator).__name__ == "CaseFolderEvaluator"


def _fresh_checkpoint(work_dir, root):
    from custom.model.networks import build_network

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save({"model": build_network(work_dir / "plans.json").state_dict()}, root / "model.pt")
    shutil.copyfile(work_dir / "plans.json", root / "plans.json")
    return root / "model.pt"


def test_run_ids_are_one_list(prepared_work_dir):
    """`run training` / `run evaluating` and MONAI's default `run` are the same expressions, not two copies."""
    from monai.bundle import ConfigParser

    for files, alias in ((["train.json"], "training"), (["train.json", "evaluate.json"], "evaluating"),
                         (["train.json", "multi_gpu_train.json"], "training")):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        assert parser[alias] == "@run", (files, alias)
        assert isinstance(parser["run"], list) and parser["run"]


def test_dataset_dir_other_than_the_prepared_one_is_refused(prepared_work_dir, tmp_path):
    from custom.core.errors import BraTSInputError
    from custom.training.setup import check_dataset_dir, prepared_from

    datalist = prepared_work_dir / "datalist.json"
    check_dataset_dir(datalist, prepared_from(datalist))  # the default: what the work dir was prepared from
    with pytest.raises(BraTSInputError, match="prepared from .* not from dataset_dir") as e:
        check_dataset_dir(datalist, tmp_path)
    assert "scripts/prepare_data.py --dataset_dir" in str(e.value)


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
    handlers = parser["train"]["handlers"]
    i = next(i for i, h in enumerate(handlers) if h["_target_"].endswith("MetricsCSVHandler"))
    assert Path(parser.get_parsed_content(f"train#handlers#{i}#path")) == run.metrics_csv
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
