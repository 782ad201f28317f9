"""Triton deployment helpers: locate a ``tritonserver``, run it, fill the model repository, check requests.

Two ways to get a server:

- NVIDIA's Triton container: ``tritonserver`` is on ``PATH`` and its backends (Python backend with its
  stub) live in ``/opt/tritonserver/backends``; nothing needs preparing.
- The PyPI wheel ``nvidia-pytriton`` (CPU here): it ships ``pytriton/tritonserver/bin/tritonserver`` and
  ``backends/python/libtriton_python.so``, but the Python backend stub for each Python version sits apart
  (``python_backend_stubs/3.X/``). Triton looks for the stub beside ``libtriton_python.so``, so
  :func:`prepare_backend_dir` copies both into a writable folder; the wheel's bundled shared libraries
  (``nvidia_pytriton.libs``) must be on ``LD_LIBRARY_PATH``.

The Python backend stub embeds its own interpreter: :func:`server_env` points it at this environment's
site-packages and the repository root so that ``model.py`` can ``import custom``.

Names of the deployed models and their tensors (see ``triton_models/README.md``):

- :data:`VOLUME_MODEL` ``brats_unc_volume``: ``IMAGE`` float32 ``(4, X, Y, Z)`` + ``SPACING`` float32 ``(3,)``
  -> ``SEG`` uint8 ``(X, Y, Z)``, ``UNC`` float32 ``(X, Y, Z)``.
- :data:`PATCH_MODEL` ``brats_unc_patch``: ``IMAGE`` float32 ``(B, 4, P, P, P)`` -> ``PROBS`` float32
  ``(B, 4, P, P, P)`` (sigmoid of all network channels; batched across requests by dynamic batching).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from custom.errors import BraTSInputError

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the model repository shipped with the project (config.pbtxt + model.py per model; weights added by export)
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "triton_models"
VOLUME_MODEL = "brats_unc_volume"
PATCH_MODEL = "brats_unc_patch"
MODEL_NAMES = (VOLUME_MODEL, PATCH_MODEL)
#: largest accepted edge of a volume, in voxels (BraTS volumes are 240x240x155)
MAX_VOLUME_EDGE = 256
NUM_CHANNELS = 4


# ----------------------------------------------------------------------------------------------- request checks
def validate_volume_request(image, spacing, max_edge: int = MAX_VOLUME_EDGE, source: str = "request"):
    """Check one volume request before any computation; return ``(image float32, spacing float64 (3,))``.

    Args:
        image: array ``(4, X, Y, Z)`` float32, channels in ``MODALITIES`` order.
        spacing: array ``(3,)`` voxel spacing in mm, or ``None`` when the client did not send it.
        max_edge: largest accepted ``X``, ``Y`` and ``Z`` (voxels).
        source: what to name in the error (the input tensor, a file...).

    Raises:
        BraTSInputError: listing every problem found, each naming ``source``.
    """
    problems = []
    if image is None:
        raise BraTSInputError([f"{source}: input IMAGE is missing"], header="rejected volume request")
    image = np.asarray(image)
    if image.dtype != np.float32:
        problems.append(f"{source}: IMAGE must be float32, got {image.dtype}")
    if image.ndim != 4:
        problems.append(f"{source}: IMAGE must have 4 dims (4, X, Y, Z), got shape {tuple(image.shape)}")
    else:
        if image.shape[0] != NUM_CHANNELS:
            problems.append(
                f"{source}: IMAGE must have {NUM_CHANNELS} channels (t1c, t1n, t2f, t2w), got {image.shape[0]}"
            )
        spatial = tuple(int(s) for s in image.shape[1:])
        if min(spatial) < 1:
            problems.append(f"{source}: IMAGE is empty (spatial shape {spatial})")
        elif max(spatial) > max_edge:
            problems.append(f"{source}: IMAGE spatial shape {spatial} exceeds the limit of {max_edge} voxels per axis")
    if spacing is None:
        problems.append(f"{source}: input SPACING (3 voxel sizes in mm) is missing")
    else:
        spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
        if spacing.shape != (3,):
            problems.append(f"{source}: SPACING must hold 3 values (mm), got {spacing.size}")
        elif not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            problems.append(f"{source}: SPACING must be positive and finite, got {spacing.tolist()}")
    if not problems and image.size:
        # only after the shape checks: these read the whole volume
        if not np.all(np.isfinite(image)):
            problems.append(f"{source}: IMAGE contains NaN or infinite values")
        elif not np.any(image):
            problems.append(f"{source}: IMAGE is empty (every voxel is 0, no brain to segment)")
    if problems:
        raise BraTSInputError(problems, header="rejected volume request")
    return image, spacing


# ------------------------------------------------------------------------------------------ locating the server
@dataclass(frozen=True)
class TritonDistribution:
    """Where a ``tritonserver`` binary, its backends and its bundled libraries are."""

    binary: Path
    backends_dir: Path
    libs_dir: Path | None = None
    #: Python backend stub to copy beside libtriton_python.so (wheel only; the container has it in place)
    stub: Path | None = None


def _wheel_distribution() -> TritonDistribution | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).resolve().parent
    dist = root / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    if not binary.exists():
        return None
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"{stub}: the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonDistribution(binary, dist / "backends", libs if libs.is_dir() else None, stub)


def locate_tritonserver(binary=None) -> TritonDistribution:
    """Find a usable ``tritonserver``: ``binary`` if given, else the one on ``PATH`` (NVIDIA's container),
    else the ``nvidia-pytriton`` wheel's.

    Raises:
        FileNotFoundError: when none is found, saying how to get one.
    """
    if binary is None and os.environ.get("TRITONSERVER_BIN"):
        binary = os.environ["TRITONSERVER_BIN"]
    if binary is None:
        binary = shutil.which("tritonserver")
    if binary is not None:
        binary = Path(binary).resolve()
        if not binary.exists():
            raise FileNotFoundError(f"{binary}: tritonserver binary not found")
        wheel = _wheel_distribution()
        if wheel is not None and wheel.binary == binary:
            return wheel
        # container layout: /opt/tritonserver/bin/tritonserver and /opt/tritonserver/backends
        return TritonDistribution(binary, binary.parent.parent / "backends")
    wheel = _wheel_distribution()
    if wheel is None:
        raise FileNotFoundError(
            "no tritonserver found: run inside NVIDIA's Triton container (tritonserver on PATH) "
            "or install the nvidia-pytriton wheel (it bundles a tritonserver)"
        )
    return wheel


def prepare_backend_dir(dist: TritonDistribution, cache_dir=None) -> Path:
    """Return a backend directory where the Python backend finds its stub.

    For the wheel, ``backends/`` is copied (1.5 MB) into ``cache_dir`` (default: a per-user temp folder)
    with the stub for the running Python beside ``libtriton_python.so``; the copy is reused when complete.
    """
    if dist.stub is None:
        return dist.backends_dir
    if cache_dir is None:
        cache_dir = Path(tempfile.gettempdir()) / f"brats-triton-{os.getuid()}"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    target = Path(cache_dir) / f"backends-py{version}"
    stub_dst = target / "python" / "triton_python_backend_stub"
    if stub_dst.exists() and stub_dst.stat().st_size == dist.stub.stat().st_size:
        return target
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".backends-", dir=cache_dir))
    try:
        shutil.copytree(dist.backends_dir, tmp / "b")
        shutil.copy2(dist.stub, tmp / "b" / "python" / "triton_python_backend_stub")
        if target.exists():  # an incomplete or outdated copy
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp / "b", target)
        except OSError:
            if not stub_dst.exists():  # another process won the race with a complete copy otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def server_env(dist: TritonDistribution, base_env=None, threads: int | None = None) -> dict:
    """Environment for ``tritonserver`` and the Python backend stubs it spawns.

    - ``LD_LIBRARY_PATH``: the wheel's bundled libraries, and this interpreter's ``libpython`` folder so that
      the stub embeds the same Python build as this environment.
    - ``PYTHONPATH``: this environment's site-packages and the repository root (``import custom``).
    - ``OMP_NUM_THREADS``: ``threads`` if given (torch threads per model instance).
    """
    env = dict(os.environ if base_env is None else base_env)
    lib_dirs = []
    if dist.libs_dir is not None:
        lib_dirs.append(str(dist.libs_dir))
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED") and Path(libdir).is_dir():
        lib_dirs.append(libdir)
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    if lib_dirs:
        env["LD_LIBRARY_PATH"] = ":".join(lib_dirs)
    py_paths = [str(REPO_ROOT)] + [p for p in sysconfig.get_paths().values() if p.endswith("site-packages")]
    py_paths = list(dict.fromkeys(py_paths))
    if env.get("PYTHONPATH"):
        py_paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = ":".join(py_paths)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(int(threads))
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ the server
def _set_pdeathsig():
    # runs in the child: the server gets SIGTERM when its parent dies, never left orphaned. Linux ties this
    # to the forking THREAD, so start servers from a thread that outlives them (the main thread).
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """A real ``tritonserver`` process on a model repository; a context manager.

    Example::

        with TritonServer("triton_models", http_port=8000, grpc_port=8001, metrics_port=8002) as server:
            print(server.http_url)  # 127.0.0.1:8000

    Args:
        model_repository: folder with ``<model>/config.pbtxt`` and ``<model>/1/model.py``.
        http_port, grpc_port, metrics_port: ports (all bound to ``address``).
        address: interface to bind; ``127.0.0.1`` unless serving others is intended.
        models: names whose readiness :meth:`wait_ready` waits for (default: both project models).
        log_stream: where server log lines are forwarded (default ``sys.stderr``; ``None`` keeps them only
            in :attr:`log_tail`).
        startup_timeout_s: seconds :meth:`start` waits for readiness.
        threads: ``OMP_NUM_THREADS`` for the Python backend stubs.
        binary: explicit ``tritonserver`` path (else see :func:`locate_tritonserver`).
        extra_args: more ``tritonserver`` flags.
        exit_timeout_s: how long a SIGTERM waits for in-flight requests and model unloading.
    """

    def __init__(self, model_repository=DEFAULT_MODEL_REPOSITORY, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, address: str = "127.0.0.1", models=MODEL_NAMES, log_stream="stderr",
                 startup_timeout_s: float = 180.0, threads: int | None = None, binary=None, extra_args=(),
                 log_verbose: int = 0, exit_timeout_s: int = 30):
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"{self.model_repository}: model repository folder not found")
        for name in models:
            if not (self.model_repository / name / "config.pbtxt").exists():
                raise FileNotFoundError(f"{self.model_repository / name / 'config.pbtxt'}: model config not found")
        for port in (http_port, grpc_port, metrics_port):
            if not (0 < int(port) < 65536):
                raise ValueError(f"port must be in 1..65535, got {port}")
        self.http_port, self.grpc_port, self.metrics_port = int(http_port), int(grpc_port), int(metrics_port)
        self.address = address
        self.models = tuple(models)
        self.log_stream = sys.stderr if log_stream == "stderr" else log_stream
        self.startup_timeout_s = float(startup_timeout_s)
        self.threads = threads
        self.dist = locate_tritonserver(binary)
        self.extra_args = list(extra_args)
        self.log_verbose = int(log_verbose)
        self.exit_timeout_s = int(exit_timeout_s)
        self.process: subprocess.Popen | None = None
        self.log_tail: deque[str] = deque(maxlen=400)
        self._log_thread: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"

    def command(self, backend_dir) -> list[str]:
        return [
            str(self.dist.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
            # on SIGTERM, in-flight requests and model unloading get this long (unloading 4 volume-model
            # stubs on a busy 2-core machine took over 10 s); then tritonserver exits with code 1
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *self.extra_args,
        ]

    def _forward_logs(self):
        for line in self.process.stdout:
            self.log_tail.append(line)
            if self.log_stream is not None:
                with contextlib.suppress(Exception):
                    self.log_stream.write(line)
                    self.log_stream.flush()

    def logs(self) -> str:
        return "".join(self.log_tail)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> "TritonServer":
        """Start the process and wait until the server and all ``models`` are ready (else stop it and raise)."""
        if self.is_alive():
            raise RuntimeError(f"tritonserver already running (pid {self.process.pid})")
        backend_dir = prepare_backend_dir(self.dist)
        env = server_env(self.dist, threads=self.threads)
        self.process = subprocess.Popen(
            self.command(backend_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, errors="replace", preexec_fn=_set_pdeathsig,
        )
        self._log_thread = threading.Thread(target=self._forward_logs, name="tritonserver-logs", daemon=True)
        self._log_thread.start()
        try:
            self.wait_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, OSError):
            return 0

    def ready(self) -> bool:
        """Server live and every model in ``models`` ready (HTTP ``/v2/health/ready`` and ``/v2/models/M/ready``)."""
        if self._get("/v2/health/ready") != 200:
            return False
        return all(self._get(f"/v2/models/{m}/ready") == 200 for m in self.models)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_alive():
                if self._log_thread is not None:
                    self._log_thread.join(timeout=2)
                raise RuntimeError(
                    f"tritonserver exited with code {self.process.returncode} before becoming ready "
                    f"(model repository {self.model_repository}); last log lines:\n{''.join(list(self.log_tail)[-40:])}"
                )
            if self.ready():
                return
            time.sleep(0.25)
        raise TimeoutError(
            f"tritonserver not ready after {timeout_s:.0f} s (models {list(self.models)}); last log lines:\n"
            f"{''.join(list(self.log_tail)[-40:])}"
        )

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait (Triton drains in-flight requests for ``exit_timeout_s``), then SIGKILL. Returns the exit code."""
        if timeout_s is None:
            timeout_s = self.exit_timeout_s + 20
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)
        return self.process.returncode

    def wait(self) -> int:
        """Block until the process exits (serve_triton's foreground mode)."""
        return self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------------------- model repository
