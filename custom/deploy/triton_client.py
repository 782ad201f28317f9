"""Triton client side: a volume client over HTTP/gRPC and the folder-to-folder inference of scripts/triton_infer.py."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np

from custom.core.errors import BraTSInputError
from custom.core.layout import remove_predictions, remove_unfinished_predictions
from custom.data.cases import find_case_files, list_case_folders
from custom.data.nifti import load_case, save_prediction
from custom.deploy.triton_protocol import MAX_VOLUME_EDGE, validate_volume_request
from custom.deploy.triton_repository import VOLUME_MODEL


# ------------------------------------------------------------------------------------------------ the client
class TritonClientError(RuntimeError):
    """A request could not be served: server down, model not ready, or the server rejected the request."""


class VolumeClient:
    """Send one volume at a time to the volume model over HTTP or gRPC (tritonclient).

    ``pytriton.client.ModelClient("grpc://127.0.0.1:8001", "brats_unc_volume").infer_sample(IMAGE=..., SPACING=...)``
    also calls this model (tests/test_triton.py does). This client exists for what ModelClient does not do: the
    request id is the case id (it names the case in the server's log and errors), a server that is down, a model
    that is not ready, a timeout and a rejected request are told apart (ModelClient reports a refused connection as a
    timeout), and the server's status (400 for a rejected volume) stays in the message.

    Not thread-safe: use one per thread. Args:
        url: ``host:port`` (HTTP default port 8000, gRPC 8001).
        protocol: ``"http"`` or ``"grpc"``.
        model: volume model name.
        timeout_s: per-request timeout in seconds (network and inference).
    """

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", model: str = VOLUME_MODEL,
                 timeout_s: float = 600.0):
        protocol = str(protocol).lower()
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        if "://" in str(url):
            raise ValueError(f"url must be host:port without a scheme, got {url!r}")
        if not timeout_s or float(timeout_s) <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url, self.protocol, self.model, self.timeout_s = str(url), protocol, model, float(timeout_s)
        if protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(
                self.url, connection_timeout=min(self.timeout_s, 10.0), network_timeout=self.timeout_s
            )
        else:
            import tritonclient.grpc as tc

            self._client = tc.InferenceServerClient(self.url)
        self._tc = tc

    def close(self):
        with contextlib.suppress(Exception):
            self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_ready(self) -> None:
        """Raise :class:`TritonClientError` saying whether the server is down or the model not ready."""
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                live = self._client.is_server_live(client_timeout=min(self.timeout_s, 10.0))
            else:
                live = self._client.is_server_live()
        except (InferenceServerException, OSError, ConnectionError) as err:
            raise TritonClientError(
                f"Triton server at {self.url} ({self.protocol}) is not reachable: {err}. "
                f"Is it running (scripts/serve_triton.py) and is this the {self.protocol} port?"
            ) from None
        if not live:
            raise TritonClientError(f"Triton server at {self.url} is not live")
        try:
            ready = self._client.is_model_ready(self.model)
        except InferenceServerException as err:
            raise TritonClientError(f"model {self.model!r} at {self.url}: readiness check failed: {err}") from None
        if not ready:
            raise TritonClientError(
                f"model {self.model!r} is not ready on the Triton server at {self.url} "
                f"(still loading, failed to load, or not in the model repository; see the server log)"
            )

    def infer(self, image, spacing, request_id: str = ""):
        """``image`` (4, X, Y, Z) float32, ``spacing`` (3,) mm -> ``(seg uint8 (X,Y,Z), unc float32 (X,Y,Z))``.

        Raises:
            TritonClientError: the server rejected the request (its message included) or did not answer in time.
        """
        from tritonclient.utils import InferenceServerException

        tc = self._tc
        what = f" {request_id}" if request_id else ""
        image = np.ascontiguousarray(image)
        spacing = np.ascontiguousarray(np.asarray(spacing, dtype=np.float32).reshape(-1))
        inputs = [tc.InferInput("IMAGE", list(image.shape), _triton_dtype(image.dtype)),
                  tc.InferInput("SPACING", list(spacing.shape), "FP32")]
        inputs[0].set_data_from_numpy(image)
        inputs[1].set_data_from_numpy(spacing)
        outputs = [tc.InferRequestedOutput("SEG"), tc.InferRequestedOutput("UNC")]
        try:
            if self.protocol == "grpc":
                result = self._client.infer(self.model, inputs, outputs=outputs, request_id=request_id,
                                            client_timeout=self.timeout_s)
            else:
                result = self._client.infer(self.model, inputs, outputs=outputs, request_id=request_id)
        except InferenceServerException as err:
            text = str(err)
            if "Deadline" in text or "timed out" in text.lower() or "timeout" in text.lower():
                raise TritonClientError(
                    f"request{what} to {self.model!r} at {self.url} timed out after {self.timeout_s:.0f} s"
                ) from None
            status = f" ({err.status()})" if err.status() else ""
            raise TritonClientError(f"request{what} rejected by {self.model!r} at {self.url}{status}: {text}") from None
        except (OSError, ConnectionError) as err:  # HTTP: socket errors/timeouts surface as OSError subclasses
            raise TritonClientError(f"request{what} to {self.url} failed: {type(err).__name__}: {err}") from None
        return result.as_numpy("SEG"), result.as_numpy("UNC")


def _triton_dtype(dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(dtype))


def infer_case_folders(input_dir, output_dir, url: str = "127.0.0.1:8001", protocol: str = "grpc",
                       model: str = VOLUME_MODEL, concurrency: int = 4, timeout_s: float = 600.0,
                       progress: bool = True, max_edge: int = MAX_VOLUME_EDGE) -> dict:
    """Send every BraTS case folder under ``input_dir`` to the volume model; write what bundle inference writes.

    For each case: ``OUT/<case_id>.nii.gz`` (uint8 labels) and ``OUT/<case_id>-unc.nii.gz`` (float32), with the
    input's shape and affine, each written atomically; a failed case leaves neither. Files are validated
    (``custom.data.nifti.load_case_arrays``, size limit) before anything is sent. ``concurrency`` cases are in flight
    at once (one client per worker thread).

    Returns:
        ``{"cases": {case_id: {"shape", "time_s"}}, "failures": {case: message}}``.

    Raises:
        TritonClientError: server unreachable or model not ready (checked before any case is read).
        BraTSInputError: at the end, listing every failed case, when some failed (the others are written).
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    if int(concurrency) < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    # before the heavy imports below (torch, MONAI): a server that is down is reported at once
    with VolumeClient(url, protocol, model, timeout_s) as probe:
        probe.check_ready()
    # the bundle's own case reading and writing: the same validation, the same output files

    output_dir = Path(output_dir)
    case_dirs = list_case_folders(input_dir, skip=output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_unfinished_predictions(output_dir)
    local = threading.local()
    clients = []
    clients_lock = threading.Lock()

    def client() -> VolumeClient:
        if not hasattr(local, "client"):
            local.client = VolumeClient(url, protocol, model, timeout_s)
            with clients_lock:
                clients.append(local.client)
        return local.client

    def run_case(case_dir: Path) -> tuple[str, dict]:
        t0 = time.perf_counter()
        case = find_case_files(case_dir)
        case_id = case["case_id"]
        try:
            image, affine, spacing, header = load_case(case)
            image, _ = validate_volume_request(image, spacing, max_edge=max_edge, source=str(case_dir))
            seg, unc = client().infer(image, np.asarray(spacing, np.float32), request_id=case_id)
            if seg.shape != image.shape[1:] or unc.shape != image.shape[1:]:
                raise TritonClientError(f"{case_id}: server returned shapes {seg.shape}/{unc.shape}, "
                                        f"expected {image.shape[1:]}")
            save_prediction(np.asarray(seg, np.uint8), np.asarray(unc, np.float32), affine, header, output_dir,
                            case_id)
        except BaseException:
            remove_predictions(output_dir, case_id)
            raise
        return case_id, {"shape": list(seg.shape), "time_s": round(time.perf_counter() - t0, 3)}

    summary = {"url": url, "protocol": protocol, "model": model, "cases": {}, "failures": {}}
    try:
        with ThreadPoolExecutor(max_workers=int(concurrency), thread_name_prefix="triton-infer") as pool:
            futures = {pool.submit(run_case, d): d for d in case_dirs}
            bar = tqdm(as_completed(futures), total=len(futures), desc=f"triton {protocol}", unit="case",
                       disable=not progress)
            for fut in bar:
                case_dir = futures[fut]
                try:
                    case_id, entry = fut.result()
                    summary["cases"][case_id] = entry
                except (BraTSInputError, TritonClientError, OSError) as err:
                    summary["failures"][case_dir.name] = str(err)
                    tqdm.write(f"FAILED {case_dir.name}: {err}")
    finally:
        for c in clients:
            c.close()
    if summary["failures"]:
        raise BraTSInputError(
            [f"{cid}: {msg}" for cid, msg in sorted(summary["failures"].items())],
            header=f"{len(summary['failures'])} of {len(case_dirs)} cases failed "
                   f"(no output written for them; the others are in {output_dir})")
    return summary
