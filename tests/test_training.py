"""Training as a MONAI bundle on Ignite (issue 4): real `python -m monai.bundle run` subprocesses on synthetic data.

Sizes are tiny (64x64x48 cases, patch 32, filters [8,16,32,64]); nothing asserts wall-clock times.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO_ROOT, run_cmd

from custom.core.errors import BraTSInputError
from custom.core.layout import METRICS_CSV_COLUMNS
from custom.training.batch import UncertaintyPrepareBatch
from custom.training.sampling import PatchDataset
from custom.training.setup import load_fold_data

CONFIGS = "bundle/configs"
TINY = f"['{CONFIGS}/train.json','{CONFIGS}/tiny.json']"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def bundle_cmd(config_files: str, work_dir, *extra, run_id: str = "training"):
    return [PYTHON, "-m", "monai.bundle", "run", run_id, "--bundle_root", "bundle", "--config_file", config_files,
            "--work_dir", str(work_dir), "--fold", 0, *extra]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load_ckpt(path: Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------- unit level
class TestPatchDataset:
    def test_forced_foreground_positions_and_seeding(self):
        items = [{"case_id": f"c{i}"} for i in range(4)]
        ds = PatchDataset(items, None, batch_size=3, iterations_per_epoch=20, fg_fraction=0.33, seed=7)
        assert len(ds) == 60
        # round(3 * 0.33) = 1: only the last position of every batch is forced
        assert [ds[i]["force_fg"] for i in range(6)] == [False, False, True, False, False, True]
        first = [ds[i]["case_id"] for i in range(60)]
        assert first == [ds[i]["case_id"] for i in range(60)], "same epoch must give the same draws"
        assert set(first) == {"c0", "c1", "c2", "c3"}, "random case per sample over all cases"
        ds.set_epoch(2)
        assert [ds[i]["case_id"] for i in range(60)] != first, "a new epoch draws new cases"
        other_rank = PatchDataset(items, None, batch_size=3, iterations_per_epoch=20, seed=7, rank=1)
        assert [other_rank[i]["case_id"] for i in range(60)] != first
        half = PatchDataset(items, None, batch_size=2, iterations_per_epoch=1, fg_fraction=0.5)
        assert [half[i]["force_fg"] for i in range(2)] == [False, True]

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="at least one training case"):
            PatchDataset([], None, 2, 1)
        with pytest.raises(ValueError, match="batch_size"):
            PatchDataset([{}], None, 0, 1)
        with pytest.raises(ValueError, match="iterations_per_epoch"):
            PatchDataset([{}], None, 2, 0)
        with pytest.raises(ValueError, match="fg_fraction"):
            PatchDataset([{}], None, 2, 1, fg_fraction=1.5)
        with pytest.raises(IndexError):
            PatchDataset([{}], None, 2, 1)[2]


def test_prepare_batch_layout():
    batch = {"image": torch.rand(2, 4, 8, 8, 8), "label": torch.zeros(2, 3, 8, 8, 8),
             "coords": torch.ones(2, 3, 8, 8, 8), "case_id": ["a", "b"]}
    image, targets = UncertaintyPrepareBatch()(batch, device="cpu")
    assert image.shape == (2, 4, 8, 8, 8)
    assert set(targets) == {"label", "coords", "case_id", "error_stable"}
    assert targets["case_id"] == ["a", "b"] and targets["error_stable"] is None
    image, label = UncertaintyPrepareBatch(with_uncertainty=False)(batch, device="cpu")
    assert torch.is_tensor(label) and label.shape == (2, 3, 8, 8, 8)
    with pytest.raises(KeyError, match="coords"):
        UncertaintyPrepareBatch()({"image": batch["image"], "label": batch["label"]})


def test_fold_data_needs_preprocessing(prepared_work_dir, tmp_path):
    train, val = load_fold_data(prepared_work_dir / "datalist.json", 0)
    assert train and val and not {x["case_id"] for x in train} & {x["case_id"] for x in val}
    assert all(Path(x["pp_image"]).is_file() for x in train + val)
    with pytest.raises(BraTSInputError, match="fold 5"):
        load_fold_data(prepared_work_dir / "datalist.json", 5)
    datalist = json.loads((prepared_work_dir / "datalist.json").read_text())
    for entry in datalist["training"]:
        entry.pop("pp_image")
    bad = tmp_path / "datalist.json"
    bad.write_text(json.dumps(datalist))
    with pytest.raises(BraTSInputError, match=r"datalist\.json.*pp_image"):
        load_fold_data(bad, 0)


def test_training_on_unprepared_work_dir_fails_clearly(tmp_path):
    proc = run_cmd(bundle_cmd(TINY, tmp_path / "nowhere"), check=False, env=ENV, timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    # the named error alone (custom.core.errors.report_input_errors), no traceback
    assert "is not prepared for training" in text and "Traceback" not in text
    assert f"{tmp_path / 'nowhere' / 'plans.json'}: not found" in text and "scripts/prepare_data.py" in text
    assert not (tmp_path / "nowhere").exists(), "no partial output for a failed start"


# ----------------------------------------------------------------------------------------- full run
def test_tiny_run_outputs(tiny_training_run, prepared_work_dir):
    out = tiny_training_run
    for name in ("model.pt", "model_final.pt", "checkpoint_last.pt", "plans.json", "train_config.json",
                 "metrics.csv", "FINISHED"):
        assert (out / name).is_file(), f"missing {name} in {out}"
    assert json.loads((out / "plans.json").read_text()) == json.loads((prepared_work_dir / "plans.json").read_text())

    ckpt = load_ckpt(out / "checkpoint_last.pt")
    assert {"network", "optimizer", "lr_scheduler", "trainer", "pseudo_dice"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["trainer"]["iteration"] == 16
    assert ckpt["lr_scheduler"]["last_epoch"] == 2
    best = load_ckpt(out / "model.pt")
    assert set(best) >= {"model"} and set(best["model"]) == set(ckpt["network"])
    from custom.model.networks import build_network

    net = build_network(prepared_work_dir / "plans.json")
    net.load_state_dict(load_ckpt(out / "model_final.pt")["model"])  # weights fit the plan's network
    assert net(torch.zeros(1, 4, 32, 32, 32)).shape[1] == 4

    # metrics.csv: exactly the contract's columns, one row per epoch, validation every epoch (tiny)
    rows = read_csv(out / "metrics.csv")
    with open(out / "metrics.csv") as fh:
        assert fh.readline().strip().split(",") == list(METRICS_CSV_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        for col in METRICS_CSV_COLUMNS:
            assert r[col] != "", f"epoch {r['epoch']}: column {col} is empty"
        assert np.isfinite(float(r["train_loss"])) and 0 <= float(r["val_dice_mean"]) <= 1
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]) == pytest.approx(0.01), "poly LR steps per epoch"

    # EMA store: every case of the fold, train cases and val cases visited
    index = json.loads((out / "store" / "index.json").read_text())
    train, val = load_fold_data(prepared_work_dir / "datalist.json", 0)
    assert set(index["cases"]) == {x["case_id"] for x in train + val}
    from custom.uncertainty.store import ErrorMapStore

    store = ErrorMapStore(out / "store")
    visited = {cid: int(store.full(cid)["count"].max()) for cid in index["cases"]}
    for x in val:  # one full-volume visit per validation round
        assert visited[x["case_id"]] == 2
    assert sum(visited[x["case_id"]] > 0 for x in train) >= 1
    snap_meta = json.loads((out / "store_snapshot" / "epoch.json").read_text())
    assert snap_meta["epoch"] == 2 and snap_meta == ckpt["store_snapshot"], "the checkpoint names its snapshot"
    assert not (out / ".store_snapshot.pending").exists() and not (out / ".store_snapshot.previous").exists()
    from custom.core.atomic import verify_checksum

    for name in ("checkpoint_last.pt", "model.pt", "model_final.pt"):  # sha256sum -c format beside each
        assert verify_checksum(out / name)
        digest, fname = (out / f"{name}.sha256").read_text().split()
        assert fname == name and len(digest) == 64
    snap = ErrorMapStore(out / "store_snapshot")
    for cid in index["cases"]:
        np.testing.assert_array_equal(snap.full(cid)["error"], store.full(cid)["error"])

    # TensorBoard events with training and validation scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    tags = set()
    for ev in events:
        acc = EventAccumulator(str(ev))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train_loss", "val_dice_mean", "val_corr_unc", "ema_pseudo_dice"} <= tags, tags
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["fold"] == 0 and cfg["variant"] == "unc" and cfg["num_epochs"] == 2


def _stream(proc, lines):
    for line in proc.stdout:
        lines.append(line)


def test_sigkill_mid_epoch_then_resume(prepared_work_dir, tmp_path):
    out = tmp_path / "run"
    args = bundle_cmd(TINY, prepared_work_dir, "--output_dir", out, "--num_epochs", 3, "--progress_bar", "false")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **ENV)
    proc = subprocess.Popen([str(a) for a in args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=_stream, args=(proc, lines), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    try:
        # kill inside epoch 2, after its third iteration (checkpoint of epoch 1 exists)
        while not any("Epoch: 2/3, Iter: 3/8" in line for line in list(lines)):
            assert proc.poll() is None, "training ended before it could be killed:\n" + "".join(lines[-60:])
            assert time.monotonic() < deadline, "no progress:\n" + "".join(lines[-60:])
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        reader.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "FINISHED").exists()
    ckpt = load_ckpt(out / "checkpoint_last.pt")  # complete, loadable file
    assert ckpt["epoch"] == 1 and ckpt["trainer"]["iteration"] == 8
    assert [int(r["epoch"]) for r in read_csv(out / "metrics.csv")] == [1]
    assert not list(out.glob(".*.tmp-*")), "temporary files left behind"

    run_cmd(bundle_cmd(TINY, prepared_work_dir, "--output_dir", out, "--num_epochs", 3, "--resume", "true",
                       "--progress_bar", "false"), env=ENV, timeout=600)
    assert (out / "FINISHED").exists()
    ckpt = load_ckpt(out / "checkpoint_last.pt")
    assert ckpt["epoch"] == 3 and ckpt["trainer"]["iteration"] == 24
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # the LR schedule continued from the checkpoint: lr of epoch k is 0.01 * (1 - (k-1)/3) ** 0.9
    for r in rows:
        k = int(r["epoch"])
        assert float(r["lr"]) == pytest.approx(0.01 * (1 - (k - 1) / 3) ** 0.9, rel=1e-6)
    # the store continued: validation cases were visited once per validation round, 3 rounds in all
    from custom.uncertainty.store import ErrorMapStore

    _, val = load_fold_data(prepared_work_dir / "datalist.json", 0)
    store = ErrorMapStore(out / "store")
    assert all(int(store.full(x["case_id"])["count"].max()) == 3 for x in val)
    # and it continued exactly: the same losses as a run that was never interrupted
    ref = tmp_path / "reference"
    run_cmd(bundle_cmd(TINY, prepared_work_dir, "--output_dir", ref, "--num_epochs", 3, "--progress_bar", "false"),
            env=ENV, timeout=600)
    ref_rows = read_csv(ref / "metrics.csv")
    for col in ("train_loss", "val_dice_mean", "val_corr_unc"):
        assert [float(r[col]) for r in rows] == pytest.approx([float(r[col]) for r in ref_rows], rel=1e-4, abs=1e-6)


def _first_epoch_losses(work_dir, output_dir, num_workers: int, overrides=None) -> list[float]:
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    parser = ConfigParser()
    parser.read_config([f"{REPO_ROOT}/{CONFIGS}/train.json", f"{REPO_ROOT}/{CONFIGS}/tiny.json"])
    parser.update({"work_dir": str(work_dir), "output_dir": str(output_dir), "num_epochs": 1,
                   "iterations_per_epoch": 3, "val_interval": 100, "num_workers": num_workers,
                   "progress_bar": False, **(overrides or {})})
    losses: list[float] = []
    try:
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("trainer")
        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].detach().item()))
        trainer.run()
        parser.get_parsed_content("finalize")
    finally:
        set_determinism(seed=None)
    return losses


def test_same_seed_same_first_epoch_losses(prepared_work_dir, tmp_path):
    torch.set_num_threads(1)
    a = _first_epoch_losses(prepared_work_dir, tmp_path / "a", num_workers=0)
    b = _first_epoch_losses(prepared_work_dir, tmp_path / "b", num_workers=2)
    assert len(a) == 3 and all(np.isfinite(a))
    # per-sample seeding: the patch stream does not depend on the number of loader workers
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_device_store_trains_like_the_cpu_store(prepared_work_dir, tmp_path):
    """store_device's torch path (here on CPU tensors, resident and streamed) inside the real training loop gives
    exactly the CPU store's losses: the same targets, bit for bit."""
    torch.set_num_threads(1)
    reference = _first_epoch_losses(prepared_work_dir, tmp_path / "cpu", num_workers=0)
    for mode in ("resident", "streamed"):
        store = ("$custom.uncertainty.store_device.DeviceErrorMapStore(custom.training.setup.create_error_map_store("
                 "@output_dir + '/store', @train_items + @val_items, @ema_window, reset=True), 'cpu', "
                 f"mode='{mode}')")
        losses = _first_epoch_losses(prepared_work_dir, tmp_path / mode, num_workers=0, overrides={"store": store})
        assert losses == reference, mode