def _read_plans(plans_path):
    with open(plans_path) as fh:
        plans = json.load(fh)
    if "patch_size" not in plans:
        raise BraTSInputError([f"{plans_path}: not a plans.json (no 'patch_size')"], header="invalid plans")
    return plans


def prepare_model_repository(checkpoint, plans_path=None, repo_dir=DEFAULT_MODEL_REPOSITORY, template_dir=None,
                             volume_instances: int | None = None) -> Path:
    """Put a trained model into a Triton model repository (what ``scripts/export.py`` calls).

    Writes, each atomically:

    - ``<repo>/brats_unc_patch/1/model.pt``: the checkpoint (``{"model": state_dict}``), checked loadable;
    - ``<repo>/<model>/1/plans.json`` for both models: the training plan (``plans_path``, default the
      plans.json beside the checkpoint);
    - ``<repo>/brats_unc_volume/1/model_info.json``: ``{"with_uncertainty": bool, "out_channels": int}``
      read from the checkpoint.

    When ``repo_dir`` differs from ``template_dir`` (default: the project's ``triton_models/``), the
    ``config.pbtxt`` and ``model.py`` files are copied there first, so any folder becomes a servable repository.
    ``volume_instances`` sets the instance count of the volume model there (= volumes in flight; each
    instance is one Python process), e.g. fewer for a small CPU machine.

    Returns:
        the repository folder.

    Raises:
        BraTSInputError: checkpoint or plan missing or unreadable (the file is named).
    """
    from custom.inference import checkpoint_out_channels, load_state_dict, resolve_plans_path
    from custom.io_utils import atomic_path, atomic_write_json

    template_dir = Path(template_dir or DEFAULT_MODEL_REPOSITORY).resolve()
    repo_dir = Path(repo_dir).resolve()
    checkpoint = Path(checkpoint)
    out_channels = checkpoint_out_channels(load_state_dict(checkpoint))
    plans_path = Path(plans_path) if plans_path else resolve_plans_path(checkpoint)
    if not plans_path.is_file():
        raise BraTSInputError([f"{plans_path}: plans.json not found"], header="cannot export to Triton")
    _read_plans(plans_path)
    if volume_instances is not None and int(volume_instances) < 1:
        raise ValueError(f"volume_instances must be >= 1, got {volume_instances}")
    if volume_instances is not None and repo_dir == template_dir:
        raise ValueError(f"volume_instances would edit the shipped template {template_dir}; pass another repo_dir")
    for name in MODEL_NAMES:
        src, dst = template_dir / name, repo_dir / name
        if not (src / "config.pbtxt").exists():
            raise FileNotFoundError(f"{src / 'config.pbtxt'}: model template not found")
        (dst / "1").mkdir(parents=True, exist_ok=True)
        if src != dst:
            for rel in ("config.pbtxt", "1/model.py"):
                with atomic_path(dst / rel) as tmp:
                    shutil.copyfile(src / rel, tmp)
        with atomic_path(dst / "1" / "plans.json") as tmp:
            shutil.copyfile(plans_path, tmp)
    if volume_instances is not None:
        set_instance_count(repo_dir / VOLUME_MODEL / "config.pbtxt", int(volume_instances))
    with atomic_path(repo_dir / PATCH_MODEL / "1" / "model.pt") as tmp:
        shutil.copyfile(checkpoint, tmp)
    atomic_write_json(repo_dir / VOLUME_MODEL / "1" / "model_info.json",
                      {"with_uncertainty": out_channels == 4, "out_channels": out_channels,
                       "checkpoint": str(checkpoint.resolve())})
    return repo_dir


