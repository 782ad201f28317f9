"""Serve the Triton model repository with a real ``tritonserver`` until Ctrl-C / SIGTERM, restarting it if it crashes.

    .venv/bin/python scripts/serve_triton.py [--model_repository triton_models] [--http_port 8000] [--grpc_port 8001]
                                   [--metrics_port 8002] [--address 127.0.0.1] [--http true] [--max_restarts 5]

Uses ``tritonserver`` from PATH (NVIDIA's container) or the one bundled in the nvidia-pytriton wheel,
binds to 127.0.0.1 unless ``--address`` says otherwise, waits until both models are ready, forwards the
server log to stderr, and stops the server cleanly on Ctrl-C or SIGTERM. Export a model first
(``scripts/export.py --checkpoint CKPT``).

Supervision: when tritonserver exits on its own (tritonserver 2.51 aborts on one HTTP/JSON request declaring a
huge IMAGE shape, taking every model down), the reason is logged and the server is started again, at most
``--max_restarts`` times in ``--restart_window_s`` seconds. ``--http false`` serves gRPC only, which closes that
request path altogether (clients: ``scripts/triton_infer.py --protocol grpc``).
"""

from __future__ import annotations

import signal
import sys

import fire

from custom.core.cli import as_bool
from custom.deploy.triton_repository import MODEL_REPOSITORY, check_model_repository
from custom.deploy.triton_server import TritonServer


def main(model_repository=str(MODEL_REPOSITORY), http_port: int = 8000, grpc_port: int = 8001,
         metrics_port: int = 8002, address: str = "127.0.0.1", http: bool = True, startup_timeout_s: float = 300.0,
         threads: int | None = None, tritonserver: str | None = None, log_verbose: int = 0, max_restarts: int = 5,
         restart_window_s: float = 600.0) -> None:
    """Start tritonserver on ``model_repository`` and block until it is stopped.

    Args:
        model_repository: folder with brats_unc_volume/ and brats_unc_patch/ (filled by scripts/export.py).
        http_port, grpc_port, metrics_port: ports to listen on.
        address: interface for all endpoints (0.0.0.0 to serve other machines).
        http: serve HTTP as well as gRPC (false: gRPC only, ``--allow-http=false``).
        startup_timeout_s: seconds to wait for the models to become ready.
        threads: torch/OpenMP threads per model instance (OMP_NUM_THREADS), default: the library's.
        tritonserver: path of a tritonserver binary (default: PATH, then the nvidia-pytriton wheel).
        log_verbose: tritonserver --log-verbose level.
        max_restarts: restarts after crashes allowed within ``restart_window_s``; 0 = exit when it crashes.
        restart_window_s: the window for ``max_restarts``.
    """
    try:
        repo = check_model_repository(model_repository)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"[serve_triton] {err}")
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          address=address, http=as_bool(http, "http"), startup_timeout_s=startup_timeout_s,
                          threads=threads, binary=tritonserver, log_verbose=log_verbose)

    def _stop(signum, _frame):  # SIGTERM takes the same clean path as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    rc = 0
    try:
        server.start()
        endpoints = (f"HTTP {server.http_url}  " if server.http else "HTTP off  ") + f"gRPC {server.grpc_url}"
        print(f"[serve_triton] ready: {endpoints}  metrics {server.metrics_url}  (pid {server.process.pid}; "
              f"Ctrl-C to stop)", file=sys.stderr, flush=True)
        rc = server.supervise(max_restarts=int(max_restarts), window_s=float(restart_window_s))
        print(f"[serve_triton] tritonserver stopped for good with code {rc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("[serve_triton] stopping tritonserver", file=sys.stderr, flush=True)
    except (RuntimeError, TimeoutError) as err:
        server.stop()
        sys.exit(f"[serve_triton] {err}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        code = server.stop()
    print(f"[serve_triton] stopped (exit code {code})", file=sys.stderr, flush=True)
    # non-zero when tritonserver stopped on its own for good or could not stop cleanly (e.g. exit timeout expired)
    if rc or code:
        sys.exit(rc or code)


if __name__ == "__main__":
    fire.Fire(main)