def test_baseline_variant(prepared_work_dir):
    run_cmd(bundle_cmd(f"['{CONFIGS}/train.json','{CONFIGS}/baseline.json','{CONFIGS}/tiny.json']",
                       prepared_work_dir, "--num_epochs", 1, "--iterations_per_epoch", 4, "--progress_bar", "false"),
            env=ENV, timeout=600)
    out = prepared_work_dir / "runs" / "baseline" / "fold0"
    assert (out / "FINISHED").exists() and not (out / "store").exists() and not (out / "store_snapshot").exists()
    weights = load_ckpt(out / "model.pt")["model"]
    out_weights = [v for k, v in weights.items() if k.startswith("output_block") and k.endswith("weight")]
    assert out_weights and out_weights[0].shape[0] == 3, "baseline has 3 output channels"
    (row,) = read_csv(out / "metrics.csv")
    assert row["val_dice_wt"] != "" and row["ema_pseudo_dice"] != ""
    assert all(row[c] == "" for c in METRICS_CSV_COLUMNS if "rmsd" in c or "corr" in c)
    # evaluate.json layered on the baseline: Dice only, per case
    run_cmd(bundle_cmd(f"['{CONFIGS}/train.json','{CONFIGS}/baseline.json','{CONFIGS}/evaluate.json']",
                       prepared_work_dir, run_id="evaluating"), env=ENV, timeout=600)
    per_case = read_csv(out / "eval" / "per_case_metrics.csv")
    _, val = load_fold_data(prepared_work_dir / "datalist.json", 0)
    assert sorted(r["case_id"] for r in per_case) == sorted(x["case_id"] for x in val)
    assert list(per_case[0]) == ["case_id", "dice_wt", "dice_tc", "dice_et", "dice_mean"]