def set_instance_count(config_path, count: int) -> None:
    """Rewrite the ``count`` of the (single) ``instance_group`` of a ``config.pbtxt`` in place (atomically)."""
    import re

    from custom.io_utils import atomic_write_bytes

    text = Path(config_path).read_text()
    new, n = re.subn(r"(instance_group\s*\[\s*\{\s*count:\s*)\d+", rf"\g<1>{int(count)}", text)
    if n != 1:
        raise ValueError(f"{config_path}: expected one instance_group starting with 'count:', found {n}")
    if new != text:
        atomic_write_bytes(config_path, new.encode())


def read_model_parameters(model_config: dict) -> dict:
    """``parameters { key: ... value { string_value: ... } }`` of a Triton model config, parsed as JSON values."""
    out = {}
    for key, value in (model_config.get("parameters") or {}).items():
        text = value.get("string_value", "") if isinstance(value, dict) else str(value)
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def check_model_repository(repo_dir=DEFAULT_MODEL_REPOSITORY) -> Path:
    """Fail early, naming the missing file, when the repository has no exported model in it."""
    repo_dir = Path(repo_dir).resolve()
    missing = [repo_dir / name / rel for name in MODEL_NAMES for rel in ("config.pbtxt", "1/model.py", "1/plans.json")]
    missing += [repo_dir / PATCH_MODEL / "1" / "model.pt", repo_dir / VOLUME_MODEL / "1" / "model_info.json"]
    missing = [str(p) for p in missing if not p.exists()]
    if missing:
        raise FileNotFoundError(
            "model repository incomplete (run scripts/export.py --checkpoint CKPT first):\n"
            + "\n".join(f"  - {p}: missing" for p in missing)
        )
    return repo_dir


# ------------------------------------------------------------------------------------------------ the client
class TritonClientError(RuntimeError):
    """A request could not be served: server down, model not ready, or the server rejected the request."""


class VolumeClient:
    """Send one volume at a time to the volume model over HTTP or gRPC (tritonclient).

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
            raise TritonClientError(f"request{what} rejected by {self.model!r} at {self.url}: {text}") from None
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
    (``custom.data.load_case_arrays``, size limit) before anything is sent. ``concurrency`` cases are in flight
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
    from custom.inference import load_case, save_nifti, find_case_files, list_case_folders, output_paths, \
        remove_case_outputs

    case_dirs = list_case_folders(input_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
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
            label_path, unc_path = output_paths(output_dir, case_id)
            save_nifti(np.asarray(seg, np.uint8), affine, header, label_path)
            save_nifti(np.asarray(unc, np.float32), affine, header, unc_path)
        except BaseException:
            remove_case_outputs(output_dir, case_id)
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
