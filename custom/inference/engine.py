"""The bundle's inference engine: ``inference.json``'s ``evaluator``, the one thing its ``run`` runs.

A MONAI :class:`~monai.engines.Evaluator` whose iteration is one case folder through
:meth:`custom.inference.segmenter.UncertaintySegmenter.predict_case_folder` (THE inference path: load and check the
case, preprocess, sliding window with the bundle's ``inferer``, cancer mask, paste back, write
``<case_id>.nii.gz`` and ``<case_id>-unc.nii.gz`` atomically). The engine adds what a folder run needs around it:

- first, what an interrupted run left in ``output_dir`` (temporary files, an uncertainty map without its label
  map) is removed (:func:`custom.core.layout.remove_unfinished_predictions`);
- per-case failure isolation: a case that fails (missing modality, corrupt file, too large) is recorded with its
  message and leaves no output; the other cases run;
- ``summary.json`` (volumes, uncertainty statistics and timing per case, failures) rewritten after every case;
- at the end, a ``BraTSInputError`` listing every failed case (the run exits non-zero) when ``raise_on_failure``.

MONAI Label's ``BundleInferTask`` does not run this engine: it chains the config's ``preprocessing``, ``inferer``
and ``postprocessing`` around one study. Those transforms wrap the functions ``predict_case_folder`` calls
(``preprocess_case``, the same ``inferer`` object, ``postprocess_probabilities``);
``tests/test_inference.py::test_bundle_components_are_the_same_path`` checks that both give the same maps.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import Evaluator

from custom.core.atomic import atomic_write_json
from custom.core.errors import BraTSInputError
from custom.core.layout import SUMMARY_NAME, remove_unfinished_predictions
from custom.data.cases import case_datalist

logger = logging.getLogger(__name__)

_HEADER = "cannot run inference"


def one_case_collate(items: Sequence[Mapping]) -> dict:
    """The engine's batch: one case item ``{"case_id", "case_dir"}`` as it is (no tensors to stack)."""
    if len(items) != 1:
        raise ValueError(f"the inference engine runs one case folder per iteration, got {len(items)}")
    return dict(items[0])


class CaseFolderEvaluator(Evaluator):
    """Predict every case folder of ``val_data_loader`` into ``output_dir`` (see module docstring).

    Args:
        segmenter: an :class:`~custom.inference.segmenter.UncertaintySegmenter` (anything with
            ``predict_case_folder(case_dir, out_dir) -> summary entry``, ``device``, ``inferer``,
            ``mask_dilation``, ``with_uncertainty`` and ``summary_info()``; the fold ensemble's
            ``EnsembleSegmenter`` is one).
        val_data_loader: yields one ``{"case_id", "case_dir"}`` per iteration (:func:`case_loader`).
        output_dir: where predictions and ``summary.json`` go (created).
        val_handlers: Ignite/MONAI handlers (the config's ``handlers``: progress bar, ...).
        raise_on_failure: raise at the end when any case failed.

    After :meth:`run`, ``summary`` holds what ``summary.json`` holds:
    ``{"input_dir", "tta", "mask_dilation", "with_uncertainty", "cases": {case_id: entry}, "failures": {name: msg}}``.
    """

    def __init__(self, segmenter, val_data_loader, output_dir, val_handlers: Sequence | None = None,
                 raise_on_failure: bool = True, input_dir=None) -> None:
        super().__init__(device=segmenter.device, val_data_loader=val_data_loader, val_handlers=val_handlers,
                         decollate=False, amp=False)
        self.segmenter = segmenter
        self.output_dir = None if output_dir in (None, "") else Path(output_dir)
        self.input_dir = None if input_dir in (None, "") else Path(input_dir)
        self.raise_on_failure = bool(raise_on_failure)
        self.summary: dict = {}
        self.add_event_handler(Events.STARTED, self._start_summary)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._write_summary)

    def _start_summary(self, engine) -> None:
        self.summary = {"input_dir": None if self.input_dir is None else str(self.input_dir.resolve()),
                        "tta": self.segmenter.inferer.tta, "mask_dilation": self.segmenter.mask_dilation,
                        "with_uncertainty": self.segmenter.with_uncertainty, **self.segmenter.summary_info(),
                        "cases": {}, "failures": {}}

    def _iteration(self, engine, batchdata: Mapping[str, Any]) -> dict:
        case_dir = Path(batchdata["case_dir"])
        try:
            entry = self.segmenter.predict_case_folder(case_dir, self.output_dir)
        except Exception as exc:  # per-case isolation: one bad case must not stop the others
            logger.error("case failed: %s: %s", case_dir.name, exc)
            self.summary["failures"][case_dir.name] = str(exc)
            return {"case_id": case_dir.name, "error": str(exc)}
        case_id = entry.pop("case_id")
        self.summary["cases"][case_id] = entry
        return {"case_id": case_id, **entry}

    def _write_summary(self, engine) -> None:
        atomic_write_json(self.output_dir / SUMMARY_NAME, self.summary)

    def run(self, global_epoch: int = 1) -> dict:  # type: ignore[override]
        """Predict every case; returns ``summary``.

        Raises:
            BraTSInputError: no ``output_dir`` or no case to predict (before any work), and, with
                ``raise_on_failure``, at the end when cases failed (each named with its message).
        """
        if self.output_dir is None:
            raise BraTSInputError("--output_dir is required", header=_HEADER)
        if not self.state.epoch_length:
            raise BraTSInputError("no case folders to predict: pass --dataset_dir, a folder of BraTS case folders "
                                  "(or one case folder)", header=_HEADER)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_unfinished_predictions(self.output_dir):
            logger.warning("removed %s: left by an interrupted run", path)
        t0 = time.perf_counter()
        super().run(global_epoch)
        num_cases = len(self.summary["cases"]) + len(self.summary["failures"])
        logger.info("inference: %d cases in %.1f s -> %s", num_cases, time.perf_counter() - t0, self.output_dir)
        failures = self.summary["failures"]
        if failures and self.raise_on_failure:
            raise BraTSInputError(
                [f"{cid}: {msg}" for cid, msg in failures.items()],
                header=f"{len(failures)} of {num_cases} cases failed "
                       f"(no output written for them; the others are in {self.output_dir})")
        return self.summary


def case_loader(input_dir, output_dir=None) -> DataLoader:
    """The engine's data: one ``{"case_id", "case_dir"}`` per case folder of ``input_dir`` (none for no folder;
    ``output_dir`` inside ``input_dir`` is not a case)."""
    return DataLoader(Dataset(case_datalist(input_dir, skip=output_dir)), batch_size=1, shuffle=False, num_workers=0,
                      collate_fn=one_case_collate)


def infer_folder(segmenter, input_dir, output_dir, val_handlers: Sequence | None = None,
                 raise_on_failure: bool = True) -> dict:
    """Python entry to the bundle's inference run: the same engine on ``input_dir``; returns the summary."""
    engine = CaseFolderEvaluator(segmenter, case_loader(input_dir, output_dir), output_dir, val_handlers=val_handlers,
                                 raise_on_failure=raise_on_failure, input_dir=input_dir)
    return engine.run()