def test_mcdropout_variant_builds_dropout_network(prepared_work_dir):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([f"{REPO_ROOT}/{CONFIGS}/train.json", f"{REPO_ROOT}/{CONFIGS}/mcdropout.json"])
    parser["work_dir"] = str(prepared_work_dir)
    assert parser.get_parsed_content("variant") == "mcdropout"
    assert parser.get_parsed_content("output_dir").endswith("runs/mcdropout/fold0")
    net = parser.get_parsed_content("network_def")
    drops = [m for m in net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    assert drops and all(m.p == pytest.approx(0.1) for m in drops)
    assert parser.get_parsed_content("loss").__class__.__name__ == "CompositeUncertaintyLoss"


# ----------------------------------------------------------------------------------------- handlers in isolation
def _engine(output=None, epoch=1, metrics=None):
    from types import SimpleNamespace

    return SimpleNamespace(state=SimpleNamespace(output=output, epoch=epoch, metrics=metrics or {}, iteration=1))


def test_error_map_handler_sets_ema_target_in_place(tmp_path):
    from monai.utils import CommonKeys as Keys

    from custom.training.handlers.error_maps import ErrorMapHandler
    from custom.transforms.array import make_case_coordinates
    from custom.uncertainty.store import ErrorMapStore
    from custom.uncertainty.targets import smooth_failure

    store = ErrorMapStore(tmp_path / "store", ema_window=30).create({"c": (8, 8, 8)})
    coords = torch.from_numpy(make_case_coordinates((8, 8, 8)))[None]
    label = torch.zeros(1, 3, 8, 8, 8)
    label[:, 0, 2:6, 2:6, 2:6] = 1
    wrong = torch.full((1, 4, 8, 8, 8), 5.0)  # p_WT ~ 1 everywhere: false positives outside the tumour
    targets = {"label": label, "coords": coords, "case_id": ["c"], "error_stable": None}
    handler = ErrorMapHandler(store)
    handler(_engine({Keys.LABEL: targets, Keys.PRED: wrong}))
    f_s = smooth_failure((label[:, 0:1] < 0.5).float())
    assert targets["error_stable"].shape == (1, 1, 8, 8, 8)
    torch.testing.assert_close(targets["error_stable"], f_s)  # first visit: e = f_s
    right = torch.where(label[:, 0:1] > 0, 5.0, -5.0).repeat(1, 4, 1, 1, 1)
    targets = {"label": label, "coords": coords, "case_id": ["c"], "error_stable": None}
    handler(_engine({Keys.LABEL: targets, Keys.PRED: right}))
    torch.testing.assert_close(targets["error_stable"], f_s / 2)  # running mean of f_s and 0
    assert float(targets["variance_stable"].max()) > 0
    np.save(tmp_path / "c_seg.npy", label[0, 0:1].numpy().astype(np.uint8))
    paper = ErrorMapHandler(store, target_transform="paper", case_labels={"c": str(tmp_path / "c_seg.npy")})
    targets = {"label": label, "coords": coords, "case_id": ["c"], "error_stable": None}
    paper(_engine({Keys.LABEL: targets, Keys.PRED: right}))
    assert float(targets["error_stable"].min()) > 0.4, "the paper's transform is a sigmoid around the WT mean"
    with pytest.raises(ValueError, match="target_transform"):
        ErrorMapHandler(store, target_transform="log")
    with pytest.raises(ValueError, match="case_labels"):
        ErrorMapHandler(store, target_transform="paper")


def _case_with_tumour(n=12):
    label = torch.zeros(1, 3, n, n, n)
    label[:, 0, 3:9, 3:9, 3:9] = 1
    label[:, 1, 4:7, 4:7, 4:7] = 1
    return label


def test_paper_transform_is_one_definition_in_training_and_validation(tmp_path):
    """target_transform "paper": a case voxel gets the same target from a training patch as from validation
    (reference = mean over the CASE's GT WT, not the patch's), and the variance maps get the same transform."""
    from monai.utils import CommonKeys as Keys

    from custom.training.handlers.error_maps import ErrorMapHandler, ValidationErrorMapHandler
    from custom.transforms.array import make_case_coordinates
    from custom.uncertainty.store import ErrorMapStore

    n = 12
    label = _case_with_tumour(n)
    np.save(tmp_path / "c_seg.npy", label[0, 0:1].numpy().astype(np.uint8))
    store = ErrorMapStore(tmp_path / "store", ema_window=30).create({"c": (n, n, n)})
    coords = torch.from_numpy(make_case_coordinates((n, n, n)))[None]
    # fill the store with an uneven error map: a prediction that misses one corner of the tumour
    pred = torch.where(label[:, 0:1] > 0, 5.0, -5.0).repeat(1, 4, 1, 1, 1)
    pred[:, :, 3:6, 3:6, 3:6] = -5.0
    ErrorMapHandler(store)(_engine({Keys.LABEL: {"label": label, "coords": coords, "case_id": ["c"]},
                                    Keys.PRED: pred}))
    # training: a patch holding only part of the case (x in 0..6), after a "perfect" prediction step
    sl = (slice(None), slice(None), slice(0, 7))
    patch = {"label": label[sl], "coords": coords[sl], "case_id": ["c"], "error_stable": None}
    perfect = torch.where(label[sl][:, 0:1] > 0, 5.0, -5.0).repeat(1, 4, 1, 1, 1)
    ErrorMapHandler(store, target_transform="paper", case_labels={"c": str(tmp_path / "c_seg.npy")})(
        _engine({Keys.LABEL: patch, Keys.PRED: perfect}))
    # validation reads the same store (no EMA step) for the whole case
    probs = torch.sigmoid(torch.where(label[:, 0:1] > 0, 5.0, -5.0)).repeat(1, 4, 1, 1, 1)
    out = {Keys.LABEL: {"label": label, "coords": coords, "case_id": ["c"]}, Keys.PRED: probs}
    ValidationErrorMapHandler(store, mask_dilation=3, target_transform="paper", update_store=False)(_engine(out))
    torch.testing.assert_close(patch["error_stable"], out["error_stable"][sl], rtol=0, atol=1e-6)
    # the reference is the case mean: a patch-mean transform would differ here
    e_raw, v_raw = store.gather("c", coords[0])
    case_mean = float(e_raw[0][label[0, 0] > 0].mean())
    torch.testing.assert_close(out["error_stable"], torch.sigmoid(torch.clamp_min(e_raw[None], 1e-3) - case_mean))
    assert abs(case_mean - float(e_raw[0][sl[1:]][label[0, 0][sl[1:]] > 0].mean())) > 0.01
    # variance maps on the same scale as the target (transformed), so their RMSD against it means something
    v_case_mean = float(v_raw[0][label[0, 0] > 0].mean())
    expected_v = torch.sigmoid(torch.clamp_min(v_raw[None], 1e-3) - v_case_mean)
    inside = get_cancer_mask_for(probs)
    torch.testing.assert_close(out["variance_stable"][inside], expected_v[inside])


def get_cancer_mask_for(probs, dilation=3):
    from custom.model.masks import get_cancer_mask

    return get_cancer_mask(probs[:, 0:1], dilation=dilation)


def test_validation_compares_the_three_maps_on_one_mask(tmp_path):
    """unc_output, variance_stable and var1shot are all multiplied by the same cancer mask (predicted WT dilated by
    mask_dilation), the region inference reports; error_stable is not masked (the metrics read it over GT WT)."""
    from monai.utils import CommonKeys as Keys

    from custom.training.handlers.error_maps import ValidationErrorMapHandler
    from custom.transforms.array import make_case_coordinates
    from custom.uncertainty.store import ErrorMapStore

    n = 16
    label = torch.zeros(1, 3, n, n, n)
    label[:, 0, 3:13, 3:13, 3:13] = 1  # a tumour the prediction mostly misses: errors beyond the cancer mask
    probs = torch.full((1, 4, n, n, n), 0.3)  # p_WT 0.3 outside: var1shot 0.84 there, but no predicted tumour
    probs[:, :, 7:9, 7:9, 7:9] = 0.9  # a small predicted WT
    probs[:, 3] = 1.0  # unc = 1 everywhere before masking
    store = ErrorMapStore(tmp_path / "store", ema_window=30).create({"c": (n, n, n)})
    coords = torch.from_numpy(make_case_coordinates((n, n, n)))[None]
    out = {Keys.LABEL: {"label": label, "coords": coords, "case_id": ["c"]}, Keys.PRED: probs}
    ValidationErrorMapHandler(store, mask_dilation=2)(_engine(out))
    expected_mask = torch.zeros(1, 1, n, n, n, dtype=torch.bool)
    expected_mask[:, :, 5:11, 5:11, 5:11] = True  # 7..8 dilated by 2
    for key in ("unc_output", "variance_stable", "var1shot"):
        assert out[key][~expected_mask].abs().max() == 0, f"{key} is not zero outside the cancer mask"
        assert out[key][expected_mask].min() > 0, f"{key} is masked beyond the cancer mask"
    torch.testing.assert_close(out["var1shot"][expected_mask],
                               (4 * probs[:, 0:1] * (1 - probs[:, 0:1]))[expected_mask])
    assert out["unc_output"][expected_mask].eq(1.0).all()
    # error_stable is not masked, and the store received the validation observation (EMA step) for the case
    assert out["error_stable"][~expected_mask].abs().sum() > 0
    e_store, _ = store.gather("c", coords[0])
    torch.testing.assert_close(out["error_stable"][0], e_store)


def test_metrics_csv_rewrites_rows_after_resume(tmp_path):
    from custom.training.handlers.monitoring import MetricsCSVHandler

    path = tmp_path / "metrics.csv"
    handler = MetricsCSVHandler(path)
    for epoch in (1, 2, 3):
        engine = _engine({"loss": torch.tensor(float(epoch))}, epoch=epoch)
        handler.epoch_started(engine)
        handler.iteration_completed(engine)
        handler.epoch_completed(engine)
    engine = _engine({"loss": torch.tensor(9.0)}, epoch=2)  # a resumed run repeats epoch 2
    handler.epoch_started(engine)
    handler.iteration_completed(engine)
    handler.epoch_completed(engine)
    rows = read_csv(path)
    assert [(r["epoch"], float(r["train_loss"])) for r in rows] == [("1", 1.0), ("2", 9.0)]
    assert list(rows[0]) == list(METRICS_CSV_COLUMNS) and rows[0]["val_dice_wt"] == ""



# ----------------------------------------------------------------------------------------- run-folder integrity
def _tiny_engine(run, store_dir, crash_at=None, max_epochs=2, width=2):
    """An Ignite engine whose epoch (one iteration) visits every voxel of a 4^3 store case once with the value
    epoch/10 and adds 1 to the weights: the store's count and the weights both tell the epoch they have seen."""
    from ignite.engine import Engine, Events

    from custom.training.handlers.checkpoint import TrainingCheckpointHandler
    from custom.transforms.array import make_case_coordinates
    from custom.uncertainty.store import ErrorMapStore

    store = ErrorMapStore(store_dir, ema_window=30).create({"c": (4, 4, 4)})
    net = torch.nn.Linear(width, width)
    torch.nn.init.zeros_(net.weight)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)  # lr 0: the weights count epochs
    coords = make_case_coordinates((4, 4, 4))

    def step(engine, batch):
        v = np.full((4, 4, 4), engine.state.epoch / 10, np.float32)
        store.scatter("c", coords, v, v)
        with torch.no_grad():
            net.weight.add_(1.0)
        net.weight.grad = torch.ones_like(net.weight)
        opt.step()  # momentum buffers in the optimizer state
        return {"loss": torch.tensor(0.0)}

    engine = Engine(step)
    TrainingCheckpointHandler(run, {"network": net, "optimizer": opt}, store=store).attach(engine)
    if crash_at is not None:
        @engine.on(Events.EPOCH_COMPLETED(once=1))  # after epoch 1's checkpoint: count renames from here
        def _arm(_):
            calls = [0]
            real_replace = os.replace

            def replace(src, dst):
                calls[0] += 1
                if calls[0] == crash_at:
                    os._exit(77)  # a kill just before this rename: no cleanup runs
                return real_replace(src, dst)

            os.replace = replace
    return engine, net, store


