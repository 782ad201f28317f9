"""Segment BraTS case folders through a running Triton server (tritonclient, HTTP or gRPC).

    .venv/bin/python scripts/triton_infer.py --url 127.0.0.1:8001 --protocol grpc --input_dir CASES --output_dir OUT [--concurrency 4]
    .venv/bin/python scripts/triton_infer.py --url 127.0.0.1:8000 --protocol http --input_dir CASES --output_dir OUT

Writes ``OUT/<case_id>.nii.gz`` (uint8 labels 0..3) and ``OUT/<case_id>-unc.nii.gz`` (float32 uncertainty),
same shape and affine as the input, like bundle inference. Bad input files are rejected before sending.
Exits non-zero with a clear message when the server is down, the model is not ready, or cases failed.
"""

from __future__ import annotations

import sys

import fire

from custom.core.errors import BraTSInputError
from custom.deploy.triton_client import TritonClientError, infer_case_folders
from custom.deploy.triton_repository import VOLUME_MODEL


def main(input_dir: str, output_dir: str, url: str = "127.0.0.1:8001", protocol: str = "grpc",
         concurrency: int = 4, timeout: float = 600.0, model: str = VOLUME_MODEL, progress: bool = True) -> None:
    """Send every case folder under ``input_dir`` to ``model`` and write its labels and uncertainty.

    Args:
        input_dir: folder of BraTS case folders (or one case folder).
        output_dir: where ``<case_id>.nii.gz`` and ``<case_id>-unc.nii.gz`` go.
        url: ``host:port`` of the server (gRPC default port 8001, HTTP 8000).
        protocol: ``grpc`` or ``http``.
        concurrency: cases in flight at once.
        timeout: seconds per request before giving up.
        model: name of the volume model.
        progress: show a progress bar.
    """
    try:
        summary = infer_case_folders(input_dir, output_dir, url=url, protocol=protocol, model=model,
                                     concurrency=concurrency, timeout_s=timeout, progress=progress)
    except (TritonClientError, BraTSInputError, ValueError) as err:
        sys.exit(f"[triton_infer] {err}")
    print(f"[triton_infer] {len(summary['cases'])} cases -> {output_dir} ({protocol} {url})")


if __name__ == "__main__":
    fire.Fire(main)
