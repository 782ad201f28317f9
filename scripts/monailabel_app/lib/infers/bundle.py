"""MONAI Label's ``BundleInferTask`` on the local bundle: ``bundle/configs/inference.json`` as it is.

The bundle's ``preprocessing``, ``inferer`` and ``postprocessing`` (the project's shared inference path:
preprocessing from the plan, sliding window, regions -> labels, masked ``unc_output``, restore to the
original grid), then ``BundleOutputd`` picks the output and puts the study's affine on it. The results
are already in the study's grid: no ``Restored`` post-transform (it would resize the float map with nearest
neighbour) and no ``result_dtype`` (a single-channel float32 map is returned intact).

The model file is the app's (``model_path``), never one a request names: MONAI Label lets a request pick
``model_filename`` among the files beside the model when the task's config lists them, so the config
lists none. It is read by the project's one checkpoint loader (``custom.model.checkpoints``: ``weights_only``,
non-finite weights refused with a ``CheckpointError`` that the app answers as HTTP 503 naming the file and
tensor), not by MONAI Label's own ``torch.load``.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

from monai.transforms import EnsureChannelFirstd
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

from custom.model.checkpoints import load_weights
from lib.infers.writer import write_intact
from lib.transforms import (
    DEFAULT_UNCERTAIN_THRESHOLD,
    OUTPUTS,
    BundleOutputd,
    CheckStudyd,
    check_threshold,
    IDENTITY,
    ErrorProbability,
)

logger = logging.getLogger(__name__)


class _ModelPathConstants(BundleConstants):
    """Bundle constants whose model file is an absolute path (``os.path.join(bundle, "models", abs)`` is ``abs``)."""

    def __init__(self, model_path):
        self.model_path = str(Path(model_path).resolve())

    def model_pytorch(self) -> str:
        return self.model_path


class BraTSBundleInferTask(BundleInferTask):
    """``BundleInferTask`` on the local bundle's ``inference.json`` with the app's model path.

    Args:
        bundle_path: the bundle directory.
        model_path: checkpoint (``plans.json`` beside it); replaces the config's ``checkpoint``.
        output: one of ``lib.transforms.OUTPUTS``.
        labels: label name -> value of the returned label map (the metadata's ``channel_def`` describes the
            network's logit channels, not these).
        conf: the app conf.
        description: shown in the client.
        threshold, error_probability: the ``uncertain_region`` output (see ``lib.transforms``).
    """

    def __init__(self, bundle_path, model_path, output: str = "labels", labels: Optional[Dict[str, int]] = None,
                 conf: Optional[dict] = None, description: str = "", threshold: float = DEFAULT_UNCERTAIN_THRESHOLD,
                 error_probability: ErrorProbability = IDENTITY):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.model_file = str(Path(model_path).resolve())
        self.output = output
        self.threshold = check_threshold(threshold)
        self.error_probability = error_probability
        super().__init__(
            str(bundle_path), dict(conf or {}), const=_ModelPathConstants(model_path),
            type=InferType.OTHERS if output == "uncertainty" else InferType.SEGMENTATION,
            add_post_restore=False, load_strict=True,
        )
        if not self.valid:
            return
        self.labels = None if output == "uncertainty" else labels
        self.description = description or self.description
        # no model choice for a request (BasicInferTask._get_network honours a request's model_filename
        # only while the config lists model files)
        self._config.pop("model_filename", None)
        if output == "uncertain_region":
            self._config["uncertain_threshold"] = self.threshold

    def _load_bundle_config(self, path, config):
        bundle_config = super()._load_bundle_config(path, config)
        bundle_config.config["checkpoint"] = self.model_file  # type: ignore
        return bundle_config

    def _get_network(self, device, data):
        """The app's model on ``device`` through the project's checkpoint loader, cached until the file changes
        (replaces ``BasicInferTask._get_network``, which ``torch.load``s the file itself and checks nothing)."""
        mtime = os.stat(self.model_file).st_mtime if os.path.exists(self.model_file) else None
        cached = self._networks.get(device)
        if cached is not None and mtime is not None and cached[1] == mtime:
            return cached[0]
        network = load_weights(copy.deepcopy(self.network), self.model_file, device)
        self._networks[device] = (network, mtime)
        return network

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        pre = list(super().pre_transforms(data))
        at = next((i + 1 for i, t in enumerate(pre) if isinstance(t, EnsureChannelFirstd)), None)
        if at is None:
            raise RuntimeError(f"{self.bundle_config_path}: preprocessing has no EnsureChannelFirstd")
        # a wrong study must fail with its file named, before the bundle's preprocessing sees it
        return pre[:at] + [CheckStudyd(keys="image")] + pre[at:]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return list(super().post_transforms(data)) + [
            BundleOutputd(self.output, model_path=self.model_file, threshold=self.threshold,
                          error_probability=self.error_probability)
        ]

    def writer(self, data, extension=None, dtype=None):
        return write_intact(super().writer, data)
