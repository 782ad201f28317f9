"""Training from MONAI Label through the bundle's train config.

MONAI Label hands a train task the labeled studies (``datastore.datalist()``: 4-channel study + final
label). The bundle's ``train.json`` trains from a prepared work directory (datalist, plans, preprocessed
cache; see DESIGN.md), so this task:

1. writes the labeled studies as BraTS case folders (``custom.data.studies.study_to_case_folder``),
2. runs ``scripts/prepare_data.py`` on them (validation, folds, plan, preprocessing),
3. runs ``python -m monai.bundle run training`` with ``train.json`` (+ any extra configs from the app
   conf, e.g. ``tiny.json``) on that work directory,
4. publishes ``model.pt`` and ``plans.json`` of the run next to the app's model path (atomically, plans
   first), which the infer tasks pick up on their next request (they reload on a new file time).

Progress: each step is logged (``TRAIN:: step k/4``), and every output line of the two subprocesses is
logged as it comes (``[prepare_data] ...``, ``[training] ...``: the bundle's per-iteration loss and
per-epoch validation lines). MONAI Label forwards the train task's output to the server log
(``logs/app.log``) and keeps its last lines in ``GET /train/``; the full output of each step is also
written to ``<train_dir>/<step>.log``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Dict, Optional, Sequence

from monai.bundle import ConfigParser
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask

from custom.core.atomic import atomic_path, atomic_write_json
from custom.core.errors import BraTSInputError
from custom.core.layout import checksum_path
from custom.data.studies import study_case_id, study_id_of, study_to_case_folder

logger = logging.getLogger(__name__)


#: most epochs a train request may ask for (nnU-Net's full schedule is 1000)
MAX_EPOCHS = 1000


def _number(request, key: str, default, kind, lo, hi):
    """``request[key]`` as ``kind`` within ``[lo, hi]`` (``default`` when absent); ``BraTSInputError`` otherwise."""
    value = request.get(key, default)
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise BraTSInputError([f"{key} must be a {kind.__name__}, got {value!r}"], "invalid train request") from None
    if isinstance(value, bool) or not lo <= number <= hi or (kind is int and number != float(value)):
        raise BraTSInputError([f"{key} must be a {kind.__name__} in [{lo}, {hi}], got {value!r}"],
                              "invalid train request")
    return number


class BraTSBundleTrainTask(BundleTrainTask):
    """``BundleTrainTask`` on the local bundle whose train config reads a prepared work directory.

    Args:
        bundle_path: the bundle directory (``configs/train.json`` and ``configs/metadata.json``).
        conf: the app conf (strings).
        model_path: where the trained ``model.pt`` is published (``plans.json`` goes beside it).
        work_root: folder for the converted cases and the work directory (``raw/``, ``work/``).
        extra_configs: config files merged after ``train.json`` (e.g. ``[".../tiny.json"]``).
        prepare_args: extra ``scripts/prepare_data.py`` arguments, e.g. ``{"patch_size": "[32,32,32]"}``.
        repo_root: the repository (``scripts/prepare_data.py`` lives there).
        variant: training variant folder under ``runs/`` the config writes to.
    """

    def __init__(
        self,
        bundle_path: str,
        conf: Dict[str, str],
        model_path: str,
        work_root: str,
        extra_configs: Sequence[str] = (),
        prepare_args: Optional[Dict[str, str]] = None,
        repo_root: Optional[str] = None,
        variant: str = "unc",
        const: Optional[BundleConstants] = None,
    ):
        super().__init__(bundle_path, conf, const=const)
        self.model_path = Path(model_path)
        self.work_root = Path(work_root)
        self.extra_configs = [str(Path(c).resolve()) for c in extra_configs]
        self.prepare_args = dict(prepare_args or {})
        self.repo_root = Path(repo_root) if repo_root else Path(bundle_path).resolve().parent
        self.variant = variant
        for c in self.extra_configs:
            if not Path(c).exists():
                raise BraTSInputError([f"{c}: extra train config not found"], "invalid MONAI Label app conf")

    def config_files(self) -> list:
        return [self.bundle_config_path] + self.extra_configs

    def config(self):
        options = super().config()
        options.update({"max_epochs": self._default_epochs(), "val_split": 0.5, "num_folds": 0, "fold": 0})
        # no multi-GPU config and no checkpoint loader: training always starts from the plan
        for key in ("multi_gpu", "gpus", "pretrained", "model_filename", "tracking", "tracking_uri",
                    "tracking_experiment_name", "run_id"):
            options.pop(key, None)
        return options

    def _default_epochs(self) -> int:
        parser = ConfigParser()
        try:
            parser.read_config(self.config_files())
        except Exception as exc:  # /info/ must keep answering while a config is being edited
            logger.warning(f"cannot read train configs {self.config_files()}: {exc}")
            return 1
        for key in ("num_epochs", "max_epochs", self.const.key_train_trainer_max_epochs()):
            value = parser.get(key)
            if isinstance(value, int):
                return value
        return 1

    def _parser(self) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(self.config_files())
        return parser

    def has_key(self, key: str) -> bool:
        """Whether the merged train configs define ``key``."""
        return self._parser().get(key) is not None

    def epochs_key(self) -> Optional[str]:
        """The config id that sets the number of epochs (first of ``num_epochs``, ``max_epochs``, trainer's)."""
        parser = self._parser()
        for key in ("num_epochs", "max_epochs", self.const.key_train_trainer_max_epochs()):
            if parser.get(key) is not None:
                return key
        return None

    def write_cases(self, datalist, raw_dir: Path) -> Dict[str, str]:
        """Write each labeled study as a BraTS case folder; returns ``{case_id: study path}``."""
        if raw_dir.exists():
            shutil.rmtree(raw_dir)
        raw_dir.mkdir(parents=True)
        mapping: Dict[str, str] = {}
        for index, item in enumerate(sorted(datalist, key=lambda d: d["image"])):
            case_id = study_case_id(study_id_of(item["image"]), index, used=list(mapping))
            study_to_case_folder(item["image"], item["label"], raw_dir, case_id)
            mapping[case_id] = item["image"]
        return mapping

    def _run(self, cmd, log_name: str) -> None:
        """Run ``cmd`` from the repository; log each output line as it comes and keep it in ``<log_name>.log``."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(self.repo_root), env.get("PYTHONPATH", "")] if p)
        cmd = [str(c) for c in cmd]
        logger.info(f"RUNNING:: {' '.join(cmd)}")
        tail: deque = deque(maxlen=60)
        with open(self.work_root / f"{log_name}.log", "w") as log, subprocess.Popen(
            cmd, cwd=str(self.repo_root), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1,
        ) as proc:
            for line in proc.stdout:
                log.write(line)
                line = line.rstrip()
                if line:
                    logger.info(f"[{log_name}] {line}")
                    tail.append(line)
            returncode = proc.wait()
        if returncode != 0:
            lines = "\n".join(tail)
            raise RuntimeError(f"{log_name} failed ({returncode}): {' '.join(cmd)}\n{lines}")

    def __call__(self, request, datastore: Datastore):
        start = time.time()
        datalist = self._fetch_datalist(request, datastore)
        if len(datalist) < 2:
            raise BraTSInputError(
                [f"{len(datalist)} labeled studies in the datastore; training needs at least 2 "
                 f"(save final labels first)"], "cannot train from MONAI Label"
            )
        val_split = _number(request, "val_split", 0.5, float, 0.01, 0.99)
        # 0: from val_split
        num_folds = _number(request, "num_folds", 0, int, 0, len(datalist)) or max(
            2, min(len(datalist), round(1.0 / val_split)))
        if num_folds < 2:
            raise BraTSInputError([f"num_folds must be 0 (from val_split) or at least 2, got {num_folds}"],
                                  "invalid train request")
        fold = _number(request, "fold", 0, int, 0, num_folds - 1)
        max_epochs = _number(request, "max_epochs", None, int, 1, MAX_EPOCHS)

        self.work_root.mkdir(parents=True, exist_ok=True)
        raw_dir, work_dir = self.work_root / "raw", self.work_root / "work"
        logger.info(f"TRAIN:: step 1/4: writing {len(datalist)} labeled studies as case folders in {raw_dir}")
        mapping = self.write_cases(datalist, raw_dir)
        if work_dir.exists():
            shutil.rmtree(work_dir)

        prepare = [sys.executable, self.repo_root / "scripts" / "prepare_data.py", "--dataset_dir", raw_dir,
                   "--work_dir", work_dir, "--num_folds", num_folds, "--seed", 0]
        for k, v in self.prepare_args.items():
            prepare += [f"--{k}", v]
        logger.info(f"TRAIN:: step 2/4: prepare_data (fingerprint, plan, {num_folds} folds, preprocessing)")
        self._run(prepare, "prepare_data")

        configs = "[" + ",".join(f"'{c}'" for c in self.config_files()) + "]"
        train = [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", self.bundle_path,
                 "--meta_file", self.bundle_metadata_path, "--config_file", configs,
                 "--work_dir", work_dir, "--fold", fold]
        epochs_key = self.epochs_key()
        if max_epochs is not None and epochs_key:
            train += [f"--{epochs_key}", max_epochs]
        if self.has_key("progress_bar"):  # a log is no terminal: the per-iteration loss lines are the progress
            train += ["--progress_bar", "false"]
        logger.info(f"TRAIN:: step 3/4: training fold {fold} of {num_folds} "
                    f"({epochs_key}={max_epochs if max_epochs is not None else 'from the config'})")
        self._run(train, "training")

        run_dir = work_dir / "runs" / self.variant / f"fold{fold}"
        logger.info(f"TRAIN:: step 4/4: publishing {run_dir / 'model.pt'} to {self.model_path}")
        published = self.publish(run_dir)
        stats = {
            "cases": mapping,
            "num_folds": num_folds,
            "fold": fold,
            "run_dir": str(run_dir),
            "model_path": published,
            "total_time_s": round(time.time() - start, 2),
        }
        atomic_write_json(self.work_root / "train_stats.json", stats)
        logger.info(f"Training Finished: {stats}")
        return stats

    def publish(self, run_dir) -> str:
        """Copy ``model.pt`` and ``plans.json`` of a finished run to the app's model path (plans first), then the
        run's ``model.pt.sha256``. A checksum file already at the model path is removed before the model is
        replaced: the loader checks a checksum file beside a model, and an old one would refuse the new model."""
        run_dir = Path(run_dir)
        model, plans = run_dir / "model.pt", run_dir / "plans.json"
        missing = [str(p) for p in (model, plans) if not p.exists()]
        if missing:
            raise RuntimeError(f"training finished without {missing}")
        self.model_path.parent.mkdir(parents=True, exist_ok=True)
        published_checksum = checksum_path(self.model_path)
        published_checksum.unlink(missing_ok=True)
        for src, dst in ((plans, self.model_path.parent / "plans.json"), (model, self.model_path),
                         (checksum_path(model), published_checksum)):
            if src.exists():  # (a run always has its checksum file; a model copied in by hand may not)
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
        return str(self.model_path)

    def stats(self):
        path = self.work_root / "train_stats.json"
        if path.exists():
            return json.loads(path.read_text())
        return {}
