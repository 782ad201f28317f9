"""Channel meaning where the training step selects a channel: network output 0 is the WT logit, 3 the uncertainty
logit; label channel 0 is GT WT. Every channel carries a different value, so reading another one changes the
asserted numbers (the validation handlers: tests/test_validation_maps.py; inference: tests/test_inference_masking.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from monai.utils import CommonKeys as Keys

from custom.training.handlers.error_maps import ErrorMapHandler
from custom.transforms.array import make_case_coordinates
from custom.uncertainty.store import ErrorMapStore
from custom.uncertainty.targets import smooth_failure

N = 10


def _engine(output):
    return SimpleNamespace(state=SimpleNamespace(output=output, epoch=1, metrics={}, iteration=1))


def _crafted():
    """GT WT [2,8)^3, GT TC a box at one corner of it; logits: WT positive on [3,8)^3 (misses one face of the
    tumour), TC positive elsewhere, ET a ramp, uncertainty constant."""
    label = torch.zeros(1, 3, N, N, N)
    label[:, 0, 2:8, 2:8, 2:8] = 1
    label[:, 1, 2:4, 2:4, 2:4] = 1
    logits = torch.empty(1, 4, N, N, N)
    logits[:, 0] = -1.0
    logits[:, 0, 3:8, 3:8, 3:8] = 2.0
    logits[:, 1] = 3.0
    logits[:, 1, 3:8, 3:8, 3:8] = -3.0
    logits[:, 2] = torch.linspace(-4, 4, N ** 3).reshape(N, N, N)
    logits[:, 3] = 0.7
    return label, logits


def test_training_target_reads_the_wt_logit_and_gt_wt(tmp_path):
    label, logits = _crafted()
    store = ErrorMapStore(tmp_path / "store", ema_window=30).create({"c": (N, N, N)})
    coords = torch.from_numpy(make_case_coordinates((N, N, N)))[None]
    targets = {"label": label, "coords": coords, "case_id": ["c"], "error_stable": None}
    ErrorMapHandler(store)(_engine({Keys.LABEL: targets, Keys.PRED: logits}))
    p_wt = torch.sigmoid(logits[:, 0:1])
    f_s = smooth_failure(((p_wt > 0.5) != (label[:, 0:1] > 0.5)).float())
    torch.testing.assert_close(targets["error_stable"], f_s)             # first visit: e = f_s
    torch.testing.assert_close(targets["failure_smoothed"], f_s)
    torch.testing.assert_close(targets["variance_stable"], 4 * p_wt * (1 - p_wt))
    # the crafted case gives a target that any other channel pair would change
    for c_pred, c_label in ((1, 0), (0, 1), (2, 0), (3, 0)):
        other = smooth_failure(((logits[:, c_pred:c_pred + 1] > 0) != (label[:, c_label:c_label + 1] > 0.5)).float())
        assert not torch.allclose(other, f_s), (c_pred, c_label)


def test_deep_supervision_target_comes_from_the_full_resolution_output(tmp_path):
    label, logits = _crafted()
    store = ErrorMapStore(tmp_path / "store", ema_window=30).create({"c": (N, N, N)})
    coords = torch.from_numpy(make_case_coordinates((N, N, N)))[None]
    targets = {"label": label, "coords": coords, "case_id": ["c"], "error_stable": None}
    low = torch.full((1, 4, N // 2, N // 2, N // 2), 5.0)
    ErrorMapHandler(store)(_engine({Keys.LABEL: targets, Keys.PRED: [logits, low]}))
    p_wt = torch.sigmoid(logits[:, 0:1])
    torch.testing.assert_close(targets["error_stable"],
                               smooth_failure(((p_wt > 0.5) != (label[:, 0:1] > 0.5)).float()))


def test_modalities_reach_the_network_as_t1c_t1n_t2f_t2w(tmp_path):
    """Each modality file of a case holds its own constant; the training datalist and the inference loader both
    give the channels in MODALITIES order."""
    import nibabel as nib
    import numpy as np

    from custom.core.constants import MODALITIES
    from custom.data.cases import find_case_files, scan_dataset
    from custom.data.nifti import load_case, load_case_arrays

    assert MODALITIES == ("t1c", "t1n", "t2f", "t2w")
    cid = "BraTS-GLI-00042-000"
    case_dir = tmp_path / "data" / cid
    case_dir.mkdir(parents=True)
    for value, m in enumerate(MODALITIES, start=1):
        nib.save(nib.Nifti1Image(np.full((6, 6, 6), float(value), np.float32), np.eye(4)),
                 str(case_dir / f"{cid}-{m}.nii.gz"))
    (scanned,) = scan_dataset(tmp_path / "data")
    image, _, _, _ = load_case_arrays([str(p) for p in scanned.image_paths])
    assert [float(image[c].mean()) for c in range(4)] == [1.0, 2.0, 3.0, 4.0]
    image, _, _, _ = load_case(find_case_files(case_dir))
    assert [float(image[c].mean()) for c in range(4)] == [1.0, 2.0, 3.0, 4.0]
    # a {modality: path} mapping in any order
    by_name = {m: str(case_dir / f"{cid}-{m}.nii.gz") for m in reversed(MODALITIES)}
    image, _, _, _ = load_case_arrays(by_name)
    assert [float(image[c].mean()) for c in range(4)] == [1.0, 2.0, 3.0, 4.0]
