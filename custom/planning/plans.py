"""``Plans``: the experiment plan as data (``plans.json``) read through small typed accessors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

from custom.core.atomic import atomic_write_json
from custom.core.errors import BraTSInputError

#: version of custom.preprocessing.functional.preprocess_case's output; bump when it changes so that cached cases are redone
#: (kept here so that hashing a plan does not import torch)
PREPROCESS_VERSION = 1


# --------------------------------------------------------------------------------------------------- plans
class Plans:
    """Typed, read-only accessor over a plans.json dict (unknown extra keys are kept)."""

    REQUIRED = ("target_spacing", "patch_size", "batch_size", "kernels", "strides", "filters", "median_shape",
                "modalities", "regions", "regions_class_order", "normalization", "gpu_memory_gb",
                "planner_version")

    def __init__(self, data: Mapping, source: str = "plans"):
        missing = [k for k in self.REQUIRED if k not in data]
        if missing:
            raise BraTSInputError(f"{source}: missing keys {missing}", header="invalid plans")
        self._data = json.loads(json.dumps(dict(data)))  # deep copy, JSON types only
        self.source = source
        n = len(self._data["filters"])
        if len(self._data["kernels"]) != n or len(self._data["strides"]) != n:
            raise BraTSInputError(f"{source}: kernels, strides and filters must have one entry per stage "
                                  f"(got {len(self._data['kernels'])}, {len(self._data['strides'])}, {n})",
                                  header="invalid plans")

    @classmethod
    def load(cls, path) -> "Plans":
        path = Path(path)
        try:
            with open(path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise BraTSInputError(f"{path}: plans file not found (run scripts/prepare_data.py)",
                                  header="invalid plans") from None
        except json.JSONDecodeError as exc:
            raise BraTSInputError(f"{path}: not valid JSON ({exc})", header="invalid plans") from None
        return cls(data, source=str(path))

    def save(self, path) -> None:
        atomic_write_json(path, self._data)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self._data))

    def __getitem__(self, key):
        return self._data[key]

    def get(self, key, default=None):
        return self._data.get(key, default)

    def __eq__(self, other):
        return isinstance(other, Plans) and self._data == other._data

    def __repr__(self):
        return (f"Plans(patch_size={self.patch_size}, target_spacing={self.target_spacing}, "
                f"filters={self.filters}, batch_size={self.batch_size})")

    @property
    def target_spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self._data["target_spacing"])

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self._data["patch_size"])

    @property
    def kernels(self) -> list[list[int]]:
        return [list(map(int, k)) for k in self._data["kernels"]]

    @property
    def strides(self) -> list[list[int]]:
        return [list(map(int, s)) for s in self._data["strides"]]

    @property
    def filters(self) -> list[int]:
        return [int(f) for f in self._data["filters"]]

    @property
    def batch_size(self) -> int:
        return int(self._data["batch_size"])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._data["modalities"])

    @property
    def median_shape(self) -> tuple[int, int, int]:
        return tuple(int(m) for m in self._data["median_shape"])

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(self._data["regions"])

    @property
    def regions_class_order(self) -> tuple[int, ...]:
        return tuple(int(r) for r in self._data["regions_class_order"])

    @property
    def normalization(self) -> str:
        return str(self._data["normalization"])

    @property
    def num_stages(self) -> int:
        return len(self._data["filters"])

    def preprocessing_hash(self) -> str:
        """Hash of the fields that change the preprocessed cache (target spacing, normalization, modalities)."""
        key = {"target_spacing": [round(float(s), 8) for s in self._data["target_spacing"]],
               "normalization": self._data["normalization"], "modalities": list(self._data["modalities"]),
               "preprocess_version": PREPROCESS_VERSION}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_plans(path_or_dict) -> Plans:
    """A ``Plans`` from a path to plans.json, a dict, or a ``Plans`` (returned as is)."""
    if isinstance(path_or_dict, Plans):
        return path_or_dict
    if isinstance(path_or_dict, Mapping):
        return Plans(path_or_dict)
    if isinstance(path_or_dict, (str, os.PathLike)):
        return Plans.load(path_or_dict)
    raise TypeError(f"load_plans expects a path, a dict or a Plans, got {type(path_or_dict).__name__}")
