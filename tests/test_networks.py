"""Network builder, cancer mask and the inference/export wrappers (custom/model/networks.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.networks.nets import DynUNet

from custom.model.masks import get_cancer_mask
from custom.model.networks import MaskedUncertaintyNetwork, PatchProbabilityNetwork, build_network
from custom.training.losses import CompositeUncertaintyLoss

PLANS = {"kernels": [[3, 3, 3]] * 4, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
         "filters": [8, 16, 32, 64], "patch_size": [32, 32, 32]}


class PlansLike:
    """Duck-typed stand-in for custom.planning.plans.Plans (attributes only)."""

    kernels = PLANS["kernels"]
    strides = PLANS["strides"]
    filters = PLANS["filters"]
    patch_size = PLANS["patch_size"]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_network(PLANS)


def test_build_from_dict_path_and_object(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(PLANS))
    for plans in (PLANS, path, str(path), PlansLike()):
        n = build_network(plans)
        assert isinstance(n, DynUNet)
        assert n.out_channels == 4 and n.in_channels == 4 and n.filters == [8, 16, 32, 64]
        assert n.deep_supervision is False
    assert build_network(PLANS, with_uncertainty=False).out_channels == 3
    with pytest.raises(FileNotFoundError, match="plans"):
        build_network(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="strides"):
        build_network({"kernels": PLANS["kernels"], "strides": PLANS["strides"][:2], "filters": None})
    with pytest.raises(ValueError, match="dropout"):
        build_network(PLANS, dropout=1.5)


def test_norm_act_and_dropout_follow_nnunet():
    n = build_network(PLANS, dropout=0.2)
    norms = [m for m in n.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    acts = [m for m in n.modules() if isinstance(m, torch.nn.LeakyReLU)]
    drops = [m for m in n.modules() if isinstance(m, torch.nn.Dropout3d | torch.nn.Dropout)]
    assert norms and all(m.affine for m in norms)
    assert acts and all(m.negative_slope == 0.01 for m in acts)
    assert drops and all(m.p == pytest.approx(0.2) for m in drops)


def test_output_shapes_and_no_uncertainty_variant(net):
    x = torch.randn(2, 4, 32, 32, 32)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 4, 32, 32, 32)
        n3 = build_network(PLANS, with_uncertainty=False).eval()
        assert n3(x).shape == (2, 3, 32, 32, 32)
        assert MaskedUncertaintyNetwork(n3, with_uncertainty=False)(x).shape == (2, 3, 32, 32, 32)


def test_deep_supervision_is_nnunets_and_trains_every_supervised_head():
    """Option deep_supervision: one output per decoder stage at its own resolution (nnU-Net), segmentation terms on
    every output with weight > 0 (each head gets gradient), uncertainty terms on the full-resolution output only."""
    torch.manual_seed(0)
    ds = build_network(PLANS, deep_supervision=True).train()
    x = torch.randn(2, 4, 32, 32, 32)
    out = ds(x)
    # 4 stages -> 3 decoder outputs: 32^3, 16^3, 8^3, highest resolution first
    assert [tuple(o.shape) for o in out] == [(2, 4, 32, 32, 32), (2, 4, 16, 16, 16), (2, 4, 8, 8, 8)]
    label = torch.zeros(2, 3, 32, 32, 32)
    label[:, 0, 8:24, 8:24, 8:24] = 1
    label[:, 1, 12:20, 12:20, 12:20] = 1
    error = torch.rand(2, 1, 32, 32, 32)
    loss_fn = CompositeUncertaintyLoss()
    loss_fn(out, {"label": label, "error_stable": error}).backward()
    head_grads = [float(h.conv.conv.weight.grad.abs().sum()) for h in ds.deep_supervision_heads]  # (none is None)
    main_grad = ds.output_block.conv.conv.weight.grad
    assert main_grad[:3].abs().sum() > 0 and main_grad[3].abs().sum() > 0
    # weights [2/3, 1/3, 0]: the 16^3 head learns segmentation, the 8^3 head is weighted 0 as in nnU-Net
    assert head_grads[0] > 0 and head_grads[1] == 0
    assert ds.deep_supervision_heads[0].conv.conv.weight.grad[3].abs().sum() == 0, "unc trained at 1/2 resolution"
    # in eval mode (sliding window, export) the network returns the full-resolution logits only
    ds.eval()
    with torch.no_grad():
        assert ds(x).shape == (2, 4, 32, 32, 32)


def test_get_cancer_mask_dilation_is_26_neighbourhood():
    p = torch.zeros(1, 1, 9, 9, 9)
    p[0, 0, 4, 4, 4] = 0.8
    p[0, 0, 0, 0, 0] = 0.5  # not > 0.5
    m1 = get_cancer_mask(p, dilation=1)
    assert m1.dtype == torch.bool and m1.sum() == 27 and m1[0, 0, 3:6, 3:6, 3:6].all()
    m3 = get_cancer_mask(p, dilation=3)
    assert m3.sum() == 7**3 and m3[0, 0, 1:8, 1:8, 1:8].all() and not m3[0, 0, 0].any()
    assert get_cancer_mask(p, dilation=0).sum() == 1
    # labels: WT = label > 0; bool masks as they are; clipped at the border
    lab = torch.zeros(1, 1, 5, 5, 5, dtype=torch.uint8)
    lab[0, 0, 0, 0, 0] = 2
    assert get_cancer_mask(lab, dilation=1).sum() == 8
    assert get_cancer_mask(lab > 0, dilation=2).sum() == 27
    # reference: d iterations of a 3x3x3 dilation
    from scipy import ndimage

    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.random((1, 1, 12, 11, 10)).astype(np.float32) > 0.97)
    ref = ndimage.binary_dilation(q[0, 0].numpy(), structure=np.ones((3, 3, 3)), iterations=2)
    np.testing.assert_array_equal(get_cancer_mask(q, 2)[0, 0].numpy(), ref)
    with pytest.raises(ValueError, match="B,1"):
        get_cancer_mask(torch.zeros(5, 5, 5))


def test_masked_network_zero_outside_mask_and_patch_network(net):
    net.eval()
    x = torch.randn(1, 4, 32, 32, 32)
    wrapped = MaskedUncertaintyNetwork(net, mask_dilation=2).eval()
    with torch.no_grad():
        # bias the WT logit so that part of the volume is tumour and part is not
        net.output_block.conv.conv.bias.data[0] = 0.0
        probs = PatchProbabilityNetwork(net)(x)
        out = wrapped(x)
    assert out.shape == (1, 4, 32, 32, 32)
    torch.testing.assert_close(out[:, :3], probs[:, :3])
    torch.testing.assert_close(probs, torch.sigmoid(net(x)))
    mask = get_cancer_mask(probs[:, 0:1], dilation=2)
    assert mask.any() and (~mask).any()
    assert (out[:, 3:4][~mask] == 0).all()
    torch.testing.assert_close(out[:, 3:4][mask], probs[:, 3:4][mask])


def test_gradients_reach_segmentation_and_uncertainty_channels():
    torch.manual_seed(0)
    n = build_network(PLANS).train()
    x = torch.randn(2, 4, 32, 32, 32)
    label = torch.zeros(2, 3, 32, 32, 32)
    label[:, 0, 8:20, 8:20, 8:20] = 1
    label[:, 1, 10:16, 10:16, 10:16] = 1
    error = torch.rand(2, 1, 32, 32, 32)
    loss = CompositeUncertaintyLoss()(n(x), {"label": label, "error_stable": error})
    loss.backward()
    w = n.output_block.conv.conv.weight.grad  # (4, C, 1, 1, 1): one row per output channel
    assert w is not None
    for channel in range(4):
        assert w[channel].abs().sum() > 0, f"no gradient on output channel {channel}"
    # the first encoder block receives gradient too
    assert n.input_block.conv1.conv.weight.grad.abs().sum() > 0


def test_torchscript_and_onnx_export(net, tmp_path):
    net.eval()
    x = torch.randn(1, 4, 32, 32, 32)
    for module in (MaskedUncertaintyNetwork(net).eval(), PatchProbabilityNetwork(net).eval()):
        scripted = torch.jit.script(module)
        torch.testing.assert_close(scripted(x), module(x))
    onnxruntime = pytest.importorskip("onnxruntime")
    module = PatchProbabilityNetwork(net).eval()
    path = tmp_path / "patch.onnx"
    torch.onnx.export(module, (x,), str(path), input_names=["image"], output_names=["probs"],
                      dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}}, dynamo=False)
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(2, 4, 32, 32, 32)
    got = sess.run(None, {"image": x2.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x2).numpy(), atol=1e-4)


def test_stop_gradient_head_trains_only_its_own_weights():
    """unc_stop_gradient: the uncertainty terms reach the output weights of channel 3 and nothing else; the
    eval-mode output and the state dict keys are plain DynUNet's (inference and export are unchanged)."""
    torch.manual_seed(0)
    net = build_network(PLANS, unc_stop_gradient=True).train()
    x = torch.randn(1, 4, 32, 32, 32)
    torch.sigmoid(net(x)[:, 3]).sum().backward()
    trunk = [n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trunk == ["output_block.conv.conv.weight", "output_block.conv.conv.bias"], trunk
    w = net.output_block.conv.conv.weight.grad
    assert w[:3].abs().sum() == 0 and w[3].abs().sum() > 0
    plain = build_network(PLANS)
    assert list(plain.state_dict()) == list(net.state_dict())
    plain.load_state_dict(net.state_dict())
    net.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x))
    # the segmentation channels still train the trunk
    net.train().zero_grad()
    torch.sigmoid(net(x)[:, :3]).sum().backward()
    assert net.input_block.conv1.conv.weight.grad.abs().sum() > 0


def test_a_deep_supervision_checkpoint_loads_for_inference(tmp_path):
    """Inference builds the network without deep-supervision heads; the one loader drops their weights."""
    from custom.model.checkpoints import load_weights

    torch.manual_seed(0)
    trained = build_network(PLANS, deep_supervision=True)
    torch.save({"model": trained.state_dict()}, tmp_path / "model.pt")
    plain = load_weights(build_network(PLANS), tmp_path / "model.pt")
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trained.eval()(x))
    # a network WITH heads still loads strictly (nothing dropped)
    load_weights(build_network(PLANS, deep_supervision=True), tmp_path / "model.pt")
