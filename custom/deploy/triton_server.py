"""Run a ``tritonserver`` (the ``nvidia-pytriton`` wheel's or one on PATH) as a child process bound to 127.0.0.1,
and keep it running (:meth:`TritonServer.supervise`).

Why not ``pytriton.triton.Triton`` (which can serve this repository through ``TritonConfig(model_repository=...)``):
it always runs the wheel's own binary (NVIDIA's container, with the GPU backends, has ``tritonserver`` on PATH),
copies the whole 29 MB server distribution into a new workspace on every start, and stops itself when
tritonserver exits, where this project restarts it (an upstream crash on one HTTP/JSON request must not end the
service; see :meth:`TritonServer.supervise`). Readiness is asked through tritonclient (``is_server_ready``,
``is_model_ready``) over gRPC or HTTP, whichever is enabled.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from custom.core.layout import MODEL_REPOSITORY, REPO_ROOT
from custom.deploy.triton_repository import MODEL_NAMES


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


def describe_exit(returncode: int | None) -> str:
    """``"code 1"`` or ``"signal SIGABRT (-6)"`` for a ``Popen.returncode``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name} ({returncode})"
    return f"code {returncode}"


class TritonServer:
    """A real ``tritonserver`` process on a model repository; a context manager.

    Example::

        with TritonServer("triton_models", http_port=8000, grpc_port=8001, metrics_port=8002) as server:
            print(server.grpc_url)  # 127.0.0.1:8001

    Args:
        model_repository: folder with ``<model>/config.pbtxt`` (and the files export writes).
        http_port, grpc_port, metrics_port: ports (all bound to ``address``).
        address: interface to bind; ``127.0.0.1`` unless serving others is intended.
        http: serve HTTP too; ``False`` = gRPC only (``--allow-http=false``), which closes the HTTP/JSON request
            path that can abort tritonserver 2.51 (a JSON body declaring a huge IMAGE shape: ``std::bad_alloc``).
        models: names whose readiness :meth:`wait_ready` waits for (default: both project models).
        log_stream: where server log lines are forwarded (default ``sys.stderr``; ``None`` keeps them only
            in :attr:`log_tail`).
        startup_timeout_s: seconds :meth:`start` waits for readiness.
        threads: ``OMP_NUM_THREADS`` for the Python backend stubs.
        binary: explicit ``tritonserver`` path (else see :func:`locate_tritonserver`).
        extra_args: more ``tritonserver`` flags.
        exit_timeout_s: how long a SIGTERM waits for in-flight requests and model unloading.
    """

    def __init__(self, model_repository=MODEL_REPOSITORY, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, address: str = "127.0.0.1", http: bool = True, models=MODEL_NAMES,
                 log_stream="stderr", startup_timeout_s: float = 180.0, threads: int | None = None, binary=None,
                 extra_args=(), log_verbose: int = 0, exit_timeout_s: int = 30):
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
        self.http = bool(http)
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
        self._stopping = threading.Event()
        #: ``[(time.time(), reason)]`` of every restart done by :meth:`supervise`
        self.restarts: list[tuple[float, str]] = []

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
        http = ([f"--http-address={self.address}", f"--http-port={self.http_port}"] if self.http
                else ["--allow-http=false"])
        return [
            str(self.dist.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            *http,
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

    def _forward_logs(self, process):
        for line in process.stdout:
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
        self._stopping.clear()
        backend_dir = prepare_backend_dir(self.dist)
        env = server_env(self.dist, threads=self.threads)
        self.process = subprocess.Popen(
            self.command(backend_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, errors="replace", preexec_fn=_set_pdeathsig,
        )
        self._log_thread = threading.Thread(target=self._forward_logs, args=(self.process,),
                                            name="tritonserver-logs", daemon=True)
        self._log_thread.start()
        try:
            self.wait_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        """Server ready and every model in ``models`` ready, asked through tritonclient (gRPC when HTTP is off)."""
        from tritonclient.utils import InferenceServerException

        if self.http:
            import tritonclient.http as tc

            client = tc.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=2.0)
            kwargs = {}
        else:
            import tritonclient.grpc as tc

            client = tc.InferenceServerClient(self.grpc_url)
            kwargs = {"client_timeout": 2.0}
        try:
            return bool(client.is_server_ready(**kwargs)) and all(
                client.is_model_ready(m, **kwargs) for m in self.models)
        except (InferenceServerException, OSError, ConnectionError):
            return False
        finally:
            with contextlib.suppress(Exception):
                client.close()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_alive():
                if self._log_thread is not None:
                    self._log_thread.join(timeout=2)
                raise RuntimeError(
                    f"tritonserver exited with {describe_exit(self.process.returncode)} before becoming ready "
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
        self._stopping.set()
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
        """Block until the process exits."""
        return self.process.wait()

    def supervise(self, max_restarts: int = 5, window_s: float = 600.0, report=None) -> int:
        """Block while the server runs; when it exits on its own (a crash), log why and start it again.

        Returns when :meth:`stop` was called (from a signal handler or another thread): the exit code. Gives up,
        returning the crash's exit code, after ``max_restarts`` restarts within ``window_s`` seconds (a server
        that cannot stay up is not hidden by an endless loop) or when a restart does not become ready.

        Args:
            report: ``report(message)`` for each crash and restart (default: a line on stderr).
        """
        report = report or (lambda msg: print(f"[serve_triton] {msg}", file=sys.stderr, flush=True))
        while True:
            code = self.process.wait()
            if self._stopping.is_set():
                return code
            if self._log_thread is not None:
                self._log_thread.join(timeout=2)
            tail = [line.strip() for line in list(self.log_tail)[-60:]]
            hints = [line for line in tail if any(k in line for k in ("bad_alloc", "terminate called", "Signal (",
                                                                      "error", "Error"))]
            reason = f"tritonserver exited on its own with {describe_exit(code)}"
            if hints:
                reason += f" ({hints[0][:200]})"
            now = time.time()
            recent = [t for t, _ in self.restarts if now - t < window_s]
            if len(recent) >= int(max_restarts):
                report(f"{reason}; {len(recent)} restarts in the last {window_s:.0f} s already: giving up")
                return code if code else 1
            self.restarts.append((now, reason))
            report(f"{reason}; restarting ({len(recent) + 1} of at most {max_restarts} in {window_s:.0f} s)")
            try:
                self.start()
            except (RuntimeError, TimeoutError) as err:
                report(f"restart failed: {err}")
                return code if code else 1
            if self._stopping.is_set():  # stopped while restarting
                self.stop()
                return self.process.returncode
            report(f"ready again: pid {self.process.pid}")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
