"""Atomic writes: a file appears whole under its final name or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from custom.core.errors import BraTSInputError
from custom.core.layout import checksum_path, temporary_path

#: errno values that mean "the disk (or the quota) is full"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(path, exc: OSError) -> OSError:
    """The error for a write to ``path`` that ran out of space: names the file and the space left."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return OSError(exc.errno, f"no space left on the device writing {path} ({free}; {exc.strerror or exc})",
                   str(path))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the same folder; on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(path, exc) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_paths(paths):
    """Yield temporary paths for files that must appear together; on success they are fsynced and renamed.

    The LAST path is the unit's commit: it is removed before the others are renamed and renamed after them, so
    whoever sees it sees the other files of the same write (a kill in between leaves the others without it,
    and a reader treats them as unfinished; see :func:`custom.core.layout.remove_unfinished_predictions`).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("atomic_paths needs at least one path")
    tmps = [temporary_path(p) for p in paths]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmps
        for tmp in tmps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        paths[-1].unlink(missing_ok=True)
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(paths[-1], exc) from exc
        raise
    finally:
        for tmp in tmps:
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


class _HashingWriter:
    """File object for ``torch.save`` that hashes what it writes and keeps the first OSError (torch's zip
    writer turns a failed write into an unrelated RuntimeError, e.g. ``basic_ios::clear``)."""

    def __init__(self, fh):
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            n = self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.sha256.update(data)
        return n

    def flush(self) -> None:
        self.fh.flush()


def _read_checksums(path: Path) -> list[str]:
    """The SHA-256 digests listed in ``path``'s checksum file (``sha256sum`` format), or []."""
    try:
        lines = checksum_path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0].lower() for line in lines if line.strip()]


def _checksum_text(path: Path, digests) -> bytes:
    return "".join(f"{d}  {path.name}\n" for d in digests).encode()


def atomic_torch_save(obj, path) -> str:
    """``torch.save`` atomically, with the file's SHA-256 beside it in ``<name>.sha256`` (``sha256sum -c``
    format); returns the digest.

    While the new file is renamed into place the checksum file lists both the new and the previous
    digest, so a kill at any point leaves a file that :func:`verify_checksum` accepts. A full disk is
    reported as such (``OSError`` ``ENOSPC`` naming the file and the space left), not as torch's
    ``basic_ios::clear``.
    """
    import torch

    path = Path(path)
    previous = _read_checksums(path)[:2] if path.exists() else []
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            writer = _HashingWriter(fh)
            try:
                torch.save(obj, writer)
                fh.flush()
            except (OSError, RuntimeError) as exc:
                if writer.error is not None:
                    raise writer.error from exc
                raise
        digest = writer.sha256.hexdigest()
        atomic_write_bytes(checksum_path(path), _checksum_text(path, [digest] + [d for d in previous if d != digest]))
    atomic_write_bytes(checksum_path(path), _checksum_text(path, [digest]))
    return digest


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path) -> str:
    """Check ``path`` against its ``<name>.sha256`` (written by :func:`atomic_torch_save`); returns the digest.

    Raises:
        BraTSInputError: the checksum file is missing or the content differs (a corrupt or altered file),
            naming the file.
    """
    path = Path(path)
    expected = _read_checksums(path)
    if not expected:
        raise BraTSInputError(f"{path}: no checksum file {checksum_path(path).name} beside it (it was not written "
                              "by this version, or was copied without it); to trust the file as it is: "
                              f"sha256sum {path.name} > {checksum_path(path).name}", header="unverified checkpoint")
    digest = file_sha256(path)
    if digest not in expected:
        raise BraTSInputError(f"{path}: SHA-256 {digest[:16]}... differs from {checksum_path(path).name} "
                              f"({expected[0][:16]}...): the file is corrupt or was changed after it was written",
                              header="corrupt checkpoint")
    return digest


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