def _train_until_crash(run, store_dir, crash_at):
    engine, _, _ = _tiny_engine(run, store_dir, crash_at)
    engine.run(range(1), max_epochs=2)


def _resume_state(run, store_dir, width=2) -> tuple[int, list[int], float]:
    """Resume in this process: (epoch, distinct store counts, a weight) after ResumeHandler (the live store went
    on past the checkpoint before the kill: resume must put it back)."""
    from custom.training.handlers.checkpoint import ResumeHandler

    engine, net, store = _tiny_engine(run, store_dir, width=width)
    handler = ResumeHandler(run, {"network": net}, store=store)
    handler.load_dict["trainer"] = engine
    engine.state.max_epochs = 2
    handler(engine)
    return int(engine.state.epoch), np.unique(store.full("c")["count"]).tolist(), float(net.weight[0, 0].detach())


def test_kill_at_every_rename_of_a_save_resumes_consistently(tmp_path):
    """A kill before any rename of the epoch-2 save (snapshot copy, checkpoint, checksum file, snapshot promotion,
    model_final.pt, FINISHED) resumes with the checkpoint's epoch and the store of that same epoch. Before, a
    kill between the two renames of the snapshot copy resumed at epoch 1 with the live store of epoch 2
    ("the EMA store starts from zero" logged): the replayed iteration was counted twice."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    crash_at, completed = 1, False
    while not completed:
        run, store_dir = tmp_path / f"run{crash_at}", tmp_path / f"store{crash_at}"
        proc = ctx.Process(target=_train_until_crash, args=(run, store_dir, crash_at))
        proc.start()
        proc.join(120)
        assert proc.exitcode in (0, 77), proc.exitcode
        completed = proc.exitcode == 0
        epoch, counts, weight = _resume_state(run, store_dir)
        assert epoch in (1, 2), (crash_at, epoch)
        assert counts == [epoch], f"kill before rename {crash_at}: checkpoint of epoch {epoch}, store counts {counts}"
        assert weight == epoch, (crash_at, epoch, weight)
        assert not list(run.glob(".*tmp-*")), "temporary files left behind after resume"
        crash_at += 1
    assert crash_at > 6, "the save has fewer renames than expected: the test no longer covers them"


def test_disk_full_during_checkpoint_is_named_and_keeps_the_last_state(tmp_path):
    """A real full disk (a 12 MB tmpfs): the checkpoint write fails with ENOSPC naming the file and the free space
    (before: torch's 'basic_ios::clear' and a store snapshot one epoch ahead of the checkpoint); the previous
    checkpoint and snapshot stay a consistent pair, and resume works."""
    import errno
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run, store_dir = mnt / "run", tmp_path / "store"
        engine, _, _ = _tiny_engine(run, store_dir, width=1000)  # ~8 MB checkpoint: the second does not fit
        with pytest.raises(OSError) as err:
            engine.run(range(1), max_epochs=2)
        assert err.value.errno == errno.ENOSPC
        assert "no space left" in str(err.value) and str(run / "checkpoint_last.pt") in str(err.value)
        assert "MB free" in str(err.value)
        assert not (run / ".store_snapshot.pending").exists() and not list(run.glob(".*tmp-*"))
        assert load_ckpt(run / "checkpoint_last.pt")["epoch"] == 1
        assert json.loads((run / "store_snapshot" / "epoch.json").read_text())["epoch"] == 1
        epoch, counts, weight = _resume_state(run, store_dir, width=1000)
        assert (epoch, counts, weight) == (1, [1], 1.0)
    finally:
        import gc

        gc.collect()  # the store's memory maps and lock files on the mount
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("variant", ["baseline", "unc"])
def test_non_finite_loss_stops_the_run_with_a_named_error(prepared_work_dir, tmp_path, variant):
    """An infinite learning rate makes the second iteration's prediction and loss NaN. Before: training went on
    with `train_loss: nan`, wrote a NaN model_final.pt and FINISHED, exit 0. Now the run fails with a named error
    and writes nothing after the last good checkpoint: the baseline through NonFiniteLossGuard, the uncertainty
    variant already in the EMA store, which refuses the NaN var1shot before the loss is computed."""
    out = tmp_path / "run"
    configs = TINY if variant == "unc" else f"['{CONFIGS}/train.json','{CONFIGS}/baseline.json','{CONFIGS}/tiny.json']"
    proc = run_cmd(bundle_cmd(configs, prepared_work_dir, "--output_dir", out, "--learning_rate", "$float('inf')",
                              "--progress_bar", "false"), check=False, env=ENV, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    if variant == "baseline":
        assert "NonFiniteTrainingError: training loss is nan at epoch 1" in text, text[-3000:]
    else:
        assert "ErrorMapStore: refusing to update case" in text and "(first: nan)" in text, text[-3000:]
    assert not (out / "FINISHED").exists() and not (out / "model_final.pt").exists()
    assert not (out / "checkpoint_last.pt").exists()


def _nan_into_checkpoint(path: Path, fresh_checksum: bool) -> None:
    import hashlib

    state = load_ckpt(path)
    name = next(k for k, v in state["network"].items() if v.is_floating_point())
    state["network"][name].view(-1)[0] = float("nan")
    torch.save(state, str(path))
    if fresh_checksum:  # as if the NaN had been trained in and saved by a writer that checksums
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        (path.parent / f"{path.name}.sha256").write_text(f"{digest}  {path.name}\n")


@pytest.mark.parametrize("damage", ["checkpoint_bits", "checkpoint_nan", "snapshot_nan"])
def test_resume_refuses_a_corrupt_checkpoint_or_snapshot(tiny_training_run, prepared_work_dir, tmp_path, damage):
    """Before: a checkpoint with a flipped weight or a NaN-filled store snapshot resumed into `train_loss: nan`
    for every epoch, exit 0, FINISHED and a NaN model_final.pt. Now resume stops at once naming the file."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_training_run, out)
    if damage == "snapshot_nan":
        target = sorted((out / "store_snapshot").glob("*.error.npy"))[0]
        mm = np.load(target, mmap_mode="r+")
        mm[...] = np.nan
        mm.flush()
        expect = f"{target}: value nan"
    else:
        target = out / "checkpoint_last.pt"
        _nan_into_checkpoint(target, fresh_checksum=damage == "checkpoint_nan")
        expect = f"{target}: SHA-256" if damage == "checkpoint_bits" else f"{target}: non-finite values in network."
    proc = run_cmd(bundle_cmd(TINY, prepared_work_dir, "--output_dir", out, "--num_epochs", 3, "--resume", "true",
                              "--progress_bar", "false"), check=False, env=ENV, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "BraTSInputError" in text, text[-3000:]
    assert expect in text, text[-3000:]
    assert not (out / "FINISHED").exists()
    assert [int(r["epoch"]) for r in read_csv(out / "metrics.csv")] == [1, 2], "training went on"


def test_benchmark_training_reports_the_store_share(prepared_work_dir, tmp_path):
    """scripts/benchmark_training.py times the store calls on the training thread against the step (tiny plan here;
    the real plan and the GPU are the printed command's job)."""
    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = run_cmd([PYTHON, "scripts/benchmark_training.py", "--out", out, "--work_dir", prepared_work_dir,
                    "--skip_real", "True", "--tiny_iterations", 2, "--num_workers", 0],
                   env={**ENV, "TMPDIR": str(scratch)}, timeout=900)
    result = json.loads(out.read_text())
    assert 0 < result["tiny_store_ms_per_batch"] < result["tiny_compute_ms_per_batch"]
    assert result["tiny_store_share_ratio"] == pytest.approx(
        result["tiny"]["workers_0"]["store_ms_per_batch"] / result["tiny"]["workers_0"]["compute_ms_per_batch"],
        rel=0.2)
    assert result["tiny"]["workers_0"]["store"] == "ErrorMapStore"
    assert "store" in proc.stdout and "--store_devices cpu,cuda" in proc.stdout
    assert not list(scratch.glob("bench_*")), "the measured runs' folders were left behind"
