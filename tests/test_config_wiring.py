"""Config-to-component wiring: the real bundle configs, each layered variant, instantiated as
``python -m monai.bundle run`` instantiates them, and every configured value found in the object that uses it.

Settings are overridden with DISTINCT values (as ``--unc_weight 0.11`` on the command line would), so that one
setting wired to another (``"corr_weight": "@unc_weight"``), a hard-coded value where a reference belongs, or a
layer that is not applied changes an asserted value. Nothing is trained: building the components is the test.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from monai.bundle import ConfigParser

from custom.core.atomic import atomic_torch_save
from custom.core.layout import REPO_ROOT
from custom.training.setup import load_fold_data

CONFIGS = REPO_ROOT / "bundle" / "configs"

#: every numeric setting of the loss, the store and the schedule gets a value no other setting has; every switch
#: the value that is not its default
DISTINCT = {"unc_weight": 0.11, "rmsd_weight_cancer": 0.22, "corr_weight": 0.33, "ring_weight": 0.44,
            "proper_weight": 0.55, "unc_loss": "two_region", "mask_dilation": 2, "target_transform": "paper",
            "ema_window": 17, "learning_rate": 0.0123, "grad_clip_norm": 7.5, "val_interval": 3,
            "fg_fraction": 0.5, "seed": 5, "sw_batch_size": 3, "deep_supervision": True, "unc_stop_gradient": False}


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    """A prepared work dir of four small synthetic cases (2 folds, a 3-stage plan with 16^3 patches)."""
    from custom.data.synthetic import write_dataset
    from custom.workflows.prepare import prepare_data

    root = tmp_path_factory.mktemp("wiring")
    write_dataset(root / "raw", num_cases=4, shape=(32, 32, 24), spacing=(1, 1, 1), seed=0)
    prepare_data(root / "raw", root / "work", num_folds=2, seed=0, patch_size=[16, 16, 16], filters=[4, 8, 16],
                 progress=False)
    return root / "work"


def _parser(names, overrides=None) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f"{n}.json") for n in names])
    parser["bundle_root"] = str(REPO_ROOT / "bundle")
    parser["device"] = "$torch.device('cpu')"
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def _of_type(objects, name):
    found = [o for o in objects if type(o).__name__ == name]
    assert len(found) == 1, f"expected one {name}, got {[type(o).__name__ for o in objects]}"
    return found[0]


def test_train_config_hands_every_setting_to_its_component(work_dir, tmp_path):
    parser = _parser(["train", "tiny"], {"work_dir": str(work_dir), "output_dir": str(tmp_path / "unc"), **DISTINCT})
    trainer = parser.get_parsed_content("train#trainer")
    store = parser.get_parsed_content("store")

    loss = trainer.loss_function
    assert type(loss).__name__ == "CompositeUncertaintyLoss" and loss is parser.get_parsed_content("loss")
    assert (loss.unc_weight, loss.rmsd_weight_cancer, loss.corr_weight) == (0.11, 0.22, 0.33)
    assert (loss.ring_weight, loss.proper_weight, loss.unc_loss, loss.mask_dilation) == (0.44, 0.55, "two_region", 2)
    assert loss.with_uncertainty is True

    net = trainer.network
    assert net.deep_supervision and not net.unc_stop_gradient and net.output_block.conv.conv.out_channels == 4
    assert [list(s) for s in net.strides] == [list(s) for s in parser.get_parsed_content("plans").strides]

    opt = trainer.optimizer
    assert type(opt).__name__ == "SGD" and opt.param_groups[0]["params"] == list(net.parameters())
    group = opt.param_groups[0]
    # nnU-Net: SGD, Nesterov momentum 0.99, weight decay 3e-5, poly schedule (1 - epoch / epochs)^0.9
    assert (group["initial_lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == \
        (0.0123, 0.99, True, 3e-05)
    scheduler = parser.get_parsed_content("lr_scheduler")
    assert type(scheduler).__name__ == "PolyLRScheduler" and scheduler.optimizer is opt
    assert (scheduler.num_epochs, scheduler.exponent) == (2, 0.9)   # tiny.json: 2 epochs

    # tiny.json is applied to the trainer and the sampler
    assert trainer.state.max_epochs == 2
    dataset = trainer.data_loader.dataset
    assert type(dataset).__name__ == "PatchDataset"
    assert (dataset.iterations_per_epoch, dataset.batch_size, dataset.fg_fraction, dataset.seed) == (8, 2, 0.5, 5)
    assert trainer.data_loader.batch_size == 2 and trainer.data_loader.num_workers == 0
    train_items, val_items = load_fold_data(work_dir / "datalist.json", 0)
    assert sorted(x["case_id"] for x in dataset.data) == sorted(x["case_id"] for x in train_items)

    assert store.ema_window == 17
    prepare = trainer.prepare_batch
    assert type(prepare).__name__ == "UncertaintyPrepareBatch" and prepare.with_uncertainty is True

    handlers = parser.get_parsed_content("train#handlers")
    error_maps = _of_type(handlers, "ErrorMapHandler")
    assert error_maps.store is store and error_maps.target_transform == "paper"
    assert error_maps.reference.label_paths == {x["case_id"]: x["pp_label"] for x in train_items}
    assert _of_type(handlers, "LossTermsHandler").loss_function is loss
    clip = _of_type(handlers, "GradientClipHandler")
    assert clip.max_norm == 7.5 and clip.network is net
    validation = _of_type(handlers, "ValidationHandler")
    assert validation.interval == 3
    assert _of_type(handlers, "SetEpochHandler").target is dataset
    assert _of_type(handlers, "LrScheduleHandler").lr_scheduler is scheduler

    evaluator = validation.validator
    assert evaluator is parser.get_parsed_content("validate#evaluator") and evaluator.prepare_batch is prepare
    assert type(evaluator.network).__name__ == "PatchProbabilityNetwork" and evaluator.network.network is net
    inferer = evaluator.inferer
    # nnU-Net's sliding window: the plan's patch, overlap 0.5, Gaussian weights with sigma 1/8 of the patch
    assert list(inferer.roi_size) == [16, 16, 16] and inferer.sw_batch_size == 3
    assert (inferer.overlap, inferer.mode, inferer.sigma_scale) == (0.5, "gaussian", 0.125)
    val_handlers = parser.get_parsed_content("validate#handlers")
    val_maps = _of_type(val_handlers, "ValidationErrorMapHandler")
    assert (val_maps.store, val_maps.mask_dilation, val_maps.target_transform, val_maps.update_store) == \
        (store, 2, "paper", True)
    assert _of_type(val_handlers, "ValidationMetricsHandler").with_uncertainty is True
    best = _of_type(val_handlers, "PseudoDiceCheckpointHandler")
    assert (best.alpha, best.metric_name, best.network) == (0.9, "val_dice_mean", net)
    assert sorted(x["case_id"] for x in evaluator.data_loader.dataset.data) == sorted(x["case_id"] for x in val_items)



def test_store_device_reaches_the_store(work_dir, tmp_path):
    """``store_device`` is handed to create_error_map_store: the default is the CPU store; a device that is neither
    CPU nor CUDA is refused by name, which it could not be if the setting never arrived (a CUDA device cannot be
    built without a GPU, so the refusal is the CPU-side proof that the value is wired)."""
    from custom.uncertainty.store import ErrorMapStore

    parser = _parser(["train", "tiny"], {"work_dir": str(work_dir), "output_dir": str(tmp_path / "cpu")})
    assert type(parser.get_parsed_content("store")) is ErrorMapStore
    parser = _parser(["train", "tiny"], {"work_dir": str(work_dir), "output_dir": str(tmp_path / "meta"),
                                         "store_device": "meta"})
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("store")
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any("store_device must be 'cpu' or a CUDA device, got meta" in m for m in chain), chain

def test_train_defaults_are_the_papers(work_dir, tmp_path):
    parser = _parser(["train"], {"work_dir": str(work_dir), "output_dir": str(tmp_path / "unc")})
    loss = parser.get_parsed_content("loss")
    # the paper's terms and weights, plus the proper term over the reporting region (chosen by the held-out study,
    # bundle/docs/study/); --unc_loss paper is the paper alone
    assert (loss.unc_weight, loss.rmsd_weight_cancer, loss.corr_weight, loss.unc_loss) == (0.4, 0.5, 0.4,
                                                                                         "paper_proper")
    assert loss.proper_weight == 1.0
    assert parser.get_parsed_content("store").ema_window == 30
    val_maps = _of_type(parser.get_parsed_content("validate#error_map_handlers"), "ValidationErrorMapHandler")
    assert (val_maps.mask_dilation, val_maps.target_transform) == (3, "none")
    net = parser.get_parsed_content("network_def")
    # the head on detached features by default (main 0c5f35d), without deep supervision
    assert type(net).__name__ == "TrainingDynUNet" and net.unc_stop_gradient and not net.deep_supervision
    assert parser.get_parsed_content("train#dataset").iterations_per_epoch == 250
    assert parser.get_parsed_content("num_epochs") == 500


def test_switches_typed_on_the_command_line_are_read_as_switches(work_dir, tmp_path):
    """``--unc_stop_gradient false`` reaches the bundle as the text "false" (fire leaves lowercase words as strings),
    which is truthy: the paper's joint head would silently train on detached features."""
    from fire.parser import DefaultParseValue

    assert DefaultParseValue("false") == "false"
    typed = {"unc_stop_gradient": DefaultParseValue("false"), "deep_supervision": DefaultParseValue("true"),
             "with_uncertainty": DefaultParseValue("true")}
    parser = _parser(["train", "tiny"], {"work_dir": str(work_dir), "output_dir": str(tmp_path / "unc"), **typed})
    net = parser.get_parsed_content("network_def")
    assert net.unc_stop_gradient is False and net.deep_supervision is True
    assert parser.get_parsed_content("loss").with_uncertainty is True
    # the joint head: the head's loss reaches the shared network's weights
    net.train()
    x = torch.randn(1, 4, 16, 16, 16)
    out = net(x)
    out = out[0] if isinstance(out, list) else out
    out[:, 3].sum().backward()
    assert net.input_block.conv1.conv.weight.grad.abs().sum() > 0
    # a word that is not a switch is named, not guessed
    parser = _parser(["train", "tiny"], {"work_dir": str(work_dir), "unc_stop_gradient": "maybe"})
    with pytest.raises(Exception, match="unc_stop_gradient"):
        parser.get_parsed_content("network_def")


