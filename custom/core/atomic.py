"""Atomic writes: a file appears whole under its final name or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _tmp_name(path: Path) -> Path:
    """``dir/.name.tmp-PID.ext``: hidden, per process, and with the full extension kept (nibabel and
    numpy choose the format, and numpy even the file name, from it)."""
    stem, dot, extension = path.name.partition(".")
    return path.with_name(f".{stem}.tmp-{os.getpid()}{dot}{extension}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the same folder; on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path, obj, indent: int = 2) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def atomic_save_nifti(img, path) -> None:
    """Save a nibabel image atomically."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, str(tmp))


def atomic_save_npy(path, array) -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        np.save(str(tmp), array)


def atomic_copytree(src, dst) -> None:
    """Copy a folder so that ``dst`` is replaced whole (old copy removed only after the new one is complete)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        old = None
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