def test_baseline_variant_has_no_uncertainty_anywhere(work_dir, tmp_path):
    parser = _parser(["train", "baseline", "tiny"], {"work_dir": str(work_dir)})
    trainer = parser.get_parsed_content("train#trainer")
    assert parser.get_parsed_content("output_dir").endswith("runs/baseline/fold0")
    assert parser.get_parsed_content("store") is None
    assert type(trainer.loss_function).__name__ == "RegionDiceBCELoss"
    assert trainer.network.output_block.conv.conv.out_channels == 3
    assert trainer.prepare_batch.with_uncertainty is False
    train_handlers = [type(h).__name__ for h in parser.get_parsed_content("train#handlers")]
    assert "ErrorMapHandler" not in train_handlers and "LossTermsHandler" not in train_handlers
    val_handlers = parser.get_parsed_content("validate#handlers")
    assert "ValidationErrorMapHandler" not in [type(h).__name__ for h in val_handlers]
    assert _of_type(val_handlers, "ValidationMetricsHandler").with_uncertainty is False
    assert trainer.state.max_epochs == 2 and trainer.data_loader.dataset.iterations_per_epoch == 8


def test_mcdropout_variant_puts_its_dropout_in_every_block(work_dir, tmp_path):
    parser = _parser(["train", "mcdropout", "tiny"], {"work_dir": str(work_dir), "output_dir": str(tmp_path / "mc")})
    trainer = parser.get_parsed_content("train#trainer")
    drops = [m for m in trainer.network.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    assert len(drops) >= 3 and all(m.p == 0.1 for m in drops)
    assert parser.get_parsed_content("variant") == "mcdropout"
    assert type(trainer.loss_function).__name__ == "CompositeUncertaintyLoss"
    assert trainer.network.output_block.conv.conv.out_channels == 4


@pytest.mark.parametrize("variant", ["unc", "baseline"])
def test_evaluate_config_reads_the_store_without_writing(work_dir, tmp_path, variant):
    """evaluate.json layered on a finished run: the validation maps read the run's store (update_store False) with
    the run's mask_dilation and target transform; per-case rows go to <output_dir>/eval."""
    names = ["train", "evaluate"] if variant == "unc" else ["train", "baseline", "evaluate"]
    out = tmp_path / variant
    overrides = {"work_dir": str(work_dir), "output_dir": str(out), "mask_dilation": 2, "target_transform": "paper",
                 "ema_window": 17}
    if variant == "unc":   # the run's store, as training leaves it
        _parser(["train"], overrides).get_parsed_content("store").close()
    parser = _parser(names, overrides)
    assert parser.get_parsed_content("checkpoint") == str(out / "model.pt")
    handlers = parser.get_parsed_content("validate#handlers")
    metrics = _of_type(handlers, "ValidationMetricsHandler")
    writer = _of_type(handlers, "PerCaseMetricsWriter")
    assert writer.csv_path == out / "eval" / "per_case_metrics.csv" and writer.summary_path == out / "eval" / \
        "summary.json"
    names_of = [type(h).__name__ for h in handlers]
    assert "PseudoDiceCheckpointHandler" not in names_of, "evaluating must not write a best checkpoint"
    if variant == "baseline":
        assert parser.get_parsed_content("store") is None and "ValidationErrorMapHandler" not in names_of
        assert metrics.with_uncertainty is False
        return
    maps = _of_type(handlers, "ValidationErrorMapHandler")
    assert (maps.update_store, maps.mask_dilation, maps.target_transform) == (False, 2, "paper")
    assert maps.store is parser.get_parsed_content("store") and maps.store.ema_window == 17
    assert metrics.with_uncertainty is True


def _checkpoint(work_dir, root, with_uncertainty=True):
    from custom.model.networks import build_network

    root.mkdir(parents=True)
    torch.manual_seed(0)
    net = build_network(work_dir / "plans.json", with_uncertainty=with_uncertainty)
    atomic_torch_save({"model": net.state_dict()}, root / "model.pt")
    shutil.copyfile(work_dir / "plans.json", root / "plans.json")
    return root / "model.pt", net


def test_inference_config_hands_its_settings_to_the_segmenter(work_dir, tmp_path):
    ckpt, net = _checkpoint(work_dir, tmp_path / "ckpt")
    parser = _parser(["inference"], {"checkpoint": str(ckpt), "mask_dilation": 1, "tta": True, "overlap": 0.25,
                                     "sw_batch_size": 3})
    segmenter = parser.get_parsed_content("segmenter")
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing").transforms[0]
    assert segmenter.mask_dilation == 1 and post.mask_dilation == 1 and segmenter.with_uncertainty is True
    assert segmenter.inferer is inferer
    assert (inferer.tta, inferer.overlap, inferer.sw_batch_size, inferer.sigma_scale) == (True, 0.25, 3, 0.125)
    assert list(inferer.roi_size) == list(parser.get_parsed_content("plans").patch_size)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(segmenter.network.state_dict()[key], value, msg=key)
    evaluator = parser.get_parsed_content("evaluator")
    # the bundle's run: one case folder per iteration through this very segmenter (and so this inferer)
    assert evaluator.segmenter is segmenter and evaluator.segmenter.inferer is inferer
    # defaults: the training's mask dilation, no TTA, nnU-Net's overlap
    defaults = _parser(["inference"], {"checkpoint": str(ckpt)})
    seg0 = defaults.get_parsed_content("segmenter")
    assert seg0.mask_dilation == 3 and defaults.get_parsed_content("postprocessing").transforms[0].mask_dilation == 3
    assert (seg0.inferer.tta, seg0.inferer.overlap, seg0.inferer.sw_batch_size) == (False, 0.5, 2)


def test_inference_config_follows_the_checkpoint_without_uncertainty(work_dir, tmp_path):
    ckpt, _ = _checkpoint(work_dir, tmp_path / "ckpt3", with_uncertainty=False)
    parser = _parser(["inference"], {"checkpoint": str(ckpt)})
    segmenter = parser.get_parsed_content("segmenter")
    assert segmenter.with_uncertainty is False and segmenter.out_channels == 3
    assert segmenter.network.output_block.conv.conv.out_channels == 3


def test_multi_gpu_config_gives_each_rank_its_own_patch_stream(work_dir, tmp_path, monkeypatch):
    """multi_gpu_train.json layered on train.json: the sampler's rank comes from RANK (a rank that reused rank 0's
    stream would train on the same patches as rank 0); only rank 0 logs and writes TensorBoard. (The process group
    and DDP are exercised by tests/test_bundle.py with torchrun.)"""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    parser = _parser(["train", "multi_gpu_train", "tiny"], {"work_dir": str(work_dir), "output_dir": str(tmp_path)})
    dataset = parser.get_parsed_content("train#dataset")
    assert (dataset.rank, dataset.iterations_per_epoch, dataset.batch_size) == (1, 8, 2)
    assert parser.get_parsed_content("tb_writer") is None
    # the logging handlers are disabled on every rank but 0: each carries "_disabled_": not is_main_process()
    # (true under torchrun on ranks > 0, tests/test_bundle.py; parsing the lists here would build DDP)
    for key in ("train#handlers", "validate#logging_handlers"):
        logging = [h for h in parser.get(key) if h["_target_"] in ("StatsHandler", "TensorBoardStatsHandler")]
        assert len(logging) == 2, (key, logging)
        assert all(h.get("_disabled_") == "$not custom.core.dist.is_main_process()" for h in logging), logging
